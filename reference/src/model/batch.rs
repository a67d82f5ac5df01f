//! The token rows one forward or backward pass takes.

use crate::config::MambaConfig;
use crate::error::{Error, Result};

/// A batch of token rows: `tokens` and `resets` are `[batch, seq_len]`.
///
/// `resets[b, t] = true` means position `t` starts a new document: the scan state and the conv
/// window are zeroed there (and the initial state is not seen by that row from then on).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub batch: usize,
    pub seq_len: usize,
    pub tokens: &'a [u32],
    pub resets: Option<&'a [bool]>,
}

impl<'a> Batch<'a> {
    /// A batch without resets.
    pub fn new(tokens: &'a [u32], batch: usize, seq_len: usize) -> Self {
        Batch {
            batch,
            seq_len,
            tokens,
            resets: None,
        }
    }

    /// Number of positions, `batch * seq_len`.
    pub fn rows(&self) -> usize {
        self.batch * self.seq_len
    }

    /// Checks lengths and token ids against `cfg`.
    pub fn check(&self, cfg: &MambaConfig, op: &'static str) -> Result<()> {
        let n = self.rows();
        if self.tokens.len() != n {
            return Err(Error::Shape {
                op,
                msg: format!(
                    "tokens has {} ids, expected [batch, seq_len] = [{}, {}]",
                    self.tokens.len(),
                    self.batch,
                    self.seq_len
                ),
            });
        }
        if let Some(r) = self.resets {
            if r.len() != n {
                return Err(Error::Shape {
                    op,
                    msg: format!(
                        "resets has {} flags, expected [batch, seq_len] = [{}, {}]",
                        r.len(),
                        self.batch,
                        self.seq_len
                    ),
                });
            }
        }
        if let Some((i, &t)) = self
            .tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= cfg.vocab_size)
        {
            return Err(Error::Shape {
                op,
                msg: format!(
                    "token id {t} at [{}, {}] is outside the vocabulary of {}",
                    i / self.seq_len.max(1),
                    i % self.seq_len.max(1),
                    cfg.vocab_size
                ),
            });
        }
        Ok(())
    }
}
