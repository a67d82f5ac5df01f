//! Evaluation: validation loss and perplexity.

use anyhow::{bail, Result};
use reference::engine::EvalLoss;
use reference::model::Batch;
use reference::{InferenceEngine, State, TrainingEngine};

use super::source::{Source, TrainBatch};

/// Mean loss over `batches` batches of `src` (weighted by target positions), through the
/// engine's forward-only loss: no backward runs and the gradients are left as they were.
pub fn eval_loss(
    engine: &mut dyn InferenceEngine,
    src: &mut Source,
    batches: usize,
) -> Result<f64> {
    mean_loss(src, batches, |input, b| {
        Ok(engine.loss(input, &b.targets, b.mask.as_deref(), None)?)
    })
}

/// [`eval_loss`] for a stateful run (`[train] carry_state`): `src` gives every row a stream of
/// consecutive windows, and each window starts from the state the row's previous window
/// ended in (zeros for the first), as the run trains and as the model is used. Each window
/// runs the forward twice: once for the loss, once for the state it hands on.
pub fn eval_loss_carried(
    engine: &mut dyn TrainingEngine,
    src: &mut Source,
    batches: usize,
) -> Result<f64> {
    let mut state: Option<State<f32>> = None;
    mean_loss(src, batches, |input, b| {
        let lo = engine.loss(input, &b.targets, b.mask.as_deref(), state.as_ref())?;
        state = Some(engine.forward_state(input, state.as_ref())?);
        Ok(lo)
    })
}

/// The target-weighted mean of `window`'s losses over `batches` batches of `src`.
fn mean_loss(
    src: &mut Source,
    batches: usize,
    mut window: impl FnMut(&Batch, &TrainBatch) -> Result<EvalLoss>,
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
        let lo = window(&input, &b)?;
        total += lo.loss * lo.n_targets as f64;
        count += lo.n_targets;
    }
    if count == 0 {
        bail!("evaluation saw no target positions");
    }
    Ok(total / count as f64)
}
