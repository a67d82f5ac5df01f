//! Helpers of the single-kernel GPU tests (in the per-op test files: `selective_scan.rs`,
//! `conv1d.rs`, `norm.rs`, `loss.rs`): the op device or a skip without CUDA, inputs drawn
//! from a normal distribution, and a report of every comparison against its limit. Every
//! output carries sentinel padding that must come back untouched (`gpu::ops`).

use gpu::ops::OpDev;
use reference::rng::Rng;

use crate::diff;

/// The single-op device for `d_state` / `d_conv`, or `None` (after a `skipping` line) where
/// there is no CUDA device.
pub fn open(test: &str, d_state: usize, d_conv: usize) -> Option<OpDev> {
    if let Err(e) = gpu::available() {
        println!("skipping {test}: {e}");
        return None;
    }
    Some(OpDev::open(d_state, d_conv).unwrap_or_else(|e| panic!("{test}: {e}")))
}

/// `n` draws from N(mean, sd²).
pub fn normal(rng: &mut Rng, n: usize, mean: f64, sd: f64) -> Vec<f32> {
    (0..n).map(|_| (mean + sd * rng.normal()) as f32).collect()
}

/// The values widened to f64 (the reference runs in f64 on the same f32 inputs).
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Rows of (what, relative error, limit, NaN seen); [`Report::finish`] prints them all and
/// fails on any over its limit.
pub struct Report(pub Vec<(String, f64, f64, bool)>);

impl Report {
    pub fn cmp(&mut self, what: String, got: &[f32], want: &[f64], limit: f64) {
        let d = diff(got, want);
        self.0.push((what, d.rel, limit, d.has_nan));
    }
    pub fn finish(self, test: &str) {
        let mut bad = Vec::new();
        for (w, e, l, nan) in &self.0 {
            let ok = !nan && e <= l;
            println!(
                "  {w:<60} {e:>11.3e} {l:>9.1e} {}",
                if ok { "" } else { "FAIL" }
            );
            if !ok {
                bad.push(w.clone());
            }
        }
        assert!(bad.is_empty(), "{test}: over the limit: {bad:?}");
    }
}
