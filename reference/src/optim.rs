//! AdamW (decoupled weight decay, PyTorch's formulation) and global-norm gradient clipping.
//!
//! Per element, at step `t` (1-based), for a parameter in the decay set:
//! ```text
//! p  = p · (1 − lr · weight_decay)
//! m  = β1 · m + (1 − β1) · g
//! v  = β2 · v + (1 − β2) · g²
//! p  = p − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
//! ```
//! `A_log`, `D`, biases and norm weights are never decayed ([`crate::params::is_no_decay`]).

use crate::config::MambaConfig;
use crate::float::Float;
use crate::params::{is_no_decay, param_specs, Params};

/// AdamW hyper-parameters. `max_grad_norm: None` disables clipping.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    /// mamba_ssm / GPT-style defaults: betas (0.9, 0.95), eps 1e-8, decay 0.1, clip 1.0.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            max_grad_norm: Some(1.0),
        }
    }
}

impl AdamWConfig {
    /// The factor that clips a gradient of global norm `norm` to `max_grad_norm`:
    /// `max / (norm + 1e-6)` where that is below 1, `None` where no clipping applies.
    pub fn clip_coef(&self, norm: f64) -> Option<f64> {
        self.max_grad_norm
            .map(|max| max / (norm + 1e-6))
            .filter(|&c| c < 1.0)
    }
}

/// What an optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradient before clipping (f64 sum in canonical order).
    pub grad_norm: f64,
    /// The gradient was scaled down to `max_grad_norm`.
    pub clipped: bool,
    /// The gradient was not finite: nothing was updated and the step count did not move.
    pub skipped: bool,
}

/// AdamW moments and step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW<T> {
    pub m: Params<T>,
    pub v: Params<T>,
    pub step: u64,
}

/// Global L2 norm of every gradient, summed in f64 in canonical order.
pub fn grad_norm<T: Float>(grads: &Params<T>) -> f64 {
    let mut ss = 0.0f64;
    for t in grads.tensors() {
        for &g in &t.data {
            let g = g.to_f64();
            ss += g * g;
        }
    }
    libm::sqrt(ss)
}

impl<T: Float> AdamW<T> {
    pub fn new(cfg: &MambaConfig) -> Self {
        AdamW {
            m: Params::zeros(cfg),
            v: Params::zeros(cfg),
            step: 0,
        }
    }

    /// Clips `grads` to `hp.max_grad_norm` (PyTorch's `clip_grad_norm_`: coefficient
    /// `max / (norm + 1e-6)` when below 1) and applies one AdamW update with learning rate `lr`.
    /// A non-finite gradient norm skips the step entirely.
    pub fn step(
        &mut self,
        cfg: &MambaConfig,
        params: &mut Params<T>,
        grads: &mut Params<T>,
        hp: &AdamWConfig,
        lr: f64,
    ) -> StepStats {
        let norm = grad_norm(grads);
        let all = 0..params.tensors().len();
        self.step_range(cfg, params, grads, hp, lr, all, norm)
    }

    /// [`AdamW::step`] on the parameters `range` (indices in canonical order) only, clipped
    /// with the global gradient norm `norm` given by the caller (a shard of the optimizer
    /// computes it over every rank). The step count moves once per call. Over the whole range
    /// with `norm = grad_norm(grads)` this is [`AdamW::step`], bit for bit.
    #[allow(clippy::too_many_arguments)]
    pub fn step_range(
        &mut self,
        cfg: &MambaConfig,
        params: &mut Params<T>,
        grads: &mut Params<T>,
        hp: &AdamWConfig,
        lr: f64,
        range: std::ops::Range<usize>,
        norm: f64,
    ) -> StepStats {
        if !norm.is_finite() {
            return StepStats {
                grad_norm: norm,
                clipped: false,
                skipped: true,
            };
        }
        let clip = hp.clip_coef(norm);
        if let Some(coef) = clip {
            let c = T::from_f64(coef);
            for t in &mut grads.tensors_mut()[range.clone()] {
                t.data.iter_mut().for_each(|g| *g *= c);
            }
        }
        let clipped = clip.is_some();
        self.step += 1;
        let t = self.step as f64;
        let bc1 = 1.0 - libm::pow(hp.beta1, t);
        let bc2 = 1.0 - libm::pow(hp.beta2, t);
        let step_size = T::from_f64(lr / bc1);
        let sqrt_bc2 = T::from_f64(libm::sqrt(bc2));
        let (b1, b2) = (T::from_f64(hp.beta1), T::from_f64(hp.beta2));
        let (omb1, omb2) = (T::from_f64(1.0 - hp.beta1), T::from_f64(1.0 - hp.beta2));
        let eps = T::from_f64(hp.eps);
        let decay = T::from_f64(1.0 - lr * hp.weight_decay);
        let specs = param_specs(cfg);
        let ps = params.tensors_mut();
        let gs = grads.tensors();
        let ms = self.m.tensors_mut();
        let vs = self.v.tensors_mut();
        let all = ps.into_iter().zip(gs).zip(ms).zip(vs).zip(&specs);
        for ((((p, g), m), v), (name, _)) in all.skip(range.start).take(range.len()) {
            let decays = hp.weight_decay != 0.0 && !is_no_decay(name);
            for i in 0..p.data.len() {
                let gi = g.data[i];
                if decays {
                    p.data[i] *= decay;
                }
                m.data[i] = b1 * m.data[i] + omb1 * gi;
                v.data[i] = b2 * v.data[i] + omb2 * (gi * gi);
                let denom = v.data[i].sqrt() / sqrt_bc2 + eps;
                p.data[i] -= step_size * (m.data[i] / denom);
            }
        }
        StepStats {
            grad_norm: norm,
            clipped,
            skipped: false,
        }
    }
}
