//! The selective scan, vectorised across channels: eight channels of one row advance together,
//! each lane holding its own `h[n]` for every state index, so `y = Σ_n C[n]·h[n]` needs no
//! horizontal sums and `B[t, n]`, `C[t, n]` are broadcasts. A task owns a group of up to 64
//! channels of one batch row and walks the sequence once, updating every 8-channel block of
//! its group at each position: each row of `u`, `delta`, `z` and `out` is then read in whole
//! cache lines, and the group's state (≤ 16 KiB) stays in L1. Groups run in parallel on the
//! thread pool. Same maths as `reference::ops::selective_scan` (dt bias + softplus, D skip,
//! z gate, per-position resets, initial state).

use wide::f32x8;

use super::Scan;
use crate::kernels::Isa;
use crate::vecmath::{load, silu8, softplus8};
use crate::SyncPtr;

/// State vectors (8 lanes each) a task keeps on the stack: 16 KiB.
const STACK_LANES: usize = 512;
/// 8-channel blocks per task at most.
const GROUP_BLOCKS: usize = 8;

/// Blocks per group for `d_state`: as many as fit the stack budget, at least one.
fn group_blocks(d_state: usize) -> usize {
    (STACK_LANES / d_state.max(1)).clamp(1, GROUP_BLOCKS)
}

/// Runs the scan. `h` `[batch, d_inner, d_state]` holds the initial state on entry (zeros for
/// none) and the final state on return; `out` `[batch, seq_len, d_inner]` receives the gated
/// output.
/// `isa` picks the AVX-512 lanes (16 channels), the AVX2 lanes or the portable `wide` lanes.
pub fn selective_scan_fwd(isa: Isa, s: &Scan, h: &mut [f32], out: &mut [f32]) {
    assert_eq!(
        h.len(),
        s.batch * s.d_inner * s.d_state,
        "scan state length"
    );
    assert_eq!(
        out.len(),
        s.batch * s.seq_len * s.d_inner,
        "scan output length"
    );
    let hp = SyncPtr::new(h);
    let op = SyncPtr::new(out);
    let width = 8 * group_blocks(s.d_state);
    let groups = s.d_inner.div_ceil(width);
    // Task `i` touches only the channels `c0..c1` of batch row `i / groups`, in both `h` and
    // `out`: no two tasks share an element.
    let task = |i: usize| {
        let c0 = (i % groups) * width;
        let c1 = (c0 + width).min(s.d_inner);
        group(isa, s, i / groups, c0, c1, hp, op);
    };
    let work = s.batch * s.seq_len * s.d_inner * s.d_state;
    if work < 1 << 15 || crate::threads() == 1 {
        (0..s.batch * groups).for_each(task);
    } else {
        crate::par_for(s.batch * groups, task);
    }
}

fn group(isa: Isa, s: &Scan, bi: usize, c0: usize, c1: usize, h: SyncPtr<f32>, out: SyncPtr<f32>) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx512() && (c1 - c0).div_ceil(16) * s.d_state <= super::fwd512::STACK_LANES16 {
        // SAFETY: an AVX-512 `Isa` is only used on CPUs with AVX-512 F, AVX2 and FMA; the
        // group fits the stack lanes (checked); the pointer contract is the one stated in
        // `selective_scan_fwd`.
        unsafe { super::fwd512::group(s, bi, c0, c1, h, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() && s.d_state <= STACK_LANES {
        // SAFETY: Avx2Fma and Avx512 are only used on CPUs with AVX2 and FMA; `c1 - c0` holds at most
        // `group_blocks(d_state)` blocks; the pointer contract is the one stated in
        // `selective_scan_fwd`.
        unsafe { avx2::group(s, bi, c0, c1, h, out) };
        return;
    }
    let _ = isa;
    let lanes = s.d_state * (c1 - c0).div_ceil(8);
    if lanes <= STACK_LANES {
        let mut hv = [f32x8::ZERO; STACK_LANES];
        let mut av = [f32x8::ZERO; STACK_LANES];
        wide_group(s, bi, c0, c1, h, out, &mut hv[..lanes], &mut av[..lanes]);
    } else {
        let mut hv = vec![f32x8::ZERO; lanes];
        let mut av = vec![f32x8::ZERO; lanes];
        wide_group(s, bi, c0, c1, h, out, &mut hv, &mut av);
    }
}

/// Block `k` of a group covers channels `c0 + 8k ..`; its lane vectors are `hv[k·ds + n]`.
/// Lane `l` of a block is channel `c0 + 8k + l`.
#[allow(clippy::too_many_arguments)]
fn wide_group(
    s: &Scan,
    bi: usize,
    c0: usize,
    c1: usize,
    h: SyncPtr<f32>,
    out: SyncPtr<f32>,
    hv: &mut [f32x8],
    av: &mut [f32x8],
) {
    let (di, ds, l) = (s.d_inner, s.d_state, s.seq_len);
    let nb = (c1 - c0).div_ceil(8);
    let width = |k: usize| (c1 - c0 - 8 * k).min(8);
    for k in 0..nb {
        let cb = c0 + 8 * k;
        for n in 0..ds {
            let mut a = [0f32; 8];
            let mut hh = [0f32; 8];
            for j in 0..width(k) {
                a[j] = s.a[(cb + j) * ds + n];
                // SAFETY: in bounds (asserted lengths) and owned by this task.
                hh[j] = unsafe { h.read((bi * di + cb + j) * ds + n) };
            }
            av[k * ds + n] = f32x8::from(a);
            hv[k * ds + n] = f32x8::from(hh);
        }
    }
    let resets = s.resets.map(|r| &r[bi * l..(bi + 1) * l]);
    for t in 0..l {
        if resets.is_some_and(|r| r[t]) {
            hv.iter_mut().for_each(|v| *v = f32x8::ZERO);
        }
        let row = bi * l + t;
        let bt = &s.b[row * ds..(row + 1) * ds];
        let ct = &s.c[row * ds..(row + 1) * ds];
        for k in 0..nb {
            let (cb, w) = (c0 + 8 * k, width(k));
            let i = row * di + cb;
            let x = load(s.u, i, w);
            let dt = softplus8(load(s.delta, i, w) + load(s.delta_bias, cb, w));
            let dtx = dt * x;
            let mut acc = f32x8::ZERO;
            for n in 0..ds {
                let decay = (dt * av[k * ds + n]).exp();
                let hn = decay * hv[k * ds + n] + dtx * f32x8::splat(bt[n]);
                hv[k * ds + n] = hn;
                acc += f32x8::splat(ct[n]) * hn;
            }
            let y = acc + load(s.d, cb, w) * x;
            let g = (y * silu8(load(s.z, i, w))).to_array();
            // SAFETY: `i..i + w` is in bounds and these channels belong to this task.
            unsafe { out.write_slice(i, &g[..w]) };
        }
    }
    for k in 0..nb {
        let cb = c0 + 8 * k;
        for n in 0..ds {
            let a = hv[k * ds + n].to_array();
            for (j, &val) in a.iter().enumerate().take(width(k)) {
                // SAFETY: as above.
                unsafe { h.write((bi * di + cb + j) * ds + n, val) };
            }
        }
    }
}

/// The same lanes with AVX2 + FMA intrinsics and an exp specialised for the scan (no NaN or
/// infinity handling; arguments clamped to [−87, 88]), chosen at run time.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // lanes indexed by state, as in the maths
mod avx2 {
    use super::{Scan, STACK_LANES};
    use crate::vecmath::{silu8, softplus8};
    use crate::SyncPtr;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;
    use wide::f32x8;

    /// `e^x` to about 1 ulp on [−87, 88]: x = n·ln2 + r, |r| ≤ ln2/2, degree-6 polynomial.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn exp_ps(x: __m256) -> __m256 {
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.0)),
            _mm256_set1_ps(-87.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load(s: &[f32], i: usize, n: usize) -> __m256 {
        if n == 8 {
            _mm256_loadu_ps(s[i..i + 8].as_ptr())
        } else {
            let mut a = [0f32; 8];
            a[..n].copy_from_slice(&s[i..i + n]);
            _mm256_loadu_ps(a.as_ptr())
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn to_wide(v: __m256) -> f32x8 {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        f32x8::from(a)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn from_wide(v: f32x8) -> __m256 {
        _mm256_loadu_ps(v.to_array().as_ptr())
    }

    /// The group loop of `wide_group` on 256-bit registers.
    ///
    /// # Safety
    /// AVX2 and FMA present; `c1 - c0` spans at most `group_blocks(d_state)` blocks; `h` and
    /// `out` as in `selective_scan_fwd`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn group(
        s: &Scan,
        bi: usize,
        c0: usize,
        c1: usize,
        h: SyncPtr<f32>,
        out: SyncPtr<f32>,
    ) {
        let (di, ds, l) = (s.d_inner, s.d_state, s.seq_len);
        let nb = (c1 - c0).div_ceil(8);
        let width = |k: usize| (c1 - c0 - 8 * k).min(8);
        // Left uninitialised beyond the group's `nb · ds` lanes: zeroing all 2 × 16 KiB cost a
        // decode step of the 130M shape 18 MB of memset (576 groups per token).
        let lanes = nb * ds;
        debug_assert!(lanes <= STACK_LANES);
        let mut hv_buf = [MaybeUninit::<__m256>::uninit(); STACK_LANES];
        let mut av_buf = [MaybeUninit::<__m256>::uninit(); STACK_LANES];
        for k in 0..nb {
            let cb = c0 + 8 * k;
            for n in 0..ds {
                let mut a = [0f32; 8];
                let mut hh = [0f32; 8];
                for j in 0..width(k) {
                    a[j] = s.a[(cb + j) * ds + n];
                    hh[j] = h.read((bi * di + cb + j) * ds + n);
                }
                av_buf[k * ds + n].write(_mm256_loadu_ps(a.as_ptr()));
                hv_buf[k * ds + n].write(_mm256_loadu_ps(hh.as_ptr()));
            }
        }
        // SAFETY: the first `lanes` elements of both buffers were written just above.
        let hv = &mut *(std::ptr::addr_of_mut!(hv_buf[..lanes]) as *mut [__m256]);
        // SAFETY: as above.
        let av = &*(std::ptr::addr_of!(av_buf[..lanes]) as *const [__m256]);
        let resets = s.resets.map(|r| &r[bi * l..(bi + 1) * l]);
        for t in 0..l {
            if resets.is_some_and(|r| r[t]) {
                hv.iter_mut().for_each(|v| *v = _mm256_setzero_ps());
            }
            let row = bi * l + t;
            let bt = &s.b[row * ds..(row + 1) * ds];
            let ct = &s.c[row * ds..(row + 1) * ds];
            for k in 0..nb {
                let (cb, w) = (c0 + 8 * k, width(k));
                let i = row * di + cb;
                let x = load(s.u, i, w);
                let pre = _mm256_add_ps(load(s.delta, i, w), load(s.delta_bias, cb, w));
                let dt = from_wide(softplus8(to_wide(pre)));
                let dtx = _mm256_mul_ps(dt, x);
                let (hk, ak) = (&mut hv[k * ds..(k + 1) * ds], &av[k * ds..(k + 1) * ds]);
                let mut acc = _mm256_setzero_ps();
                for n in 0..ds {
                    let decay = exp_ps(_mm256_mul_ps(dt, ak[n]));
                    let hn =
                        _mm256_fmadd_ps(decay, hk[n], _mm256_mul_ps(dtx, _mm256_set1_ps(bt[n])));
                    hk[n] = hn;
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(ct[n]), hn, acc);
                }
                let y = _mm256_fmadd_ps(load(s.d, cb, w), x, acc);
                let g = _mm256_mul_ps(y, from_wide(silu8(to_wide(load(s.z, i, w)))));
                let mut ga = [0f32; 8];
                _mm256_storeu_ps(ga.as_mut_ptr(), g);
                out.write_slice(i, &ga[..w]);
            }
        }
        for k in 0..nb {
            let cb = c0 + 8 * k;
            for n in 0..ds {
                let mut a = [0f32; 8];
                _mm256_storeu_ps(a.as_mut_ptr(), hv[k * ds + n]);
                for (j, &val) in a.iter().enumerate().take(width(k)) {
                    h.write((bi * di + cb + j) * ds + n, val);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn exp_is_within_two_ulp_on_the_scan_range() {
            if !crate::kernels::Isa::detect().has_avx2() {
                return;
            }
            let mut worst = 0f64;
            let mut x = -80.0f32;
            while x < 80.0 {
                let v = unsafe {
                    let r = super::exp_ps(std::arch::x86_64::_mm256_set1_ps(x));
                    std::arch::x86_64::_mm256_cvtss_f32(r)
                };
                let want = (x as f64).exp();
                worst = worst.max((v as f64 - want).abs() / want);
                x += 0.00731;
            }
            assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        }
    }
}
