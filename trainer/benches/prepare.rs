//! Benchmark of `vet-data prepare` on a synthetic veterinary corpus.
//!
//! ```text
//! cargo bench -p trainer --bench prepare -- --gb 1 [--dir PATH] [--threads N] [--tokenizer PATH]
//! ```
//!
//! Generates (once; reused when present) a deterministic JSON Lines corpus of about `--gb` GB
//! of text by recombining the sentences of `fixtures/data/corpus.jsonl` with a seeded RNG,
//! in 8 files of which half are gzip'd, at 0.25x and 1x of `--gb`, under `--dir` (default
//! `$TMPDIR/vet-mamba-prepare-bench`). Then runs the release `vet-data prepare` on each as a
//! subprocess and prints input size, seconds, MB/s, MB/s per core, tokens/s and peak RSS
//! (from the summary `vet-data` prints).
//!
//! `vet-data` is the binary cargo builds beside this bench (`CARGO_BIN_EXE_vet-data`), or
//! `target/release/vet-data` next to the bench executable, or `$VET_DATA` when set.
//! The tokenizer is `fixtures/tokenizer/tokenizer.json` (the 4096-token BPE) when it exists,
//! else the byte-level `fixtures/tiny/tokenizer.json`.

use reference::rng::Rng;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Bump when the generator changes, so stale corpora are regenerated.
const GENERATOR_VERSION: u32 = 1;
const FILES: usize = 8;
const MB: f64 = 1e6;

/// Benchmark of `vet-data prepare` on a synthetic veterinary corpus.
#[derive(clap::Parser)]
struct Config {
    /// Size of the larger corpus in GB of text (a second one is a quarter of it).
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    gb: f64,
    /// Where the generated corpora (and prepare's output) go.
    #[arg(long, default_value_os_t = std::env::temp_dir().join("vet-mamba-prepare-bench"))]
    dir: PathBuf,
    /// Threads for `vet-data prepare` (default: every core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// The tokenizer.json to prepare with.
    #[arg(long, default_value_os_t = default_tokenizer())]
    tokenizer: PathBuf,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        Ok(_) => Err("must be a positive number".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn default_tokenizer() -> PathBuf {
    let bpe = fixtures::root().join("tokenizer").join("tokenizer.json");
    if bpe.is_file() {
        bpe
    } else {
        fixtures::tiny_checkpoint().join("tokenizer.json")
    }
}

fn vet_data_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VET_DATA") {
        return Ok(p.into());
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_vet-data") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("no bench folder")?;
    let bin = release.join("vet-data");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build --release -p trainer --bin vet-data` or set VET_DATA",
            bin.display()
        ))
    }
}

/// Sentences and species of the bundled corpus.
fn sentences() -> Result<(Vec<String>, Vec<String>), String> {
    let path = fixtures::data().join("corpus.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut sents, mut species) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        if let Some(t) = v["text"].as_str() {
            sents.extend(t.split(". ").map(|s| s.trim_end_matches('.').to_string()));
        }
        if let Some(s) = v["species"].as_str() {
            species.push(s.to_string());
        }
    }
    species.sort();
    species.dedup();
    Ok((sents, species))
}

/// Writes file `i` of a corpus (~`bytes` of JSON Lines); returns the uncompressed bytes.
fn write_file(path: &Path, seed: u64, bytes: u64, src: &(Vec<String>, Vec<String>)) -> u64 {
    let (sents, species) = src;
    let file = std::fs::File::create(path).expect("creating a corpus file");
    let mut out: Box<dyn Write> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::write::GzEncoder::new(
            BufWriter::new(file),
            flate2::Compression::fast(),
        ))
    } else {
        Box::new(BufWriter::new(file))
    };
    let mut rng = Rng::new(seed);
    let (mut written, mut doc) = (0u64, 0u64);
    while written < bytes {
        let mut text = String::new();
        for j in 0..3 + rng.below(40) as usize {
            text.push_str(&sents[rng.below(sents.len() as u64) as usize]);
            text.push_str(if j % 5 == 4 { ".\n\n" } else { ". " });
        }
        let line = serde_json::json!({
            "text": text,
            "title": format!("Case {seed}-{doc}"),
            "species": species[rng.below(species.len() as u64) as usize],
        });
        let line = format!("{line}\n");
        out.write_all(line.as_bytes())
            .expect("writing a corpus file");
        written += line.len() as u64;
        doc += 1;
    }
    out.flush().expect("writing a corpus file");
    written
}

/// Generates (or reuses) a corpus of about `bytes`; returns its folder and text bytes.
fn corpus(base: &Path, bytes: u64) -> Result<(PathBuf, u64), String> {
    let dir = base.join(format!("corpus-{bytes}"));
    let stamp = dir.join("complete.txt");
    if let Ok(s) = std::fs::read_to_string(&stamp) {
        if let Some(text) = s.strip_prefix(&format!("v{GENERATOR_VERSION} ")) {
            if let Ok(n) = text.trim().parse() {
                return Ok((dir, n));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let src = sentences()?;
    eprintln!(
        "generating {:.0} MB corpus in {}",
        bytes as f64 / MB,
        dir.display()
    );
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..FILES)
            .map(|i| {
                let ext = if i % 2 == 1 { "jsonl.gz" } else { "jsonl" };
                let path = dir.join(format!("vet-{i:02}.{ext}"));
                let src = &src;
                s.spawn(move || write_file(&path, 1000 + i as u64, bytes / FILES as u64, src))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    std::fs::write(&stamp, format!("v{GENERATOR_VERSION} {total}\n"))
        .map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok((dir, total))
}

fn disk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A number after `key` in the summary `vet-data prepare` printed.
fn field(summary: &str, key: &str) -> Option<f64> {
    let rest = &summary[summary.find(key)? + key.len()..];
    rest.split_whitespace()
        .next()?
        .trim_end_matches(',')
        .parse()
        .ok()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("prepare bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<(), String> {
    let cfg = <Config as clap::Parser>::parse();
    let bin = vet_data_binary()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cfg.threads.unwrap_or(cores);
    println!(
        "machine: {cores} cores, {}; vet-data {}; tokenizer {}",
        cpu_model(),
        bin.display(),
        cfg.tokenizer.display()
    );
    println!(
        "{:>6} {:>9} {:>9} {:>8} {:>9} {:>12} {:>11} {:>9}",
        "scale", "disk MB", "text MB", "seconds", "MB/s", "MB/s/thread", "tokens/s", "peak MB"
    );
    for scale in [0.25, 1.0] {
        let (dir, text_bytes) = corpus(&cfg.dir, (cfg.gb * scale * 1e9) as u64)?;
        let out = cfg.dir.join("out");
        let _ = std::fs::remove_dir_all(&out);
        let t0 = Instant::now();
        let output = Command::new(&bin)
            .arg("prepare")
            .arg("--input")
            .arg(&dir)
            .arg("--tokenizer")
            .arg(&cfg.tokenizer)
            .arg("--out")
            .arg(&out)
            .arg("--threads")
            .arg(threads.to_string())
            .output()
            .map_err(|e| format!("running {}: {e}", bin.display()))?;
        let secs = t0.elapsed().as_secs_f64();
        let summary = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(format!(
                "vet-data prepare failed:\n{summary}{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let tokens =
            field(&summary, "tokens:").unwrap_or(0.0) + field(&summary, "train, ").unwrap_or(0.0);
        let peak = field(&summary, "peak memory:").unwrap_or(f64::NAN);
        let rate = text_bytes as f64 / MB / secs;
        println!(
            "{:>5}x {:>9.1} {:>9.1} {:>8.1} {:>9.2} {:>12.2} {:>11.3e} {:>9.1}",
            scale,
            disk_bytes(&dir) as f64 / MB,
            text_bytes as f64 / MB,
            secs,
            rate,
            rate / threads as f64,
            tokens / secs,
            peak
        );
        let _ = std::fs::remove_dir_all(&out);
    }
    println!("MB/s counts uncompressed JSON Lines bytes; {threads} threads");
    Ok(())
}
