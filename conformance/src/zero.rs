//! Fixtures the ZeRO tests share (`tests/zero*.rs`): a one-thread simd engine and seeded
//! random micro-batches.

use reference::init::init_params;
use reference::rng::Rng;
use reference::MambaConfig;
use simd::{SimdEngine, SimdOptions};
use trainer::train::source::TrainBatch;

/// A simd engine of `cfg` on one thread, its parameters initialised from `seed`.
pub fn simd_engine(cfg: &MambaConfig, seed: u64) -> SimdEngine {
    let opts = SimdOptions {
        threads: 1,
        ..SimdOptions::default()
    };
    SimdEngine::new(cfg.clone(), init_params(cfg, seed), &opts).unwrap()
}

/// `rows × seq_len` tokens and targets drawn from `seed`, then document resets, each position
/// a reset with probability `1 / reset_every` (no mask).
pub fn train_batch(
    cfg: &MambaConfig,
    (rows, seq_len): (usize, usize),
    seed: u64,
    reset_every: u64,
) -> TrainBatch {
    let mut rng = Rng::new(seed);
    let n = rows * seq_len;
    let vocab = cfg.vocab_size as u64;
    let inputs: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let targets: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let resets = (0..n)
        .map(|_| rng.next_u64().is_multiple_of(reset_every))
        .collect();
    TrainBatch {
        batch: rows,
        seq_len,
        inputs,
        targets,
        mask: None,
        resets,
        group: 0,
    }
}
