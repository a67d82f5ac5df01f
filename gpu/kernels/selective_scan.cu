// The selective scan of Mamba-1 with dt bias + softplus, the D skip and the z gate fused in
// (twin of reference/src/ops/selective_scan.rs).
//
// Layout: one thread per (batch b, channel c, state index n); D_STATE_PAD (a power of two
// ≥ d_state, ≤ 32) neighbouring lanes of a warp hold the states of one channel and reduce
// over n with xor butterflies (fixed order, every lane gets the same bits). Block: 256
// threads = 256 / D_STATE_PAD channels. Grid: (ceil(d_inner / channels per block), batch).
//
// The forward stores the state at the start of every CHUNK positions (`chunk_states`,
// [batch, n_chunks, d_inner, d_state]); the backward walks the chunks in reverse, recomputes
// the states inside a chunk into registers and runs the reverse recurrence. No
// [batch, seq_len, d_inner, d_state] tensor ever exists.
//
// B and C are read from x_proj's output `xbc` (row stride ldbc, B at column col_b, C right
// after it); z from in_proj's output (row stride ldz).

#define NG D_STATE_PAD
#define SCAN_THREADS 256
#define SCAN_WARPS (SCAN_THREADS / 32)
#define FULL_MASK 0xffffffffu

// Sum over the NG lanes of a group; every lane gets the same bits.
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = NG / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Lane j's value within the group.
__device__ __forceinline__ float group_bcast(float v, int j) { return __shfl_sync(FULL_MASK, v, j, NG); }
__device__ __forceinline__ int group_bcast_i(int v, int j) { return __shfl_sync(FULL_MASK, v, j, NG); }

// Reduce-scatter over the NG lanes of a group (recursive halving, fixed order): returns, on
// lane n, Σ over the group's lanes of v[n]. NG − 1 shuffles for NG sums.
__device__ __forceinline__ float group_reduce_scatter(float (&v)[NG], int n) {
#pragma unroll
    for (int half = NG / 2; half >= 1; half >>= 1) {
        bool upper = (n & half) != 0;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            float send = upper ? v[i] : v[i + half];
            float keep = upper ? v[i + half] : v[i];
            v[i] = keep + __shfl_xor_sync(FULL_MASK, send, half);
        }
    }
    return v[0];
}

// Time runs in blocks of NG steps: lane n of a group computes the per-channel scalars of step
// t0 + n once (softplus, SiLU: no 16-fold recomputation), the group broadcasts them step by
// step, and the sums over n of the NG steps are reduce-scattered back so lane n finishes
// step t0 + n.
extern "C" __global__ void __launch_bounds__(SCAN_THREADS)
selective_scan_fwd_f32(const float* u, const float* delta, const float* a_log, const float* xbc, long ldbc,
                       long col_b, const float* dvec, const float* z, long ldz, const float* dt_bias,
                       const int* starts, const float* h0, float* out, float* chunk_states, float* last,
                       long batch, long L, long di, long ds) {
    int tid = threadIdx.x, n = tid % NG;
    long c = blockIdx.x * (long)(SCAN_THREADS / NG) + tid / NG;
    long b = blockIdx.y;
    bool cval = c < di, nval = n < ds;
    long cc = cval ? c : di - 1;
    // A · log2(e): exp(dt · A) = exp2(dt · A2), one MUFU instruction.
    float A2 = nval ? -expf(a_log[cc * ds + n]) * 1.4426950408889634f : 0.0f;
    float h = (h0 && nval) ? h0[(b * di + cc) * ds + n] : 0.0f;
    float Dc = dvec[cc], bias = dt_bias[cc];
    long nchunks = (L + CHUNK - 1) / CHUNK;
    const float* bc = xbc + col_b + n;
    for (long t0 = 0; t0 < L; t0 += NG) {
        long tn = t0 + n;
        bool tv = tn < L;
        long rown = b * L + (tv ? tn : t0);
        float xl = tv ? u[rown * di + cc] : 0.0f;
        float dtl = tv ? softplus_f32(delta[rown * di + cc] + bias) : 0.0f;
        int rl = tv ? (starts[rown] == tn) : 0;
        if (chunk_states && (t0 % CHUNK) == 0 && cval && nval)
            chunk_states[((b * nchunks + t0 / CHUNK) * di + c) * ds + n] = h;
        float yc[NG];
#pragma unroll
        for (int j = 0; j < NG; ++j) {
            // Past the end (t >= L): x = dt = 0 leave h unchanged; that step's sum is not
            // written. Rows are clamped so every load stays in bounds.
            long row = b * L + min(t0 + j, L - 1);
            float x = group_bcast(xl, j);
            float dt = group_bcast(dtl, j);
            int rs = group_bcast_i(rl, j);
            if (rs) h = 0.0f;
            float Bn = nval ? bc[row * ldbc] : 0.0f;
            float Cn = nval ? bc[row * ldbc + ds] : 0.0f;
            h = exp2f(dt * A2) * h + (dt * x) * Bn;
            yc[j] = Cn * h;
        }
        float ys = group_reduce_scatter(yc, n);
        if (tv && cval) {
            float y = ys + Dc * xl;
            out[rown * di + c] = z ? y * silu_f32(z[rown * ldz + cc]) : y;
        }
    }
    if (last && cval && nval) last[(b * di + c) * ds + n] = h;
}

// One group-block of NG steps of the forward recurrence from `h` (no outputs).
__device__ __forceinline__ float scan_advance(float h, long t0, int n, long b, long L, long di, long cc,
                                              const float* u, const float* delta, const float* bc, long ldbc,
                                              const int* starts, float bias, float A2, bool nval) {
    long tn = t0 + n;
    bool tv = tn < L;
    long rown = b * L + (tv ? tn : 0);
    float xl = tv ? u[rown * di + cc] : 0.0f;
    float dtl = tv ? softplus_f32(delta[rown * di + cc] + bias) : 0.0f;
    int rl = tv ? (starts[rown] == tn) : 0;
#pragma unroll
    for (int j = 0; j < NG; ++j) {
        long row = b * L + min(t0 + j, L - 1);
        float x = group_bcast(xl, j);
        float dt = group_bcast(dtl, j);
        int rs = group_bcast_i(rl, j);
        if (rs) h = 0.0f;
        float Bn = nval ? bc[row * ldbc] : 0.0f;
        h = exp2f(dt * A2) * h + (dt * x) * Bn;
    }
    return h;
}

// Backward. Writes du, ddelta ([B, L, di]), dz (row stride ldz_out) and per-block partial sums:
// part_bc[blk, b * L + t, 0..2 ds] (dB then dC, summed over the block's channels),
// part_a[b, c, n], part_d[b, c], part_db[b, c] (summed over positions), dh0[b, c, n].
//
// Chunks (CHUNK positions, one stored state each) are walked in reverse; inside a chunk,
// windows of SUB positions in reverse: the state at the window's start is recomputed from
// the chunk's state, the window's states go to registers (hist), then the reverse
// recurrence runs over the window. SUB bounds the registers, CHUNK the stored states.
// Dynamic shared memory: 2 · SUB · SCAN_WARPS · NG floats.
__device__ __forceinline__ void
selective_scan_bwd_body(const float* u, const float* delta, const float* a_log, const float* xbc, long ldbc,
                        long col_b, const float* dvec, const float* z, long ldz, const float* dt_bias,
                        const int* starts, const float* chunk_states, const float* dout, float* du_out,
                        float* ddelta_out, float* dz_out, long ldz_out, float* part_bc, float* part_a,
                        float* part_d, float* part_db, float* dh0, long batch, long L, long di, long ds) {
    extern __shared__ float smem[];
    float* sb = smem;
    float* sc = smem + SUB * SCAN_WARPS * NG;
    int tid = threadIdx.x, n = tid % NG, lane = tid & 31, warp = tid >> 5;
    long c = blockIdx.x * (long)(SCAN_THREADS / NG) + tid / NG;
    long b = blockIdx.y;
    bool cval = c < di, nval = n < ds;
    long cc = cval ? c : di - 1;
    float A = nval ? -expf(a_log[cc * ds + n]) : 0.0f;
    float A2 = A * 1.4426950408889634f;
    float Dc = dvec[cc], bias = dt_bias[cc];
    long nchunks = (L + CHUNK - 1) / CHUNK;
    const float* bc = xbc + col_b + n;
    float hist[SUB];
    float dh = 0.0f, dA = 0.0f, dD = 0.0f, ddb = 0.0f;
    for (long k = nchunks - 1; k >= 0; --k) {
        float hk = (cval && nval) ? chunk_states[((b * nchunks + k) * di + c) * ds + n] : 0.0f;
        for (int w = CHUNK / SUB - 1; w >= 0; --w) {
            long t0 = k * CHUNK + (long)w * SUB;
            if (t0 >= L) continue;
            float h = hk;
            for (long ta = k * CHUNK; ta < t0; ta += NG)
                h = scan_advance(h, ta, n, b, L, di, cc, u, delta, bc, ldbc, starts, bias, A2, nval);
            float hs = h;
            // The window's states into registers.
#pragma unroll
            for (int s = 0; s < SUB / NG; ++s) {
                long tn = t0 + s * NG + n;
                bool tv = tn < L;
                long rown = b * L + (tv ? tn : 0);
                float xl = tv ? u[rown * di + cc] : 0.0f;
                float dtl = tv ? softplus_f32(delta[rown * di + cc] + bias) : 0.0f;
                int rl = tv ? (starts[rown] == tn) : 0;
#pragma unroll
                for (int j = 0; j < NG; ++j) {
                    long row = b * L + min(t0 + s * NG + j, L - 1);
                    float x = group_bcast(xl, j);
                    float dt = group_bcast(dtl, j);
                    int rs = group_bcast_i(rl, j);
                    if (rs) h = 0.0f;
                    float Bn = nval ? bc[row * ldbc] : 0.0f;
                    h = exp2f(dt * A2) * h + (dt * x) * Bn;
                    hist[s * NG + j] = h;
                }
            }
            // Reverse recurrence over the window.
#pragma unroll
            for (int s = SUB / NG - 1; s >= 0; --s) {
                long tn = t0 + s * NG + n;
                bool tv = tn < L;
                long rown = b * L + (tv ? tn : 0);
                long il = rown * di + cc;
                float xl = tv ? u[il] : 0.0f;
                float vl = tv ? delta[il] + bias : 0.0f;
                float dtl = tv ? softplus_f32(vl) : 0.0f;
                float gl = tv ? dout[il] : 0.0f;
                float zl = (tv && z) ? z[rown * ldz + cc] : 0.0f;
                float dyl = z ? gl * silu_f32(zl) : gl;
                int rl = tv ? (starts[rown] == tn) : 0;
                float yc[NG], tc[NG], xc[NG];
#pragma unroll
                for (int j = NG - 1; j >= 0; --j) {
                    const int jj = s * NG + j;
                    // Past the end, x = dt = dy = 0 and dh is still 0 (no later step): nothing
                    // moves, and that step's outputs are not written.
                    long row = b * L + min(t0 + jj, L - 1);
                    float x = group_bcast(xl, j);
                    float dt = group_bcast(dtl, j);
                    float dy = group_bcast(dyl, j);
                    int rs = group_bcast_i(rl, j);
                    float Bn = nval ? bc[row * ldbc] : 0.0f;
                    float Cn = nval ? bc[row * ldbc + ds] : 0.0f;
                    float hcur = hist[jj];
                    yc[j] = Cn * hcur;
                    dh += dy * Cn;
                    float ccv = dy * hcur;
                    float hp = rs ? 0.0f : (jj > 0 ? hist[jj > 0 ? jj - 1 : 0] : hs);
                    float decay = exp2f(dt * A2);
                    float gdec = dh * hp * decay;
                    tc[j] = gdec * A + dh * x * Bn;
                    dA += gdec * dt;
                    xc[j] = dh * dt * Bn;
                    float cbv = dh * (dt * x);
                    dh = rs ? 0.0f : dh * decay;
                    if (!cval) {
                        cbv = 0.0f;
                        ccv = 0.0f;
                    }
#pragma unroll
                    for (int o = NG; o < 32; o <<= 1) {
                        cbv += __shfl_xor_sync(FULL_MASK, cbv, o);
                        ccv += __shfl_xor_sync(FULL_MASK, ccv, o);
                    }
                    if (lane < NG) {
                        sb[(jj * SCAN_WARPS + warp) * NG + n] = cbv;
                        sc[(jj * SCAN_WARPS + warp) * NG + n] = ccv;
                    }
                }
                float ys = group_reduce_scatter(yc, n);
                float ts = group_reduce_scatter(tc, n);
                float xs = group_reduce_scatter(xc, n);
                if (tv) {
                    float y = ys + Dc * xl;
                    float dd = ts * softplus_grad_f32(vl);
                    if (cval) {
                        if (z) dz_out[rown * ldz_out + c] = gl * y * silu_grad_f32(zl);
                        ddelta_out[rown * di + c] = dd;
                        du_out[rown * di + c] = dyl * Dc + xs;
                    }
                    dD += dyl * xl;
                    ddb += dd;
                }
            }
            __syncthreads();
            for (int idx = tid; idx < SUB * NG; idx += SCAN_THREADS) {
                int j = idx / NG, nn = idx % NG;
                long t = t0 + j;
                if (t < L && nn < ds) {
                    float sbv = 0.0f, scv = 0.0f;
                    for (int w8 = 0; w8 < SCAN_WARPS; ++w8) {
                        sbv += sb[(j * SCAN_WARPS + w8) * NG + nn];
                        scv += sc[(j * SCAN_WARPS + w8) * NG + nn];
                    }
                    float* p = part_bc + ((blockIdx.x * batch + b) * L + t) * 2 * ds;
                    p[nn] = sbv;
                    p[ds + nn] = scv;
                }
            }
            __syncthreads();
        }
    }
    dD = group_sum(dD);
    ddb = group_sum(ddb);
    if (cval && nval) {
        part_a[(b * di + c) * ds + n] = dA;
        if (dh0) dh0[(b * di + c) * ds + n] = dh;
    }
    if (cval && n == 0) {
        part_d[b * di + c] = dD;
        part_db[b * di + c] = ddb;
    }
}

#define SCAN_BWD_PARAMS                                                                                  \
    const float *u, const float *delta, const float *a_log, const float *xbc, long ldbc, long col_b,         \
        const float *dvec, const float *z, long ldz, const float *dt_bias, const int *starts,                \
        const float *chunk_states, const float *dout, float *du_out, float *ddelta_out, float *dz_out,       \
        long ldz_out, float *part_bc, float *part_a, float *part_d, float *part_db, float *dh0, long batch,  \
        long L, long di, long ds
#define SCAN_BWD_ARGS                                                                                     \
    u, delta, a_log, xbc, ldbc, col_b, dvec, z, ldz, dt_bias, starts, chunk_states, dout, du_out, ddelta_out, \
        dz_out, ldz_out, part_bc, part_a, part_d, part_db, dh0, batch, L, di, ds

// Two builds of the same backward: registers as the compiler likes (one block per SM), and
// capped for two blocks per SM (`_2b`, may spill). The engine picks one (gpu/src/cuda.rs).
extern "C" __global__ void __launch_bounds__(SCAN_THREADS) selective_scan_bwd_f32(SCAN_BWD_PARAMS) {
    selective_scan_bwd_body(SCAN_BWD_ARGS);
}
extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 2) selective_scan_bwd_2b_f32(SCAN_BWD_PARAMS) {
    selective_scan_bwd_body(SCAN_BWD_ARGS);
}

// out[row * ldo + col] = Σ_blk part_bc[blk, row, col] (blocks in order), col < 2 ds.
extern "C" __global__ void scan_reduce_bc_f32(const float* part_bc, long nblk, long rows, long ds, float* out,
                                              long ldo) {
    long total = rows * 2 * ds;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long row = i / (2 * ds), col = i % (2 * ds);
        float acc = 0.0f;
        for (long k = 0; k < nblk; ++k) acc += part_bc[k * total + i];
        out[row * ldo + col] = acc;
    }
}

// dst[i] += (Σ_b part[b, i]) · (a_log ? −exp(a_log[i]) : 1), batches in order.
extern "C" __global__ void scan_reduce_batch_f32(const float* part, long batch, long m, float* dst,
                                                 const float* a_log) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < m; i += (long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (long b = 0; b < batch; ++b) acc += part[b * m + i];
        if (a_log) acc = acc * -expf(a_log[i]);
        dst[i] += acc;
    }
}
