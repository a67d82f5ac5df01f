//! The golden outputs of the reference on the bundled tiny checkpoint, computed the same way
//! by `regen-fixtures` (which writes them) and by the golden test (which compares bytes).

use reference::loss::next_token_targets;
use reference::model::Batch;
use reference::rng::fnv1a64_bytes;
use reference::{
    AdamWConfig, InferenceEngine, MambaConfig, Params, ReferenceEngine, Tensor, TrainingEngine,
};

/// Seed of the tiny checkpoint's from-scratch init.
pub const TINY_SEED: u64 = 20261129;

/// The bundled tiny model: byte-level vocabulary (256 bytes + `<|endoftext|>`, padded to 264),
/// d_model 64, 2 layers, RMSNorm, tied embeddings.
pub fn tiny_config() -> MambaConfig {
    let mut c = MambaConfig::new(64, 2, 264);
    c.pad_vocab_size_multiple = 8;
    c
}

/// Golden batch: `[2, 32]` byte tokens cut from fixed offsets of `text`.
pub fn golden_tokens(text: &[u8]) -> Vec<u32> {
    let mut out = Vec::with_capacity(64);
    for start in [1000usize, 50_000] {
        out.extend(text[start..start + 32].iter().map(|&b| b as u32));
    }
    out
}

/// AdamW settings and learning rate of the 10-step golden trajectory.
pub fn golden_adamw() -> (AdamWConfig, f64) {
    (AdamWConfig::default(), 3e-3)
}

/// FNV-1a of the little-endian bytes of every parameter, in canonical order.
pub fn params_fingerprint(cfg: &MambaConfig, p: &Params<f32>) -> u64 {
    let mut bytes = Vec::new();
    for (name, t) in p.named(cfg) {
        bytes.extend_from_slice(name.as_bytes());
        for v in &t.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    fnv1a64_bytes(&bytes)
}

/// Fingerprint of a fresh init of the tiny config from [`TINY_SEED`]: pins the RNG and the
/// init rules to the bit on every platform.
pub fn init_fingerprint() -> u64 {
    let cfg = tiny_config();
    let init: Params<f32> = reference::init::init_params(&cfg, TINY_SEED);
    params_fingerprint(&cfg, &init)
}

/// Every golden tensor for `params`: `logits`, `loss`, `grad.<name>` and `trajectory` (10 AdamW
/// losses on the golden batch).
pub fn compute(
    cfg: &MambaConfig,
    params: Params<f32>,
    tokens: &[u32],
) -> Vec<(String, Tensor<f32>)> {
    let (batch, seq_len) = (2, tokens.len() / 2);
    let input = Batch::new(tokens, batch, seq_len);
    let (targets, mask) = next_token_targets(tokens, batch, seq_len);
    let mut e = ReferenceEngine::new(cfg.clone(), params);
    let (logits, _) = e.forward(&input, None).expect("golden forward");
    let lo = e
        .loss_and_backward(&input, &targets, Some(&mask), None, 1.0)
        .expect("golden backward");
    let mut out = vec![
        ("logits".to_string(), logits),
        (
            "loss".to_string(),
            Tensor::from_vec(&[], vec![lo.loss as f32]),
        ),
    ];
    for (name, g) in e.gradients().expect("golden gradients") {
        out.push((format!("grad.{name}"), g));
    }
    let (hp, lr) = golden_adamw();
    let mut traj = Vec::with_capacity(10);
    for _ in 0..10 {
        e.zero_grad().expect("zero_grad");
        let lo = e
            .loss_and_backward(&input, &targets, Some(&mask), None, 1.0)
            .expect("golden trajectory");
        traj.push(lo.loss as f32);
        e.optimizer_step(&hp, lr).expect("golden AdamW step");
    }
    out.push(("trajectory".to_string(), Tensor::from_vec(&[10], traj)));
    out
}
