//! Eight-lane helpers for the backward: partial loads / stores and the activations with their
//! derivatives, in the reference's formulas (see `reference::float`).

use wide::f32x8;

/// Lanes of one vector.
pub(crate) const LANES: usize = 8;

/// Threshold above which softplus is the identity (`reference::float::SOFTPLUS_THRESHOLD`).
const SOFTPLUS_THRESHOLD: f32 = 20.0;

/// Loads `w ≤ 8` values from `s[i..]`, zero in the other lanes.
#[inline(always)]
pub(crate) fn load(s: &[f32], i: usize, w: usize) -> f32x8 {
    if w == LANES {
        let a: [f32; LANES] = s[i..i + LANES].try_into().unwrap_or([0.0; LANES]);
        return f32x8::from(a);
    }
    let mut a = [0f32; LANES];
    a[..w].copy_from_slice(&s[i..i + w]);
    f32x8::from(a)
}

/// Stores the first `w ≤ 8` lanes of `v` to `s[i..]`.
#[inline(always)]
pub(crate) fn store(v: f32x8, s: &mut [f32], i: usize, w: usize) {
    if w == LANES {
        s[i..i + LANES].copy_from_slice(&v.to_array());
        return;
    }
    s[i..i + w].copy_from_slice(&v.to_array()[..w]);
}

/// `1 / (1 + exp(−x))`.
#[inline(always)]
pub(crate) fn sigmoid8(x: f32x8) -> f32x8 {
    f32x8::ONE / (f32x8::ONE + (-x).exp())
}

/// `v` above 20, else `log1p(exp(v))`.
#[inline(always)]
pub(crate) fn softplus8(v: f32x8) -> f32x8 {
    let t = f32x8::splat(SOFTPLUS_THRESHOLD);
    let r = v.min(t).exp().ln_1p();
    v.simd_gt(t).select(v, r)
}

/// d softplus / dv: 1 above 20, else sigmoid(v).
#[inline(always)]
pub(crate) fn softplus_grad8(v: f32x8) -> f32x8 {
    let t = f32x8::splat(SOFTPLUS_THRESHOLD);
    v.simd_gt(t).select(f32x8::ONE, sigmoid8(v))
}

/// `(silu(z), silu'(z))` with `s = sigmoid(z)`: `z · s` and `s · (1 + z · (1 − s))`.
#[inline(always)]
pub(crate) fn silu_and_grad8(z: f32x8) -> (f32x8, f32x8) {
    let s = sigmoid8(z);
    (z * s, s * (f32x8::ONE + z * (f32x8::ONE - s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reference::float::{silu, silu_grad as ref_silu_grad, softplus, softplus_grad};

    /// Relative error of the vector functions against the reference (libm) over the range the
    /// model sees, including both sides of the softplus threshold.
    #[test]
    fn vector_activations_match_the_reference() {
        let mut worst = [0f64; 4];
        let mut i = 0;
        while i < 4000 {
            let xs: [f32; 8] = std::array::from_fn(|l| -30.0 + ((i + l) as f32) * 0.0151);
            let v = f32x8::from(xs);
            let (sp, spg) = (softplus8(v).to_array(), softplus_grad8(v).to_array());
            let (si, sig) = silu_and_grad8(v);
            let (si, sig) = (si.to_array(), sig.to_array());
            for l in 0..8 {
                let x = xs[l];
                let rel = |g: f32, w: f32| ((g - w).abs() / w.abs().max(1e-30)) as f64;
                worst[0] = worst[0].max(rel(sp[l], softplus(x)));
                worst[1] = worst[1].max(rel(spg[l], softplus_grad(x)));
                worst[2] =
                    worst[2].max((si[l] - silu(x)).abs() as f64 / (1.0 + silu(x).abs() as f64));
                worst[3] = worst[3].max((sig[l] - ref_silu_grad(x)).abs() as f64);
            }
            i += 8;
        }
        assert!(worst.iter().all(|&w| w < 4e-6), "worst errors {worst:?}");
    }
}
