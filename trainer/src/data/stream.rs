//! The stream loader of stateful training (`[train] carry_state`): each batch row reads a
//! stream of consecutive windows of whole documents, so the state a row's window ends with
//! is the state its next window starts from.
//!
//! Each epoch, the split's documents are shuffled ([`epoch_order`] seeded by `(seed, epoch)`:
//! **shuffling is by document, never by window**) and dealt to the `world_size * batch` global
//! rows, each next document to the row with the fewest tokens so far (ties: the lower row).
//! Row `g` is the concatenation of its documents in the order dealt; window `j` of a row is its
//! tokens `j * seq_len .. j * seq_len + seq_len + 1` (inputs, and targets shifted by one), so
//! consecutive windows tile the row without gap or overlap. Global step `s` of the epoch takes
//! window `s` of every row; rank `r` yields rows `r * batch .. (r + 1) * batch`, so each rank
//! carries the states of its own rows only.
//!
//! `resets[t]` is true exactly where a document starts at input position `t`: a window that
//! begins inside a document carries the state in, one that begins at a document start zeroes
//! it (the first window of every row and every epoch does). An epoch has as many steps as the
//! shortest row has whole windows; the rest of the longer rows is dropped (at most about one
//! document per row). The position (epoch, step) is exact: the deal is recomputed from the seed.
//!
//! **Interleaved groups** ([`StreamLoader::interleave`], `[train] carry_streams = m`): the
//! documents are dealt to `m` times as many rows, `m` groups of `world_size * batch`, and the
//! steps take the groups in turn, `chunk` consecutive windows of one group (`chunk` = the `k`
//! of `carry_state = k`, else 1) before the next group's: step `s` is window
//! `(s / chunk / m) * chunk + s % chunk` of group `(s / chunk) % m`. Each stream still reads its
//! windows in order, but consecutive optimizer steps read different documents, as plain
//! windows do, instead of the same `batch` documents for hundreds of steps. The trainer keeps
//! one carried state per group ([`crate::train::carry`]). An epoch's windows per row are then a
//! multiple of `chunk`.
//!
//! Memory: 16 bytes per document for the document table, and 12 bytes per document for the
//! epoch's deal (every rank deals every row, to agree on the epoch's length).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::loader::{check_config, check_shard, epoch_order, LoaderConfig, Position, TokenBatch};
use super::manifest::Manifest;
use super::shard::Shard;

/// A document: its shard, first token in the shard, and length.
#[derive(Clone, Copy, Debug)]
struct Doc {
    shard: u32,
    start: u64,
    len: u64,
}

/// One row's documents this epoch and where each starts in the row (one extra entry: the
/// row's length).
#[derive(Clone, Debug, Default)]
struct Row {
    docs: Vec<u32>,
    offsets: Vec<u64>,
}

/// Streams of consecutive windows over whole documents, one per batch row. See the module docs.
pub struct StreamLoader {
    cfg: LoaderConfig,
    shards: Vec<Shard>,
    docs: Vec<Doc>,
    epoch: u64,
    step: u64,
    steps_per_epoch: u64,
    /// This rank's rows this epoch: group `g`'s are `g * batch .. (g + 1) * batch`.
    rows: Vec<Row>,
    tokens: u64,
    /// Interleaved groups of rows (1: none) and windows per turn of a group.
    groups: usize,
    chunk: usize,
}

impl StreamLoader {
    /// Opens split `split` of the manifest at `manifest_path` (the file or its directory).
    pub fn open(manifest_path: &Path, split: &str, cfg: LoaderConfig) -> Result<StreamLoader> {
        check_config(cfg.batch, cfg.seq_len, cfg.rank, cfg.world_size)?;
        let (manifest, dir) = Manifest::load(manifest_path)?;
        let entries = &manifest.split(split)?.shards;
        let (mut shards, mut docs, mut tokens) = (Vec::new(), Vec::new(), 0u64);
        for entry in entries {
            let shard = Shard::open(&dir.join(&entry.file))?;
            check_shard(&shard, &manifest, entry)?;
            let n_docs = shard.header.n_docs as usize;
            for d in 0..n_docs {
                let start = shard.doc_start(d);
                let end = if d + 1 < n_docs {
                    shard.doc_start(d + 1)
                } else {
                    shard.header.n_tokens
                };
                if end > start {
                    let shard = shards.len() as u32;
                    docs.push(Doc {
                        shard,
                        start,
                        len: end - start,
                    });
                }
            }
            tokens += shard.header.n_tokens;
            shards.push(shard);
        }
        let global = cfg.batch * cfg.world_size;
        if docs.len() < global {
            bail!(
                "split {split:?} of {} holds {} documents, fewer than the {global} rows of one \
                 global batch (batch {} x world_size {}): stateful training gives every row \
                 whole documents",
                manifest_path.display(),
                docs.len(),
                cfg.batch,
                cfg.world_size
            );
        }
        let mut loader = StreamLoader {
            cfg,
            shards,
            docs,
            epoch: 0,
            step: 0,
            steps_per_epoch: 0,
            rows: Vec::new(),
            tokens,
            groups: 1,
            chunk: 1,
        };
        loader.deal(0)?;
        loader.check_steps(&manifest_path.display().to_string(), split)?;
        Ok(loader)
    }

    /// Interleaves `groups` groups of rows, `chunk` consecutive windows of a group per turn
    /// (see the module docs); `groups = 1` and `chunk = 1` is the loader as opened.
    pub fn interleave(mut self, groups: usize, chunk: usize) -> Result<StreamLoader> {
        if groups == 0 || chunk == 0 {
            bail!("interleaved streams need groups >= 1 and chunk >= 1, got {groups} and {chunk}");
        }
        let rows = groups * self.cfg.batch * self.cfg.world_size;
        if self.docs.len() < rows {
            bail!(
                "{} documents are fewer than the {rows} rows of {groups} interleaved groups \
                 (carry_streams) of batch {} x world_size {}: stateful training gives every \
                 row whole documents",
                self.docs.len(),
                self.cfg.batch,
                self.cfg.world_size
            );
        }
        (self.groups, self.chunk) = (groups, chunk);
        self.deal(0)?;
        self.check_steps("the data", "train")?;
        Ok(self)
    }

    fn check_steps(&self, what: &str, split: &str) -> Result<()> {
        if self.steps_per_epoch == 0 {
            let windows = match self.chunk {
                1 => "one window".to_string(),
                k => format!("{k} windows"),
            };
            bail!(
                "split {split:?} of {what}: {} tokens dealt to {} rows leave a row shorter \
                 than {windows} of seq_len + 1 = {} tokens",
                self.tokens,
                self.groups * self.cfg.batch * self.cfg.world_size,
                self.cfg.seq_len + 1
            );
        }
        Ok(())
    }

    /// The interleaved group that in-epoch step `step` reads (0 when not interleaved).
    pub fn group_of(&self, step: u64) -> usize {
        ((step / self.chunk as u64) % self.groups as u64) as usize
    }

    /// The window of its rows that in-epoch step `step` reads.
    fn window_of(&self, step: u64) -> u64 {
        let chunk = self.chunk as u64;
        (step / chunk / self.groups as u64) * chunk + step % chunk
    }

    /// Deals epoch `epoch`'s shuffled documents to the rows and keeps this rank's.
    fn deal(&mut self, epoch: u64) -> Result<()> {
        let per_group = self.cfg.batch * self.cfg.world_size;
        let global = per_group * self.groups;
        let order = epoch_order(self.docs.len(), self.cfg.seed, epoch)?;
        let mut rows = vec![Row::default(); global];
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
            (0..global).map(|g| Reverse((0, g))).collect();
        for &d in &order {
            let Reverse((len, g)) = heap.pop().context("a batch has at least one row")?;
            rows[g].docs.push(d);
            rows[g].offsets.push(len);
            heap.push(Reverse((len + self.docs[d as usize].len, g)));
        }
        let seq_len = self.cfg.seq_len as u64;
        let mut steps = u64::MAX;
        for Reverse((len, g)) in heap {
            rows[g].offsets.push(len);
            steps = steps.min(len.saturating_sub(1) / seq_len);
        }
        let first = self.cfg.rank * self.cfg.batch;
        self.rows = (0..self.groups)
            .flat_map(|g| {
                rows[g * per_group + first..g * per_group + first + self.cfg.batch].iter()
            })
            .cloned()
            .collect();
        let chunk = self.chunk as u64;
        if self.groups > 1 {
            steps = steps / chunk * chunk * self.groups as u64;
        }
        self.steps_per_epoch = steps;
        self.epoch = epoch;
        Ok(())
    }

    /// The configuration the loader was opened with.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Documents in the split.
    pub fn documents(&self) -> usize {
        self.docs.len()
    }

    /// Global steps in the current epoch (windows per row, times the interleaved groups).
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// Tokens in the split (all shards).
    pub fn split_tokens(&self) -> u64 {
        self.tokens
    }

    /// The next batch to be yielded.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            step: self.step,
        }
    }

    /// Moves to `pos`; `pos.step == steps_per_epoch()` of that epoch means the start of the
    /// next one.
    pub fn seek(&mut self, pos: Position) -> Result<()> {
        if pos.epoch != self.epoch {
            self.deal(pos.epoch)?;
        }
        if pos.step > self.steps_per_epoch {
            bail!(
                "cannot seek to step {} of epoch {}: that epoch's streams have {} windows \
                 (batch {} x world_size {}, seq_len {})",
                pos.step,
                pos.epoch,
                self.steps_per_epoch,
                self.cfg.batch,
                self.cfg.world_size,
                self.cfg.seq_len
            );
        }
        self.step = pos.step;
        Ok(())
    }

    /// The next batch of this rank: window `step` of each of its rows.
    pub fn next_batch(&mut self) -> Result<TokenBatch> {
        if self.step >= self.steps_per_epoch {
            self.seek(Position {
                epoch: self.epoch + 1,
                step: 0,
            })?;
        }
        let (batch, seq_len) = (self.cfg.batch, self.cfg.seq_len);
        let n = batch * seq_len;
        let mut out = TokenBatch {
            batch,
            seq_len,
            inputs: vec![0; n],
            targets: vec![0; n],
            resets: vec![false; n],
            epoch: self.epoch,
            step: self.step,
        };
        let mut window = vec![0u32; seq_len + 1];
        let (group, v0) = (
            self.group_of(self.step),
            self.window_of(self.step) * seq_len as u64,
        );
        for r in 0..batch {
            let span = r * seq_len..(r + 1) * seq_len;
            let row = group * batch + r;
            self.read_row(row, v0, &mut window, &mut out.resets[span.clone()]);
            out.inputs[span.clone()].copy_from_slice(&window[..seq_len]);
            out.targets[span].copy_from_slice(&window[1..]);
        }
        self.step += 1;
        Ok(out)
    }

    /// Copies row `r`'s tokens `v0 .. v0 + out.len()` into `out` and marks in `resets` (one
    /// shorter) the positions where a document starts.
    fn read_row(&self, r: usize, v0: u64, out: &mut [u32], resets: &mut [bool]) {
        let row = &self.rows[r];
        resets.fill(false);
        let mut i = row.offsets.partition_point(|&o| o <= v0) - 1;
        let (mut pos, mut filled) = (v0, 0usize);
        while filled < out.len() {
            let doc = self.docs[row.docs[i] as usize];
            let local = pos - row.offsets[i];
            if local == 0 && filled < resets.len() {
                resets[filled] = true;
            }
            let n = ((doc.len - local) as usize).min(out.len() - filled);
            let shard = &self.shards[doc.shard as usize];
            shard.read_tokens((doc.start + local) as usize, &mut out[filled..filled + n]);
            filled += n;
            pos += n as u64;
            i += 1;
        }
    }
}
