// The selective scan of Mamba-1 with dt bias + softplus, the D skip and the z gate fused in
// (twin of reference/src/ops/selective_scan.rs).
//
// Layout (backward; the forward splits each channel over two threads, see below): one thread per (batch b, channel c) holds all D_STATE_PAD (a power of two ≥ d_state,
// ≤ 32) states of its channel in registers and walks time. Block: SCAN_THREADS channels of one
// batch row; grid (ceil(d_inner / SCAN_THREADS), batch). The block stages the B/C rows (and
// the document-reset flags) of a tile of positions in shared memory once; every thread reads
// them as broadcasts. Loads of u / delta / z / dout and stores of the outputs are coalesced
// across channels. Per-channel scalars (softplus, SiLU) are computed once per (t, c).
//
// The forward stores the state at the start of every CHUNK positions (`chunk_states`,
// [batch, n_chunks, d_state, d_inner]); the backward walks the chunks in reverse: a first
// pass over a chunk writes the state at the start of every window of SUB positions to shared
// memory, then the windows run in reverse, each recomputing its SUB states into registers and
// running the reverse recurrence. No [batch, seq_len, d_inner, d_state] tensor ever exists.
//
// B and C are read from x_proj's output `xbc` (row stride ldbc, B at column col_b, C right
// after it); z from in_proj's output (row stride ldz).
//
// Determinism: dB / dC (sums over channels) are reduce-scattered inside a warp (fixed
// butterfly), then summed over the block's warps in index order into per-block partials that
// scan_reduce_bc_f32 sums over blocks in order. No atomics.

#define NG D_STATE_PAD
#define SCAN_THREADS 128
#define SCAN_WARPS (SCAN_THREADS / 32)
#define FULL_MASK 0xffffffffu
// Forward tile (positions staged in shared memory at a time); divides CHUNK.
#define FT 16
#define NW (CHUNK / SUB)
#define CKS (CHUNK - SUB > 0 ? CHUNK - SUB : 1)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// 2^x (MUFU); x ≤ 0 here, results below 2^-126 flush to 0, and 2^-inf = 0.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

#define SCAN_INF __int_as_float(0x7f800000)

// A · log2(e) of state n (a_log row at `row`): exp(dt · A) = exp2(dt · A2). The scan forward
// and backward (not the backward's segment map, nor the decode kernels) fold a reset (document
// start) into the decay by using dt = +inf there: exp2(+inf · A2) = 0,
// so h = 0 · h + dt x B needs no select. That needs A2 < 0 strictly: it is kept at or below
// −FLT_MIN (A = −exp(a_log) only reaches −0 when a_log < −87, where exp2(dt · A2) is 1 either
// way), and padded states (n ≥ ds, whose B and C are 0) get −1. NaN stays NaN.
__device__ __forceinline__ float scan_a2(const float* __restrict__ a_log, long row, int n, long ds) {
    if (n >= ds) return -1.0f;
    float a2 = -expf(a_log[row + n]) * LOG2E;
    return a2 > -1.17549435e-38f ? -1.17549435e-38f : a2;
}

// Reduce-scatter over the 32 lanes of a warp (recursive halving, fixed order) of V values
// (V a power of two). Afterwards lane l holds in v[0 .. max(V / 32, 1)) the warp sums of the
// values with indices rs_base(l) + i.
//
// Lane-permuted slots: the backward's V = 2 NG values are ordered index = 2 n + (0 for dB, 1 for
// dC), and lane l keeps state n in register slot n ^ state_perm(l) (every per-state array of
// the thread, so the arithmetic is the same per slot). At level LVL the halving splits index
// bit log2(half), state bit log2(half) − 1, between lanes l and l ^ (16 >> LVL). Where
// state_perm flips that state bit on the lanes whose bit (16 >> LVL) is set, "keep the upper
// half" of those lanes is "keep slots [0, half)" of every lane: no select. state_perm only
// flips state bits ≥ 2, so each aligned group of four states stays together and in order
// (the B / C rows are still read as float4). At NG = 16 that removes 48 of the 62 selects per
// position. The sums, their order and the final layout (rs_base) are those of the plain halving.
__host__ __device__ constexpr int ilog2c(int x) { return x <= 1 ? 0 : 1 + ilog2c(x / 2); }
__host__ __device__ constexpr bool rs_permuted(int V, int LVL) {
    return (V >> LVL) > 1 && ilog2c((V >> LVL) / 2) - 1 >= 2;
}
template <int V, int LVL>
struct RsLevel {
    static __device__ __forceinline__ void run(float (&v)[V], int lane) {
        const int o = 16 >> LVL;
        const int cnt = V >> LVL;
        if (cnt > 1) {
            const int half = cnt > 1 ? cnt / 2 : 1;
            bool upper = (lane & o) != 0;
#pragma unroll
            for (int i = 0; i < half; ++i) {
                if (rs_permuted(V, LVL)) {
                    v[i] += __shfl_xor_sync(FULL_MASK, v[i + half], o);
                } else {
                    float send = upper ? v[i] : v[i + half];
                    float keep = upper ? v[i + half] : v[i];
                    v[i] = keep + __shfl_xor_sync(FULL_MASK, send, o);
                }
            }
        } else {
            v[0] += __shfl_xor_sync(FULL_MASK, v[0], o);
        }
        RsLevel<V, LVL + 1>::run(v, lane);
    }
};
template <int V>
struct RsLevel<V, 5> {
    static __device__ __forceinline__ void run(float (&)[V], int) {}
};
template <int V>
__device__ __forceinline__ void warp_reduce_scatter(float (&v)[V], int lane) {
    RsLevel<V, 0>::run(v, lane);
}
template <int V>
__device__ __forceinline__ int rs_base(int lane) {
    return V >= 32 ? lane * (V / 32) : lane / (32 / V);
}
// The state slot permutation of lane `lane` for NGv states (see above): state n is in slot
// n ^ state_perm<NGv>(lane).
template <int NGv>
__device__ __forceinline__ int state_perm(int lane) {
    int p = 0;
#pragma unroll
    for (int lvl = 0; lvl < 5; ++lvl)
        if (rs_permuted(2 * NGv, lvl) && ((lane >> (4 - lvl)) & 1)) p |= 1 << (ilog2c(((2 * NGv) >> lvl) / 2) - 1);
    return p;
}

// Forward layout: two threads per (batch b, channel c), lanes 2k and 2k + 1 of a warp; each
// holds half (FHG) of the FNP states of its channel in registers (FNP: D_STATE_PAD, at least 2).
// y = C · h takes one __shfl_xor with the partner. The per-position channel scalars (softplus,
// SiLU) are split too: the thread of half `hf` owns the positions of parity hf (loads their
// inputs, computes their scalars, writes their outputs) and the pair swaps dt and dt · x with
// __shfl_xor. Block: FWD_CH channels (FWD_THREADS = 2 FWD_CH threads); the grid is the same as
// the backward's. (The same split in the backward was slower on the H200: 3.65 ms against
// 3.58 ms at chunk 32.)
#define FNP (NG > 1 ? NG : 2)
#define FHG (FNP / 2)
#define FWD_CH SCAN_THREADS
#define FWD_THREADS (2 * FWD_CH)

__device__ __forceinline__ float pair_xchg(float v) { return __shfl_xor_sync(FULL_MASK, v, 1); }

// B / C rows of positions [t0, t0 + NT) of batch row b into registers (this thread's share
// of the NT × 2 FNP tile; padding and positions past the end read as 0).
template <int NT>
struct FwdBcTile {
    static const int PER = (NT * 2 * FNP + FWD_THREADS - 1) / FWD_THREADS;
    float v[PER];
    int r;
    // Positions at or past `tend` (the end of the block's segment) read as 0; L is the row
    // length (the stride of xbc and starts).
    __device__ __forceinline__ void load(const float* __restrict__ xbc, long ldbc, long col_b,
                                         const int* __restrict__ starts, long b, long t0, long L, long tend,
                                         long ds, int tid) {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            int idx = tid + i * FWD_THREADS;
            int j = idx / (2 * FNP), k = idx % (2 * FNP);
            int n = k % FNP;
            long t = t0 + j;
            float x = 0.0f;
            if (idx < NT * 2 * FNP && t < tend && n < ds) x = xbc[(b * L + t) * ldbc + col_b + (k >= FNP ? ds : 0) + n];
            v[i] = x;
        }
        long t = t0 + tid;
        r = (tid < NT && t < tend) ? (starts[b * L + t] == t) : 0;
    }
    __device__ __forceinline__ void store(float* sbc, int* sr, int tid) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            int idx = tid + i * FWD_THREADS;
            if (idx < NT * 2 * FNP) sbc[idx] = v[i];
        }
        if (tid < NT) sr[tid] = r;
    }
};

// B and C of chunk-relative position j, this thread's state i (state hf · FHG + i).
#define FSB(j, i) sbc[(j) * 2 * FNP + hf * FHG + (i)]
#define FSC(j, i) sbc[(j) * 2 * FNP + FNP + hf * FHG + (i)]

// Segments (blockIdx.z = s, positions [s · seg_len, (s + 1) · seg_len) ∩ [0, L)): at batch 1 a
// layer has only d_inner / FWD_CH blocks (12 at 130M), so the positions are cut into segments
// that run side by side. The state recurrence is linear per state n, h_t = a_t · h_{t-1} + b_t
// (a_t = 0 at a reset), so a segment maps its start state to its end state as h_end = P ⊙
// h_start + q, P = Π a_t, q = the end state from h_start = 0. TRANSFORM = true is that first
// pass (segments 0 .. n_seg − 2 write P and q to seg_p / seg_q `[n_seg − 1, batch, d_inner,
// d_state]`, no outputs); the main pass then starts segment s from h0 folded through the
// transforms of segments 0 .. s − 1, in order. With one segment (seg_len ≥ L) the main pass is
// the sequential scan, bit for bit.
template <bool TRANSFORM>
static __device__ __forceinline__ void selective_scan_fwd_f32_body(const float* __restrict__ u, const float* __restrict__ delta,
                       const float* __restrict__ a_log, const float* __restrict__ xbc, long ldbc, long col_b,
                       const float* __restrict__ dvec, const float* __restrict__ z, long ldz,
                       const float* __restrict__ dt_bias, const int* __restrict__ starts,
                       const float* __restrict__ h0, float* __restrict__ out, float* __restrict__ chunk_states,
                       float* __restrict__ last, long batch, long L, long di, long ds,
                       u16* __restrict__ out_lp, int lp_mode, long seg_len, float* __restrict__ seg_p,
                       float* __restrict__ seg_q, int /* seg_pass: TRANSFORM */) {
    __shared__ __align__(16) float sbc[FT * 2 * FNP];
    __shared__ int sr[FT];
    int tid = threadIdx.x, hf = tid & 1;
    long c = blockIdx.x * (long)FWD_CH + (tid >> 1);
    long b = blockIdx.y;
    bool cval = c < di;
    long cc = cval ? c : di - 1;
    long sl = seg_len > 0 && seg_len < L ? seg_len : L;
    long seg = blockIdx.z, n_seg = sl > 0 ? (L + sl - 1) / sl : 1;
    long tbeg = seg * sl, tend = tbeg + sl < L ? tbeg + sl : L;
    float A2[FHG], h[FHG], P[FHG];
#pragma unroll
    for (int i = 0; i < FHG; ++i) {
        int n = hf * FHG + i;
        // A · log2(e): exp(dt · A) = exp2(dt · A2), one MUFU instruction. Kept below −FLT_MIN
        // (−1 for padding) so that dt = +inf gives exp2 = 0 at a reset (below).
        A2[i] = scan_a2(a_log, cc * ds, n, ds);
        h[i] = (!TRANSFORM && h0 && n < ds) ? h0[(b * di + cc) * ds + n] : 0.0f;
        P[i] = 1.0f;
        if (!TRANSFORM && n < ds) {
            // The start state of this segment: h0 through the earlier segments' maps (unrolled
            // so that the maps' loads are in flight together; the chain of FMAs is in order).
#pragma unroll 8
            for (long k = 0; k < seg; ++k) {
                long at = ((k * batch + b) * di + cc) * ds + n;
                h[i] = seg_p[at] * h[i] + seg_q[at];
            }
        }
    }
    float Dc = dvec[cc], bias = dt_bias[cc];
    long nchunks = (L + CHUNK - 1) / CHUNK;
    // Register prefetch of the next tile: u, delta, z of this thread's positions (parity hf)
    // and the B/C share.
    const int FH = FT / 2;
    float pu[FH], pd[FH], pz[FH];
    FwdBcTile<FT> pbc;
    // Offsets step by two positions from one load to the next (64-bit adds, no multiplies).
    const bool zl = z && !TRANSFORM;
    auto load = [&](long t0) {
        long row0 = b * L + t0 + hf;
        long o = row0 * di + c, oz = row0 * ldz + c;
#pragma unroll
        for (int m = 0; m < FH; ++m) {
            bool tv = t0 + 2 * m + hf < tend && cval;
            pu[m] = tv ? u[o] : 0.0f;
            pd[m] = tv ? delta[o] : 0.0f;
            pz[m] = (tv && zl) ? z[oz] : 0.0f;
            o += 2 * di;
            oz += 2 * ldz;
        }
        pbc.load(xbc, ldbc, col_b, starts, b, t0, L, tend, ds, tid);
    };
    load(tbeg);
    for (long t0 = tbeg; t0 < tend; t0 += FT) {
        float cu[FH], cd[FH], cz[FH];
#pragma unroll
        for (int m = 0; m < FH; ++m) {
            cu[m] = pu[m];
            cd[m] = pd[m];
            cz[m] = pz[m];
        }
        __syncthreads();
        pbc.store(sbc, sr, tid);
        __syncthreads();
        if (t0 + FT < tend) load(t0 + FT);
        // Output offset of this thread's position t0 + 2 m + hf (two positions per step).
        long oo = (b * L + t0 + hf) * di + c;
        if (!TRANSFORM && chunk_states && (t0 % CHUNK) == 0 && cval) {
#pragma unroll
            for (int i = 0; i < FHG; ++i) {
                int n = hf * FHG + i;
                if (n < ds) chunk_states[((b * nchunks + t0 / CHUNK) * ds + n) * di + c] = h[i];
            }
        }
#pragma unroll
        for (int m = 0; m < FH; ++m) {
            // This thread's position 2m + hf: its dt and dt · x; the partner's by exchange.
            // Past the end (t >= L) and for padding channels: x = dt = 0 leave h unchanged.
            long to = t0 + 2 * m + hf;
            bool tvo = to < tend && cval;
            float dto = tvo ? softplus_f32(cd[m] + bias) : 0.0f;
            float dtxo = dto * cu[m];
            float dtp = pair_xchg(dto), dtxp = pair_xchg(dtxo);
            float dtj[2], dtxj[2], yp[2];
            dtj[0] = hf ? dtp : dto;
            dtj[1] = hf ? dto : dtp;
            dtxj[0] = hf ? dtxp : dtxo;
            dtxj[1] = hf ? dtxo : dtxp;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int j = 2 * m + e;
                // A reset (document start) is a decay of 0: h = 0 · h + dt x B, P · 0 = 0.
                float dtr = sr[j] ? SCAN_INF : dtj[e];
                float y = 0.0f;
#pragma unroll
                for (int i = 0; i < FHG; ++i) {
                    float a = ex2(dtr * A2[i]);
                    h[i] = a * h[i] + dtxj[e] * FSB(j, i);
                    if (TRANSFORM) {
                        P[i] *= a;
                    } else {
                        y += FSC(j, i) * h[i];
                    }
                }
                yp[e] = y;
            }
            if (TRANSFORM) continue;
            // y of this thread's position: own half + the partner's half.
            float y = (hf ? yp[1] : yp[0]) + pair_xchg(hf ? yp[0] : yp[1]);
            if (tvo) {
                y += Dc * cu[m];
                float g = z ? y * silu_f32(cz[m]) : y;
                if (out) out[oo] = g;
                if (out_lp) out_lp[oo] = lp_mode == 0 ? f32_to_bf16(g) : f32_to_f16(g);
            }
            oo += 2 * di;
        }
    }
    if (TRANSFORM && cval) {
#pragma unroll
        for (int i = 0; i < FHG; ++i) {
            int n = hf * FHG + i;
            long at = ((seg * batch + b) * di + c) * ds + n;
            if (n < ds) {
                seg_p[at] = P[i];
                seg_q[at] = h[i];
            }
        }
    }
    if (!TRANSFORM && last && cval && seg == n_seg - 1) {
#pragma unroll
        for (int i = 0; i < FHG; ++i) {
            int n = hf * FHG + i;
            if (n < ds) last[(b * di + c) * ds + n] = h[i];
        }
    }
}
extern "C" __global__ void __launch_bounds__(FWD_THREADS, 2) selective_scan_fwd_f32(const SelectiveScanFwdF32 p) {
    if (p.seg_pass)
        selective_scan_fwd_f32_body<true>(SELECTIVE_SCAN_FWD_F32_ARGS(p));
    else
        selective_scan_fwd_f32_body<false>(SELECTIVE_SCAN_FWD_F32_ARGS(p));
}

// B and C of chunk-relative position j, state n, from the staged chunk rows.
// (pm only flips state bits ≥ 2: written so the compiler sees four consecutive floats per
// aligned group and loads them as one float4.)
#define SB(j, n) sbc[(j) * 2 * NG + (((n) & ~3) ^ pm) + ((n) & 3)]
#define SC(j, n) sbc[(j) * 2 * NG + NG + (((n) & ~3) ^ pm) + ((n) & 3)]

// Backward. Writes du, ddelta ([B, L, di]), dz (row stride ldz_out) and per-block partial sums:
// part_bc[blk, b * L + t, 0..2 ds] (dB then dC, summed over the block's channels),
// part_a[b, c, n], part_d[b, c], part_db[b, c] (summed over positions), dh0[b, c, n].
// dh_last[b, c, n] (may be null) is the gradient of the final state, the adjoint's start.
//
// Dynamic shared memory (floats): sbc CHUNK · 2 NG, sr CHUNK (ints), ck NW · NG · SCAN_THREADS
// (window-start states), red CHUNK · SCAN_WARPS · 2 NG (warp sums of dB / dC, index 2 n + 0 / 1),
// dts CHUNK · SCAN_THREADS (each thread's dt of the chunk's positions, computed once by the chunk
// pass: softplus is the costliest per-position scalar).
//
// Per-state registers are in lane-permuted slots (slot n holds state n ^ pm, see RsLevel). A
// reset (a document start) is folded into the decay: at a reset position the exponent uses
// dt = +inf, so exp(dt · A) = 0 (A < 0: padded states get A = −1, and A is kept below −FLT_MIN)
// and the recurrences need no select: h = 0 · h + dt x B, dh · 0 = 0, and the decay's gradient
// dh · h_prev · 0 = 0.
template <bool SHARE>
__device__ __forceinline__ void
selective_scan_bwd_body(const float* __restrict__ u, const float* __restrict__ delta,
                        const float* __restrict__ a_log, const float* __restrict__ xbc, long ldbc, long col_b,
                        const float* __restrict__ dvec, const float* __restrict__ z, long ldz,
                        const float* __restrict__ dt_bias, const int* __restrict__ starts,
                        const float* __restrict__ chunk_states, const float* __restrict__ dout,
                        float* __restrict__ du_out, float* __restrict__ ddelta_out, float* __restrict__ dz_out,
                        long ldz_out, float* __restrict__ part_bc, float* __restrict__ part_a,
                        float* __restrict__ part_d, float* __restrict__ part_db,
                        const float* __restrict__ dh_last, float* __restrict__ dh0,
                        long batch, long L, long di, long ds, u16* __restrict__ gated_lp,
                        u16* __restrict__ ddelta_lp, u16* __restrict__ dz_lp, int lp_mode,
                        long seg_len, const float* __restrict__ seg_p, const float* __restrict__ seg_q) {
    extern __shared__ __align__(16) float smem[];
    float* sbc = smem;
    int* sr = reinterpret_cast<int*>(smem + CHUNK * 2 * NG);
    float* ck = smem + CHUNK * 2 * NG + CHUNK;
    float* red = ck + NW * NG * SCAN_THREADS;
    float* dts = red + CHUNK * SCAN_WARPS * 2 * NG;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int pm = state_perm<NG>(lane) & ~3;
    long c = blockIdx.x * (long)SCAN_THREADS + tid;
    long b = blockIdx.y;
    bool cval = c < di;
    long cc = cval ? c : di - 1;
    // This block's segment of positions (see selective_scan_bwd_map_f32).
    long sl = seg_len > 0 && seg_len < L ? seg_len : L;
    long seg = blockIdx.z, n_seg = sl > 0 ? (L + sl - 1) / sl : 1;
    long tbeg = seg * sl, tend = tbeg + sl < L ? tbeg + sl : L;
    float A2[NG], dh[NG], dA[NG];
#pragma unroll
    for (int n = 0; n < NG; ++n) {
        const int sn = n ^ pm;
        A2[n] = scan_a2(a_log, cc * ds, sn, ds);
        // The final state's gradient (later windows of the row) enters after the last position,
        // then passes the later segments' maps, last to first.
        dh[n] = (dh_last && cval && sn < ds) ? dh_last[(b * di + c) * ds + sn] : 0.0f;
        if (cval && sn < ds) {
#pragma unroll 8
            for (long k = n_seg - 1; k > seg; --k) {
                long at = (((k - 1) * batch + b) * di + c) * ds + sn;
                dh[n] = seg_p[at] * dh[n] + seg_q[at];
            }
        }
        dA[n] = 0.0f;
    }
    float Dc = dvec[cc], bias = dt_bias[cc];
    float dD = 0.0f, ddb = 0.0f;
    long nchunks = (L + CHUNK - 1) / CHUNK;
    long gw_last = tend > tbeg ? (tend - 1) / SUB : -1;
    long gw_first = tbeg / SUB;
    // Prefetched inputs of the next window (the SUB positions before the current one).
    float nu[SUB], nv[SUB], ng[SUB], nz[SUB];
    // (Offsets step from one position to the next by 64-bit adds, no multiplies.)
    auto load_win = [&](long t0) {
        long o = (b * L + t0) * di + c, oz = (b * L + t0) * ldz + c;
#pragma unroll
        for (int j = 0; j < SUB; ++j) {
            bool tv = t0 + j < L && cval;
            nu[j] = tv ? u[o] : 0.0f;
            nv[j] = tv ? delta[o] : 0.0f;
            ng[j] = tv ? dout[o] : 0.0f;
            nz[j] = (tv && z) ? z[oz] : 0.0f;
            o += di;
            oz += ldz;
        }
    };
    if (gw_last >= gw_first) load_win(gw_last * SUB);
    for (long gw = gw_last; gw >= gw_first; --gw) {
        long k = gw / NW;
        int w = (int)(gw % NW);
        long tc0 = k * CHUNK;
        if (gw == gw_last || w == NW - 1) {
            // Chunk setup: stage B / C rows and reset flags, then the window-start states.
            __syncthreads();
            for (int idx = tid; idx < CHUNK * 2 * NG; idx += SCAN_THREADS) {
                int j = idx / (2 * NG), kk = idx % (2 * NG);
                int n = kk % NG;
                long t = tc0 + j;
                sbc[idx] = (t < L && n < ds) ? xbc[(b * L + t) * ldbc + col_b + (kk >= NG ? ds : 0) + n] : 0.0f;
            }
            for (int j = tid; j < CHUNK; j += SCAN_THREADS) {
                long t = tc0 + j;
                sr[j] = t < L ? (starts[b * L + t] == t) : 0;
            }
            float cu[CKS], cdl[CHUNK];
            long o = (b * L + tc0) * di + c;
#pragma unroll
            for (int j = 0; j < CHUNK; ++j) {
                bool tv = tc0 + j < L && cval;
                if (j < CKS) cu[j] = tv && j < CHUNK - SUB ? u[o] : 0.0f;
                cdl[j] = tv ? delta[o] : 0.0f;
                o += di;
            }
            float h[NG];
#pragma unroll
            for (int n = 0; n < NG; ++n)
                h[n] = (cval && (n ^ pm) < ds) ? chunk_states[((b * nchunks + k) * ds + (n ^ pm)) * di + c] : 0.0f;
            __syncthreads();
#pragma unroll
            for (int ww = 0; ww < NW; ++ww) {
#pragma unroll
                for (int n = 0; n < NG; ++n) ck[(ww * NG + n) * SCAN_THREADS + tid] = h[n];
#pragma unroll
                for (int jj = 0; jj < SUB; ++jj) {
                    const int j = ww * SUB + jj;
                    long t = tc0 + j;
                    float dt = (t < L && cval) ? softplus_f32(cdl[j] + bias) : 0.0f;
                    dts[j * SCAN_THREADS + tid] = dt;
                    if (ww == NW - 1) continue;
                    float dtx = dt * cu[j];
                    float dtr = sr[j] ? SCAN_INF : dt;
#pragma unroll
                    for (int n = 0; n < NG; ++n) h[n] = ex2(dtr * A2[n]) * h[n] + dtx * SB(j, n);
                }
            }
        }
        // This window's inputs; prefetch the next one's.
        long t0 = gw * SUB;
        int j0 = w * SUB;
        // dt from the chunk pass. softplus' gradient sigmoid(v) and sigmoid(z) (which silu and
        // its gradient share) with the fast exp and reciprocal: a few ulp, where the precise
        // division and exp cost ~40 instructions a position.
        float x[SUB], dt[SUB], sg[SUB], dy[SUB], gz[SUB], zs[SUB];
#pragma unroll
        for (int j = 0; j < SUB; ++j) {
            bool tv = t0 + j < L && cval;
            float v = nv[j] + bias;
            x[j] = nu[j];
            float zv = nz[j];
            if (SHARE) {
                dt[j] = dts[(j0 + j) * SCAN_THREADS + tid];
                sg[j] = v > 20.0f ? 1.0f : __fdividef(1.0f, 1.0f + __expf(-v));
                float sz = __fdividef(1.0f, 1.0f + __expf(-zv));
                // dz = dout · silu'(z) · y: its first two factors now.
                gz[j] = ng[j] * (sz * (1.0f + zv * (1.0f - sz)));
                zs[j] = z ? zv * sz : 1.0f;
                dy[j] = ng[j] * zs[j];
            } else {
                dt[j] = tv ? softplus_f32(v) : 0.0f;
                sg[j] = softplus_grad_f32(v);
                gz[j] = ng[j] * silu_grad_f32(zv);
                zs[j] = z ? silu_f32(zv) : 1.0f;
                dy[j] = ng[j] * zs[j];
            }
        }
        if (gw > gw_first) load_win(t0 - SUB);
        // Forward over the window: states into registers, y.
        float hist[SUB][NG], y[SUB];
        {
            float h[NG];
#pragma unroll
            for (int n = 0; n < NG; ++n) h[n] = ck[(w * NG + n) * SCAN_THREADS + tid];
#pragma unroll
            for (int j = 0; j < SUB; ++j) {
                const int jc = j0 + j;
                float dtx = dt[j] * x[j];
                float dtr = sr[jc] ? SCAN_INF : dt[j];
                float ys = 0.0f;
#pragma unroll
                for (int n = 0; n < NG; ++n) {
                    h[n] = ex2(dtr * A2[n]) * h[n] + dtx * SB(jc, n);
                    hist[j][n] = h[n];
                    ys += SC(jc, n) * h[n];
                }
                y[j] = ys;
            }
        }
        // Reverse recurrence over the window.
#pragma unroll
        for (int j = SUB - 1; j >= 0; --j) {
            const int jc = j0 + j;
            long t = t0 + j;
            float dtr = sr[jc] ? SCAN_INF : dt[j];
            float dtx = dt[j] * x[j];
            float tcs = 0.0f, s1 = 0.0f;
            float vv[2 * NG];
#pragma unroll
            for (int n = 0; n < NG; ++n) {
                float Bn = SB(jc, n), Cn = SC(jc, n);
                dh[n] += dy[j] * Cn;
                vv[2 * n + 1] = dy[j] * hist[j][n];
                float hp = j > 0 ? hist[j > 0 ? j - 1 : 0][n] : ck[(w * NG + n) * SCAN_THREADS + tid];
                float dec = ex2(dtr * A2[n]);
                float gdec = dh[n] * hp * dec;
                dA[n] += gdec * dt[j];
                tcs += gdec * A2[n];
                s1 += dh[n] * Bn;
                vv[2 * n] = dh[n] * dtx;
                dh[n] *= dec;
            }
            warp_reduce_scatter<2 * NG>(vv, lane);
            {
                const int R = (2 * NG) / 32 > 0 ? (2 * NG) / 32 : 1;
                int base = rs_base<2 * NG>(lane);
#pragma unroll
                for (int i = 0; i < R; ++i) red[(jc * SCAN_WARPS + warp) * 2 * NG + base + i] = vv[i];
            }
            if (t < L && cval) {
                long row = b * L + t0;
                long o = row * di + c + j * di, oz = row * ldz_out + c + j * ldz_out;
                float yt = y[j] + Dc * x[j];
                // Σ_n dh · (h_prev · decay · A + x · B); A = A2 · ln 2.
                float dd = (tcs * LN2 + x[j] * s1) * sg[j];
                if (z) {
                    float dzv = gz[j] * yt;
                    if (dz_lp)
                        dz_lp[oz] = lp_mode == 0 ? f32_to_bf16(dzv) : f32_to_f16(dzv);
                    else
                        dz_out[oz] = dzv;
                }
                // The gated output out_proj's weight gradient reads (recomputed, not kept).
                if (gated_lp) {
                    float gt = yt * zs[j];
                    gated_lp[o] = lp_mode == 0 ? f32_to_bf16(gt) : f32_to_f16(gt);
                }
                if (ddelta_lp)
                    ddelta_lp[o] = lp_mode == 0 ? f32_to_bf16(dd) : f32_to_f16(dd);
                else
                    ddelta_out[o] = dd;
                du_out[o] = dy[j] * Dc + dt[j] * s1;
                dD += dy[j] * x[j];
                ddb += dd;
            }
        }
        if (w == 0) {
            // Chunk done: the block's dB / dC partials of its positions.
            __syncthreads();
            for (int idx = tid; idx < CHUNK * 2 * NG; idx += SCAN_THREADS) {
                int j = idx / (2 * NG), kk = idx % (2 * NG);
                int n = kk >> 1;
                long t = tc0 + j;
                if (t < L && n < ds) {
                    float s = 0.0f;
#pragma unroll
                    for (int w8 = 0; w8 < SCAN_WARPS; ++w8) s += red[(j * SCAN_WARPS + w8) * 2 * NG + kk];
                    part_bc[((blockIdx.x * batch + b) * L + t) * 2 * ds + ((kk & 1) ? ds : 0) + n] = s;
                }
            }
        }
    }
    if (cval) {
        // Partials per (segment, batch row), summed in that order by scan_reduce_batch_f32.
        long pb = seg * batch + b;
#pragma unroll
        for (int n = 0; n < NG; ++n) {
            const int sn = n ^ pm;
            if (sn < ds) {
                part_a[(pb * di + c) * ds + sn] = dA[n];
                if (dh0 && seg == 0) dh0[(b * di + c) * ds + sn] = dh[n];
            }
        }
        part_d[pb * di + c] = dD;
        part_db[pb * di + c] = ddb;
    }
}

// The backward's first pass where the positions are cut into segments (blockIdx.z + 1 = s ≥
// 1, the segment layout of the forward): the adjoint recurrence dh ← (dh + dy_t · C_t) · a_t
// (a_t = exp(dt_t · A), 0 at a reset) is linear per state, so segment s maps the gradient
// entering its last position to the one leaving its first as P ⊙ dh + q. This pass writes P
// and q (`[n_seg − 1, batch, d_inner, d_state]`, segment s at s − 1); the main pass starts
// each segment from dh_last folded through the maps of the segments after it. dt and dy as
// the main pass computes them.
static __device__ __forceinline__ void
selective_scan_bwd_map_body(const float* __restrict__, const float* __restrict__ delta,
                            const float* __restrict__ a_log, const float* __restrict__ xbc, long ldbc, long col_b,
                            const float* __restrict__, const float* __restrict__ z, long ldz,
                            const float* __restrict__ dt_bias, const int* __restrict__ starts,
                            const float* __restrict__, const float* __restrict__ dout, float* __restrict__,
                            float* __restrict__, float* __restrict__, long, float* __restrict__,
                            float* __restrict__, float* __restrict__, float* __restrict__,
                            const float* __restrict__, float* __restrict__, long batch, long L, long di,
                            long ds, u16* __restrict__, u16* __restrict__, u16* __restrict__, int,
                            long seg_len, float* __restrict__ seg_p, float* __restrict__ seg_q) {
    int tid = threadIdx.x;
    long c = blockIdx.x * (long)SCAN_THREADS + tid;
    long b = blockIdx.y;
    bool cval = c < di;
    long cc = cval ? c : di - 1;
    long sl = seg_len > 0 && seg_len < L ? seg_len : L;
    long seg = blockIdx.z + 1;
    long tbeg = seg * sl, tend = tbeg + sl < L ? tbeg + sl : L;
    float A2[NG], dh[NG], P[NG];
#pragma unroll
    for (int n = 0; n < NG; ++n) {
        A2[n] = n < ds ? -expf(a_log[cc * ds + n]) * LOG2E : 0.0f;
        dh[n] = 0.0f;
        P[n] = 1.0f;
    }
    float bias = dt_bias[cc];
#pragma unroll 4
    for (long t = tend - 1; t >= tbeg; --t) {
        long row = b * L + t;
        float v = (cval ? delta[row * di + c] : 0.0f) + bias;
        float ev = expf(v);
        float dt = cval ? (v > 20.0f ? v : log1pf(ev)) : 0.0f;
        float zv = (cval && z) ? z[row * ldz + c] : 0.0f;
        float zs = z ? zv * sigmoid_f32(zv) : 1.0f;
        float dy = (cval ? dout[row * di + c] : 0.0f) * zs;
        bool rs = starts[row] == t;
        const float* cr = xbc + row * ldbc + col_b + ds;
#pragma unroll
        for (int n = 0; n < NG; ++n) {
            float cn = n < ds ? cr[n] : 0.0f;
            float dec = ex2(dt * A2[n]);
            dh[n] += dy * cn;
            dh[n] = rs ? 0.0f : dh[n] * dec;
            P[n] = rs ? 0.0f : P[n] * dec;
        }
    }
    if (cval) {
#pragma unroll
        for (int n = 0; n < NG; ++n) {
            long at = (((seg - 1) * batch + b) * di + c) * ds + n;
            if (n < ds) {
                seg_p[at] = P[n];
                seg_q[at] = dh[n];
            }
        }
    }
}
extern "C" __global__ void __launch_bounds__(SCAN_THREADS) selective_scan_bwd_map_f32(const SelectiveScanBwdF32 p) {
    selective_scan_bwd_map_body(SELECTIVE_SCAN_BWD_F32_ARGS(p));
}

// Two builds of the same backward: registers as the compiler likes, and capped for two blocks
// of SCAN_THREADS per SM (`_2b`; at 128 threads both get 255 registers). The engine picks one
// (gpu/src/kernels.rs). SHARE = false is the unshared softplus / SiLU path (same speed on the H200
// at chunk 32, 3 % slower at chunk 16), kept for comparison.
extern "C" __global__ void __launch_bounds__(SCAN_THREADS) selective_scan_bwd_f32(const SelectiveScanBwdF32 p) {
    selective_scan_bwd_body<true>(SELECTIVE_SCAN_BWD_F32_ARGS(p));
}
extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 2) selective_scan_bwd_2b_f32(const SelectiveScanBwdF32 p) {
    selective_scan_bwd_body<true>(SELECTIVE_SCAN_BWD_F32_ARGS(p));
}

// out[row * ldo + col] = Σ_blk part_bc[blk, row, col] (blocks in order), col < 2 ds.
static __device__ __forceinline__ void scan_reduce_bc_f32_body(const float* part_bc, long nblk, long rows, long ds, float* out,
                                              long ldo) {
    long total = rows * 2 * ds;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long row = i / (2 * ds), col = i % (2 * ds);
        float acc = 0.0f;
        for (long k = 0; k < nblk; ++k) acc += part_bc[k * total + i];
        out[row * ldo + col] = acc;
    }
}
extern "C" __global__ void scan_reduce_bc_f32(const ScanReduceBcF32 p) { scan_reduce_bc_f32_body(SCAN_REDUCE_BC_F32_ARGS(p)); }

// dst[i] += (Σ_b part[b, i]) · (a_log ? −exp(a_log[i]) : 1), batches in order.
static __device__ __forceinline__ void scan_reduce_batch_f32_body(const float* part, long batch, long m, float* dst,
                                                 const float* a_log) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < m; i += (long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (long b = 0; b < batch; ++b) acc += part[b * m + i];
        if (a_log) acc = acc * -expf(a_log[i]);
        dst[i] += acc;
    }
}
extern "C" __global__ void scan_reduce_batch_f32(const ScanReduceBatchF32 p) { scan_reduce_batch_f32_body(SCAN_REDUCE_BATCH_F32_ARGS(p)); }
