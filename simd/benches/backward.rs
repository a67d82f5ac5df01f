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

use rayon::{ThreadPool, ThreadPoolBuilder};
use reference::loss::{cross_entropy, next_token_targets};
use reference::model::{backward, forward, Batch};
use reference::rng::Rng;
use reference::{MambaConfig, Params};

/// 2 cores × AVX2 FMA (2 × 8-lane FMA per cycle) × ~3 GHz, in GFLOP/s.
const PEAK_GFLOPS: f64 = 190.0;

/// Backward of one Mamba-130M-shaped layer against the machine's f32 peak.
#[derive(clap::Parser)]
struct Args {
    /// Skip the (slow) reference backward.
    #[arg(long)]
    no_reference: bool,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let skip_reference = <Args as clap::Parser>::parse().no_reference;
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
        let gemm = gemm_gflops(&pool, &lo.d_logits);
        println!(
            "simd, {threads} thread(s): median {:.1} ms, best {:.1} ms, {:.1} GFLOP/s ({:.0}% of the {PEAK_GFLOPS:.0} GFLOP/s 2-core peak), {:.0} tokens/s",
            median * 1e3,
            best * 1e3,
            flops / median / 1e9,
            100.0 * flops / median / 1e9 / PEAK_GFLOPS,
            n as f64 / median
        );
        println!(
            "  (what the machine gives now: a lone in_proj-shaped weight-gradient GEMM, [1536, 512] x [512, 768], runs at {gemm:.1} GFLOP/s on this pool)"
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

/// Median GFLOP/s of `simd::gemm::sgemm` on the in_proj weight-gradient shape (`dyᵀ · x`,
/// m 1536, k 512, n 768, A read transposed), as a yardstick for the contended machine.
fn gemm_gflops(pool: &ThreadPool, seed: &[f32]) -> f64 {
    let (m, k, n) = (1536, 512, 768);
    let a: Vec<f32> = (0..k * m).map(|i| seed[i % seed.len()] + 1e-3).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    let mut times = Vec::new();
    for _ in 0..6 {
        let t = Instant::now();
        simd::gemm::sgemm(pool, m, k, n, 1.0, &a, 1, m, &b, n, 1, 1.0, &mut c, n, 1);
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    2.0 * (m * k * n) as f64 / times[times.len() / 2] / 1e9
}
