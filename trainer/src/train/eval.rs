//! Evaluation: validation loss and perplexity.

use anyhow::{bail, Result};
use reference::model::Batch;
use reference::InferenceEngine;

use super::source::Source;

/// Mean loss over `batches` batches of `src` (weighted by target positions), through the
/// engine's forward-only loss: no backward runs and the gradients are left as they were.
pub fn eval_loss(
    engine: &mut dyn InferenceEngine,
    src: &mut Source,
    batches: usize,
) -> Result<f64> {
    let (mut total, mut count) = (0.0, 0usize);
    for _ in 0..batches.max(1) {
        let b = src.next_batch()?;
        let input = Batch {
            batch: b.batch,
            seq_len: b.seq_len,
            tokens: &b.inputs,
            resets: Some(&b.resets),
        };
        let lo = engine.loss(&input, &b.targets, b.mask.as_deref(), None)?;
        total += lo.loss * lo.n_targets as f64;
        count += lo.n_targets;
    }
    if count == 0 {
        bail!("evaluation saw no target positions");
    }
    Ok(total / count as f64)
}
