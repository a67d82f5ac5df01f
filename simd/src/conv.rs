//! Causal depthwise conv1d over a sequence (rows in parallel) and its one-token update, with
//! the same visibility rules as `reference::ops::conv1d`: a reset hides everything before the
//! document start, and the initial window is seen only by rows not reset since position 0.

use rayon::prelude::*;
use reference::ops::doc_starts;

/// `x` `[batch, seq_len, d_inner]`, `w` `[d_inner, d_conv]`, `init` `[batch, d_inner,
/// d_conv − 1]`. Writes the pre-activation `u` (same shape as `x`) and the window after the
/// last position into `last` `[batch, d_inner, d_conv − 1]`.
#[allow(clippy::too_many_arguments)]
pub fn conv_fwd(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    resets: Option<&[bool]>,
    init: Option<&[f32]>,
    (batch, seq_len, di, dc): (usize, usize, usize, usize),
    u: &mut [f32],
    last: &mut [f32],
) {
    let km1 = dc - 1;
    // Tap-major weights so that the inner loop runs over contiguous channels.
    let mut wt = vec![0f32; dc * di];
    for c in 0..di {
        for k in 0..dc {
            wt[k * di + c] = w[c * dc + k];
        }
    }
    let starts: Vec<Vec<Option<usize>>> = (0..batch)
        .map(|b| doc_starts(resets.map(|r| &r[b * seq_len..(b + 1) * seq_len]), seq_len))
        .collect();
    let row = |(i, ur): (usize, &mut [f32])| {
        let (b, t) = (i / seq_len, i % seq_len);
        match bias {
            Some(bs) => ur.copy_from_slice(bs),
            None => ur.fill(0.0),
        }
        let start = starts[b][t];
        for k in 0..dc {
            let p = t as isize - km1 as isize + k as isize;
            let wk = &wt[k * di..(k + 1) * di];
            if p >= 0 && start.is_none_or(|s| p as usize >= s) {
                let xr = &x[(b * seq_len + p as usize) * di..][..di];
                for ((u, &w), &xv) in ur.iter_mut().zip(wk).zip(xr) {
                    *u += w * xv;
                }
            } else if let (true, None, Some(init)) = (p < 0, start, init) {
                let j = (km1 as isize + p) as usize;
                for c in 0..di {
                    ur[c] += wk[c] * init[(b * di + c) * km1 + j];
                }
            }
        }
    };
    if batch * seq_len * di * dc < 1 << 15 || crate::threads() == 1 {
        u.chunks_mut(di).enumerate().for_each(row);
    } else {
        u.par_chunks_mut(di).enumerate().for_each(row);
    }
    for b in 0..batch {
        let start = if seq_len > 0 {
            starts[b][seq_len - 1]
        } else {
            None
        };
        for c in 0..di {
            for j in 0..km1 {
                let p = seq_len as isize - km1 as isize + j as isize;
                let v = if p >= 0 && start.is_none_or(|s| p as usize >= s) {
                    x[(b * seq_len + p as usize) * di + c]
                } else if let (true, None, Some(init)) = (p < 0, start, init) {
                    init[(b * di + c) * km1 + (km1 as isize + p) as usize]
                } else {
                    0.0
                };
                last[(b * di + c) * km1 + j] = v;
            }
        }
    }
}

/// One token per batch row: `x` `[batch, d_inner]`, `window` `[batch, d_inner, d_conv − 1]`
/// (updated in place: shifted left, `x` appended), `u` `[batch, d_inner]`. `resets[b]`
/// empties row `b`'s window first. Allocates nothing.
pub fn conv_step(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    resets: Option<&[bool]>,
    window: &mut [f32],
    (batch, di, dc): (usize, usize, usize),
    u: &mut [f32],
) {
    let km1 = dc - 1;
    for b in 0..batch {
        let reset = resets.is_some_and(|r| r[b]);
        for c in 0..di {
            let win = &mut window[(b * di + c) * km1..(b * di + c + 1) * km1];
            if reset {
                win.fill(0.0);
            }
            let wc = &w[c * dc..(c + 1) * dc];
            let mut acc = bias.map_or(0.0, |bs| bs[c]);
            for k in 0..km1 {
                acc += wc[k] * win[k];
            }
            let xv = x[b * di + c];
            acc += wc[km1] * xv;
            u[b * di + c] = acc;
            if km1 > 0 {
                win.copy_within(1.., 0);
                win[km1 - 1] = xv;
            }
        }
    }
}
