//! Launchers of `gpu/kernels/decode.cu`: the decode step's conv update and scan update (one
//! token per row, the recurrent state updated in place).

use reference::Result;

use super::conv1d::ConvInF32;
use super::selective_scan::ScanInF32;
use crate::cuda::Dev;
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, PtrMut};

kernel_params! {
    /// The window `[batch, d_inner, d_conv − 1]` shifted in place; `xs = silu(conv(window, x)
    /// + bias)`, again in low precision into `xs_lp` unless null.
    ConvUpdateF32 => ["conv_update_f32"] {
        conv: ConvInF32,
        window: PtrMut<f32>,
        xs: PtrMut<f32>,
        xs_lp: PtrMut<u16>,
        lp_mode: i32,
        batch: i64,
        d_inner: i64,
    }
}

kernel_params! {
    /// One scan step: `h_state` `[batch, d_inner, d_state]` in place, the gated output into
    /// `out` (and in low precision into `out_lp` unless null).
    SsmUpdateF32 => ["ssm_update_f32"] {
        scan: ScanInF32,
        h_state: PtrMut<f32>,
        out: PtrMut<f32>,
        out_lp: PtrMut<u16>,
        lp_mode: i32,
        batch: i64,
        d_inner: i64,
        d_state: i64,
    }
}

pub(crate) fn kernels() -> Vec<KernelInfo> {
    let mut v: Vec<KernelInfo> = info::<ConvUpdateF32>().collect();
    v.extend(info::<SsmUpdateF32>());
    v
}

/// The text of `gpu/kernels/decode.cuh`.
pub fn params_cuh() -> String {
    cuh("decode", &[ConvUpdateF32::c_struct, SsmUpdateF32::c_struct])
}

/// Launches `conv_update_f32`.
///
/// # Safety
/// The conv inputs as in [`super::conv1d::conv1d_fwd`] for `seq_len` 1; `window` holds `batch
/// * d_inner * (d_conv − 1)` f32; `xs` (and `xs_lp` where not null) `batch * d_inner` values.
pub unsafe fn conv_update(dev: &Dev, p: &ConvUpdateF32) -> Result<()> {
    let grid = dev.grid1d((p.batch * p.d_inner) as usize);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `ssm_update_f32`.
///
/// # Safety
/// The scan inputs as in [`super::selective_scan::selective_scan_fwd`] for `seq_len` 1;
/// `h_state` holds `batch * d_inner * d_state` f32; `out` (and `out_lp` where not null) `batch
/// * d_inner` values.
pub unsafe fn ssm_update(dev: &Dev, p: &SsmUpdateF32) -> Result<()> {
    let per_block = 256 / dev.shape.d_state_pad;
    let grid = (
        (p.d_inner as usize).div_ceil(per_block) as u32,
        p.batch as u32,
        1,
    );
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}
