// Fused residual add + RMSNorm / LayerNorm (twin of reference/src/ops/norm.rs).

// One block per row. x_out = x_in + add (add may be null: x_out = x_in, and x_out may be null
// when add is null); y = norm(x_out). is_layer: LayerNorm (mean subtracted, bias b).
// y_lp (may be null): y again in bf16 (lp_mode 0) or fp16 (1), the next GEMM's operand; y may
// then be null. x_out_lp (may be null): x_in + add (or x_in) in that precision. x_out may be
// x_in (in place: each thread reads back only what it wrote).
static __device__ __forceinline__ void norm_fwd_f32_body(const float* x_in, const float* add, float* x_out, float* y,
                                        float* mean_out, float* rstd_out, const float* w, const float* b,
                                        long d, float eps, int is_layer, u16* y_lp, int lp_mode,
                                        u16* x_out_lp) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    const float* xr = x_in + r * d;
    const float* ar = add ? add + r * d : 0;
    float* xo = (add && x_out) ? x_out + r * d : 0;
    float s = 0.0f;
    for (long j = threadIdx.x; j < d; j += blockDim.x) {
        float v = xr[j];
        if (ar) { v = v + ar[j]; xo[j] = v; }
        if (x_out_lp) x_out_lp[r * d + j] = lp_mode == 0 ? f32_to_bf16(v) : f32_to_f16(v);
        s += v;
    }
    const float* xs = xo ? xo : xr;
    if (xo) __syncthreads();  // each thread reads back only what it wrote; kept for clarity
    float inv_d = 1.0f / (float)d;
    float mean = is_layer ? block_sum(s, sh) * inv_d : 0.0f;
    float ss = 0.0f;
    for (long j = threadIdx.x; j < d; j += blockDim.x) {
        float c = xs[j] - mean;
        ss += c * c;
    }
    ss = block_sum(ss, sh);
    float rstd = 1.0f / sqrtf(ss * inv_d + eps);
    if (y || y_lp) {
        for (long j = threadIdx.x; j < d; j += blockDim.x) {
            float v = (xs[j] - mean) * rstd * w[j];
            if (b) v += b[j];
            if (y) y[r * d + j] = v;
            if (y_lp) y_lp[r * d + j] = lp_mode == 0 ? f32_to_bf16(v) : f32_to_f16(v);
        }
    }
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[r] = mean;
        if (rstd_out) rstd_out[r] = rstd;
    }
}
extern "C" __global__ void norm_fwd_f32(const NormFwdF32 p) { pdl_wait(); pdl_launch_dependents(); norm_fwd_f32_body(NORM_FWD_F32_ARGS(p)); }

// dx for one row per block: dx = rstd (g − mean(g) − xhat · mean(g · xhat)), g = dy · w.
// accum: dx_out += dx, else dx_out = dx.
static __device__ __forceinline__ void norm_bwd_dx_f32_body(const float* x, const float* w, const float* mean_in,
                                           const float* rstd_in, const float* dy, float* dx_out, long d,
                                           int is_layer, int accum) {
    __shared__ float sh[33];
    long r = blockIdx.x;
    float mean = mean_in[r], rstd = rstd_in[r];
    const float* xr = x + r * d;
    const float* dyr = dy + r * d;
    float sg = 0.0f, sgx = 0.0f;
    for (long j = threadIdx.x; j < d; j += blockDim.x) {
        float xh = (xr[j] - mean) * rstd;
        float g = dyr[j] * w[j];
        sg += g;
        sgx += g * xh;
    }
    float inv_d = 1.0f / (float)d;
    float mean_g = is_layer ? block_sum(sg, sh) * inv_d : 0.0f;
    float mean_gx = block_sum(sgx, sh) * inv_d;
    for (long j = threadIdx.x; j < d; j += blockDim.x) {
        float xh = (xr[j] - mean) * rstd;
        float g = dyr[j] * w[j];
        float v = rstd * (g - mean_g - xh * mean_gx);
        dx_out[r * d + j] = accum ? dx_out[r * d + j] + v : v;
    }
}
extern "C" __global__ void norm_bwd_dx_f32(const NormBwdDxF32 p) { norm_bwd_dx_f32_body(NORM_BWD_DX_F32_ARGS(p)); }

// Partial column sums of dy · xhat (and dy for the bias) over row blocks.
// grid (ceil(d / blockDim), n_rb).
static __device__ __forceinline__ void norm_bwd_dw_partial_f32_body(const float* x, const float* mean_in, const float* rstd_in,
                                                   const float* dy, long rows, long d, long rows_per,
                                                   float* part_w, float* part_b) {
    long j = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long rb = blockIdx.y;
    if (j >= d) return;
    long r0 = rb * rows_per, r1 = min(rows, r0 + rows_per);
    float aw = 0.0f, ab = 0.0f;
    for (long r = r0; r < r1; ++r) {
        float g = dy[r * d + j];
        aw += g * ((x[r * d + j] - mean_in[r]) * rstd_in[r]);
        ab += g;
    }
    part_w[rb * d + j] = aw;
    if (part_b) part_b[rb * d + j] = ab;
}
extern "C" __global__ void norm_bwd_dw_partial_f32(const NormBwdDwPartialF32 p) { norm_bwd_dw_partial_f32_body(NORM_BWD_DW_PARTIAL_F32_ARGS(p)); }
