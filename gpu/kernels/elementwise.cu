// Small elementwise and reduction kernels: casts for the GEMM inputs, bias, SiLU, column sums.

// Where flat element i of a [rows, cols] view with row stride ld lies: i itself when the rows
// are contiguous (every caller of the casts today), else row i / cols at stride ld. The GPU has
// no 64-bit divider (a division is dozens of instructions per element), so the contiguous
// case skips it.
static __device__ __forceinline__ long strided_at(long i, long ld, long cols) {
    if (ld == cols) return i;
    long r = i / cols;
    return r * ld + (i - r * cols);
}

// dst[r, j] = lowp(src[r * ld + j]); mode 0: bf16, 1: fp16. dst is contiguous [rows, cols].
static __device__ __forceinline__ void cast_lowp_f32_body(const float* src, long ld, long rows, long cols,
                                         u16* dst, int mode) {
    long total = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        float v = src[strided_at(i, ld, cols)];
        dst[i] = mode == 0 ? f32_to_bf16(v) : f32_to_f16(v);
    }
}
extern "C" __global__ void cast_lowp_f32(const CastLowpF32 p) { cast_lowp_f32_body(CAST_LOWP_F32_ARGS(p)); }

// y[r * ld + j] += b[j]
static __device__ __forceinline__ void bias_add_f32_body(float* y, long ld, long rows, long cols, const float* b) {
    long total = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long r = i / cols, j = i - r * cols;
        y[r * ld + j] += b[j];
    }
}
extern "C" __global__ void bias_add_f32(const BiasAddF32 p) { pdl_wait(); pdl_launch_dependents(); bias_add_f32_body(BIAS_ADD_F32_ARGS(p)); }

// xs = silu(u)
static __device__ __forceinline__ void silu_fwd_f32_body(const float* u, float* xs, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        xs[i] = silu_f32(u[i]);
}
extern "C" __global__ void silu_fwd_f32(const SiluFwdF32 p) { silu_fwd_f32_body(SILU_FWD_F32_ARGS(p)); }

// g = g * silu'(u), in place
static __device__ __forceinline__ void silu_bwd_f32_body(const float* u, float* g, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        g[i] = g[i] * silu_grad_f32(u[i]);
}
extern "C" __global__ void silu_bwd_f32(const SiluBwdF32 p) { silu_bwd_f32_body(SILU_BWD_F32_ARGS(p)); }

// partial[rb, j] = sum over rows r of block rb (increasing r) of src[r * ld + j].
// grid (ceil(cols / blockDim), n_rb)
static __device__ __forceinline__ void colsum_partial_f32_body(const float* src, long ld, long rows, long cols,
                                              long rows_per, float* partial) {
    long j = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long rb = blockIdx.y;
    if (j >= cols) return;
    long r0 = rb * rows_per, r1 = min(rows, r0 + rows_per);
    float acc = 0.0f;
    for (long r = r0; r < r1; ++r) acc += src[r * ld + j];
    partial[rb * cols + j] = acc;
}
extern "C" __global__ void colsum_partial_f32(const ColsumPartialF32 p) { colsum_partial_f32_body(COLSUM_PARTIAL_F32_ARGS(p)); }

// dst[j] += sum over rb (increasing) of partial[rb, j]
static __device__ __forceinline__ void colsum_final_f32_body(const float* partial, long n_rb, long cols, float* dst) {
    long j = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float acc = 0.0f;
    for (long rb = 0; rb < n_rb; ++rb) acc += partial[rb * cols + j];
    dst[j] += acc;
}
extern "C" __global__ void colsum_final_f32(const ColsumFinalF32 p) { colsum_final_f32_body(COLSUM_FINAL_F32_ARGS(p)); }

// The stored low-precision copy of a GEMM output (training in bf16 / fp16 keeps in_proj's xz
// so): x[r * ld + j] (+ b[j] unless null) is rounded to lowp, stored into dst[r, j]
// (contiguous [rows, cols]), and the rounded value written back into x, so the forward reads
// the same values the backward later widens from dst. mode 0: bf16, 1: fp16.
static __device__ __forceinline__ void round_lowp_f32_body(float* x, long ld, long rows, long cols, const float* b,
                                          u16* dst, int mode) {
    long total = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long at = strided_at(i, ld, cols);
        float v = x[at];
        if (b) v += b[i % cols];
        u16 h = mode == 0 ? f32_to_bf16(v) : f32_to_f16(v);
        dst[i] = h;
        x[at] = mode == 0 ? bf16_to_f32(h) : f16_to_f32(h);
    }
}
extern "C" __global__ void round_lowp_f32(const RoundLowpF32 p) { round_lowp_f32_body(ROUND_LOWP_F32_ARGS(p)); }

// dst[r * ld + j] = f32(src[r, j]) (src contiguous [rows, cols]); mode 0: bf16, 1: fp16.
static __device__ __forceinline__ void widen_lowp_f32_body(const u16* src, long rows, long cols, float* dst, long ld,
                                          int mode) {
    long total = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        u16 h = src[i];
        dst[strided_at(i, ld, cols)] = mode == 0 ? bf16_to_f32(h) : f16_to_f32(h);
    }
}
extern "C" __global__ void widen_lowp_f32(const WidenLowpF32 p) { widen_lowp_f32_body(WIDEN_LOWP_F32_ARGS(p)); }
