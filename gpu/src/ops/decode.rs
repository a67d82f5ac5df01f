//! Launchers of `gpu/kernels/decode.cu`: the decode step's conv update and scan update (one
//! token per row, the recurrent state updated in place), and sampling on the device (one id
//! per row leaves it).

use reference::Result;

use super::conv1d::ConvInF32;
use super::selective_scan::ScanInF32;
use crate::cuda::Dev;
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, Ptr, PtrMut};

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

kernel_params! {
    /// One block per row `b`: marks `tokens[b]` in the row's penalty context `seen` (`[batch,
    /// vocab]` bytes), then draws `ids[b]` from `logits[b]` as `how[b]` (a [`SampleHow`]) says.
    SampleRowsF32 => ["sample_rows_f32"] {
        logits: Ptr<f32>,
        vocab: i64,
        tokens: Ptr<u32>,
        how: Ptr<u8>,
        seen: PtrMut<u8>,
        ids: PtrMut<u32>,
    }
}

kernel_params! {
    /// `y[r, n] = Σ_k w[n, k] x[r, k]` for `rows` (at most [`GEMV_ROWS`]) rows: each weight
    /// read once for all rows. `w` and `x_lp` in bf16 (`lp_mode` 0) or fp16 (1); `x_f32`
    /// (used when `x_lp` is null) is rounded to that precision first. Where `wq` is not null
    /// the weights are int8 rows there instead (`w` is not read), output `n` multiplied by
    /// its row's scale `ws[n]` once its sum is complete.
    GemvLp => ["gemv_lp", "gemv_lp_nl4", "gemv_lp_nl8", "gemv_lp_q8", "gemv_lp_nl4_q8", "gemv_lp_nl8_q8"] {
        w: Ptr<u16>,
        ldw: i64,
        wq: Ptr<i8>,
        ws: Ptr<f32>,
        x_lp: Ptr<u16>,
        x_f32: Ptr<f32>,
        ldx: i64,
        y: PtrMut<f32>,
        ldy: i64,
        n_out: i64,
        k: i64,
        rows: i64,
        split: i32,
        vec: i32,
        lp_mode: i32,
    }
}

kernel_params! {
    /// in_proj's GEMV (`gemv_lp_nl4`'s loop) with the conv update as its epilogue: output `n <
    /// c.d_inner` of row `r` is channel `n`'s x, and the thread that writes it also shifts that
    /// channel's window and writes `xs` (and `xs_lp`), as `conv_update_f32` would (`c.conv.x`
    /// is not read).
    GemvConvLp => ["gemv_lp_conv", "gemv_lp_conv_q8"] {
        g: GemvLp,
        c: ConvUpdateF32,
    }
}

kernel_params! {
    /// `ssm_update_f32` with dt_proj inside: `dt_w` `[d_inner, dt_rank]` in the low precision
    /// (`s.lp_mode`), its input the first `dt_rank` columns of `s.scan.xbc`; `s.scan.delta` is
    /// not read.
    SsmUpdateDtF32 => ["ssm_update_dt_f32"] {
        s: SsmUpdateF32,
        dt_w: Ptr<u16>,
        dt_rank: i64,
    }
}

/// The most rows one `gemv_lp` launch takes.
pub const GEMV_ROWS: usize = 8;

impl GemvLp {
    /// Sets `split` (warps per output: enough blocks to fill the device) and `vec` (16-byte
    /// loads: every row of `w` and `x` 16-byte aligned, `k` a multiple of the values a load
    /// carries: 8 values, or 16 int8 codes) from the other fields.
    pub fn tuned(mut self) -> GemvLp {
        let blocks = (self.n_out as usize).div_ceil(8);
        self.split = match blocks {
            b if b >= 1024 => 1,
            b if b >= 512 => 2,
            b if b >= 256 => 4,
            _ => 8,
        };
        let aligned =
            |ptr: u64, ld: i64, elem: i64| ptr.is_multiple_of(16) && (ld * elem) % 16 == 0;
        let x_ok = if self.x_lp.0 != 0 {
            aligned(self.x_lp.0, self.ldx, 2)
        } else {
            aligned(self.x_f32.0, self.ldx, 4)
        };
        let (w_ok, vals) = if self.wq.0 != 0 {
            (aligned(self.wq.0, self.ldw, 1), 16)
        } else {
            (aligned(self.w.0, self.ldw, 2), 8)
        };
        self.vec = (w_ok && x_ok && self.k % vals == 0) as i32;
        self
    }
}

/// Launches `gemv_lp` (after [`GemvLp::tuned`]).
///
/// # Safety
/// `w` holds `n_out` rows of `k` values at stride `ldw`; `x_lp` (or, when null, `x_f32`) and
/// `y` hold `rows <= GEMV_ROWS` rows at strides `ldx` (`k` values) and `ldy` (`n_out`).
pub unsafe fn gemv(dev: &Dev, p: &GemvLp) -> Result<()> {
    if p.rows < 1 || p.rows as usize > GEMV_ROWS || ![1, 2, 4, 8].contains(&p.split) {
        return Err(dev.err(
            "gemv_lp",
            format!("{} rows (1..={GEMV_ROWS}), split {}", p.rows, p.split),
        ));
    }
    let per_block = 8 / p.split as usize;
    let grid = ((p.n_out as usize).div_ceil(per_block) as u32, 1, 1);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch_build(for_weights("gemv_lp", p), grid, 256, 0, p) }
}

/// `name` (a 256- or 128-thread GEMV, or `gemv_lp_conv`), or its int8 twin where `p.wq` is
/// set.
fn for_weights(name: &'static str, p: &GemvLp) -> &'static str {
    if p.wq.0 == 0 {
        return name;
    }
    match name {
        "gemv_lp" => "gemv_lp_q8",
        "gemv_lp_nl4" => "gemv_lp_nl4_q8",
        "gemv_lp_nl8" => "gemv_lp_nl8_q8",
        "gemv_lp_conv" => "gemv_lp_conv_q8",
        other => other,
    }
}

/// The GEMV kernel the decode step uses for `rows` activation rows: `VET_GEMV_KERNEL`
/// (`gemv_lp`, `gemv_lp_nl4` or `gemv_lp_nl8`) where set; else `gemv_lp_nl4` at one row (H100,
/// batch 1: 130M 1,407 → 1,736 tok/s, 1.4B 405 → 427 with PDL on) and `gemv_lp` above (batch
/// 8: 1.4B 1,680 with `gemv_lp`, 1,578 with `gemv_lp_nl4`).
pub fn gemv_kernel(rows: i64) -> &'static str {
    static K: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    let forced = K.get_or_init(|| match std::env::var("VET_GEMV_KERNEL").as_deref() {
        Ok("gemv_lp_nl4") => Some("gemv_lp_nl4"),
        Ok("gemv_lp_nl8") => Some("gemv_lp_nl8"),
        Ok("gemv_lp") => Some("gemv_lp"),
        _ => None,
    });
    forced.unwrap_or(if rows == 1 { "gemv_lp_nl4" } else { "gemv_lp" })
}

/// Launches the decode GEMV ([`gemv_kernel`]) for `p` (after [`GemvLp::tuned`]). With `vec`,
/// every kernel takes `split` from `n_out` ([`nl_split`]: 1 from 4096 outputs, 2 from 2048,
/// else 4), the split of the persistent kernel too: the split sets the order of each sum, so a
/// row gets the same bits at one row (128-thread kernels) and in a batch (`gemv_lp`). Without
/// `vec`, `gemv_lp` runs at `p`'s split at any number of rows.
///
/// # Safety
/// As [`gemv`].
pub unsafe fn gemv_decode(dev: &Dev, p: &GemvLp) -> Result<()> {
    let (name, split) = decode_launch(p);
    let q = GemvLp { split, ..*p };
    match name {
        // SAFETY: the caller's contract.
        "gemv_lp" => unsafe { gemv(dev, &q) },
        // SAFETY: the caller's contract.
        name => unsafe { gemv_named(dev, &q, name) },
    }
}

/// The kernel and split [`gemv_decode`] runs for `p`.
fn decode_launch(p: &GemvLp) -> (&'static str, i32) {
    if p.vec != 1 {
        return ("gemv_lp", p.split);
    }
    (gemv_kernel(p.rows), nl_split(p.n_out))
}

/// Warps per output of the 128-thread GEMVs: 1 from 4096 outputs, 2 from 2048, else 4.
pub(crate) fn nl_split(n_out: i64) -> i32 {
    match n_out {
        n if n >= 4096 => 1,
        n if n >= 2048 => 2,
        _ => 4,
    }
}

/// The grid of a 128-thread GEMV (`4 / split` outputs a block).
fn nl_grid(n_out: i64, split: i32) -> (u32, u32, u32) {
    ((n_out as usize).div_ceil(4 / split as usize) as u32, 1, 1)
}

/// Launches `name`, one of the `GemvLp` kernels: `gemv_lp` (256 threads, split 1, 2, 4 or
/// 8) or `gemv_lp_nl4` / `gemv_lp_nl8` (128 threads, split 1, 2 or 4; `vec` must hold),
/// which issue 4 or 8 weight loads per lane before using one and give `gemv_lp`'s bits.
///
/// # Safety
/// As [`gemv`].
pub unsafe fn gemv_named(dev: &Dev, p: &GemvLp, name: &'static str) -> Result<()> {
    if name == "gemv_lp" {
        // SAFETY: the caller's contract.
        return unsafe { gemv(dev, p) };
    }
    if p.rows < 1 || p.rows as usize > GEMV_ROWS || ![1, 2, 4].contains(&p.split) || p.vec != 1 {
        return Err(dev.err(
            name,
            format!(
                "{} rows (1..={GEMV_ROWS}), split {}, vec {}",
                p.rows, p.split, p.vec
            ),
        ));
    }
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch_build(for_weights(name, p), nl_grid(p.n_out, p.split), 128, 0, p) }
}

/// How one row draws on the device (the C struct `SampleHow` in `gpu/kernels/decode.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleHow {
    pub temperature: f32,
    pub top_p: f32,
    pub penalty: f32,
    pub top_k: u32,
    pub sampleable: u32,
    pub pad: u32,
    pub seed: u64,
    pub draw: u64,
}

impl From<&reference::RowSampling> for SampleHow {
    fn from(r: &reference::RowSampling) -> SampleHow {
        SampleHow {
            temperature: r.temperature,
            top_p: r.top_p,
            penalty: r.repetition_penalty,
            top_k: r.top_k,
            sampleable: r.sampleable,
            pad: 0,
            seed: r.seed,
            draw: r.draw,
        }
    }
}

impl SampleHow {
    /// The bytes the kernel reads for `rows`.
    pub fn bytes(rows: &[SampleHow]) -> Vec<u8> {
        let mut out = Vec::with_capacity(std::mem::size_of_val(rows));
        for r in rows {
            out.extend_from_slice(&r.temperature.to_ne_bytes());
            out.extend_from_slice(&r.top_p.to_ne_bytes());
            out.extend_from_slice(&r.penalty.to_ne_bytes());
            out.extend_from_slice(&r.top_k.to_ne_bytes());
            out.extend_from_slice(&r.sampleable.to_ne_bytes());
            out.extend_from_slice(&r.pad.to_ne_bytes());
            out.extend_from_slice(&r.seed.to_ne_bytes());
            out.extend_from_slice(&r.draw.to_ne_bytes());
        }
        out
    }
}

/// The id a row's draw gives when its logits are not finite.
pub const SAMPLE_NOT_FINITE: u32 = u32::MAX;

pub(crate) fn kernels() -> Vec<KernelInfo> {
    let mut v: Vec<KernelInfo> = info::<ConvUpdateF32>().collect();
    v.extend(info::<SsmUpdateF32>());
    v.extend(info::<SampleRowsF32>());
    v.extend(info::<GemvLp>());
    v.extend(info::<GemvConvLp>());
    v.extend(info::<SsmUpdateDtF32>());
    v
}

/// The text of `gpu/kernels/decode.cuh`.
pub fn params_cuh() -> String {
    cuh(
        "decode",
        &[
            ConvUpdateF32::c_struct,
            SsmUpdateF32::c_struct,
            SampleRowsF32::c_struct,
            GemvLp::c_struct,
            GemvConvLp::c_struct,
            SsmUpdateDtF32::c_struct,
        ],
    )
}

/// Launches `sample_rows_f32` over `rows` rows.
///
/// # Safety
/// `logits` holds `rows * vocab` f32, `seen` `rows * vocab` bytes, `tokens` and `ids` `rows`
/// u32, `how` `rows` [`SampleHow`]s (40 bytes each) with `sampleable <= vocab`.
pub unsafe fn sample_rows(dev: &Dev, rows: usize, p: &SampleRowsF32) -> Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch((rows as u32, 1, 1), 1024, 0, p) }
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

/// Channels one 256-thread block of `ssm_update_f32` takes: `min(4, d_state_pad)` states a
/// lane (`SSM_SPL` in decode.cu), so `d_state_pad / SSM_SPL` lanes a channel.
pub fn ssm_update_channels_per_block(d_state_pad: usize) -> usize {
    let per_lane = d_state_pad.min(4);
    256 / (d_state_pad / per_lane)
}

/// Launches `ssm_update_f32`.
///
/// # Safety
/// The scan inputs as in [`super::selective_scan::selective_scan_fwd`] for `seq_len` 1;
/// `h_state` holds `batch * d_inner * d_state` f32; `out` (and `out_lp` where not null) `batch
/// * d_inner` values.
pub unsafe fn ssm_update(dev: &Dev, p: &SsmUpdateF32) -> Result<()> {
    let per_block = ssm_update_channels_per_block(dev.shape.d_state_pad);
    let grid = (
        (p.d_inner as usize).div_ceil(per_block) as u32,
        p.batch as u32,
        1,
    );
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

/// Launches `gemv_lp_conv` (in_proj with the conv update; `p.g` after [`GemvLp::tuned`],
/// its `split` chosen here as for [`gemv_decode`]).
///
/// # Safety
/// `p.g` as in [`gemv`] with `vec` set; `p.c` as in [`conv_update`] for `p.g.rows` rows, its
/// x being the first `d_inner` outputs of `p.g`.
pub unsafe fn gemv_conv(dev: &Dev, p: &GemvConvLp) -> Result<()> {
    let g = &p.g;
    if g.rows < 1
        || g.rows as usize > GEMV_ROWS
        || g.vec != 1
        || g.rows != p.c.batch
        || p.c.d_inner > g.n_out
    {
        return Err(dev.err(
            "gemv_lp_conv",
            format!(
                "{} rows, vec {}, conv over {} rows and {} channels of {}",
                g.rows, g.vec, p.c.batch, p.c.d_inner, g.n_out
            ),
        ));
    }
    let mut q = *p;
    q.g.split = nl_split(g.n_out);
    let name = for_weights("gemv_lp_conv", g);
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch_build(name, nl_grid(g.n_out, q.g.split), 128, 0, &q) }
}

/// Launches `ssm_update_dt_f32` (grid as [`ssm_update`]).
///
/// # Safety
/// As [`ssm_update`], less `delta`; `dt_w` holds `d_inner * dt_rank` values and `xbc`'s rows
/// at least `dt_rank` columns.
pub unsafe fn ssm_update_dt(dev: &Dev, p: &SsmUpdateDtF32) -> Result<()> {
    let per_block = 256 / dev.shape.d_state_pad;
    let grid = (
        (p.s.d_inner as usize).div_ceil(per_block) as u32,
        p.s.batch as u32,
        1,
    );
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch(grid, 256, 0, p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_how_has_the_c_layout() {
        assert_eq!(std::mem::size_of::<SampleHow>(), 40);
        let h = SampleHow {
            temperature: 0.5,
            top_p: 0.9,
            penalty: 1.2,
            top_k: 7,
            sampleable: 11,
            pad: 0,
            seed: 3,
            draw: 4,
        };
        let b = SampleHow::bytes(&[h, h]);
        assert_eq!(b.len(), 80);
        assert_eq!(&b[12..16], &7u32.to_ne_bytes());
        assert_eq!(&b[64..72], &3u64.to_ne_bytes());
        assert_eq!(&b[72..80], &4u64.to_ne_bytes());
    }

    /// One row and a batch sum each output in one order: the split (which sets the order)
    /// does not depend on the rows, for every shape of the 130M and 1.4B steps and odd ones.
    #[test]
    fn decode_split_is_the_same_at_every_batch() {
        for n_out in [41usize, 80, 160, 768, 1000, 2048, 3072, 8192, 50280] {
            for k in [136usize, 768, 1536, 2048, 4096] {
                let p = |rows: usize| {
                    GemvLp {
                        w: Ptr::new(1 << 20),
                        ldw: k as i64,
                        wq: Ptr::NULL,
                        ws: Ptr::NULL,
                        x_lp: Ptr::new(1 << 21),
                        x_f32: Ptr::NULL,
                        ldx: k as i64,
                        y: PtrMut::new(1 << 22),
                        ldy: n_out as i64,
                        n_out: n_out as i64,
                        k: k as i64,
                        rows: rows as i64,
                        split: 1,
                        vec: 0,
                        lp_mode: 0,
                    }
                    .tuned()
                };
                let one = decode_launch(&p(1));
                assert_eq!(p(1).vec, 1, "{n_out} x {k}: 8-value loads");
                for rows in 2..=GEMV_ROWS {
                    let (name, split) = decode_launch(&p(rows));
                    assert_eq!(
                        split, one.1,
                        "{n_out} x {k}: split {split} at {rows} rows ({name}), {} at one ({})",
                        one.1, one.0
                    );
                }
            }
        }
    }
}
