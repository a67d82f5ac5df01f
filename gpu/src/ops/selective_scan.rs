//! Launchers of `gpu/kernels/selective_scan.cu`: the selective scan forward (dt bias +
//! softplus, D skip and z gate fused, chunk states stored), its backward (two builds of one
//! kernel, see [`crate::kernels::scan_bwd_kernel`]), and the fixed-order reductions of the
//! backward's per-block partials.

use reference::Result;

use crate::cuda::Dev;
pub use crate::kernels::scan_blocks;
use crate::kernels::{scan_bwd_kernel, scan_bwd_smem, SCAN_FWD_THREADS, SCAN_THREADS};
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, Ptr, PtrMut};

kernel_params! {
    /// The inputs every scan kernel (forward, backward, decode update) starts with: x (the
    /// conv output after SiLU, `[batch, seq_len, d_inner]`), delta (dt_proj's output without
    /// bias), A_log `[d_inner, d_state]`, B and C inside x_proj's output `xbc` (row stride
    /// `ldbc`, B at column `col_b`, C right after), D, z inside in_proj's output (row stride
    /// `ldz`; null: no gate), the dt bias, the document starts per position.
    ScanInF32 => [] {
        u: Ptr<f32>,
        delta: Ptr<f32>,
        a_log: Ptr<f32>,
        xbc: Ptr<f32>,
        ldbc: i64,
        col_b: i64,
        dvec: Ptr<f32>,
        z: Ptr<f32>,
        ldz: i64,
        dt_bias: Ptr<f32>,
        starts: Ptr<i32>,
    }
}

kernel_params! {
    /// The scan forward: `out` `[batch, seq_len, d_inner]`; the state at the start of every
    /// chunk into `chunk_states` `[batch, n_chunks, d_state, d_inner]` and the final state into
    /// `last` `[batch, d_inner, d_state]` (each may be null); `h0` the initial state or null.
    SelectiveScanFwdF32 => ["selective_scan_fwd_f32"] {
        scan: ScanInF32,
        h0: Ptr<f32>,
        out: PtrMut<f32>,
        chunk_states: PtrMut<f32>,
        last: PtrMut<f32>,
        batch: i64,
        seq_len: i64,
        d_inner: i64,
        d_state: i64,
        /// The output in the GEMM precision (may be null), `[batch, seq_len, d_inner]`; `out`
        /// may then be null.
        out_lp: PtrMut<u16>,
        /// 0: bf16, 1: fp16.
        lp_mode: i32,
        /// Positions per segment ([`scan_fwd_segments`]): a multiple of the build's chunk;
        /// 0 or at least `seq_len`: one segment, the sequential scan.
        seg_len: i64,
        /// With several segments: each segment's map of its start state to its end state
        /// (`h_end = seg_p ⊙ h_start + seg_q`), `[n_seg − 1, batch, d_inner, d_state]` each.
        seg_p: PtrMut<f32>,
        seg_q: PtrMut<f32>,
        /// 1: the pass that writes `seg_p` / `seg_q` (no outputs); 0: the scan.
        seg_pass: i32,
    }
}

kernel_params! {
    /// The scan backward from the forward's chunk states: du, ddelta (`[batch, seq_len,
    /// d_inner]`), dz (row stride `ldz_out`), the per-block partials `part_bc` `[n_blocks,
    /// batch * seq_len, 2 d_state]`, `part_a` `[batch, d_inner, d_state]`, `part_d`, `part_db`
    /// `[batch, d_inner]`, and the initial state's gradient `dh0` (may be null). `dh_last` (may
    /// be null: zeros) is the final state's gradient `[batch, d_inner, d_state]`, from later
    /// windows of the same rows (stateful training through several windows).
    SelectiveScanBwdF32 => ["selective_scan_bwd_f32", "selective_scan_bwd_2b_f32", "selective_scan_bwd_map_f32"] {
        scan: ScanInF32,
        chunk_states: Ptr<f32>,
        dout: Ptr<f32>,
        du_out: PtrMut<f32>,
        ddelta_out: PtrMut<f32>,
        dz_out: PtrMut<f32>,
        ldz_out: i64,
        part_bc: PtrMut<f32>,
        part_a: PtrMut<f32>,
        part_d: PtrMut<f32>,
        part_db: PtrMut<f32>,
        dh_last: Ptr<f32>,
        dh0: PtrMut<f32>,
        batch: i64,
        seq_len: i64,
        d_inner: i64,
        d_state: i64,
        /// The forward's (gated) output recomputed in the GEMM precision (may be null),
        /// `[batch, seq_len, d_inner]`: out_proj's weight gradient reads it, so the forward
        /// need not keep it.
        gated_lp: PtrMut<u16>,
        /// Not null: ddelta goes here instead, in the GEMM precision.
        ddelta_lp: PtrMut<u16>,
        /// Not null: dz goes here instead, in the GEMM precision (row stride `ldz_out`).
        dz_lp: PtrMut<u16>,
        /// 0: bf16, 1: fp16.
        lp_mode: i32,
        /// Positions per segment, as the forward's (0: one segment). With several,
        /// `part_a`, `part_d` and `part_db` hold one partial per (segment, batch row):
        /// [`scan_seg_count`] × `batch` rows to sum.
        seg_len: i64,
        /// With several segments: each later segment's map of the state gradient
        /// (`selective_scan_bwd_map_f32` writes them), `[n_seg − 1, batch, d_inner, d_state]`.
        seg_p: PtrMut<f32>,
        seg_q: PtrMut<f32>,
    }
}

kernel_params! {
    /// `out[row * ldo + col] = Σ_blk part_bc[blk, row, col]` (blocks in order), col < 2 d_state.
    ScanReduceBcF32 => ["scan_reduce_bc_f32"] {
        part_bc: Ptr<f32>,
        n_blocks: i64,
        rows: i64,
        d_state: i64,
        out: PtrMut<f32>,
        ldo: i64,
    }
}

kernel_params! {
    /// `dst[i] += (Σ_b part[b, i]) · (a_log ? −exp(a_log[i]) : 1)`, batch rows in order.
    ScanReduceBatchF32 => ["scan_reduce_batch_f32"] {
        part: Ptr<f32>,
        batch: i64,
        m: i64,
        dst: PtrMut<f32>,
        a_log: Ptr<f32>,
    }
}

pub(crate) fn kernels() -> Vec<KernelInfo> {
    let mut v: Vec<KernelInfo> = info::<SelectiveScanFwdF32>().collect();
    v.extend(info::<SelectiveScanBwdF32>());
    v.extend(info::<ScanReduceBcF32>());
    v.extend(info::<ScanReduceBatchF32>());
    v
}

/// The text of `gpu/kernels/selective_scan.cuh`.
pub fn params_cuh() -> String {
    cuh(
        "selective_scan",
        &[
            ScanInF32::c_struct,
            SelectiveScanFwdF32::c_struct,
            SelectiveScanBwdF32::c_struct,
            ScanReduceBcF32::c_struct,
            ScanReduceBatchF32::c_struct,
        ],
    )
}

/// Launches `selective_scan_fwd_f32`: one pass, or with several segments the pass that writes
/// each segment's state map, then the scan.
///
/// # Safety
/// `u`, `delta` hold `batch * seq_len * d_inner` f32; `xbc` `batch * seq_len` rows at stride
/// `ldbc` with `col_b + 2 d_state` columns; `z` (where not null) as many rows at stride `ldz`;
/// `a_log` `d_inner * d_state`, `dvec`, `dt_bias` `d_inner` f32; `starts` `batch * seq_len`
/// i32; `h0`, `last` (where not null) `batch * d_inner * d_state` f32; `out` `batch * seq_len
/// * d_inner` f32; `chunk_states` (where not null) `batch * n_chunks * d_state * d_inner` f32
/// with the chunk the kernels were built for; `d_state` at most the build's `d_state_pad`.
/// With several segments (`seg_len` below `seq_len`), `seg_p` and `seg_q` hold
/// [`scan_seg_floats`] f32 each and `seg_len` is a multiple of the build's chunk.
pub unsafe fn selective_scan_fwd(dev: &Dev, p: &SelectiveScanFwdF32) -> Result<()> {
    let n_seg = scan_seg_count(p.seq_len as usize, p.seg_len as usize) as u32;
    let (bx, by) = (scan_blocks(p.d_inner as usize) as u32, p.batch as u32);
    if n_seg > 1 {
        let transform = SelectiveScanFwdF32 { seg_pass: 1, ..*p };
        // SAFETY: the caller's contract is the kernel's; the first pass writes only seg_p /
        // seg_q, for segments 0 .. n_seg − 2.
        unsafe { dev.launch((bx, by, n_seg - 1), SCAN_FWD_THREADS as u32, 0, &transform) }?;
    }
    let scan = SelectiveScanFwdF32 { seg_pass: 0, ..*p };
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch((bx, by, n_seg), SCAN_FWD_THREADS as u32, 0, &scan) }
}

/// Segments of a row of `seq_len` positions cut every `seg_len` (0: one segment).
pub fn scan_seg_count(seq_len: usize, seg_len: usize) -> usize {
    if seg_len == 0 || seg_len >= seq_len {
        1
    } else {
        seq_len.div_ceil(seg_len)
    }
}

/// f32 in each of `seg_p` and `seg_q` for `seg_len` (`[n_seg − 1, batch, d_inner, d_state]`).
pub fn scan_seg_floats(
    batch: usize,
    seq_len: usize,
    d_inner: usize,
    d_state: usize,
    seg_len: usize,
) -> usize {
    (scan_seg_count(seq_len, seg_len) - 1) * batch * d_inner * d_state
}

/// Work of the first pass against the scan's, per position (it skips y, the gate and every
/// output): the cost model's weight of the extra pass.
const TRANSFORM_COST: f64 = 0.7;

/// Work two co-resident scan blocks get through in the time one alone takes (the kernels are
/// latency-bound at 4–8 warps an SM). Measured on an H100: the 370M's 128 blocks (8 × 2048)
/// ran at 44,416 training tokens/s in one segment and 43,314 in two, so a second block on an
/// SM gains far less than 2×.
const CO_RESIDENT_GAIN: f64 = 1.25;

/// At most this many segments (the last folds all the maps before it).
const MAX_SEGMENTS: usize = 64;

/// Positions per segment of the scan for this shape (0: one segment): the segment count that
/// minimises the model's time on `sm_count` SMs. A pass costs the blocks each SM runs × (the
/// chunks per block + 1 for its setup), divided by [`CO_RESIDENT_GAIN`] where an SM runs two
/// or more, and the first pass [`TRANSFORM_COST`] of that. A grid that already reaches every
/// SM (training at 8 × 2048) keeps one segment; a batch-1 prefill, 12 blocks at 130M, gets
/// many. `VET_SCAN_SEGS=N` asks for N segments (1: none).
pub fn scan_fwd_segments(
    sm_count: usize,
    batch: usize,
    seq_len: usize,
    d_inner: usize,
    chunk: usize,
) -> Result<usize> {
    let forced = match std::env::var("VET_SCAN_SEGS")
        .ok()
        .filter(|v| !v.is_empty())
    {
        None => None,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return Err(reference::Error::Device {
                    device: "cuda".into(),
                    msg: format!(
                        "environment variable VET_SCAN_SEGS={v:?} is not valid: expected a positive integer"
                    ),
                })
            }
        },
    };
    Ok(plan_segments(
        sm_count, batch, seq_len, d_inner, chunk, forced,
    ))
}

/// [`scan_fwd_segments`] with the override given.
pub fn plan_segments(
    sm_count: usize,
    batch: usize,
    seq_len: usize,
    d_inner: usize,
    chunk: usize,
    forced: Option<usize>,
) -> usize {
    let n_chunks = seq_len.div_ceil(chunk.max(1));
    let seg_len = |segs: usize| n_chunks.div_ceil(segs.max(1)) * chunk;
    if let Some(n) = forced {
        let l = seg_len(n.min(n_chunks.max(1)));
        return if l >= seq_len { 0 } else { l };
    }
    let sms = sm_count.max(1);
    let blocks = scan_blocks(d_inner) * batch;
    // One pass of `b` blocks, `per` chunks each.
    let pass = |b: usize, per: usize| {
        let on_sm = b.div_ceil(sms);
        let gain = if on_sm >= 2 { CO_RESIDENT_GAIN } else { 1.0 };
        on_sm as f64 * (per + 1) as f64 / gain
    };
    let cost = |segs: usize| {
        let per = n_chunks.div_ceil(segs);
        let real = n_chunks.div_ceil(per);
        let first = if real > 1 {
            TRANSFORM_COST * pass(blocks * (real - 1), per)
        } else {
            0.0
        };
        pass(blocks * real, per) + first
    };
    let mut best = (cost(1), 1);
    for segs in 2..=n_chunks.min(MAX_SEGMENTS) {
        let c = cost(segs);
        // Fewer segments on a tie (less work in all).
        if c < best.0 * 0.999 {
            best = (c, segs);
        }
    }
    let l = seg_len(best.1);
    if l >= seq_len {
        0
    } else {
        l
    }
}

/// Launches the scan backward build this process uses ([`scan_bwd_kernel`]).
///
/// # Safety
/// See [`selective_scan_bwd_build`].
pub unsafe fn selective_scan_bwd(dev: &Dev, p: &SelectiveScanBwdF32) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { selective_scan_bwd_build(dev, scan_bwd_kernel(), p) }
}

/// Launches the scan backward build `kernel` (`selective_scan_bwd_f32` or
/// `selective_scan_bwd_2b_f32`).
///
/// # Safety
/// The scan inputs as in [`selective_scan_fwd`]; `chunk_states` as the forward wrote them for
/// the same inputs; `dout`, `du_out`, `ddelta_out` hold `batch * seq_len * d_inner` f32;
/// `dz_out` (where `z` is not null) `batch * seq_len` rows at stride `ldz_out`; `part_bc`
/// `scan_blocks(d_inner) * batch * seq_len * 2 d_state`, `part_a`, `dh0` (where not null)
/// `batch * d_inner * d_state`, `part_d`, `part_db` `batch * d_inner` f32, each times
/// [`scan_seg_count`] with several segments, and then `seg_p` / `seg_q` [`scan_seg_floats`]
/// f32 each.
pub unsafe fn selective_scan_bwd_build(
    dev: &Dev,
    kernel: &'static str,
    p: &SelectiveScanBwdF32,
) -> Result<()> {
    let n_seg = scan_seg_count(p.seq_len as usize, p.seg_len as usize) as u32;
    let (bx, by) = (scan_blocks(p.d_inner as usize) as u32, p.batch as u32);
    if n_seg > 1 {
        let map = "selective_scan_bwd_map_f32";
        // SAFETY: the caller's contract; the map pass reads the scan inputs and dout and
        // writes only seg_p / seg_q, for segments 1 .. n_seg − 1.
        unsafe { dev.launch_build(map, (bx, by, n_seg - 1), SCAN_THREADS as u32, 0, p) }?;
    }
    let smem = scan_bwd_smem(dev.shape) as u32;
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch_build(kernel, (bx, by, n_seg), SCAN_THREADS as u32, smem, p) }
}

/// Launches `scan_reduce_bc_f32`.
///
/// # Safety
/// `part_bc` holds `n_blocks * rows * 2 d_state` f32; `out` `rows` rows at stride `ldo` of at
/// least `2 d_state` f32.
pub unsafe fn scan_reduce_bc(dev: &Dev, p: &ScanReduceBcF32) -> Result<()> {
    let grid = dev.grid1d((p.rows * 2 * p.d_state) as usize);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `scan_reduce_batch_f32`.
///
/// # Safety
/// `part` holds `batch * m` f32, `dst` (and `a_log` where not null) `m` f32.
pub unsafe fn scan_reduce_batch(dev: &Dev, p: &ScanReduceBatchF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(dev.grid1d(p.m as usize), 256, 0, p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_only_where_the_grid_leaves_sms_idle() {
        // H100 / H200: 132 SMs. 8 × 2048 at the 1.4B's width and 16 × 2048 at the 130M's fill
        // the GPU: one segment, the sequential scan.
        assert_eq!(plan_segments(132, 8, 2048, 4096, 32, None), 0);
        assert_eq!(plan_segments(132, 16, 2048, 1536, 32, None), 0);
        // The 370M's 8 × 2048: 128 blocks, one an SM; two segments measured slower.
        assert_eq!(plan_segments(132, 8, 2048, 2048, 32, None), 0);
        // A batch-1 prefill: 32 blocks (1.4B), 12 (130M), cut so the blocks fill one wave.
        for (di, want) in [(4096, 256), (1536, 96)] {
            let l = plan_segments(132, 1, 2048, di, 32, None);
            assert_eq!(l, want, "d_inner {di}");
            let blocks = scan_blocks(di) * scan_seg_count(2048, l);
            assert!(blocks <= 264, "d_inner {di}: {blocks} blocks");
        }
        // Long-sequence training: 2 × 8192 and 1 × 16384 at the 1.4B's width.
        assert_eq!(plan_segments(132, 2, 8192, 4096, 32, None), 2048);
        assert_eq!(plan_segments(132, 1, 16384, 4096, 32, None), 2048);
        // Rows of one chunk cannot be cut.
        assert_eq!(plan_segments(132, 1, 32, 1536, 32, None), 0);
        assert_eq!(plan_segments(132, 1, 1, 1536, 32, None), 0);
    }

    #[test]
    fn forced_segments_are_whole_chunks() {
        assert_eq!(plan_segments(132, 8, 2048, 4096, 32, Some(1)), 0);
        assert_eq!(plan_segments(132, 8, 2048, 4096, 32, Some(4)), 512);
        assert_eq!(plan_segments(132, 1, 200, 40, 32, Some(3)), 96);
        assert_eq!(scan_seg_count(200, 96), 3);
        // More segments than chunks: one chunk each.
        assert_eq!(plan_segments(132, 1, 200, 40, 32, Some(1000)), 32);
        assert_eq!(scan_seg_count(200, 32), 7);
        assert_eq!(scan_seg_floats(2, 200, 40, 16, 32), 6 * 2 * 40 * 16);
        assert_eq!(scan_seg_floats(2, 200, 40, 16, 0), 0);
    }
}
