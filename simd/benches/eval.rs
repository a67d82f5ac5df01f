//! Validation cost on the CPU tier: one `[eval] batches` pass of the quickstart config
//! (d_model 64, 2 layers, vocabulary 4096; 4 batches of 8 × 128 tokens) as the trainer ran it
//! before the engine split (`zero_grad` + `loss_and_backward` with `grad_scale` 0, then
//! `zero_grad`) and as it runs now (the forward-only `InferenceEngine::loss`).
//!
//! `cargo bench -p simd --bench eval` (all cores; `-- --threads N` to choose)

use std::time::Instant;

use reference::loss::next_token_targets;
use reference::model::Batch;
use reference::rng::Rng;
use reference::{InferenceEngine, MambaConfig, TrainingEngine};
use simd::{SimdEngine, SimdOptions};

const BATCHES: usize = 4;
const REPEATS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = match args.iter().position(|a| a == "--threads") {
        Some(i) => match args.get(i + 1).and_then(|v| v.parse().ok()) {
            Some(n) => n,
            None => {
                eprintln!("--threads expects a number");
                std::process::exit(2);
            }
        },
        None => 0,
    };
    let cfg = MambaConfig::new(64, 2, 4096);
    let (batch, seq_len) = (8, 128);
    let params = reference::init::init_params::<f32>(&cfg, 1);
    let opts = SimdOptions {
        threads,
        ..SimdOptions::default()
    };
    let mut e = SimdEngine::new(cfg.clone(), params, &opts).expect("engine");
    let mut rng = Rng::new(2);
    let data: Vec<(Vec<u32>, Vec<u32>, Vec<bool>)> = (0..BATCHES)
        .map(|_| {
            let tokens: Vec<u32> = (0..batch * seq_len)
                .map(|_| rng.below(cfg.vocab_size as u64) as u32)
                .collect();
            let (targets, mask) = next_token_targets(&tokens, batch, seq_len);
            (tokens, targets, mask)
        })
        .collect();
    let mut old = f64::INFINITY;
    let mut new = f64::INFINITY;
    let (mut old_loss, mut new_loss) = (0.0, 0.0);
    for _ in 0..REPEATS {
        let t = Instant::now();
        for (tokens, targets, mask) in &data {
            let input = Batch::new(tokens, batch, seq_len);
            e.zero_grad().expect("zero_grad");
            let lo = e
                .loss_and_backward(&input, targets, Some(mask), None, 0.0)
                .expect("loss_and_backward");
            old_loss = lo.loss;
        }
        e.zero_grad().expect("zero_grad");
        old = old.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (tokens, targets, mask) in &data {
            let input = Batch::new(tokens, batch, seq_len);
            new_loss = e
                .loss(&input, targets, Some(mask), None)
                .expect("loss")
                .loss;
        }
        new = new.min(t.elapsed().as_secs_f64());
    }
    let tokens = (BATCHES * batch * seq_len) as f64;
    println!(
        "{} — quickstart shape, {BATCHES} batches of {batch} × {seq_len}, best of {REPEATS}",
        e.name()
    );
    println!(
        "before (loss_and_backward): {:>8.1} ms  {:>10.0} tokens/s  last loss {old_loss:.6}",
        old * 1e3,
        tokens / old
    );
    println!(
        "after  (forward-only loss): {:>8.1} ms  {:>10.0} tokens/s  last loss {new_loss:.6}",
        new * 1e3,
        tokens / new
    );
    println!("speed-up {:.2}×", old / new);
}
