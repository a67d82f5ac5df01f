//! The pretraining batch loader: fixed-length windows over a split's token shards, shuffled
//! per epoch, sliced across data-parallel ranks, resumable exactly.
//!
//! The split's token stream is the concatenation of its shards in manifest order. Sample `k`
//! is the window of `seq_len + 1` tokens starting at `k * (seq_len + 1)`; windows do not
//! overlap and may span shards. The trailing `tokens % (seq_len + 1)` tokens of the split
//! belong to no sample.
//!
//! Each epoch visits the samples in the order of a Fisher–Yates shuffle drawn from
//! [`Rng`] seeded by `(seed, epoch)` (see [`epoch_order`]). Global step `s` takes the
//! `world_size * batch` consecutive samples `s * world_size * batch ..` of that order, and rank
//! `r` takes the `r`-th block of `batch` of them, so the ranks see disjoint samples and together
//! cover the epoch. **The tail of the order that does not fill a whole global batch is
//! dropped** (at most `world_size * batch - 1` samples per epoch; a different set every epoch).
//!
//! Shards are read through `mmap`, document starts are found by binary search in the mapped
//! shards, and nothing proportional to the corpus is copied: the only per-corpus memory is the
//! epoch order, 4 bytes per sample (about 2 MB per billion tokens at `seq_len` 2048).

use std::path::Path;

use anyhow::{bail, Context, Result};
use reference::rng::Rng;
use serde::{Deserialize, Serialize};

use super::manifest::{hex, Manifest};
use super::shard::Shard;

/// Loader settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Rows per batch on this rank.
    pub batch: usize,
    /// Input positions per row (each sample holds `seq_len + 1` tokens).
    pub seq_len: usize,
    /// Shuffle seed; epoch `e` uses the order drawn from `(seed, e)`.
    pub seed: u64,
    /// This process's data-parallel rank, `< world_size`.
    pub rank: usize,
    /// Number of data-parallel ranks.
    pub world_size: usize,
}

/// Where a loader (or a QA batcher) stands: the next batch it yields is global step `step`
/// (counted from 0 within the epoch) of epoch `epoch`. Saved in `trainer_state.json`.
///
/// A position is only meaningful for the same data, `seed`, `batch` and `world_size`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Global step within the epoch, from 0.
    pub step: u64,
}

/// One batch of token windows, row-major `[batch, seq_len]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenBatch {
    pub batch: usize,
    pub seq_len: usize,
    /// `window[0..seq_len]` of each row.
    pub inputs: Vec<u32>,
    /// `window[1..seq_len + 1]` of each row.
    pub targets: Vec<u32>,
    /// True where input position `t` starts a document, and at `t == 0`.
    pub resets: Vec<bool>,
    /// The epoch and in-epoch global step this batch belongs to.
    pub epoch: u64,
    pub step: u64,
}

impl TokenBatch {
    /// Sizes the buffers for `batch x seq_len` (no allocation when already that size).
    fn reshape(&mut self, batch: usize, seq_len: usize) {
        self.batch = batch;
        self.seq_len = seq_len;
        let n = batch * seq_len;
        self.inputs.resize(n, 0);
        self.targets.resize(n, 0);
        self.resets.resize(n, false);
    }
}

/// The sample order of one epoch: a Fisher–Yates shuffle of `0..n` driven by
/// `Rng::stream(seed, "data.epoch.{epoch}")`. Shared by the pretraining and QA loaders.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Result<Vec<u32>> {
    if n > u32::MAX as usize {
        bail!(
            "{n} samples per epoch: more than the loader's limit of {}",
            u32::MAX
        );
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = Rng::stream(seed, &format!("data.epoch.{epoch}"));
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    Ok(order)
}

/// Checks the parts of a loader configuration that do not depend on the data.
pub(crate) fn check_config(batch: usize, seq_len: usize, rank: usize, world: usize) -> Result<()> {
    if batch == 0 || seq_len == 0 {
        bail!("batch ({batch}) and seq_len ({seq_len}) must both be positive");
    }
    if rank >= world {
        bail!("rank {rank} must be below world_size {world}");
    }
    batch
        .checked_mul(world)
        .and_then(|g| g.checked_mul(seq_len))
        .with_context(|| {
            format!("batch {batch} x world_size {world} x seq_len {seq_len} overflows")
        })?;
    Ok(())
}

/// Fixed-length, shuffled, rank-sliced windows over one split of a shard manifest.
pub struct Loader {
    cfg: LoaderConfig,
    shards: Vec<Shard>,
    /// `starts[i]` = offset of shard `i`'s first token in the split's stream; one extra entry
    /// holds the total.
    starts: Vec<u64>,
    n_samples: usize,
    steps_per_epoch: u64,
    epoch: u64,
    step: u64,
    order: Vec<u32>,
    window: Vec<u32>,
}

impl Loader {
    /// Opens split `split` (`"train"` or `"val"`) of the manifest at `manifest_path` (the file
    /// or its directory), maps every shard and checks it against the manifest.
    pub fn open(manifest_path: &Path, split: &str, cfg: LoaderConfig) -> Result<Loader> {
        check_config(cfg.batch, cfg.seq_len, cfg.rank, cfg.world_size)?;
        let (manifest, dir) = Manifest::load(manifest_path)?;
        let entries = &manifest.split(split)?.shards;
        let mut shards = Vec::with_capacity(entries.len());
        let mut starts = vec![0u64];
        for entry in entries {
            let path = dir.join(&entry.file);
            let shard = Shard::open(&path)?;
            check_shard(&shard, &manifest, entry)?;
            starts.push(starts[starts.len() - 1] + shard.header.n_tokens);
            shards.push(shard);
        }
        let total = starts[starts.len() - 1];
        let window = cfg.seq_len as u64 + 1;
        let n_samples = usize::try_from(total / window)
            .with_context(|| format!("split {split:?}: too many samples for this platform"))?;
        let global = (cfg.batch * cfg.world_size) as u64;
        let steps_per_epoch = n_samples as u64 / global;
        if steps_per_epoch == 0 {
            bail!(
                "split {split:?} of {} holds {total} tokens in {} shards = {n_samples} samples of \
                 seq_len + 1 = {window} tokens, fewer than one global batch of batch {} x \
                 world_size {} = {global} samples",
                manifest_path.display(),
                shards.len(),
                cfg.batch,
                cfg.world_size
            );
        }
        let order = epoch_order(n_samples, cfg.seed, 0)?;
        Ok(Loader {
            cfg,
            shards,
            starts,
            n_samples,
            steps_per_epoch,
            epoch: 0,
            step: 0,
            order,
            window: vec![0; cfg.seq_len + 1],
        })
    }

    /// The configuration the loader was opened with.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Samples (windows of `seq_len + 1` tokens) in the split.
    pub fn samples(&self) -> usize {
        self.n_samples
    }

    /// Global steps per epoch (the partial last global batch is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// Input tokens all ranks together consume per epoch:
    /// `steps_per_epoch * world_size * batch * seq_len`.
    pub fn tokens_per_epoch(&self) -> u64 {
        self.steps_per_epoch * (self.cfg.world_size * self.cfg.batch * self.cfg.seq_len) as u64
    }

    /// Tokens in the split (all shards).
    pub fn split_tokens(&self) -> u64 {
        self.starts[self.starts.len() - 1]
    }

    /// The next batch to be yielded.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            step: self.step,
        }
    }

    /// Moves to `pos`; the batches that follow are exactly those an uninterrupted run yields
    /// from there. `pos.step == steps_per_epoch()` means the start of the next epoch.
    pub fn seek(&mut self, pos: Position) -> Result<()> {
        if pos.step > self.steps_per_epoch {
            bail!(
                "cannot seek to step {} of epoch {}: an epoch has {} steps (batch {} x world_size {})",
                pos.step,
                pos.epoch,
                self.steps_per_epoch,
                self.cfg.batch,
                self.cfg.world_size
            );
        }
        if pos.epoch != self.epoch {
            self.order = epoch_order(self.n_samples, self.cfg.seed, pos.epoch)?;
            self.epoch = pos.epoch;
        }
        self.step = pos.step;
        Ok(())
    }

    /// Checks every shard's payload checksum and document starts (reads the whole split).
    pub fn verify(&self) -> Result<()> {
        for shard in &self.shards {
            shard.verify()?;
        }
        Ok(())
    }

    /// The next batch of this rank, in a fresh buffer. See [`Loader::next_batch_into`].
    pub fn next_batch(&mut self) -> Result<TokenBatch> {
        let mut out = TokenBatch::default();
        self.next_batch_into(&mut out)?;
        Ok(out)
    }

    /// Fills `out` with the next batch of this rank, reusing its buffers (no allocation once
    /// they have the right size, except when a new epoch's order is drawn).
    pub fn next_batch_into(&mut self, out: &mut TokenBatch) -> Result<()> {
        if self.step >= self.steps_per_epoch {
            self.seek(Position {
                epoch: self.epoch + 1,
                step: 0,
            })?;
        }
        let (batch, seq_len) = (self.cfg.batch, self.cfg.seq_len);
        out.reshape(batch, seq_len);
        out.epoch = self.epoch;
        out.step = self.step;
        let first = (self.step as usize * self.cfg.world_size + self.cfg.rank) * batch;
        let mut window = std::mem::take(&mut self.window);
        for row in 0..batch {
            let sample = self.order[first + row] as u64;
            let start = sample * (seq_len as u64 + 1);
            self.read_window(start, &mut window);
            let span = row * seq_len..(row + 1) * seq_len;
            out.inputs[span.clone()].copy_from_slice(&window[..seq_len]);
            out.targets[span.clone()].copy_from_slice(&window[1..]);
            self.mark_doc_starts(start, &mut out.resets[span]);
        }
        self.window = window;
        self.step += 1;
        Ok(())
    }

    /// Index of the shard holding stream offset `pos` (`pos < split_tokens()`).
    fn shard_of(&self, pos: u64) -> usize {
        // The last shard whose start is <= pos; empty shards are skipped by taking the last.
        self.starts.partition_point(|&s| s <= pos) - 1
    }

    /// Copies stream tokens `start..start + out.len()` into `out`, across shards.
    fn read_window(&self, start: u64, out: &mut [u32]) {
        let mut i = self.shard_of(start);
        let mut pos = start;
        let mut filled = 0;
        while filled < out.len() {
            let shard = &self.shards[i];
            let local = (pos - self.starts[i]) as usize;
            let n = (shard.len() - local).min(out.len() - filled);
            shard.read_tokens(local, &mut out[filled..filled + n]);
            filled += n;
            pos += n as u64;
            i += 1;
        }
    }

    /// Sets `resets[t]` for stream positions `start + t`: true at document starts and at 0.
    fn mark_doc_starts(&self, start: u64, resets: &mut [bool]) {
        resets.fill(false);
        resets[0] = true;
        let end = start + resets.len() as u64;
        let mut i = self.shard_of(start);
        while i < self.shards.len() && self.starts[i] < end {
            let shard = &self.shards[i];
            let base = self.starts[i];
            let lo = start.saturating_sub(base);
            let hi = end - base;
            let n_docs = shard.header.n_docs as usize;
            let mut d = first_doc_at_or_after(shard, lo);
            while d < n_docs {
                let s = shard.doc_start(d);
                if s >= hi {
                    break;
                }
                // `s >= lo` always holds for a well-formed shard; a corrupt one is skipped
                // rather than indexing out of bounds (`Loader::verify` reports it).
                if s >= lo {
                    resets[(base + s - start) as usize] = true;
                }
                d += 1;
            }
            i += 1;
        }
    }
}

/// Index of the first document of `shard` starting at or after local offset `pos` (binary
/// search over the mapped, increasing document starts).
fn first_doc_at_or_after(shard: &Shard, pos: u64) -> usize {
    let (mut lo, mut hi) = (0usize, shard.header.n_docs as usize);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if shard.doc_start(mid) < pos {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Checks a mapped shard's header against its manifest entry and the manifest's tokenizer.
pub(crate) fn check_shard(
    shard: &Shard,
    m: &Manifest,
    entry: &super::manifest::ShardEntry,
) -> Result<()> {
    let h = &shard.header;
    let name = shard.path.display();
    if h.n_tokens != entry.tokens || h.n_docs != entry.docs || h.payload_crc32 != entry.crc32 {
        bail!(
            "shard {name}: header has {} tokens, {} documents, crc32 {:08x}; the manifest \
             records {} tokens, {} documents, crc32 {:08x}: the shard was replaced or corrupted",
            h.n_tokens,
            h.n_docs,
            h.payload_crc32,
            entry.tokens,
            entry.docs,
            entry.crc32
        );
    }
    let sha = hex(&h.tokenizer_sha256);
    if sha != m.tokenizer.sha256 {
        bail!(
            "shard {name}: made with tokenizer {sha}, but the manifest names tokenizer {}",
            m.tokenizer.sha256
        );
    }
    if h.token_bytes != m.token_bytes || h.vocab_size != m.tokenizer.vocab_size as u64 {
        bail!(
            "shard {name}: {}-byte tokens over a vocabulary of {}, but the manifest says {}-byte \
             tokens over {}",
            h.token_bytes,
            h.vocab_size,
            m.token_bytes,
            m.tokenizer.vocab_size
        );
    }
    Ok(())
}
