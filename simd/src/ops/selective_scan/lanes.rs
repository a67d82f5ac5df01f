//! Eight f32 lanes for the scan's innermost loops, at two widths: `wide::f32x8` (SSE pairs in
//! a baseline x86-64 build, NEON on aarch64) and [`Avx8`], one 256-bit AVX register, used only
//! inside functions compiled for AVX2 after the CPU was seen to have it.

use std::ops::{Add, AddAssign, Mul, Sub};

use wide::f32x8;

/// What the scan needs of a vector of eight f32 lanes. No operation fuses a multiply-add.
pub(crate) trait Lanes:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + AddAssign
{
    fn zero() -> Self;
    fn splat(v: f32) -> Self;
    fn exp(self) -> Self;
    fn from_wide(v: f32x8) -> Self;
    fn to_wide(self) -> f32x8;
    fn to_array(self) -> [f32; 8];
}

impl Lanes for f32x8 {
    #[inline(always)]
    fn zero() -> Self {
        f32x8::ZERO
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        f32x8::splat(v)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32x8::exp(self)
    }
    #[inline(always)]
    fn from_wide(v: f32x8) -> Self {
        v
    }
    #[inline(always)]
    fn to_wide(self) -> f32x8 {
        self
    }
    #[inline(always)]
    fn to_array(self) -> [f32; 8] {
        f32x8::to_array(self)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx::Avx8;

#[cfg(target_arch = "x86_64")]
mod avx {
    //! Every function here runs AVX / AVX2 instructions. An `Avx8` is only ever created inside
    //! `scan::chunk_bwd_avx2`, which runs only after `is_x86_feature_detected!("avx2")`; that
    //! is what makes each `unsafe` block below sound.

    use std::arch::x86_64::*;
    use std::ops::{Add, AddAssign, Mul, Sub};

    use wide::f32x8;

    use super::Lanes;

    #[derive(Clone, Copy)]
    pub(crate) struct Avx8(__m256);

    impl Lanes for Avx8 {
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: AVX is present (module docs).
            Avx8(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            // SAFETY: AVX is present (module docs).
            Avx8(unsafe { _mm256_set1_ps(v) })
        }
        /// Cody–Waite reduction by ln 2 and Cephes' degree-5 polynomial, within 2 ulp of libm's
        /// `expf`; lanes below −87 give 0, lanes above 88 give `exp(88)`.
        #[inline(always)]
        fn exp(self) -> Self {
            const LN2_HI: f32 = 0.693_359_4;
            const LN2_LO: f32 = -2.121_944_4e-4;
            // 1.5 · 2²³: adding it rounds to an integer that then sits in the low mantissa bits.
            const ROUND: f32 = 12_582_912.0;
            const P: [f32; 6] = [
                1.987_569_1e-4,
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ];
            // SAFETY: AVX2 is present (module docs).
            unsafe {
                let x = self.0;
                let xc = _mm256_min_ps(
                    _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
                    _mm256_set1_ps(88.0),
                );
                let k = _mm256_add_ps(
                    _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                    _mm256_set1_ps(ROUND),
                );
                let n = _mm256_sub_ps(k, _mm256_set1_ps(ROUND));
                let r = _mm256_sub_ps(
                    _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
                    _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
                );
                let mut p = _mm256_set1_ps(P[0]);
                for &c in &P[1..] {
                    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
                }
                let e = _mm256_add_ps(
                    _mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r),
                    _mm256_set1_ps(1.0),
                );
                let bias = _mm256_set1_epi32((ROUND.to_bits() - 127) as i32);
                let scale = _mm256_slli_epi32::<23>(_mm256_sub_epi32(_mm256_castps_si256(k), bias));
                let y = _mm256_mul_ps(e, _mm256_castsi256_ps(scale));
                let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
                Avx8(_mm256_andnot_ps(under, y))
            }
        }
        #[inline(always)]
        fn from_wide(v: f32x8) -> Self {
            let a = v.to_array();
            // SAFETY: AVX is present (module docs); `a` holds 8 f32.
            Avx8(unsafe { _mm256_loadu_ps(a.as_ptr()) })
        }
        #[inline(always)]
        fn to_wide(self) -> f32x8 {
            f32x8::from(self.to_array())
        }
        #[inline(always)]
        fn to_array(self) -> [f32; 8] {
            let mut a = [0f32; 8];
            // SAFETY: AVX is present (module docs); `a` has room for 8 f32.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), self.0) };
            a
        }
    }

    macro_rules! binop {
        ($tr:ident, $f:ident, $intr:ident) => {
            impl $tr for Avx8 {
                type Output = Avx8;
                #[inline(always)]
                fn $f(self, o: Avx8) -> Avx8 {
                    // SAFETY: AVX is present (module docs).
                    Avx8(unsafe { $intr(self.0, o.0) })
                }
            }
        };
    }
    binop!(Add, add, _mm256_add_ps);
    binop!(Sub, sub, _mm256_sub_ps);
    binop!(Mul, mul, _mm256_mul_ps);

    impl AddAssign for Avx8 {
        #[inline(always)]
        fn add_assign(&mut self, o: Avx8) {
            *self = *self + o;
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[target_feature(enable = "avx2")]
        fn exp_lanes(xs: [f32; 8]) -> [f32; 8] {
            Avx8::from_wide(f32x8::from(xs)).exp().to_array()
        }

        /// Worst error of `Avx8::exp` against libm's `expf` in ulp over [−87, 20] (the scan's
        /// `dt · A`), and its edges.
        #[test]
        fn exp_is_within_two_ulp_of_libm() {
            if !std::is_x86_feature_detected!("avx2") {
                return;
            }
            let mut worst = 0i64;
            let mut x = -87.0f32;
            while x < 20.0 {
                let xs: [f32; 8] = std::array::from_fn(|l| x + l as f32 * 1e-3);
                // SAFETY: AVX2 was detected above.
                let got = unsafe { exp_lanes(xs) };
                for l in 0..8 {
                    let want = libm::expf(xs[l]);
                    worst = worst.max((got[l].to_bits() as i64 - want.to_bits() as i64).abs());
                }
                x += 0.0173;
            }
            assert!(worst <= 2, "worst error {worst} ulp");
            // SAFETY: as above.
            unsafe {
                assert_eq!(exp_lanes([-100.0; 8]), [0.0; 8]);
                assert_eq!(exp_lanes([0.0; 8]), [1.0; 8]);
            }
        }
    }
}
