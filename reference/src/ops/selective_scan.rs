//! The selective scan of Mamba-1 (Gu & Dao 2023, Algorithm 2), with the dt bias + softplus,
//! the D skip and the z gate fused in, as `mamba_ssm.selective_scan_fn(..., delta_softplus=True)`.
//!
//! Per batch `b`, channel `c`, state index `n`, position `t`:
//! ```text
//! dt_t  = softplus(delta[t, c] + delta_bias[c])
//! h_t   = exp(dt_t · A[c, n]) · h_{t−1} + (dt_t · u[t, c]) · B[t, n]     (h_{t−1} = 0 at a reset)
//! y_t   = (Σ_n C[t, n] · h_t[n]) + D[c] · u[t, c]
//! out_t = y_t · silu(z[t, c])                                            (when z is given)
//! ```
//! Shapes (batch-major): `u`, `delta`, `z`: `[batch, seq_len, d_inner]`; `A`: `[d_inner, d_state]`;
//! `B`, `C`: `[batch, seq_len, d_state]`; `D`, `delta_bias`: `[d_inner]`; `resets`:
//! `[batch, seq_len]`; `h0` and the final state: `[batch, d_inner, d_state]`.

use super::{doc_starts, reset_row};
use crate::float::{silu, silu_grad, softplus, softplus_grad, Float};

/// Shapes of a scan call.
#[derive(Clone, Copy, Debug)]
pub struct ScanDims {
    pub batch: usize,
    pub seq_len: usize,
    pub d_inner: usize,
    pub d_state: usize,
}

/// Inputs of the scan; see the module docs for shapes.
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<'a, T> {
    pub u: &'a [T],
    pub delta: &'a [T],
    pub a: &'a [T],
    pub b: &'a [T],
    pub c: &'a [T],
    pub d: &'a [T],
    pub z: Option<&'a [T]>,
    pub delta_bias: &'a [T],
    pub resets: Option<&'a [bool]>,
    pub h0: Option<&'a [T]>,
    pub dims: ScanDims,
}

/// Gradients of every scan input.
#[derive(Clone, Debug)]
pub struct ScanGrads<T> {
    pub u: Vec<T>,
    pub delta: Vec<T>,
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub c: Vec<T>,
    pub d: Vec<T>,
    pub z: Option<Vec<T>>,
    pub delta_bias: Vec<T>,
    pub h0: Vec<T>,
}

/// One (batch, channel) lane forward. Calls `visit(t, dt, h_t, y_t)` after every position.
fn lane_fwd<T: Float>(
    inp: &ScanInputs<T>,
    bi: usize,
    ch: usize,
    h: &mut [T],
    mut visit: impl FnMut(usize, T, &[T], T),
) {
    let ScanDims {
        seq_len,
        d_inner,
        d_state,
        ..
    } = inp.dims;
    let resets = reset_row(inp.resets, bi, seq_len);
    h.iter_mut().for_each(|v| *v = T::ZERO);
    if let (Some(h0), false) = (inp.h0, resets.is_some_and(|r| seq_len > 0 && r[0])) {
        h.copy_from_slice(&h0[(bi * d_inner + ch) * d_state..(bi * d_inner + ch + 1) * d_state]);
    }
    let a = &inp.a[ch * d_state..(ch + 1) * d_state];
    for t in 0..seq_len {
        if resets.is_some_and(|r| r[t]) {
            h.iter_mut().for_each(|v| *v = T::ZERO);
        }
        let row = bi * seq_len + t;
        let x = inp.u[row * d_inner + ch];
        let dt = softplus(inp.delta[row * d_inner + ch] + inp.delta_bias[ch]);
        let dtx = dt * x;
        let bt = &inp.b[row * d_state..(row + 1) * d_state];
        let ct = &inp.c[row * d_state..(row + 1) * d_state];
        let mut acc = T::ZERO;
        for n in 0..d_state {
            h[n] = (dt * a[n]).exp() * h[n] + dtx * bt[n];
            acc += ct[n] * h[n];
        }
        let y = acc + inp.d[ch] * x;
        visit(t, dt, h, y);
    }
}

/// Forward. Returns `out` `[batch, seq_len, d_inner]` and the final state
/// `[batch, d_inner, d_state]`.
pub fn selective_scan_fwd<T: Float>(inp: &ScanInputs<T>) -> (Vec<T>, Vec<T>) {
    let ScanDims {
        batch,
        seq_len,
        d_inner,
        d_state,
    } = inp.dims;
    let mut out = vec![T::ZERO; batch * seq_len * d_inner];
    let mut last = vec![T::ZERO; batch * d_inner * d_state];
    let mut h = vec![T::ZERO; d_state];
    for bi in 0..batch {
        for ch in 0..d_inner {
            lane_fwd(inp, bi, ch, &mut h, |t, _, _, y| {
                let i = (bi * seq_len + t) * d_inner + ch;
                out[i] = match inp.z {
                    Some(z) => y * silu(z[i]),
                    None => y,
                };
            });
            last[(bi * d_inner + ch) * d_state..(bi * d_inner + ch + 1) * d_state]
                .copy_from_slice(&h);
        }
    }
    (out, last)
}

/// Backward: recomputes the states lane by lane, then runs the recurrence in reverse.
/// `dout` is `[batch, seq_len, d_inner]`. The final state is not differentiated.
pub fn selective_scan_bwd<T: Float>(inp: &ScanInputs<T>, dout: &[T]) -> ScanGrads<T> {
    selective_scan_bwd_final(inp, dout, None)
}

/// [`selective_scan_bwd`] with `d_last` `[batch, d_inner, d_state]`, the gradient of the final
/// state (from later windows of the same rows), entering the reverse recurrence after the last
/// position.
pub fn selective_scan_bwd_final<T: Float>(
    inp: &ScanInputs<T>,
    dout: &[T],
    d_last: Option<&[T]>,
) -> ScanGrads<T> {
    let ScanDims {
        batch,
        seq_len,
        d_inner,
        d_state,
    } = inp.dims;
    let act = batch * seq_len * d_inner;
    let mut g = ScanGrads {
        u: vec![T::ZERO; act],
        delta: vec![T::ZERO; act],
        a: vec![T::ZERO; d_inner * d_state],
        b: vec![T::ZERO; batch * seq_len * d_state],
        c: vec![T::ZERO; batch * seq_len * d_state],
        d: vec![T::ZERO; d_inner],
        z: inp.z.map(|_| vec![T::ZERO; act]),
        delta_bias: vec![T::ZERO; d_inner],
        h0: vec![T::ZERO; batch * d_inner * d_state],
    };
    // Per lane: h_t for every t (index t + 1; index 0 is the state before position 0), dt, y.
    let mut hs = vec![T::ZERO; (seq_len + 1) * d_state];
    let mut dts = vec![T::ZERO; seq_len];
    let mut ys = vec![T::ZERO; seq_len];
    let mut h = vec![T::ZERO; d_state];
    let mut dh = vec![T::ZERO; d_state];
    for bi in 0..batch {
        let resets = reset_row(inp.resets, bi, seq_len);
        let starts = doc_starts(resets, seq_len);
        for ch in 0..d_inner {
            lane_fwd(inp, bi, ch, &mut h, |t, dt, ht, y| {
                hs[(t + 1) * d_state..(t + 2) * d_state].copy_from_slice(ht);
                dts[t] = dt;
                ys[t] = y;
            });
            hs[..d_state].fill(T::ZERO);
            if let (Some(h0), None) = (inp.h0, starts.first().copied().flatten()) {
                let o = (bi * d_inner + ch) * d_state;
                hs[..d_state].copy_from_slice(&h0[o..o + d_state]);
            }
            dh.fill(T::ZERO);
            if let Some(d) = d_last {
                let o = (bi * d_inner + ch) * d_state;
                dh.copy_from_slice(&d[o..o + d_state]);
            }
            lane_bwd(inp, &mut g, dout, bi, ch, &hs, &dts, &ys, &mut dh);
            if seq_len == 0 || starts[0].is_none() {
                let o = (bi * d_inner + ch) * d_state;
                g.h0[o..o + d_state].copy_from_slice(&dh);
            }
        }
    }
    g
}

/// Reverse recurrence of one lane from `dh`, the final state's gradient; leaves the gradient
/// w.r.t. the state before position 0 in `dh`.
#[allow(clippy::too_many_arguments)]
fn lane_bwd<T: Float>(
    inp: &ScanInputs<T>,
    g: &mut ScanGrads<T>,
    dout: &[T],
    bi: usize,
    ch: usize,
    hs: &[T],
    dts: &[T],
    ys: &[T],
    dh: &mut [T],
) {
    let ScanDims {
        seq_len,
        d_inner,
        d_state,
        ..
    } = inp.dims;
    let resets = reset_row(inp.resets, bi, seq_len);
    let a = &inp.a[ch * d_state..(ch + 1) * d_state];
    for t in (0..seq_len).rev() {
        let row = bi * seq_len + t;
        let i = row * d_inner + ch;
        let x = inp.u[i];
        let dt = dts[t];
        let dtx = dt * x;
        let dy = match (inp.z, g.z.as_mut()) {
            (Some(z), Some(gz)) => {
                gz[i] = dout[i] * ys[t] * silu_grad(z[i]);
                dout[i] * silu(z[i])
            }
            _ => dout[i],
        };
        g.d[ch] += dy * x;
        let mut dx = dy * inp.d[ch];
        let mut ddt = T::ZERO;
        let reset = resets.is_some_and(|r| r[t]);
        let ht = &hs[(t + 1) * d_state..(t + 2) * d_state];
        let hprev = &hs[t * d_state..(t + 1) * d_state];
        for n in 0..d_state {
            let bn = inp.b[row * d_state + n];
            let cn = inp.c[row * d_state + n];
            dh[n] += dy * cn;
            g.c[row * d_state + n] += dy * ht[n];
            let decay = (dt * a[n]).exp();
            let hp = if reset { T::ZERO } else { hprev[n] };
            let g_decay = dh[n] * hp * decay;
            ddt += g_decay * a[n];
            g.a[ch * d_state + n] += g_decay * dt;
            ddt += dh[n] * x * bn;
            dx += dh[n] * dt * bn;
            g.b[row * d_state + n] += dh[n] * dtx;
            dh[n] = if reset { T::ZERO } else { dh[n] * decay };
        }
        let ddelta = ddt * softplus_grad(inp.delta[i] + inp.delta_bias[ch]);
        g.delta[i] = ddelta;
        g.delta_bias[ch] += ddelta;
        g.u[i] = dx;
    }
}
