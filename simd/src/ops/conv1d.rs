//! Causal depthwise conv1d, the fast CPU twin of `reference::ops::conv1d`: the forward over a
//! sequence (rows in parallel), its one-token update, and the backward. Same visibility rules
//! as the reference: a reset hides everything before the document start, and the initial
//! window is seen only by rows not reset since position 0.
//!
//! The backward runs tasks of [`CHUNK`] channels on the pool; the inner loops run across
//! contiguous channels. A channel's weight and bias gradients are summed by one task only, so
//! the result does not depend on the thread count.

use rayon::prelude::*;
use rayon::ThreadPool;
use reference::ops::doc_starts;

use crate::ops::Shared;

/// Channels per task of the backward.
const CHUNK: usize = 64;

/// `x` `[batch, seq_len, d_inner]`, `w` `[d_inner, d_conv]`, `init` `[batch, d_inner,
/// d_conv − 1]`. Writes the pre-activation `u` (same shape as `x`) and the window after the
/// last position into `last` `[batch, d_inner, d_conv − 1]`.
#[allow(clippy::too_many_arguments)]
pub fn conv1d_fwd(
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

/// Channels per task of a decode step's conv.
const STEP_BLOCK: usize = 256;

/// One token per batch row, then silu: `x` `[batch, d_inner]`, `window` `[batch, d_inner,
/// d_conv − 1]` (updated in place: shifted left, `x` appended), `u` `[batch, d_inner]` the
/// conv's output and `xs = silu(u)`. `resets[b]` empties row `b`'s window first. Tasks of
/// [`STEP_BLOCK`] channels of one row run on the threads (a decode step at batch 8 spent
/// about a tenth of its time here on one thread while the other waited); each channel's sum
/// is formed in the same order whatever the split, so the bits do not depend on the threads.
/// Allocates nothing.
#[allow(clippy::too_many_arguments)]
pub fn conv1d_step_silu(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    resets: Option<&[bool]>,
    window: &mut [f32],
    (batch, di, dc): (usize, usize, usize),
    u: &mut [f32],
    xs: &mut [f32],
) {
    let km1 = dc - 1;
    assert!(
        x.len() == batch * di
            && u.len() == batch * di
            && xs.len() == batch * di
            && window.len() == batch * di * km1
            && w.len() == di * dc,
        "conv1d_step_silu: buffers do not match batch {batch}, d_inner {di}, d_conv {dc}"
    );
    let blocks = di.div_ceil(STEP_BLOCK);
    let (wp, up, sp) = (
        crate::SyncPtr::new(window),
        crate::SyncPtr::new(u),
        crate::SyncPtr::new(xs),
    );
    // Task `t` touches only channels `c0..c1` of row `t / blocks` in `window`, `u` and `xs`.
    let task = |t: usize| {
        let b = t / blocks;
        let c0 = (t % blocks) * STEP_BLOCK;
        let c1 = (c0 + STEP_BLOCK).min(di);
        let i = b * di + c0;
        let n = c1 - c0;
        // SAFETY: the ranges are disjoint between tasks (above) and the buffers outlive them.
        let (win, uo, so) = unsafe {
            (
                wp.slice_mut(i * km1, n * km1),
                up.slice_mut(i, n),
                sp.slice_mut(i, n),
            )
        };
        let reset = resets.is_some_and(|r| r[b]);
        step_channels(
            &x[i..i + n],
            &w[c0 * dc..c1 * dc],
            bias.map(|bs| &bs[c0..c1]),
            reset,
            win,
            dc,
            uo,
        );
        crate::vecmath::silu_into(uo, so);
    };
    if batch * di < 4 * STEP_BLOCK || crate::threads() == 1 {
        (0..batch * blocks).for_each(task);
    } else {
        crate::par_for(batch * blocks, task);
    }
}

/// The conv step of consecutive channels of one row (`x`, `u` one value per channel, `w`
/// `d_conv` and `win` `d_conv − 1` per channel).
fn step_channels(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    reset: bool,
    win: &mut [f32],
    dc: usize,
    u: &mut [f32],
) {
    let km1 = dc - 1;
    if reset {
        win.fill(0.0);
    }
    if dc == 4 {
        // The default width, unrolled: the same products and sums in the same order.
        for (c, ((wc, wn), (&xv, uo))) in w
            .chunks_exact(4)
            .zip(win.chunks_exact_mut(3))
            .zip(x.iter().zip(u.iter_mut()))
            .enumerate()
        {
            let mut acc = bias.map_or(0.0, |bs| bs[c]);
            acc += wc[0] * wn[0];
            acc += wc[1] * wn[1];
            acc += wc[2] * wn[2];
            acc += wc[3] * xv;
            *uo = acc;
            (wn[0], wn[1], wn[2]) = (wn[1], wn[2], xv);
        }
        return;
    }
    for c in 0..x.len() {
        let wn = &mut win[c * km1..(c + 1) * km1];
        let wc = &w[c * dc..(c + 1) * dc];
        let mut acc = bias.map_or(0.0, |bs| bs[c]);
        for k in 0..km1 {
            acc += wc[k] * wn[k];
        }
        acc += wc[km1] * x[c];
        u[c] = acc;
        if km1 > 0 {
            wn.copy_within(1.., 0);
            wn[km1 - 1] = x[c];
        }
    }
}

/// Shapes and inputs: `x` `[batch, seq_len, d_inner]` (the conv input), `w` `[d_inner,
/// d_conv]`, `resets` `[batch, seq_len]`, `init` `[batch, d_inner, d_conv − 1]`.
#[derive(Clone, Copy)]
pub(crate) struct ConvBwdInputs<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub resets: Option<&'a [bool]>,
    pub init: Option<&'a [f32]>,
    pub batch: usize,
    pub seq_len: usize,
    pub d_inner: usize,
    pub d_conv: usize,
}

/// Accumulates `grad_w` `[d_inner, d_conv]` and `grad_bias`; returns `dx` `[batch, seq_len,
/// d_inner]` and the initial window's gradient `[batch, d_inner, d_conv − 1]`.
pub(crate) fn conv1d_bwd(
    pool: &ThreadPool,
    inp: &ConvBwdInputs,
    du: &[f32],
    grad_w: &mut [f32],
    mut grad_bias: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let (batch, seq_len, di, dc) = (inp.batch, inp.seq_len, inp.d_inner, inp.d_conv);
    let km1 = dc - 1;
    let mut dx = vec![0.0; batch * seq_len * di];
    let mut dinit = vec![0.0; batch * di * km1];
    let starts: Vec<Vec<Option<usize>>> = (0..batch)
        .map(|b| {
            doc_starts(
                inp.resets.map(|r| &r[b * seq_len..(b + 1) * seq_len]),
                seq_len,
            )
        })
        .collect();
    let (sdx, sinit) = (Shared::new(&mut dx), Shared::new(&mut dinit));
    let parts: Vec<(Vec<f32>, Vec<f32>)> = pool.install(|| {
        (0..di.div_ceil(CHUNK))
            .into_par_iter()
            .map(|k| {
                let c0 = k * CHUNK;
                let c1 = (c0 + CHUNK).min(di);
                // SAFETY: task k writes only channels c0..c1 of `dx` and `dinit`.
                unsafe { chunk_bwd(inp, du, &starts, c0, c1, sdx, sinit) }
            })
            .collect()
    });
    for (k, (gw, gb)) in parts.iter().enumerate() {
        let c0 = k * CHUNK;
        let nch = gb.len();
        for c in 0..nch {
            for j in 0..dc {
                grad_w[(c0 + c) * dc + j] += gw[j * nch + c];
            }
        }
        if let Some(g) = grad_bias.as_deref_mut() {
            for (acc, v) in g[c0..c0 + nch].iter_mut().zip(gb) {
                *acc += v;
            }
        }
    }
    (dx, dinit)
}

/// Channels `c0..c1`: returns their weight gradient `[d_conv, channels]` (tap-major) and bias
/// gradient, and writes their `dx` and initial-window gradients.
///
/// # Safety
/// No other thread may access channels `c0..c1` of the buffers behind `sdx` and `sinit` while
/// this runs.
unsafe fn chunk_bwd(
    inp: &ConvBwdInputs,
    du: &[f32],
    starts: &[Vec<Option<usize>>],
    c0: usize,
    c1: usize,
    sdx: Shared,
    sinit: Shared,
) -> (Vec<f32>, Vec<f32>) {
    let (seq_len, di, dc) = (inp.seq_len, inp.d_inner, inp.d_conv);
    let km1 = dc - 1;
    let nch = c1 - c0;
    // Tap-major copies so the inner loops run over contiguous channels.
    let mut wt = vec![0f32; dc * nch];
    for c in 0..nch {
        for j in 0..dc {
            wt[j * nch + c] = inp.w[(c0 + c) * dc + j];
        }
    }
    let mut gw = vec![0f32; dc * nch];
    let mut gb = vec![0f32; nch];
    for (b, starts) in starts.iter().enumerate() {
        for (t, &start) in starts.iter().enumerate() {
            let row = b * seq_len + t;
            let g = &du[row * di + c0..row * di + c1];
            for (acc, &v) in gb.iter_mut().zip(g) {
                *acc += v;
            }
            for j in 0..dc {
                let p = t as isize - km1 as isize + j as isize;
                let wj = &wt[j * nch..(j + 1) * nch];
                let gwj = &mut gw[j * nch..(j + 1) * nch];
                if p >= 0 {
                    let p = p as usize;
                    if start.is_some_and(|s| p < s) {
                        continue;
                    }
                    let src = b * seq_len + p;
                    let xs = &inp.x[src * di + c0..src * di + c1];
                    for c in 0..nch {
                        gwj[c] += g[c] * xs[c];
                    }
                    // SAFETY: channels c0..c1 of row `src` belong to this task.
                    let dxr = unsafe { sdx.slice_mut(src * di + c0, nch) };
                    for c in 0..nch {
                        dxr[c] += wj[c] * g[c];
                    }
                } else if start.is_none() {
                    let slot = (km1 as isize + p) as usize;
                    if let Some(init) = inp.init {
                        for c in 0..nch {
                            gwj[c] += g[c] * init[(b * di + c0 + c) * km1 + slot];
                        }
                    }
                    for c in 0..nch {
                        // SAFETY: channel c0 + c of batch row b belongs to this task.
                        unsafe {
                            sinit.slice_mut((b * di + c0 + c) * km1 + slot, 1)[0] += wj[c] * g[c]
                        };
                    }
                }
            }
        }
    }
    (gw, gb)
}

#[cfg(test)]
mod tests {
    use super::conv1d_step_silu;
    use crate::test_rng::vals;
    use reference::ops::conv1d::{conv1d_fwd, ConvDims};

    /// A decode step's conv against the reference's forward over one position from the same
    /// windows, a reset row included: at d_conv 4 (the unrolled loop) and 3, over three tasks
    /// per row (d_inner 600), and with the same bits on one thread and on a pool of three.
    #[test]
    fn conv_step_matches_the_reference_forward_of_one_position() {
        for dc in [4, 3] {
            let (b, di, km1) = (3, 600, dc - 1);
            let (x, w, bias) = (vals(b * di, 1), vals(di * dc, 2), vals(di, 3));
            let window0 = vals(b * di * km1, 4);
            let resets = [false, true, false];
            let dims = ConvDims {
                batch: b,
                seq_len: 1,
                d_inner: di,
                d_conv: dc,
            };
            let (ru, rlast) = conv1d_fwd(&x, &w, Some(&bias), Some(&resets), Some(&window0), dims);
            let run = || {
                let mut win = window0.clone();
                let (mut u, mut xs) = (vec![f32::NAN; b * di], vec![f32::NAN; b * di]);
                conv1d_step_silu(
                    &x,
                    &w,
                    Some(&bias),
                    Some(&resets),
                    &mut win,
                    (b, di, dc),
                    &mut u,
                    &mut xs,
                );
                (win, u, xs)
            };
            let (win, u, xs) = crate::serial(run);
            assert_eq!(win, rlast, "d_conv {dc}: the shifted windows");
            for (i, (&a, &e)) in u.iter().zip(&ru).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "d_conv {dc}, u[{i}]: {a} vs {e}"
                );
                let s = reference::float::silu(a as f64) as f32;
                assert!((xs[i] - s).abs() <= 1e-5 * (1.0 + s.abs()), "xs[{i}]");
            }
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let (win3, u3, xs3) = pool.install(run);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                (bits(&win3), bits(&u3), bits(&xs3)),
                (bits(&win), bits(&u), bits(&xs)),
                "d_conv {dc}: three threads"
            );
        }
    }
}
