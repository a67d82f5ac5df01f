// Embedding lookup and its gradient (twin of the loops in reference/src/model/{forward,backward}.rs).

// out[i, :] = emb[tokens[i], :]; grid (n), block 256.
static __device__ __forceinline__ void embedding_fwd_f32_body(const unsigned int* tokens, const float* emb, float* out, long d) {
    long i = blockIdx.x;
    long t = tokens[i];
    for (long j = threadIdx.x; j < d; j += blockDim.x) out[i * d + j] = emb[t * d + j];
}
extern "C" __global__ void embedding_fwd_f32(const EmbeddingFwdF32 p) { pdl_wait(); pdl_launch_dependents(); embedding_fwd_f32_body(EMBEDDING_FWD_F32_ARGS(p)); }

// For each distinct token u (sorted on the host), grad[tok[u], :] += d[pos, :] for its positions
// in increasing order: the same order of additions as the reference, without atomics.
// grid (n_unique, ceil(d / 256)), block 256.
static __device__ __forceinline__ void embedding_bwd_f32_body(const unsigned int* uniq, const int* offsets, const int* positions,
                                             const float* dresid, float* grad, long d) {
    long u = blockIdx.x;
    long j = blockIdx.y * (long)blockDim.x + threadIdx.x;
    if (j >= d) return;
    long t = uniq[u];
    float g = grad[t * d + j];
    for (int p = offsets[u]; p < offsets[u + 1]; ++p) g += dresid[(long)positions[p] * d + j];
    grad[t * d + j] = g;
}
extern "C" __global__ void embedding_bwd_f32(const EmbeddingBwdF32 p) { embedding_bwd_f32_body(EMBEDDING_BWD_F32_ARGS(p)); }
