//! Eight-lane f32 math with `wide`: exp, softplus, sigmoid, SiLU, and partial loads/stores.
//!
//! `wide` picks its instructions when the crate is built (SSE2 pairs on a baseline x86-64
//! build, AVX with `-C target-cpu=native`, NEON on aarch64); the scan and the activations that
//! use it are a small share of the work next to the matrix products, whose kernels choose
//! their instruction set at run time (see `kernels`).

use wide::f32x8;

/// Lanes of one vector.
pub const LANES: usize = 8;

/// Threshold above which softplus is the identity (PyTorch, mamba_ssm, `reference`).
pub(crate) const SOFTPLUS_THRESHOLD: f32 = 20.0;

#[inline(always)]
pub fn exp8(x: f32x8) -> f32x8 {
    x.exp()
}

/// `1 / (1 + exp(-x))`.
#[inline(always)]
pub fn sigmoid8(x: f32x8) -> f32x8 {
    f32x8::ONE / (f32x8::ONE + (-x).exp())
}

#[inline(always)]
pub fn silu8(x: f32x8) -> f32x8 {
    x * sigmoid8(x)
}

/// `v` above 20, else `log1p(exp(v))`. `log1p(e)` is computed as `ln(u) · e / (u − 1)` with
/// `u = 1 + e` (Goldberg's trick), which cancels the rounding of `1 + e`, so very negative
/// inputs keep their relative precision.
#[inline(always)]
pub fn softplus8(v: f32x8) -> f32x8 {
    let e = v.min(f32x8::splat(SOFTPLUS_THRESHOLD)).exp();
    let u = f32x8::ONE + e;
    let d = u - f32x8::ONE;
    let r = d.simd_eq(f32x8::ZERO).select(e, u.ln() * (e / d));
    v.simd_gt(f32x8::splat(SOFTPLUS_THRESHOLD)).select(v, r)
}

/// d softplus / dv: 1 above 20, else sigmoid(v).
#[inline(always)]
pub fn softplus_grad8(v: f32x8) -> f32x8 {
    let t = f32x8::splat(SOFTPLUS_THRESHOLD);
    v.simd_gt(t).select(f32x8::ONE, sigmoid8(v))
}

/// `(silu(z), silu'(z))` with `s = sigmoid(z)`: `z · s` and `s · (1 + z · (1 − s))`.
#[inline(always)]
pub fn silu_and_grad8(z: f32x8) -> (f32x8, f32x8) {
    let s = sigmoid8(z);
    (z * s, s * (f32x8::ONE + z * (f32x8::ONE - s)))
}

/// Loads `n ≤ 8` values from `s[i..]`, zero-padding the rest.
#[inline(always)]
pub fn load(s: &[f32], i: usize, n: usize) -> f32x8 {
    if n == 8 {
        let a: [f32; 8] = s[i..i + 8].try_into().unwrap_or([0.0; 8]);
        f32x8::from(a)
    } else {
        let mut a = [0f32; 8];
        a[..n].copy_from_slice(&s[i..i + n]);
        f32x8::from(a)
    }
}

/// Stores the first `n ≤ 8` lanes of `v` to `s[i..]`.
#[inline(always)]
pub fn store(v: f32x8, s: &mut [f32], i: usize, n: usize) {
    let a = v.to_array();
    s[i..i + n].copy_from_slice(&a[..n]);
}

/// `x ← silu(x)` over a slice.
pub fn silu_inplace(x: &mut [f32]) {
    let mut i = 0;
    while i < x.len() {
        let n = (x.len() - i).min(8);
        let v = load(x, i, n);
        store(silu8(v), x, i, n);
        i += n;
    }
}

/// `out ← silu(x)` over slices of the same length (sixteen lanes at a time where the CPU has
/// AVX-512 F: `vecmath512::silu16` gives [`silu8`]'s bits).
pub fn silu_into(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was just detected.
        unsafe { crate::vecmath512::silu_into(x, out) };
        return;
    }
    let mut i = 0;
    while i < x.len() {
        let n = (x.len() - i).min(8);
        store(silu8(load(x, i, n)), out, i, n);
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reference::float::{silu, silu_grad, softplus, softplus_grad};

    fn rel(a: f32, b: f64) -> f64 {
        (a as f64 - b).abs() / b.abs().max(1e-30)
    }

    /// Against the reference's libm versions (f64) over a sweep of inputs, including the
    /// threshold and very negative values.
    #[test]
    fn lanes_match_libm_within_a_few_ulp() {
        let mut worst = [0f64; 3];
        let mut v = -60.0f32;
        while v < 60.0 {
            let x = f32x8::from([
                v,
                v + 0.01,
                v + 0.02,
                v + 0.03,
                v + 0.04,
                v + 0.05,
                v + 0.06,
                20.0,
            ]);
            let (e, sp, si) = (
                exp8(x).to_array(),
                softplus8(x).to_array(),
                silu8(x).to_array(),
            );
            for (l, &xi) in x.to_array().iter().enumerate() {
                let xd = xi as f64;
                worst[0] = worst[0].max(rel(e[l], xd.exp()));
                worst[1] = worst[1].max(rel(sp[l], softplus(xd)));
                if xd.abs() > 1e-3 {
                    worst[2] = worst[2].max(rel(si[l], silu(xd)));
                }
            }
            v += 0.0731;
        }
        assert!(
            worst.iter().all(|&w| w < 2e-6),
            "worst relative errors {worst:?}"
        );
    }

    /// The derivatives the backward uses, against the reference's formulas.
    #[test]
    fn derivatives_match_the_reference() {
        let mut worst = [0f64; 2];
        for i in (0..4000).step_by(8) {
            let xs: [f32; 8] = std::array::from_fn(|l| -30.0 + ((i + l) as f32) * 0.0151);
            let v = f32x8::from(xs);
            let spg = softplus_grad8(v).to_array();
            let (_, sig) = silu_and_grad8(v);
            let sig = sig.to_array();
            for l in 0..8 {
                let x = xs[l] as f64;
                worst[0] = worst[0].max(rel(spg[l], softplus_grad(x)));
                worst[1] = worst[1].max((sig[l] as f64 - silu_grad(x)).abs());
            }
        }
        assert!(worst.iter().all(|&w| w < 4e-6), "worst errors {worst:?}");
    }

    #[test]
    fn partial_loads_pad_with_zero_and_stores_stop_at_n() {
        let s = [1.0, 2.0, 3.0];
        assert_eq!(
            load(&s, 1, 2).to_array(),
            [2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        let mut out = [9.0f32; 4];
        store(f32x8::splat(5.0), &mut out, 1, 2);
        assert_eq!(out, [9.0, 5.0, 5.0, 9.0]);
    }
}
