//! `vet-data inspect`: a shard's header, checksums, document lengths and a decoded sample; or
//! every shard of a manifest, verified against it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use super::manifest::{hex, sha256_file, Manifest, ShardEntry, Split};
use super::shard::{Shard, ShardHeader};

/// Arguments of `vet-data inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A shard (.bin), or a manifest.json, or the folder holding one.
    pub path: PathBuf,
    /// tokenizer.json to decode a sample with (must be the one the shard was made with).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens to decode from the start of the shard.
    #[arg(long, default_value_t = 200)]
    pub sample: usize,
}

/// `vet-data inspect`.
pub fn run(args: Args) -> Result<()> {
    let is_manifest = args.path.is_dir() || args.path.extension().is_some_and(|e| e == "json");
    if is_manifest {
        let report = inspect_manifest(&args.path)?;
        report.print();
        if !report.failures.is_empty() {
            bail!(
                "{} of {} shards failed verification (listed above)",
                report.failures.len(),
                report.checked
            );
        }
        return Ok(());
    }
    let report = inspect_shard(&args.path, args.tokenizer.as_deref(), args.sample)?;
    report.print();
    Ok(())
}

/// Document lengths of a shard, in tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DocStats {
    pub min: u64,
    pub mean: f64,
    pub max: u64,
}

/// What `inspect` found in one shard (which passed verification).
#[derive(Debug)]
pub struct ShardReport {
    pub path: PathBuf,
    pub header: ShardHeader,
    /// `None` when the shard has no documents.
    pub docs: Option<DocStats>,
    /// The first tokens decoded (special tokens shown), when a tokenizer was given.
    pub sample: Option<String>,
}

impl ShardReport {
    fn print(&self) {
        let h = &self.header;
        println!("shard {}", self.path.display());
        println!(
            "  version {}, token width {} bytes, {} tokens, {} documents, vocabulary {}",
            super::shard::VERSION,
            h.token_bytes,
            h.n_tokens,
            h.n_docs,
            h.vocab_size
        );
        println!("  tokenizer sha256 {}", hex(&h.tokenizer_sha256));
        println!("  checksums: header and payload OK");
        if let Some(d) = self.docs {
            println!(
                "  document length (tokens): min {}, mean {:.1}, max {}",
                d.min, d.mean, d.max
            );
        }
        if let Some(s) = &self.sample {
            println!("  sample:\n{s}");
        }
    }
}

/// Opens and verifies a shard (errors name it), with document statistics and, given its
/// tokenizer, a decoded sample of the first `sample` tokens.
pub fn inspect_shard(path: &Path, tokenizer: Option<&Path>, sample: usize) -> Result<ShardReport> {
    let shard = Shard::open(path)?;
    shard.verify()?;
    let starts = shard.doc_starts();
    let n = shard.header.n_tokens;
    let docs = (!starts.is_empty()).then(|| {
        let ends = starts.iter().skip(1).copied().chain([n]);
        let lens: Vec<u64> = starts.iter().zip(ends).map(|(s, e)| e - s).collect();
        DocStats {
            min: lens.iter().copied().min().unwrap_or(0),
            mean: n as f64 / lens.len() as f64,
            max: lens.iter().copied().max().unwrap_or(0),
        }
    });
    let sample = match tokenizer {
        Some(t) => Some(decode_sample(&shard, t, sample)?),
        None => None,
    };
    Ok(ShardReport {
        path: path.to_path_buf(),
        header: shard.header.clone(),
        docs,
        sample,
    })
}

fn decode_sample(shard: &Shard, tokenizer: &Path, sample: usize) -> Result<String> {
    let sha = sha256_file(tokenizer)?;
    let want = hex(&shard.header.tokenizer_sha256);
    if sha != want {
        bail!(
            "tokenizer {} (sha256 {sha}) is not the one shard {} was made with (sha256 {want})",
            tokenizer.display(),
            shard.path.display()
        );
    }
    let tok = tokenizers::Tokenizer::from_file(tokenizer)
        .map_err(|e| anyhow!("tokenizer {}: {e}", tokenizer.display()))?;
    let mut ids = vec![0u32; sample.min(shard.len())];
    shard.read_tokens(0, &mut ids);
    tok.decode(&ids, false)
        .map_err(|e| anyhow!("decoding shard {}: {e}", shard.path.display()))
}

/// What `inspect` found in a manifest's shards.
#[derive(Debug)]
pub struct ManifestReport {
    pub manifest: Manifest,
    pub dir: PathBuf,
    /// Shards checked.
    pub checked: usize,
    /// One line per failing shard, naming it.
    pub failures: Vec<String>,
}

impl ManifestReport {
    fn print(&self) {
        let m = &self.manifest;
        println!("manifest {}", self.dir.display());
        println!(
            "  tokenizer {} (sha256 {}), vocabulary {}, eot {}, token width {} bytes",
            m.tokenizer.path,
            m.tokenizer.sha256,
            m.tokenizer.vocab_size,
            m.tokenizer.eot_id,
            m.token_bytes
        );
        for (name, s) in [("train", &m.train), ("val", &m.val)] {
            println!(
                "  {name}: {} tokens, {} documents, {} shards",
                s.tokens,
                s.docs,
                s.shards.len()
            );
        }
        println!(
            "  sources: {} files, {} bytes; skipped {} bad records",
            m.sources.len(),
            m.sources.iter().map(|s| s.bytes).sum::<u64>(),
            m.skipped.records
        );
        println!(
            "  verified {} of {} shards",
            self.checked - self.failures.len(),
            self.checked
        );
        for f in &self.failures {
            println!("  FAILED {f}");
        }
    }
}

/// Loads a manifest and opens and verifies every shard it lists against it.
pub fn inspect_manifest(path: &Path) -> Result<ManifestReport> {
    let (manifest, dir) = Manifest::load(path)?;
    let mut failures = Vec::new();
    for (name, split) in [("train", &manifest.train), ("val", &manifest.val)] {
        let tokens: u64 = split.shards.iter().map(|e| e.tokens).sum();
        let docs: u64 = split.shards.iter().map(|e| e.docs).sum();
        if (tokens, docs) != (split.tokens, split.docs) {
            failures.push(format!(
                "{name} split totals ({} tokens, {} documents) differ from its shards' ({tokens}, {docs})",
                split.tokens, split.docs
            ));
        }
    }
    let entries: Vec<&ShardEntry> = all_entries(&manifest.train, &manifest.val);
    let want_sha = manifest.tokenizer.sha256.clone();
    let results: Vec<Result<()>> = entries
        .par_iter()
        .map(|e| check_entry(&dir, e, &want_sha, manifest.token_bytes))
        .collect();
    failures.extend(
        results
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}"))),
    );
    Ok(ManifestReport {
        checked: entries.len(),
        manifest,
        dir,
        failures,
    })
}

fn all_entries<'a>(train: &'a Split, val: &'a Split) -> Vec<&'a ShardEntry> {
    train.shards.iter().chain(&val.shards).collect()
}

fn check_entry(dir: &Path, e: &ShardEntry, sha: &str, token_bytes: u32) -> Result<()> {
    let path = dir.join(&e.file);
    let shard = Shard::open(&path)?;
    shard.verify()?;
    let h = &shard.header;
    let name = path.display();
    if (h.n_tokens, h.n_docs, h.payload_crc32) != (e.tokens, e.docs, e.crc32) {
        bail!(
            "shard {name}: has {} tokens, {} documents, crc {:08x}; the manifest says {}, {}, {:08x}",
            h.n_tokens,
            h.n_docs,
            h.payload_crc32,
            e.tokens,
            e.docs,
            e.crc32
        );
    }
    if hex(&h.tokenizer_sha256) != sha || h.token_bytes != token_bytes {
        bail!("shard {name}: made with another tokenizer or token width than the manifest's");
    }
    Ok(())
}

/// Decodes the documents of a shard with `tok` (split at its document starts, `<|endoftext|>`
/// dropped): for checks and tests.
pub fn decode_documents(shard: &Shard, tok: &tokenizers::Tokenizer) -> Result<Vec<String>> {
    let starts = shard.doc_starts();
    let n = shard.len() as u64;
    let ends = starts.iter().skip(1).copied().chain([n]);
    starts
        .iter()
        .zip(ends)
        .map(|(&s, e)| {
            let mut ids = vec![0u32; (e - s) as usize];
            shard.read_tokens(s as usize, &mut ids);
            tok.decode(&ids, true)
                .map_err(|err| anyhow!("decoding shard {}: {err}", shard.path.display()))
        })
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("reading documents of {}", shard.path.display()))
}
