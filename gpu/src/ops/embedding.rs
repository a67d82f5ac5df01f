//! Launchers of `gpu/kernels/embedding.cu`: the token embedding and its gradient.

use reference::Result;

use crate::cuda::Dev;
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, Ptr, PtrMut};

kernel_params! {
    /// `out[i, :] = emb[tokens[i], :]`.
    EmbeddingFwdF32 => ["embedding_fwd_f32"] {
        tokens: Ptr<u32>,
        emb: Ptr<f32>,
        out: PtrMut<f32>,
        d: i64,
    }
}

kernel_params! {
    /// For each distinct token `u` (sorted), `grad[uniq[u], :] += d_resid[pos, :]` over its
    /// positions `positions[offsets[u]..offsets[u + 1]]`, in order (no atomics).
    EmbeddingBwdF32 => ["embedding_bwd_f32"] {
        uniq: Ptr<u32>,
        offsets: Ptr<i32>,
        positions: Ptr<i32>,
        d_resid: Ptr<f32>,
        grad: PtrMut<f32>,
        d: i64,
    }
}

pub(crate) fn kernels() -> Vec<KernelInfo> {
    let mut v: Vec<KernelInfo> = info::<EmbeddingFwdF32>().collect();
    v.extend(info::<EmbeddingBwdF32>());
    v
}

/// The text of `gpu/kernels/embedding.cuh`.
pub fn params_cuh() -> String {
    cuh(
        "embedding",
        &[EmbeddingFwdF32::c_struct, EmbeddingBwdF32::c_struct],
    )
}

/// Launches `embedding_fwd_f32` over `rows` tokens.
///
/// # Safety
/// `tokens` holds `rows` ids below the embedding's row count; `emb` holds those rows of `d`
/// f32; `out` holds `rows * d` f32.
pub unsafe fn embedding_fwd(dev: &Dev, rows: usize, p: &EmbeddingFwdF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch((rows as u32, 1, 1), 256, 0, p) }
}

/// Launches `embedding_bwd_f32` over `n_uniq` distinct tokens.
///
/// # Safety
/// `uniq` holds `n_uniq` ids (rows of `grad`, `d` f32 each), `offsets` `n_uniq + 1`
/// increasing offsets into `positions`, whose entries are rows of `d_resid` (`d` f32 each).
pub unsafe fn embedding_bwd(dev: &Dev, n_uniq: usize, p: &EmbeddingBwdF32) -> Result<()> {
    let grid = (n_uniq as u32, (p.d as usize).div_ceil(256) as u32, 1);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}
