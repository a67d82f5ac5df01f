//! Launchers of `gpu/kernels/adamw.cu`: the global gradient norm (f64, fixed order) and the
//! AdamW update.

use reference::Result;

use crate::cuda::Dev;
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, Ptr, PtrMut};

/// Blocks of the gradient-norm reduction (fixed, so the order never depends on the device).
pub const NORM_BLOCKS: usize = 1024;

kernel_params! {
    /// `part[block] = Σ g²` over the block's fixed grid-stride share of `n` values, in f64.
    SumsqPartialF64 => ["sumsq_partial_f64"] {
        g: Ptr<f32>,
        n: i64,
        part: PtrMut<f64>,
    }
}

kernel_params! {
    /// `out[0] = Σ part[..n]`, in order.
    SumsqFinalF64 => ["sumsq_final_f64"] {
        part: Ptr<f64>,
        n: i64,
        out: PtrMut<f64>,
    }
}

kernel_params! {
    /// One AdamW update of `n` values (twin of reference/src/optim.rs); `clip`: multiply the
    /// gradient by `clip_c` first and store it back.
    AdamwF32 => ["adamw_f32"] {
        p: PtrMut<f32>,
        g: PtrMut<f32>,
        m: PtrMut<f32>,
        v: PtrMut<f32>,
        n: i64,
        clip: i32,
        clip_c: f32,
        b1: f32,
        b2: f32,
        omb1: f32,
        omb2: f32,
        eps: f32,
        decays: i32,
        decay: f32,
        step_size: f32,
        sqrt_bc2: f32,
    }
}

pub(crate) fn kernels() -> Vec<KernelInfo> {
    let mut v: Vec<KernelInfo> = info::<SumsqPartialF64>().collect();
    v.extend(info::<SumsqFinalF64>());
    v.extend(info::<AdamwF32>());
    v
}

/// The text of `gpu/kernels/adamw.cuh`.
pub fn params_cuh() -> String {
    cuh(
        "adamw",
        &[
            SumsqPartialF64::c_struct,
            SumsqFinalF64::c_struct,
            AdamwF32::c_struct,
        ],
    )
}

/// Launches `sumsq_partial_f64` on [`NORM_BLOCKS`] blocks.
///
/// # Safety
/// `g` holds `n` f32, `part` [`NORM_BLOCKS`] f64.
pub unsafe fn sumsq_partial(dev: &Dev, p: &SumsqPartialF64) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch((NORM_BLOCKS as u32, 1, 1), 256, 0, p) }
}

/// Launches `sumsq_final_f64`.
///
/// # Safety
/// `part` holds `n` f64, `out` one f64.
pub unsafe fn sumsq_final(dev: &Dev, p: &SumsqFinalF64) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch((1, 1, 1), 32, 0, p) }
}

/// Launches `adamw_f32`.
///
/// # Safety
/// `p`, `g`, `m` and `v` each hold `n` f32 and do not overlap.
pub unsafe fn adamw(dev: &Dev, p: &AdamwF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(dev.grid1d(p.n as usize), 256, 0, p) }
}
