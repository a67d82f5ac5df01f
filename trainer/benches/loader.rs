//! Pretraining loader throughput: `cargo bench -p trainer --bench loader`.
//!
//! Writes ~200M tokens of shards (documents of log-normal length, median ~700 tokens) into a
//! temporary directory, once with u16 and once with u32 tokens, then times `next_batch` and
//! `next_batch_into` at batch 8 x seq_len 2048 on one thread and prints input tokens/s.
//! Target: at least 10 M tokens/s on one core. The shards are freshly written, so they sit in
//! the page cache; the first touch of each page still pays its mmap fault inside the timing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reference::rng::Rng;
use trainer::data::loader::{Loader, LoaderConfig, TokenBatch};
use trainer::data::manifest::{
    hex, Manifest, ShardEntry, Skipped, Split, TokenizerRef, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use trainer::data::shard::{token_bytes_for, write_shard};

const TOTAL_TOKENS: usize = 200_000_000;
const SHARD_TOKENS: usize = 25_000_000;
const BATCH: usize = 8;
const SEQ_LEN: usize = 2048;
const SECONDS: f64 = 3.0;

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, nproc {nproc}")
}

/// Writes the corpus and its manifest into `dir`; returns the seconds it took.
fn write_corpus(dir: &Path, vocab: usize, seed: u64) -> f64 {
    let t0 = Instant::now();
    let sha = [3u8; 32];
    let mut rng = Rng::new(seed);
    let mut split = Split::default();
    let mut tokens = Vec::with_capacity(SHARD_TOKENS + 100_000);
    let mut starts = Vec::new();
    for i in 0..TOTAL_TOKENS.div_ceil(SHARD_TOKENS) {
        tokens.clear();
        starts.clear();
        while tokens.len() < SHARD_TOKENS {
            let len = ((6.5 + rng.normal()).exp() as usize).clamp(8, 100_000);
            starts.push(tokens.len() as u64);
            tokens.extend((0..len).map(|_| rng.below(vocab as u64 - 1) as u32));
            tokens.push(vocab as u32 - 1); // eot
        }
        let file = format!("train-{i:05}.bin");
        let h = write_shard(&dir.join(&file), &tokens, &starts, vocab, sha).expect("write shard");
        split.tokens += h.n_tokens;
        split.docs += h.n_docs;
        split.shards.push(ShardEntry {
            file,
            tokens: h.n_tokens,
            docs: h.n_docs,
            crc32: h.payload_crc32,
        });
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        tokenizer: TokenizerRef {
            sha256: hex(&sha),
            vocab_size: vocab,
            eot_id: vocab as u32 - 1,
            path: "bench".into(),
        },
        token_bytes: token_bytes_for(vocab),
        train: split,
        val: Split::default(),
        sources: vec![],
        skipped: Skipped::default(),
        val_fraction: 0.0,
        split_seed: 0,
    };
    manifest.save(dir).expect("save manifest");
    t0.elapsed().as_secs_f64()
}

/// Calls `step` until `SECONDS` have passed; returns input tokens per second.
fn time(mut step: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    let mut calls = 0u64;
    while t0.elapsed() < Duration::from_secs_f64(SECONDS) {
        step();
        calls += 1;
    }
    (calls * (BATCH * SEQ_LEN) as u64) as f64 / t0.elapsed().as_secs_f64()
}

fn bench(label: &str, vocab: usize) {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("vet-mamba-loader-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let write_s = write_corpus(&dir, vocab, 42);
    let cfg = LoaderConfig {
        batch: BATCH,
        seq_len: SEQ_LEN,
        seed: 1,
        rank: 0,
        world_size: 1,
    };
    let t0 = Instant::now();
    let mut loader = Loader::open(&dir, "train", cfg).expect("open loader");
    let open_s = t0.elapsed().as_secs_f64();
    println!(
        "{label}: {} tokens in {} shards written in {write_s:.1} s; open {:.1} ms; {} steps/epoch",
        loader.split_tokens(),
        TOTAL_TOKENS.div_ceil(SHARD_TOKENS),
        open_s * 1e3,
        loader.steps_per_epoch()
    );
    let fresh = time(|| {
        std::hint::black_box(loader.next_batch().expect("next_batch"));
    });
    let mut out = TokenBatch::default();
    let reused = time(|| {
        loader.next_batch_into(&mut out).expect("next_batch_into");
        std::hint::black_box(&out);
    });
    println!(
        "{label}: batch {BATCH} x seq_len {SEQ_LEN}, one thread: next_batch {:.1} M tokens/s, \
         next_batch_into {:.1} M tokens/s (target >= 10)",
        fresh / 1e6,
        reused / 1e6
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Batch loader throughput: tokens/s of `next_batch` on u16 and u32 shards (no options).
#[derive(clap::Parser)]
struct Args {
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    <Args as clap::Parser>::parse();
    println!("machine: {}", machine());
    bench("u16 tokens (vocab 50280)", 50_280);
    bench("u32 tokens (vocab 100000)", 100_000);
}
