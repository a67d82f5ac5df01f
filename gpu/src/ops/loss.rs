//! Launcher of `gpu/kernels/loss.cu`: fused softmax + masked cross-entropy + its gradient.

use reference::Result;

use crate::cuda::Dev;
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, Ptr, PtrMut};

kernel_params! {
    /// Per row: `row_loss[r] = logsumexp − logits[r, target]` (0 when masked out), and the
    /// gradient `k · (softmax − onehot)` (zeros when masked out): over the logits in f32, or,
    /// when `grad_lp` is not null, into `grad_lp` in bf16 / fp16 (`lp_mode` 0 / 1) for the
    /// lm_head's backward GEMMs (the logits are then left as they are).
    CrossEntropyFwdBwdF32 => ["cross_entropy_fwd_bwd_f32"] {
        logits: PtrMut<f32>,
        targets: Ptr<u32>,
        /// One byte per row, or null for every row.
        mask: Ptr<u8>,
        vocab: i64,
        k: f32,
        row_loss: PtrMut<f32>,
        /// `[rows, vocab]` low-precision gradient, or null for the f32 one in place.
        grad_lp: PtrMut<u16>,
        lp_mode: i32,
    }
}

pub(crate) fn kernels() -> Vec<KernelInfo> {
    info::<CrossEntropyFwdBwdF32>().collect()
}

/// The text of `gpu/kernels/loss.cuh`.
pub fn params_cuh() -> String {
    cuh("loss", &[CrossEntropyFwdBwdF32::c_struct])
}

/// Launches `cross_entropy_fwd_bwd_f32` over `rows` rows. Where a row of logits fits the
/// shared memory the device granted the kernel ([`Dev::ce_stage_bytes`]), the launch gives it
/// that much and the kernel reads each row from device memory once instead of three times
/// (the same bits); `VET_CE_STAGE=0` turns that off.
///
/// # Safety
/// `logits` holds `rows * vocab` f32, `targets` `rows` ids below `vocab`, `mask` (if not null)
/// `rows` bytes, `row_loss` `rows` f32, `grad_lp` (if not null) `rows * vocab` u16.
pub unsafe fn cross_entropy_fwd_bwd(
    dev: &Dev,
    rows: usize,
    p: &CrossEntropyFwdBwdF32,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cross_entropy_fwd_bwd_staging(dev, rows, p, ce_stage_enabled()) }
}

/// [`cross_entropy_fwd_bwd`] with staging on or off (`stage`), whatever `VET_CE_STAGE` says:
/// the conformance test compares the two.
///
/// # Safety
/// As [`cross_entropy_fwd_bwd`].
pub unsafe fn cross_entropy_fwd_bwd_staging(
    dev: &Dev,
    rows: usize,
    p: &CrossEntropyFwdBwdF32,
    stage: bool,
) -> Result<()> {
    let smem = ce_stage_smem(p.vocab, dev.ce_stage_bytes, stage);
    // SAFETY: the caller's contract is the kernel's; `smem` is within what the device granted.
    unsafe { dev.launch((rows as u32, 1, 1), 1024, smem, p) }
}

/// Dynamic shared memory of one cross-entropy launch: a row of `vocab` f32 where it fits the
/// `granted` bytes and staging is on, else 0 (the kernel then reads the row three times).
pub fn ce_stage_smem(vocab: i64, granted: usize, enabled: bool) -> u32 {
    let row = (vocab.max(0) as usize).saturating_mul(4);
    if enabled && row > 0 && row <= granted {
        row as u32
    } else {
        0
    }
}

pub(crate) fn ce_stage_enabled() -> bool {
    std::env::var("VET_CE_STAGE").map_or(true, |v| v != "0")
}

#[cfg(test)]
mod tests {
    use super::ce_stage_smem;

    #[test]
    fn a_row_is_staged_only_where_it_fits_the_grant() {
        // 50,280 × 4 bytes fit the sm_90 grant (227 KiB less the static part).
        assert_eq!(ce_stage_smem(50_280, 231_000, true), 201_120);
        assert_eq!(ce_stage_smem(50_280, 201_120, true), 201_120);
        assert_eq!(ce_stage_smem(50_280, 201_119, true), 0);
        // A 128k vocabulary never fits; no grant (an older card) or VET_CE_STAGE=0: none.
        assert_eq!(ce_stage_smem(128_256, 231_000, true), 0);
        assert_eq!(ce_stage_smem(50_280, 0, true), 0);
        assert_eq!(ce_stage_smem(50_280, 231_000, false), 0);
    }
}
