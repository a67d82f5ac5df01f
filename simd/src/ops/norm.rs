//! RMSNorm / LayerNorm, the fast CPU twin of `reference::ops::norm`: the forward and the
//! backward, rows in parallel.
//!
//! The backward takes rows in blocks of [`ROWS`]; each block sums its own weight / bias
//! gradient, and the blocks are added in row order, so the result does not depend on the
//! thread count.

use rayon::prelude::*;
use rayon::ThreadPool;
use reference::ops::norm::NormStats;
use reference::NormKind;

/// Rows per task of the backward.
const ROWS: usize = 16;

/// Normalises one row; returns `(mean, rstd)` (mean 0 for RMSNorm). Same formula as
/// `reference::ops::norm`.
#[inline]
fn norm_row(
    kind: NormKind,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    eps: f32,
    y: &mut [f32],
) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = match kind {
        NormKind::Rms => 0.0,
        NormKind::Layer => x.iter().sum::<f32>() / d,
    };
    let ss: f32 = x.iter().map(|&v| (v - mean) * (v - mean)).sum();
    let rstd = 1.0 / (ss / d + eps).sqrt();
    for j in 0..x.len() {
        y[j] = (x[j] - mean) * rstd * w[j] + b.map_or(0.0, |b| b[j]);
    }
    (mean, rstd)
}

/// Normalises the `[n, d]` rows of `x` into `y`, rows in parallel on the current pool, and
/// writes each row's `mean` and `rstd` (the `NormStats` the backward consumes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_fwd(
    kind: NormKind,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    eps: f64,
    d: usize,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let eps = eps as f32;
    type Row<'a> = ((&'a [f32], &'a mut [f32]), (&'a mut f32, &'a mut f32));
    let job = |((xr, yr), (m, r)): Row| {
        (*m, *r) = norm_row(kind, xr, w, b, eps, yr);
    };
    let rows = x.chunks(d).zip(y.chunks_mut(d));
    let stats = mean.iter_mut().zip(rstd.iter_mut());
    if x.len() < 1 << 14 || crate::threads() == 1 {
        rows.zip(stats).for_each(job);
    } else {
        x.par_chunks(d)
            .zip(y.par_chunks_mut(d))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .for_each(job);
    }
}

/// Accumulates `grad_w` (and `grad_bias`), returns `dx` `[n, d]`. `x`, `dy` are `[n, d]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_bwd(
    pool: &ThreadPool,
    kind: NormKind,
    x: &[f32],
    w: &[f32],
    stats: &NormStats<f32>,
    dy: &[f32],
    n: usize,
    d: usize,
    grad_w: &mut [f32],
    grad_bias: Option<&mut [f32]>,
) -> Vec<f32> {
    let mut dx = vec![0.0; n * d];
    if n == 0 || d == 0 {
        return dx;
    }
    let inv_d = 1.0 / d as f32;
    let parts: Vec<(Vec<f32>, Vec<f32>)> = pool.install(|| {
        dx.par_chunks_mut(ROWS * d)
            .enumerate()
            .map(|(k, dxb)| {
                let mut gw = vec![0f32; d];
                let mut gb = vec![0f32; d];
                let mut g = vec![0f32; d];
                let mut xhat = vec![0f32; d];
                for (i, dxr) in dxb.chunks_exact_mut(d).enumerate() {
                    let r = k * ROWS + i;
                    let (mean, rstd) = (stats.mean[r], stats.rstd[r]);
                    let xr = &x[r * d..(r + 1) * d];
                    let dyr = &dy[r * d..(r + 1) * d];
                    for j in 0..d {
                        xhat[j] = (xr[j] - mean) * rstd;
                        g[j] = dyr[j] * w[j];
                        gw[j] += dyr[j] * xhat[j];
                        gb[j] += dyr[j];
                    }
                    let (sum_g, sum_gx) = lane_sums(&g, &xhat);
                    let mean_g = match kind {
                        NormKind::Rms => 0.0,
                        NormKind::Layer => sum_g * inv_d,
                    };
                    let mean_gx = sum_gx * inv_d;
                    for j in 0..d {
                        dxr[j] = rstd * (g[j] - mean_g - xhat[j] * mean_gx);
                    }
                }
                (gw, gb)
            })
            .collect()
    });
    for (gw, _) in &parts {
        for (acc, v) in grad_w.iter_mut().zip(gw) {
            *acc += v;
        }
    }
    if let Some(gbias) = grad_bias {
        for (_, gb) in &parts {
            for (acc, v) in gbias.iter_mut().zip(gb) {
                *acc += v;
            }
        }
    }
    dx
}

/// `(Σ g, Σ g · xhat)` in eight interleaved partial sums (so the loop vectorises), added
/// lane by lane at the end.
fn lane_sums(g: &[f32], xhat: &[f32]) -> (f32, f32) {
    let mut sg = [0f32; 8];
    let mut sgx = [0f32; 8];
    let body = g.len() / 8 * 8;
    for (gc, xc) in g[..body].chunks_exact(8).zip(xhat[..body].chunks_exact(8)) {
        for l in 0..8 {
            sg[l] += gc[l];
            sgx[l] += gc[l] * xc[l];
        }
    }
    for (&gj, &xj) in g[body..].iter().zip(&xhat[body..]) {
        sg[0] += gj;
        sgx[0] += gj * xj;
    }
    (sg.iter().sum(), sgx.iter().sum())
}
