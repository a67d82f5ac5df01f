//! The selective scan, the fast CPU twin of `reference::ops::selective_scan`: the forward
//! ([`selective_scan_fwd`], in `fwd.rs`) and its backward (`selective_scan_bwd`, in `bwd.rs`),
//! both eight channels per vector (the forward sixteen on AVX-512, `fwd512.rs`), with the vector lanes the backward is generic over in
//! `lanes.rs`.

mod bwd;
mod fwd;
#[cfg(target_arch = "x86_64")]
mod fwd512;
mod lanes;

pub(crate) use bwd::{selective_scan_bwd, ScanBwdInputs};
pub use fwd::selective_scan_fwd;

/// Shapes and inputs (batch-major, as in `reference`): `u`, `delta`, `z`: `[batch, seq_len,
/// d_inner]`; `a` (= −exp(A_log)): `[d_inner, d_state]`; `b`, `c`: `[batch, seq_len, d_state]`;
/// `d`, `delta_bias`: `[d_inner]`; `resets`: `[batch, seq_len]`.
#[derive(Clone, Copy)]
pub struct Scan<'a> {
    pub u: &'a [f32],
    pub delta: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub d: &'a [f32],
    pub z: &'a [f32],
    pub delta_bias: &'a [f32],
    pub resets: Option<&'a [bool]>,
    pub batch: usize,
    pub seq_len: usize,
    pub d_inner: usize,
    pub d_state: usize,
}
