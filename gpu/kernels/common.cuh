// Shared helpers of every Vet-Mamba kernel. Compiled by NVRTC with -DD_STATE_PAD, -DD_CONV and
// -DCHUNK set from the model config (see gpu/src/kernels.rs). No headers: NVRTC needs none.
//
// Every kernel takes one parameter: its struct from <op>.cuh (generated from gpu/src/ops/<op>.rs,
// the launcher's side), unpacked by <STRUCT>_ARGS(p) into the body's arguments, in order.
//
// Determinism: every reduction below has one fixed order (xor butterflies inside a warp, then
// warps in index order). No floating-point atomics anywhere.

typedef unsigned short u16;
typedef unsigned long long u64;

__device__ __forceinline__ float sigmoid_f32(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float silu_f32(float x) { return x * sigmoid_f32(x); }
__device__ __forceinline__ float silu_grad_f32(float x) {
    float s = sigmoid_f32(x);
    return s * (1.0f + x * (1.0f - s));
}
// softplus(v) = v for v > 20, else log1p(exp(v)) (reference::float::softplus).
__device__ __forceinline__ float softplus_f32(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
__device__ __forceinline__ float softplus_grad_f32(float v) { return v > 20.0f ? 1.0f : sigmoid_f32(v); }

__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ u16 f32_to_f16(float x) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

// Programmatic dependent launch (sm_90; `Dev` launches the kernels in `PDL_KERNELS` with it).
// pdl_wait: returns once the grids this one depends on have finished and their writes are
// visible; a kernel launched without the attribute returns at once. Such a kernel touches no
// memory another kernel writes before it. pdl_launch_dependents: the next kernel of the stream
// may start (its own pdl_wait still waits for this one to finish).
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), same value on every thread.
// `sh` holds 33 floats.
__device__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float r = l < nw ? sh[l] : 0.0f;
        r = warp_sum(r);
        if (l == 0) sh[32] = r;
    }
    __syncthreads();
    return sh[32];
}

__device__ float block_max(float v, float* sh) {
    v = warp_max(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float r = l < nw ? sh[l] : -3.402823466e38f;
        r = warp_max(r);
        if (l == 0) sh[32] = r;
    }
    __syncthreads();
    return sh[32];
}
