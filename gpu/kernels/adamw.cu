// Global gradient norm (f64, fixed order) and AdamW (twin of reference/src/optim.rs).

__device__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// part[blockIdx.x] = Σ g² over a fixed grid-stride share, in f64. Block 256.
static __device__ __forceinline__ void sumsq_partial_f64_body(const float* g, long n, double* part) {
    __shared__ double sh[8];
    double acc = 0.0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double v = (double)g[i];
        acc += v * v;
    }
    acc = warp_sum_f64(acc);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += sh[w];
        part[blockIdx.x] = s;
    }
}
extern "C" __global__ void sumsq_partial_f64(const SumsqPartialF64 p) { sumsq_partial_f64_body(SUMSQ_PARTIAL_F64_ARGS(p)); }

// out[0] = Σ part (in order). One thread.
static __device__ __forceinline__ void sumsq_final_f64_body(const double* part, long n, double* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        double s = 0.0;
        for (long i = 0; i < n; ++i) s += part[i];
        out[0] = s;
    }
}
extern "C" __global__ void sumsq_final_f64(const SumsqFinalF64 p) { sumsq_final_f64_body(SUMSQ_FINAL_F64_ARGS(p)); }

// One AdamW update. clip: multiply g by clip_c first and store it back (as the reference).
static __device__ __forceinline__ void adamw_f32_body(float* p, float* g, float* m, float* v, long n, int clip, float clip_c,
                                     float b1, float b2, float omb1, float omb2, float eps, int decays,
                                     float decay, float step_size, float sqrt_bc2) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = g[i];
        if (clip) {
            gi = gi * clip_c;
            g[i] = gi;
        }
        float pi = p[i];
        if (decays) pi = pi * decay;
        float mi = b1 * m[i] + omb1 * gi;
        float vi = b2 * v[i] + omb2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / sqrt_bc2 + eps;
        p[i] = pi - step_size * (mi / denom);
    }
}
extern "C" __global__ void adamw_f32(const AdamwF32 p) { adamw_f32_body(ADAMW_F32_ARGS(p)); }
