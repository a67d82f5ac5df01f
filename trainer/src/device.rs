//! `--device`: which tier runs the model.

use std::path::Path;

use anyhow::{bail, Context, Result};
use reference::{InferenceEngine, MambaConfig, Params, ReferenceEngine, TrainingEngine};
pub use simd::WeightDtype;

/// Settings that pick and shape an engine beyond the device name.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// CPU worker threads (0 = every core).
    pub threads: usize,
    /// Inference weight storage on the CPU (`simd`); the reference always runs f32/f64.
    pub dtype: WeightDtype,
    /// CUDA precision.
    pub precision: gpu::Precision,
}

/// Builds the engine `device` names with default options.
pub fn engine(
    device: &str,
    cfg: &MambaConfig,
    params: Params<f32>,
) -> Result<Box<dyn TrainingEngine>> {
    engine_with(device, cfg, params, &EngineOptions::default())
}

/// Parses `cuda` / `cuda:N` into the ordinal.
pub fn cuda_ordinal(device: &str) -> Result<Option<usize>> {
    if device == "cuda" {
        return Ok(Some(0));
    }
    match device.strip_prefix("cuda:") {
        None => Ok(None),
        Some(n) => n
            .parse()
            .map(Some)
            .with_context(|| format!("--device {device}: expected cuda:N with N a device number")),
    }
}

/// Builds the engine `device` names: `reference` / `reference-f64` (the spec), `cpu` (the
/// `simd` tier: vectorised, threaded, f32/bf16/int8/int4 weights), `cuda[:N]` (the CUDA tier).
pub fn engine_with(
    device: &str,
    cfg: &MambaConfig,
    params: Params<f32>,
    opts: &EngineOptions,
) -> Result<Box<dyn TrainingEngine>> {
    if opts.dtype != WeightDtype::F32 && !matches!(device, "cpu") {
        if opts.dtype == WeightDtype::Int8 && cuda_ordinal(device)?.is_some() {
            bail!("--dtype int8 on --device {device} is for generation (vet-chat, vet-serve): training keeps its weights in f32");
        }
        bail!(
            "--dtype {}: only --device cpu stores weights in reduced precision (and --device cuda in int8, for generation)",
            opts.dtype.name()
        );
    }
    if let Some(ordinal) = cuda_ordinal(device)? {
        let o = gpu::GpuOptions {
            ordinal,
            precision: opts.precision,
        };
        return Ok(gpu::engine(cfg, params, &o)?);
    }
    match device {
        "reference" => Ok(Box::new(ReferenceEngine::new(cfg.clone(), params))),
        "reference-f64" => Ok(Box::new(ReferenceEngine::<f64>::new(cfg.clone(), params.cast(cfg)))),
        "cpu" => {
            let o = simd::SimdOptions {
                threads: opts.threads,
                dtype: opts.dtype,
                isa: None,
            };
            Ok(Box::new(simd::SimdEngine::new(cfg.clone(), params, &o)?))
        }
        other => bail!("--device {other}: unknown device (expected reference, reference-f64, cpu, cuda or cuda:N)"),
    }
}

/// The weight storage for `dir` on `device` when the command line names none: the checkpoint's
/// own for a `vet-train quantize` checkpoint where `device` computes in it (int8 on cpu and
/// cuda, int4 on cpu), else f32 (a quantised checkpoint then opens dequantised).
pub fn checkpoint_dtype(dir: &Path, device: &str) -> WeightDtype {
    let cuda = matches!(cuda_ordinal(device), Ok(Some(_)));
    match simd::load::stored_quantization(dir) {
        Ok(Some(WeightDtype::Int8)) if device == "cpu" || cuda => WeightDtype::Int8,
        Ok(Some(WeightDtype::Int4)) if device == "cpu" => WeightDtype::Int4,
        // An unreadable header is reported by the load itself.
        _ => WeightDtype::F32,
    }
}

/// Loads the model checkpoint in `dir` (config.json + model.safetensors, HF or mamba_ssm) onto
/// `device` for inference. Returns the engine and the model config.
pub fn load_for_inference(
    dir: &Path,
    device: &str,
    opts: &EngineOptions,
) -> Result<(Box<dyn InferenceEngine>, MambaConfig)> {
    if device == "cpu" {
        // Memory-maps the weights when the file already holds the precision asked for.
        let o = simd::SimdOptions {
            threads: opts.threads,
            dtype: opts.dtype,
            isa: None,
        };
        let started = std::time::Instant::now();
        let e = simd::SimdEngine::load(dir, &o)?;
        if matches!(opts.dtype, WeightDtype::Int8 | WeightDtype::Int4) && !e.weights().is_mapped() {
            let d = opts.dtype.name();
            eprintln!(
                "hint: quantising to {d} at load took {:.1}s; run `vet-train quantize --model {} --out DIR --dtype {d}` once and load DIR (memory-mapped, no quantising)",
                started.elapsed().as_secs_f64(),
                dir.display()
            );
        }
        let cfg = e.config().clone();
        return Ok((Box::new(e), cfg));
    }
    let ck = crate::checkpoint::load(dir)?;
    if opts.dtype == WeightDtype::Int8 {
        if let Some(ordinal) = cuda_ordinal(device)? {
            // The decode GEMVs read int8 rows quantised as the CPU tier quantises them.
            let o = gpu::GpuOptions {
                ordinal,
                precision: opts.precision,
            };
            let mut e = gpu::GpuEngine::new(&ck.config, ck.params, &o)?;
            e.quantize_int8(simd::kernels::quantize_row)?;
            return Ok((Box::new(e), ck.config));
        }
    }
    let e = engine_with(device, &ck.config, ck.params, opts)?;
    Ok((e, ck.config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(device: &str, dtype: WeightDtype) -> String {
        let cfg = MambaConfig::new(16, 1, 32);
        let params = reference::init::init_params::<f32>(&cfg, 1);
        let opts = EngineOptions {
            dtype,
            ..Default::default()
        };
        match engine_with(device, &cfg, params, &opts) {
            Ok(_) => panic!(
                "--device {device} --dtype {} was taken for training",
                dtype.name()
            ),
            Err(e) => format!("{e:#}"),
        }
    }

    /// Reduced-precision weights off the CPU are refused for training before any device
    /// opens, each with its reason: int8 on cuda is for generation, the rest CPU-only.
    #[test]
    fn reduced_weights_off_the_cpu_are_refused_for_training_with_the_reason() {
        let e = refusal("cuda:1", WeightDtype::Int8);
        assert!(e.contains("training keeps its weights in f32"), "{e}");
        for (device, dtype) in [
            ("cuda", WeightDtype::Int4),
            ("cuda", WeightDtype::Bf16),
            ("reference", WeightDtype::Int8),
        ] {
            let e = refusal(device, dtype);
            assert!(
                e.contains("only --device cpu stores weights"),
                "{device}: {e}"
            );
        }
    }
}
