//! int4 weights on integer dot products (`avx512_vnni`, x86-64): the 4-bit codes are unpacked
//! to bytes in registers (`and`, `shift`) and multiplied with int8-quantised activations (one
//! symmetric scale per row, as for int8) by `vpdpbusd`, exactly in 32 bits per group of 32;
//! each group's sum is then scaled by its weight scale in f32.
//!
//! The stored nibbles are `q + 8` (`0..=15`), which `vpdpbusd` takes as its unsigned operand,
//! so per group `Σ q · x = Σ (q + 8) · x − 8 · Σ x`: the correction depends on the activations
//! only and starts each group's accumulator.
//!
//! One 64-byte weight vector holds four groups (16 bytes each: element `i` in the low nibble,
//! `16 + i` in the high one). The activations are laid out to match, per block of 128 values
//! (four groups): the first 16 values of each group (64 bytes), then the last 16 of each. The
//! 32-bit lanes `4g..4g + 4` then hold group `g`'s partial sums, which one f32 multiply by the
//! group scales (each spread over its four lanes) adds to the row's f32 accumulator.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{by_shape, int4_groups, int4_row_bytes, INT4_GROUP, INT4_GROUP_BYTES};

/// Values per block (four groups), and activation bytes per block.
const BLOCK: usize = 4 * INT4_GROUP;
/// Weight bytes per block (one vector).
const BLOCK_BYTES: usize = 4 * INT4_GROUP_BYTES;
/// Activation rows per block of a long product (prefill), as for int8.
const X_BLOCK_BYTES: usize = 256 << 10;

/// Activation rows quantised to int8 (one scale per row) in the block layout above.
#[derive(Debug, Default)]
pub struct ActQ4 {
    /// `[n, kp]` codes, `kp` = `k` rounded up to whole blocks, padding zero.
    q: Vec<i8>,
    /// `[n, kp / 8]`: per block 16 lanes, lane `4g` holding `−8 · Σ` of group `g`'s codes.
    corr: Vec<i32>,
    /// Per row: `max|x| / 127`.
    scale: Vec<f32>,
    /// One row of codes in natural order (reused).
    tmp: Vec<i8>,
    n: usize,
    k: usize,
    kp: usize,
}

impl ActQ4 {
    /// Quantises `x` (`[n, k]`), reusing the buffers.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        let n = x.len().checked_div(k).unwrap_or(0);
        let kp = k.div_ceil(BLOCK) * BLOCK;
        let cw = kp / 8;
        self.q.clear();
        self.q.resize(n * kp, 0);
        self.corr.clear();
        self.corr.resize(n * cw, 0);
        self.scale.clear();
        self.tmp.clear();
        self.tmp.resize(kp, 0);
        for (r, xr) in x.chunks_exact(k.max(1)).enumerate() {
            // SAFETY: the vnni `Isa`s exist only where AVX-512 was detected (callers).
            let (s, _) = unsafe { super::vnni::quantize_row(xr, &mut self.tmp[..k]) };
            self.scale.push(s);
            let (qr, cr) = (
                &mut self.q[r * kp..(r + 1) * kp],
                &mut self.corr[r * cw..(r + 1) * cw],
            );
            for (g, src) in self.tmp.chunks_exact(INT4_GROUP).enumerate() {
                let (blk, gi) = (g / 4, g % 4);
                let lo = blk * BLOCK + gi * INT4_GROUP_BYTES;
                let hi = lo + BLOCK_BYTES;
                qr[lo..lo + 16].copy_from_slice(&src[..16]);
                qr[hi..hi + 16].copy_from_slice(&src[16..]);
                cr[blk * 16 + gi * 4] = -8 * src.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
        (self.n, self.k, self.kp) = (n, k, kp);
    }
}

thread_local! {
    static ACT: RefCell<ActQ4> = RefCell::new(ActQ4::default());
}

/// Runs `f` with `x` (`[n, k]`) quantised in this thread's buffer (or a fresh one if that is
/// in use further up this stack).
pub fn with_quantized<R>(x: &[f32], k: usize, f: impl FnOnce(&ActQ4) -> R) -> R {
    super::with_scratch(&ACT, |a| a.quantize(x, k), f)
}

/// `put(b, i, Σ_j W[row0 + i, j] · x[b, j])` for `i < rows` and every row `b` of `a`, with
/// `W` int4 (`q`, `scales`: the layout of `super::quant`, `a.k` columns).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI.
pub unsafe fn dot_rows_i4(
    q: &[u8],
    scales: &[f32],
    row0: usize,
    rows: usize,
    a: &ActQ4,
    put: &mut impl FnMut(usize, usize, f32),
) {
    let (n, k, kp) = (a.n, a.k, a.kp);
    let (rb, g) = (int4_row_bytes(k), int4_groups(k));
    assert!(
        (row0 + rows) * rb <= q.len() && (row0 + rows) * g <= scales.len(),
        "dot_rows_i4: rows {row0}..{} of an int4 matrix of {} bytes, {k} columns",
        row0 + rows,
        q.len()
    );
    let cw = kp / 8;
    if n == 1 {
        // A decode step: each weight row read front to back as one stream ([`row_dot`]), with
        // a tile's sums and order, so the same bits.
        for r in 0..rows {
            let w = &q[(row0 + r) * rb..(row0 + r + 1) * rb];
            let s = &scales[(row0 + r) * g..(row0 + r + 1) * g];
            put(0, r, row_dot(w, s, &a.q[..kp], &a.corr[..cw]) * a.scale[0]);
        }
        return;
    }
    let xb = (X_BLOCK_BYTES / kp.max(1)).max(4) / 4 * 4;
    let mut b0 = 0;
    while b0 < n {
        let b1 = (b0 + xb).min(n);
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(4);
            let w = &q[(row0 + r) * rb..(row0 + r + take) * rb];
            let s = &scales[(row0 + r) * g..(row0 + r + take) * g];
            let mut b = b0;
            while b < b1 {
                let bt = (b1 - b).min(4);
                let mut out = [[0f32; 4]; 4];
                let x = &a.q[b * kp..(b + bt) * kp];
                let c = &a.corr[b * cw..(b + bt) * cw];
                by_shape!(tile, take, bt, w, s, g, x, c, kp, &mut out);
                for bi in 0..bt {
                    let sx = a.scale[b + bi];
                    for i in 0..take {
                        put(b + bi, r + i, out[bi][i] * sx);
                    }
                }
                b += bt;
            }
            r += take;
        }
        b0 = b1;
    }
}

/// `out[b][r] = Σ_groups scale · Σ_j q[r, j] · x[b, j]` for `R` int4 weight rows (`g` groups
/// each, rows of `16 g` bytes, `g` scales each) and `B` activation rows (`kp` bytes each in
/// the block layout, `kp / 8` correction lanes each).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const B: usize>(
    w: &[u8],
    s: &[f32],
    g: usize,
    x: &[i8],
    c: &[i32],
    kp: usize,
    out: &mut [[f32; 4]; 4],
) {
    let rb = g * INT4_GROUP_BYTES;
    let (blocks, full) = (kp / BLOCK, g / 4);
    let (wp, sp, xp, cp) = (w.as_ptr(), s.as_ptr(), x.as_ptr(), c.as_ptr());
    let nib = _mm512_set1_epi8(0x0f);
    // Group scale `i` of a 4-scale load to lanes `4i..4i + 4`.
    let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    for blk in 0..blocks {
        let mut xl = [_mm512_setzero_si512(); B];
        let mut xh = [_mm512_setzero_si512(); B];
        let mut cv = [_mm512_setzero_si512(); B];
        for b in 0..B {
            let p = xp.add(b * kp + blk * BLOCK);
            xl[b] = _mm512_loadu_si512(p as *const __m512i);
            xh[b] = _mm512_loadu_si512(p.add(BLOCK_BYTES) as *const __m512i);
            cv[b] = _mm512_loadu_si512(cp.add(b * kp / 8 + blk * 16) as *const __m512i);
        }
        for r in 0..R {
            let (v, sv) = if blk < full {
                // Two tiles of rows ahead into L1, so short rows do not outrun the prefetcher,
                // and eight tiles ahead into L2: more lines in flight per core than L1's fill
                // buffers allow (1.4B decode 21–22 → 23 tok/s on 2 cores, same-minute A/B).
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((2 * R + r) * rb + blk * 64) as _);
                _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add((8 * R + r) * rb + blk * 64) as _);
                (
                    _mm512_loadu_si512(wp.add(r * rb + blk * BLOCK_BYTES) as *const __m512i),
                    _mm_loadu_ps(sp.add(r * g + blk * 4)),
                )
            } else {
                // The last, partial block: what lies past the row reads as zero.
                let left = g - blk * 4;
                (
                    _mm512_maskz_loadu_epi8(
                        (1u64 << (left * INT4_GROUP_BYTES)) - 1,
                        wp.add(r * rb + blk * BLOCK_BYTES) as *const i8,
                    ),
                    _mm_maskz_loadu_ps((1u8 << left) - 1, sp.add(r * g + blk * 4)),
                )
            };
            let sc = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(sv));
            let lo = _mm512_and_si512(v, nib);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
            for b in 0..B {
                let d = _mm512_dpbusd_epi32(cv[b], lo, xl[b]);
                let d = _mm512_dpbusd_epi32(d, hi, xh[b]);
                acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[r][b]);
            }
        }
    }
    // A partial tile pads with zero vectors, so every row is summed in the same order whatever
    // tile it falls in: the bits do not depend on how rows are split over threads.
    let zero = _mm512_setzero_ps();
    for b in 0..B {
        let row = |r: usize| if r < R { acc[r][b] } else { zero };
        let v = reduce4(row(0), row(1), row(2), row(3));
        _mm_storeu_ps(out[b].as_mut_ptr(), v);
    }
}

/// [`tile`]`::<1, 1>` for one weight row (`w`: `16 g` bytes, `s`: its `g` scales) and one
/// activation row (`x`, `c` as in [`tile`]), the weights read as one forward stream and
/// prefetched along it, the scales beside them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn row_dot(w: &[u8], s: &[f32], x: &[i8], c: &[i32]) -> f32 {
    let g = s.len();
    let kp = x.len();
    assert!(w.len() == g * INT4_GROUP_BYTES && kp >= g.div_ceil(4) * BLOCK && c.len() >= kp / 8);
    let (blocks, full) = (kp / BLOCK, g / 4);
    let (wp, sp, xp, cp) = (w.as_ptr(), s.as_ptr(), x.as_ptr(), c.as_ptr());
    let nib = _mm512_set1_epi8(0x0f);
    let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let mut acc = _mm512_setzero_ps();
    for blk in 0..blocks {
        let p = xp.add(blk * BLOCK);
        let xl = _mm512_loadu_si512(p as *const __m512i);
        let xh = _mm512_loadu_si512(p.add(BLOCK_BYTES) as *const __m512i);
        let cv = _mm512_loadu_si512(cp.add(blk * 16) as *const __m512i);
        let (v, sv) = if blk < full {
            let o = blk * BLOCK_BYTES;
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(o + super::ROW_PF_L2) as _);
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(o + super::ROW_PF_L1) as _);
            if blk % 4 == 0 {
                // Four blocks' scales are one line; they run a quarter as far ahead.
                _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(blk * 4 + super::ROW_PF_L1 / 4) as _);
            }
            (
                _mm512_loadu_si512(wp.add(o) as *const __m512i),
                _mm_loadu_ps(sp.add(blk * 4)),
            )
        } else {
            let left = g - blk * 4;
            (
                _mm512_maskz_loadu_epi8(
                    (1u64 << (left * INT4_GROUP_BYTES)) - 1,
                    wp.add(blk * BLOCK_BYTES) as *const i8,
                ),
                _mm_maskz_loadu_ps((1u8 << left) - 1, sp.add(blk * 4)),
            )
        };
        let sc = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(sv));
        let lo = _mm512_and_si512(v, nib);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
        let d = _mm512_dpbusd_epi32(cv, lo, xl);
        let d = _mm512_dpbusd_epi32(d, hi, xh);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc);
    }
    let zero = _mm512_setzero_ps();
    _mm_cvtss_f32(reduce4(acc, zero, zero, zero))
}

/// The lane sums of four vectors, `[Σa, Σb, Σc, Σd]` (as `super::vnni::reduce4`, in f32).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn reduce4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    let (abd, cdd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
    let s = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)),
    );
    let h = _mm256_add_ps(
        _mm512_castps512_ps256(s),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s))),
    );
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}
