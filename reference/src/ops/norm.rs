//! RMSNorm and LayerNorm over the last dimension.
//!
//! RMSNorm: `y = x · rstd · w`, `rstd = 1 / sqrt(mean(x²) + eps)`.
//! LayerNorm: `y = (x − mean) · rstd · w + b`, `rstd = 1 / sqrt(mean((x − mean)²) + eps)`.

use crate::config::NormKind;
use crate::float::Float;

/// Statistics saved by the forward for the backward: per row `mean` (0 for RMSNorm) and `rstd`.
#[derive(Clone, Debug)]
pub struct NormStats<T> {
    pub mean: Vec<T>,
    pub rstd: Vec<T>,
}

/// `x` is `[n, d]`; returns `y` `[n, d]` and the row statistics.
pub fn norm_fwd<T: Float>(
    kind: NormKind,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    eps: f64,
    n: usize,
    d: usize,
) -> (Vec<T>, NormStats<T>) {
    let eps = T::from_f64(eps);
    let inv_d = T::ONE / T::from_f64(d as f64);
    let mut y = vec![T::ZERO; n * d];
    let mut stats = NormStats {
        mean: vec![T::ZERO; n],
        rstd: vec![T::ZERO; n],
    };
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        let mean = match kind {
            NormKind::Rms => T::ZERO,
            NormKind::Layer => {
                let mut s = T::ZERO;
                for &v in xr {
                    s += v;
                }
                s * inv_d
            }
        };
        let mut ss = T::ZERO;
        for &v in xr {
            let c = v - mean;
            ss += c * c;
        }
        let rstd = T::ONE / (ss * inv_d + eps).sqrt();
        for j in 0..d {
            let mut v = (xr[j] - mean) * rstd * w[j];
            if let Some(b) = bias {
                v += b[j];
            }
            y[r * d + j] = v;
        }
        stats.mean[r] = mean;
        stats.rstd[r] = rstd;
    }
    (y, stats)
}

/// Backward of [`norm_fwd`]: accumulates `grad_w` (and `grad_bias`), returns `dx`.
///
/// With `xhat = (x − mean) · rstd` and `g = dy · w`:
/// RMSNorm `dx = rstd · (g − xhat · mean(g · xhat))`;
/// LayerNorm `dx = rstd · (g − mean(g) − xhat · mean(g · xhat))`.
#[allow(clippy::too_many_arguments)]
pub fn norm_bwd<T: Float>(
    kind: NormKind,
    x: &[T],
    w: &[T],
    stats: &NormStats<T>,
    dy: &[T],
    n: usize,
    d: usize,
    grad_w: &mut [T],
    mut grad_bias: Option<&mut [T]>,
) -> Vec<T> {
    let inv_d = T::ONE / T::from_f64(d as f64);
    let mut dx = vec![T::ZERO; n * d];
    let mut g = vec![T::ZERO; d];
    let mut xhat = vec![T::ZERO; d];
    for r in 0..n {
        let (mean, rstd) = (stats.mean[r], stats.rstd[r]);
        let xr = &x[r * d..(r + 1) * d];
        let dyr = &dy[r * d..(r + 1) * d];
        let mut sum_g = T::ZERO;
        let mut sum_gx = T::ZERO;
        for j in 0..d {
            xhat[j] = (xr[j] - mean) * rstd;
            g[j] = dyr[j] * w[j];
            grad_w[j] += dyr[j] * xhat[j];
            if let Some(gb) = grad_bias.as_deref_mut() {
                gb[j] += dyr[j];
            }
            sum_g += g[j];
            sum_gx += g[j] * xhat[j];
        }
        let mean_g = match kind {
            NormKind::Rms => T::ZERO,
            NormKind::Layer => sum_g * inv_d,
        };
        let mean_gx = sum_gx * inv_d;
        for j in 0..d {
            dx[r * d + j] = rstd * (g[j] - mean_g - xhat[j] * mean_gx);
        }
    }
    dx
}
