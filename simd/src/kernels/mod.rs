//! Row dot products for the weight formats, with the instruction set picked at run time.
//!
//! Decoding is a chain of matrix-vector products (matrix-matrix at batch B > 1): every weight
//! byte is read once per step, so these loops decide the decode speed. A tile of up to four
//! weight rows is multiplied with up to four activation rows at once (each weight vector is
//! loaded and widened once for the whole tile), so a batch of B rows reads the weights once,
//! not B times. Each format has an AVX-512 kernel and an AVX2+FMA kernel (x86-64, chosen when
//! the CPU has them) and a portable kernel written so that LLVM vectorises it for the build's
//! baseline (SSE2 on x86-64, NEON on aarch64). Every kernel accumulates in f32.

// Index loops keep the hot kernels explicit about what they read.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod dpbf16;
mod portable;
mod quant;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod vnni4;

pub use quant::{
    bf16_to_f32, dequant_row_int4, f32_to_bf16, int4_groups, int4_row_bytes, int4_value,
    quantize_row, quantize_row_int4, INT4_GROUP, INT4_GROUP_BYTES,
};

/// Runs `f` on this thread's activation buffer in `key` once `fill` has written it (the buffer
/// is grown once, so a decode step allocates nothing), or on a fresh one if that buffer is in
/// use further up this stack. The int8, int4 and bf16 kernels' activations share it.
#[cfg(target_arch = "x86_64")]
fn with_scratch<T: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    fill: impl FnOnce(&mut T),
    f: impl FnOnce(&T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut a) => {
            fill(&mut a);
            f(&a)
        }
        Err(_) => {
            let mut a = T::default();
            fill(&mut a);
            f(&a)
        }
    })
}

/// The instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// [`Isa::Avx512Vnni`] plus `avx512_bf16`: bf16 weights through `vdpbf16ps` as well
    /// (activations rounded to bf16).
    Avx512Bf16,
    /// [`Isa::Avx512`] plus `avx512_vnni`: int8 and int4 weights times int8-quantised
    /// activations through `vpdpbusd` (one activation scale per row), decode and prefill.
    Avx512Vnni,
    /// x86-64 AVX-512 (F, BW, VL) with AVX2 + FMA: 512-bit FMA row kernels.
    Avx512,
    /// x86-64 AVX2 + FMA + F16C-free bf16 widening.
    Avx2Fma,
    /// Plain Rust, vectorised by the compiler for the build target.
    Portable,
}

impl Isa {
    /// Every instruction set, best first.
    pub const ALL: [Isa; 5] = [
        Isa::Avx512Bf16,
        Isa::Avx512Vnni,
        Isa::Avx512,
        Isa::Avx2Fma,
        Isa::Portable,
    ];

    /// The best instruction set this CPU supports (detected once).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .find(|i| i.supported())
                .unwrap_or(Isa::Portable)
        })
    }

    /// Whether this CPU can run the kernels of `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => {
                Isa::Avx512Vnni.supported() && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx512.supported() && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2Fma.supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Whether the AVX2 + FMA kernels may run (true for AVX-512 too, which implies them).
    pub fn has_avx2(self) -> bool {
        self.has_avx512() || self == Isa::Avx2Fma
    }

    /// Whether the AVX-512 FMA kernels may run.
    pub fn has_avx512(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16)
    }

    /// Whether int8 and int4 weights run on `vpdpbusd`.
    pub fn has_vnni(self) -> bool {
        matches!(self, Isa::Avx512Vnni | Isa::Avx512Bf16)
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512-bf16",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Portable => "portable",
        }
    }
}

/// A borrowed weight matrix `[rows, cols]`, row-major, in one of the storage formats.
#[derive(Clone, Copy, Debug)]
pub enum MatRef<'a> {
    F32(&'a [f32]),
    /// bfloat16 bit patterns.
    Bf16(&'a [u16]),
    /// Symmetric int8 with one scale per row: `w[r, j] = q[r, j] · scales[r]`.
    Int8 {
        q: &'a [i8],
        scales: &'a [f32],
    },
    /// Symmetric int4, one scale per group of 32 along a row (layout: [`quant`]):
    /// `int4_row_bytes(cols)` bytes and `int4_groups(cols)` scales per row.
    Int4 {
        q: &'a [u8],
        scales: &'a [f32],
    },
}

/// Up to four consecutive rows of one format, each `k` values long.
#[derive(Clone, Copy)]
pub(crate) enum Fmt<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    I8(&'a [i8]),
    /// Packed rows of `int4_row_bytes(k)` bytes and their `int4_groups(k)` scales each.
    I4 {
        q: &'a [u8],
        scales: &'a [f32],
    },
}

impl Fmt<'_> {
    /// The address of element `i` (row-major over `k`), which may lie past the end (only ever
    /// prefetched). Not meaningful for int4.
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn ptr_at(self, i: usize) -> *const i8 {
        match self {
            Fmt::F32(d) => d.as_ptr().wrapping_add(i) as *const i8,
            Fmt::Bf16(d) => d.as_ptr().wrapping_add(i) as *const i8,
            Fmt::I8(d) => d.as_ptr().wrapping_add(i),
            Fmt::I4 { q, .. } => q.as_ptr().wrapping_add(i / 2) as *const i8,
        }
    }
}

/// Element `j` of row `r` (rows `k` long) as f32; int8 without its row scale.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn widen(w: Fmt, k: usize, r: usize, j: usize) -> f32 {
    match w {
        Fmt::F32(d) => d[r * k + j],
        Fmt::Bf16(d) => bf16_to_f32(d[r * k + j]),
        Fmt::I8(d) => d[r * k + j] as f32,
        Fmt::I4 { q, scales } => {
            let (rb, g) = (int4_row_bytes(k), int4_groups(k));
            int4_value(&q[r * rb..(r + 1) * rb], &scales[r * g..(r + 1) * g], j)
        }
    }
}

/// Longest `x` whose paired copy fits on the stack for the AVX2 bf16 kernel (32 KiB).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PAIRED_MAX: usize = 8192;
/// How far ahead a batch-1 row stream (`vnni::row_dot`, `vnni4::row_dot`, `dpbf16::row_dot`,
/// `avx512::row_widen`) prefetches its weights: bytes into L2, and bytes into L1. Rows lie one
/// after another, so past a row's end this reaches the next row.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const ROW_PF_L2: usize = 4096;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const ROW_PF_L1: usize = 512;
/// Activation rows per tile.
const TILE_B: usize = 4;

/// Products of one tile: `[batch row][weight row]`.
pub(crate) type TileOut = [[f32; 4]; TILE_B];

/// `y[i] = Σ_j W[row0 + i, j] · x[j]` for a block of rows (`y.len()` rows), where W has
/// `x.len()` columns. Int8 rows are multiplied by their scale.
pub fn dot_rows(isa: Isa, w: MatRef, row0: usize, x: &[f32], y: &mut [f32]) {
    let n = y.len();
    dot_rows_batch(isa, w, row0, n, x, x.len(), &mut |_, i, v| y[i] = v);
}

/// `put(b, i, Σ_j W[row0 + i, j] · x[b, j])` for `i < rows` and every row `b` of `x`
/// (`[n, k]`, `k` the columns of W): one pass over the weight rows for all `n` rows of `x`.
pub fn dot_rows_batch(
    isa: Isa,
    w: MatRef,
    row0: usize,
    rows: usize,
    x: &[f32],
    k: usize,
    put: &mut impl FnMut(usize, usize, f32),
) {
    with_prepared(isa, w, x, k, |p| p.dot_rows(row0, rows, put));
}

/// Whether products with `w` on `isa` run on the tiles' dot products at any number of rows,
/// prefill included, rather than on an f32 GEMM over dequantised weights: int8 and int4 on
/// VNNI always; bf16 on `avx512_bf16` where [`bf16_tiles_for_prefill`] says so.
pub fn dot_product_gemm(isa: Isa, w: MatRef) -> bool {
    match w {
        MatRef::Int8 { .. } | MatRef::Int4 { .. } => isa.has_vnni(),
        MatRef::Bf16(_) => isa == Isa::Avx512Bf16 && bf16_tiles_for_prefill(),
        MatRef::F32(_) => false,
    }
}

/// Whether bf16 prefill runs on the `vdpbf16ps` tiles (activations rounded to bf16, as in
/// decode) instead of the f32 GEMM over widened weights. It depends on the core: on the Intel
/// Xeon (AVX-512 BF16) `vdpbf16ps` measured no more multiply-adds per second than f32 FMA,
/// and the tiles prefilled the 130M shape at ~75 tok/s against ~100 for `matrixmultiply`
/// (2 threads); on AMD's Zen 4 the bf16 tiles ran 2.5× the f32 tiles' rate (`cargo bench -p
/// simd --bench tiles`), and they prefilled 512 tokens of 130M at 686–701 tok/s against
/// 573–630 and of 1.4B at 69–76 against 50–52 (2 threads, `SIMD_BF16_PREFILL=gemm|tiles cargo
/// bench -p simd --bench inference -- --dtypes bf16`, alternating, 2026-12-06). So: AMD cores
/// take the tiles, others the GEMM. `SIMD_BF16_PREFILL=tiles` or `gemm` overrides it (read
/// once), for measuring both on one machine.
pub fn bf16_tiles_for_prefill() -> bool {
    static TILES: OnceLock<bool> = OnceLock::new();
    *TILES.get_or_init(|| match std::env::var("SIMD_BF16_PREFILL").as_deref() {
        Ok("tiles") => true,
        Ok("gemm") => false,
        _ => cpu_vendor_is_amd(),
    })
}

/// The CPU's vendor string (CPUID leaf 0) is AMD's.
fn cpu_vendor_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A product's activations, converted once for the instruction set's kernels (int8 for
/// VNNI), shared by the threads that each take some of the weight rows.
pub struct Prepared<'a> {
    isa: Isa,
    w: MatRef<'a>,
    x: &'a [f32],
    k: usize,
    #[cfg(target_arch = "x86_64")]
    act: Option<&'a vnni::ActQ>,
    #[cfg(target_arch = "x86_64")]
    act4: Option<&'a vnni4::ActQ4>,
    #[cfg(target_arch = "x86_64")]
    act_bf16: Option<&'a dpbf16::ActBf16>,
}

/// Runs `f` with `x` (`[n, k]`) prepared for products with `w` on `isa` (quantised in this
/// thread's buffer for int8 and int4 on VNNI, rounded to bf16 for bf16 on `avx512_bf16`: no
/// allocation once the buffer has grown).
pub fn with_prepared<R>(
    isa: Isa,
    w: MatRef,
    x: &[f32],
    k: usize,
    f: impl FnOnce(&Prepared) -> R,
) -> R {
    #[cfg(target_arch = "x86_64")]
    if isa.has_vnni() && matches!(w, MatRef::Int8 { .. }) {
        return vnni::with_quantized(x, k, |a| {
            f(&Prepared {
                isa,
                w,
                x,
                k,
                act: Some(a),
                act4: None,
                act_bf16: None,
            })
        });
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_vnni() && matches!(w, MatRef::Int4 { .. }) {
        return vnni4::with_quantized(x, k, |a| {
            f(&Prepared {
                isa,
                w,
                x,
                k,
                act: None,
                act4: Some(a),
                act_bf16: None,
            })
        });
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Bf16 && matches!(w, MatRef::Bf16(_)) {
        return dpbf16::with_converted(x, k, |a| {
            f(&Prepared {
                isa,
                w,
                x,
                k,
                act: None,
                act4: None,
                act_bf16: Some(a),
            })
        });
    }
    f(&Prepared {
        isa,
        w,
        x,
        k,
        #[cfg(target_arch = "x86_64")]
        act: None,
        #[cfg(target_arch = "x86_64")]
        act4: None,
        #[cfg(target_arch = "x86_64")]
        act_bf16: None,
    })
}

impl Prepared<'_> {
    /// Activation rows.
    pub fn rows(&self) -> usize {
        self.x.len().checked_div(self.k).unwrap_or(0)
    }

    /// `put(b, i, Σ_j W[row0 + i, j] · x[b, j])` for `i < rows` and every row `b` of `x`.
    pub fn dot_rows(&self, row0: usize, rows: usize, put: &mut impl FnMut(usize, usize, f32)) {
        let (isa, w, x, k) = (self.isa, self.w, self.x, self.k);
        if self.rows() == 0 || rows == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(a), MatRef::Int8 { q, scales }) = (self.act, w) {
            // SAFETY: `act` is only prepared for a VNNI `Isa`, used after `supported()`.
            unsafe { vnni::dot_rows_i8(q, scales, row0, rows, a, put) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(a), MatRef::Int4 { q, scales }) = (self.act4, w) {
            // SAFETY: `act4` is only prepared for a VNNI `Isa`, used after `supported()`.
            unsafe { vnni4::dot_rows_i4(q, scales, row0, rows, a, put) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(a), MatRef::Bf16(d)) = (self.act_bf16, w) {
            // SAFETY: `act_bf16` is only prepared for `Isa::Avx512Bf16`, used after
            // `supported()`.
            unsafe { dpbf16::dot_rows_bf16(d, row0, rows, a, put) };
            return;
        }
        dot_rows_f32(isa, w, row0, rows, x, k, put);
    }
}

/// [`dot_rows_batch`] on f32 accumulation of the widened weights.
fn dot_rows_f32(
    isa: Isa,
    w: MatRef,
    row0: usize,
    rows: usize,
    x: &[f32],
    k: usize,
    put: &mut impl FnMut(usize, usize, f32),
) {
    let n = x.len().checked_div(k).unwrap_or(0);
    #[cfg(target_arch = "x86_64")]
    if n == 1 && isa == Isa::Avx2Fma && !matches!(w, MatRef::Int4 { .. }) {
        avx2_single(w, row0, rows, x, put);
        return;
    }
    let tb = if isa == Isa::Avx2Fma { 2 } else { TILE_B };
    let mut r = 0;
    while r < rows {
        let take = (rows - r).min(4);
        let f = fmt(w, k, row0 + r, take);
        let mut b = 0;
        while b < n {
            let bt = (n - b).min(tb);
            let mut out: TileOut = [[0.0; 4]; TILE_B];
            tile(isa, f, &x[b * k..(b + bt) * k], k, take, bt, &mut out);
            for bi in 0..bt {
                for i in 0..take {
                    let v = match w {
                        MatRef::Int8 { scales, .. } => out[bi][i] * scales[row0 + r + i],
                        _ => out[bi][i],
                    };
                    put(b + bi, r + i, v);
                }
            }
            b += bt;
        }
        r += take;
    }
}

/// Rows `r0..r0 + take` of `w` (`k` columns) as a tile.
fn fmt(w: MatRef<'_>, k: usize, r0: usize, take: usize) -> Fmt<'_> {
    let (a, b) = (r0 * k, (r0 + take) * k);
    match w {
        MatRef::F32(d) => Fmt::F32(&d[a..b]),
        MatRef::Bf16(d) => Fmt::Bf16(&d[a..b]),
        MatRef::Int8 { q, .. } => Fmt::I8(&q[a..b]),
        MatRef::Int4 { q, scales } => {
            let (rb, g) = (int4_row_bytes(k), int4_groups(k));
            Fmt::I4 {
                q: &q[r0 * rb..(r0 + take) * rb],
                scales: &scales[r0 * g..(r0 + take) * g],
            }
        }
    }
}

/// Calls `$f::<TAKE, BT>(args)` for the runtime tile shape `(take, bt)`, both in `1..=4`.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))] // the x86_64 kernels use it
macro_rules! by_shape {
    ($f:ident, $take:expr, $bt:expr, $($a:expr),*) => {
        match ($take, $bt) {
            (1, 1) => $f::<1, 1>($($a),*),
            (1, 2) => $f::<1, 2>($($a),*),
            (1, 3) => $f::<1, 3>($($a),*),
            (1, _) => $f::<1, 4>($($a),*),
            (2, 1) => $f::<2, 1>($($a),*),
            (2, 2) => $f::<2, 2>($($a),*),
            (2, 3) => $f::<2, 3>($($a),*),
            (2, _) => $f::<2, 4>($($a),*),
            (3, 1) => $f::<3, 1>($($a),*),
            (3, 2) => $f::<3, 2>($($a),*),
            (3, 3) => $f::<3, 3>($($a),*),
            (3, _) => $f::<3, 4>($($a),*),
            (_, 1) => $f::<4, 1>($($a),*),
            (_, 2) => $f::<4, 2>($($a),*),
            (_, 3) => $f::<4, 3>($($a),*),
            (_, _) => $f::<4, 4>($($a),*),
        }
    };
}
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use by_shape;

/// One tile: `take` weight rows by `bt` rows of `x` (`[bt, k]`).
fn tile(isa: Isa, w: Fmt, x: &[f32], k: usize, take: usize, bt: usize, out: &mut TileOut) {
    debug_assert!(take <= 4 && bt <= TILE_B && x.len() == bt * k);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an AVX-512 `Isa` is only used after `supported()` (engine build, tests).
        Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16 => unsafe {
            avx512::tile(w, x, k, take, bt, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 + FMA; an AVX2 tile is at most 2 rows of `x`.
        Isa::Avx2Fma => unsafe { avx2::tile(w, x, k, take, bt, out) },
        _ => portable::tile(w, x, k, take, bt, out),
    }
}

/// Batch 1 on AVX2: the four-row kernels (bf16 with `x` regrouped in pairs).
#[cfg(target_arch = "x86_64")]
fn avx2_single(
    w: MatRef,
    row0: usize,
    rows: usize,
    x: &[f32],
    put: &mut impl FnMut(usize, usize, f32),
) {
    let k = x.len();
    if matches!(w, MatRef::Bf16(_)) && k <= PAIRED_MAX {
        // `x` regrouped per 16 values as [even | odd], matching the two halves of each
        // 32-bit word of bf16 pairs (see `avx2::dot4_bf16`).
        let mut xd = [0f32; PAIRED_MAX];
        for (blk, xs) in x.chunks_exact(16).enumerate() {
            for i in 0..8 {
                xd[blk * 16 + i] = xs[2 * i];
                xd[blk * 16 + 8 + i] = xs[2 * i + 1];
            }
        }
        avx2_rows(w, row0, rows, x, &xd[..k], put);
    } else {
        avx2_rows(w, row0, rows, x, &[], put);
    }
}

/// The rows of [`avx2_single`]; `xd` is the paired copy of `x` for bf16 (else empty).
#[cfg(target_arch = "x86_64")]
fn avx2_rows(
    w: MatRef,
    row0: usize,
    rows: usize,
    x: &[f32],
    xd: &[f32],
    put: &mut impl FnMut(usize, usize, f32),
) {
    let k = x.len();
    let mut r = 0;
    while r < rows {
        let take = (rows - r).min(4);
        let mut out = [0f32; 4];
        let f = fmt(w, k, row0 + r, take);
        match f {
            // SAFETY: callers pass `Isa::Avx2Fma` only where AVX2 and FMA were detected;
            // `xd` holds the paired copy of `x`.
            Fmt::Bf16(d) if xd.len() == k => unsafe { avx2::dot4_bf16(d, x, xd, take, &mut out) },
            // SAFETY: as above.
            _ => unsafe { avx2::dot4(f, x, take, &mut out) },
        }
        for i in 0..take {
            let v = match w {
                MatRef::Int8 { scales, .. } => out[i] * scales[row0 + r + i],
                _ => out[i],
            };
            put(0, r + i, v);
        }
        r += take;
    }
}

#[cfg(test)]
pub(crate) mod tests;
