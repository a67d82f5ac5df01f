//! The training head: lm_head + softmax + cross-entropy + their gradient, in chunks of rows,
//! so the `[tokens, vocab]` logits never exist at once (at 16 × 2048 tokens and a vocabulary
//! of 50280 they alone would take 6.6 GB in f32, and as much again in bf16 for the backward).
//!
//! Per chunk of `ws.ce_rows` rows: the lm_head GEMM writes the chunk's f32 logits into
//! `ws.logits`; the loss kernel writes the row losses and the logits' gradient (in bf16 / fp16
//! modes straight into the GEMM precision, `ws.lp[0]`); two GEMMs then write the chunk's rows
//! of `d_hn` (the final norm's output gradient) and add the chunk's share to the lm_head
//! weight's gradient. Chunks run in row order on one stream, so the sum over chunks has a
//! fixed order and two runs give the same bits. Against one GEMM over every row, the weight
//! gradient's sum is split at the chunk boundaries (a different rounding, well inside the
//! conformance tolerances, which cover chunks of 3 rows: `gpu_head_chunks`).

use reference::Result;

use crate::cuda::Buf;
use crate::model::{Model, Opnd};
use crate::ops::loss::{cross_entropy_fwd_bwd, CrossEntropyFwdBwdF32};
use crate::params::{Ptr, PtrMut};
use crate::work::Work;

/// Cross-entropy of the lm_head over the final norm's output of a training workspace whose
/// forward has run: per-row losses into `row_loss`, `d_hn` (the final norm's output gradient)
/// over every row, and the lm_head weight's gradient added into `grads`. `k` = grad_scale /
/// n_targets.
pub(crate) fn loss_dev(m: &Model, ws: &Work, grads: &Buf, has_mask: bool, k: f32) -> Result<()> {
    let gw = ws.grad.as_ref().expect("training workspace");
    let (n, dm, v) = (ws.n, m.cfg.d_model, m.cfg.vocab_size);
    let head = m.layout.head;
    let chunk = ws.ce_rows.max(1);
    let lowp = m.shadow.is_some();
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let hf = m.hf_rows(ws, r0, rows);
        m.dev.tag("lm_head");
        m.mm(
            ws,
            true,
            false,
            (v, rows, dm),
            Opnd::W(head, dm),
            hf,
            (ws.logits.ptr, v),
            0.0,
        )?;
        let grad_lp = if lowp { ws.lp[0].ptr } else { 0 };
        let p = CrossEntropyFwdBwdF32 {
            logits: PtrMut::new(ws.logits.ptr),
            targets: Ptr::new(gw.targets.at::<u32>(r0)),
            mask: Ptr::new(if has_mask { gw.mask.at::<u8>(r0) } else { 0 }),
            vocab: v as i64,
            k,
            row_loss: PtrMut::new(gw.row_loss.at::<f32>(r0)),
            grad_lp: PtrMut::new(grad_lp),
            lp_mode: m.lp_mode(),
        };
        m.dev.tag("cross_entropy");
        // SAFETY: the chunk's logits hold `rows × vocab` f32 (`ws.logits` holds `ce_rows`
        // rows), `lp[0]` as many u16 (`Work::new`), and the targets (checked against the
        // vocabulary by the caller), mask bytes and row losses `n` rows from which the chunk
        // reads `rows` at `r0`.
        unsafe { cross_entropy_fwd_bwd(&m.dev, rows, &p) }?;
        // The operands are parameters or copies already in the GEMM precision: no GEMM here
        // casts into `ws.lp`, so `lp[0]` (the gradient) and `lp[1]` (hf) stay valid.
        let dlogits = if lowp {
            Opnd::Lp(grad_lp, v)
        } else {
            Opnd::A(ws.logits.ptr, v, rows, v)
        };
        m.dev.tag("lm_head.bwd d_hn");
        m.mm(
            ws,
            false,
            false,
            (dm, rows, v),
            Opnd::W(head, dm),
            dlogits,
            (gw.d_hn.at::<f32>(r0 * dm), dm),
            0.0,
        )?;
        m.dev.tag("lm_head.bwd d_weight");
        m.mm(
            ws,
            false,
            true,
            (dm, v, rows),
            hf,
            dlogits,
            (grads.at::<f32>(head), dm),
            1.0,
        )?;
    }
    Ok(())
}
