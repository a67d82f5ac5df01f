//! Backward of the selective scan (`reference::ops::selective_scan::selective_scan_bwd`),
//! eight channels per vector, tasks of [`CHUNK`] channels of one batch row on the pool.
//!
//! Each group of eight channels recomputes its states forward (keeping `h_t` and the decay
//! `exp(dt · A)` for every position), then runs the recurrence in reverse. Gradients that sum
//! over channels (`B`, `C` per position) are summed lane-wise over a task's groups, then across
//! lanes, then over tasks in channel order; those that sum over batch rows (`A`, `D`, the dt
//! bias) are summed over tasks in batch order. Tasks are fixed by the shapes, never by the
//! thread count, so the result is the same bits for every pool size.

use rayon::prelude::*;
use rayon::ThreadPool;
use reference::ops::doc_starts;
use wide::f32x8;

use super::lanes::Lanes;
use super::Scan;
use crate::ops::Shared;
use crate::vecmath::{load, silu_and_grad8, softplus8, softplus_grad8, store, LANES};

/// Channels per task.
const CHUNK: usize = 64;

/// Inputs: the forward's [`Scan`] plus the initial state (`[batch, d_inner, d_state]`).
#[derive(Clone, Copy)]
pub(crate) struct ScanBwdInputs<'a> {
    pub scan: Scan<'a>,
    pub h0: Option<&'a [f32]>,
    /// The final state's gradient (`[batch, d_inner, d_state]`, from later windows of the same
    /// rows), entering the reverse recurrence after the last position.
    pub d_last: Option<&'a [f32]>,
    /// Use the portable `wide` lanes even where the CPU has AVX2 (to test that path).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub portable: bool,
}

impl<'a> std::ops::Deref for ScanBwdInputs<'a> {
    type Target = Scan<'a>;
    fn deref(&self) -> &Scan<'a> {
        &self.scan
    }
}

/// Gradients of every scan input (`reference::ops::selective_scan::ScanGrads`).
pub(crate) struct ScanBwdGrads {
    pub u: Vec<f32>,
    pub delta: Vec<f32>,
    pub z: Vec<f32>,
    /// `[batch * seq_len, d_state]`
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    /// `[d_inner, d_state]`
    pub a: Vec<f32>,
    pub d: Vec<f32>,
    pub delta_bias: Vec<f32>,
    /// `[batch, d_inner, d_state]`
    pub h0: Vec<f32>,
}

/// What one task sums over its channels / adds for its channels.
struct TaskOut {
    /// `[seq_len, d_state]` each, summed over the task's channels.
    b: Vec<f32>,
    c: Vec<f32>,
    /// `[channels, d_state]`, `[channels]`, `[channels]`.
    a: Vec<f32>,
    d: Vec<f32>,
    delta_bias: Vec<f32>,
}

/// Per-group scratch: states, decays and lane-wise `B` / `C` gradient sums.
struct Scratch<L> {
    hs: Vec<L>,
    decay: Vec<L>,
    dts: Vec<f32x8>,
    ys: Vec<f32x8>,
    db: Vec<L>,
    dc: Vec<L>,
}

/// Backward of the scan; `dout` is `[batch, seq_len, d_inner]`.
pub(crate) fn selective_scan_bwd(
    pool: &ThreadPool,
    inp: &ScanBwdInputs,
    dout: &[f32],
) -> ScanBwdGrads {
    let (batch, seq_len, di, ds) = (inp.batch, inp.seq_len, inp.d_inner, inp.d_state);
    let act = batch * seq_len * di;
    let mut g = ScanBwdGrads {
        u: vec![0.0; act],
        delta: vec![0.0; act],
        z: vec![0.0; act],
        b: vec![0.0; batch * seq_len * ds],
        c: vec![0.0; batch * seq_len * ds],
        a: vec![0.0; di * ds],
        d: vec![0.0; di],
        delta_bias: vec![0.0; di],
        h0: vec![0.0; batch * di * ds],
    };
    let chunks = di.div_ceil(CHUNK);
    let outs = {
        let (su, sdelta, sz, sh0) = (
            Shared::new(&mut g.u),
            Shared::new(&mut g.delta),
            Shared::new(&mut g.z),
            Shared::new(&mut g.h0),
        );
        pool.install(|| {
            (0..batch * chunks)
                .into_par_iter()
                .map(|task| {
                    let (bi, k) = (task / chunks, task % chunks);
                    let c0 = k * CHUNK;
                    let c1 = (c0 + CHUNK).min(di);
                    // SAFETY: task (bi, k) writes only rows of batch row `bi`, channels
                    // c0..c1 of `u`, `delta`, `z` and `h0`; no two tasks share (bi, k).
                    unsafe { chunk_bwd(inp, dout, bi, c0, c1, [su, sdelta, sz, sh0]) }
                })
                .collect::<Vec<TaskOut>>()
        })
    };
    for (task, o) in outs.iter().enumerate() {
        let (bi, k) = (task / chunks, task % chunks);
        let rows = bi * seq_len * ds..(bi + 1) * seq_len * ds;
        for (acc, v) in g.b[rows.clone()].iter_mut().zip(&o.b) {
            *acc += v;
        }
        for (acc, v) in g.c[rows].iter_mut().zip(&o.c) {
            *acc += v;
        }
        let c0 = k * CHUNK;
        let nch = o.d.len();
        for (acc, v) in g.a[c0 * ds..(c0 + nch) * ds].iter_mut().zip(&o.a) {
            *acc += v;
        }
        for (acc, v) in g.d[c0..c0 + nch].iter_mut().zip(&o.d) {
            *acc += v;
        }
        for (acc, v) in g.delta_bias[c0..c0 + nch].iter_mut().zip(&o.delta_bias) {
            *acc += v;
        }
    }
    g
}

/// Channels `c0..c1` of batch row `bi`, eight at a time: in 256-bit AVX registers where the
/// CPU has AVX2, else in `wide` vectors.
///
/// # Safety
/// No other thread may access, while this runs, row `bi`'s channels `c0..c1` of the buffers
/// behind `out` = `[u, delta, z, h0]` (`[batch, seq_len, d_inner]` ×3, `[batch, d_inner,
/// d_state]`).
unsafe fn chunk_bwd(
    inp: &ScanBwdInputs,
    dout: &[f32],
    bi: usize,
    c0: usize,
    c1: usize,
    out: [Shared; 4],
) -> TaskOut {
    #[cfg(target_arch = "x86_64")]
    if !inp.portable && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above); the caller's contract is passed on.
        return unsafe { chunk_bwd_avx2(inp, dout, bi, c0, c1, out) };
    }
    // SAFETY: the caller's contract is passed on.
    unsafe { chunk_bwd_impl::<f32x8>(inp, dout, bi, c0, c1, out) }
}

/// [`chunk_bwd_impl`] on [`super::lanes::Avx8`], compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2, and the contract of [`chunk_bwd`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chunk_bwd_avx2(
    inp: &ScanBwdInputs,
    dout: &[f32],
    bi: usize,
    c0: usize,
    c1: usize,
    out: [Shared; 4],
) -> TaskOut {
    // SAFETY: the caller's contract is passed on; AVX2 is present for `Avx8`.
    unsafe { chunk_bwd_impl::<super::lanes::Avx8>(inp, dout, bi, c0, c1, out) }
}

/// The body of [`chunk_bwd`] on lanes `L`, inlined into each instruction-set variant.
///
/// # Safety
/// As [`chunk_bwd`].
#[inline(always)]
unsafe fn chunk_bwd_impl<L: Lanes>(
    inp: &ScanBwdInputs,
    dout: &[f32],
    bi: usize,
    c0: usize,
    c1: usize,
    out: [Shared; 4],
) -> TaskOut {
    let (seq_len, ds) = (inp.seq_len, inp.d_state);
    let nch = c1 - c0;
    let mut o = TaskOut {
        b: vec![0.0; seq_len * ds],
        c: vec![0.0; seq_len * ds],
        a: vec![0.0; nch * ds],
        d: vec![0.0; nch],
        delta_bias: vec![0.0; nch],
    };
    let (z8, zl) = (f32x8::ZERO, L::zero());
    let mut s = Scratch {
        hs: vec![zl; (seq_len + 1) * ds],
        decay: vec![zl; seq_len * ds],
        dts: vec![z8; seq_len],
        ys: vec![z8; seq_len],
        db: vec![zl; seq_len * ds],
        dc: vec![zl; seq_len * ds],
    };
    let resets = inp.resets.map(|r| &r[bi * seq_len..(bi + 1) * seq_len]);
    let starts = doc_starts(resets, seq_len);
    let h0_visible = inp.h0.is_some() && starts.first().is_none_or(|s| s.is_none());
    let mut cg = c0;
    while cg < c1 {
        let w = LANES.min(c1 - cg);
        group_fwd(inp, bi, cg, w, resets, h0_visible, &mut s);
        // SAFETY: channels cg..cg + w lie in c0..c1 (caller's contract).
        unsafe { group_bwd(inp, dout, bi, cg, w, c0, resets, &mut s, &mut o, out) };
        cg += w;
    }
    // Lane sums of the B / C gradients, lanes in increasing channel order.
    for (dst, src) in o.b.iter_mut().zip(&s.db) {
        *dst = src.to_array().iter().sum();
    }
    for (dst, src) in o.c.iter_mut().zip(&s.dc) {
        *dst = src.to_array().iter().sum();
    }
    o
}

/// `A[c, n]` for channels `cg..cg + w`, one vector per `n` (zero lanes past `w`).
#[inline(always)]
fn a_lanes<L: Lanes>(inp: &ScanBwdInputs, cg: usize, w: usize) -> Vec<L> {
    let ds = inp.d_state;
    (0..ds)
        .map(|n| {
            let mut v = [0f32; LANES];
            for (l, x) in v.iter_mut().take(w).enumerate() {
                *x = inp.a[(cg + l) * ds + n];
            }
            L::from_wide(f32x8::from(v))
        })
        .collect()
}

/// Forward recompute of one group: `hs[t + 1] = h_t`, `hs[0]` = the state before position 0,
/// `decay[t] = exp(dt_t · A)`, `dts[t]`, `ys[t]` (the ungated output).
#[inline(always)]
fn group_fwd<L: Lanes>(
    inp: &ScanBwdInputs,
    bi: usize,
    cg: usize,
    w: usize,
    resets: Option<&[bool]>,
    h0_visible: bool,
    s: &mut Scratch<L>,
) {
    let (seq_len, di, ds) = (inp.seq_len, inp.d_inner, inp.d_state);
    let a: Vec<L> = a_lanes(inp, cg, w);
    let dvec = load(inp.d, cg, w);
    let bias = load(inp.delta_bias, cg, w);
    for n in 0..ds {
        let mut v = [0f32; LANES];
        if let (true, Some(h0)) = (h0_visible, inp.h0) {
            for (l, x) in v.iter_mut().take(w).enumerate() {
                *x = h0[(bi * di + cg + l) * ds + n];
            }
        }
        s.hs[n] = L::from_wide(f32x8::from(v));
    }
    for t in 0..seq_len {
        let row = bi * seq_len + t;
        let reset = resets.is_some_and(|r| r[t]);
        let x = load(inp.u, row * di + cg, w);
        let dt = softplus8(load(inp.delta, row * di + cg, w) + bias);
        let (dtv, dtx) = (L::from_wide(dt), L::from_wide(dt * x));
        let bt = &inp.b[row * ds..(row + 1) * ds];
        let ct = &inp.c[row * ds..(row + 1) * ds];
        let (prev, cur) = s.hs[t * ds..(t + 2) * ds].split_at_mut(ds);
        let decay = &mut s.decay[t * ds..(t + 1) * ds];
        let mut acc = L::zero();
        for n in 0..ds {
            let dec = (dtv * a[n]).exp();
            let hp = if reset { L::zero() } else { prev[n] };
            let h = dec * hp + dtx * L::splat(bt[n]);
            cur[n] = h;
            decay[n] = dec;
            acc += L::splat(ct[n]) * h;
        }
        s.dts[t] = dt;
        s.ys[t] = acc.to_wide() + dvec * x;
    }
}

/// Reverse recurrence of one group; adds to the task's sums in `o` and writes `u`, `delta`,
/// `z` and (unless row `bi` resets at position 0) `h0` gradients through `out`.
///
/// # Safety
/// As [`chunk_bwd`], for channels `cg..cg + w`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn group_bwd<L: Lanes>(
    inp: &ScanBwdInputs,
    dout: &[f32],
    bi: usize,
    cg: usize,
    w: usize,
    c0: usize,
    resets: Option<&[bool]>,
    s: &mut Scratch<L>,
    o: &mut TaskOut,
    out: [Shared; 4],
) {
    let (seq_len, di, ds) = (inp.seq_len, inp.d_inner, inp.d_state);
    let [su, sdelta, sz, sh0] = out;
    let a: Vec<L> = a_lanes(inp, cg, w);
    let dvec = load(inp.d, cg, w);
    let bias = load(inp.delta_bias, cg, w);
    let mut dh = match inp.d_last {
        Some(d) => (0..ds)
            .map(|n| {
                let mut v = [0f32; LANES];
                for (l, x) in v.iter_mut().take(w).enumerate() {
                    *x = d[(bi * di + cg + l) * ds + n];
                }
                L::from_wide(f32x8::from(v))
            })
            .collect(),
        None => vec![L::zero(); ds],
    };
    let mut ga = vec![L::zero(); ds];
    let mut gd = f32x8::ZERO;
    let mut gbias = f32x8::ZERO;
    for t in (0..seq_len).rev() {
        let row = bi * seq_len + t;
        let i = row * di + cg;
        let reset = resets.is_some_and(|r| r[t]);
        let x = load(inp.u, i, w);
        let dt = s.dts[t];
        let dtx = dt * x;
        let g_out = load(dout, i, w);
        let (sz_v, sz_g) = silu_and_grad8(load(inp.z, i, w));
        let dy = g_out * sz_v;
        // SAFETY: (row, cg..cg + w) lies in this task's block (caller's contract).
        store(g_out * s.ys[t] * sz_g, unsafe { sz.slice_mut(i, w) }, 0, w);
        gd += dy * x;
        let (dyv, xv) = (L::from_wide(dy), L::from_wide(x));
        let (dtv, dtxv) = (L::from_wide(dt), L::from_wide(dtx));
        let mut dx = L::from_wide(dy * dvec);
        let mut ddt = L::zero();
        let bt = &inp.b[row * ds..(row + 1) * ds];
        let ct = &inp.c[row * ds..(row + 1) * ds];
        let ht = &s.hs[(t + 1) * ds..(t + 2) * ds];
        let hprev = &s.hs[t * ds..(t + 1) * ds];
        let decay = &s.decay[t * ds..(t + 1) * ds];
        let db = &mut s.db[t * ds..(t + 1) * ds];
        let dc = &mut s.dc[t * ds..(t + 1) * ds];
        for n in 0..ds {
            let bn = L::splat(bt[n]);
            let mut d = dh[n] + dyv * L::splat(ct[n]);
            dc[n] += dyv * ht[n];
            if !reset {
                let g_decay = d * hprev[n] * decay[n];
                ddt += g_decay * a[n];
                ga[n] += g_decay * dtv;
            }
            ddt += d * xv * bn;
            dx += d * dtv * bn;
            db[n] += d * dtxv;
            d = if reset { L::zero() } else { d * decay[n] };
            dh[n] = d;
        }
        let (ddt, dx) = (ddt.to_wide(), dx.to_wide());
        let ddelta = ddt * softplus_grad8(load(inp.delta, i, w) + bias);
        gbias += ddelta;
        // SAFETY: as above.
        unsafe {
            store(ddelta, sdelta.slice_mut(i, w), 0, w);
            store(dx, su.slice_mut(i, w), 0, w);
        }
    }
    let resets_at_0 = seq_len > 0 && resets.is_some_and(|r| r[0]);
    if !resets_at_0 {
        for (n, d) in dh.iter().enumerate() {
            for (l, &x) in d.to_array().iter().take(w).enumerate() {
                // SAFETY: (bi, cg + l) is one of this task's lanes.
                unsafe { sh0.slice_mut((bi * di + cg + l) * ds + n, 1)[0] = x };
            }
        }
    }
    let lo = cg - c0;
    for (n, g) in ga.iter().enumerate() {
        for (l, &x) in g.to_array().iter().take(w).enumerate() {
            o.a[(lo + l) * ds + n] += x;
        }
    }
    store(gd, &mut o.d, lo, w);
    store(gbias, &mut o.delta_bias, lo, w);
}

#[cfg(test)]
mod tests {
    use super::*;
    use reference::ops::selective_scan::{selective_scan_bwd as ref_bwd, ScanDims, ScanInputs};

    /// Deterministic values in [lo, hi).
    fn vals(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    fn rel(got: &[f32], want: &[f32]) -> f64 {
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// Both lane paths (portable `wide`, and AVX2 where present) against the reference scan
    /// backward, with resets, an initial state, a partial lane group and two channel blocks.
    #[test]
    fn both_lane_paths_match_the_reference() {
        let (batch, seq_len, di, ds) = (2, 37, 75, 5);
        let act = batch * seq_len * di;
        let u = vals(act, 1, -2.0, 2.0);
        let delta = vals(act, 2, -1.5, 1.0);
        let a: Vec<f32> = vals(di * ds, 3, 0.0, 2.5)
            .iter()
            .map(|v| -v.exp())
            .collect();
        let b = vals(batch * seq_len * ds, 4, -1.0, 1.0);
        let c = vals(batch * seq_len * ds, 5, -1.0, 1.0);
        let d = vals(di, 6, 0.5, 1.5);
        let z = vals(act, 7, -3.0, 3.0);
        let delta_bias = vals(di, 8, -1.0, 1.0);
        let h0 = vals(batch * di * ds, 9, -1.0, 1.0);
        let dout = vals(act, 10, -1.0, 1.0);
        let mut resets = vec![false; batch * seq_len];
        resets[5] = true;
        resets[seq_len] = true; // row 1 resets at position 0: its h0 gradient is zero
        resets[seq_len + 20] = true;
        let want = ref_bwd(
            &ScanInputs {
                u: &u,
                delta: &delta,
                a: &a,
                b: &b,
                c: &c,
                d: &d,
                z: Some(&z),
                delta_bias: &delta_bias,
                resets: Some(&resets),
                h0: Some(&h0),
                dims: ScanDims {
                    batch,
                    seq_len,
                    d_inner: di,
                    d_state: ds,
                },
            },
            &dout,
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for portable in [true, false] {
            let inp = ScanBwdInputs {
                scan: Scan {
                    u: &u,
                    delta: &delta,
                    a: &a,
                    b: &b,
                    c: &c,
                    d: &d,
                    z: &z,
                    delta_bias: &delta_bias,
                    resets: Some(&resets),
                    batch,
                    seq_len,
                    d_inner: di,
                    d_state: ds,
                },
                h0: Some(&h0),
                d_last: None,
                portable,
            };
            let g = selective_scan_bwd(&pool, &inp, &dout);
            let wz = want.z.as_deref().unwrap_or(&[]);
            for (name, got, w) in [
                ("u", &g.u[..], &want.u[..]),
                ("delta", &g.delta, &want.delta),
                ("z", &g.z, wz),
                ("B", &g.b, &want.b),
                ("C", &g.c, &want.c),
                ("A", &g.a, &want.a),
                ("D", &g.d, &want.d),
                ("delta_bias", &g.delta_bias, &want.delta_bias),
                ("h0", &g.h0, &want.h0),
            ] {
                let e = rel(got, w);
                assert!(
                    e < 1e-5,
                    "portable {portable}: grad {name} relative error {e:.3e}"
                );
            }
        }
    }
}
