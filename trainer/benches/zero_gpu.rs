//! The ZeRO driver on one GPU through NCCL at world size 1, for each stage 0–3 with and
//! without `offload_optimizer`: tokens/s of a whole step (forward, backward, the collectives,
//! AdamW wherever the stage keeps it, the weights back into the engine) and the device memory
//! in use after the steps, with the engine's own breakdown. bf16, random tokens; the
//! parameters are `gpu::bench::params` (fast, not the spec's init).
//!
//! ```text
//! cargo bench -p trainer --bench zero_gpu                                   # 1.4B, 8 x 2048
//! cargo bench -p trainer --bench zero_gpu -- --d-model 768 --layers 24 --batch 16
//! ```
//! Without a CUDA device or libnccl it prints why and exits 0.

use std::time::Instant;

use clap::Parser;
use gpu::comm::{unique_id, Nccl};
use reference::comm::Comm;
use reference::{AdamWConfig, MambaConfig};
use trainer::dist::config::OffloadDevice;
use trainer::dist::{ZeroConfig, ZeroDriver};
use trainer::train::source::TrainBatch;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2048)]
    d_model: usize,
    #[arg(long, default_value_t = 48)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    /// Timed steps per case (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Cases as STAGE or STAGE+off (offload_optimizer cpu), comma-separated.
    #[arg(
        long,
        default_value = "0,1,2,3,0+off,1+off,2+off,3+off",
        value_delimiter = ','
    )]
    cases: Vec<String>,
    /// Stage 3 layer by layer on the device (`GpuEngine::set_layered`; off: the whole model
    /// is gathered into the engine for each step).
    #[arg(long)]
    layered: bool,
    /// Host threads of the driver's AdamW (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn main() {
    let a = Args::parse();
    if let Err(e) = gpu::available() {
        println!("zero_gpu: no CUDA device ({e}); nothing measured");
        return;
    }
    let id = match unique_id() {
        Ok(id) => id,
        Err(e) => {
            println!("zero_gpu: no NCCL ({e}); nothing measured");
            return;
        }
    };
    let mut comm = Nccl::new(0, 1, &id, 0).expect("NCCL at world size 1");
    let cfg = MambaConfig::new(a.d_model, a.layers, 50280);
    // Made again for each case and moved into its engine: the host holds no spare copy of a
    // model that may take most of its memory.
    let n_params = reference::io_limits::param_count(&cfg) as usize;
    let n = a.batch * a.seq;
    let toks = gpu::bench::tokens(n + 1, cfg.vocab_size, 7);
    let micro = [TrainBatch {
        batch: a.batch,
        seq_len: a.seq,
        inputs: toks[..n].to_vec(),
        targets: toks[1..].to_vec(),
        mask: None,
        resets: vec![false; n],
        group: 0,
    }];
    let hp = AdamWConfig {
        max_grad_norm: Some(1.0),
        ..AdamWConfig::default()
    };
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "zero_gpu: {} ({:.2} B params, d_model {} × {} layers), {} × {} bf16, world size 1, {} host threads",
        gpu::bench::device_name(0),
        n_params as f64 / 1e9,
        a.d_model,
        a.layers,
        a.batch,
        a.seq,
        if a.threads == 0 { host } else { a.threads }
    );
    println!("| case | optimizer | step s | tokens/s | device GiB in use | engine: m + v GiB |");
    println!("|---|---|---|---|---|---|");
    for case in &a.cases {
        let (stage, off) = match case.split_once('+') {
            Some((s, "off")) => (s.parse::<u8>(), true),
            _ => (case.parse::<u8>(), false),
        };
        let Ok(stage) = stage else {
            println!("zero_gpu: case {case:?} is not STAGE or STAGE+off");
            std::process::exit(2);
        };
        let zc = ZeroConfig {
            stage,
            offload_optimizer: if off {
                OffloadDevice::Cpu
            } else {
                OffloadDevice::None
            },
            threads: a.threads,
            ..ZeroConfig::default()
        };
        let opts = gpu::GpuOptions {
            ordinal: 0,
            precision: gpu::Precision::Bf16,
        };
        let mut e = gpu::GpuEngine::new(&cfg, gpu::bench::params(&cfg), &opts).expect("engine");
        e.set_layered(a.layered);
        let mut d = ZeroDriver::new(&mut e, &mut comm, zc).expect("driver");
        let place = if d.in_engine() {
            "device, whole"
        } else if d.on_device() {
            "device, chunk"
        } else {
            "host"
        };
        let mut times = Vec::new();
        // Device memory in use right after each step (before the weights are gathered back
        // into the engine for use outside training, which stage 3 would otherwise show).
        let mut used = 0;
        for s in 0..=a.steps {
            let t = Instant::now();
            let out = d.step(&mut e, &mut comm, &micro, &hp, 1e-4).expect("step");
            assert!(out.loss.is_some(), "case {case}: step {s} was skipped");
            if s > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
            used = used.max(gpu::bench::used_memory());
            if s == 0 && stage == 3 {
                println!(
                    "zero_gpu: case {case}: {} (the most parameter and gradient elements held \
                     at once: {})",
                    if d.layered() == Some(true) {
                        "layer by layer"
                    } else {
                        "whole model"
                    },
                    e.layered_peak()
                        .map_or("-".into(), |p| format!("{:.1} M", p as f64 / 1e6))
                );
            }
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let mom = e
            .memory_breakdown()
            .iter()
            .find(|p| p.0 == "AdamW m + v")
            .map_or(0, |p| p.1);
        println!(
            "| {case} | {place} | {t:.3} | {:.0} | {:.1} | {:.2} |",
            n as f64 / t,
            gib(used),
            gib(mom)
        );
        drop(d);
        drop(e);
    }
    let _ = comm.barrier();
}
