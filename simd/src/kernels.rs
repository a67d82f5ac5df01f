//! Row dot products for the weight formats, with the instruction set picked at run time.
//!
//! Decoding at batch 1 is a chain of matrix-vector products: every weight byte is read once
//! per token, so these loops decide the decode speed. Each format has an AVX2+FMA kernel
//! (x86-64, chosen when the CPU has it) and a portable kernel written so that LLVM vectorises
//! it for the build's baseline (SSE2 on x86-64, NEON on aarch64). Four rows share each load of
//! `x`, and every row keeps independent accumulators.

// Index loops keep the hot kernels explicit about what they read.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

/// The instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 AVX2 + FMA + F16C-free bf16 widening.
    Avx2Fma,
    /// Plain Rust, vectorised by the compiler for the build target.
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return Isa::Avx2Fma;
                }
            }
            Isa::Portable
        })
    }

    pub fn name(self) -> &'static str {
        match self {
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
}

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 → bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// Quantises one row to int8 with a symmetric scale `max|w| / 127`; returns the scale
/// (1 for an all-zero row). `q[j] = round(w[j] / scale)`, ties away from zero.
pub fn quantize_row(w: &[f32], q: &mut [i8]) -> f32 {
    let amax = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let scale = if amax > 0.0 && amax.is_finite() {
        amax / 127.0
    } else {
        1.0
    };
    let inv = 1.0 / scale;
    for (o, &v) in q.iter_mut().zip(w) {
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Longest `x` whose paired copy fits on the stack for the bf16 kernel (32 KiB).
const PAIRED_MAX: usize = 8192;

/// `y[i] = Σ_j W[rows.start + i, j] · x[j]` for a block of rows (`y.len()` rows), where W has
/// `x.len()` columns. Int8 rows are multiplied by their scale.
pub fn dot_rows(isa: Isa, w: MatRef, row0: usize, x: &[f32], y: &mut [f32]) {
    let k = x.len();
    if matches!(w, MatRef::Bf16(_)) && isa == Isa::Avx2Fma && k <= PAIRED_MAX {
        // For bf16 on AVX2: `x` regrouped per 16 values as [even | odd], matching the two
        // halves of each 32-bit word of bf16 pairs (see `avx2::dot4_bf16`).
        let mut xd = [0f32; PAIRED_MAX];
        for (blk, xs) in x.chunks_exact(16).enumerate() {
            for i in 0..8 {
                xd[blk * 16 + i] = xs[2 * i];
                xd[blk * 16 + 8 + i] = xs[2 * i + 1];
            }
        }
        rows(isa, w, row0, x, &xd, y);
    } else {
        rows(isa, w, row0, x, &[], y);
    }
}

fn rows(isa: Isa, w: MatRef, row0: usize, x: &[f32], xd: &[f32], y: &mut [f32]) {
    let k = x.len();
    let n = y.len();
    let mut r = 0;
    while r < n {
        let take = (n - r).min(4);
        let mut out = [0f32; 4];
        let base = (row0 + r) * k;
        match w {
            MatRef::F32(d) => dot4(isa, Fmt::F32(&d[base..base + take * k]), x, take, &mut out),
            #[cfg(target_arch = "x86_64")]
            MatRef::Bf16(d) if isa == Isa::Avx2Fma && k <= PAIRED_MAX => {
                // SAFETY: AVX2 + FMA detected; `xd` holds the paired copy of `x`.
                unsafe { avx2::dot4_bf16(&d[base..base + take * k], x, &xd[..k], take, &mut out) }
            }
            MatRef::Bf16(d) => dot4(isa, Fmt::Bf16(&d[base..base + take * k]), x, take, &mut out),
            MatRef::Int8 { q, scales } => {
                dot4(isa, Fmt::I8(&q[base..base + take * k]), x, take, &mut out);
                for (i, o) in out.iter_mut().enumerate().take(take) {
                    *o *= scales[row0 + r + i];
                }
            }
        }
        y[r..r + take].copy_from_slice(&out[..take]);
        r += take;
    }
}

/// Up to four consecutive rows (`take`) of one format, `take * k` values.
#[derive(Clone, Copy)]
enum Fmt<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    I8(&'a [i8]),
}

fn dot4(isa: Isa, w: Fmt, x: &[f32], take: usize, out: &mut [f32; 4]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only ever chosen after detecting AVX2 and FMA.
        Isa::Avx2Fma => unsafe { avx2::dot4(w, x, take, out) },
        _ => portable_dot4(w, x, take, out),
    }
}

impl Fmt<'_> {
    /// The address of element `i`, which may lie past the end (only ever prefetched).
    #[inline(always)]
    fn ptr_at(self, i: usize) -> *const i8 {
        match self {
            Fmt::F32(d) => d.as_ptr().wrapping_add(i) as *const i8,
            Fmt::Bf16(d) => d.as_ptr().wrapping_add(i) as *const i8,
            Fmt::I8(d) => d.as_ptr().wrapping_add(i),
        }
    }
}

#[inline(always)]
fn widen(w: Fmt, i: usize) -> f32 {
    match w {
        Fmt::F32(d) => d[i],
        Fmt::Bf16(d) => bf16_to_f32(d[i]),
        Fmt::I8(d) => d[i] as f32,
    }
}

/// Eight independent partial sums per row, combined pairwise at the end.
fn portable_dot4(w: Fmt, x: &[f32], take: usize, out: &mut [f32; 4]) {
    let k = x.len();
    for (r, o) in out.iter_mut().enumerate().take(take) {
        let mut acc = [0f32; 8];
        let body = k / 8 * 8;
        let mut j = 0;
        while j < body {
            for (l, a) in acc.iter_mut().enumerate() {
                *a += widen(w, r * k + j + l) * x[j + l];
            }
            j += 8;
        }
        let mut tail = 0f32;
        for jj in body..k {
            tail += widen(w, r * k + jj) * x[jj];
        }
        *o = ((acc[0] + acc[4]) + (acc[1] + acc[5]))
            + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
            + tail;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Fmt;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Asks for the cache line at `p` (never faults, whatever the address).
    #[inline(always)]
    unsafe fn prefetch(p: *const i8) {
        _mm_prefetch::<_MM_HINT_T0>(p);
    }

    /// Eight weights starting at element `i` of `w`, widened to f32.
    #[inline(always)]
    unsafe fn load8(w: Fmt, i: usize) -> __m256 {
        match w {
            Fmt::F32(d) => _mm256_loadu_ps(d.as_ptr().add(i)),
            Fmt::Bf16(d) => {
                let h = _mm_loadu_si128(d.as_ptr().add(i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
            Fmt::I8(d) => {
                let b = _mm_loadl_epi64(d.as_ptr().add(i) as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
            }
        }
    }

    /// bf16 rows read 16 at a time: each 32-bit word holds an (even, odd) pair, so shifting
    /// left by 16 gives the even values as f32 and masking the low half gives the odd ones —
    /// two FMAs per 256-bit load, against `xd`, which holds `x` regrouped per 16 values as
    /// [8 even | 8 odd].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `w` holds `take * x.len()` values; `xd` is the
    /// regrouped copy of `x` (same length).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_bf16(w: &[u16], x: &[f32], xd: &[f32], take: usize, out: &mut [f32; 4]) {
        match take {
            4 => bf16_rows::<4>(w, x, xd, out),
            3 => bf16_rows::<3>(w, x, xd, out),
            2 => bf16_rows::<2>(w, x, xd, out),
            _ => bf16_rows::<1>(w, x, xd, out),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn bf16_rows<const T: usize>(w: &[u16], x: &[f32], xd: &[f32], out: &mut [f32; 4]) {
        let k = x.len();
        let body = k / 16 * 16;
        let mask = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let wp = w.as_ptr();
        let mut ae = [_mm256_setzero_ps(); T];
        let mut ao = [_mm256_setzero_ps(); T];
        let mut j = 0;
        while j < body {
            let xe = _mm256_loadu_ps(xd.as_ptr().add(j));
            let xo = _mm256_loadu_ps(xd.as_ptr().add(j + 8));
            for r in 0..T {
                // Two blocks of rows ahead, so short rows do not outrun the prefetcher.
                prefetch(wp.wrapping_add((2 * T + r) * k + j) as *const i8);
                let v = _mm256_loadu_si256(wp.add(r * k + j) as *const __m256i);
                let e = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                let o = _mm256_castsi256_ps(_mm256_and_si256(v, mask));
                ae[r] = _mm256_fmadd_ps(e, xe, ae[r]);
                ao[r] = _mm256_fmadd_ps(o, xo, ao[r]);
            }
            j += 16;
        }
        for r in 0..T {
            let mut t = 0f32;
            for jj in body..k {
                t += super::bf16_to_f32(w[r * k + jj]) * x[jj];
            }
            out[r] = hsum(_mm256_add_ps(ae[r], ao[r])) + t;
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `w` holds `take * x.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(w: Fmt, x: &[f32], take: usize, out: &mut [f32; 4]) {
        let k = x.len();
        let body = k / 16 * 16;
        let xp = x.as_ptr();
        if take == 4 {
            let mut a = [_mm256_setzero_ps(); 8];
            let mut j = 0;
            while j < body {
                let x0 = _mm256_loadu_ps(xp.add(j));
                let x1 = _mm256_loadu_ps(xp.add(j + 8));
                for r in 0..4 {
                    prefetch(w.ptr_at((8 + r) * k + j));
                    a[2 * r] = _mm256_fmadd_ps(load8(w, r * k + j), x0, a[2 * r]);
                    a[2 * r + 1] = _mm256_fmadd_ps(load8(w, r * k + j + 8), x1, a[2 * r + 1]);
                }
                j += 16;
            }
            for r in 0..4 {
                out[r] = hsum(_mm256_add_ps(a[2 * r], a[2 * r + 1]));
            }
        } else {
            for r in 0..take {
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut j = 0;
                while j < body {
                    a0 = _mm256_fmadd_ps(load8(w, r * k + j), _mm256_loadu_ps(xp.add(j)), a0);
                    a1 = _mm256_fmadd_ps(
                        load8(w, r * k + j + 8),
                        _mm256_loadu_ps(xp.add(j + 8)),
                        a1,
                    );
                    j += 16;
                }
                out[r] = hsum(_mm256_add_ps(a0, a1));
            }
        }
        for (r, o) in out.iter_mut().enumerate().take(take) {
            let mut t = 0f32;
            for j in body..k {
                t += super::widen(w, r * k + j) * x[j];
            }
            *o += t;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng::lcg;

    /// Every ISA, format, odd row count and odd width agrees with an f64 dot product.
    #[test]
    fn dot_rows_match_f64_for_every_format_and_isa() {
        let mut s = 7u64;
        for &(rows, k) in &[(1, 1), (3, 7), (5, 16), (9, 33), (4, 100), (7, 257)] {
            let w: Vec<f32> = (0..rows * k).map(|_| lcg(&mut s)).collect();
            let x: Vec<f32> = (0..k).map(|_| lcg(&mut s)).collect();
            let bf: Vec<u16> = w.iter().map(|&v| f32_to_bf16(v)).collect();
            let mut q = vec![0i8; rows * k];
            let scales: Vec<f32> = (0..rows)
                .map(|r| quantize_row(&w[r * k..(r + 1) * k], &mut q[r * k..(r + 1) * k]))
                .collect();
            let want = |f: &dyn Fn(usize) -> f64| -> Vec<f64> {
                (0..rows)
                    .map(|r| (0..k).map(|j| f(r * k + j) * x[j] as f64).sum())
                    .collect()
            };
            let cases: Vec<(MatRef, Vec<f64>)> = vec![
                (MatRef::F32(&w), want(&|i| w[i] as f64)),
                (MatRef::Bf16(&bf), want(&|i| bf16_to_f32(bf[i]) as f64)),
                (
                    MatRef::Int8 {
                        q: &q,
                        scales: &scales,
                    },
                    want(&|i| q[i] as f64 * scales[i / k] as f64),
                ),
            ];
            for isa in [Isa::Portable, Isa::detect()] {
                for (m, exp) in &cases {
                    let mut y = vec![0f32; rows];
                    dot_rows(isa, *m, 0, &x, &mut y);
                    for (g, e) in y.iter().zip(exp) {
                        assert!(
                            (*g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f64).sqrt(),
                            "{isa:?} {m:?} rows {rows} k {k}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn int8_quantisation_is_within_half_a_step() {
        let mut s = 3u64;
        let w: Vec<f32> = (0..301).map(|_| lcg(&mut s) * 3.0).collect();
        let mut q = vec![0i8; w.len()];
        let scale = quantize_row(&w, &mut q);
        let amax = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
        assert_eq!(scale, amax / 127.0);
        for (&v, &qi) in w.iter().zip(&q) {
            assert!((v - qi as f32 * scale).abs() <= 0.5 * scale * 1.0001);
        }
        assert!(q.iter().any(|&v| v.abs() == 127));
    }

    #[test]
    fn bf16_round_trip_rounds_to_nearest() {
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0)), 1.0);
        let v = 1.0 + 1.0 / 256.0 + 1.0 / 1024.0; // just above the halfway point
        assert_eq!(bf16_to_f32(f32_to_bf16(v)), 1.0 + 1.0 / 128.0);
    }
}
