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

/// Launches `cross_entropy_fwd_bwd_f32` over `rows` rows.
///
/// # Safety
/// `logits` holds `rows * vocab` f32, `targets` `rows` ids below `vocab`, `mask` (if not null)
/// `rows` bytes, `row_loss` `rows` f32, `grad_lp` (if not null) `rows * vocab` u16.
pub unsafe fn cross_entropy_fwd_bwd(
    dev: &Dev,
    rows: usize,
    p: &CrossEntropyFwdBwdF32,
) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch((rows as u32, 1, 1), 1024, 0, p) }
}
