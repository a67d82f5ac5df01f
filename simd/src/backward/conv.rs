//! Backward of the causal depthwise conv (`reference::ops::conv1d::conv1d_bwd`), tasks of
//! [`CHUNK`] channels on the pool; the inner loops run across contiguous channels.
//!
//! A channel's weight and bias gradients are summed by one task only, so the result does not
//! depend on the thread count.

use rayon::prelude::*;
use rayon::ThreadPool;
use reference::ops::doc_starts;

use super::Shared;

/// Channels per task.
const CHUNK: usize = 64;

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
