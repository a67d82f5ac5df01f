// Causal depthwise conv1d + bias (+ SiLU) with document resets and an initial window
// (twin of reference/src/ops/conv1d.rs). D_CONV is a compile-time constant.
//
// starts[b * L + t]: position where the document of (b, t) starts, −1 when the row has not
// been reset since position 0 (the initial window is then visible).

__device__ __forceinline__ float conv_visible(long p, int start, long c, const float* x_row, long ldx,
                                              const float* init, int km1) {
    if (p >= 0) {
        return (start < 0 || p >= start) ? x_row[p * ldx + c] : 0.0f;
    }
    if (start < 0 && init) return init[c * km1 + (km1 + p)];
    return 0.0f;
}

// Positions per thread of the sliding-window kernels (conv1d_fwd, conv1d_bwd_dx); the
// launchers in gpu/src/ops/conv1d.rs use the same CONV_TL.
#define CONV_TL 32

// u = conv(x) + bias (where u is not null), xs = silu(u) (and its bf16 / fp16 copy xs_lp where
// not null). x: [B, L, ·] with row stride ldx (the x half of xz).
// init: [B, d_inner, km1] or null. Thread per (channel, CONV_TL positions of one row): the
// window's inputs stay in registers, so each x is read once. grid (B * ceil(L / CONV_TL),
// ceil(di / blockDim)).
static __device__ __forceinline__ void conv1d_fwd_f32_body(const float* x, long ldx, const float* w, const float* bias,
                                          const int* starts, const float* init, float* u, float* xs,
                                          long batch, long L, long di, u16* xs_lp, int lp_mode) {
    const int km1 = D_CONV - 1;
    long c = blockIdx.y * (long)blockDim.x + threadIdx.x;
    if (c >= di) return;
    long nseg = (L + CONV_TL - 1) / CONV_TL;
    long b = blockIdx.x / nseg, t0 = (blockIdx.x % nseg) * CONV_TL;
    long t1 = min(L, t0 + (long)CONV_TL);
    const float* x_row = x + b * L * ldx;
    const float* ib = init ? init + b * di * km1 : 0;
    float wk[D_CONV];
#pragma unroll
    for (int k = 0; k < D_CONV; ++k) wk[k] = w[c * D_CONV + k];
    // win[k]: the input at p = t − km1 + k (for p < 0 the initial window, or 0).
    float win[D_CONV];
#pragma unroll
    for (int k = 0; k < km1; ++k) {
        long p = t0 - km1 + k;
        win[k] = p >= 0 ? x_row[p * ldx + c] : (ib ? ib[c * km1 + (km1 + p)] : 0.0f);
    }
    for (long t = t0; t < t1; ++t) {
        win[km1] = x_row[t * ldx + c];
        int st = starts[b * L + t];
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k < D_CONV; ++k) {
            long p = t - km1 + k;
            bool vis = p >= 0 ? (st < 0 || p >= st) : st < 0;
            acc += wk[k] * (vis ? win[k] : 0.0f);
        }
        if (bias) acc += bias[c];
        long i = (b * L + t) * di + c;
        if (u) u[i] = acc;
        float v = silu_f32(acc);
        if (xs) xs[i] = v;
        if (xs_lp) xs_lp[i] = lp_mode == 0 ? f32_to_bf16(v) : f32_to_f16(v);
#pragma unroll
        for (int k = 0; k < km1; ++k) win[k] = win[k + 1];
    }
}
extern "C" __global__ void conv1d_fwd_f32(const Conv1dFwdF32 p) { conv1d_fwd_f32_body(CONV1D_FWD_F32_ARGS(p)); }

// The window after the last position, [B, d_inner, km1]. Thread per (b, c, j).
static __device__ __forceinline__ void conv1d_last_f32_body(const float* x, long ldx, const int* starts, const float* init,
                                           float* last, long batch, long L, long di) {
    const int km1 = D_CONV - 1;
    long total = batch * di * km1;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long j = i % km1, c = (i / km1) % di, b = i / (km1 * di);
        const float* x_row = x + b * L * ldx;
        const float* ib = init ? init + b * di * km1 : 0;
        int st = L > 0 ? starts[b * L + L - 1] : -1;
        long p = L - km1 + j;
        last[i] = conv_visible(p, st, c, x_row, ldx, ib, km1);
    }
}
extern "C" __global__ void conv1d_last_f32(const Conv1dLastF32 p) { conv1d_last_f32_body(CONV1D_LAST_F32_ARGS(p)); }

// dx[b, p, c] = Σ_k w[c, k] · g[b, p + km1 − k, c] over the positions whose document sees p,
// written with row stride ldx (the x half of d_xz). g = du, or with u not null the gradient
// through the SiLU, g = du · silu'(u), which the kernel also writes to g_out (the other conv
// backward kernels read it). Thread per (channel, CONV_TL positions of one row), the g window
// in registers; grid as conv1d_fwd_f32.
static __device__ __forceinline__ void conv1d_bwd_dx_f32_body(const float* du, const float* w, const int* starts, float* dx,
                                             long ldx, long batch, long L, long di, const float* u,
                                             float* g_out, u16* dx_lp, int lp_mode, const float* d_last) {
    const int km1 = D_CONV - 1;
    long c = blockIdx.y * (long)blockDim.x + threadIdx.x;
    if (c >= di) return;
    long nseg = (L + CONV_TL - 1) / CONV_TL;
    long b = blockIdx.x / nseg, p0 = (blockIdx.x % nseg) * CONV_TL;
    long p1 = min(L, p0 + (long)CONV_TL);
    const float* du_b = du + b * L * di;
    const float* u_b = u ? u + b * L * di : 0;
    const int* st_b = starts + b * L;
    float wk[D_CONV];
#pragma unroll
    for (int k = 0; k < D_CONV; ++k) wk[k] = w[c * D_CONV + k];
    // gw[j], sw[j]: g and the document start at t = p + j (t < L; else unused).
    float gw[D_CONV];
    int sw[D_CONV];
#pragma unroll
    for (int j = 0; j < km1; ++j) {
        long t = p0 + j;
        gw[j] = 0.0f;
        sw[j] = 0;
        if (t < L) {
            float g = du_b[t * di + c];
            if (u_b) g = g * silu_grad_f32(u_b[t * di + c]);
            gw[j] = g;
            sw[j] = st_b[t];
        }
    }
    for (long p = p0; p < p1; ++p) {
        long tn = p + km1;
        gw[km1] = 0.0f;
        sw[km1] = 0;
        if (tn < L) {
            float g = du_b[tn * di + c];
            if (u_b) g = g * silu_grad_f32(u_b[tn * di + c]);
            gw[km1] = g;
            sw[km1] = st_b[tn];
        }
        float acc = 0.0f;
#pragma unroll
        for (int k = D_CONV - 1; k >= 0; --k) {
            int j = km1 - k;  // t = p + j
            if (p + j < L && (sw[j] < 0 || p >= sw[j])) acc += wk[k] * gw[j];
        }
        // The final window's gradient (as conv1d_last_bwd_f32 adds it, in the same order).
        if (d_last && p >= L - km1) {
            int st = st_b[L - 1];
            if (st < 0 || p >= st) acc += d_last[(b * di + c) * km1 + (p - (L - km1))];
        }
        if (dx_lp)
            dx_lp[(b * L + p) * ldx + c] = lp_mode == 0 ? f32_to_bf16(acc) : f32_to_f16(acc);
        else
            dx[(b * L + p) * ldx + c] = acc;
        if (g_out) g_out[(b * L + p) * di + c] = gw[0];
#pragma unroll
        for (int j = 0; j < km1; ++j) {
            gw[j] = gw[j + 1];
            sw[j] = sw[j + 1];
        }
    }
}
extern "C" __global__ void conv1d_bwd_dx_f32(const Conv1dBwdDxF32 p) { conv1d_bwd_dx_f32_body(CONV1D_BWD_DX_F32_ARGS(p)); }

// Gradient of the initial window, [B, d_inner, km1]. Thread per (b, c, j).
static __device__ __forceinline__ void conv1d_bwd_init_f32_body(const float* du, const float* w, const int* starts,
                                               float* dinit, long batch, long L, long di) {
    const int km1 = D_CONV - 1;
    long total = batch * di * km1;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long j = i % km1, c = (i / km1) % di, b = i / (km1 * di);
        float acc = 0.0f;
        for (int k = 0; k < D_CONV; ++k) {
            long t = j - k;  // p = j − km1, t = p + km1 − k
            if (t >= 0 && t < L && starts[b * L + t] < 0) acc += w[c * D_CONV + k] * du[(b * L + t) * di + c];
        }
        dinit[i] = acc;
    }
}
extern "C" __global__ void conv1d_bwd_init_f32(const Conv1dBwdInitF32 p) { conv1d_bwd_init_f32_body(CONV1D_BWD_INIT_F32_ARGS(p)); }

// Partial weight / bias gradients over row blocks: part_w[rb, c, k], part_b[rb, c].
// grid (ceil(di / blockDim), n_rb).
static __device__ __forceinline__ void conv1d_bwd_dw_partial_f32_body(const float* x, long ldx, const float* du, const int* starts,
                                                     const float* init, long batch, long L, long di, long rows_per,
                                                     float* part_w, float* part_b) {
    const int km1 = D_CONV - 1;
    long c = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long rb = blockIdx.y;
    if (c >= di) return;
    long rows = batch * L;
    long r0 = rb * rows_per, r1 = min(rows, r0 + rows_per);
    float aw[D_CONV];
#pragma unroll
    for (int k = 0; k < D_CONV; ++k) aw[k] = 0.0f;
    float ab = 0.0f;
    // win[k]: the input at p = t − km1 + k of the current row's batch entry, in registers (so
    // each x is read once); reloaded where a row block starts and at each batch entry's t = 0.
    float win[D_CONV];
    long b = r0 / L, t = r0 - (r0 / L) * L;
    const float* x_row = x + b * L * ldx;
    const float* ib = init ? init + b * di * km1 : 0;
    for (long row = r0; row < r1; ++row) {
        if (row == r0 || t == 0) {
            x_row = x + b * L * ldx;
            ib = init ? init + b * di * km1 : 0;
#pragma unroll
            for (int k = 0; k < km1; ++k) {
                long p = t - km1 + k;
                win[k] = p >= 0 ? x_row[p * ldx + c] : (ib ? ib[c * km1 + (km1 + p)] : 0.0f);
            }
        }
        win[km1] = x_row[t * ldx + c];
        int st = starts[row];
        float g = du[row * di + c];
        ab += g;
#pragma unroll
        for (int k = 0; k < D_CONV; ++k) {
            long p = t - km1 + k;
            bool vis = p >= 0 ? (st < 0 || p >= st) : st < 0;
            aw[k] += g * (vis ? win[k] : 0.0f);
        }
#pragma unroll
        for (int k = 0; k < km1; ++k) win[k] = win[k + 1];
        if (++t == L) {
            t = 0;
            ++b;
        }
    }
#pragma unroll
    for (int k = 0; k < D_CONV; ++k) part_w[(rb * di + c) * D_CONV + k] = aw[k];
    if (part_b) part_b[rb * di + c] = ab;
}
extern "C" __global__ void conv1d_bwd_dw_partial_f32(const Conv1dBwdDwPartialF32 p) { conv1d_bwd_dw_partial_f32_body(CONV1D_BWD_DW_PARTIAL_F32_ARGS(p)); }

// Backward of the final window (conv1d_last_f32): d_last [B, d_inner, km1] is added into dx
// (row stride ldx) where the window holds this call's inputs, else into dinit where it still
// holds the initial window (no reset in the row). Thread per (b, c, j): each touches its own
// element, so no atomics. Runs after conv1d_bwd_dx_f32 and conv1d_bwd_init_f32.
static __device__ __forceinline__ void conv1d_last_bwd_f32_body(const float* d_last, const int* starts, float* dx, long ldx,
                                               float* dinit, long batch, long L, long di) {
    const int km1 = D_CONV - 1;
    long total = batch * di * km1;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long j = i % km1, c = (i / km1) % di, b = i / (km1 * di);
        int st = L > 0 ? starts[b * L + L - 1] : -1;
        long p = L - km1 + j;
        float g = d_last[i];
        if (p >= 0) {
            if (dx && (st < 0 || p >= st)) dx[(b * L + p) * ldx + c] += g;
        } else if (st < 0) {
            dinit[(b * di + c) * km1 + (km1 + p)] += g;
        }
    }
}
extern "C" __global__ void conv1d_last_bwd_f32(const Conv1dLastBwdF32 p) { conv1d_last_bwd_f32_body(CONV1D_LAST_BWD_F32_ARGS(p)); }
