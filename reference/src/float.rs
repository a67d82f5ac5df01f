//! The scalar type the reference is generic over.
//!
//! Every transcendental goes through the `libm` crate, never the platform's libm, so the
//! same inputs give the same bits on every machine. Rust never contracts `a * b + c` into a
//! fused multiply-add on its own, so plain arithmetic is exact IEEE-754 per operation.

use std::fmt::{Debug, Display};
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A real scalar: `f32` or `f64`.
pub trait Float:
    Copy
    + Debug
    + Display
    + Default
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    /// Name used in messages and file metadata (`"f32"`, `"f64"`).
    const NAME: &'static str;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn log1p(self) -> Self;
    fn expm1(self) -> Self;
    fn sqrt(self) -> Self;
    fn is_finite(self) -> bool;
    fn max(self, other: Self) -> Self {
        if other > self {
            other
        } else {
            self
        }
    }
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f32";
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn exp(self) -> Self {
        libm::expf(self)
    }
    fn ln(self) -> Self {
        libm::logf(self)
    }
    fn log1p(self) -> Self {
        libm::log1pf(self)
    }
    fn expm1(self) -> Self {
        libm::expm1f(self)
    }
    fn sqrt(self) -> Self {
        libm::sqrtf(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f64";
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn exp(self) -> Self {
        libm::exp(self)
    }
    fn ln(self) -> Self {
        libm::log(self)
    }
    fn log1p(self) -> Self {
        libm::log1p(self)
    }
    fn expm1(self) -> Self {
        libm::expm1(self)
    }
    fn sqrt(self) -> Self {
        libm::sqrt(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// `x * sigmoid(x)`.
pub fn silu<T: Float>(x: T) -> T {
    x * sigmoid(x)
}

/// `1 / (1 + exp(-x))`.
pub fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// d silu(x) / dx = s * (1 + x * (1 - s)) with s = sigmoid(x).
pub fn silu_grad<T: Float>(x: T) -> T {
    let s = sigmoid(x);
    s * (T::ONE + x * (T::ONE - s))
}

/// Threshold above which softplus is the identity, as in PyTorch and mamba_ssm.
pub const SOFTPLUS_THRESHOLD: f64 = 20.0;

/// softplus(v) = v for v > 20, else log1p(exp(v)).
pub fn softplus<T: Float>(v: T) -> T {
    if v > T::from_f64(SOFTPLUS_THRESHOLD) {
        v
    } else {
        v.exp().log1p()
    }
}

/// d softplus(v) / dv: 1 above the threshold, else sigmoid(v).
pub fn softplus_grad<T: Float>(v: T) -> T {
    if v > T::from_f64(SOFTPLUS_THRESHOLD) {
        T::ONE
    } else {
        sigmoid(v)
    }
}
