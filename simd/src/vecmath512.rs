//! `softplus8` and `silu8` of [`crate::vecmath`] on sixteen lanes (AVX-512 F), with the same
//! bits: the same operations in the same order as `wide`'s `f32x8::exp` and `f32x8::ln` as
//! this build compiles them (fused multiply-adds and the rounding instruction only where
//! `wide` itself uses them, decided by the same compile-time target features).
//!
//! The scan runs softplus on every (channel, position) and SiLU on the gate; through `wide` on
//! a build without `-C target-cpu` they took 7 % of a batched 1.4B decode step on two 8-lane
//! halves of SSE2 code. `tests::the_16_lane_functions_give_wides_bits` holds the two to the same
//! bits over random and special inputs (a NaN to NaN, whatever its payload).

#![allow(clippy::excessive_precision)] // `wide`'s constants, written as it writes them

use std::arch::x86_64::*;

use crate::vecmath::SOFTPLUS_THRESHOLD;

/// `wide`'s `mul_add` (`a · b + c`): fused only where `wide` fuses it.
#[inline(always)]
unsafe fn mul_add(a: __m512, b: __m512, c: __m512) -> __m512 {
    if cfg!(all(target_feature = "avx", target_feature = "fma")) {
        _mm512_fmadd_ps(a, b, c)
    } else {
        _mm512_add_ps(_mm512_mul_ps(a, b), c)
    }
}

/// `wide`'s `mul_neg_add` (`c − a · b`).
#[inline(always)]
unsafe fn mul_neg_add(a: __m512, b: __m512, c: __m512) -> __m512 {
    if cfg!(all(target_feature = "avx", target_feature = "fma")) {
        _mm512_fnmadd_ps(a, b, c)
    } else {
        _mm512_sub_ps(c, _mm512_mul_ps(a, b))
    }
}

#[inline(always)]
unsafe fn splat(v: f32) -> __m512 {
    _mm512_set1_ps(v)
}

/// `wide`'s `round_ties_even`: the rounding instruction with SSE4.1, else SSE2's conversion to
/// int32 and back, which keeps the input where the conversion overflows.
#[inline(always)]
unsafe fn round_ties_even(x: __m512) -> __m512 {
    if cfg!(target_feature = "sse4.1") {
        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x)
    } else {
        let i = _mm512_cvtps_epi32(x);
        let over = _mm512_cmpeq_epi32_mask(i, _mm512_set1_epi32(i32::MIN));
        _mm512_mask_blend_ps(over, _mm512_cvtepi32_ps(i), x)
    }
}

/// Lanes whose exponent is not all ones.
#[inline(always)]
unsafe fn is_finite(x: __m512) -> __mmask16 {
    let m = _mm512_set1_epi32(0xFF00_0000u32 as i32);
    let s = _mm512_and_si512(_mm512_slli_epi32::<1>(_mm512_castps_si512(x)), m);
    !_mm512_cmpeq_epi32_mask(s, m)
}

#[inline(always)]
unsafe fn is_sign_negative(x: __m512) -> __mmask16 {
    let sign = _mm512_set1_epi32(i32::MIN);
    _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x), sign), sign)
}

#[inline(always)]
unsafe fn bits(b: u32) -> __m512 {
    _mm512_castsi512_ps(_mm512_set1_epi32(b as i32))
}

/// `wide`'s `vm_pow2n`: 2^n for integral `n`, subnormal results below 2^−126.
#[inline(always)]
unsafe fn pow2n(n: __m512) -> __m512 {
    let a = _mm512_add_ps(n, splat(127.0 + 8388608.0));
    let normal = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(a)));
    let sub = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(n, splat(-126.0));
    if sub == 0 {
        return normal;
    }
    let valid = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(n, splat(-149.0));
    let shift = _mm512_cvttps_epi32(_mm512_add_ps(n, splat(149.0)));
    let shift = _mm512_maskz_mov_epi32(valid, shift);
    let mant = _mm512_castsi512_ps(_mm512_sllv_epi32(_mm512_set1_epi32(1), shift));
    let mant = _mm512_maskz_mov_ps(valid, mant);
    _mm512_mask_blend_ps(sub, normal, mant)
}

/// `e^x` as `wide::f32x8::exp`.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    let (p0, p1, p2, p3, p4, p5) = (
        splat(1.0 / 2.0),
        splat(1.0 / 6.0),
        splat(1.0 / 24.0),
        splat(1.0 / 120.0),
        splat(1.0 / 720.0),
        splat(1.0 / 5040.0),
    );
    let finite = is_finite(x);
    let neg_underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, splat(-103.63)) & finite;
    if neg_underflow == 0xFFFF {
        return _mm512_setzero_ps();
    }
    let max_r = splat(127.0);
    let r = round_ties_even(_mm512_mul_ps(x, splat(std::f32::consts::LOG2_E)));
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(r, max_r);
    let r_safe = _mm512_mask_blend_ps(big, r, max_r);
    let excess = _mm512_maskz_mov_ps(big, _mm512_sub_ps(r, max_r));
    let scale = pow2n(excess);
    let y = mul_neg_add(r, splat(0.693359375), x);
    let y = mul_neg_add(r, splat(-2.12194440e-4), y);
    // polynomial_5: (p3 y + p2) y² + ((p5 y + p4) y⁴ + (p1 y + p0)).
    let y2 = _mm512_mul_ps(y, y);
    let y4 = _mm512_mul_ps(y2, y2);
    let z = mul_add(
        mul_add(p3, y, p2),
        y2,
        mul_add(mul_add(p5, y, p4), y4, mul_add(p1, y, p0)),
    );
    let z = mul_add(z, _mm512_mul_ps(y, y), y);
    let n2 = pow2n(r_safe);
    let z = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(z, splat(1.0)), scale), n2);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    let inf = bits(0x7F80_0000);
    let mut res = _mm512_mask_blend_ps(nan, z, bits(0x7FC0_0101));
    let pos_overflow = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, splat(88.723)) & finite;
    res = _mm512_mask_blend_ps(pos_overflow, res, inf);
    res = _mm512_mask_blend_ps(neg_underflow, res, _mm512_setzero_ps());
    let neg = is_sign_negative(x);
    res = _mm512_mask_blend_ps(!finite & !neg & !nan, res, inf);
    _mm512_mask_blend_ps(!finite & neg & !nan, res, _mm512_setzero_ps())
}

/// `ln x` as `wide::f32x8::ln`.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn ln16(x1: __m512) -> __m512 {
    let half = splat(0.5);
    let p = [
        3.3333331174E-1f32,
        -2.4999993993E-1,
        2.0000714765E-1,
        -1.6668057665E-1,
        1.4249322787E-1,
        -1.2420140846E-1,
        1.1676998740E-1,
        -1.1514610310E-1,
        7.0376836292E-2,
    ]
    .map(|c| splat(c));
    let u = _mm512_castps_si512(x1);
    // fraction_2: the mantissa with the exponent of 0.5.
    let x = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(u, _mm512_set1_epi32(0x007F_FFFF)),
        _mm512_set1_epi32(0x3F00_0000),
    ));
    // exponent: the bits above the mantissa (sign included, as `wide` shifts them) as a float.
    let b = _mm512_or_si512(
        _mm512_srli_epi32::<23>(u),
        _mm512_set1_epi32(8388608.0f32.to_bits() as i32),
    );
    let e = _mm512_sub_ps(_mm512_castsi512_ps(b), splat(8388608.0 + 127.0));
    let mask =
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_mul_ps(splat(std::f32::consts::SQRT_2), half));
    let x = _mm512_mask_blend_ps(mask, _mm512_add_ps(x, x), x);
    let fe = _mm512_mask_blend_ps(mask, e, _mm512_add_ps(e, splat(1.0)));
    let x = _mm512_sub_ps(x, splat(1.0));
    // polynomial_8.
    let x2 = _mm512_mul_ps(x, x);
    let x4 = _mm512_mul_ps(x2, x2);
    let x8 = _mm512_mul_ps(x4, x4);
    let res = mul_add(
        x4,
        mul_add(x2, mul_add(p[7], x, p[6]), mul_add(x, p[5], p[4])),
        mul_add(
            x8,
            p[8],
            mul_add(x2, mul_add(x, p[3], p[2]), mul_add(x, p[1], p[0])),
        ),
    );
    let x2 = _mm512_mul_ps(x, x);
    let res = _mm512_mul_ps(_mm512_mul_ps(x2, x), res);
    let res = mul_add(fe, splat(-2.12194440e-4), res);
    let res = _mm512_add_ps(res, mul_neg_add(x2, half, x));
    let res = mul_add(fe, splat(0.693359375), res);
    let overflow = !is_finite(x1);
    let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x1, splat(1.17549435E-38));
    if overflow | underflow == 0 {
        return res;
    }
    let zero_or_sub = _mm512_cmpeq_epi32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7F80_0000)),
        _mm512_setzero_si512(),
    );
    let nan_log = bits(0x7FC0_0101);
    let res = _mm512_mask_blend_ps(underflow, res, nan_log);
    let res = _mm512_mask_blend_ps(zero_or_sub, res, bits(0xFF80_0000));
    let res = _mm512_mask_blend_ps(overflow, res, x1);
    _mm512_mask_blend_ps(overflow & is_sign_negative(x1), res, nan_log)
}

/// `vecmath::softplus8` on sixteen lanes.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softplus16(v: __m512) -> __m512 {
    let t = splat(SOFTPLUS_THRESHOLD);
    // `wide`'s min: the threshold where `v` is NaN (`minps` returns its second operand).
    let e = exp16(_mm512_min_ps(v, t));
    let one = splat(1.0);
    let u = _mm512_add_ps(one, e);
    let d = _mm512_sub_ps(u, one);
    let zero = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(d, _mm512_setzero_ps());
    let r = _mm512_mask_blend_ps(zero, _mm512_mul_ps(ln16(u), _mm512_div_ps(e, d)), e);
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, t), r, v)
}

/// `vecmath::silu8` on sixteen lanes: `x / (1 + e^−x)` as `x · (1 / (1 + e^−x))`.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn silu16(x: __m512) -> __m512 {
    let neg = _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(x),
        _mm512_set1_epi32(i32::MIN),
    ));
    let one = splat(1.0);
    _mm512_mul_ps(x, _mm512_div_ps(one, _mm512_add_ps(one, exp16(neg))))
}

/// `out ← silu(x)` over slices of the same length, sixteen lanes at a time (the last ones
/// masked).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn silu_into(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "silu_into: lengths differ");
    let mut i = 0;
    while i < x.len() {
        let n = (x.len() - i).min(16);
        let m = ((1u32 << n) - 1) as __mmask16;
        let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, silu16(v));
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vecmath::{silu8, softplus8};
    use wide::f32x8;

    /// Both functions through `wide` on two 8-lane halves, as the scan called them.
    fn wide16(v: &[f32; 16], f: fn(f32x8) -> f32x8) -> [f32; 16] {
        let lo = f(f32x8::from(<[f32; 8]>::try_from(&v[..8]).unwrap())).to_array();
        let hi = f(f32x8::from(<[f32; 8]>::try_from(&v[8..]).unwrap())).to_array();
        let mut o = [0f32; 16];
        o[..8].copy_from_slice(&lo);
        o[8..].copy_from_slice(&hi);
        o
    }

    fn ours16(v: &[f32; 16], f: unsafe fn(__m512) -> __m512) -> [f32; 16] {
        let mut o = [0f32; 16];
        // SAFETY: called only where AVX-512 F was detected.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), f(_mm512_loadu_ps(v.as_ptr()))) };
        o
    }

    #[test]
    fn silu_into_gives_wides_bits_at_every_length() {
        if !is_x86_feature_detected!("avx512f") {
            println!("skipping: no AVX-512 F on this CPU");
            return;
        }
        let x: Vec<f32> = (0..53).map(|i| (i as f32 * 0.731).sin() * 9.0).collect();
        for len in [0usize, 1, 7, 15, 16, 17, 31, 33, 53] {
            let mut got = vec![f32::NAN; len];
            // SAFETY: AVX-512 F was detected above.
            unsafe { silu_into(&x[..len], &mut got) };
            for (i, g) in got.iter().enumerate() {
                let want = silu8(f32x8::splat(x[i])).to_array()[0];
                assert_eq!(g.to_bits(), want.to_bits(), "len {len}, element {i}");
            }
        }
    }

    #[test]
    fn the_16_lane_functions_give_wides_bits() {
        if !is_x86_feature_detected!("avx512f") {
            println!("skipping: no AVX-512 F on this CPU");
            return;
        }
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            20.0,
            20.000002,
            19.999998,
            -87.0,
            -88.7,
            -95.0,
            -103.0,
            -103.63,
            -104.0,
            -149.0,
            -150.0,
            88.72,
            88.73,
            89.0,
            1e-40,
            -1e-40,
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            0.5,
        ];
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut inputs: Vec<f32> = specials.to_vec();
        for i in 0..200_000 {
            let r = next();
            inputs.push(match i % 4 {
                // The range the scan sees, and far beyond it.
                0 => ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 60.0,
                1 => ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 400.0,
                2 => ((r >> 40) as f32 / (1u64 << 24) as f32) * 1e-3,
                _ => f32::from_bits(r as u32),
            });
        }
        inputs.resize(inputs.len().div_ceil(16) * 16, 0.25);
        for c in inputs.chunks_exact(16) {
            let v: [f32; 16] = c.try_into().unwrap();
            for (name, want, got) in [
                ("softplus", wide16(&v, softplus8), ours16(&v, softplus16)),
                ("silu", wide16(&v, silu8), ours16(&v, silu16)),
                ("exp", wide16(&v, |x| x.exp()), ours16(&v, exp16)),
                ("ln", wide16(&v, |x| x.ln()), ours16(&v, ln16)),
            ] {
                for l in 0..16 {
                    if want[l].is_nan() {
                        // A NaN's payload follows the compiler's operand order; NaN it must be.
                        assert!(got[l].is_nan(), "{name}({:e}): {:e}, not NaN", v[l], got[l]);
                        continue;
                    }
                    assert_eq!(
                        got[l].to_bits(),
                        want[l].to_bits(),
                        "{name}({:e} = {:#x}): {:e} ({:#x}) where wide gives {:e} ({:#x})",
                        v[l],
                        v[l].to_bits(),
                        got[l],
                        got[l].to_bits(),
                        want[l],
                        want[l].to_bits()
                    );
                }
            }
        }
    }
}
