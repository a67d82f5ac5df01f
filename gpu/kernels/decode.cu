// The decode step: one token per row, the recurrent state updated in place (twin of
// reference/src/model.rs `step`). Between the two kernels run x_proj and dt_proj (cuBLAS).
//
// starts[b] == 0 marks a reset of row b: its window and SSM state count as zero.

// Conv update: window [B, d_inner, km1] shifted in place; xs = silu(conv(window, x) + bias).
// x: in_proj's x half (row stride ldx). Thread per (b, c). The sum runs in the order of
// conv1d_fwd_f32 (taps ascending, then the bias), so both give the same bits. xs_lp (may be
// null): xs again in bf16 (lp_mode 0) or fp16 (1) for x_proj.
static __device__ __forceinline__ void conv_update_f32_body(const float* x, long ldx, const float* w, const float* bias,
                                           const int* starts, float* window, float* xs, u16* xs_lp, int lp_mode,
                                           long batch, long di) {
    const int km1 = D_CONV - 1;
    long total = batch * di;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long c = i % di, b = i / di;
        bool reset = starts[b] == 0;
        float* win = window + i * km1;
        float vals[D_CONV];
#pragma unroll
        for (int k = 0; k < km1; ++k) vals[k] = reset ? 0.0f : win[k];
        vals[km1] = x[b * ldx + c];
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k < D_CONV; ++k) acc += w[c * D_CONV + k] * vals[k];
        if (bias) acc += bias[c];
        float v = silu_f32(acc);
        xs[i] = v;
        if (xs_lp) xs_lp[i] = lp_mode == 0 ? f32_to_bf16(v) : f32_to_f16(v);
#pragma unroll
        for (int k = 0; k < km1; ++k) win[k] = vals[k + 1];
    }
}
extern "C" __global__ void conv_update_f32(const ConvUpdateF32 p) { conv_update_f32_body(CONV_UPDATE_F32_ARGS(p)); }

// Sum over the D_STATE_PAD lanes of a group (xor butterfly: every lane gets the same bits).
__device__ __forceinline__ float decode_group_sum(float v) {
#pragma unroll
    for (int o = D_STATE_PAD / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Scan update with dt bias + softplus, the D skip and the z gate:
//   dt = softplus(delta + dt_bias), h = exp(dt A) h + dt x B, y = C·h + D x, out = y silu(z).
// h: [B, d_inner, d_state] in place. B and C sit in x_proj's output (row stride ldbc, B at
// column col_b, C right after). Thread per (b, c, n): D_STATE_PAD lanes per channel, 256
// threads per block; grid (ceil(d_inner / channels per block), batch). out_lp (may be null):
// out again in bf16 (lp_mode 0) or fp16 (1) for out_proj.
static __device__ __forceinline__ void ssm_update_f32_body(const float* xs, const float* delta, const float* a_log, const float* xbc, long ldbc, long col_b,
               const float* dvec, const float* z, long ldz, const float* dt_bias, const int* starts, float* h_state,
               float* out, u16* out_lp, int lp_mode, long batch, long di, long ds) {
    int tid = threadIdx.x, n = tid % D_STATE_PAD;
    long c = blockIdx.x * (long)(256 / D_STATE_PAD) + tid / D_STATE_PAD;
    long b = blockIdx.y;
    bool cval = c < di, nval = n < ds;
    long cc = cval ? c : di - 1;
    float A2 = nval ? -expf(a_log[cc * ds + n]) * 1.4426950408889634f : 0.0f;
    float* hp = h_state + (b * di + cc) * ds + n;
    float h = (nval && starts[b] != 0) ? *hp : 0.0f;
    float x = xs[b * di + cc];
    float dt = softplus_f32(delta[b * di + cc] + dt_bias[cc]);
    const float* bc = xbc + b * ldbc + col_b;
    float Bn = nval ? bc[n] : 0.0f;
    float Cn = nval ? bc[ds + n] : 0.0f;
    h = exp2f(dt * A2) * h + (dt * x) * Bn;
    float y = decode_group_sum(Cn * h);
    if (cval && nval) *hp = h;
    if (cval && n == 0) {
        y += dvec[cc] * x;
        float o = z ? y * silu_f32(z[b * ldz + cc]) : y;
        out[b * di + c] = o;
        if (out_lp) out_lp[b * di + c] = lp_mode == 0 ? f32_to_bf16(o) : f32_to_f16(o);
    }
}
extern "C" __global__ void __launch_bounds__(256) ssm_update_f32(const SsmUpdateF32 p) { ssm_update_f32_body(SSM_UPDATE_F32_ARGS(p)); }
