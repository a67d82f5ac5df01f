//! Causal depthwise conv1d with per-position document resets and an initial window.
//!
//! For channel `c` at position `t`, with `K = d_conv`:
//! `u[t, c] = (Σ_{k<K} w[c, k] · v(t − (K−1) + k)) + bias[c]`, summed in increasing `k`, where
//! `v(p)` is `x[p, c]` for positions of the same document, the initial window
//! `state[c, (K−1) + p]` for `p < 0` when the row has not been reset since position 0, and 0
//! otherwise (left zero padding, as in `nn.Conv1d(padding = K − 1)` truncated to `L`).

use super::{doc_starts, reset_row};
use crate::float::Float;

/// Shapes of a conv call.
#[derive(Clone, Copy, Debug)]
pub struct ConvDims {
    pub batch: usize,
    pub seq_len: usize,
    pub d_inner: usize,
    pub d_conv: usize,
}

/// Value the window sees at position `p` (relative to the row start) for a document starting
/// at `start`. `x_row` is `[seq_len, d_inner]`, `init` is `[d_inner, d_conv - 1]`.
#[inline]
fn visible<T: Float>(
    p: isize,
    start: Option<usize>,
    c: usize,
    x_row: &[T],
    init: Option<&[T]>,
    dims: &ConvDims,
) -> T {
    let km1 = dims.d_conv - 1;
    if p >= 0 {
        let p = p as usize;
        if start.is_none_or(|s| p >= s) {
            x_row[p * dims.d_inner + c]
        } else {
            T::ZERO
        }
    } else {
        match (start, init) {
            (None, Some(init)) => init[c * km1 + (km1 as isize + p) as usize],
            _ => T::ZERO,
        }
    }
}

/// `x` `[batch, seq_len, d_inner]`, `w` `[d_inner, d_conv]`, `bias` `[d_inner]`, `resets`
/// `[batch, seq_len]`, `init` `[batch, d_inner, d_conv − 1]`. Returns the pre-activation
/// `u` `[batch, seq_len, d_inner]` and the window after the last position
/// `[batch, d_inner, d_conv − 1]`.
pub fn conv1d_fwd<T: Float>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    resets: Option<&[bool]>,
    init: Option<&[T]>,
    dims: ConvDims,
) -> (Vec<T>, Vec<T>) {
    let ConvDims {
        batch,
        seq_len,
        d_inner,
        d_conv,
    } = dims;
    let km1 = d_conv - 1;
    let mut u = vec![T::ZERO; batch * seq_len * d_inner];
    let mut last = vec![T::ZERO; batch * d_inner * km1];
    for b in 0..batch {
        let starts = doc_starts(reset_row(resets, b, seq_len), seq_len);
        let x_row = &x[b * seq_len * d_inner..(b + 1) * seq_len * d_inner];
        let init_b = init.map(|s| &s[b * d_inner * km1..(b + 1) * d_inner * km1]);
        for t in 0..seq_len {
            for c in 0..d_inner {
                let mut acc = T::ZERO;
                for k in 0..d_conv {
                    let p = t as isize - km1 as isize + k as isize;
                    acc += w[c * d_conv + k] * visible(p, starts[t], c, x_row, init_b, &dims);
                }
                if let Some(bias) = bias {
                    acc += bias[c];
                }
                u[(b * seq_len + t) * d_inner + c] = acc;
            }
        }
        // The window a position `seq_len` of the last document would see.
        let start = if seq_len > 0 {
            starts[seq_len - 1]
        } else {
            None
        };
        for c in 0..d_inner {
            for j in 0..km1 {
                let p = seq_len as isize - km1 as isize + j as isize;
                last[(b * d_inner + c) * km1 + j] = visible(p, start, c, x_row, init_b, &dims);
            }
        }
    }
    (u, last)
}

/// Backward of [`conv1d_fwd`] (gradients flow only from `u`; the final window is not
/// differentiated). Accumulates `grad_w` and `grad_bias`; returns `dx` `[batch, seq_len,
/// d_inner]` and the initial window's gradient `[batch, d_inner, d_conv − 1]`.
#[allow(clippy::too_many_arguments)]
pub fn conv1d_bwd<T: Float>(
    x: &[T],
    w: &[T],
    du: &[T],
    resets: Option<&[bool]>,
    init: Option<&[T]>,
    dims: ConvDims,
    grad_w: &mut [T],
    mut grad_bias: Option<&mut [T]>,
) -> (Vec<T>, Vec<T>) {
    let ConvDims {
        batch,
        seq_len,
        d_inner,
        d_conv,
    } = dims;
    let km1 = d_conv - 1;
    let mut dx = vec![T::ZERO; batch * seq_len * d_inner];
    let mut dinit = vec![T::ZERO; batch * d_inner * km1];
    for b in 0..batch {
        let starts = doc_starts(reset_row(resets, b, seq_len), seq_len);
        let x_row = &x[b * seq_len * d_inner..(b + 1) * seq_len * d_inner];
        let init_b = init.map(|s| &s[b * d_inner * km1..(b + 1) * d_inner * km1]);
        for t in 0..seq_len {
            for c in 0..d_inner {
                let g = du[(b * seq_len + t) * d_inner + c];
                if let Some(gb) = grad_bias.as_deref_mut() {
                    gb[c] += g;
                }
                for k in 0..d_conv {
                    let p = t as isize - km1 as isize + k as isize;
                    let v = visible(p, starts[t], c, x_row, init_b, &dims);
                    grad_w[c * d_conv + k] += g * v;
                    let wk = w[c * d_conv + k];
                    if p >= 0 {
                        let pu = p as usize;
                        if starts[t].is_none_or(|s| pu >= s) {
                            dx[(b * seq_len + pu) * d_inner + c] += wk * g;
                        }
                    } else if starts[t].is_none() {
                        dinit[(b * d_inner + c) * km1 + (km1 as isize + p) as usize] += wk * g;
                    }
                }
            }
        }
    }
    (dx, dinit)
}

/// Backward of the final window [`conv1d_fwd`] returns: adds `d_last`
/// `[batch, d_inner, d_conv − 1]` (its gradient, from later windows of the same rows) into `dx`
/// `[batch, seq_len, d_inner]` where the window holds this call's inputs, and into `dinit`
/// `[batch, d_inner, d_conv − 1]` where it still holds the initial window.
pub fn conv1d_last_bwd<T: Float>(
    d_last: &[T],
    resets: Option<&[bool]>,
    dims: ConvDims,
    dx: &mut [T],
    dinit: &mut [T],
) {
    let ConvDims {
        batch,
        seq_len,
        d_inner,
        d_conv,
    } = dims;
    let km1 = d_conv - 1;
    for b in 0..batch {
        let starts = doc_starts(reset_row(resets, b, seq_len), seq_len);
        let start = if seq_len > 0 {
            starts[seq_len - 1]
        } else {
            None
        };
        for c in 0..d_inner {
            for j in 0..km1 {
                let g = d_last[(b * d_inner + c) * km1 + j];
                let p = seq_len as isize - km1 as isize + j as isize;
                if p >= 0 {
                    let p = p as usize;
                    if start.is_none_or(|s| p >= s) {
                        dx[(b * seq_len + p) * d_inner + c] += g;
                    }
                } else if start.is_none() {
                    dinit[(b * d_inner + c) * km1 + (km1 as isize + p) as usize] += g;
                }
            }
        }
    }
}
