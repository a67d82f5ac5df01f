//! AVX2 + FMA kernels (x86-64): the batch-1 row kernels and the batched tiles.

use super::{by_shape, int4_groups, int4_row_bytes, Fmt, TileOut, INT4_GROUP};
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
        Fmt::I4 { .. } => unreachable!("int4 runs through `tile_int4`"),
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
                a1 = _mm256_fmadd_ps(load8(w, r * k + j + 8), _mm256_loadu_ps(xp.add(j + 8)), a1);
                j += 16;
            }
            out[r] = hsum(_mm256_add_ps(a0, a1));
        }
    }
    for (r, o) in out.iter_mut().enumerate().take(take) {
        let mut t = 0f32;
        for j in body..k {
            t += super::widen(w, k, r, j) * x[j];
        }
        *o += t;
    }
}

/// A tile of `take` weight rows by `bt ≤ 2` rows of `x` (see `super::tile`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w` holds `take` rows of `k` values, `x` `bt` rows.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile(w: Fmt, x: &[f32], k: usize, take: usize, bt: usize, out: &mut TileOut) {
    let bt = bt.min(2);
    match w {
        Fmt::I4 { q, scales } => by_shape!(tile_int4, take, bt, q, scales, x, k, out),
        _ => by_shape!(tile_widen, take, bt, w, x, k, out),
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_widen<const R: usize, const B: usize>(
    w: Fmt,
    x: &[f32],
    k: usize,
    out: &mut TileOut,
) {
    let body = k / 8 * 8;
    let xp = x.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); B]; R];
    let mut j = 0;
    while j < body {
        let mut xv = [_mm256_setzero_ps(); B];
        for b in 0..B {
            xv[b] = _mm256_loadu_ps(xp.add(b * k + j));
        }
        for r in 0..R {
            prefetch(w.ptr_at((2 * R + r) * k + j));
            let wv = load8(w, r * k + j);
            for b in 0..B {
                acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
            }
        }
        j += 8;
    }
    for r in 0..R {
        for b in 0..B {
            let mut t = 0f32;
            for jj in body..k {
                t += super::widen(w, k, r, jj) * x[b * k + jj];
            }
            out[b][r] = hsum(acc[r][b]) + t;
        }
    }
}

/// Eight int4 codes (as i8 in the low 8 bytes of `v`) widened to f32 and scaled.
#[inline(always)]
unsafe fn codes8(v: __m128i, s: __m256) -> __m256 {
    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s)
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_int4<const R: usize, const B: usize>(
    q: &[u8],
    scales: &[f32],
    x: &[f32],
    k: usize,
    out: &mut TileOut,
) {
    let (rb, groups, full) = (int4_row_bytes(k), int4_groups(k), k / INT4_GROUP);
    let xp = x.as_ptr();
    let (m, eight) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(8));
    let mut acc = [[_mm256_setzero_ps(); B]; R];
    for g in 0..full {
        let mut xv = [[_mm256_setzero_ps(); 4]; B];
        for b in 0..B {
            for c in 0..4 {
                xv[b][c] = _mm256_loadu_ps(xp.add(b * k + g * INT4_GROUP + 8 * c));
            }
        }
        for r in 0..R {
            let p = q.as_ptr().add(r * rb + g * 16);
            prefetch(p.wrapping_add(2 * R * rb) as *const i8);
            let v = _mm_loadu_si128(p as *const __m128i);
            let lo = _mm_sub_epi8(_mm_and_si128(v, m), eight);
            let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(v), m), eight);
            let s = _mm256_set1_ps(*scales.get_unchecked(r * groups + g));
            let wv = [
                codes8(lo, s),
                codes8(_mm_unpackhi_epi64(lo, lo), s),
                codes8(hi, s),
                codes8(_mm_unpackhi_epi64(hi, hi), s),
            ];
            for b in 0..B {
                for c in 0..4 {
                    acc[r][b] = _mm256_fmadd_ps(wv[c], xv[b][c], acc[r][b]);
                }
            }
        }
    }
    let w = Fmt::I4 { q, scales };
    for r in 0..R {
        for b in 0..B {
            let mut t = 0f32;
            for jj in full * INT4_GROUP..k {
                t += super::widen(w, k, r, jj) * x[b * k + jj];
            }
            out[b][r] = hsum(acc[r][b]) + t;
        }
    }
}
