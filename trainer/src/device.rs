//! `--device`: which tier runs the model.

use anyhow::{bail, Result};
use reference::{Engine, MambaConfig, Params, ReferenceEngine};

/// Builds the engine `device` names. `cpu` is the fastest CPU engine available: the `simd`
/// tier once it exists, the f32 reference until then. `cuda` says clearly that its tier is not
/// written yet.
pub fn engine(device: &str, cfg: &MambaConfig, params: Params<f32>) -> Result<Box<dyn Engine>> {
    match device {
        "reference" => Ok(Box::new(ReferenceEngine::new(cfg.clone(), params))),
        "reference-f64" => Ok(Box::new(ReferenceEngine::<f64>::new(cfg.clone(), params.cast(cfg)))),
        "cpu" => match simd::available() {
            Err(_) => Ok(Box::new(ReferenceEngine::new(cfg.clone(), params))),
            Ok(()) => bail!("--device cpu: the simd tier reports ready but has no engine"),
        },
        d if d == "cuda" || d.starts_with("cuda:") => match gpu::available() {
            Err(e) => bail!("--device {d}: {e}"),
            Ok(()) => bail!("--device {d}: the CUDA tier reports ready but has no engine"),
        },
        other => bail!("--device {other}: unknown device (expected reference, reference-f64, cpu, cuda or cuda:N)"),
    }
}
