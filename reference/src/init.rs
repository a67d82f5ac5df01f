//! Initialisation for training from scratch, exactly as mamba_ssm does it (DESIGN.md "Init").
//!
//! Values are drawn in f64 from one [`Rng`] stream per tensor (keyed by seed and canonical
//! name), then rounded to the model's scalar type, so f32 and f64 models start from the same
//! numbers and every tier starts from the same bits.

use crate::config::MambaConfig;
use crate::float::Float;
use crate::params::{param_specs, Params};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Fresh parameters for `cfg` from `seed`.
pub fn init_params<T: Float>(cfg: &MambaConfig, seed: u64) -> Params<T> {
    let tensors = param_specs(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let mut rng = Rng::stream(seed, &name);
            let n: usize = shape.iter().product();
            let data: Vec<T> = (0..n)
                .map(|i| T::from_f64(init_value(cfg, &name, &shape, i, &mut rng)))
                .collect();
            Tensor::from_vec(&shape, data)
        })
        .collect();
    Params::from_ordered(cfg, tensors)
}

/// PyTorch's default `nn.Linear` / `nn.Conv1d` weight init (kaiming-uniform with a = sqrt(5)):
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn torch_default(rng: &mut Rng, fan_in: usize) -> f64 {
    let bound = 1.0 / libm::sqrt(fan_in as f64);
    rng.uniform(-bound, bound)
}

/// Element `i` of tensor `name`.
fn init_value(cfg: &MambaConfig, name: &str, shape: &[usize], i: usize, rng: &mut Rng) -> f64 {
    let last = shape[shape.len() - 1];
    let suffix = name.rsplit_once(".mixer.").map(|(_, s)| s).unwrap_or(name);
    match suffix {
        "backbone.embeddings.weight" => 0.02 * rng.normal(),
        "in_proj.weight" | "x_proj.weight" | "lm_head.weight" => torch_default(rng, last),
        "conv1d.weight" | "conv1d.bias" => torch_default(rng, cfg.d_conv),
        "out_proj.weight" => torch_default(rng, last) / libm::sqrt(cfg.n_layer as f64),
        "dt_proj.weight" => {
            let std = 1.0 / libm::sqrt(cfg.dt_rank as f64);
            rng.uniform(-std, std)
        }
        "dt_proj.bias" => {
            let (lo, hi) = (libm::log(cfg.dt_min), libm::log(cfg.dt_max));
            let dt = libm::exp(rng.uniform(lo, hi)).max(cfg.dt_init_floor);
            // Inverse of softplus: softplus(dt + log(-expm1(-dt))) = dt.
            dt + libm::log(-libm::expm1(-dt))
        }
        "A_log" => libm::log((i % cfg.d_state + 1) as f64),
        "D" => 1.0,
        "in_proj.bias" | "out_proj.bias" => 0.0,
        _ if name.ends_with("norm.weight") || name.ends_with("norm_f.weight") => 1.0,
        _ if name.ends_with("norm.bias") || name.ends_with("norm_f.bias") => 0.0,
        _ => unreachable!("init: no rule for parameter {name}"),
    }
}
