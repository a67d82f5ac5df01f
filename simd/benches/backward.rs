//! Backward of one Mamba-130M-shaped layer (d_model 768, d_inner 1536, d_state 16, dt_rank
//! 48, d_conv 4) at batch 1 × 512 tokens, on 1 and all threads, against the machine's f32
//! peak; and the reference's backward for comparison (`--no-reference` skips it).
//!
//! `cargo bench -p simd --bench backward`
//!
//! The vocabulary is 256 so that the lm_head stays a small share; the FLOP count is the
//! matrix products' (`4 · n · d_in · d_out` per linear: weight and input gradients), which
//! are most of the work.

use std::time::Instant;

use rayon::ThreadPoolBuilder;
use reference::loss::{cross_entropy, next_token_targets};
use reference::model::{backward, forward, Batch};
use reference::rng::Rng;
use reference::{MambaConfig, Params};

/// 2 cores × AVX2 FMA (2 × 8-lane FMA per cycle) × ~3 GHz, in GFLOP/s.
const PEAK_GFLOPS: f64 = 190.0;

fn main() {
    let skip_reference = std::env::args().any(|a| a == "--no-reference");
    let mut cfg = MambaConfig::new(768, 1, 256);
    cfg.dt_rank = 48;
    let (batch, seq_len) = (1, 512);
    let n = batch * seq_len;
    let params: Params<f32> = reference::init::init_params(&cfg, 1);
    let mut rng = Rng::new(2);
    let tokens: Vec<u32> = (0..n)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let input = Batch::new(&tokens, batch, seq_len);
    let t0 = Instant::now();
    let (logits, _, cache) = forward(&cfg, &params, &input, None, true).expect("forward");
    let fwd_s = t0.elapsed().as_secs_f64();
    let cache = cache.expect("cache");
    let (targets, mask) = next_token_targets(&tokens, batch, seq_len);
    let lo = cross_entropy(&logits.data, &targets, Some(&mask), cfg.vocab_size, 1.0).expect("loss");

    let (dm, di, r, xr) = (cfg.d_model, cfg.d_inner, cfg.dt_rank, cfg.x_proj_rows());
    let linears = [
        (dm, 2 * di),
        (di, xr),
        (r, di),
        (di, dm),
        (dm, cfg.vocab_size),
    ];
    let flops: f64 = linears.iter().map(|&(a, b)| 4.0 * (n * a * b) as f64).sum();
    println!(
        "backward, one layer d_model {dm} d_inner {di} d_state {} dt_rank {r}, batch {batch} x {seq_len}: {:.2} GFLOP in matrix products",
        cfg.d_state,
        flops / 1e9
    );
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mut thread_counts = vec![1];
    if cores > 1 {
        thread_counts.push(cores);
    }
    for threads in thread_counts {
        let pool = ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let mut grads = Params::zeros(&cfg);
        let mut times = Vec::new();
        for _ in 0..6 {
            let t = Instant::now();
            simd::backward::backward(
                &pool,
                &cfg,
                &params,
                &input,
                None,
                &cache,
                &lo.d_logits,
                &mut grads,
            )
            .expect("simd backward");
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0); // warm-up
        times.sort_by(f64::total_cmp);
        let (best, median) = (times[0], times[times.len() / 2]);
        println!(
            "simd, {threads} thread(s): median {:.1} ms, best {:.1} ms, {:.1} GFLOP/s ({:.0}% of the {PEAK_GFLOPS:.0} GFLOP/s 2-core peak), {:.0} tokens/s",
            median * 1e3,
            best * 1e3,
            flops / median / 1e9,
            100.0 * flops / median / 1e9 / PEAK_GFLOPS,
            n as f64 / median
        );
    }
    if !skip_reference {
        let mut grads = Params::zeros(&cfg);
        let t = Instant::now();
        backward(
            &cfg,
            &params,
            &input,
            None,
            &cache,
            &lo.d_logits,
            &mut grads,
        )
        .expect("reference backward");
        let s = t.elapsed().as_secs_f64();
        println!(
            "reference (scalar, 1 thread): backward {:.0} ms ({:.2} GFLOP/s); forward {:.0} ms",
            s * 1e3,
            flops / s / 1e9,
            fwd_s * 1e3
        );
    }
}
