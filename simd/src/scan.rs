//! The selective scan, vectorised across channels: eight channels of one row advance together,
//! each lane holding its own `h[n]` for every state index, so `y = Σ_n C[n]·h[n]` needs no
//! horizontal sums and `B[t, n]`, `C[t, n]` are broadcasts. Work is split over (batch row,
//! 8-channel block) pairs on the thread pool. Same maths as `reference::ops::selective_scan`
//! (dt bias + softplus, D skip, z gate, per-position resets, initial state).

use rayon::prelude::*;
use wide::f32x8;

use crate::vecmath::{load, silu8, softplus8};
use crate::SyncPtr;

/// Lanes kept on the stack; larger `d_state` falls back to the heap.
const STACK_STATES: usize = 64;

/// Shapes and inputs (batch-major, as in `reference`): `u`, `delta`, `z`: `[batch, seq_len,
/// d_inner]`; `a` (= −exp(A_log)): `[d_inner, d_state]`; `b`, `c`: `[batch, seq_len, d_state]`;
/// `d`, `delta_bias`: `[d_inner]`; `resets`: `[batch, seq_len]`.
#[derive(Clone, Copy)]
pub struct Scan<'a> {
    pub u: &'a [f32],
    pub delta: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub d: &'a [f32],
    pub z: &'a [f32],
    pub delta_bias: &'a [f32],
    pub resets: Option<&'a [bool]>,
    pub batch: usize,
    pub seq_len: usize,
    pub d_inner: usize,
    pub d_state: usize,
}

/// Runs the scan. `h` `[batch, d_inner, d_state]` holds the initial state on entry (zeros for
/// none) and the final state on return; `out` `[batch, seq_len, d_inner]` receives the gated
/// output.
pub fn scan_fwd(s: &Scan, h: &mut [f32], out: &mut [f32]) {
    let blocks = s.d_inner.div_ceil(8);
    assert_eq!(
        h.len(),
        s.batch * s.d_inner * s.d_state,
        "scan state length"
    );
    assert_eq!(
        out.len(),
        s.batch * s.seq_len * s.d_inner,
        "scan output length"
    );
    let hp = SyncPtr(h.as_mut_ptr());
    let op = SyncPtr(out.as_mut_ptr());
    let work = s.seq_len * s.d_inner * s.d_state;
    // Task `i` touches only the channels of block `i % blocks` of batch row `i / blocks`, in
    // both `h` and `out`: no two tasks share an element.
    let task = |i: usize| lane_block(s, i / blocks, (i % blocks) * 8, hp, op);
    if work * s.batch < 1 << 15 || rayon::current_num_threads() == 1 {
        (0..s.batch * blocks).for_each(task);
    } else {
        (0..s.batch * blocks).into_par_iter().for_each(task);
    }
}

fn lane_block(s: &Scan, bi: usize, c0: usize, h: SyncPtr<f32>, out: SyncPtr<f32>) {
    let ds = s.d_state;
    if ds <= STACK_STATES {
        let mut hv = [f32x8::ZERO; STACK_STATES];
        let mut av = [f32x8::ZERO; STACK_STATES];
        lanes(s, bi, c0, h, out, &mut hv[..ds], &mut av[..ds]);
    } else {
        let mut hv = vec![f32x8::ZERO; ds];
        let mut av = vec![f32x8::ZERO; ds];
        lanes(s, bi, c0, h, out, &mut hv, &mut av);
    }
}

#[inline(always)]
fn lanes(
    s: &Scan,
    bi: usize,
    c0: usize,
    h: SyncPtr<f32>,
    out: SyncPtr<f32>,
    hv: &mut [f32x8],
    av: &mut [f32x8],
) {
    let (di, ds, l) = (s.d_inner, s.d_state, s.seq_len);
    let w = (di - c0).min(8);
    // Transpose this block's A and h into lanes: lane `k` is channel `c0 + k`.
    for n in 0..ds {
        let mut a = [0f32; 8];
        let mut hh = [0f32; 8];
        for k in 0..w {
            a[k] = s.a[(c0 + k) * ds + n];
            // SAFETY: in bounds (asserted lengths) and owned by this block.
            hh[k] = unsafe { h.read((bi * di + c0 + k) * ds + n) };
        }
        av[n] = f32x8::from(a);
        hv[n] = f32x8::from(hh);
    }
    let dv = load(s.d, c0, w);
    let bias = load(s.delta_bias, c0, w);
    let resets = s.resets.map(|r| &r[bi * l..(bi + 1) * l]);
    for t in 0..l {
        if resets.is_some_and(|r| r[t]) {
            hv.iter_mut().for_each(|v| *v = f32x8::ZERO);
        }
        let row = bi * l + t;
        let i = row * di + c0;
        let x = load(s.u, i, w);
        let dt = softplus8(load(s.delta, i, w) + bias);
        let dtx = dt * x;
        let bt = &s.b[row * ds..(row + 1) * ds];
        let ct = &s.c[row * ds..(row + 1) * ds];
        let mut acc = f32x8::ZERO;
        for n in 0..ds {
            let decay = (dt * av[n]).exp();
            hv[n] = decay * hv[n] + dtx * f32x8::splat(bt[n]);
            acc += f32x8::splat(ct[n]) * hv[n];
        }
        let y = acc + dv * x;
        let g = (y * silu8(load(s.z, i, w))).to_array();
        // SAFETY: `i..i + w` is in bounds and these channels belong to this block.
        unsafe { out.write_slice(i, &g[..w]) };
    }
    for (n, v) in hv.iter().enumerate() {
        let a = v.to_array();
        for (k, &val) in a.iter().enumerate().take(w) {
            // SAFETY: as above.
            unsafe { h.write((bi * di + c0 + k) * ds + n, val) };
        }
    }
}
