//! int8 weights on integer dot products (`avx512_vnni`, x86-64): the activations are quantised
//! to int8 with one symmetric scale per row (`max|x| / 127`), and `vpdpbusd` sums four
//! byte products into each 32-bit lane, exactly. `vpdpbusd` multiplies unsigned by signed
//! bytes, so the weights are flipped to `w + 128` (one `xor` per weight vector, shared by
//! the tile's activation rows) and `128 · Σ_j xq[j]`, a constant per activation row, is
//! taken off the sum: `Σ_j w[j] · xq[j] = Σ_j (w[j] + 128) · xq[j] − 128 · Σ_j xq[j]`.
//!
//! A tile is up to 4 weight rows by 4 activation rows (16 accumulators). Activation rows are
//! padded with zeros to a multiple of 64 bytes; the last partial 64 bytes of a weight row are
//! read with a masked load, so no read goes past the matrix.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::by_shape;

/// Bytes per vector.
const LANES: usize = 64;
/// Activation rows per block of a long product (prefill): at most this many bytes of
/// quantised activations, so that a block stays in L2 while the weight rows pass over it.
const X_BLOCK_BYTES: usize = 256 << 10;

/// Activation rows quantised to int8, one scale per row.
#[derive(Debug, Default)]
pub struct ActQ {
    /// `[n, kp]` codes, each row zero-padded to `kp = k` rounded up to 64.
    q: Vec<i8>,
    /// Per row: `max|x| / 127` (1 for a zero row).
    scale: Vec<f32>,
    /// Per row: `128 · Σ_j q[j]`.
    corr: Vec<i32>,
    n: usize,
    k: usize,
    kp: usize,
}

impl ActQ {
    /// Quantises `x` (`[n, k]`), reusing the buffers.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        let n = x.len().checked_div(k).unwrap_or(0);
        let kp = k.div_ceil(LANES) * LANES;
        self.q.clear();
        self.q.resize(n * kp, 0);
        self.scale.clear();
        self.corr.clear();
        for (xr, qr) in x.chunks_exact(k).zip(self.q.chunks_exact_mut(kp)) {
            // SAFETY: the vnni `Isa`s exist only where AVX-512 was detected (callers).
            let (s, sum) = unsafe { quantize_row(xr, &mut qr[..k]) };
            self.scale.push(s);
            self.corr.push(128 * sum);
        }
        (self.n, self.k, self.kp) = (n, k, kp);
    }
}

/// One row to int8 (ties to even); returns the scale and the sum of the codes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_row(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let (k, xp) = (x.len(), x.as_ptr());
    let body = k / 16 * 16;
    let mut m = _mm512_setzero_ps();
    for j in (0..body).step_by(16) {
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xp.add(j))));
    }
    let amax = x[body..]
        .iter()
        .fold(_mm512_reduce_max_ps(m), |a, &v| a.max(v.abs()));
    let scale = if amax > 0.0 && amax.is_finite() {
        amax / 127.0
    } else {
        1.0
    };
    let inv = 1.0 / scale;
    let (vinv, lo, hi) = (
        _mm512_set1_ps(inv),
        _mm512_set1_epi32(-127),
        _mm512_set1_epi32(127),
    );
    let mut sum = _mm512_setzero_si512();
    for j in (0..body).step_by(16) {
        // Rounds to nearest even (the default MXCSR mode).
        let c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xp.add(j)), vinv));
        let c = _mm512_max_epi32(_mm512_min_epi32(c, hi), lo);
        sum = _mm512_add_epi32(sum, c);
        _mm_storeu_si128(
            q.as_mut_ptr().add(j) as *mut __m128i,
            _mm512_cvtepi32_epi8(c),
        );
    }
    let mut total = _mm512_reduce_add_epi32(sum);
    for (o, &v) in q[body..].iter_mut().zip(&x[body..]) {
        let c = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32;
        *o = c as i8;
        total += c;
    }
    (scale, total)
}

thread_local! {
    static ACT: RefCell<ActQ> = RefCell::new(ActQ::default());
}

/// Runs `f` with `x` (`[n, k]`) quantised, in this thread's buffer (grown once, so a decode
/// step allocates nothing), or in a fresh one if that is in use further up this stack.
pub fn with_quantized<R>(x: &[f32], k: usize, f: impl FnOnce(&ActQ) -> R) -> R {
    super::with_scratch(&ACT, |a| a.quantize(x, k), f)
}

/// `put(b, i, Σ_j W[row0 + i, j] · x[b, j])` for `i < rows` and every row `b` of `a`, with
/// `W` int8 (`q`, per-row `scales`, `k = a.k` columns).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI.
pub unsafe fn dot_rows_i8(
    q: &[i8],
    scales: &[f32],
    row0: usize,
    rows: usize,
    a: &ActQ,
    put: &mut impl FnMut(usize, usize, f32),
) {
    let (n, k, kp) = (a.n, a.k, a.kp);
    assert!(
        (row0 + rows) * k <= q.len() && row0 + rows <= scales.len(),
        "dot_rows_i8: rows {row0}..{} of a [{}, {k}] matrix",
        row0 + rows,
        scales.len()
    );
    if n == 1 {
        // One activation row (a decode step): each weight row on its own, read front to back
        // as one stream ([`row_dot`]), gives the same integer sums as the tiles.
        for r in 0..rows {
            let d = row_dot(&q[(row0 + r) * k..(row0 + r + 1) * k], &a.q[..kp]);
            put(0, r, (d - a.corr[0]) as f32 * a.scale[0] * scales[row0 + r]);
        }
        return;
    }
    let xb = (X_BLOCK_BYTES / kp.max(1)).max(4) / 4 * 4;
    let mut b0 = 0;
    while b0 < n {
        let b1 = (b0 + xb).min(n);
        // A block of more than four activation rows runs on tiles of three weight rows by
        // up to eight activation rows ([`tile_wide`]): twice the products per weight load.
        let wide = b1 - b0 > 4;
        let (rstep, bstep) = if wide { (WIDE_R, WIDE_B) } else { (4, 4) };
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(rstep);
            let w = &q[(row0 + r) * k..(row0 + r + take) * k];
            let mut b = b0;
            while b < b1 {
                let bt = (b1 - b).min(bstep);
                let mut out = [[0i32; 4]; WIDE_B];
                let x = &a.q[b * kp..(b + bt) * kp];
                if bt > 4 {
                    by_wide_shape!(tile_wide, take, bt, w, k, x, kp, &mut out);
                } else {
                    let o4: &mut [[i32; 4]; 4] = (&mut out[..4]).try_into().unwrap();
                    by_shape!(tile, take, bt, w, k, x, kp, o4);
                }
                for bi in 0..bt {
                    let sx = a.scale[b + bi];
                    for i in 0..take {
                        let dot = (out[bi][i] - a.corr[b + bi]) as f32;
                        put(b + bi, r + i, dot * sx * scales[row0 + r + i]);
                    }
                }
                b += bt;
            }
            r += take;
        }
        b0 = b1;
    }
}

/// `out[b][r] = Σ_j (w[r, j] + 128) · x[b, j]` for `R` weight rows of `k` bytes and `B`
/// activation rows of `kp` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile<const R: usize, const B: usize>(
    w: &[i8],
    k: usize,
    x: &[i8],
    kp: usize,
    out: &mut [[i32; 4]; 4],
) {
    let body = k / LANES * LANES;
    let flip = _mm512_set1_epi8(i8::MIN);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_si512(); B]; R];
    let mut j = 0;
    while j < body {
        let mut xv = [_mm512_setzero_si512(); B];
        for b in 0..B {
            xv[b] = _mm512_loadu_si512(xp.add(b * kp + j) as *const __m512i);
        }
        for r in 0..R {
            // Two tiles of rows ahead into L1 and eight into L2, as in `dpbf16::tile`.
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((2 * R + r) * k + j));
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add((8 * R + r) * k + j));
            let v = _mm512_loadu_si512(wp.add(r * k + j) as *const __m512i);
            let wv = _mm512_xor_si512(v, flip);
            for b in 0..B {
                acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], wv, xv[b]);
            }
        }
        j += LANES;
    }
    if body < k {
        // The activations are zero past `k`, so what the flipped zeros multiply is zero.
        let m: __mmask64 = (1u64 << (k - body)) - 1;
        let mut xv = [_mm512_setzero_si512(); B];
        for b in 0..B {
            xv[b] = _mm512_loadu_si512(xp.add(b * kp + body) as *const __m512i);
        }
        for r in 0..R {
            let v = _mm512_maskz_loadu_epi8(m, wp.add(r * k + body));
            let wv = _mm512_xor_si512(v, flip);
            for b in 0..B {
                acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], wv, xv[b]);
            }
        }
    }
    for b in 0..B {
        if R == 4 {
            let v = reduce4(acc[0][b], acc[1][b], acc[2][b], acc[3][b]);
            _mm_storeu_si128(out[b].as_mut_ptr() as *mut __m128i, v);
        } else {
            for r in 0..R {
                out[b][r] = _mm512_reduce_add_epi32(acc[r][b]);
            }
        }
    }
}

/// `Σ_j (w[j] + 128) · x[j]` for one weight row `w` and one activation row `x` (`x.len()` ≥
/// `w.len()` rounded up to 64, zero-padded).
///
/// Batch 1 reads the weights as one forward stream, four vectors at a time into four
/// accumulators, rather than [`tile`]'s four rows side by side: on the 2-core Zen 4 machine the
/// tile's four streams read 19–23 GB/s from DRAM on one thread against 25–28 for this one
/// (`cargo bench -p simd --bench tiles -- --rows 65536 --dtypes int8 --batches 1`), and
/// the 1.4B int8 decode went from 16–19 to 20–22 tok/s. Rows are consecutive in memory, so the
/// prefetch past the row's end lands on the next row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn row_dot(w: &[i8], x: &[i8]) -> i32 {
    let k = w.len();
    assert!(x.len() >= k.div_ceil(LANES) * LANES);
    let flip = _mm512_set1_epi8(i8::MIN);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_si512(); 4];
    let body4 = k / (4 * LANES) * (4 * LANES);
    let body = k / LANES * LANES;
    let mut j = 0;
    while j < body4 {
        for (u, a) in acc.iter_mut().enumerate() {
            let o = j + LANES * u;
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(o + super::ROW_PF_L2));
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(o + super::ROW_PF_L1));
            let v = _mm512_xor_si512(_mm512_loadu_si512(wp.add(o) as *const __m512i), flip);
            *a = _mm512_dpbusd_epi32(*a, v, _mm512_loadu_si512(xp.add(o) as *const __m512i));
        }
        j += 4 * LANES;
    }
    while j < body {
        _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(j + super::ROW_PF_L2));
        let v = _mm512_xor_si512(_mm512_loadu_si512(wp.add(j) as *const __m512i), flip);
        acc[0] = _mm512_dpbusd_epi32(acc[0], v, _mm512_loadu_si512(xp.add(j) as *const __m512i));
        j += LANES;
    }
    if body < k {
        // The activations are zero past `k`, as in `tile`.
        let m: __mmask64 = (1u64 << (k - body)) - 1;
        let v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, wp.add(body)), flip);
        acc[0] = _mm512_dpbusd_epi32(
            acc[0],
            v,
            _mm512_loadu_si512(xp.add(body) as *const __m512i),
        );
    }
    let s = _mm512_add_epi32(
        _mm512_add_epi32(acc[0], acc[1]),
        _mm512_add_epi32(acc[2], acc[3]),
    );
    _mm512_reduce_add_epi32(s)
}

/// Weight rows of a wide tile ([`tile_wide`]).
const WIDE_R: usize = 3;
/// Activation rows of a wide tile.
const WIDE_B: usize = 8;

/// [`tile_wide`] for `take` ≤ 3 weight rows and 5 ≤ `bt` ≤ 8 activation rows.
macro_rules! by_wide_shape {
    ($f:ident, $take:expr, $bt:expr, $($a:expr),*) => {
        match ($take, $bt) {
            (1, 5) => $f::<1, 5>($($a),*),
            (1, 6) => $f::<1, 6>($($a),*),
            (1, 7) => $f::<1, 7>($($a),*),
            (1, _) => $f::<1, 8>($($a),*),
            (2, 5) => $f::<2, 5>($($a),*),
            (2, 6) => $f::<2, 6>($($a),*),
            (2, 7) => $f::<2, 7>($($a),*),
            (2, _) => $f::<2, 8>($($a),*),
            (_, 5) => $f::<3, 5>($($a),*),
            (_, 6) => $f::<3, 6>($($a),*),
            (_, 7) => $f::<3, 7>($($a),*),
            (_, _) => $f::<3, 8>($($a),*),
        }
    };
}
use by_wide_shape;

/// [`tile`] for `R` ≤ 3 weight rows by `B` ≤ 8 activation rows: the `R` flipped weight
/// vectors stay in registers while the activation vectors stream past them, one at a time,
/// so the 24 accumulators, 3 weight vectors, one activation vector and the flip constant
/// fit the 32 registers. Each weight load feeds `B` products instead of [`tile`]'s four.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile_wide<const R: usize, const B: usize>(
    w: &[i8],
    k: usize,
    x: &[i8],
    kp: usize,
    out: &mut [[i32; 4]; WIDE_B],
) {
    let body = k / LANES * LANES;
    let flip = _mm512_set1_epi8(i8::MIN);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_si512(); B]; R];
    let mut wv = [_mm512_setzero_si512(); R];
    let mut j = 0;
    while j < body {
        for r in 0..R {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((2 * R + r) * k + j));
            _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add((8 * R + r) * k + j));
            let v = _mm512_loadu_si512(wp.add(r * k + j) as *const __m512i);
            wv[r] = _mm512_xor_si512(v, flip);
        }
        for b in 0..B {
            let xv = _mm512_loadu_si512(xp.add(b * kp + j) as *const __m512i);
            for r in 0..R {
                acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], wv[r], xv);
            }
        }
        j += LANES;
    }
    if body < k {
        // The activations are zero past `k`, as in `tile`.
        let m: __mmask64 = (1u64 << (k - body)) - 1;
        for r in 0..R {
            let v = _mm512_maskz_loadu_epi8(m, wp.add(r * k + body));
            wv[r] = _mm512_xor_si512(v, flip);
        }
        for b in 0..B {
            let xv = _mm512_loadu_si512(xp.add(b * kp + body) as *const __m512i);
            for r in 0..R {
                acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], wv[r], xv);
            }
        }
    }
    let zero = _mm512_setzero_si512();
    for b in 0..B {
        let row = |r: usize| if r < R { acc[r][b] } else { zero };
        let v = reduce4(row(0), row(1), row(2), zero);
        _mm_storeu_si128(out[b].as_mut_ptr() as *mut __m128i, v);
    }
}

/// The lane sums of four vectors, `[Σa, Σb, Σc, Σd]`: 13 instructions where four separate
/// reductions take about 36 (a tile's 16 sums cost as much as a few hundred products).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
pub(super) unsafe fn reduce4(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m128i {
    // Per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3], then [Σa, Σb, Σc, Σd].
    let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    let s = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    let h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64::<1>(s));
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
}
