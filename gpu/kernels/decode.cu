// The decode step: one token per row, the recurrent state updated in place (twin of
// reference/src/model.rs `step`). Between the two kernels run x_proj and dt_proj (cuBLAS).
//
// starts[b] == 0 marks a reset of row b: its window and SSM state count as zero.

// Conv update: window [B, d_inner, km1] shifted in place; xs = silu(conv(window, x) + bias).
// x: in_proj's x half (row stride ldx). Thread per (b, c). The sum runs in the order of
// conv1d_fwd_f32 (taps ascending, then the bias), so both give the same bits. xs_lp (may be
// null): xs again in bf16 (lp_mode 0) or fp16 (1) for x_proj.
__device__ __forceinline__ float lp_to_f32(u16 v, int lp_mode) {
    if (lp_mode == 0) return __uint_as_float(((unsigned int)v) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

// One element i = b * di + c of the conv update, in two halves: what it reads before x (the
// window, the weights, the bias), then the update on x[b, c] = x_val.
struct ConvPre {
    float vals[D_CONV];
    float w[D_CONV];
    float bias;
};
static __device__ __forceinline__ ConvPre conv_update_pre(long i, const float* w, const float* bias, const int* starts,
                                                          const float* window, long di) {
    const int km1 = D_CONV - 1;
    long c = i % di, b = i / di;
    bool reset = starts[b] == 0;
    const float* win = window + i * km1;
    ConvPre p;
#pragma unroll
    for (int k = 0; k < km1; ++k) p.vals[k] = reset ? 0.0f : win[k];
#pragma unroll
    for (int k = 0; k < D_CONV; ++k) p.w[k] = w[c * D_CONV + k];
    p.bias = bias ? bias[c] : 0.0f;
    return p;
}
static __device__ __forceinline__ void conv_update_post(ConvPre p, long i, float x_val, bool has_bias, float* window,
                                                        float* xs, u16* xs_lp, int lp_mode) {
    const int km1 = D_CONV - 1;
    p.vals[km1] = x_val;
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < D_CONV; ++k) acc += p.w[k] * p.vals[k];
    if (has_bias) acc += p.bias;
    float v = silu_f32(acc);
    xs[i] = v;
    if (xs_lp) xs_lp[i] = lp_mode == 0 ? f32_to_bf16(v) : f32_to_f16(v);
    float* win = window + i * km1;
#pragma unroll
    for (int k = 0; k < km1; ++k) win[k] = p.vals[k + 1];
}
static __device__ __forceinline__ void conv_update_elem(long i, float x_val, const float* w, const float* bias,
                                                        const int* starts, float* window, float* xs, u16* xs_lp,
                                                        int lp_mode, long di) {
    conv_update_post(conv_update_pre(i, w, bias, starts, window, di), i, x_val, bias != 0, window, xs, xs_lp, lp_mode);
}
static __device__ __forceinline__ void conv_update_f32_body(const float* x, long ldx, const float* w, const float* bias,
                                           const int* starts, float* window, float* xs, u16* xs_lp, int lp_mode,
                                           long batch, long di) {
    long total = batch * di;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x)
        conv_update_elem(i, x[(i / di) * ldx + i % di], w, bias, starts, window, xs, xs_lp, lp_mode, di);
}
extern "C" __global__ void conv_update_f32(const ConvUpdateF32 p) { pdl_wait(); pdl_launch_dependents(); conv_update_f32_body(CONV_UPDATE_F32_ARGS(p)); }

// Sum over the D_STATE_PAD lanes of a group (xor butterfly: every lane gets the same bits).
__device__ __forceinline__ float decode_group_sum(float v) {
#pragma unroll
    for (int o = D_STATE_PAD / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Scan update with dt bias + softplus, the D skip and the z gate:
//   dt = softplus(delta + dt_bias), h = exp(dt A) h + dt x B, y = C·h + D x, out = y silu(z).
// h: [B, d_inner, d_state] in place. B and C sit in x_proj's output (row stride ldbc, B at
// column col_b, C right after). ssm_update_dt_f32 (and the persistent kernel's scan): thread
// per (b, c, n), D_STATE_PAD lanes per channel, 256 threads per block; grid (ceil(d_inner /
// channels per block), batch). ssm_update_f32 runs the same arithmetic on fewer lanes (below).
// out_lp (may be null): out again in bf16 (lp_mode 0) or fp16 (1) for out_proj.
// dt_proj of one channel c inside the scan update: the D_STATE_PAD lanes n of its group sum
// w[c, r] x[r] for r = n, n + D_STATE_PAD, ... (x rounded to the low precision, as the GEMV
// does), then the group's butterfly: every lane gets the same bits.
__device__ __forceinline__ float dt_proj_group(const float* x, const u16* w, long rank, long c, int n, int lp_mode) {
    float s = 0.0f;
    for (long r = n; r < rank; r += D_STATE_PAD) {
        float xv = lp_to_f32(lp_mode == 0 ? f32_to_bf16(x[r]) : f32_to_f16(x[r]), lp_mode);
        s += lp_to_f32(w[c * rank + r], lp_mode) * xv;
    }
    return decode_group_sum(s);
}

// dt_w (may be null): dt_proj's low-precision weight [d_inner, dt_rank]; then dt's input is
// computed here from x_proj's dt columns (xbc[b, 0..dt_rank]) and `delta` is not read.
// ssm_update_f32_at: the work of block (bx, b) of that grid, run by threads 0..255 of any block.
static __device__ __forceinline__ void ssm_update_f32_at(long bx, long b, const float* xs, const float* delta, const float* a_log, const float* xbc, long ldbc, long col_b,
               const float* dvec, const float* z, long ldz, const float* dt_bias, const int* starts, float* h_state,
               float* out, u16* out_lp, int lp_mode, long batch, long di, long ds, const u16* dt_w, long dt_rank) {
    int tid = threadIdx.x, n = tid % D_STATE_PAD;
    long c = bx * (long)(256 / D_STATE_PAD) + tid / D_STATE_PAD;
    bool cval = c < di, nval = n < ds;
    long cc = cval ? c : di - 1;
    float A2 = nval ? -expf(a_log[cc * ds + n]) * 1.4426950408889634f : 0.0f;
    float* hp = h_state + (b * di + cc) * ds + n;
    float h = (nval && starts[b] != 0) ? *hp : 0.0f;
    float x = xs[b * di + cc];
    float pre = dt_w ? dt_proj_group(xbc + b * ldbc, dt_w, dt_rank, cc, n, lp_mode) : delta[b * di + cc];
    float dt = softplus_f32(pre + dt_bias[cc]);
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

// ssm_update_f32: the same step with SSM_SPL states per lane and SSM_LPC lanes per channel
// (4 lanes of 4 states at D_STATE_PAD 16), so a channel's softplus, x, z and D are read and
// computed by 4 lanes instead of 16 and its states move as 16-byte loads. It keeps the bits of
// ssm_update_f32_at with the same delta by construction (not compared on a device): each state's
// update is the same expression, and y = Σ C h runs decode_group_sum's tree (offsets ≥ SSM_SPL
// across lanes, then the rest inside a lane; a + b == b + a in floating point). Grid
// (ceil(d_inner / (256 / SSM_LPC)), batch), 256 threads.
#define SSM_SPL (D_STATE_PAD < 4 ? D_STATE_PAD : 4)
#define SSM_LPC (D_STATE_PAD / SSM_SPL)
static __device__ __forceinline__ void ssm_update_vec_body(const float* xs, const float* delta, const float* a_log, const float* xbc, long ldbc, long col_b,
               const float* dvec, const float* z, long ldz, const float* dt_bias, const int* starts, float* h_state,
               float* out, u16* out_lp, int lp_mode, long batch, long di, long ds) {
    long b = blockIdx.y;
    int tid = threadIdx.x, lane = tid % SSM_LPC, n0 = lane * SSM_SPL;
    long c = blockIdx.x * (long)(256 / SSM_LPC) + tid / SSM_LPC;
    bool cval = c < di, keep = starts[b] != 0;
    long cc = cval ? c : di - 1;
    float* hp = h_state + (b * di + cc) * ds;
    const float* bc = xbc + b * ldbc + col_b;
    // The 16-byte path: whole lanes of states (ds == D_STATE_PAD, a multiple of 4) on a
    // 16-byte aligned state.
    const bool vec4 = SSM_SPL == 4 && ds == D_STATE_PAD && ((unsigned long long)h_state & 15) == 0;
    float h[SSM_SPL];
    if (vec4) {
        float4 v4 = keep ? *(const float4*)(hp + n0) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const float* f = &v4.x;
#pragma unroll
        for (int i = 0; i < SSM_SPL; ++i) h[i] = f[i];
    } else {
#pragma unroll
        for (int i = 0; i < SSM_SPL; ++i) h[i] = (n0 + i < ds && keep) ? hp[n0 + i] : 0.0f;
    }
    float x = xs[b * di + cc];
    float dt = softplus_f32(delta[b * di + cc] + dt_bias[cc]);
    float v[SSM_SPL];
#pragma unroll
    for (int i = 0; i < SSM_SPL; ++i) {
        int n = n0 + i;
        bool nval = n < ds;
        float A2 = nval ? -expf(a_log[cc * ds + n]) * 1.4426950408889634f : 0.0f;
        float Bn = nval ? bc[n] : 0.0f;
        float Cn = nval ? bc[ds + n] : 0.0f;
        h[i] = exp2f(dt * A2) * h[i] + (dt * x) * Bn;
        v[i] = __fmul_rn(Cn, h[i]);  // never contracted into the sums below, as in the butterfly
    }
#pragma unroll
    for (int o = D_STATE_PAD / 2; o >= SSM_SPL; o >>= 1)
#pragma unroll
        for (int i = 0; i < SSM_SPL; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], o / SSM_SPL);
#pragma unroll
    for (int o = SSM_SPL / 2; o > 0; o >>= 1) {
        float t[SSM_SPL];
#pragma unroll
        for (int i = 0; i < SSM_SPL; ++i) t[i] = __fadd_rn(v[i], v[i ^ o]);
#pragma unroll
        for (int i = 0; i < SSM_SPL; ++i) v[i] = t[i];
    }
    if (!cval) return;
    if (vec4) {
        float4 w4;
        float* f = &w4.x;
#pragma unroll
        for (int i = 0; i < SSM_SPL; ++i) f[i] = h[i];
        *(float4*)(hp + n0) = w4;
    } else {
#pragma unroll
        for (int i = 0; i < SSM_SPL; ++i)
            if (n0 + i < ds) hp[n0 + i] = h[i];
    }
    if (lane == 0) {
        float y = v[0] + dvec[cc] * x;
        float o = z ? y * silu_f32(z[b * ldz + cc]) : y;
        out[b * di + c] = o;
        if (out_lp) out_lp[b * di + c] = lp_mode == 0 ? f32_to_bf16(o) : f32_to_f16(o);
    }
}
extern "C" __global__ void __launch_bounds__(256) ssm_update_f32(const SsmUpdateF32 p) { pdl_wait(); pdl_launch_dependents(); ssm_update_vec_body(SSM_UPDATE_F32_ARGS(p)); }
extern "C" __global__ void __launch_bounds__(256) ssm_update_dt_f32(const SsmUpdateDtF32 p) {
    pdl_wait();
    pdl_launch_dependents();
    ssm_update_f32_at(blockIdx.x, blockIdx.y, SSM_UPDATE_F32_ARGS(p.s), p.dt_w, p.dt_rank);
}

// ---- Sampling on the device: one id per row crosses to the host. ----
#define SAMPLE_INF __int_as_float(0x7f800000)
//
// How one row draws (mirrored by `SampleHow` in gpu/src/ops/decode.rs, 40 bytes).
typedef struct {
    float temperature;  // 0: greedy
    float top_p;        // 1: off
    float penalty;      // repetition penalty, 1: off
    unsigned int top_k; // 0: off
    unsigned int sampleable;
    unsigned int pad;
    u64 seed;
    u64 draw;
} SampleHow;

__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// A float's bits as an unsigned key in the float's order (-inf lowest).
__device__ __forceinline__ unsigned int order_key(float v) {
    unsigned int b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Block reductions of 1024 threads (fixed order: warp butterflies, then warps in order).
__device__ unsigned int sample_block_count(unsigned int v, unsigned int* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    unsigned int r = 0;
    for (int i = 0; i < 32; ++i) r += sh[i];
    return r;
}

// Penalised logit of id i (-inf past `sampleable`).
__device__ __forceinline__ float sample_value(const float* l, const unsigned char* seen, const SampleHow& h, long i) {
    if (i >= (long)h.sampleable) return -SAMPLE_INF;
    float v = l[i];
    if (h.penalty != 1.0f && seen[i]) v = v > 0.0f ? v / h.penalty : v * h.penalty;
    return v;
}

// One block of 1024 threads per row b: mark tokens[b] (the token fed this step) in the row's
// penalty context, then draw from logits[b] as `how[b]` says (the host sampler's order:
// penalty, temperature, top-k, top-p, draw). Top-k keeps every id whose logit ties the k-th
// largest. ids[b] = 0xffffffff when the logits are not finite.
static __device__ __forceinline__ void sample_rows_f32_body(const float* logits, long vocab, const unsigned int* tokens,
                                                            const unsigned char* how_raw, unsigned char* seen, unsigned int* ids) {
    __shared__ float shf[33];
    __shared__ unsigned int shu[33];
    __shared__ long shi[32];
    long b = blockIdx.x;
    int tid = threadIdx.x, nt = blockDim.x;
    const SampleHow h = ((const SampleHow*)how_raw)[b];
    const float* l = logits + b * vocab;
    unsigned char* sn = seen + b * vocab;
    if (tid == 0 && tokens[b] < vocab) sn[tokens[b]] = 1;
    __syncthreads();
    // Greedy part (also the max for the softmax): the largest value, the first id on ties.
    float best = -SAMPLE_INF;
    long bi = -1;
    bool bad = false;
    for (long i = tid; i < vocab; i += nt) {
        float v = sample_value(l, sn, h, i);
        if (v != v) bad = true;
        if (bi < 0 || v > best) { best = v; bi = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        long oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ov > best || (ov == best && oi < bi))) { best = ov; bi = oi; }
    }
    unsigned int nbad = sample_block_count(bad ? 1u : 0u, shu);
    __syncthreads();
    if ((tid & 31) == 0) { shf[tid >> 5] = best; shi[tid >> 5] = bi; }
    __syncthreads();
    best = shf[0]; bi = shi[0];
    for (int w = 1; w < nt / 32; ++w)
        if (shf[w] > best || (shf[w] == best && shi[w] < bi)) { best = shf[w]; bi = shi[w]; }
    if (nbad > 0 || !(best > -SAMPLE_INF && best < SAMPLE_INF)) {
        if (tid == 0) ids[b] = 0xffffffffu;
        return;
    }
    if (h.temperature == 0.0f || h.top_k == 1) {
        if (tid == 0) ids[b] = (unsigned int)bi;
        return;
    }
    // Top-k: the k-th largest key, bit by bit (the largest K with count(key >= K) >= k).
    unsigned int kmin = 0;
    if (h.top_k > 0 && h.top_k < h.sampleable) {
        for (int bit = 31; bit >= 0; --bit) {
            unsigned int cand = kmin | (1u << bit), c = 0;
            for (long i = tid; i < vocab; i += nt) c += order_key(sample_value(l, sn, h, i)) >= cand;
            if (sample_block_count(c, shu) >= h.top_k) kmin = cand;
        }
    }
    float inv_t = 1.0f / h.temperature;
    // Total weight of the top-k candidates.
    float tot = 0.0f;
    for (long i = tid; i < vocab; i += nt) {
        float v = sample_value(l, sn, h, i);
        if (v > -SAMPLE_INF && order_key(v) >= kmin) tot += expf((v - best) * inv_t);
    }
    tot = block_sum(tot, shf);
    // Top-p: the largest key K whose candidates at or above it reach p of the total.
    unsigned int pmin = kmin;
    if (h.top_p < 1.0f) {
        unsigned int k = 0;
        for (int bit = 31; bit >= 0; --bit) {
            unsigned int cand = k | (1u << bit);
            float s = 0.0f;
            for (long i = tid; i < vocab; i += nt) {
                float v = sample_value(l, sn, h, i);
                unsigned int key = order_key(v);
                if (v > -SAMPLE_INF && key >= kmin && key >= cand) s += expf((v - best) * inv_t);
            }
            if (block_sum(s, shf) >= h.top_p * tot) k = cand;
        }
        pmin = max(k, kmin);
    }
    // The draw, in id order over the candidates: each thread sums a contiguous chunk.
    long chunk = (vocab + nt - 1) / nt, lo = tid * chunk, hi = min(vocab, lo + chunk);
    float part = 0.0f;
    long last = -1;
    for (long i = lo; i < hi; ++i) {
        float v = sample_value(l, sn, h, i);
        if (v > -SAMPLE_INF && order_key(v) >= pmin) { part += expf((v - best) * inv_t); last = i; }
    }
    __shared__ float parts[1024];
    __shared__ long lasts[1024];
    parts[tid] = part;
    lasts[tid] = last;
    __syncthreads();
    if (tid == 0) {
        float total = 0.0f;
        for (int t = 0; t < nt; ++t) total += parts[t];
        u64 r = splitmix64(h.seed ^ splitmix64(h.draw));
        float u = (float)((r >> 40) * (1.0 / 16777216.0)) * total;
        long pick = -1, fallback = -1;
        int t = 0;
        for (; t < nt; ++t) {
            if (lasts[t] >= 0) fallback = lasts[t];
            if (parts[t] > 0.0f && u < parts[t]) break;
            u -= parts[t];
        }
        if (t < nt) {
            long tlo = t * chunk, thi = min(vocab, tlo + chunk);
            for (long i = tlo; i < thi; ++i) {
                float v = sample_value(l, sn, h, i);
                if (v > -SAMPLE_INF && order_key(v) >= pmin) {
                    float w = expf((v - best) * inv_t);
                    pick = i;
                    if (u < w) break;
                    u -= w;
                }
            }
        }
        ids[b] = (unsigned int)(pick >= 0 ? pick : (fallback >= 0 ? fallback : bi));
    }
}
extern "C" __global__ void __launch_bounds__(1024) sample_rows_f32(const SampleRowsF32 p) { pdl_wait(); pdl_launch_dependents(); sample_rows_f32_body(SAMPLE_ROWS_F32_ARGS(p)); }

// ---- The decode step's projections: a GEMV over at most GEMV_ROWS rows. ----
#define GEMV_ROWS 8

// x as the GEMM sees it: f32 rounded to the low precision (as cast_lowp_f32 does), or lp.
__device__ __forceinline__ float gemv_x(const u16* x_lp, const float* x_f32, long at, int lp_mode) {
    if (x_lp) return lp_to_f32(x_lp[at], lp_mode);
    float v = x_f32[at];
    return lp_to_f32(lp_mode == 0 ? f32_to_bf16(v) : f32_to_f16(v), lp_mode);
}
__device__ __forceinline__ void unpack8(uint4 v, int lp_mode, float* f) {
    unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[2 * j] = lp_to_f32((u16)(u[j] & 0xffffu), lp_mode);
        f[2 * j + 1] = lp_to_f32((u16)(u[j] >> 16), lp_mode);
    }
}

// Eight x values of a row from `at` as the GEMM sees them (see gemv_x).
__device__ __forceinline__ void gemv_x8(const u16* x_lp, const float* x_f32, long at, int lp_mode, float* xf) {
    if (x_lp) {
        unpack8(*(const uint4*)(x_lp + at), lp_mode, xf);
    } else {
        float4 a = *(const float4*)(x_f32 + at);
        float4 b = *(const float4*)(x_f32 + at + 4);
        float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) xf[j] = lp_to_f32(lp_mode == 0 ? f32_to_bf16(v[j]) : f32_to_f16(v[j]), lp_mode);
    }
}
// The weights of a GEMV: low precision (Q8 false: `w`, 8 values in 16 bytes) or int8 rows
// (Q8 true: `wq`, 16 values in 16 bytes, one f32 scale per row in `ws`: the row's sum is
// multiplied by its scale once, after every product is added). A vector load is 16 bytes:
// GemvVals<Q8>::n values.
template <bool Q8>
struct GemvVals {
    static constexpr int n = Q8 ? 16 : 8;
};
template <bool Q8>
__device__ __forceinline__ const unsigned char* gemv_wrow(const u16* w, const signed char* wq, long n, long ldw) {
    return Q8 ? (const unsigned char*)(wq + n * ldw) : (const unsigned char*)(w + n * ldw);
}
template <bool Q8>
__device__ __forceinline__ uint4 gemv_wload(const unsigned char* row, long k0) {
    return *(const uint4*)(row + (Q8 ? k0 : 2 * k0));
}
template <bool Q8>
__device__ __forceinline__ uint4 gemv_wstream(const unsigned char* row, long k0) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(row + (Q8 ? k0 : 2 * k0)));
    return v;
}
// Byte j of `biased` (an int8 code b stored as u = b ^ 0x80 = b + 128) as f32, exactly and
// without I2F (16 a clock per SM on sm_90): the word 0x4B0000uu is the float 2^23 + u, and
// (2^23 + u) - (2^23 + 128) = b. A byte permute and an add: the same f32 as the conversion.
__device__ __forceinline__ float i8_biased_to_f32(unsigned biased, int j) {
    return __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7650u + (unsigned)j)) - 8388736.0f;
}
// Sixteen int8 values (four words, byte 0 first) as f32 (exact).
__device__ __forceinline__ void unpack16_i8(uint4 v, float* f) {
    const unsigned u[4] = {v.x ^ 0x80808080u, v.y ^ 0x80808080u, v.z ^ 0x80808080u, v.w ^ 0x80808080u};
#pragma unroll
    for (int w = 0; w < 4; ++w)
#pragma unroll
        for (int j = 0; j < 4; ++j) f[4 * w + j] = i8_biased_to_f32(u[w], j);
}
// GemvVals<Q8>::n weights of one 16-byte load as f32.
template <bool Q8>
__device__ __forceinline__ void gemv_wunpack(uint4 v, int lp_mode, float* f) {
    if (Q8)
        unpack16_i8(v, f);
    else
        unpack8(v, lp_mode, f);
}
template <bool Q8>
__device__ __forceinline__ float gemv_wone(const unsigned char* row, long kk, int lp_mode) {
    return Q8 ? (float)((const signed char*)row)[kk] : lp_to_f32(((const u16*)row)[kk], lp_mode);
}
// A finished sum of output n: times the row's scale for int8 weights, else as it is.
template <bool Q8>
__device__ __forceinline__ float gemv_scaled(float v, const float* ws, long n) {
    return Q8 ? v * ws[n] : v;
}

// y[r, n] = sum_k w[n, k] x[r, k] for r < rows (<= GEMV_ROWS), n < n_out: each weight is read
// once for every row. w: low precision [n_out, ldw], or int8 (wq, with row scales ws, when wq
// is not null); x: low precision (x_lp) or f32 (x_f32, rounded to the low precision first),
// [rows, ldx]; y f32 [rows, ldy]. 256 threads: `split` warps (1, 2, 4 or 8) share one output,
// 8 / split outputs per block. vec: every row of w and x starts 16-byte aligned and k is a
// multiple of the values a load carries (8; int8 16): lane l of part q sums k from (q·32 + l)
// times those values, a load at a time, step split·32 loads. The sum of each (r, n) has one
// order whatever `rows` is, so a row gets the same bits at any batch (at one split).
template <bool Q8>
static __device__ __forceinline__ void gemv_lp_body_t(const u16* w, long ldw, const signed char* wq, const float* ws,
                                                      const u16* x_lp, const float* x_f32, long ldx, float* y, long ldy,
                                                      long n_out, long k, long rows, int split, int vec, int lp_mode) {
    __shared__ float sh[8][GEMV_ROWS];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    long n = blockIdx.x * (long)(8 / split) + warp / split;
    int part = warp % split;
    float acc[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) acc[r] = 0.0f;
    if (n < n_out) {
        const unsigned char* wr = gemv_wrow<Q8>(w, wq, n, ldw);
        if (vec) {
            constexpr int V = GemvVals<Q8>::n;
            long step = (long)split * 32 * V;
#pragma unroll 2
            for (long k0 = ((long)part * 32 + lane) * V; k0 < k; k0 += step) {
                float wf[V], xf[V];
                gemv_wunpack<Q8>(gemv_wload<Q8>(wr, k0), lp_mode, wf);
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; ++r) {
                    if (r < rows) {
#pragma unroll
                        for (int h = 0; h < V; h += 8) gemv_x8(x_lp, x_f32, r * ldx + k0 + h, lp_mode, xf + h);
#pragma unroll
                        for (int j = 0; j < V; ++j) acc[r] += wf[j] * xf[j];
                    }
                }
            }
        } else {
            for (long kk = (long)part * 32 + lane; kk < k; kk += (long)split * 32) {
                float wv = gemv_wone<Q8>(wr, kk, lp_mode);
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; ++r)
                    if (r < rows) acc[r] += wv * gemv_x(x_lp, x_f32, r * ldx + kk, lp_mode);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        float v = warp_sum(acc[r]);
        if (lane == 0) sh[warp][r] = v;
    }
    __syncthreads();
    if (part == 0 && lane < rows && n < n_out) {
        float s = 0.0f;
        for (int q = 0; q < split; ++q) s += sh[warp + q][lane];
        y[lane * ldy + n] = gemv_scaled<Q8>(s, ws, n);
    }
}
// One kernel per weight format (a run-time choice inside one kernel would cost the bf16 / fp16
// kernels registers for the int8 path).
extern "C" __global__ void __launch_bounds__(256) gemv_lp(const GemvLp p) { pdl_wait(); pdl_launch_dependents(); gemv_lp_body_t<false>(GEMV_LP_ARGS(p)); }
extern "C" __global__ void __launch_bounds__(256) gemv_lp_q8(const GemvLp p) { pdl_wait(); pdl_launch_dependents(); gemv_lp_body_t<true>(GEMV_LP_ARGS(p)); }

// gemv_lp with NL weight loads issued per lane before any is used (streaming, L1 bypassed; the
// first NL before pdl_wait), 128 threads (4 / split outputs per block), and no block barrier
// when split == 1. Each lane visits the same k in the same order as gemv_lp: the same bits.
// The conv update of row r, channel n on x value v, where the GEMV's output n is a channel.
__device__ __forceinline__ void conv_epilogue(const ConvUpdateF32* cu, long r, long n, float v) {
    if (cu && n < cu->d_inner)
        conv_update_elem(r * cu->d_inner + n, v, cu->conv.w, cu->conv.bias, cu->conv.starts, cu->window, cu->xs,
                         cu->xs_lp, cu->lp_mode, cu->d_inner);
}
// cu (may be null): in_proj's conv update as the epilogue: output n < cu->d_inner of row r is
// channel n's x, so that thread also runs the conv update of (r, n) on the value it writes.
template <int NL, bool Q8>
static __device__ __forceinline__ void gemv_lp_nl_body_t(const u16* w, long ldw, const signed char* wq,
                                                         const float* ws, const u16* x_lp, const float* x_f32, long ldx,
                                                         float* y, long ldy, long n_out, long k, long rows, int split,
                                                         int vec, int lp_mode, const ConvUpdateF32* cu) {
    __shared__ float sh[4][GEMV_ROWS];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    long n = blockIdx.x * (long)(4 / split) + warp / split;
    int part = warp % split;
    bool live = n < n_out;
    const unsigned char* wr = gemv_wrow<Q8>(w, wq, live ? n : 0, ldw);
    constexpr int V = GemvVals<Q8>::n;
    long step = (long)split * 32 * V;
    long k0 = ((long)part * 32 + lane) * V;
    // The first NL weight loads go out before waiting for the kernel before (weights are
    // never written while decoding).
    uint4 wv[NL];
#pragma unroll
    for (int j = 0; j < NL; ++j)
        if (live && k0 + j * step < k) wv[j] = gemv_wstream<Q8>(wr, k0 + j * step);
    pdl_wait();
    pdl_launch_dependents();
    float acc[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) acc[r] = 0.0f;
    if (live) {
        for (;;) {
#pragma unroll
            for (int j = 0; j < NL; ++j) {
                long kj = k0 + j * step;
                if (kj < k) {
                    float wf[V], xf[V];
                    gemv_wunpack<Q8>(wv[j], lp_mode, wf);
#pragma unroll
                    for (int r = 0; r < GEMV_ROWS; ++r) {
                        if (r < rows) {
#pragma unroll
                            for (int h = 0; h < V; h += 8) gemv_x8(x_lp, x_f32, r * ldx + kj + h, lp_mode, xf + h);
#pragma unroll
                            for (int q = 0; q < V; ++q) acc[r] += wf[q] * xf[q];
                        }
                    }
                }
            }
            k0 += NL * step;
            if (k0 >= k) break;
#pragma unroll
            for (int j = 0; j < NL; ++j)
                if (k0 + j * step < k) wv[j] = gemv_wstream<Q8>(wr, k0 + j * step);
        }
    }
    if (split == 1) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            if (r < rows) {
                float v = warp_sum(acc[r]);
                if (lane == 0 && live) {
                    v = gemv_scaled<Q8>(v, ws, n);
                    y[r * ldy + n] = v;
                    conv_epilogue(cu, r, n, v);
                }
            }
        }
        return;
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        if (r < rows) {
            float v = warp_sum(acc[r]);
            if (lane == 0) sh[warp][r] = v;
        }
    }
    __syncthreads();
    if (part == 0 && lane < rows && live) {
        float s = 0.0f;
        for (int q = 0; q < split; ++q) s += sh[warp + q][lane];
        s = gemv_scaled<Q8>(s, ws, n);
        y[lane * ldy + n] = s;
        conv_epilogue(cu, lane, n, s);
    }
}
extern "C" __global__ void __launch_bounds__(128) gemv_lp_nl4(const GemvLp p) { gemv_lp_nl_body_t<4, false>(GEMV_LP_ARGS(p), 0); }
extern "C" __global__ void __launch_bounds__(128) gemv_lp_nl8(const GemvLp p) { gemv_lp_nl_body_t<8, false>(GEMV_LP_ARGS(p), 0); }
extern "C" __global__ void __launch_bounds__(128) gemv_lp_conv(const GemvConvLp p) {
    gemv_lp_nl_body_t<4, false>(GEMV_LP_ARGS(p.g), &p.c);
}
extern "C" __global__ void __launch_bounds__(128) gemv_lp_nl4_q8(const GemvLp p) { gemv_lp_nl_body_t<4, true>(GEMV_LP_ARGS(p), 0); }
extern "C" __global__ void __launch_bounds__(128) gemv_lp_nl8_q8(const GemvLp p) { gemv_lp_nl_body_t<8, true>(GEMV_LP_ARGS(p), 0); }
// Four int8 loads in flight as for bf16: eight measured slower (H100, 1.4B in_proj at one
// row, `gpu-bench gemv`: 15.3 µs against 19.5 with 8-byte loads, 14.7 against 17.5 with 16).
extern "C" __global__ void __launch_bounds__(128) gemv_lp_conv_q8(const GemvConvLp p) {
    gemv_lp_nl_body_t<4, true>(GEMV_LP_ARGS(p.g), &p.c);
}
