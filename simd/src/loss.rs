//! Masked softmax cross-entropy and its gradient, rows in parallel: the fast twin of
//! `reference::loss::cross_entropy`.
//!
//! Each row's log-sum-exp subtracts the row max and sums `exp` over eight-lane vectors in f32;
//! the row losses are added in f64 in position order, so the loss does not depend on the
//! thread count.

use rayon::prelude::*;
use rayon::ThreadPool;
use reference::loss::LossOut;
use reference::{Error, Result};
use wide::f32x8;

const LANES: usize = 8;

/// Checks shapes and targets as the reference does; returns the number of counted positions.
fn check(
    logits: usize,
    targets: &[u32],
    mask: Option<&[bool]>,
    vocab: usize,
    d_logits: usize,
) -> Result<usize> {
    let n = targets.len();
    if logits != n * vocab || d_logits != n * vocab || mask.is_some_and(|m| m.len() != n) {
        return Err(Error::Shape {
            op: "simd cross_entropy",
            msg: format!(
                "logits has {logits} values, d_logits {d_logits} and mask {:?} flags for {n} targets, expected [n, vocab] = [{n}, {vocab}]",
                mask.map(|m| m.len())
            ),
        });
    }
    let counts = |i: usize| mask.is_none_or(|m| m[i]);
    if let Some(i) = (0..n).find(|&i| counts(i) && targets[i] as usize >= vocab) {
        return Err(Error::Shape {
            op: "simd cross_entropy",
            msg: format!(
                "target {} at position {i} is outside the vocabulary of {vocab}",
                targets[i]
            ),
        });
    }
    Ok((0..n).filter(|&i| counts(i)).count())
}

/// Returns `Σ_j exp(row[j] − shift)`; with `out`, also writes `exp(row[j] − shift) · k` there.
fn exp_row(row: &[f32], shift: f32, k: f32, out: Option<&mut [f32]>) -> f32 {
    let mut acc = f32x8::ZERO;
    let sh = f32x8::splat(shift);
    let kk = f32x8::splat(k);
    let body = row.len() / LANES * LANES;
    let mut tail = 0f32;
    match out {
        Some(out) => {
            for (o, x) in out[..body]
                .chunks_exact_mut(LANES)
                .zip(row[..body].chunks_exact(LANES))
            {
                let xs: [f32; LANES] = x.try_into().unwrap_or([0.0; LANES]);
                let e = (f32x8::from(xs) - sh).exp();
                acc += e;
                o.copy_from_slice(&(e * kk).to_array());
            }
            for (o, &x) in out[body..].iter_mut().zip(&row[body..]) {
                let e = (x - shift).exp();
                tail += e;
                *o = e * k;
            }
        }
        None => {
            for x in row[..body].chunks_exact(LANES) {
                let xs: [f32; LANES] = x.try_into().unwrap_or([0.0; LANES]);
                acc += (f32x8::from(xs) - sh).exp();
            }
            for &x in &row[body..] {
                tail += (x - shift).exp();
            }
        }
    }
    acc.to_array().iter().sum::<f32>() + tail
}

/// [`cross_entropy`] into a caller's `d_logits` `[n, vocab]` (overwritten). Returns the mean
/// loss over the counted positions (f64) and their number.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_into(
    pool: &ThreadPool,
    logits: &[f32],
    targets: &[u32],
    mask: Option<&[bool]>,
    vocab: usize,
    scale: f32,
    d_logits: &mut [f32],
) -> Result<(f64, usize)> {
    let n_targets = check(logits.len(), targets, mask, vocab, d_logits.len())?;
    if n_targets == 0 || vocab == 0 {
        d_logits.fill(0.0);
        return Ok((0.0, n_targets));
    }
    let k = scale * (1.0 / n_targets as f32);
    let losses: Vec<f64> = pool.install(|| {
        d_logits
            .par_chunks_mut(vocab)
            .enumerate()
            .map(|(i, g)| {
                if mask.is_some_and(|m| !m[i]) {
                    g.fill(0.0);
                    return 0.0;
                }
                let row = &logits[i * vocab..(i + 1) * vocab];
                let m = row.iter().copied().fold(row[0], f32::max);
                let s = exp_row(row, m, 1.0, None);
                let lse = m + s.ln();
                let t = targets[i] as usize;
                exp_row(row, lse, k, Some(g));
                g[t] -= k;
                f64::from(lse) - f64::from(row[t])
            })
            .collect()
    });
    let total: f64 = losses.iter().sum();
    Ok((total / n_targets as f64, n_targets))
}

/// The loss of [`cross_entropy_into`] alone (the same bits), with no gradient: the mean loss
/// over the counted positions (f64) and their number.
pub fn cross_entropy_loss(
    pool: &ThreadPool,
    logits: &[f32],
    targets: &[u32],
    mask: Option<&[bool]>,
    vocab: usize,
) -> Result<(f64, usize)> {
    let n_targets = check(logits.len(), targets, mask, vocab, logits.len())?;
    if n_targets == 0 || vocab == 0 {
        return Ok((0.0, n_targets));
    }
    let losses: Vec<f64> = pool.install(|| {
        logits
            .par_chunks(vocab)
            .enumerate()
            .map(|(i, row)| {
                if mask.is_some_and(|m| !m[i]) {
                    return 0.0;
                }
                let m = row.iter().copied().fold(row[0], f32::max);
                let lse = m + exp_row(row, m, 1.0, None).ln();
                f64::from(lse) - f64::from(row[targets[i] as usize])
            })
            .collect()
    });
    let total: f64 = losses.iter().sum();
    Ok((total / n_targets as f64, n_targets))
}

/// Masked mean cross-entropy of `logits` `[n, vocab]` against `targets` `[n]` (`mask` `[n]`,
/// `None` = every position counts) and the gradient of `scale · loss`, as
/// `reference::loss::cross_entropy`. No counted position gives loss 0 and a zero gradient.
pub fn cross_entropy(
    pool: &ThreadPool,
    logits: &[f32],
    targets: &[u32],
    mask: Option<&[bool]>,
    vocab: usize,
    scale: f32,
) -> Result<LossOut<f32>> {
    let mut d_logits = vec![0.0; logits.len()];
    let (loss, n_targets) =
        cross_entropy_into(pool, logits, targets, mask, vocab, scale, &mut d_logits)?;
    Ok(LossOut {
        loss: loss as f32,
        n_targets,
        d_logits,
    })
}
