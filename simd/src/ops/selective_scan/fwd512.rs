//! The forward scan's group loop on 512-bit registers (AVX-512 F): sixteen channels per
//! vector, the same operations lane by lane as the AVX2 loop in `fwd.rs` (the same `exp`
//! polynomial, the same fused multiply-adds in the same order), so both give the same bits;
//! half the instructions per state update. softplus and silu, once per channel and position,
//! run on sixteen lanes (`vecmath512`) with the bits of the shared `vecmath` functions.

#![allow(clippy::needless_range_loop)] // lanes indexed by state, as in the maths

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::Scan;
use crate::vecmath512::{silu16, softplus16};
use crate::SyncPtr;

/// 16-lane state vectors a task keeps on the stack: 16 KiB.
pub(super) const STACK_LANES16: usize = 256;

/// `e^x` as `fwd::avx2::exp_ps`, on 16 lanes.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn exp_ps(x: __m512) -> __m512 {
    let x = _mm512_max_ps(
        _mm512_min_ps(x, _mm512_set1_ps(88.0)),
        _mm512_set1_ps(-87.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(e))
}

/// `w` values of `s` from `i` (the rest zero).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load(s: &[f32], i: usize, w: usize) -> __m512 {
    assert!(i + w <= s.len());
    _mm512_maskz_loadu_ps(((1u32 << w) - 1) as u16, s.as_ptr().add(i))
}

/// `r[j]`'s lane `i` moves to `r[i]`'s lane `j`: a 16 × 16 transpose in registers, four rounds
/// of shuffles (pure data movement, so the scan's bits do not depend on it).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let pd = _mm512_castps_pd;
    for q in 0..4 {
        let (a, b, c, d) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
        r[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        r[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        r[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        r[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(b), pd(d)));
    }
    // r[4q + m] now holds, in 128-bit lane p, rows 4q..4q + 4 at column 4p + m.
    for h in 0..2 {
        for m in 0..4 {
            let (a, b) = (r[8 * h + m], r[8 * h + 4 + m]);
            t[8 * h + m] = _mm512_shuffle_f32x4::<0x88>(a, b);
            t[8 * h + 4 + m] = _mm512_shuffle_f32x4::<0xdd>(a, b);
        }
    }
    for m in 0..8 {
        r[m] = _mm512_shuffle_f32x4::<0x88>(t[m], t[8 + m]);
        r[8 + m] = _mm512_shuffle_f32x4::<0xdd>(t[m], t[8 + m]);
    }
}

/// Sixteen rows of sixteen floats (`rows[16 j..16 j + 16]`, one channel's states each) with the
/// channels in the lanes: vector `n` holds state `n` of the sixteen channels.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn rows_to_lanes(rows: &[f32]) -> [__m512; 16] {
    assert!(rows.len() >= 256);
    let mut r = [_mm512_setzero_ps(); 16];
    for (j, v) in r.iter_mut().enumerate() {
        *v = _mm512_loadu_ps(rows[16 * j..].as_ptr());
    }
    transpose16(&mut r);
    r
}

/// The inverse of [`rows_to_lanes`]: `r` back into the sixteen rows.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn lanes_to_rows(mut r: [__m512; 16], rows: &mut [f32]) {
    assert!(rows.len() >= 256);
    transpose16(&mut r);
    for (j, v) in r.iter().enumerate() {
        _mm512_storeu_ps(rows[16 * j..].as_mut_ptr(), *v);
    }
}

/// The group loop of `fwd::wide_group` on 512-bit registers.
///
/// # Safety
/// AVX-512 F, AVX2 and FMA present; `(c1 - c0).div_ceil(16) · d_state ≤ STACK_LANES16`; `h`
/// and `out` as in `selective_scan_fwd`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn group(
    s: &Scan,
    bi: usize,
    c0: usize,
    c1: usize,
    h: SyncPtr<f32>,
    out: SyncPtr<f32>,
) {
    let whole = (c1 - c0) / 16 * 16;
    if s.seq_len == 1 && s.d_state == 16 && whole > 0 {
        step_rows(s, bi, c0, c0 + whole, h, out);
        if c0 + whole < c1 {
            group_lanes(s, bi, c0 + whole, c1, h, out);
        }
        return;
    }
    group_lanes(s, bi, c0, c1, h, out);
}

/// One position (a decode step) of sixteen-state channels, `c1 - c0` a multiple of 16, with
/// the state left in its `[channel, state]` rows: each channel's `a` and `h` are one vector,
/// so the decay and the state update run on rows as they lie in memory, and only the new
/// states go through a transpose, to sum `C · h` over the states in the lanes. The lane loop
/// below moves `a`, `h` in and `h` out through three transposes per sixteen channels for a
/// single position. Every value is formed by the same operations on the same operands as in
/// [`group_lanes`] (the transpose only moves data), so the bits are the same.
///
/// # Safety
/// As [`group`].
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn step_rows(s: &Scan, bi: usize, c0: usize, c1: usize, h: SyncPtr<f32>, out: SyncPtr<f32>) {
    let di = s.d_inner;
    let reset = s.resets.is_some_and(|r| r[bi]);
    let bt = _mm512_loadu_ps(s.b[bi * 16..(bi + 1) * 16].as_ptr());
    let ct = &s.c[bi * 16..(bi + 1) * 16];
    for cb in (c0..c1).step_by(16) {
        let i = bi * di + cb;
        let x = load(s.u, i, 16);
        let pre = _mm512_add_ps(load(s.delta, i, 16), load(s.delta_bias, cb, 16));
        let dt = softplus16(pre);
        let dtx = _mm512_mul_ps(dt, x);
        let (mut dts, mut dtxs) = ([0f32; 16], [0f32; 16]);
        _mm512_storeu_ps(dts.as_mut_ptr(), dt);
        _mm512_storeu_ps(dtxs.as_mut_ptr(), dtx);
        let hrows = h.slice_mut(i * 16, 256);
        let arows = &s.a[cb * 16..(cb + 16) * 16];
        let mut r = [_mm512_setzero_ps(); 16];
        for j in 0..16 {
            let hj = if reset {
                _mm512_setzero_ps()
            } else {
                _mm512_loadu_ps(hrows[16 * j..].as_ptr())
            };
            let aj = _mm512_loadu_ps(arows[16 * j..].as_ptr());
            let decay = exp_ps(_mm512_mul_ps(_mm512_set1_ps(dts[j]), aj));
            let hn = _mm512_fmadd_ps(decay, hj, _mm512_mul_ps(_mm512_set1_ps(dtxs[j]), bt));
            _mm512_storeu_ps(hrows[16 * j..].as_mut_ptr(), hn);
            r[j] = hn;
        }
        transpose16(&mut r);
        let mut acc = _mm512_setzero_ps();
        for n in 0..16 {
            acc = _mm512_fmadd_ps(_mm512_set1_ps(ct[n]), r[n], acc);
        }
        let y = _mm512_fmadd_ps(load(s.d, cb, 16), x, acc);
        let g = _mm512_mul_ps(y, silu16(load(s.z, i, 16)));
        _mm512_storeu_ps(out.slice_mut(i, 16).as_mut_ptr(), g);
    }
}

/// [`group`] with the channels in the lanes, for any number of positions.
///
/// # Safety
/// As [`group`].
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn group_lanes(
    s: &Scan,
    bi: usize,
    c0: usize,
    c1: usize,
    h: SyncPtr<f32>,
    out: SyncPtr<f32>,
) {
    let (di, ds, l) = (s.d_inner, s.d_state, s.seq_len);
    let nb = (c1 - c0).div_ceil(16);
    let width = |k: usize| (c1 - c0 - 16 * k).min(16);
    let lanes = nb * ds;
    assert!(lanes <= STACK_LANES16);
    // Left uninitialised beyond the group's `nb · ds` lanes (see the AVX2 loop).
    let mut hv_buf = [MaybeUninit::<__m512>::uninit(); STACK_LANES16];
    let mut av_buf = [MaybeUninit::<__m512>::uninit(); STACK_LANES16];
    for k in 0..nb {
        let cb = c0 + 16 * k;
        if width(k) == 16 && ds == 16 {
            // Sixteen whole channels of sixteen states: each channel's `a` and `h` are one
            // vector, and a transpose puts the channels in the lanes (a decode step's scan
            // spent most of its time on the element-wise way below).
            let a = rows_to_lanes(&s.a[cb * 16..(cb + 16) * 16]);
            let hh = rows_to_lanes(h.slice_mut((bi * di + cb) * 16, 256));
            for n in 0..16 {
                av_buf[k * 16 + n].write(a[n]);
                hv_buf[k * 16 + n].write(hh[n]);
            }
            continue;
        }
        for n in 0..ds {
            let mut a = [0f32; 16];
            let mut hh = [0f32; 16];
            for j in 0..width(k) {
                a[j] = s.a[(cb + j) * ds + n];
                hh[j] = h.read((bi * di + cb + j) * ds + n);
            }
            av_buf[k * ds + n].write(_mm512_loadu_ps(a.as_ptr()));
            hv_buf[k * ds + n].write(_mm512_loadu_ps(hh.as_ptr()));
        }
    }
    // SAFETY: the first `lanes` elements of both buffers were written just above.
    let hv = &mut *(std::ptr::addr_of_mut!(hv_buf[..lanes]) as *mut [__m512]);
    // SAFETY: as above.
    let av = &*(std::ptr::addr_of!(av_buf[..lanes]) as *const [__m512]);
    let resets = s.resets.map(|r| &r[bi * l..(bi + 1) * l]);
    for t in 0..l {
        if resets.is_some_and(|r| r[t]) {
            hv.iter_mut().for_each(|v| *v = _mm512_setzero_ps());
        }
        let row = bi * l + t;
        let bt = &s.b[row * ds..(row + 1) * ds];
        let ct = &s.c[row * ds..(row + 1) * ds];
        for k in 0..nb {
            let (cb, w) = (c0 + 16 * k, width(k));
            let i = row * di + cb;
            let x = load(s.u, i, w);
            let pre = _mm512_add_ps(load(s.delta, i, w), load(s.delta_bias, cb, w));
            let dt = softplus16(pre);
            let dtx = _mm512_mul_ps(dt, x);
            let (hk, ak) = (&mut hv[k * ds..(k + 1) * ds], &av[k * ds..(k + 1) * ds]);
            let mut acc = _mm512_setzero_ps();
            for n in 0..ds {
                let decay = exp_ps(_mm512_mul_ps(dt, ak[n]));
                let hn = _mm512_fmadd_ps(decay, hk[n], _mm512_mul_ps(dtx, _mm512_set1_ps(bt[n])));
                hk[n] = hn;
                acc = _mm512_fmadd_ps(_mm512_set1_ps(ct[n]), hn, acc);
            }
            let y = _mm512_fmadd_ps(load(s.d, cb, w), x, acc);
            let g = _mm512_mul_ps(y, silu16(load(s.z, i, w)));
            _mm512_mask_storeu_ps(
                out.slice_mut(i, w).as_mut_ptr(),
                ((1u32 << w) - 1) as u16,
                g,
            );
        }
    }
    for k in 0..nb {
        let cb = c0 + 16 * k;
        if width(k) == 16 && ds == 16 {
            let mut r = [_mm512_setzero_ps(); 16];
            r.copy_from_slice(&hv[k * 16..(k + 1) * 16]);
            lanes_to_rows(r, h.slice_mut((bi * di + cb) * 16, 256));
            continue;
        }
        for n in 0..ds {
            let mut a = [0f32; 16];
            _mm512_storeu_ps(a.as_mut_ptr(), hv[k * ds + n]);
            for (j, &val) in a.iter().enumerate().take(width(k)) {
                h.write((bi * di + cb + j) * ds + n, val);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{selective_scan_fwd, Scan};
    use crate::kernels::Isa;
    use crate::test_rng::vals;

    #[test]
    fn transpose16_moves_row_j_lane_i_to_row_i_lane_j() {
        if !Isa::Avx512.supported() {
            println!("skipping: no AVX-512 on this CPU");
            return;
        }
        let m = vals(256, 11);
        let mut t = [0f32; 256];
        // SAFETY: AVX-512 F checked above.
        unsafe {
            use std::arch::x86_64::*;
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(m[16 * j..].as_ptr());
            }
            super::transpose16(&mut r);
            for (i, v) in r.iter().enumerate() {
                _mm512_storeu_ps(t[16 * i..].as_mut_ptr(), *v);
            }
        }
        for (i, j) in (0..16).flat_map(|i| (0..16).map(move |j| (i, j))) {
            assert_eq!(
                t[16 * i + j].to_bits(),
                m[16 * j + i].to_bits(),
                "({i}, {j})"
            );
        }
    }

    /// The 16-lane loop gives the AVX2 loop's bits, with partial vectors (d_inner 70),
    /// resets, an initial state and two batch rows.
    #[test]
    fn avx512_scan_equals_the_avx2_scan_bit_for_bit() {
        avx512_equals_avx2(2, 9);
    }

    /// A decode step (one position: the row-layout loop for whole blocks of sixteen channels,
    /// the lane loop for the last six) gives the AVX2 loop's bits, for three sequences, one of
    /// them reset.
    #[test]
    fn avx512_decode_step_equals_the_avx2_scan_bit_for_bit() {
        avx512_equals_avx2(3, 1);
    }

    fn avx512_equals_avx2(b: usize, l: usize) {
        if !Isa::Avx512.supported() {
            println!("skipping: no AVX-512 on this CPU");
            return;
        }
        let (di, ds) = (70, 16);
        let a: Vec<f32> = vals(di * ds, 1).iter().map(|v| -(v.abs() + 0.2)).collect();
        let resets: Vec<bool> = (0..b * l).map(|i| i % 5 == 1).collect();
        let (u, delta, z) = (
            vals(b * l * di, 2),
            vals(b * l * di, 3),
            vals(b * l * di, 4),
        );
        let (bm, cm) = (vals(b * l * ds, 5), vals(b * l * ds, 6));
        let (d, bias) = (vals(di, 7), vals(di, 8));
        let s = Scan {
            u: &u,
            delta: &delta,
            a: &a,
            b: &bm,
            c: &cm,
            d: &d,
            z: &z,
            delta_bias: &bias,
            resets: Some(&resets),
            batch: b,
            seq_len: l,
            d_inner: di,
            d_state: ds,
        };
        let h0 = vals(b * di * ds, 9);
        let run = |isa| {
            let (mut h, mut out) = (h0.clone(), vec![f32::NAN; b * l * di]);
            selective_scan_fwd(isa, &s, &mut h, &mut out);
            (h, out)
        };
        let (h2, o2) = run(Isa::Avx2Fma);
        let (h5, o5) = run(Isa::Avx512);
        assert!(o2.iter().all(|v| v.is_finite()) && o2.iter().any(|&v| v != 0.0));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&o5), bits(&o2), "outputs");
        assert_eq!(bits(&h5), bits(&h2), "final states");
    }
}
