//! Launchers of `gpu/kernels/norm.cu`: the fused residual add + RMSNorm / LayerNorm and its
//! backward (dx per row, then the weight / bias gradients as fixed-order column sums).

use reference::Result;

use crate::cuda::Dev;
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, Ptr, PtrMut};

kernel_params! {
    /// One row per block: `x_out = x_in + add` (no add: `x_out` unused, may be null),
    /// `y = norm(x_out)` (y may be null), the row's mean and rstd (each may be null).
    NormFwdF32 => ["norm_fwd_f32"] {
        x_in: Ptr<f32>,
        add: Ptr<f32>,
        x_out: PtrMut<f32>,
        y: PtrMut<f32>,
        mean_out: PtrMut<f32>,
        rstd_out: PtrMut<f32>,
        w: Ptr<f32>,
        b: Ptr<f32>,
        d: i64,
        eps: f32,
        is_layer: i32,
        /// y again in bf16 (`lp_mode` 0) or fp16 (1), or null.
        y_lp: PtrMut<u16>,
        lp_mode: i32,
        /// `x_in + add` (or `x_in` without add) in bf16 / fp16, or null: the copy of the
        /// residual a lean training workspace keeps for the backward.
        x_out_lp: PtrMut<u16>,
    }
}

kernel_params! {
    /// dx of one row per block; `accum`: `dx_out += dx`, else `dx_out = dx`.
    NormBwdDxF32 => ["norm_bwd_dx_f32"] {
        x: Ptr<f32>,
        w: Ptr<f32>,
        mean_in: Ptr<f32>,
        rstd_in: Ptr<f32>,
        dy: Ptr<f32>,
        dx_out: PtrMut<f32>,
        d: i64,
        is_layer: i32,
        accum: i32,
    }
}

kernel_params! {
    /// Column sums of `dy · xhat` (and of `dy`, when `part_b` is not null) per row block.
    NormBwdDwPartialF32 => ["norm_bwd_dw_partial_f32"] {
        x: Ptr<f32>,
        mean_in: Ptr<f32>,
        rstd_in: Ptr<f32>,
        dy: Ptr<f32>,
        rows: i64,
        d: i64,
        rows_per: i64,
        part_w: PtrMut<f32>,
        part_b: PtrMut<f32>,
    }
}

pub(crate) fn kernels() -> Vec<KernelInfo> {
    let mut v: Vec<KernelInfo> = info::<NormFwdF32>().collect();
    v.extend(info::<NormBwdDxF32>());
    v.extend(info::<NormBwdDwPartialF32>());
    v
}

/// The text of `gpu/kernels/norm.cuh`.
pub fn params_cuh() -> String {
    cuh(
        "norm",
        &[
            NormFwdF32::c_struct,
            NormBwdDxF32::c_struct,
            NormBwdDwPartialF32::c_struct,
        ],
    )
}

/// Launches `norm_fwd_f32` over `rows` rows.
///
/// # Safety
/// `x_in` (and `add`, `x_out`, `y`, `y_lp` where not null) hold `rows * d` values; `mean_out`,
/// `rstd_out` (where not null) `rows` f32; `w` (and `b` where not null) `d` f32.
pub unsafe fn norm_fwd(dev: &Dev, rows: usize, p: &NormFwdF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch((rows as u32, 1, 1), 256, 0, p) }
}

/// Launches `norm_bwd_dx_f32` over `rows` rows.
///
/// # Safety
/// `x`, `dy`, `dx_out` hold `rows * d` f32, `mean_in`, `rstd_in` `rows` f32, `w` `d` f32.
pub unsafe fn norm_bwd_dx(dev: &Dev, rows: usize, p: &NormBwdDxF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch((rows as u32, 1, 1), 256, 0, p) }
}

/// Launches `norm_bwd_dw_partial_f32`.
///
/// # Safety
/// `x`, `dy` hold `rows * d` f32, `mean_in`, `rstd_in` `rows` f32; `part_w` (and `part_b`
/// where not null) `n_row_blocks(rows, rows_per) * d` f32.
pub unsafe fn norm_bwd_dw_partial(dev: &Dev, p: &NormBwdDwPartialF32) -> Result<()> {
    let grid = (
        (p.d as usize).div_ceil(256) as u32,
        super::elementwise::n_row_blocks(p.rows, p.rows_per),
        1,
    );
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}
