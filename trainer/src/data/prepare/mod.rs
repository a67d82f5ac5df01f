//! `vet-data prepare`: turn `.txt` / `.jsonl` corpora (plain, `.gz`, `.zst` / `.zstd`; read
//! through [`crate::data::inputs`], as `vet-data tokenizer` reads them) into train/val
//! token shards and a `manifest.json`, at any scale.
//!
//! The inputs are cut into work units (see `sources::plan`) that run in parallel; each unit
//! writes its own shards and then a done-marker, so an interrupted run resumes where it
//! stopped and `--part i/n` spreads the units over machines. Documents go to val by a hash of
//! the seed and their text, so the output does not depend on the thread count.

mod fastbpe;
mod fingerprint;
mod marker;
mod reader;
mod report;
mod sources;
mod unit;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::data::manifest::{
    hex, Manifest, SourceFile, TokenizerRef, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use crate::data::shard::token_bytes_for;
use crate::lock::{DirLock, Mode, LOCK_FILE};
use crate::tokenizer::EOT;
pub use marker::UnitMarker;
pub use report::Summary;
use sources::{Source, Unit};
use unit::{Ctx, Stopped};
use writer::ShardMeta;

/// Arguments of `vet-data prepare`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Inputs: .txt (one document per file) and .jsonl (one JSON object per \
    line, the document in --field), each plain, .gz or .zst / .zstd; folders are walked \
    recursively (other files in them are skipped with a warning; a file named directly must be \
    one of these). Parquet is not supported: convert it to JSON Lines first.\n\
    Re-running with the same options resumes: a finished unit is kept while its input is \
    unchanged (size, modification time and a hash of its bytes). One run per output folder \
    (`--part` runs share it)."
)]
pub struct Args {
    /// Input files or folders (.txt, .jsonl, plain / .gz / .zst / .zstd; not Parquet).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// The tokenizer.json to tokenize with (must have <|endoftext|>).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output folder for shards, done-markers and manifest.json.
    #[arg(long)]
    pub out: PathBuf,
    /// The JSON field holding a .jsonl document's text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Fraction of documents sent to the val split.
    #[arg(long, default_value_t = 0.01)]
    pub val_fraction: f64,
    /// Seed of the train/val choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens per shard.
    #[arg(long, default_value_t = 16_777_216)]
    pub shard_tokens: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Process only units whose index % n == i ("i/n", 0-based), for several machines.
    #[arg(long, value_parser = parse_part)]
    pub part: Option<(usize, usize)>,
    /// Only assemble manifest.json from the done-markers (after all parts ran).
    #[arg(long)]
    pub merge_only: bool,
    /// Stop at the first bad record instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Size of a work unit: uncompressed .jsonl files larger than this are split.
    #[arg(long, default_value_t = 64 << 20)]
    pub unit_bytes: u64,
    /// Tokenize through the full `tokenizers` pipeline rather than the fast byte-level BPE
    /// path (same ids, several times slower; the fast path re-checks a sample against it).
    #[arg(long)]
    pub slow_tokenizer: bool,
}

fn parse_part(s: &str) -> Result<(usize, usize), String> {
    let err = || format!("--part {s:?}: expected i/n with 0 <= i < n, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(err)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| err())?,
        n.trim().parse().map_err(|_| err())?,
    );
    if n == 0 || i >= n {
        return Err(err());
    }
    Ok((i, n))
}

/// Everything `prepare` needs; [`Options::new`] fills in the CLI defaults.
#[derive(Clone, Debug)]
pub struct Options {
    pub inputs: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub field: String,
    pub val_fraction: f64,
    pub seed: u64,
    pub shard_tokens: usize,
    /// `None`: all cores.
    pub threads: Option<usize>,
    /// `(i, n)`: only units with index % n == i.
    pub part: Option<(usize, usize)>,
    pub merge_only: bool,
    pub strict: bool,
    pub unit_bytes: u64,
    /// Never use the fast byte-level BPE path.
    pub slow_tokenizer: bool,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl Options {
    /// Defaults of the CLI for these inputs, tokenizer and output folder; no progress bar.
    pub fn new(inputs: Vec<PathBuf>, tokenizer: PathBuf, out: PathBuf) -> Self {
        Options {
            inputs,
            tokenizer,
            out,
            field: "text".into(),
            val_fraction: 0.01,
            seed: 0,
            shard_tokens: 16_777_216,
            threads: None,
            part: None,
            merge_only: false,
            strict: false,
            unit_bytes: 64 << 20,
            slow_tokenizer: false,
            progress: false,
        }
    }

    fn check(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.val_fraction) {
            bail!("--val-fraction {} must lie in [0, 1]", self.val_fraction);
        }
        if self.shard_tokens == 0 || self.unit_bytes == 0 || self.threads == Some(0) {
            bail!("--shard-tokens, --unit-bytes and --threads must be at least 1");
        }
        Ok(())
    }
}

impl From<Args> for Options {
    fn from(a: Args) -> Self {
        Options {
            inputs: a.input,
            tokenizer: a.tokenizer,
            out: a.out,
            field: a.field,
            val_fraction: a.val_fraction,
            seed: a.seed,
            shard_tokens: a.shard_tokens,
            threads: a.threads,
            part: a.part,
            merge_only: a.merge_only,
            strict: a.strict,
            unit_bytes: a.unit_bytes,
            slow_tokenizer: a.slow_tokenizer,
            progress: true,
        }
    }
}

/// `vet-data prepare`.
pub fn run(args: Args) -> Result<()> {
    let summary = prepare(&Options::from(args))?;
    summary.print();
    Ok(())
}

/// The tokenizer, loaded and described.
struct LoadedTokenizer {
    tok: Tokenizer,
    eot: u32,
    meta: ShardMeta,
    reference: TokenizerRef,
}

fn load_tokenizer(path: &Path) -> Result<LoadedTokenizer> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading tokenizer {}", path.display()))?;
    let mut tok =
        Tokenizer::from_bytes(&bytes).map_err(|e| anyhow!("tokenizer {}: {e}", path.display()))?;
    // A document that contains the text "<|endoftext|>" must not end early, nor be cut or
    // padded by settings meant for model inputs.
    tok.set_encode_special_tokens(true);
    tok.with_truncation(None)
        .map_err(|e| anyhow!("tokenizer {}: {e}", path.display()))?;
    tok.with_padding(None);
    let eot = tok
        .token_to_id(EOT)
        .ok_or_else(|| anyhow!("tokenizer {} has no {EOT} token", path.display()))?;
    let max_id = tok.get_vocab(true).into_values().max().unwrap_or(0) as usize;
    let vocab_size = tok.get_vocab_size(true).max(max_id + 1);
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    Ok(LoadedTokenizer {
        tok,
        eot,
        meta: ShardMeta {
            vocab_size,
            tokenizer_sha256: sha,
        },
        reference: TokenizerRef {
            sha256: hex(&sha),
            vocab_size,
            eot_id: eot,
            path: path.display().to_string(),
        },
    })
}

/// Fails early, with the folder named, when the output folder cannot be written.
fn check_writable(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output folder {}", out.display()))?;
    let probe = out.join(".vet-data-write-test");
    reference::fs::atomic_write(&probe, b"ok")
        .with_context(|| format!("output folder {} is not writable", out.display()))?;
    std::fs::remove_file(&probe)
        .with_context(|| format!("output folder {} is not writable", out.display()))
}

/// Locks the output folder against other `prepare` runs: the whole folder, or with `--part`
/// the folder shared with the other parts and this part alone.
fn lock_output(opts: &Options) -> Result<Vec<DirLock>> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating output folder {}", opts.out.display()))?;
    Ok(match opts.part {
        None => vec![DirLock::acquire(&opts.out)?],
        Some((i, n)) => vec![
            DirLock::acquire_file(&opts.out, LOCK_FILE, Mode::Shared)?,
            DirLock::acquire_file(
                &opts.out,
                &format!("{LOCK_FILE}-part-{i}-of-{n}"),
                Mode::Exclusive,
            )?,
        ],
    })
}

/// Prepares shards as `opts` says; returns what was done. The library entry point of
/// `vet-data prepare` (prints nothing but warnings).
pub fn prepare(opts: &Options) -> Result<Summary> {
    let t0 = Instant::now();
    opts.check()?;
    let tk = load_tokenizer(&opts.tokenizer)?;
    let sources = sources::discover(&opts.inputs, &mut |w| eprintln!("warning: {w}"))?;
    let units = sources::plan(&sources, opts.unit_bytes);
    // Locked first: another run's write probe must not fail this one's.
    let _lock = lock_output(opts)?;
    check_writable(&opts.out)?;
    let threads = opts.threads.unwrap_or_else(default_threads);
    let prints = fingerprint::Prints::new(opts, &tk.reference, &units, &sources);
    let (mut kept, redo) = triage(opts, &units, &prints, threads)?;
    let todo: Vec<&Unit> = redo.iter().map(|&i| &units[i]).collect();
    let bytes_processed: u64 = todo.iter().map(|u| u.bytes()).sum();
    let pb = opts.progress.then(|| report::progress_bar(bytes_processed));
    let ctx = Ctx {
        tokenizer: &tk.tok,
        eot: tk.eot,
        meta: tk.meta,
        out: &opts.out,
        field: &opts.field,
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        shard_tokens: opts.shard_tokens,
        strict: opts.strict,
        fast: !opts.slow_tokenizer,
        pb: pb.clone(),
        stop: &AtomicBool::new(false),
    };
    let done = run_units(&ctx, &todo, &sources, &prints, threads)?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let units_done = done.len();
    let units_kept = kept.len();
    kept.extend(done.into_iter().map(|m| (m.unit, m)));
    let mut summary = Summary {
        units_total: units.len(),
        units_done,
        units_kept,
        threads,
        bytes_processed,
        bytes_total: sources.iter().map(|s| s.bytes).sum(),
        ..Summary::default()
    };
    assemble(
        opts,
        &tk.reference,
        &sources,
        &units,
        &prints,
        kept,
        &mut summary,
    )?;
    summary.elapsed = t0.elapsed();
    summary.peak_rss_bytes = report::peak_rss_bytes();
    Ok(summary)
}

/// Sorts this part's units into kept (valid done-marker) and to redo, and removes the files
/// of the latter (and, when some are redone, the manifest, which is stale until rewritten).
fn triage(
    opts: &Options,
    units: &[Unit],
    prints: &fingerprint::Prints,
    threads: usize,
) -> Result<(BTreeMap<usize, UnitMarker>, Vec<usize>)> {
    let (part_i, part_n) = opts.part.unwrap_or((0, 1));
    let mut kept = BTreeMap::new();
    let mut redo = Vec::new();
    let mine: Vec<&Unit> = units
        .iter()
        .filter(|u| !opts.merge_only && u.index % part_n == part_i)
        .collect();
    // Only a unit with a marker needs its fingerprint now: the others are redone, and hashed
    // by the worker that runs them.
    let marked: Vec<usize> = mine
        .iter()
        .map(|u| u.index)
        .filter(|&i| marker::exists(&opts.out, i))
        .collect();
    prints.compute(&marked, threads)?;
    for u in mine {
        match marker::load_valid(
            &opts.out,
            u.index,
            || prints.get(u.index).to_string(),
            opts.strict,
        ) {
            Ok(m) => drop(kept.insert(u.index, m)),
            Err(_) => redo.push(u.index),
        }
    }
    // Alone (no --part), this run also owns files of units beyond the plan (the inputs
    // shrank since an earlier run).
    let alone = opts.part.is_none() && !opts.merge_only;
    let stale = |u: usize| redo.binary_search(&u).is_ok() || (alone && u >= units.len());
    marker::clean(&opts.out, stale, &kept)?;
    if !redo.is_empty() {
        let manifest = opts.out.join(MANIFEST_FILE);
        if manifest.exists() {
            std::fs::remove_file(&manifest)
                .with_context(|| format!("removing stale {}", manifest.display()))?;
        }
    }
    Ok((kept, redo))
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `todo` on a rayon pool of `threads`, biggest units first; the first error stops the
/// rest (units in flight stop early and are redone by the next run).
fn run_units(
    ctx: &Ctx,
    todo: &[&Unit],
    sources: &[Source],
    prints: &fingerprint::Prints,
    threads: usize,
) -> Result<Vec<UnitMarker>> {
    let mut order: Vec<&Unit> = todo.to_vec();
    order.sort_by_key(|u| (std::cmp::Reverse(u.bytes()), u.index));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting the worker threads")?;
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let first_err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    pool.scope(|s| {
        for _ in 0..threads.min(order.len()) {
            s.spawn(|_| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= order.len() || ctx.stop.load(Ordering::Relaxed) {
                    return;
                }
                let u = order[i];
                match unit::run_unit(ctx, u, &sources[u.source], prints.get(u.index).to_string()) {
                    Ok(m) => results.lock().unwrap_or_else(|p| p.into_inner()).push(m),
                    Err(e) if e.is::<Stopped>() => return,
                    Err(e) => {
                        ctx.stop.store(true, Ordering::Relaxed);
                        let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut done = results.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_by_key(|m| m.unit);
    Ok(done)
}

/// Adds up the markers of every unit; writes manifest.json when all are present, else
/// (with --merge-only) fails listing the missing ones.
fn assemble(
    opts: &Options,
    tokenizer: &TokenizerRef,
    sources: &[Source],
    units: &[Unit],
    prints: &fingerprint::Prints,
    mut markers: BTreeMap<usize, UnitMarker>,
    summary: &mut Summary,
) -> Result<()> {
    let others: Vec<usize> = (units.iter().map(|u| u.index))
        .filter(|i| !markers.contains_key(i) && marker::exists(&opts.out, *i))
        .collect();
    prints.compute(&others, summary.threads)?;
    let mut missing = Vec::new();
    for u in units {
        if markers.contains_key(&u.index) {
            continue;
        }
        match marker::load_valid(
            &opts.out,
            u.index,
            || prints.get(u.index).to_string(),
            opts.strict,
        ) {
            Ok(m) => drop(markers.insert(u.index, m)),
            Err(why) => missing.push(format!(
                "unit {} ({} bytes {}..{}): {why}",
                u.index,
                sources[u.source].path.display(),
                u.start,
                u.end
            )),
        }
    }
    let all: Vec<&UnitMarker> = markers.values().collect();
    let t = marker::totals(&all);
    summary.fill(&t);
    if !missing.is_empty() {
        if opts.merge_only {
            bail!(
                "cannot write the manifest: {} of {} units are not done:\n  {}",
                missing.len(),
                units.len(),
                missing.join("\n  ")
            );
        }
        summary.missing_units = missing;
        return Ok(());
    }
    let (docs, tokens) = (t.train.docs + t.val.docs, t.train.tokens + t.val.tokens);
    if tokens <= docs {
        // An empty or unreadable input (no documents, or only empty ones: each is just its
        // end-of-text token) must not look like a finished corpus.
        bail!(
            "no documents in the input ({} file(s), {} bytes; the lines above say what was skipped): no manifest written to {}",
            sources.len(),
            sources.iter().map(|s| s.bytes).sum::<u64>(),
            opts.out.display()
        );
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        tokenizer: tokenizer.clone(),
        token_bytes: token_bytes_for(tokenizer.vocab_size),
        train: t.train,
        val: t.val,
        sources: sources
            .iter()
            .map(|s| SourceFile {
                path: s.path.display().to_string(),
                bytes: s.bytes,
            })
            .collect(),
        skipped: t.skipped,
        val_fraction: opts.val_fraction,
        split_seed: opts.seed,
    };
    manifest
        .save(&opts.out)
        .with_context(|| format!("writing {}", opts.out.join(MANIFEST_FILE).display()))?;
    summary.manifest = Some(opts.out.join(MANIFEST_FILE));
    Ok(())
}
