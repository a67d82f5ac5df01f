//! How the host-side AdamW of the ZeRO driver (`offload_optimizer`, and every stage today:
//! see `trainer/src/dist/mod.rs`) grows with the parameter count: seconds per update of a
//! flat shard of N parameters with the simd tier's `adamw_update_flat`, the bytes it moves
//! (p, m, v read and written, g read: 28 bytes a parameter) as GB/s, and that against a
//! copy bandwidth measured in the same run.
//!
//! ```text
//! cargo bench -p trainer --bench zero_host                         # 10M..370M, every thread
//! cargo bench -p trainer --bench zero_host -- --millions 130,1400 --threads 16
//! ```
//! A 1.4B shard needs 22.4 GB of host memory (four f32 arrays).

use std::time::Instant;

use reference::rng::Rng;
use reference::AdamWConfig;

/// Host AdamW time against the parameter count.
#[derive(clap::Parser)]
struct Args {
    /// Shard sizes in millions of parameters, comma-separated.
    #[arg(long, default_value = "10,50,130,370", value_delimiter = ',')]
    millions: Vec<usize>,
    /// Threads of the update (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Timed updates per size (after one warm-up).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Best-of-three copy bandwidth (read + write bytes) over `n` f32 with `pool`.
fn copy_gbs(pool: &rayon::ThreadPool, n: usize) -> f64 {
    use rayon::prelude::*;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        pool.install(|| {
            dst.par_chunks_mut(1 << 16)
                .zip(src.par_chunks(1 << 16))
                .for_each(|(d, s)| d.copy_from_slice(s))
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    8.0 * n as f64 / best / 1e9
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {}, {threads} threads; load average {}",
        cpu_name(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let copy = copy_gbs(&pool, 64 << 20);
    println!("copy bandwidth (256 MiB): {copy:.1} GB/s");
    println!(
        "{:>10} {:>12} {:>12} {:>9} {:>10}",
        "params", "s/update", "ns/param", "GB/s", "% of copy"
    );
    let hp = AdamWConfig::default();
    for m in &args.millions {
        let n = m * 1_000_000;
        let mut rng = Rng::new(7);
        let g: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 1e-3).collect();
        let mut p: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 0.02).collect();
        let (mut mo, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let runs = [(0..n / 2, true), (n / 2..n, false)];
        let mut times = Vec::new();
        for step in 1..=(args.reps + 1) as u64 {
            let t = Instant::now();
            simd::optim::adamw_update_flat(
                &pool, &hp, 1e-4, step, &mut p, &g, &mut mo, &mut v, &runs,
            );
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0);
        times.sort_by(f64::total_cmp);
        let s = times[times.len() / 2];
        let gbs = 28.0 * n as f64 / s / 1e9;
        println!(
            "{:>9}M {s:>12.4} {:>12.3} {gbs:>9.1} {:>9.0}%",
            m,
            s * 1e9 / n as f64,
            100.0 * gbs / copy
        );
        std::hint::black_box(&p);
    }
    Ok(())
}
