//! Evaluation: validation loss and perplexity.

use anyhow::{bail, Result};
use reference::model::Batch;
use reference::Engine;

use super::source::Source;

/// Mean loss over `batches` batches of `src` (weighted by target positions). Gradients are
/// computed and discarded: engines expose loss only together with its backward.
pub fn eval_loss(engine: &mut dyn Engine, src: &mut Source, batches: usize) -> Result<f64> {
    let (mut total, mut count) = (0.0, 0usize);
    for _ in 0..batches.max(1) {
        let b = src.next_batch()?;
        let input = Batch {
            batch: b.batch,
            seq_len: b.seq_len,
            tokens: &b.inputs,
            resets: Some(&b.resets),
        };
        engine.zero_grad();
        let lo = engine.loss_and_backward(&input, &b.targets, b.mask.as_deref(), None, 0.0)?;
        total += lo.loss * lo.n_targets as f64;
        count += lo.n_targets;
    }
    engine.zero_grad();
    if count == 0 {
        bail!("evaluation saw no target positions");
    }
    Ok(total / count as f64)
}
