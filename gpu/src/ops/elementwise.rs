//! Launchers of `gpu/kernels/elementwise.cu`: the low-precision casts of GEMM operands, bias
//! add, SiLU and its gradient, and the fixed-order column sums (partials per row block, then
//! one ordered sum).

use reference::Result;

use crate::cuda::Dev;
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, Ptr, PtrMut};

kernel_params! {
    /// `dst[r, j] = lowp(src[r * ld + j])`, dst contiguous `[rows, cols]`.
    CastLowpF32 => ["cast_lowp_f32"] {
        src: Ptr<f32>,
        ld: i64,
        rows: i64,
        cols: i64,
        dst: PtrMut<u16>,
        /// 0: bf16, 1: fp16.
        mode: i32,
    }
}

kernel_params! {
    /// `y[r * ld + j] += b[j]`.
    BiasAddF32 => ["bias_add_f32"] {
        y: PtrMut<f32>,
        ld: i64,
        rows: i64,
        cols: i64,
        b: Ptr<f32>,
    }
}

kernel_params! {
    /// `xs = silu(u)` over `n` values.
    SiluFwdF32 => ["silu_fwd_f32"] {
        u: Ptr<f32>,
        xs: PtrMut<f32>,
        n: i64,
    }
}

kernel_params! {
    /// `g = g · silu'(u)` in place over `n` values.
    SiluBwdF32 => ["silu_bwd_f32"] {
        u: Ptr<f32>,
        g: PtrMut<f32>,
        n: i64,
    }
}

kernel_params! {
    /// `partial[rb, j]` = Σ over the rows of row block `rb` (in order) of `src[r * ld + j]`.
    ColsumPartialF32 => ["colsum_partial_f32"] {
        src: Ptr<f32>,
        ld: i64,
        rows: i64,
        cols: i64,
        rows_per: i64,
        partial: PtrMut<f32>,
    }
}

kernel_params! {
    /// `dst[j] += Σ_rb partial[rb, j]` over `n_rb` row blocks, in order.
    ColsumFinalF32 => ["colsum_final_f32"] {
        partial: Ptr<f32>,
        n_rb: i64,
        cols: i64,
        dst: PtrMut<f32>,
    }
}

kernel_params! {
    /// `x[r * ld + j] (+ b[j])` rounded to the low precision into `dst[r, j]` (contiguous
    /// `[rows, cols]`) and, widened back, into `x` (`b` may be null).
    RoundLowpF32 => ["round_lowp_f32"] {
        x: PtrMut<f32>,
        ld: i64,
        rows: i64,
        cols: i64,
        b: Ptr<f32>,
        dst: PtrMut<u16>,
        /// 0: bf16, 1: fp16.
        mode: i32,
    }
}

kernel_params! {
    /// `dst[r * ld + j] = f32(src[r, j])`, src contiguous `[rows, cols]` in the low precision.
    WidenLowpF32 => ["widen_lowp_f32"] {
        src: Ptr<u16>,
        rows: i64,
        cols: i64,
        dst: PtrMut<f32>,
        ld: i64,
        /// 0: bf16, 1: fp16.
        mode: i32,
    }
}

/// The kernels of this file, for the loader.
pub(crate) fn kernels() -> Vec<KernelInfo> {
    let mut v: Vec<KernelInfo> = info::<CastLowpF32>().collect();
    v.extend(info::<BiasAddF32>());
    v.extend(info::<SiluFwdF32>());
    v.extend(info::<SiluBwdF32>());
    v.extend(info::<ColsumPartialF32>());
    v.extend(info::<ColsumFinalF32>());
    v.extend(info::<RoundLowpF32>());
    v.extend(info::<WidenLowpF32>());
    v
}

/// The text of `gpu/kernels/elementwise.cuh`.
pub fn params_cuh() -> String {
    cuh(
        "elementwise",
        &[
            CastLowpF32::c_struct,
            BiasAddF32::c_struct,
            SiluFwdF32::c_struct,
            SiluBwdF32::c_struct,
            ColsumPartialF32::c_struct,
            ColsumFinalF32::c_struct,
            RoundLowpF32::c_struct,
            WidenLowpF32::c_struct,
        ],
    )
}

/// Row blocks of a column sum over `rows` rows of `rows_per` rows each (at least one).
pub fn n_row_blocks(rows: i64, rows_per: i64) -> u32 {
    (rows as usize).div_ceil(rows_per.max(1) as usize).max(1) as u32
}

/// Launches `cast_lowp_f32`.
///
/// # Safety
/// `src` is live device memory holding `rows` rows of `cols` f32 at row stride `ld`; `dst`
/// holds `rows * cols` u16 and does not overlap `src`.
pub unsafe fn cast_lowp(dev: &Dev, p: &CastLowpF32) -> Result<()> {
    let grid = dev.grid1d((p.rows * p.cols) as usize);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `round_lowp_f32`.
///
/// # Safety
/// `x` holds `rows` rows of `cols` f32 at row stride `ld`; `b` is null or holds `cols` f32;
/// `dst` holds `rows * cols` u16 and overlaps neither.
pub unsafe fn round_lowp(dev: &Dev, p: &RoundLowpF32) -> Result<()> {
    let grid = dev.grid1d((p.rows * p.cols) as usize);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `widen_lowp_f32`.
///
/// # Safety
/// `src` holds `rows * cols` u16; `dst` `rows` rows of `cols` f32 at row stride `ld`, not
/// overlapping `src`.
pub unsafe fn widen_lowp(dev: &Dev, p: &WidenLowpF32) -> Result<()> {
    let grid = dev.grid1d((p.rows * p.cols) as usize);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `bias_add_f32`.
///
/// # Safety
/// `y` holds `rows` rows of `cols` f32 at row stride `ld`; `b` holds `cols` f32.
pub unsafe fn bias_add(dev: &Dev, p: &BiasAddF32) -> Result<()> {
    let grid = dev.grid1d((p.rows * p.cols) as usize);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `silu_fwd_f32`.
///
/// # Safety
/// `u` and `xs` each hold `n` f32 (they may be the same buffer).
pub unsafe fn silu_fwd(dev: &Dev, p: &SiluFwdF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(dev.grid1d(p.n as usize), 256, 0, p) }
}

/// Launches `silu_bwd_f32`.
///
/// # Safety
/// `u` and `g` each hold `n` f32.
pub unsafe fn silu_bwd(dev: &Dev, p: &SiluBwdF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(dev.grid1d(p.n as usize), 256, 0, p) }
}

/// Launches `colsum_partial_f32`: one row block per `rows_per` rows.
///
/// # Safety
/// `src` holds `rows` rows of `cols` f32 at row stride `ld`; `partial` holds
/// `n_row_blocks(rows, rows_per) * cols` f32.
pub unsafe fn colsum_partial(dev: &Dev, p: &ColsumPartialF32) -> Result<()> {
    let grid = (
        (p.cols as usize).div_ceil(256) as u32,
        n_row_blocks(p.rows, p.rows_per),
        1,
    );
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `colsum_final_f32`.
///
/// # Safety
/// `partial` holds `n_rb * cols` f32, `dst` holds `cols` f32.
pub unsafe fn colsum_final(dev: &Dev, p: &ColsumFinalF32) -> Result<()> {
    let grid = ((p.cols as usize).div_ceil(256) as u32, 1, 1);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}
