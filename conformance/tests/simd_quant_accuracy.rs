//! What reduced-precision weights cost a model, against its f32 weights on the simd tier:
//! the relative L2 error of the logits and the change of perplexity on the bundled
//! validation text (the last 5 % of `fixtures/data/corpus.jsonl`, as the quickstart's
//! `--val-fraction 0.05` holds out). Limits and measured values: `INT4_*` / `QUANT_*` in
//! `conformance/src/tol.rs`.
//!
//! The bundled tiny checkpoint runs in CI. Another checkpoint (the quickstart's) with
//! `VET_QUANT_MODEL=DIR`; the random 130M-shaped model with `-- --ignored` (heavy).

use std::path::{Path, PathBuf};

use conformance::tol::{QUANT_LOGIT_TINY, QUANT_PPL_TINY};
use conformance::{diff, validation_tokens};
use reference::model::Batch;
use reference::{InferenceEngine, MambaConfig, NormKind};
use simd::{SimdEngine, SimdOptions, WeightDtype};

const ROW: usize = 256;

/// (logits, mean cross-entropy) of `e` over the rows.
fn run(e: &mut SimdEngine, rows: &[Vec<u32>]) -> (Vec<f32>, f64) {
    let inputs: Vec<u32> = rows.iter().flat_map(|r| r[..ROW].to_vec()).collect();
    let targets: Vec<u32> = rows.iter().flat_map(|r| r[1..].to_vec()).collect();
    let batch = Batch::new(&inputs, rows.len(), ROW);
    let (logits, _) = e.forward(&batch, None).unwrap();
    let loss = e.loss(&batch, &targets, None, None).unwrap();
    (logits.data, loss.loss)
}

/// Prints and returns (relative logit error, perplexity change in %) of each format.
fn measure(
    what: &str,
    load: &dyn Fn(WeightDtype) -> SimdEngine,
    rows: &[Vec<u32>],
) -> Vec<(WeightDtype, f64, f64)> {
    let (want, l32) = run(&mut load(WeightDtype::F32), rows);
    let ppl32 = l32.exp();
    println!(
        "{what}: f32 perplexity {ppl32:.3} over {} tokens",
        rows.len() * ROW
    );
    [WeightDtype::Bf16, WeightDtype::Int8, WeightDtype::Int4]
        .into_iter()
        .map(|dt| {
            let (got, l) = run(&mut load(dt), rows);
            let rel = diff(&got, &want).rel;
            let dppl = 100.0 * (l.exp() / ppl32 - 1.0);
            println!(
                "{what}: {:>4} logit error {rel:.3e}, perplexity {:.3} ({dppl:+.2} %)",
                dt.name(),
                l.exp()
            );
            (dt, rel, dppl)
        })
        .collect()
}

fn opts(dtype: WeightDtype) -> SimdOptions {
    SimdOptions {
        threads: 2,
        dtype,
        isa: None,
    }
}

fn checkpoint_costs(dir: &Path) -> Vec<(WeightDtype, f64, f64)> {
    let cfg = MambaConfig::load(&dir.join("config.json")).unwrap();
    let rows = validation_tokens(&dir.join("tokenizer.json"), cfg.vocab_size, 8, ROW + 1);
    let load = |dt| SimdEngine::load(dir, &opts(dt)).unwrap();
    measure(&dir.display().to_string(), &load, &rows)
}

#[test]
fn reduced_precision_costs_the_tiny_checkpoint_little_on_validation_text() {
    for (dt, rel, dppl) in checkpoint_costs(&fixtures::tiny_checkpoint()) {
        let (lt, pt) = match dt {
            WeightDtype::Bf16 => (QUANT_LOGIT_TINY[0], QUANT_PPL_TINY[0]),
            WeightDtype::Int8 => (QUANT_LOGIT_TINY[1], QUANT_PPL_TINY[1]),
            _ => (QUANT_LOGIT_TINY[2], QUANT_PPL_TINY[2]),
        };
        assert!(
            rel.is_finite() && rel > 0.0 && rel <= lt,
            "{dt:?}: logit error {rel:.3e} > {lt:.1e}"
        );
        assert!(
            dppl.abs() <= pt,
            "{dt:?}: perplexity change {dppl:+.2} % beyond ±{pt} %"
        );
    }
}

/// `VET_QUANT_MODEL=runs/quickstart/finetune/checkpoints/step-N cargo test -p conformance
/// --test simd_quant_accuracy -- --ignored --nocapture`: the same measurement on a trained
/// checkpoint (prints only).
#[test]
#[ignore = "needs VET_QUANT_MODEL=DIR, a checkpoint with tokenizer.json"]
fn reduced_precision_costs_on_a_given_checkpoint() {
    let dir = PathBuf::from(std::env::var("VET_QUANT_MODEL").expect("VET_QUANT_MODEL=DIR"));
    checkpoint_costs(&dir);
}

/// A random model of the mamba-130m shape (mamba_ssm init) on the bundled tokenizer's ids:
/// heavy (130 M parameters, four formats), so run by hand.
#[test]
#[ignore = "heavy: a 130M-parameter model in four formats"]
fn reduced_precision_costs_a_random_130m_model() {
    let mut cfg = MambaConfig::new(768, 24, 50280);
    cfg.norm = NormKind::Rms;
    let params = reference::init::init_params::<f32>(&cfg, 130);
    let rows = validation_tokens(&fixtures::tokenizer(), 4096, 2, ROW + 1);
    let load = |dt| SimdEngine::new(cfg.clone(), params.clone(), &opts(dt)).unwrap();
    measure("random 130m", &load, &rows);
}
