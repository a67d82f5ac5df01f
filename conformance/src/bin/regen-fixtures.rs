//! Regenerates the bundled tiny checkpoint and its goldens:
//!
//! ```text
//! cargo run --release -p conformance --bin regen-fixtures              # train + goldens
//! cargo run --release -p conformance --bin regen-fixtures -- --goldens-only
//! ```
//!
//! The tiny checkpoint is a byte-level model (d_model 64, 2 layers) initialised from
//! `TINY_SEED` and trained with the reference engine on the bundled corpus and QA train pairs.
//! Everything is deterministic: the same command gives the same bytes on every machine.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use conformance::goldens::{compute, golden_tokens, init_fingerprint, tiny_config, TINY_SEED};
use reference::io::{write_tensors, TensorOut};
use reference::model::Batch;
use reference::rng::Rng;
use reference::{AdamWConfig, Params, ReferenceEngine, TrainingEngine};

const EOT: u32 = 256;

/// Bundled corpus documents and QA train pairs ("Question: ...\nAnswer: ..."), as byte tokens
/// separated by `<|endoftext|>`.
fn training_stream(data: &Path) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let read = |name: &str| -> Result<Vec<serde_json::Value>> {
        let path = data.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
            })
            .collect()
    };
    for doc in read("corpus.jsonl")? {
        out.extend(
            doc["text"]
                .as_str()
                .unwrap_or_default()
                .bytes()
                .map(u32::from),
        );
        out.push(EOT);
    }
    for qa in read("qa_train.jsonl")? {
        let text = format!(
            "Question: {}\nAnswer: {}",
            qa["question"].as_str().unwrap_or_default(),
            qa["answer"].as_str().unwrap_or_default()
        );
        out.extend(text.bytes().map(u32::from));
        out.push(EOT);
    }
    Ok(out)
}

fn train(steps: usize, stream: &[u32]) -> Result<Params<f32>> {
    let cfg = tiny_config();
    let mut e = ReferenceEngine::new(
        cfg.clone(),
        reference::init::init_params::<f32>(&cfg, TINY_SEED),
    );
    let (batch, seq_len) = (8, 128);
    let hp = AdamWConfig::default();
    let mut rng = Rng::new(TINY_SEED);
    let started = Instant::now();
    for step in 0..steps {
        let mut tokens = Vec::with_capacity(batch * (seq_len + 1));
        for _ in 0..batch {
            let at = rng.below((stream.len() - seq_len - 1) as u64) as usize;
            tokens.extend_from_slice(&stream[at..at + seq_len + 1]);
        }
        let (inputs, targets): (Vec<u32>, Vec<u32>) = (0..batch)
            .flat_map(|b| (0..seq_len).map(move |t| (b, t)))
            .map(|(b, t)| {
                (
                    tokens[b * (seq_len + 1) + t],
                    tokens[b * (seq_len + 1) + t + 1],
                )
            })
            .unzip();
        // Cosine from 3e-3 to 3e-4 after 20 warm-up steps.
        let lr = if step < 20 {
            3e-3 * (step + 1) as f64 / 20.0
        } else {
            let p = (step - 20) as f64 / (steps - 20).max(1) as f64;
            3e-4 + 0.5 * (3e-3 - 3e-4) * (1.0 + (std::f64::consts::PI * p).cos())
        };
        e.zero_grad()?;
        let lo = e.loss_and_backward(
            &Batch::new(&inputs, batch, seq_len),
            &targets,
            None,
            None,
            1.0,
        )?;
        let st = e.optimizer_step(&hp, lr)?;
        if step % 25 == 0 || step + 1 == steps {
            let tps = ((step + 1) * batch * seq_len) as f64 / started.elapsed().as_secs_f64();
            eprintln!(
                "step {step:>5}/{steps}  loss {:.4}  lr {lr:.2e}  grad_norm {:.3}  {tps:.0} tokens/s",
                lo.loss, st.grad_norm
            );
        }
    }
    Ok(e.params)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let goldens_only = args.iter().any(|a| a == "--goldens-only");
    let steps = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse::<usize>())
        .transpose()
        .context("--steps takes a number")?
        .unwrap_or(600);
    let cfg = tiny_config();
    let tiny = fixtures::tiny_checkpoint();
    if !goldens_only {
        let stream = training_stream(&fixtures::data())?;
        eprintln!(
            "training the tiny checkpoint for {steps} steps on {} byte tokens",
            stream.len()
        );
        let params = train(steps, &stream)?;
        let tok_path = std::env::temp_dir().join(format!(
            "vet-mamba-byte-tokenizer-{}.json",
            std::process::id()
        ));
        trainer::tokenizer::byte_level()?
            .save(&tok_path, true)
            .map_err(|e| anyhow::anyhow!("saving the byte-level tokenizer: {e}"))?;
        trainer::checkpoint::save(&tiny, &cfg, &params, Some(&tok_path))?;
        let _ = std::fs::remove_file(&tok_path);
        eprintln!("wrote {}", tiny.display());
    }
    let ck = trainer::checkpoint::load(&tiny)?;
    let text = std::fs::read(fixtures::data().join("corpus.jsonl"))?;
    let tokens = golden_tokens(&text);
    std::fs::create_dir_all(fixtures::goldens())?;
    let inputs = vec![
        (
            "input_ids".to_string(),
            TensorOut::I64 {
                shape: vec![2, tokens.len() / 2],
                data: tokens.iter().map(|&t| t as i64).collect(),
            },
        ),
        (
            "init_fingerprint".to_string(),
            TensorOut::I64 {
                shape: vec![1],
                data: vec![init_fingerprint() as i64],
            },
        ),
    ];
    let inputs_path = fixtures::goldens().join("tiny_inputs.safetensors");
    write_tensors(&inputs_path, &inputs)?;
    let out: Vec<(String, TensorOut)> = compute(&ck.config, ck.params, &tokens)
        .into_iter()
        .map(|(name, t)| {
            (
                name,
                TensorOut::F32 {
                    shape: t.shape,
                    data: t.data,
                },
            )
        })
        .collect();
    let path = fixtures::goldens().join("tiny.safetensors");
    write_tensors(&path, &out)?;
    eprintln!(
        "wrote {} and {} ({} tensors)",
        inputs_path.display(),
        path.display(),
        out.len()
    );
    Ok(())
}
