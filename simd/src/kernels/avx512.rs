//! AVX-512 (F, BW, VL) tiles (x86-64): 16 f32 lanes per FMA, up to 4 weight rows × 4 rows of
//! `x` (16 accumulators of the 32 registers), each weight vector loaded and widened once per
//! tile.

use super::{by_shape, int4_groups, int4_row_bytes, Fmt, TileOut, INT4_GROUP};
use std::arch::x86_64::*;

/// Asks for the cache line at `p` (never faults, whatever the address).
#[inline(always)]
unsafe fn prefetch(p: *const i8) {
    _mm_prefetch::<_MM_HINT_T0>(p);
}

/// Asks for the cache line at `p` into L2 only (see `dpbf16::tile`).
#[inline(always)]
unsafe fn prefetch_l2(p: *const i8) {
    _mm_prefetch::<_MM_HINT_T1>(p);
}

/// Sixteen weights starting at element `i` of `w`, widened to f32.
#[inline(always)]
unsafe fn load16(w: Fmt, i: usize) -> __m512 {
    match w {
        Fmt::F32(d) => _mm512_loadu_ps(d.as_ptr().add(i)),
        Fmt::Bf16(d) => {
            let h = _mm256_loadu_si256(d.as_ptr().add(i) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        Fmt::I8(d) => {
            let b = _mm_loadu_si128(d.as_ptr().add(i) as *const __m128i);
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))
        }
        Fmt::I4 { .. } => unreachable!("int4 runs through `tile_int4`"),
    }
}

/// A tile of `take` weight rows by `bt` rows of `x` (see `super::tile`).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL, AVX2 and FMA; `w` holds `take` rows of `k` values,
/// `x` `bt` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub unsafe fn tile(w: Fmt, x: &[f32], k: usize, take: usize, bt: usize, out: &mut TileOut) {
    // Bytes per 16 weights of a widened format.
    let step = match w {
        Fmt::I4 { q, scales } => return by_shape!(tile_int4, take, bt, q, scales, x, k, out),
        Fmt::F32(_) => 64,
        Fmt::Bf16(_) => 32,
        Fmt::I8(_) => 16,
    };
    if bt == 1 {
        for r in 0..take {
            out[0][r] = row_widen(w, r, x, k, step);
        }
        return;
    }
    by_shape!(tile_widen, take, bt, w, x, k, out, step)
}

/// `step` (bytes per 16 weights) decides how often a prefetch is issued: once per line.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn tile_widen<const R: usize, const B: usize>(
    w: Fmt,
    x: &[f32],
    k: usize,
    out: &mut TileOut,
    step: usize,
) {
    let body = k / 16 * 16;
    let every = 64 / step;
    let xp = x.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    let mut j = 0;
    while j < body {
        let mut xv = [_mm512_setzero_ps(); B];
        for b in 0..B {
            xv[b] = _mm512_loadu_ps(xp.add(b * k + j));
        }
        let pf = (j / 16) % every == 0;
        for r in 0..R {
            if pf {
                // Two tiles of rows ahead into L1, so short rows do not outrun the prefetcher,
                // and eight into L2 (as in `dpbf16::tile`).
                prefetch(w.ptr_at((2 * R + r) * k + j));
                prefetch_l2(w.ptr_at((8 * R + r) * k + j));
            }
            let wv = load16(w, r * k + j);
            for b in 0..B {
                acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
            }
        }
        j += 16;
    }
    for r in 0..R {
        for b in 0..B {
            let mut t = 0f32;
            for jj in body..k {
                t += super::widen(w, k, r, jj) * x[b * k + jj];
            }
            out[b][r] = _mm512_reduce_add_ps(acc[r][b]) + t;
        }
    }
}

/// Row `r` of `w` times the one activation row `x`: [`tile_widen`]`::<1, 1>`'s sums (one
/// accumulator in `j` order, then the scalar tail), with the row read as one forward stream
/// and prefetched along it. A tile's rows lie one after another, so a decode step reads its
/// weights front to back (see `vnni::row_dot` for what that gained over four side-by-side
/// rows).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn row_widen(w: Fmt, r: usize, x: &[f32], k: usize, step: usize) -> f32 {
    let body = k / 16 * 16;
    let every = 64 / step;
    // Elements per byte ahead: `step` bytes hold 16 weights.
    let (l2, l1) = (super::ROW_PF_L2 * 16 / step, super::ROW_PF_L1 * 16 / step);
    let xp = x.as_ptr();
    let mut acc = _mm512_setzero_ps();
    let mut j = 0;
    while j < body {
        if (j / 16) % every == 0 {
            prefetch_l2(w.ptr_at(r * k + j + l2));
            prefetch(w.ptr_at(r * k + j + l1));
        }
        acc = _mm512_fmadd_ps(load16(w, r * k + j), _mm512_loadu_ps(xp.add(j)), acc);
        j += 16;
    }
    let mut t = 0f32;
    for jj in body..k {
        t += super::widen(w, k, r, jj) * x[jj];
    }
    _mm512_reduce_add_ps(acc) + t
}

/// Sixteen int4 codes (as i8 in `v`) widened to f32 and scaled.
#[inline(always)]
unsafe fn codes16(v: __m128i, s: __m512) -> __m512 {
    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), s)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
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
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    for g in 0..full {
        let mut x0 = [_mm512_setzero_ps(); B];
        let mut x1 = [_mm512_setzero_ps(); B];
        for b in 0..B {
            x0[b] = _mm512_loadu_ps(xp.add(b * k + g * INT4_GROUP));
            x1[b] = _mm512_loadu_ps(xp.add(b * k + g * INT4_GROUP + 16));
        }
        for r in 0..R {
            let p = q.as_ptr().add(r * rb + g * 16);
            if g % 4 == 0 {
                prefetch(p.wrapping_add(2 * R * rb) as *const i8);
            }
            let v = _mm_loadu_si128(p as *const __m128i);
            let lo = _mm_sub_epi8(_mm_and_si128(v, m), eight);
            let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(v), m), eight);
            let s = _mm512_set1_ps(*scales.get_unchecked(r * groups + g));
            let (w0, w1) = (codes16(lo, s), codes16(hi, s));
            for b in 0..B {
                acc[r][b] = _mm512_fmadd_ps(w0, x0[b], acc[r][b]);
                acc[r][b] = _mm512_fmadd_ps(w1, x1[b], acc[r][b]);
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
            out[b][r] = _mm512_reduce_add_ps(acc[r][b]) + t;
        }
    }
}
