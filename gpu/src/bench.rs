//! What the benchmarks share (`gpu-bench`, `trainer/benches/zero_gpu.rs`): fast
//! deterministic parameters and tokens, and the device memory in use.

use reference::{param_specs, MambaConfig, Params, Tensor};

/// Fast deterministic parameters (xorshift) in the init's ranges (the bench needs sane values, not the
/// spec's exact init, and the 1.4B model would take minutes to draw with the reference RNG).
pub fn params(cfg: &MambaConfig) -> Params<f32> {
    let mut s = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let tensors = param_specs(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("A_log") {
                (0..n)
                    .map(|i| ((i % cfg.d_state) as f32 + 1.0).ln())
                    .collect()
            } else if name.ends_with(".D") || name.contains("norm") {
                vec![1.0; n]
            } else if name.ends_with("dt_proj.bias") {
                vec![-4.6; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let fan_in = *shape.last().unwrap_or(&1) as f32;
                let a = if name.contains("embeddings") || name.starts_with("lm_head") {
                    0.02
                } else {
                    1.0 / fan_in.sqrt()
                };
                (0..n).map(|_| a * next()).collect()
            };
            Tensor::from_vec(&shape, data)
        })
        .collect();
    Params::from_ordered(cfg, tensors)
}

pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// Bytes of device memory in use on the current context's device (every process's), from
/// the driver; 0 when it cannot say.
pub fn used_memory() -> usize {
    let (free, total) = cudarc::driver::result::mem_get_info().unwrap_or((0, 0));
    total - free
}

/// The name of CUDA device `ordinal` as the driver gives it (e.g. "NVIDIA H100 80GB HBM3").
pub fn device_name(ordinal: usize) -> String {
    std::panic::catch_unwind(|| cudarc::driver::CudaContext::new(ordinal))
        .ok()
        .and_then(|c| c.ok())
        .and_then(|c| c.name().ok())
        .unwrap_or_else(|| format!("cuda:{ordinal}"))
}
