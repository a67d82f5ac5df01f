//! bf16 weights on `vdpbf16ps` (`avx512_bf16`, x86-64): the activations are rounded to bf16
//! (nearest even) once per product, and each instruction multiplies 32 bf16 pairs into 16
//! f32 lanes, accumulating in f32: no widening of the weights at all.
//!
//! A tile is up to 4 weight rows by 4 activation rows (16 accumulators). Activation rows are
//! padded with zeros to a multiple of 32 values; the last partial 32 values of a weight row
//! are read with a masked load, so no read goes past the matrix.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::{by_shape, f32_to_bf16, TileOut};

/// bf16 values per vector.
const LANES: usize = 32;

/// Activation rows rounded to bf16.
#[derive(Debug, Default)]
pub struct ActBf16 {
    /// `[n, kp]`, each row zero-padded to `kp = k` rounded up to 32.
    x: Vec<u16>,
    n: usize,
    k: usize,
    kp: usize,
}

impl ActBf16 {
    /// Rounds `x` (`[n, k]`), reusing the buffer.
    fn convert(&mut self, x: &[f32], k: usize) {
        let n = x.len().checked_div(k).unwrap_or(0);
        let kp = k.div_ceil(LANES) * LANES;
        self.x.clear();
        self.x.resize(n * kp, 0);
        for (xr, o) in x.chunks_exact(k).zip(self.x.chunks_exact_mut(kp)) {
            // SAFETY: this module runs only where `avx512_bf16` was detected (callers).
            unsafe { convert_row(xr, &mut o[..k]) };
        }
        (self.n, self.k, self.kp) = (n, k, kp);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn convert_row(x: &[f32], o: &mut [u16]) {
    let body = x.len() / LANES * LANES;
    let mut j = 0;
    while j < body {
        let lo = _mm512_loadu_ps(x.as_ptr().add(j));
        let hi = _mm512_loadu_ps(x.as_ptr().add(j + 16));
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(o.as_mut_ptr().add(j) as *mut __m512i, v);
        j += LANES;
    }
    for (d, &v) in o[body..].iter_mut().zip(&x[body..]) {
        *d = f32_to_bf16(v);
    }
}

thread_local! {
    static ACT: RefCell<ActBf16> = RefCell::new(ActBf16::default());
}

/// Runs `f` with `x` (`[n, k]`) rounded to bf16, in this thread's buffer (grown once), or in
/// a fresh one if that is in use further up this stack.
pub fn with_converted<R>(x: &[f32], k: usize, f: impl FnOnce(&ActBf16) -> R) -> R {
    super::with_scratch(&ACT, |a| a.convert(x, k), f)
}

/// `put(b, i, Σ_j W[row0 + i, j] · x[b, j])` for `i < rows` and every row `b` of `a`, with
/// `W` bf16 (`k = a.k` columns).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and BF16.
pub unsafe fn dot_rows_bf16(
    w: &[u16],
    row0: usize,
    rows: usize,
    a: &ActBf16,
    put: &mut impl FnMut(usize, usize, f32),
) {
    let (n, k, kp) = (a.n, a.k, a.kp);
    assert!(
        (row0 + rows) * k <= w.len(),
        "dot_rows_bf16: rows {row0}..{} of a matrix of {} values, {k} columns",
        row0 + rows,
        w.len()
    );
    if n == 1 {
        // A decode step: each weight row read front to back as one stream, with the same
        // accumulation order as a tile (one accumulator per row, in `j` order), so the
        // same bits.
        for r in 0..rows {
            put(
                0,
                r,
                row_dot(&w[(row0 + r) * k..(row0 + r + 1) * k], &a.x[..kp]),
            );
        }
        return;
    }
    let mut r = 0;
    while r < rows {
        let take = (rows - r).min(4);
        let wr = &w[(row0 + r) * k..(row0 + r + take) * k];
        let mut b = 0;
        while b < n {
            let bt = (n - b).min(4);
            let mut out: TileOut = [[0.0; 4]; 4];
            let x = &a.x[b * kp..(b + bt) * kp];
            by_shape!(tile, take, bt, wr, k, x, kp, &mut out);
            for bi in 0..bt {
                for i in 0..take {
                    put(b + bi, r + i, out[bi][i]);
                }
            }
            b += bt;
        }
        r += take;
    }
}

#[inline(always)]
unsafe fn bh(v: __m512i) -> __m512bh {
    std::mem::transmute(v)
}

/// `Σ_j w[j] · x[j]` for one weight row and one activation row (`x.len()` ≥ `w.len()`
/// rounded up to 32, zero-padded): [`tile`]`::<1, 1>`'s sums, with the weights read as one
/// forward stream and prefetched along it (the next row follows in memory).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn row_dot(w: &[u16], x: &[u16]) -> f32 {
    let k = w.len();
    assert!(x.len() >= k.div_ceil(LANES) * LANES);
    let body = k / LANES * LANES;
    let (wp, xp) = (w.as_ptr() as *const i8, x.as_ptr());
    let mut acc = _mm512_setzero_ps();
    let mut j = 0;
    while j < body {
        _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(2 * j + super::ROW_PF_L2));
        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(2 * j + super::ROW_PF_L1));
        let wv = bh(_mm512_loadu_si512(wp.add(2 * j) as *const __m512i));
        let xv = bh(_mm512_loadu_si512(xp.add(j) as *const __m512i));
        acc = _mm512_dpbf16_ps(acc, wv, xv);
        j += LANES;
    }
    if body < k {
        let m: __mmask32 = (1u32 << (k - body)) - 1;
        let wv = bh(_mm512_maskz_loadu_epi16(m, wp.add(2 * body) as *const i16));
        let xv = bh(_mm512_loadu_si512(xp.add(body) as *const __m512i));
        acc = _mm512_dpbf16_ps(acc, wv, xv);
    }
    _mm512_reduce_add_ps(acc)
}

/// `out[b][r] = Σ_j w[r, j] · x[b, j]` for `R` weight rows of `k` values and `B` activation
/// rows of `kp` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn tile<const R: usize, const B: usize>(
    w: &[u16],
    k: usize,
    x: &[u16],
    kp: usize,
    out: &mut TileOut,
) {
    let body = k / LANES * LANES;
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    let mut j = 0;
    while j < body {
        let mut xv = [bh(_mm512_setzero_si512()); B];
        for b in 0..B {
            xv[b] = bh(_mm512_loadu_si512(xp.add(b * kp + j) as *const __m512i));
        }
        for r in 0..R {
            // Two tiles of rows ahead into L1, so short rows do not outrun the prefetcher, and
            // eight tiles ahead into L2 (an L1 prefetch holds one of L1's few miss buffers
            // until the line arrives; an L2 one does not).
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((2 * R + r) * k + j) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add((8 * R + r) * k + j) as *const i8);
            let wv = bh(_mm512_loadu_si512(wp.add(r * k + j) as *const __m512i));
            for b in 0..B {
                acc[r][b] = _mm512_dpbf16_ps(acc[r][b], wv, xv[b]);
            }
        }
        j += LANES;
    }
    if body < k {
        // The activations are zero past `k`, and so are the masked-off weights.
        let m: __mmask32 = (1u32 << (k - body)) - 1;
        let mut xv = [bh(_mm512_setzero_si512()); B];
        for b in 0..B {
            xv[b] = bh(_mm512_loadu_si512(xp.add(b * kp + body) as *const __m512i));
        }
        for r in 0..R {
            let wv = bh(_mm512_maskz_loadu_epi16(
                m,
                wp.add(r * k + body) as *const i16,
            ));
            for b in 0..B {
                acc[r][b] = _mm512_dpbf16_ps(acc[r][b], wv, xv[b]);
            }
        }
    }
    for r in 0..R {
        for b in 0..B {
            out[b][r] = _mm512_reduce_add_ps(acc[r][b]);
        }
    }
}
