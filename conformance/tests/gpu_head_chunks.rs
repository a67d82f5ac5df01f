//! The CUDA tier's training head (lm_head + cross-entropy + their gradients) in chunks of rows
//! (`gpu/src/head_loss.rs`): cut into chunks of 3 rows (`VET_CE_ROWS=3`, a partial last
//! chunk), the loss and every gradient still agree with the reference in f32, bf16 and fp16,
//! and two runs give the same bits. Its own test binary, because the chunk size comes from
//! the environment when the engine builds its training workspace.
//!
//! Without a CUDA device the test prints a `skipping` line and passes.

use conformance::tol::gpu as tol;
use conformance::{diff, random_flags, random_params, random_tokens, seed_of, SmallModel};
use reference::model::Batch;
use reference::rng::Rng;
use reference::{ReferenceEngine, TrainingEngine};

/// Loss and gradients of one engine on the case's batch.
fn loss_and_grads(
    e: &mut dyn TrainingEngine,
    batch: &Batch,
    targets: &[u32],
    mask: &[bool],
) -> (f64, Vec<Vec<f32>>) {
    e.zero_grad().unwrap();
    let lo = e
        .loss_and_backward(batch, targets, Some(mask), None, 0.5)
        .unwrap();
    let g = e.gradients().unwrap();
    (lo.loss, g.into_iter().map(|(_, t)| t.data).collect())
}

#[test]
fn gpu_head_in_chunks_of_3_rows_matches_reference() {
    if let Err(e) = gpu::available() {
        println!("skipping gpu_head_in_chunks_of_3_rows_matches_reference: {e}");
        return;
    }
    std::env::set_var("VET_CE_ROWS", "3");
    let model = SmallModel {
        d_model: 32,
        n_layer: 2,
        vocab: 301,
        d_state: 16,
        d_conv: 4,
        tied: false,
        ..SmallModel::default()
    };
    let cfg = model.config();
    // 2 × 67 = 134 rows: 44 chunks of 3 and one of 2.
    let (b, l) = (2, 67);
    let mut rng = Rng::new(seed_of("head_chunks"));
    let tokens = random_tokens(&mut rng, &cfg, b * l);
    let targets = random_tokens(&mut rng, &cfg, b * l);
    let mask = random_flags(&mut rng, b * l, 0.8);
    let batch = Batch::new(&tokens, b, l);
    let p = random_params::<f32>(&cfg, seed_of("head_chunks"));
    let mut r = ReferenceEngine::<f64>::new(cfg.clone(), p.cast(&cfg));
    let (want_loss, want) = {
        r.zero_grad().unwrap();
        let lo = r
            .loss_and_backward(&batch, &targets, Some(&mask), None, 0.5)
            .unwrap();
        let g: Vec<Vec<f64>> = r
            .gradients()
            .unwrap()
            .into_iter()
            .map(|(_, t)| t.data.iter().map(|&v| v as f64).collect())
            .collect();
        (lo.loss, g)
    };
    let mut bad = Vec::new();
    for (precision, loss_tol, grad_tol) in [
        (gpu::Precision::F32, tol::F32_LOSS, tol::F32_GRAD),
        (gpu::Precision::Bf16, tol::BF16_LOSS, tol::BF16_GRAD),
        (gpu::Precision::Fp16, tol::FP16_LOSS, tol::FP16_GRAD),
    ] {
        let opts = gpu::GpuOptions {
            ordinal: 0,
            precision,
        };
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut g = gpu::engine(&cfg, p.clone(), &opts).unwrap();
            runs.push(loss_and_grads(g.as_mut(), &batch, &targets, &mask));
        }
        let (loss, grads) = &runs[0];
        let d = diff(&[*loss], &[want_loss]);
        println!(
            "{precision:?} loss: rel err {:.3e} (limit {loss_tol:.1e})",
            d.rel
        );
        if d.has_nan || d.rel > loss_tol {
            bad.push(format!("{precision:?} loss"));
        }
        let names = r.gradients().unwrap();
        for ((got, want), (name, _)) in grads.iter().zip(&want).zip(&names) {
            let d = diff(got, want);
            println!(
                "{precision:?} grad {name}: rel err {:.3e} (limit {grad_tol:.1e})",
                d.rel
            );
            if d.has_nan || d.rel > grad_tol {
                bad.push(format!("{precision:?} grad {name}"));
            }
        }
        let same = runs[0].0.to_bits() == runs[1].0.to_bits()
            && runs[0]
                .1
                .iter()
                .flatten()
                .zip(runs[1].1.iter().flatten())
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            bad.push(format!("{precision:?}: two runs differ"));
        }
    }
    std::env::remove_var("VET_CE_ROWS");
    assert!(bad.is_empty(), "over the limit: {bad:?}");
}
