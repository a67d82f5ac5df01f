//! Training throughput on the CPU: tokens/s of a full step (forward, loss, backward, AdamW)
//! for the `tiny` and `130m` presets, on random tokens.
//!
//! ```text
//! cargo bench -p trainer --bench train                 # both presets, --device cpu
//! cargo bench -p trainer --bench train -- --device reference-f64 --presets tiny
//! ```
//! `cpu` is the fastest CPU engine available (the scalar reference until the simd tier lands).

use std::time::Instant;

use reference::model::Batch;
use reference::rng::Rng;
use reference::AdamWConfig;
use trainer::train::run_config::preset;

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// Training throughput on the CPU: tokens/s of a full step.
#[derive(clap::Parser)]
struct Args {
    /// The engine (`--device` of vet-train).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Comma-separated presets.
    #[arg(long, default_value = "tiny,130m", value_delimiter = ',')]
    presets: Vec<String>,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let Args {
        device, presets, ..
    } = <Args as clap::Parser>::parse();
    println!("machine: {}; device {device}", machine());
    println!(
        "{:<8} {:>12} {:>10} {:>6} {:>10} {:>12} {:>10}",
        "preset", "parameters", "batch×seq", "steps", "seconds", "tokens/s", "GFLOP/s"
    );
    for name in presets.iter().map(String::as_str) {
        let mut cfg = preset(name)?;
        if name == "tiny" {
            cfg.vocab_size = 4096;
        }
        // Small shapes for the scalar reference; the step's cost is linear in tokens.
        let (batch, seq_len, steps) = if name == "tiny" {
            (8, 128, 5)
        } else {
            (1, 32, 1)
        };
        let params = reference::init::init_params::<f32>(&cfg, 0);
        let n_params = params.numel();
        let mut engine = trainer::device::engine(&device, &cfg, params)?;
        let mut rng = Rng::new(1);
        let tokens: Vec<u32> = (0..batch * (seq_len + 1))
            .map(|_| rng.below(cfg.vocab_size as u64) as u32)
            .collect();
        let inputs: Vec<u32> = (0..batch)
            .flat_map(|b| tokens[b * (seq_len + 1)..b * (seq_len + 1) + seq_len].to_vec())
            .collect();
        let targets: Vec<u32> = (0..batch)
            .flat_map(|b| tokens[b * (seq_len + 1) + 1..(b + 1) * (seq_len + 1)].to_vec())
            .collect();
        let hp = AdamWConfig::default();
        let started = Instant::now();
        for _ in 0..steps {
            engine.zero_grad();
            engine.loss_and_backward(
                &Batch::new(&inputs, batch, seq_len),
                &targets,
                None,
                None,
                1.0,
            )?;
            engine.optimizer_step(&hp, 1e-3)?;
        }
        let secs = started.elapsed().as_secs_f64();
        let tps = (steps * batch * seq_len) as f64 / secs;
        println!(
            "{name:<8} {n_params:>12} {:>10} {steps:>6} {secs:>10.2} {tps:>12.1} {:>10.2}",
            format!("{batch}×{seq_len}"),
            6.0 * n_params as f64 * tps / 1e9
        );
    }
    Ok(())
}
