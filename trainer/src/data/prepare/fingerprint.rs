//! Unit fingerprints: what a done-marker must match to be kept by a re-run.
//!
//! A fingerprint hashes the options that shape the output (tokenizer, field, val fraction,
//! seed, shard size), the unit's file, size and byte range, the file's modification time, and
//! the CRC-32 of every byte the unit's output depends on. A same-size edit, or one that kept
//! the modification time (`cp -p`, `rsync -t`), is caught by the content hash; the hash streams
//! the bytes (CRC-32 runs at several GB/s), on the worker threads, one unit each.
//!
//! `--strict` is not hashed: a marker made without it is kept by a strict run only if its unit
//! skipped no record (see `marker::load_valid`), so a strict re-run re-checks exactly the units
//! that held bad records, and a non-strict re-run keeps a strict run's units.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::OnceLock;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::sources::{Source, Unit};
use super::Options;
use crate::data::manifest::{hex, TokenizerRef};

/// The units' fingerprints, each computed once, on first use. A first run hashes each unit on
/// the worker that then tokenizes it, while its bytes are in the page cache, instead of reading
/// the whole corpus once more in a pass of its own; a re-run hashes the units that have a
/// done-marker, in parallel ([`Prints::compute`]), to check them.
pub struct Prints<'a> {
    opts: &'a Options,
    tok: &'a TokenizerRef,
    units: &'a [Unit],
    sources: &'a [Source],
    cells: Vec<OnceLock<String>>,
}

impl<'a> Prints<'a> {
    /// Nothing is read yet. `units[i].index` is `i`.
    pub fn new(
        opts: &'a Options,
        tok: &'a TokenizerRef,
        units: &'a [Unit],
        sources: &'a [Source],
    ) -> Prints<'a> {
        let cells = units.iter().map(|_| OnceLock::new()).collect();
        Prints {
            opts,
            tok,
            units,
            sources,
            cells,
        }
    }

    /// Unit `i`'s fingerprint (computed now if it was not yet).
    pub fn get(&self, i: usize) -> &str {
        self.cells[i].get_or_init(|| {
            let u = &self.units[i];
            fingerprint(self.opts, self.tok, u, &self.sources[u.source])
        })
    }

    /// Computes the fingerprints of units `indices` on `threads` threads.
    pub fn compute(&self, indices: &[usize], threads: usize) -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .context("starting the worker threads")?;
        pool.install(|| {
            indices.par_iter().for_each(|&i| {
                self.get(i);
            })
        });
        Ok(())
    }
}

/// Hash of the options, the unit's input range and the input's state.
fn fingerprint(opts: &Options, tok: &TokenizerRef, unit: &Unit, source: &Source) -> String {
    // An unreadable input gets a fingerprint of its error: its unit is redone and reports it.
    let content = content_print(source, unit).unwrap_or_else(|e| format!("unreadable: {e:#}"));
    let text = format!(
        "vet-data prepare v2|{}|{:?}|{:?}|{}|{}|{}|{}|{}|{}|{content}",
        tok.sha256,
        opts.field,
        opts.val_fraction,
        opts.seed,
        opts.shard_tokens,
        source.path.display(),
        source.bytes,
        unit.start,
        unit.end
    );
    hex(&Sha256::digest(text.as_bytes())[..12])
}

/// Modification time (ns) and CRC-32 of the bytes the unit reads: from the byte before its
/// range (which says whether its first line starts there) to the end of the last line that
/// starts in it.
fn content_print(source: &Source, unit: &Unit) -> Result<String> {
    let path = &source.path;
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = f.metadata()?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let from = unit.start.saturating_sub(1);
    f.seek(SeekFrom::Start(from))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut left, mut last) = (unit.end - from, None);
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        last = Some(buf[n - 1]);
        left -= n as u64;
    }
    // The last line that starts in the range runs on to the first newline at or after its end.
    if last.is_some_and(|b| b != b'\n') {
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            match buf[..n].iter().position(|&b| b == b'\n') {
                Some(i) => {
                    hasher.update(&buf[..=i]);
                    break;
                }
                None => hasher.update(&buf[..n]),
            }
        }
    }
    Ok(format!("{mtime}|{}|{:08x}", meta.len(), hasher.finalize()))
}
