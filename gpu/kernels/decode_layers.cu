// The decode step's layers in one persistent kernel (twin of the layer-by-layer step in
// decode.cu, whose conv update, scan body and GEMV order it shares: this file is compiled after
// it).
// ---- The decode step's layers in one persistent kernel (batch 1, low-precision weights). ----
// One block per SM, 9 warps: warps 0-7 compute, warp 8 streams the weights. The weight stream
// never waits for activations: lane 0 of warp 8 walks the block's share of every projection
// (in_proj, x_proj, out_proj of each layer in turn: chunks c = blockIdx.x, + gridDim.x, ...)
// and copies each chunk into a ring of shared-memory slots (DL_RING bytes) with the bulk copy engine
// (cp.async.bulk, completing on the slot's `full` mbarrier), as soon as the computing warps
// have released the slot (its `empty` mbarrier). So memory keeps streaming through the grid
// barriers between the phases of a layer:
//   A  residual add + norm (every block, on its own), in_proj with the conv update epilogue;
//   B  x_proj (and the residual written back);   C  dt_proj + the scan update;   D  out_proj.
// Every sum runs in the order of the kernels it replaces (norm_fwd_f32 with 256 threads,
// gemv_lp_nl4's lanes and warps, ssm_update_dt_f32), so a step gives their bits.
#define DL_RING 196608
#define DL_MAXSLOT 12
#define DL_CONSUMERS 256
#define DL_THREADS (DL_CONSUMERS + 32)
#define DL_XVEC 8192
#define DL_YB 3072
#define DL_PB 1024
#define DL_NV 16
#define DL_RMAX 16
#define DL_GPRE 2
#define DL_TRACE 16

__device__ __forceinline__ void dl_bar() { asm volatile("bar.sync 1, 256;" ::: "memory"); }

// Sum over the 256 computing threads, as block_sum over a 256-thread block (same bits).
__device__ float dl_sum(float v, float* sh) {
    v = warp_sum(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    dl_bar();
    if (l == 0) sh[w] = v;
    dl_bar();
    if (w == 0) {
        float r = l < 8 ? sh[l] : 0.0f;
        r = warp_sum(r);
        if (l == 0) sh[32] = r;
    }
    dl_bar();
    return sh[32];
}

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned dl_smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(dl_smem(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u64* b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(dl_smem(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(dl_smem(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* b, unsigned parity) {
    unsigned ok;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(ok)
            : "r"(dl_smem(b)), "r"(parity)
            : "memory");
    } while (!ok);
}
__device__ __forceinline__ void bulk_to_smem(void* dst, const void* src, unsigned bytes, u64* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     dl_smem(dst)),
                 "l"(src), "r"(bytes), "r"(dl_smem(bar))
                 : "memory");
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// The n-th grid barrier of the launch, in two halves: dl_grid_arrive once this block's
// computing threads are done writing, dl_grid_wait before reading what other blocks wrote
// (release add, acquire polls). Loads of what no block writes go between the two, so they
// land while the block waits.
__device__ __forceinline__ void dl_grid_arrive(unsigned* ctr) {
    dl_bar();
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(ctr) : "memory");
}
__device__ __forceinline__ void dl_grid_wait(unsigned* ctr, unsigned n) {
    if (threadIdx.x == 0) {
        unsigned target = n * gridDim.x;
        while (ld_acquire(ctr) < target) {
        }
    }
    dl_bar();
}

// One projection of one layer as the stream sees it: `n` rows of `k` low-precision values
// from `w`, or of `k` int8 codes from `q` with one scale a row in `s` where `q` is not null;
// `chunk` rows a chunk (chunk c goes to block c % gridDim.x), `split` warps per output.
struct DlMat {
    const u16* w;
    long n, k;
    int chunk, split;
    const signed char* q;
    const float* s;
    // Bytes a value, and chunk c's first byte.
    __device__ __forceinline__ long esize() const { return q ? 1 : 2; }
    __device__ __forceinline__ const void* src(long c) const {
        return q ? (const void*)(q + c * chunk * k) : (const void*)(w + c * chunk * k);
    }
    // This block's rows, counted over its chunks in order (the last may be partial).
    __device__ __forceinline__ long local_rows() const {
        long nch = (n + chunk - 1) / chunk;
        long mine = nch > blockIdx.x ? (nch - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
        return mine * chunk;
    }
    // The row of local index i (may be past n in the last chunk).
    __device__ __forceinline__ long row_of(long i) const {
        return (blockIdx.x + (i / chunk) * (long)gridDim.x) * chunk + i % chunk;
    }
};

__device__ __forceinline__ u64 dl_now() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The ring's cursor (slot and phase), the same sequence for the producer and the consumers.
struct DlRing {
    unsigned slot, phase, n, bytes;  // slot, phase; slots, bytes a slot
    __device__ __forceinline__ void next() {
        if (++slot == n) {
            slot = 0;
            phase ^= 1u;
        }
    }
    __device__ __forceinline__ unsigned char* at(unsigned char* ring) const { return ring + (size_t)slot * bytes; }
};

// Producer: queue this block's chunks of `m`.
__device__ __forceinline__ void dl_produce(const DlMat& m, unsigned char* ring, u64* full, u64* empty, DlRing& r) {
    long nch = (m.n + m.chunk - 1) / m.chunk;
    for (long c = blockIdx.x; c < nch; c += gridDim.x) {
        long rows = m.n - c * m.chunk < m.chunk ? m.n - c * m.chunk : m.chunk;
        unsigned bytes = (unsigned)(rows * m.k * m.esize());
        mbar_wait(&empty[r.slot], r.phase ^ 1u);
        mbar_expect_tx(&full[r.slot], bytes);
        bulk_to_smem(r.at(ring), m.src(c), bytes, &full[r.slot]);
        r.next();
    }
}

// acc[r] += Σ w[r][k] x[k] over one lane's k = k0, k0 + step, ... (< k), V = GemvVals<Q8>::n
// values a step (a 16-byte weight load), in that order (gemv_lp's per-lane order); the loads
// of U steps go out before their sums (4 of bf16, 2 of int8: 64 bytes of x either way).
// w: the rows' bytes, low-precision values or (Q8) int8 codes (gemv_wload / gemv_wunpack of
// decode.cu, as gemv_lp_nl_body_t reads them).
template <int R, bool Q8>
__device__ __forceinline__ void dl_dot(const unsigned char* const* w, const u16* x, long k0, long step, long k,
                                       int lp_mode, float* acc) {
    constexpr int V = GemvVals<Q8>::n, XV = V / 8, U = 4 / XV;
    for (; k0 + (U - 1) * step < k; k0 += U * step) {
        uint4 xv[U][XV], wv[R][U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int h = 0; h < XV; ++h) xv[u][h] = *(const uint4*)(x + k0 + u * step + 8 * h);
#pragma unroll
            for (int r = 0; r < R; ++r) wv[r][u] = gemv_wload<Q8>(w[r], k0 + u * step);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float xf[V];
#pragma unroll
            for (int h = 0; h < XV; ++h) unpack8(xv[u][h], lp_mode, xf + 8 * h);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float wf[V];
                gemv_wunpack<Q8>(wv[r][u], lp_mode, wf);
#pragma unroll
                for (int q = 0; q < V; ++q) acc[r] += wf[q] * xf[q];
            }
        }
    }
    for (; k0 < k; k0 += step) {
        float xf[V];
#pragma unroll
        for (int h = 0; h < XV; ++h) unpack8(*(const uint4*)(x + k0 + 8 * h), lp_mode, xf + 8 * h);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float wf[V];
            gemv_wunpack<Q8>(gemv_wload<Q8>(w[r], k0), lp_mode, wf);
#pragma unroll
            for (int q = 0; q < V; ++q) acc[r] += wf[q] * xf[q];
        }
    }
}

// Consumers: this block's chunks of `m` against x (`m.k` values in shared memory); out(n,
// local, v) gets output n (local: its index among the block's rows). Output n is summed as
// gemv_lp_nl_body sums it for one row: `split` parts (part q: lanes from k = (q·32 + lane)·V,
// step split·32·V, V = GemvVals<Q8>::n), each a warp sum, added in part order. A warp takes
// the (row, part) tasks w and w + 8 together (the same part, so the same x loads); parts meet
// in `pb`.
template <bool Q8, typename Out>
__device__ __forceinline__ void dl_consume(const DlMat& m, const u16* x, int lp_mode, unsigned char* ring, u64* full,
                                           u64* empty, DlRing& r, float* pb, u64* starved, Out out) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int s = m.split;
    const long nch = (m.n + m.chunk - 1) / m.chunk;
    long local0 = 0;
    for (long c = blockIdx.x; c < nch; c += gridDim.x, local0 += m.chunk) {
        const int rows = (int)(m.n - c * m.chunk < m.chunk ? m.n - c * m.chunk : m.chunk);
        const int tasks = rows * s;
        u64 t0 = starved ? dl_now() : 0;
        mbar_wait(&full[r.slot], r.phase);
        if (starved) *starved += dl_now() - t0;
        const unsigned char* wc = r.at(ring);
        const long rb = m.k * m.esize();
        for (int t0 = warp; t0 < tasks; t0 += 16) {
            const int part = t0 % s;
            const int row0 = t0 / s, row1 = (t0 + 8) / s;
            const bool two = t0 + 8 < tasks;
            const unsigned char* w[2] = {wc + row0 * rb, wc + row1 * rb};
            float a[2] = {0.0f, 0.0f};
            const long k0 = ((long)part * 32 + lane) * GemvVals<Q8>::n, step = (long)s * 32 * GemvVals<Q8>::n;
            if (two)
                dl_dot<2, Q8>(w, x, k0, step, m.k, lp_mode, a);
            else
                dl_dot<1, Q8>(w, x, k0, step, m.k, lp_mode, a);
            float v0 = warp_sum(a[0]), v1 = two ? warp_sum(a[1]) : 0.0f;
            if (lane == 0) {
                if (s == 1) {
                    // int8 rows: times the row's scale once the sum is complete.
                    const long n0 = c * m.chunk + row0, n1 = c * m.chunk + row1;
                    out(n0, local0 + row0, Q8 ? v0 * m.s[n0] : v0);
                    if (two) out(n1, local0 + row1, Q8 ? v1 * m.s[n1] : v1);
                } else {
                    pb[t0] = v0;
                    if (two) pb[t0 + 8] = v1;
                }
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[r.slot]);
        r.next();
        if (s > 1) {
            dl_bar();
            for (int row = threadIdx.x; row < rows; row += DL_CONSUMERS) {
                float t = 0.0f;
                for (int q = 0; q < s; ++q) t += pb[row * s + q];
                const long n = c * m.chunk + row;
                out(n, local0 + row, Q8 ? t * m.s[n] : t);
            }
            dl_bar();
        }
    }
}

// Copies n low-precision values from global memory into x (16 bytes a thread; n % 8 == 0).
__device__ __forceinline__ void dl_load_x(u16* x, const u16* src, long n) {
    for (long i = threadIdx.x * 8L; i < n; i += DL_CONSUMERS * 8L) *(uint4*)(x + i) = *(const uint4*)(src + i);
}

// The scan update of one thread's (channel, state) of group g, in two halves as
// ssm_update_f32_at with dt_w computes it (same bits): what does not depend on this step's
// activations (A, the state, D, the dt bias, the thread's dt_proj weights), then the rest.
struct ScanPre {
    float A2, h, dv, dtb;
    u16 w[DL_RMAX];
};
__device__ __forceinline__ ScanPre dl_scan_pre(long g, const float* a_log, const float* dvec, const float* dt_bias,
                                               const int* starts, const float* h_state, const u16* dt_w, long di,
                                               long ds, long rank) {
    int tid = threadIdx.x, n = tid % D_STATE_PAD;
    long c = g * (long)(256 / D_STATE_PAD) + tid / D_STATE_PAD;
    bool nval = n < ds;
    long cc = c < di ? c : di - 1;
    ScanPre p;
    p.A2 = nval ? -expf(a_log[cc * ds + n]) * 1.4426950408889634f : 0.0f;
    p.h = (nval && starts[0] != 0) ? h_state[cc * ds + n] : 0.0f;
    p.dv = dvec[cc];
    p.dtb = dt_bias[cc];
#pragma unroll
    for (int q = 0; q < DL_RMAX; ++q) {
        long r = n + (long)q * D_STATE_PAD;
        p.w[q] = r < rank ? dt_w[cc * rank + r] : (u16)0;
    }
    return p;
}
__device__ __forceinline__ void dl_scan_post(const ScanPre& p, long g, const float* xs, const float* xdbl, long col_b,
                                             const float* z, float* h_state, float* out, u16* out_lp, int lp_mode,
                                             long di, long ds, long rank) {
    int tid = threadIdx.x, n = tid % D_STATE_PAD;
    long c = g * (long)(256 / D_STATE_PAD) + tid / D_STATE_PAD;
    bool cval = c < di, nval = n < ds;
    long cc = cval ? c : di - 1;
    float x = xs[cc];
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < DL_RMAX; ++q) {
        long r = n + (long)q * D_STATE_PAD;
        if (r < rank) {
            float xv = lp_to_f32(lp_mode == 0 ? f32_to_bf16(xdbl[r]) : f32_to_f16(xdbl[r]), lp_mode);
            s += lp_to_f32(p.w[q], lp_mode) * xv;
        }
    }
    float pre = decode_group_sum(s);
    float dt = softplus_f32(pre + p.dtb);
    const float* bc = xdbl + col_b;
    float Bn = nval ? bc[n] : 0.0f;
    float Cn = nval ? bc[ds + n] : 0.0f;
    float h = exp2f(dt * p.A2) * p.h + (dt * x) * Bn;
    float y = decode_group_sum(Cn * h);
    if (cval && nval) h_state[cc * ds + n] = h;
    if (cval && n == 0) {
        y += p.dv * x;
        float o = y * silu_f32(z[cc]);
        out[c] = o;
        if (out_lp) out_lp[c] = lp_mode == 0 ? f32_to_bf16(o) : f32_to_f16(o);
    }
}
#endif

// The layer's tensors: f32 parameters (params + off + layer * layer_stride) and the
// low-precision shadow at the same offsets. Whatever a phase reads that no kernel of this
// step writes (norm and conv weights, the conv window, the scan's parameters and state) is
// loaded before the grid barrier that opens the phase.
template <bool Q8>
static __device__ __forceinline__ void decode_layers_lp_body(
    const float* params, const u16* shadow, long stride, long o_norm_w, long o_in_w, long o_conv_w, long o_conv_b,
    long o_x_w, long o_dt_w, long o_dt_b, long o_a_log, long o_d, long o_out_w, long n_layer, long dm, long di, long ds,
    long dt_rank, float eps, int lp_mode, int chunk_in, int chunk_x, int chunk_out, int split_in, int split_x,
    int split_out, float* resid, float* out, float* xz, float* xs, u16* xs_lp, float* xdbl, float* gated,
    u16* gated_lp, float* conv_state, float* ssm_state, const int* starts, unsigned* sync, u64* trace, int slot_bytes,
    const signed char* q8, const float* q8s) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) unsigned char dl_sm[];
    unsigned char* ring = dl_sm;
    u64* full = (u64*)(dl_sm + DL_RING);
    u64* empty = full + DL_MAXSLOT;
    u16* x = (u16*)(empty + DL_MAXSLOT);
    const unsigned nslot = DL_RING / slot_bytes;
    float* yb = (float*)(x + DL_XVEC);
    float* pb = yb + DL_YB;
    float* sh = pb + DL_PB;
    const long xr = dt_rank + 2 * ds, km1 = D_CONV - 1;
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int i = 0; i < nslot; ++i) {
            mbar_init(&full[i], 1);
            mbar_init(&empty[i], 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    // int8 codes (q8, may be null) per layer as `plan` in gpu/src/q8.rs lays them (its test
    // holds these formulas): in_proj, x_proj, out_proj, each starting on a multiple of 256
    // bytes; the scales one a row in that order.
    const long q_x = (2 * di * dm + 255) / 256 * 256, q_out = q_x + (xr * di + 255) / 256 * 256;
    const long q_stride = q_out + (dm * di + 255) / 256 * 256, s_stride = 2 * di + xr + dm;
    auto mats = [&](long l, DlMat* m) {
        const u16* base = shadow + l * stride;
        const signed char* qb = Q8 ? q8 + l * q_stride : 0;
        const float* sb = Q8 ? q8s + l * s_stride : 0;
        m[0] = DlMat{base + o_in_w, 2 * di, dm, chunk_in, split_in, qb, sb};
        m[1] = DlMat{base + o_x_w, xr, di, chunk_x, split_x, qb ? qb + q_x : 0, sb ? sb + 2 * di : 0};
        m[2] = DlMat{base + o_out_w, dm, di, chunk_out, split_out, qb ? qb + q_out : 0, sb ? sb + 2 * di + xr : 0};
    };
    DlRing ring_at{0, 0, nslot, (unsigned)slot_bytes};
    if (tid >= DL_CONSUMERS) {
        // The weights are never written while decoding: no wait for the kernels before.
        if (tid == DL_CONSUMERS) {
            for (long l = 0; l < n_layer; ++l) {
                DlMat m[3];
                mats(l, m);
                for (int j = 0; j < 3; ++j) dl_produce(m[j], ring, full, empty, ring_at);
            }
        }
        return;
    }
    pdl_wait();
    unsigned bars = 0;
    const bool has_cb = o_conv_b >= 0;
    // trace (may be null): block 0's clock at DL_TRACE points of every layer (ns).
    // Points 0-11 are times; 12-14 the time its waits for weight chunks took in A, B, D.
    const bool tracing = trace && blockIdx.x == 0 && tid == 0;
    u64 starved[3] = {0, 0, 0};
    auto mark = [&](long l, int point) {
        if (tracing) trace[l * DL_TRACE + point] = dl_now();
    };
    // Phase A's loads ahead of its barrier: the norm weight, the conv update of this thread's
    // first local in_proj row.
    float nwv[DL_NV];
    ConvPre cpre;
    auto pre_a = [&](long l) {
        const float* lp = params + l * stride;
#pragma unroll
        for (int i = 0; i < DL_NV; ++i) {
            long j = tid + 256L * i;
            nwv[i] = j < dm ? lp[o_norm_w + j] : 0.0f;
        }
        DlMat m[3];
        mats(l, m);
        long n = m[0].row_of(tid);
        if (tid < m[0].local_rows() && n < di)
            cpre = conv_update_pre(n, lp + o_conv_w, has_cb ? lp + o_conv_b : 0, starts, conv_state + l * di * km1, di);
    };
    pre_a(0);
    for (long l = 0; l < n_layer; ++l) {
        const float* lp = params + l * stride;
        DlMat m[3];
        mats(l, m);
        mark(l, 0);
        if (l > 0) dl_grid_wait(sync, ++bars);
        mark(l, 1);
        // A: v = resid (+ the last layer's out), the norm into x, then in_proj; its outputs go
        // to yb, then out with the conv update, one thread a row.
        {
            float v[DL_NV];
            float ss = 0.0f;
#pragma unroll
            for (int i = 0; i < DL_NV; ++i) {
                long j = tid + 256L * i;
                v[i] = 0.0f;
                if (j < dm) {
                    float t = resid[j];
                    if (l > 0) t = t + out[j];
                    v[i] = t;
                    float c = t - 0.0f;
                    ss += c * c;
                }
            }
            ss = dl_sum(ss, sh);
            float inv_d = 1.0f / (float)dm;
            float rstd = 1.0f / sqrtf(ss * inv_d + eps);
#pragma unroll
            for (int i = 0; i < DL_NV; ++i) {
                long j = tid + 256L * i;
                if (j < dm) {
                    float y = (v[i] - 0.0f) * rstd * nwv[i];
                    x[j] = lp_mode == 0 ? f32_to_bf16(y) : f32_to_f16(y);
                }
            }
        }
        dl_bar();
        mark(l, 2);
        dl_consume<Q8>(m[0], x, lp_mode, ring, full, empty, ring_at, pb, tracing ? &starved[0] : 0,
                   [&](long n, long local, float y) { yb[local] = y; });
        dl_bar();
        mark(l, 3);
        {
            const float* conv_w = lp + o_conv_w;
            const float* conv_b = has_cb ? lp + o_conv_b : 0;
            float* window = conv_state + l * di * km1;
            long nloc = m[0].local_rows();
            for (long i = tid; i < nloc; i += DL_CONSUMERS) {
                long n = m[0].row_of(i);
                if (n >= 2 * di) continue;
                float y = yb[i];
                xz[n] = y;
                if (n < di) {
                    ConvPre p = i == tid ? cpre : conv_update_pre(n, conv_w, conv_b, starts, window, di);
                    conv_update_post(p, n, y, has_cb, window, xs, xs_lp, lp_mode);
                }
            }
        }
        mark(l, 4);
        dl_grid_arrive(sync);
        dl_grid_wait(sync, ++bars);
        mark(l, 5);
        // B: the residual written back (nothing reads it until the next layer), x_proj; the
        // scan's own loads between the barrier's halves.
        if (l > 0) {
            for (long j = blockIdx.x * 256L + tid; j < dm; j += 256L * gridDim.x) resid[j] = resid[j] + out[j];
        }
        if (m[1].local_rows() > 0) {
            dl_load_x(x, xs_lp, di);
            dl_bar();
            dl_consume<Q8>(m[1], x, lp_mode, ring, full, empty, ring_at, pb, tracing ? &starved[1] : 0,
                       [&](long n, long local, float y) { xdbl[n] = y; });
        }
        mark(l, 6);
        dl_grid_arrive(sync);
        const u16* dt_w = shadow + l * stride + o_dt_w;
        float* h_state = ssm_state + l * di * ds;
        const long groups = (di + 256 / D_STATE_PAD - 1) / (256 / D_STATE_PAD);
        ScanPre sp[DL_GPRE];
#pragma unroll
        for (int q = 0; q < DL_GPRE; ++q) {
            long g = blockIdx.x + (long)q * gridDim.x;
            if (g < groups)
                sp[q] = dl_scan_pre(g, lp + o_a_log, lp + o_d, lp + o_dt_b, starts, h_state, dt_w, di, ds, dt_rank);
        }
        mark(l, 7);
        dl_grid_wait(sync, ++bars);
        mark(l, 8);
        // C: dt_proj inside the scan update, 256 / D_STATE_PAD channels a pass.
#pragma unroll
        for (int q = 0; q < DL_GPRE; ++q) {
            long g = blockIdx.x + (long)q * gridDim.x;
            if (g < groups)
                dl_scan_post(sp[q], g, xs, xdbl, dt_rank, xz + di, h_state, gated, gated_lp, lp_mode, di, ds, dt_rank);
        }
        for (long g = blockIdx.x + (long)DL_GPRE * gridDim.x; g < groups; g += gridDim.x) {
            ScanPre p = dl_scan_pre(g, lp + o_a_log, lp + o_d, lp + o_dt_b, starts, h_state, dt_w, di, ds, dt_rank);
            dl_scan_post(p, g, xs, xdbl, dt_rank, xz + di, h_state, gated, gated_lp, lp_mode, di, ds, dt_rank);
        }
        mark(l, 9);
        dl_grid_arrive(sync);
        if (l + 1 < n_layer) pre_a(l + 1);
        dl_grid_wait(sync, ++bars);
        mark(l, 10);
        // D: out_proj.
        if (m[2].local_rows() > 0) {
            dl_load_x(x, gated_lp, di);
            dl_bar();
            dl_consume<Q8>(m[2], x, lp_mode, ring, full, empty, ring_at, pb, tracing ? &starved[2] : 0,
                       [&](long n, long local, float y) { out[n] = y; });
        }
        mark(l, 11);
        if (tracing) {
            for (int q = 0; q < 3; ++q) {
                trace[l * DL_TRACE + 12 + q] = starved[q];
                starved[q] = 0;
            }
        }
        if (l + 1 < n_layer) dl_grid_arrive(sync);
    }
    // The last block out resets the barrier counters for the next launch (every block has
    // stopped polling them by then).
    if (tid == 0) {
        unsigned prev;
        asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(prev) : "l"(sync + 1), "r"(1u) : "memory");
        if (prev == gridDim.x - 1) {
            sync[0] = 0;
            sync[1] = 0;
            __threadfence();
        }
    }
#endif
}
// One kernel per weight format: the int8 path inside the bf16 / fp16 kernel cost it spills.
extern "C" __global__ void __launch_bounds__(DL_THREADS, 1) decode_layers_lp(const DecodeLayersLp p) {
    decode_layers_lp_body<false>(DECODE_LAYERS_LP_ARGS(p));
}
extern "C" __global__ void __launch_bounds__(DL_THREADS, 1) decode_layers_lp_q8(const DecodeLayersLp p) {
    decode_layers_lp_body<true>(DECODE_LAYERS_LP_ARGS(p));
}
