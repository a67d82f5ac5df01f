//! CPU inference benchmark: prefill tokens/s of a 512-token prompt and decode tokens/s over
//! 128 tokens at batch 1, for random-weight models of the mamba-130m and mamba-1.4b shapes,
//! for each weight precision, against the decode limit that the machine's measured memory
//! bandwidth sets (weights read per token ÷ bandwidth); then the total decode tokens/s of
//! batched steps (B sequences per step, one pass over the weights) at each `--batches` size.
//!
//! ```sh
//! cargo bench -p simd --bench inference                       # both shapes, every precision
//! cargo bench -p simd --bench inference -- --models 130m --dtypes f32,int8 --threads 2
//! ```

use std::time::Instant;

use reference::{InferenceEngine, MambaConfig, NormKind, State};
use simd::model::{a_from_log, LayerWeights, Weights};
use simd::weights::Mat;
use simd::{SimdEngine, SimdOptions, WeightDtype};

mod common;
use common::{machine, Fill};

/// CPU inference benchmark at batch 1.
#[derive(clap::Parser)]
struct Args {
    /// Comma-separated model shapes (130m, 370m, 790m, 1.4b, 2.8b).
    #[arg(long, default_value = "130m,1.4b", value_delimiter = ',', value_parser = ["130m", "370m", "790m", "1.4b", "2.8b"])]
    models: Vec<String>,
    /// Comma-separated weight precisions.
    #[arg(long, default_value = "f32,bf16,int8,int4", value_delimiter = ',')]
    dtypes: Vec<WeightDtype>,
    /// Comma-separated batch sizes for the batched decode totals (empty: none).
    #[arg(long, default_value = "1,4,8,16", value_delimiter = ',')]
    batches: Vec<usize>,
    /// Batched decode steps per measurement.
    #[arg(long, default_value_t = 32)]
    batch_steps: usize,
    /// Force an instruction set (avx512-bf16, avx512-vnni, avx512, avx2+fma, portable); default:
    /// the best this CPU has.
    #[arg(long)]
    isa: Option<String>,
    /// Threads (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Prompt tokens.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Decoded tokens.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    /// Runs of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn args() -> Args {
    <Args as clap::Parser>::parse()
}

fn shape(name: &str) -> MambaConfig {
    let (d, l) = match name {
        "130m" => (768, 24),
        "370m" => (1024, 48),
        "790m" => (1536, 48),
        "1.4b" => (2048, 48),
        "2.8b" => (2560, 64),
        o => panic!("unknown model shape {o}"),
    };
    let mut c = MambaConfig::new(d, l, 50280);
    c.norm = NormKind::Rms;
    c
}

/// Random weights of `cfg`'s shape in `dtype`, built matrix by matrix (no f32 copy of the
/// whole model).
fn random_weights(cfg: &MambaConfig, dtype: WeightDtype) -> Weights {
    let mut f = Fill(0x9e3779b97f4a7c15);
    let (dm, di, ds, r, dc) = (
        cfg.d_model,
        cfg.d_inner,
        cfg.d_state,
        cfg.dt_rank,
        cfg.d_conv,
    );
    let mut mat =
        |rows: usize, cols: usize, s: f32| Mat::from_f32(rows, cols, f.vec(rows * cols, s), dtype);
    let embed = mat(cfg.vocab_size, dm, 0.02);
    let layers = (0..cfg.n_layer)
        .map(|_| {
            let a_log: Vec<f32> = (0..di * ds).map(|i| ((i % ds) as f32 + 1.0).ln()).collect();
            LayerWeights {
                norm_w: vec![1.0; dm],
                norm_b: None,
                in_proj: mat(2 * di, dm, 0.02),
                in_proj_b: None,
                conv_w: vec![0.25; di * dc],
                conv_b: Some(vec![0.0; di]),
                x_proj: mat(r + 2 * ds, di, 0.02),
                dt_proj: mat(di, r, 0.1),
                dt_b: vec![-4.0; di],
                a: a_from_log(&a_log),
                d: vec![1.0; di],
                out_proj: mat(dm, di, 0.02),
                out_b: None,
            }
        })
        .collect();
    Weights {
        dtype,
        embed,
        layers,
        norm_f_w: vec![1.0; dm],
        norm_f_b: None,
        lm_head: None,
    }
}

/// Read bandwidth of `threads` threads streaming a 1 GiB buffer (best of 5).
fn bandwidth(pool: &rayon::ThreadPool) -> f64 {
    use rayon::prelude::*;
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let s: u64 = pool.install(|| {
            buf.par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                .reduce(|| 0, |a, b| a.wrapping_add(b))
        });
        let gbs = (words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9;
        std::hint::black_box(s);
        best = best.max(gbs);
    }
    best
}

/// CPU time of every thread of this process so far, in seconds (Linux: the `schedstat` of
/// each task; 0 elsewhere). Tokens per CPU-second at `--threads 1` compare kernels on a
/// machine whose other load makes wall-clock figures swing.
fn cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let a = args();
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let bw = bandwidth(&pool);
    println!("machine: {}", machine());
    println!("memory read bandwidth, {threads} threads: {bw:.1} GB/s");
    println!(
        "batch 1, prompt {} tokens, {} decoded tokens, median of {} runs",
        a.prompt, a.decode, a.runs
    );
    let mut rows = Vec::new();
    for m in &a.models {
        let cfg = shape(m);
        for &dt in &a.dtypes {
            let t0 = Instant::now();
            let w = random_weights(&cfg, dt);
            let bytes = w.decode_bytes() as f64;
            let opts = SimdOptions {
                threads,
                dtype: dt,
                isa: isa_arg(a.isa.as_deref()),
            };
            let mut e = SimdEngine::from_weights(cfg.clone(), w, &opts).expect("engine");
            eprintln!(
                "{m} {}: weights ready in {:.1}s ({:.2} GB read per token)",
                dt.name(),
                t0.elapsed().as_secs_f64(),
                bytes / 1e9
            );
            let [p, d, pc, dc] = prefill_decode(&mut e, &cfg, &a);
            let limit = bw * 1e9 / bytes;
            eprintln!(
                "{m} {}: prefill {p:.1} tok/s, decode {d:.2} tok/s ({:.0} % of {limit:.1}); \
                 per CPU-second: prefill {pc:.1}, decode {dc:.2}",
                dt.name(),
                100.0 * d / limit
            );
            let totals = batched(&mut e, &cfg, &a.batches, a.batch_steps);
            rows.push((m.clone(), dt, p, d, limit, totals));
        }
    }
    println!();
    println!("| model | weights | prefill tok/s | decode tok/s | decode limit | % of limit |");
    println!("|---|---|---|---|---|---|");
    for (m, dt, p, d, limit, _) in &rows {
        println!(
            "| {m} | {} | {p:.1} | {d:.2} | {limit:.1} | {:.0} % |",
            dt.name(),
            100.0 * d / limit
        );
    }
    if a.batches.is_empty() {
        return;
    }
    println!();
    let head: Vec<String> = a.batches.iter().map(|b| format!("batch {b}")).collect();
    println!(
        "total decode tok/s, batched steps ({} steps each): | model | weights | {} |",
        a.batch_steps,
        head.join(" | ")
    );
    for (m, dt, _, _, _, totals) in &rows {
        let t: Vec<String> = totals.iter().map(|v| format!("{v:.1}")).collect();
        println!("| {m} | {} | {} |", dt.name(), t.join(" | "));
    }
}

/// Median prefill and decode tokens/s at batch 1 over `a.runs` runs, then the same per
/// CPU-second: `[prefill, decode, prefill per CPU-s, decode per CPU-s]`.
fn prefill_decode(e: &mut SimdEngine, cfg: &MambaConfig, a: &Args) -> [f64; 4] {
    let prompt: Vec<u32> = (0..a.prompt as u32).map(|i| (i * 7919) % 50280).collect();
    let mut logits = vec![0f32; cfg.vocab_size];
    let (mut pre, mut dec, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.runs {
        let mut st = State::zeros(cfg, 1);
        let (t, c) = (Instant::now(), cpu_secs());
        e.prefill(&prompt, &mut st, &mut logits).expect("prefill");
        pre.push(a.prompt as f64 / t.elapsed().as_secs_f64());
        let c1 = cpu_secs();
        let mut tok = [simd_argmax(&logits)];
        let t = Instant::now();
        for _ in 0..a.decode {
            e.step_into(&tok, None, &mut st, &mut logits).expect("step");
            tok[0] = simd_argmax(&logits);
        }
        dec.push(a.decode as f64 / t.elapsed().as_secs_f64());
        let c2 = cpu_secs();
        cpu.push((a.prompt as f64 / (c1 - c), a.decode as f64 / (c2 - c1)));
    }
    let (p, d) = (median(pre), median(dec));
    let (pc, dc) = (
        median(cpu.iter().map(|c| c.0).collect()),
        median(cpu.iter().map(|c| c.1).collect()),
    );
    [p, d, pc, dc]
}

fn isa_arg(name: Option<&str>) -> Option<simd::Isa> {
    let name = name?;
    let isa = simd::Isa::ALL
        .into_iter()
        .find(|i| i.name() == name)
        .unwrap_or_else(|| {
            let all: Vec<_> = simd::Isa::ALL.iter().map(|i| i.name()).collect();
            panic!("--isa {name}: expected one of {}", all.join(", "))
        });
    Some(isa)
}

/// Total decode tokens/s of `steps` steps over `b` sequences at once, for each `b`.
fn batched(e: &mut SimdEngine, cfg: &MambaConfig, batches: &[usize], steps: usize) -> Vec<f64> {
    let v = cfg.vocab_size;
    batches
        .iter()
        .map(|&b| {
            let mut st = State::zeros(cfg, b);
            let mut logits = vec![0f32; b * v];
            let mut toks: Vec<u32> = (0..b as u32).map(|i| (i * 7919 + 11) % v as u32).collect();
            // One warm-up step sizes the buffers.
            e.step_into(&toks, None, &mut st, &mut logits)
                .expect("step");
            let (t, c) = (Instant::now(), cpu_secs());
            for _ in 0..steps {
                e.step_into(&toks, None, &mut st, &mut logits)
                    .expect("step");
                for (i, tk) in toks.iter_mut().enumerate() {
                    *tk = simd_argmax(&logits[i * v..(i + 1) * v]);
                }
            }
            let total = (b * steps) as f64 / t.elapsed().as_secs_f64();
            let per_cpu = (b * steps) as f64 / (cpu_secs() - c);
            eprintln!("  batch {b}: {total:.1} tok/s total, {per_cpu:.1} per CPU-second");
            total
        })
        .collect()
}

fn simd_argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}
