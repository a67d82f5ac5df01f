//! The loss kernel on host data (a child of `check`, for its helpers).

use reference::Result;

use super::{OpDev, PAD};
use crate::ops::loss::{cross_entropy_fwd_bwd_staging, CrossEntropyFwdBwdF32};
use crate::params::{Ptr, PtrMut};

impl OpDev {
    /// Fused softmax + cross-entropy + gradient: (mean loss, d logits).
    pub fn cross_entropy(
        &self,
        logits: &[f32],
        targets: &[u32],
        mask: Option<&[bool]>,
        vocab: usize,
        scale: f32,
    ) -> Result<(f32, Vec<f32>)> {
        // Staged where it fits, unless VET_CE_STAGE=0 (as the engine's launches).
        let stage = crate::ops::loss::ce_stage_enabled();
        self.cross_entropy_staging(logits, targets, mask, vocab, scale, stage)
    }

    /// [`OpDev::cross_entropy`] with the row staged in shared memory where it fits (`stage`)
    /// or read from device memory three times.
    pub fn cross_entropy_staging(
        &self,
        logits: &[f32],
        targets: &[u32],
        mask: Option<&[bool]>,
        vocab: usize,
        scale: f32,
        stage: bool,
    ) -> Result<(f32, Vec<f32>)> {
        let n = targets.len();
        let counts = |i: usize| mask.is_none_or(|m| m[i]);
        let n_targets = (0..n).filter(|&i| counts(i)).count().max(1);
        let g = self.out(n * vocab, "cross_entropy d_logits")?;
        g.buf.write(PAD, logits)?;
        let tb = self.put(targets)?;
        let mb = mask
            .map(|m| self.put(&m.iter().map(|&b| b as u8).collect::<Vec<u8>>()))
            .transpose()?;
        let rows = self.out(n, "cross_entropy row loss")?;
        let inv = 1.0f32 / n_targets as f32;
        let p = CrossEntropyFwdBwdF32 {
            logits: g.ptr(),
            targets: Ptr::new(tb.ptr),
            mask: Ptr::or_null(mb.as_ref().map(|m| m.ptr)),
            vocab: vocab as i64,
            k: scale * inv,
            row_loss: rows.ptr(),
            grad_lp: PtrMut::NULL,
            lp_mode: 0,
        };
        // SAFETY: `n * vocab` logits, `n` targets (the caller's, below `vocab`), `n` mask
        // bytes and row losses, all allocated here.
        unsafe { cross_entropy_fwd_bwd_staging(&self.dev, n, &p, stage) }?;
        let rows = self.take(rows)?;
        let mut total = 0f32;
        for (i, l) in rows.iter().enumerate() {
            if counts(i) {
                total += *l;
            }
        }
        Ok((total * inv, self.take(g)?))
    }
}
