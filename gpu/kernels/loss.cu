// Fused softmax + masked cross-entropy + gradient over the vocabulary (twin of
// reference/src/loss.rs). One block per position; the logits are overwritten by
// d(scale · loss)/d logits, or (grad_lp not null) that gradient goes to grad_lp in bf16 / fp16
// (lp_mode 0 / 1) and the logits stay. row_loss[r] = logsumexp − logit[target] (0 for masked
// rows); the host sums it in f64 in position order.
//
// The row is read three times (max, sum of exponentials, gradient). When the launch grants
// V floats of dynamic shared memory (gpu/src/ops/loss.rs: 50,280 × 4 bytes fit the 227 KiB
// of an sm_90 block), the first pass copies the row there and the other two read it from
// there: one read of the logits from device memory instead of three. Same order of every
// sum, so the same bits either way.
static __device__ __forceinline__ void cross_entropy_fwd_bwd_f32_body(float* logits, const unsigned int* targets,
                                                     const unsigned char* mask, long V, float k,
                                                     float* row_loss, u16* grad_lp, int lp_mode) {
    __shared__ float sh[33];
    extern __shared__ float srow[];
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    const bool staged = (unsigned long long)dyn >= (unsigned long long)V * sizeof(float);
    long r = blockIdx.x;
    float* lr = logits + r * V;
    u16* gl = grad_lp ? grad_lp + r * V : (u16*)0;
    if (mask && !mask[r]) {
        for (long j = threadIdx.x; j < V; j += blockDim.x) {
            if (gl) gl[j] = 0;
            else lr[j] = 0.0f;
        }
        if (threadIdx.x == 0) row_loss[r] = 0.0f;
        return;
    }
    long t = targets[r];
    float lt = lr[t];
    float m = -3.402823466e38f;
    if (staged) {
        for (long j = threadIdx.x; j < V; j += blockDim.x) {
            float x = lr[j];
            srow[j] = x;
            m = fmaxf(m, x);
        }
    } else {
        for (long j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, lr[j]);
    }
    // (block_max synchronises the block: the staged row is complete after it.)
    m = block_max(m, sh);
    const float* src = staged ? srow : lr;
    float s = 0.0f;
    for (long j = threadIdx.x; j < V; j += blockDim.x) s += expf(src[j] - m);
    s = block_sum(s, sh);
    float lse = m + logf(s);
    if (threadIdx.x == 0) row_loss[r] = lse - lt;
    for (long j = threadIdx.x; j < V; j += blockDim.x) {
        float g = expf(src[j] - lse) * k;
        if (j == t) g -= k;
        if (gl) gl[j] = lp_mode == 0 ? f32_to_bf16(g) : f32_to_f16(g);
        else lr[j] = g;
    }
}
extern "C" __global__ void cross_entropy_fwd_bwd_f32(const CrossEntropyFwdBwdF32 p) { cross_entropy_fwd_bwd_f32_body(CROSS_ENTROPY_FWD_BWD_F32_ARGS(p)); }
