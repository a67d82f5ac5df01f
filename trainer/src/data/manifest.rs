//! The shard manifest (`manifest.json` beside the shards): which tokenizer, which shards in
//! which order, how many tokens and documents, and where they came from.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const MANIFEST_FORMAT: &str = "vet-mamba-shards";
pub const MANIFEST_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";

/// The tokenizer the shards were made with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerRef {
    /// Lower-case hex SHA-256 of `tokenizer.json`'s bytes.
    pub sha256: String,
    pub vocab_size: usize,
    /// `<|endoftext|>`'s id: appended after every document.
    pub eot_id: u32,
    /// Where it was read from (informational).
    pub path: String,
}

/// One shard file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name, relative to the manifest's directory.
    pub file: String,
    pub tokens: u64,
    pub docs: u64,
    /// The payload CRC-32 recorded in the shard header.
    pub crc32: u32,
}

/// The shards of one split, in reading order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub shards: Vec<ShardEntry>,
    pub tokens: u64,
    pub docs: u64,
}

/// An input file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: String,
    pub bytes: u64,
}

/// Records skipped as bad input.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub records: u64,
    /// The first few problems, "file:line: what".
    pub examples: Vec<String>,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tokenizer: TokenizerRef,
    /// 2 (u16) or 4 (u32).
    pub token_bytes: u32,
    pub train: Split,
    pub val: Split,
    pub sources: Vec<SourceFile>,
    pub skipped: Skipped,
    /// Fraction of documents sent to `val`, and the seed of that choice.
    pub val_fraction: f64,
    pub split_seed: u64,
}

impl Manifest {
    /// Reads `path` (a `manifest.json`, or a directory holding one) and checks its format.
    pub fn load(path: &Path) -> Result<(Manifest, PathBuf)> {
        let file = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading shard manifest {}", file.display()))?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing shard manifest {}", file.display()))?;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            bail!(
                "shard manifest {}: format {:?} version {}, expected {MANIFEST_FORMAT:?} version {MANIFEST_VERSION}",
                file.display(),
                m.format,
                m.version
            );
        }
        let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok((m, dir))
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        reference::fs::atomic_write(&dir.join(MANIFEST_FILE), text.as_bytes())?;
        Ok(())
    }

    pub fn split(&self, name: &str) -> Result<&Split> {
        match name {
            "train" => Ok(&self.train),
            "val" => Ok(&self.val),
            other => bail!("unknown split {other:?} (expected train or val)"),
        }
    }
}

/// Lower-case hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
