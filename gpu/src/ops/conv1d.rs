//! Launchers of `gpu/kernels/conv1d.cu`: the causal depthwise conv1d (+ bias, + SiLU) with
//! document resets and an initial window, the window after the last position, and the
//! backward (dx, the initial window's gradient, the weight / bias gradients per row block).

use reference::Result;

use crate::cuda::Dev;
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, Ptr, PtrMut};

kernel_params! {
    /// The leading parameters of the conv kernels (`conv1d_fwd_f32`, `conv_update_f32`): x
    /// (the x half of in_proj's output) and its row stride, the conv weight
    /// `[d_inner, d_conv]` and bias (may be null), the document starts per position.
    ConvInF32 => [] {
        x: Ptr<f32>,
        ldx: i64,
        w: Ptr<f32>,
        bias: Ptr<f32>,
        starts: Ptr<i32>,
    }
}

kernel_params! {
    /// `u = conv(x) + bias`, `xs = silu(u)` (u and xs may be null); `init` `[batch, d_inner,
    /// d_conv − 1]` or null; `xs_lp` (may be null): xs again in bf16 (`lp_mode` 0) or fp16
    /// (1), x_proj's operand.
    Conv1dFwdF32 => ["conv1d_fwd_f32"] {
        conv: ConvInF32,
        init: Ptr<f32>,
        u: PtrMut<f32>,
        xs: PtrMut<f32>,
        batch: i64,
        seq_len: i64,
        d_inner: i64,
        xs_lp: PtrMut<u16>,
        lp_mode: i32,
    }
}

kernel_params! {
    /// The window after the last position, `[batch, d_inner, d_conv − 1]`.
    Conv1dLastF32 => ["conv1d_last_f32"] {
        x: Ptr<f32>,
        ldx: i64,
        starts: Ptr<i32>,
        init: Ptr<f32>,
        last: PtrMut<f32>,
        batch: i64,
        seq_len: i64,
        d_inner: i64,
    }
}

kernel_params! {
    /// dx, written at row stride `ldx`, from `du`; or, with `u` (the conv output before SiLU)
    /// not null, from the gradient through the SiLU `g = du · silu'(u)`, which it also writes
    /// to `g_out` (`[batch, seq_len, d_inner]`, for the other conv backward kernels).
    Conv1dBwdDxF32 => ["conv1d_bwd_dx_f32"] {
        du: Ptr<f32>,
        w: Ptr<f32>,
        starts: Ptr<i32>,
        dx: PtrMut<f32>,
        ldx: i64,
        batch: i64,
        seq_len: i64,
        d_inner: i64,
        u: Ptr<f32>,
        g_out: PtrMut<f32>,
        /// Not null: dx goes here instead, in the GEMM precision (same row stride `ldx`).
        dx_lp: PtrMut<u16>,
        /// 0: bf16, 1: fp16.
        lp_mode: i32,
        /// The final window's gradient `[batch, d_inner, d_conv − 1]` added into dx (as
        /// `conv1d_last_bwd_f32` would), or null.
        d_last: Ptr<f32>,
    }
}

kernel_params! {
    /// The initial window's gradient, `[batch, d_inner, d_conv − 1]`.
    Conv1dBwdInitF32 => ["conv1d_bwd_init_f32"] {
        du: Ptr<f32>,
        w: Ptr<f32>,
        starts: Ptr<i32>,
        dinit: PtrMut<f32>,
        batch: i64,
        seq_len: i64,
        d_inner: i64,
    }
}

kernel_params! {
    /// Weight / bias gradient partials per row block: `part_w[rb, c, k]`, `part_b[rb, c]`
    /// (`part_b` may be null).
    Conv1dBwdDwPartialF32 => ["conv1d_bwd_dw_partial_f32"] {
        x: Ptr<f32>,
        ldx: i64,
        du: Ptr<f32>,
        starts: Ptr<i32>,
        init: Ptr<f32>,
        batch: i64,
        seq_len: i64,
        d_inner: i64,
        rows_per: i64,
        part_w: PtrMut<f32>,
        part_b: PtrMut<f32>,
    }
}

kernel_params! {
    /// Backward of the final window ([`Conv1dLastF32`]): adds its gradient `d_last` `[batch,
    /// d_inner, d_conv − 1]` (from later windows of the same rows) into `dx` (row stride `ldx`;
    /// null: the dx kernel added it, see [`Conv1dBwdDxF32::d_last`]) where the window holds
    /// this call's inputs, and into `dinit` `[batch, d_inner, d_conv − 1]` where it still
    /// holds the initial window.
    Conv1dLastBwdF32 => ["conv1d_last_bwd_f32"] {
        d_last: Ptr<f32>,
        starts: Ptr<i32>,
        dx: PtrMut<f32>,
        ldx: i64,
        dinit: PtrMut<f32>,
        batch: i64,
        seq_len: i64,
        d_inner: i64,
    }
}

pub(crate) fn kernels() -> Vec<KernelInfo> {
    let mut v: Vec<KernelInfo> = info::<Conv1dFwdF32>().collect();
    v.extend(info::<Conv1dLastF32>());
    v.extend(info::<Conv1dBwdDxF32>());
    v.extend(info::<Conv1dBwdInitF32>());
    v.extend(info::<Conv1dBwdDwPartialF32>());
    v.extend(info::<Conv1dLastBwdF32>());
    v
}

/// The text of `gpu/kernels/conv1d.cuh`.
pub fn params_cuh() -> String {
    cuh(
        "conv1d",
        &[
            ConvInF32::c_struct,
            Conv1dFwdF32::c_struct,
            Conv1dLastF32::c_struct,
            Conv1dBwdDxF32::c_struct,
            Conv1dBwdInitF32::c_struct,
            Conv1dBwdDwPartialF32::c_struct,
            Conv1dLastBwdF32::c_struct,
        ],
    )
}

/// Launches `conv1d_fwd_f32`.
///
/// # Safety
/// `x` holds `batch * seq_len` rows at stride `ldx` of at least `d_inner` f32; `w` `d_inner *
/// d_conv` f32 (the `d_conv` the kernels were built for); `bias` (where not null) `d_inner`
/// f32; `starts` `batch * seq_len` i32; `init` (where not null) `batch * d_inner * (d_conv −
/// 1)` f32; `u` (and `xs` where not null) `batch * seq_len * d_inner` f32, `xs_lp` (where not
/// null) as many u16.
pub unsafe fn conv1d_fwd(dev: &Dev, p: &Conv1dFwdF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe {
        dev.launch(
            window_grid(p.batch, p.seq_len, p.d_inner),
            WINDOW_THREADS,
            0,
            p,
        )
    }
}

/// Positions per thread of `conv1d_fwd_f32` and `conv1d_bwd_dx_f32` (`CONV_TL` in
/// conv1d.cu).
pub const CONV_TL: usize = 32;
const WINDOW_THREADS: u32 = 128;

/// Grid of the sliding-window kernels: (row, block of `CONV_TL` positions) along x, blocks of
/// channels along y.
fn window_grid(batch: i64, seq_len: i64, d_inner: i64) -> (u32, u32, u32) {
    let segs = batch as usize * (seq_len as usize).div_ceil(CONV_TL);
    let chans = (d_inner as usize).div_ceil(WINDOW_THREADS as usize);
    (segs as u32, chans as u32, 1)
}

/// Launches `conv1d_last_f32` (nothing for `d_conv` 1).
///
/// # Safety
/// As [`conv1d_fwd`] for `x`, `starts`, `init`; `last` holds `batch * d_inner * (d_conv − 1)`
/// f32.
pub unsafe fn conv1d_last(dev: &Dev, p: &Conv1dLastF32) -> Result<()> {
    let km1 = dev.shape.d_conv - 1;
    if km1 == 0 {
        return Ok(());
    }
    let grid = dev.grid1d(p.batch as usize * p.d_inner as usize * km1);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `conv1d_bwd_dx_f32`.
///
/// # Safety
/// `du` holds `batch * seq_len * d_inner` f32, `w` `d_inner * d_conv`, `starts` `batch *
/// seq_len` i32, `dx` `batch * seq_len` rows at stride `ldx` of at least `d_inner` f32; `u`
/// (where not null) and `g_out` (where not null; only with `u`) `batch * seq_len * d_inner`
/// f32, `g_out` overlapping no other argument.
pub unsafe fn conv1d_bwd_dx(dev: &Dev, p: &Conv1dBwdDxF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe {
        dev.launch(
            window_grid(p.batch, p.seq_len, p.d_inner),
            WINDOW_THREADS,
            0,
            p,
        )
    }
}

/// Launches `conv1d_bwd_init_f32` (nothing for `d_conv` 1).
///
/// # Safety
/// As [`conv1d_bwd_dx`] for `du`, `w`, `starts`; `dinit` holds `batch * d_inner * (d_conv −
/// 1)` f32.
pub unsafe fn conv1d_bwd_init(dev: &Dev, p: &Conv1dBwdInitF32) -> Result<()> {
    let km1 = dev.shape.d_conv - 1;
    if km1 == 0 {
        return Ok(());
    }
    let grid = dev.grid1d(p.batch as usize * p.d_inner as usize * km1);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `conv1d_bwd_dw_partial_f32`.
///
/// # Safety
/// As [`conv1d_fwd`] for `x`, `starts`, `init`; `du` holds `batch * seq_len * d_inner` f32;
/// `part_w` `n_rb * d_inner * d_conv` and `part_b` (where not null) `n_rb * d_inner` f32,
/// `n_rb = n_row_blocks(batch * seq_len, rows_per)`.
pub unsafe fn conv1d_bwd_dw_partial(dev: &Dev, p: &Conv1dBwdDwPartialF32) -> Result<()> {
    let grid = (
        (p.d_inner as usize).div_ceil(256) as u32,
        super::elementwise::n_row_blocks(p.batch * p.seq_len, p.rows_per),
        1,
    );
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `conv1d_last_bwd_f32` (nothing for `d_conv` 1). Run it after
/// [`conv1d_bwd_dx`] and [`conv1d_bwd_init`], which overwrite `dx` and `dinit`.
///
/// # Safety
/// `d_last` and `dinit` hold `batch * d_inner * (d_conv − 1)` f32, `starts` `batch * seq_len`
/// i32, `dx` `batch * seq_len` rows at stride `ldx` of at least `d_inner` f32.
pub unsafe fn conv1d_last_bwd(dev: &Dev, p: &Conv1dLastBwdF32) -> Result<()> {
    let km1 = dev.shape.d_conv - 1;
    if km1 == 0 {
        return Ok(());
    }
    let grid = dev.grid1d(p.batch as usize * p.d_inner as usize * km1);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}
