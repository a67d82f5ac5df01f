//! The CUDA tier's lean training workspace (bf16 / fp16, `gpu/src/work.rs`): per layer it keeps
//! in_proj's output `xz` and the residual in 2 bytes and no gated scan output, so a layer keeps
//! `2 d_model + 8 d_inner` bytes per token fewer than in f32 (residual 4 → 2 bytes a value, xz
//! 4 → 2 over 2 d_inner values, the gated output's 4 bytes over d_inner gone), on the same
//! kernel build (same chunk states). Its loss and gradients are checked by `gpu_conformance`
//! and `gpu_head_chunks`; stateful windows by `carry_windows`.
//!
//! Without a CUDA device the test prints a `skipping` line and passes.

use conformance::{random_params, random_tokens, seed_of, SmallModel};
use reference::model::Batch;
use reference::rng::Rng;
use reference::TrainingEngine;

/// Bytes per token one layer keeps after a training step at `precision`.
fn layer_bytes(cfg: &reference::MambaConfig, precision: gpu::Precision) -> f64 {
    let p = random_params::<f32>(cfg, seed_of("gpu_lean"));
    let opts = gpu::GpuOptions {
        ordinal: 0,
        precision,
    };
    let mut e = gpu::GpuEngine::new(cfg, p, &opts).unwrap();
    let (b, l) = (2, 37);
    let mut rng = Rng::new(seed_of("gpu_lean batch"));
    let tokens = random_tokens(&mut rng, cfg, b * l);
    let targets = random_tokens(&mut rng, cfg, b * l);
    e.zero_grad().unwrap();
    let lo = e
        .loss_and_backward(&Batch::new(&tokens, b, l), &targets, None, None, 1.0)
        .unwrap();
    assert!(lo.loss.is_finite(), "{precision:?} loss {}", lo.loss);
    e.train_layer_bytes_per_token().unwrap()
}

#[test]
fn gpu_bf16_and_fp16_training_keep_xz_and_residual_in_two_bytes_and_no_gated_output() {
    if let Err(e) = gpu::available() {
        println!("skipping gpu_lean: {e}");
        return;
    }
    let model = SmallModel {
        d_model: 48,
        n_layer: 2,
        vocab: 97,
        d_state: 16,
        d_conv: 4,
        ..SmallModel::default()
    };
    let cfg = model.config();
    let full = layer_bytes(&cfg, gpu::Precision::F32);
    let want = (2 * cfg.d_model + 8 * cfg.d_inner) as f64;
    for precision in [gpu::Precision::Bf16, gpu::Precision::Fp16] {
        let lean = layer_bytes(&cfg, precision);
        println!("{precision:?}: {lean} bytes per token per layer (f32: {full})");
        assert_eq!(
            full - lean,
            want,
            "{precision:?}: {lean} against f32 {full}"
        );
    }
}
