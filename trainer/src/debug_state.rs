//! `vet-train debug-state`: logits, loss and every gradient for given tokens, written to
//! safetensors for comparison with other implementations (like llm.c's debug state).

use std::path::Path;

use anyhow::{bail, Context, Result};
use reference::io::{read_i64, write_tensors, TensorOut};
use reference::loss::next_token_targets;
use reference::model::Batch;
use reference::TrainingEngine;

/// What was written.
#[derive(Clone, Debug)]
pub struct DebugState {
    pub batch: usize,
    pub seq_len: usize,
    pub loss: f64,
    pub tensors: usize,
}

/// Reads `input_ids` (`[batch, seq_len]`, i64) from `tokens`, runs `engine`, writes `logits`,
/// `loss` (mean next-token cross-entropy) and `grad.<name>` for every parameter to `out`.
pub fn run(engine: &mut dyn TrainingEngine, tokens: &Path, out: &Path) -> Result<DebugState> {
    let (shape, ids) = read_i64(tokens, "input_ids")
        .with_context(|| format!("reading tokens {}", tokens.display()))?;
    let [batch, seq_len] = shape[..] else {
        bail!(
            "{}: input_ids is {shape:?}, expected [batch, seq_len]",
            tokens.display()
        );
    };
    if seq_len < 2 {
        bail!(
            "{}: input_ids has seq_len {seq_len}; the loss needs at least 2 positions",
            tokens.display()
        );
    }
    let vocab = engine.config().vocab_size;
    let mut ids32 = Vec::with_capacity(ids.len());
    for (i, &t) in ids.iter().enumerate() {
        if t < 0 || t as u64 >= vocab as u64 {
            bail!(
                "{}: input_ids[{}, {}] = {t} is outside the model's vocabulary of {vocab}",
                tokens.display(),
                i / seq_len,
                i % seq_len
            );
        }
        ids32.push(t as u32);
    }
    let input = Batch::new(&ids32, batch, seq_len);
    let (logits, _) = engine.forward(&input, None)?;
    let (targets, mask) = next_token_targets(&ids32, batch, seq_len);
    engine.zero_grad()?;
    let lo = engine.loss_and_backward(&input, &targets, Some(&mask), None, 1.0)?;
    let mut tensors = vec![
        (
            "logits".to_string(),
            TensorOut::F32 {
                shape: logits.shape.clone(),
                data: logits.data,
            },
        ),
        (
            "loss".to_string(),
            TensorOut::F32 {
                shape: vec![],
                data: vec![lo.loss as f32],
            },
        ),
    ];
    for (name, g) in engine.gradients()? {
        tensors.push((
            format!("grad.{name}"),
            TensorOut::F32 {
                shape: g.shape,
                data: g.data,
            },
        ));
    }
    write_tensors(out, &tensors).with_context(|| format!("writing {}", out.display()))?;
    Ok(DebugState {
        batch,
        seq_len,
        loss: lo.loss,
        tensors: tensors.len(),
    })
}
