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

// u = conv(x) + bias, xs = silu(u). x: [B, L, ·] with row stride ldx (the x half of xz).
// init: [B, d_inner, km1] or null. Thread per (b, t, c).
static __device__ __forceinline__ void conv1d_fwd_f32_body(const float* x, long ldx, const float* w, const float* bias,
                                          const int* starts, const float* init, float* u, float* xs,
                                          long batch, long L, long di) {
    long total = batch * L * di;
    const int km1 = D_CONV - 1;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long c = i % di, row = i / di, t = row % L, b = row / L;
        const float* x_row = x + b * L * ldx;
        const float* ib = init ? init + b * di * km1 : 0;
        int st = starts[row];
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k < D_CONV; ++k) {
            long p = t - km1 + k;
            acc += w[c * D_CONV + k] * conv_visible(p, st, c, x_row, ldx, ib, km1);
        }
        if (bias) acc += bias[c];
        u[i] = acc;
        if (xs) xs[i] = silu_f32(acc);
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

// dx[b, p, c] = Σ_k w[c, k] · du[b, p + km1 − k, c] over the positions whose document sees p.
// Written with row stride ldx (the x half of d_xz). Thread per (b, p, c).
static __device__ __forceinline__ void conv1d_bwd_dx_f32_body(const float* du, const float* w, const int* starts, float* dx,
                                             long ldx, long batch, long L, long di) {
    const int km1 = D_CONV - 1;
    long total = batch * L * di;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long c = i % di, row = i / di, p = row % L, b = row / L;
        float acc = 0.0f;
#pragma unroll
        for (int k = D_CONV - 1; k >= 0; --k) {
            long t = p + km1 - k;
            if (t < L) {
                int st = starts[b * L + t];
                if (st < 0 || p >= st) acc += w[c * D_CONV + k] * du[(b * L + t) * di + c];
            }
        }
        dx[row * ldx + c] = acc;
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
    for (long row = r0; row < r1; ++row) {
        long t = row % L, b = row / L;
        const float* x_row = x + b * L * ldx;
        const float* ib = init ? init + b * di * km1 : 0;
        int st = starts[row];
        float g = du[row * di + c];
        ab += g;
#pragma unroll
        for (int k = 0; k < D_CONV; ++k) aw[k] += g * conv_visible(t - km1 + k, st, c, x_row, ldx, ib, km1);
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
            if (st < 0 || p >= st) dx[(b * L + p) * ldx + c] += g;
        } else if (st < 0) {
            dinit[(b * di + c) * km1 + (km1 + p)] += g;
        }
    }
}
extern "C" __global__ void conv1d_last_bwd_f32(const Conv1dLastBwdF32 p) { conv1d_last_bwd_f32_body(CONV1D_LAST_BWD_F32_ARGS(p)); }
