//! Question/answer fine-tuning batches: JSON Lines pairs, a prompt template, answer-only loss
//! masks, optional packing of several examples per row.
//!
//! An example is `encode(template with the question) ++ encode(answer) ++ [<|endoftext|>]`.
//! Its `n` tokens fill `n - 1` input positions of a row (inputs are the example without its
//! last token, targets without its first). The loss mask is true exactly where the target is an
//! answer token or the final `<|endoftext|>`.
//!
//! An example longer than `seq_len + 1` tokens keeps its last `seq_len + 1` tokens: the prompt
//! is cut from the left, so the answer survives whole when it fits (answer + eot ≤ `seq_len +
//! 1`); otherwise the prompt is dropped entirely and the answer loses its beginning.
//! [`QaBatcher::truncated`] counts such examples.
//!
//! Epochs, rank slicing and [`Position`] work as in the pretraining [`Loader`](super::loader):
//! rows are laid out from the epoch's shuffled example order, global step `s` takes rows
//! `s * world_size * batch ..`, rank `r` its `r`-th block of `batch`, and the rows that do not
//! fill a last global batch are dropped.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use super::loader::{check_config, epoch_order, Position};
use crate::tokenizer::{encode_templated, encode_text, EOT, PAD, QA_TEMPLATE};

/// One question/answer pair; fields other than `question` and `answer` are kept in `extra`.
#[derive(Clone, Debug, PartialEq)]
pub struct QaPair {
    pub question: String,
    pub answer: String,
    pub extra: Map<String, Value>,
}

/// Reads a JSON Lines file of `{"question": ..., "answer": ...}` objects. Blank lines are
/// skipped; any other problem is an error naming `file:line`.
pub fn read_qa_jsonl(path: &Path) -> Result<Vec<QaPair>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}: malformed JSON", at()))?;
        let Value::Object(mut extra) = value else {
            bail!("{}: expected a JSON object with question and answer", at());
        };
        let mut field = |name: &str| match extra.remove(name) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => bail!("{}: {name:?} must be a string, found {other}", at()),
            None => bail!("{}: missing {name:?}", at()),
        };
        let question = field("question")?;
        let answer = field("answer")?;
        pairs.push(QaPair {
            question,
            answer,
            extra,
        });
    }
    if pairs.is_empty() {
        bail!("{}: no question/answer pairs", path.display());
    }
    Ok(pairs)
}

/// The prompt an answer follows; `{question}` is replaced by the question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QaTemplate {
    pub prompt: String,
}

impl Default for QaTemplate {
    /// [`QA_TEMPLATE`]: `"<|question|> {question}\n<|answer|> "`.
    fn default() -> Self {
        QaTemplate {
            prompt: QA_TEMPLATE.to_string(),
        }
    }
}

impl QaTemplate {
    /// A template; it must contain `{question}`.
    pub fn new(prompt: &str) -> Result<QaTemplate> {
        let t = QaTemplate {
            prompt: prompt.to_string(),
        };
        t.check()?;
        Ok(t)
    }

    fn check(&self) -> Result<()> {
        if !self.prompt.contains("{question}") {
            bail!(
                "QA template {:?} has no {{question}} placeholder",
                self.prompt
            );
        }
        Ok(())
    }

    /// The prompt text for `question`.
    pub fn render(&self, question: &str) -> String {
        self.prompt.replace("{question}", question)
    }
}

/// QA batcher settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QaConfig {
    /// Rows per batch on this rank.
    pub batch: usize,
    /// Positions per row; examples keep at most `seq_len + 1` tokens.
    pub seq_len: usize,
    /// Shuffle seed (epoch `e` uses the order drawn from `(seed, e)`).
    pub seed: u64,
    /// This process's data-parallel rank, `< world_size`.
    pub rank: usize,
    /// Number of data-parallel ranks.
    pub world_size: usize,
    /// Pack several examples per row (greedy in shuffled order) instead of one per row.
    pub pack: bool,
}

/// One QA batch, row-major `[batch, seq_len]` in every field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QaBatch {
    pub batch: usize,
    pub seq_len: usize,
    /// Example tokens without their last; `<|pad|>` (or eot) after the row's last example.
    pub inputs: Vec<u32>,
    /// Example tokens without their first (the next-token targets); padded like `inputs`.
    pub targets: Vec<u32>,
    /// True where the target is an answer token or the example's final `<|endoftext|>`.
    pub mask: Vec<bool>,
    /// True at the first position of each example within a row.
    pub resets: Vec<bool>,
    /// The epoch and in-epoch global step this batch belongs to.
    pub epoch: u64,
    pub step: u64,
}

/// Tokenised examples, stored flat.
struct Examples {
    tokens: Vec<u32>,
    /// Example `i` is `tokens[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<usize>,
    /// Tokens of example `i` before its answer (after truncation).
    prompt_len: Vec<usize>,
}

impl Examples {
    fn get(&self, i: usize) -> (&[u32], usize) {
        (
            &self.tokens[self.offsets[i]..self.offsets[i + 1]],
            self.prompt_len[i],
        )
    }

    /// Input positions example `i` occupies.
    fn positions(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i] - 1
    }
}

/// Shuffled, rank-sliced, optionally packed QA batches.
pub struct QaBatcher {
    cfg: QaConfig,
    examples: Examples,
    truncated: usize,
    pad_id: u32,
    epoch: u64,
    step: u64,
    order: Vec<u32>,
    /// Row `j` of the epoch holds examples `order[rows[j]..rows[j + 1]]`.
    rows: Vec<usize>,
}

impl QaBatcher {
    /// Tokenises `pairs` with `tok` and `template` and lays out epoch 0.
    pub fn new(
        pairs: &[QaPair],
        tok: &Tokenizer,
        template: &QaTemplate,
        cfg: QaConfig,
    ) -> Result<QaBatcher> {
        check_config(cfg.batch, cfg.seq_len, cfg.rank, cfg.world_size)?;
        template.check()?;
        let eot = tok
            .token_to_id(EOT)
            .with_context(|| format!("the tokenizer has no {EOT} token"))?;
        let pad_id = tok.token_to_id(PAD).unwrap_or(eot);
        let (examples, truncated) = tokenize(pairs, tok, template, eot, cfg.seq_len)?;
        let mut b = QaBatcher {
            cfg,
            examples,
            truncated,
            pad_id,
            epoch: 0,
            step: 0,
            order: Vec::new(),
            rows: Vec::new(),
        };
        b.layout(0)?;
        Ok(b)
    }

    /// Examples longer than `seq_len + 1` tokens that were cut (see the module docs).
    pub fn truncated(&self) -> usize {
        self.truncated
    }

    /// Number of examples.
    pub fn examples(&self) -> usize {
        self.examples.prompt_len.len()
    }

    /// Rows in the current epoch (varies between epochs when packing).
    pub fn rows_per_epoch(&self) -> usize {
        self.rows.len() - 1
    }

    /// Global steps in the current epoch (varies between epochs when packing).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.rows_per_epoch() / (self.cfg.batch * self.cfg.world_size)) as u64
    }

    /// The next batch to be yielded.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            step: self.step,
        }
    }

    /// Moves to `pos`; the batches that follow are those of an uninterrupted run.
    pub fn seek(&mut self, pos: Position) -> Result<()> {
        if pos.epoch != self.epoch || self.rows.is_empty() {
            self.layout(pos.epoch)?;
        }
        if pos.step > self.steps_per_epoch() {
            bail!(
                "cannot seek to step {} of epoch {}: that epoch has {} QA steps",
                pos.step,
                pos.epoch,
                self.steps_per_epoch()
            );
        }
        self.step = pos.step;
        Ok(())
    }

    /// Shuffles epoch `epoch` and packs its rows.
    fn layout(&mut self, epoch: u64) -> Result<()> {
        self.order = epoch_order(self.examples(), self.cfg.seed, epoch)?;
        self.rows.clear();
        self.rows.push(0);
        let mut used = 0;
        for (k, &ex) in self.order.iter().enumerate() {
            let n = self.examples.positions(ex as usize);
            if k > 0 && (!self.cfg.pack || used + n > self.cfg.seq_len) {
                self.rows.push(k);
                used = 0;
            }
            used += n;
        }
        self.rows.push(self.order.len());
        self.epoch = epoch;
        self.step = 0;
        let global = self.cfg.batch * self.cfg.world_size;
        if self.rows_per_epoch() < global {
            bail!(
                "epoch {epoch}: {} QA examples fill {} rows of seq_len {}, fewer than one global \
                 batch of batch {} x world_size {} = {global} rows",
                self.examples(),
                self.rows_per_epoch(),
                self.cfg.seq_len,
                self.cfg.batch,
                self.cfg.world_size
            );
        }
        Ok(())
    }

    /// The next batch of this rank, in a fresh buffer.
    pub fn next_batch(&mut self) -> Result<QaBatch> {
        let mut out = QaBatch::default();
        self.next_batch_into(&mut out)?;
        Ok(out)
    }

    /// Fills `out` with the next batch of this rank, reusing its buffers.
    pub fn next_batch_into(&mut self, out: &mut QaBatch) -> Result<()> {
        if self.step >= self.steps_per_epoch() {
            self.layout(self.epoch + 1)?;
        }
        let (batch, seq_len) = (self.cfg.batch, self.cfg.seq_len);
        let n = batch * seq_len;
        out.batch = batch;
        out.seq_len = seq_len;
        out.inputs.resize(n, 0);
        out.targets.resize(n, 0);
        out.mask.resize(n, false);
        out.resets.resize(n, false);
        out.epoch = self.epoch;
        out.step = self.step;
        let first = (self.step as usize * self.cfg.world_size + self.cfg.rank) * batch;
        for row in 0..batch {
            let j = first + row;
            let span = row * seq_len..(row + 1) * seq_len;
            self.fill_row(
                &self.order[self.rows[j]..self.rows[j + 1]],
                &mut out.inputs[span.clone()],
                &mut out.targets[span.clone()],
                &mut out.mask[span.clone()],
                &mut out.resets[span],
            );
        }
        self.step += 1;
        Ok(())
    }

    /// Writes the examples `row` one after another, then padding.
    fn fill_row(
        &self,
        row: &[u32],
        inputs: &mut [u32],
        targets: &mut [u32],
        mask: &mut [bool],
        resets: &mut [bool],
    ) {
        inputs.fill(self.pad_id);
        targets.fill(self.pad_id);
        mask.fill(false);
        resets.fill(false);
        let mut t = 0;
        for &ex in row {
            let (tokens, prompt_len) = self.examples.get(ex as usize);
            let n = tokens.len() - 1;
            debug_assert!(t + n <= inputs.len());
            inputs[t..t + n].copy_from_slice(&tokens[..n]);
            targets[t..t + n].copy_from_slice(&tokens[1..]);
            // Target k is token k + 1: an answer token (or the eot) when k + 1 >= prompt_len.
            let answer_from = prompt_len.saturating_sub(1);
            mask[t + answer_from..t + n].fill(true);
            resets[t] = true;
            t += n;
        }
    }
}

/// Tokenises every pair into an example, truncating to `seq_len + 1` tokens; returns the
/// examples and how many were truncated.
fn tokenize(
    pairs: &[QaPair],
    tok: &Tokenizer,
    template: &QaTemplate,
    eot: u32,
    seq_len: usize,
) -> Result<(Examples, usize)> {
    let mut ex = Examples {
        tokens: Vec::new(),
        offsets: vec![0],
        prompt_len: Vec::with_capacity(pairs.len()),
    };
    let mut truncated = 0;
    let max = seq_len + 1;
    for (i, pair) in pairs.iter().enumerate() {
        let prompt = encode_templated(tok, &template.prompt, &pair.question)
            .with_context(|| format!("QA pair {}: question", i + 1))?;
        let mut answer =
            encode_text(tok, &pair.answer).with_context(|| format!("QA pair {}: answer", i + 1))?;
        answer.push(eot);
        let n = prompt.len() + answer.len();
        if n < 2 {
            bail!(
                "QA pair {}: the prompt and answer are empty, nothing to learn",
                i + 1
            );
        }
        let cut = n.saturating_sub(max);
        if cut > 0 {
            truncated += 1;
        }
        let keep_prompt = prompt.len().saturating_sub(cut);
        let answer_cut = cut.saturating_sub(prompt.len());
        ex.tokens
            .extend_from_slice(&prompt[prompt.len() - keep_prompt..]);
        ex.tokens.extend_from_slice(&answer[answer_cut..]);
        ex.offsets.push(ex.tokens.len());
        ex.prompt_len.push(keep_prompt);
    }
    Ok((ex, truncated))
}
