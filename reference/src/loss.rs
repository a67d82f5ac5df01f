//! Masked softmax cross-entropy over the vocabulary, and its gradient.
//!
//! `loss = Σ_i mask_i · (logsumexp(logits_i) − logits_i[target_i]) / Σ_i mask_i`, positions in
//! increasing order; each `logsumexp` subtracts the row max first.

use crate::error::{Error, Result};
use crate::float::Float;

/// Loss, the number of positions it averages over, and `d loss / d logits` (times `scale`).
#[derive(Clone, Debug)]
pub struct LossOut<T> {
    pub loss: T,
    pub n_targets: usize,
    pub d_logits: Vec<T>,
}

/// Checks shapes and targets; returns the number of counted positions.
fn check<T>(logits: &[T], targets: &[u32], mask: Option<&[bool]>, vocab: usize) -> Result<usize> {
    let n = targets.len();
    if logits.len() != n * vocab || mask.is_some_and(|m| m.len() != n) {
        return Err(Error::Shape {
            op: "cross_entropy",
            msg: format!(
                "logits has {} values and mask {:?} flags for {n} targets, expected [n, vocab] = [{n}, {vocab}]",
                logits.len(),
                mask.map(|m| m.len())
            ),
        });
    }
    let counts = |i: usize| mask.is_none_or(|m| m[i]);
    if let Some(i) = (0..n).find(|&i| counts(i) && targets[i] as usize >= vocab) {
        return Err(Error::Shape {
            op: "cross_entropy",
            msg: format!(
                "target {} at position {i} is outside the vocabulary of {vocab}",
                targets[i]
            ),
        });
    }
    Ok((0..n).filter(|&i| counts(i)).count())
}

/// `logsumexp(row)`, the row max subtracted first.
fn logsumexp<T: Float>(row: &[T]) -> T {
    let mut m = row[0];
    for &v in row {
        m = m.max(v);
    }
    let mut s = T::ZERO;
    for &v in row {
        s += (v - m).exp();
    }
    m + s.ln()
}

/// `logits` `[n, vocab]`, `targets` `[n]`, `mask` `[n]` (`None` = every position counts).
/// The returned gradient is of `scale · loss` (gradient accumulation passes `1 / steps`).
/// With no position in the mask the loss is 0 and so is the gradient.
pub fn cross_entropy<T: Float>(
    logits: &[T],
    targets: &[u32],
    mask: Option<&[bool]>,
    vocab: usize,
    scale: T,
) -> Result<LossOut<T>> {
    let n = targets.len();
    let n_targets = check(logits, targets, mask, vocab)?;
    let counts = |i: usize| mask.is_none_or(|m| m[i]);
    let mut d_logits = vec![T::ZERO; n * vocab];
    if n_targets == 0 {
        return Ok(LossOut {
            loss: T::ZERO,
            n_targets,
            d_logits,
        });
    }
    let inv = T::ONE / T::from_f64(n_targets as f64);
    let mut total = T::ZERO;
    for i in (0..n).filter(|&i| counts(i)) {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let lse = logsumexp(row);
        let t = targets[i] as usize;
        total += lse - row[t];
        let g = &mut d_logits[i * vocab..(i + 1) * vocab];
        let k = scale * inv;
        for j in 0..vocab {
            g[j] = (row[j] - lse).exp() * k;
        }
        g[t] -= k;
    }
    Ok(LossOut {
        loss: total * inv,
        n_targets,
        d_logits,
    })
}

/// The loss of [`cross_entropy`] alone (the same bits), without the gradient: mean loss over
/// the counted positions and their number.
pub fn cross_entropy_loss<T: Float>(
    logits: &[T],
    targets: &[u32],
    mask: Option<&[bool]>,
    vocab: usize,
) -> Result<(T, usize)> {
    let n = targets.len();
    let n_targets = check(logits, targets, mask, vocab)?;
    if n_targets == 0 {
        return Ok((T::ZERO, 0));
    }
    let counts = |i: usize| mask.is_none_or(|m| m[i]);
    let inv = T::ONE / T::from_f64(n_targets as f64);
    let mut total = T::ZERO;
    for i in (0..n).filter(|&i| counts(i)) {
        let row = &logits[i * vocab..(i + 1) * vocab];
        total += logsumexp(row) - row[targets[i] as usize];
    }
    Ok((total * inv, n_targets))
}

/// Next-token targets for `[batch, seq_len]` tokens: position `t` predicts `t + 1`; the last
/// position of each row has no target (mask false).
pub fn next_token_targets(tokens: &[u32], batch: usize, seq_len: usize) -> (Vec<u32>, Vec<bool>) {
    let mut targets = vec![0u32; batch * seq_len];
    let mut mask = vec![false; batch * seq_len];
    for b in 0..batch {
        for t in 0..seq_len.saturating_sub(1) {
            targets[b * seq_len + t] = tokens[b * seq_len + t + 1];
            mask[b * seq_len + t] = true;
        }
    }
    (targets, mask)
}
