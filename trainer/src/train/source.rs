//! Where training batches come from: token shards (pretraining) or QA pairs (fine-tuning).

use std::path::Path;

use anyhow::{bail, Result};
use tokenizers::Tokenizer;

use crate::data::loader::{Loader, LoaderConfig, Position};
use crate::data::manifest::Manifest;
use crate::data::qa::{read_qa_jsonl, QaBatcher, QaConfig, QaTemplate};
use crate::data::stream::StreamLoader;

/// One batch, `[batch, seq_len]` each; `mask` is `None` when every target counts.
#[derive(Clone, Debug)]
pub struct TrainBatch {
    pub batch: usize,
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Option<Vec<bool>>,
    pub resets: Vec<bool>,
    /// Stateful training with interleaved streams (`[train] carry_streams`): the group of
    /// rows this batch is a window of (the trainer carries one state per group); else 0.
    pub group: usize,
}

impl TrainBatch {
    /// Positions whose loss counts.
    pub fn n_targets(&self) -> usize {
        self.mask
            .as_ref()
            .map_or(self.inputs.len(), |m| m.iter().filter(|&&b| b).count())
    }
}

/// A batch source of either kind.
pub enum Source {
    Tokens(Box<Loader>),
    Qa(Box<QaBatcher>),
    /// One stream of consecutive windows per row (stateful training).
    Streams(Box<StreamLoader>),
}

impl Source {
    /// Token shards of `split` from `manifest`, checked against the tokenizer and the model.
    pub fn tokens(
        manifest: &Path,
        split: &str,
        cfg: LoaderConfig,
        tokenizer_sha256: Option<&str>,
        vocab: usize,
    ) -> Result<Source> {
        check_manifest(manifest, tokenizer_sha256, vocab)?;
        Ok(Source::Tokens(Box::new(Loader::open(
            manifest, split, cfg,
        )?)))
    }

    /// [`Source::tokens`] as streams of consecutive windows over whole documents, one per
    /// row (`[train] carry_state`).
    pub fn streams(
        manifest: &Path,
        split: &str,
        cfg: LoaderConfig,
        tokenizer_sha256: Option<&str>,
        vocab: usize,
    ) -> Result<Source> {
        check_manifest(manifest, tokenizer_sha256, vocab)?;
        Ok(Source::Streams(Box::new(StreamLoader::open(
            manifest, split, cfg,
        )?)))
    }

    /// Interleaves `groups` groups of streams, `chunk` windows per turn
    /// ([`StreamLoader::interleave`]); only for [`Source::streams`].
    pub fn interleave(self, groups: usize, chunk: usize) -> Result<Source> {
        match self {
            Source::Streams(s) => Ok(Source::Streams(Box::new(s.interleave(groups, chunk)?))),
            _ if groups == 1 => Ok(self),
            _ => bail!("interleaved streams (carry_streams) need stateful training's streams"),
        }
    }

    /// QA pairs from a JSON Lines file, answer-only loss, packed.
    pub fn qa(path: &Path, tok: &Tokenizer, cfg: QaConfig) -> Result<Source> {
        let pairs = read_qa_jsonl(path)?;
        let template = QaTemplate::default();
        Ok(Source::Qa(Box::new(QaBatcher::new(
            &pairs, tok, &template, cfg,
        )?)))
    }

    pub fn next_batch(&mut self) -> Result<TrainBatch> {
        Ok(match self {
            Source::Tokens(l) => token_batch(l.next_batch()?),
            Source::Streams(s) => {
                let b = s.next_batch()?;
                let group = s.group_of(b.step);
                TrainBatch {
                    group,
                    ..token_batch(b)
                }
            }
            Source::Qa(q) => {
                let b = q.next_batch()?;
                TrainBatch {
                    batch: b.batch,
                    seq_len: b.seq_len,
                    inputs: b.inputs,
                    targets: b.targets,
                    mask: Some(b.mask),
                    resets: b.resets,
                    group: 0,
                }
            }
        })
    }

    pub fn position(&self) -> Position {
        match self {
            Source::Tokens(l) => l.position(),
            Source::Qa(q) => q.position(),
            Source::Streams(s) => s.position(),
        }
    }

    pub fn seek(&mut self, p: Position) -> Result<()> {
        match self {
            Source::Tokens(l) => l.seek(p),
            Source::Qa(q) => q.seek(p),
            Source::Streams(s) => s.seek(p),
        }
    }

    pub fn steps_per_epoch(&self) -> u64 {
        match self {
            Source::Tokens(l) => l.steps_per_epoch(),
            Source::Qa(q) => q.steps_per_epoch(),
            Source::Streams(s) => s.steps_per_epoch(),
        }
    }
}

/// A token batch (every target counts).
fn token_batch(b: crate::data::loader::TokenBatch) -> TrainBatch {
    TrainBatch {
        batch: b.batch,
        seq_len: b.seq_len,
        inputs: b.inputs,
        targets: b.targets,
        mask: None,
        resets: b.resets,
        group: 0,
    }
}

/// Checks the shards' manifest against the tokenizer and the model's vocabulary.
fn check_manifest(manifest: &Path, tokenizer_sha256: Option<&str>, vocab: usize) -> Result<()> {
    let (m, _) = Manifest::load(manifest)?;
    if let Some(sha) = tokenizer_sha256 {
        if sha != m.tokenizer.sha256 {
            bail!(
                    "the tokenizer (sha256 {sha}) does not match the data in {} (made with tokenizer sha256 {} from {}): re-run vet-data prepare with this tokenizer",
                    manifest.display(),
                    m.tokenizer.sha256,
                    m.tokenizer.path
                );
        }
    }
    if m.tokenizer.vocab_size > vocab {
        bail!(
            "the data in {} uses a {}-token vocabulary but the model has {vocab} embedding rows",
            manifest.display(),
            m.tokenizer.vocab_size
        );
    }
    Ok(())
}
