//! # gpu — the CUDA tier
//!
//! [`reference::InferenceEngine`] and [`reference::TrainingEngine`] on one NVIDIA GPU through `cudarc`: kernels in `gpu/kernels/*.cu`
//! (each the twin of a `reference` op), compiled by NVRTC for the device's architecture once
//! and cached on disk ([`kernels::kernel_cache_dir`]), cuBLAS for the projections and the
//! lm_head. Decoding can keep the recurrent state in device memory
//! ([`reference::InferenceEngine::hold_state`], used through [`reference::DecodeState`]): a step then
//! moves only tokens in and logits out, and replays a CUDA graph.
//!
//! Precision: f32 master weights and AdamW state always; bf16 (default) or fp16 GEMM inputs
//! with f32 accumulation, or plain f32. `A_log`, `D`, the scan state and the residual stream
//! stay f32. Every reduction has a fixed order and no kernel uses floating-point atomics, so
//! two runs give the same bits.
//!
//! Without a CUDA driver (CI), [`engine`] returns `Error::Device` and nothing panics.

mod api;
mod backward;
mod batched;
pub mod bench;
mod carry;
pub mod comm;
pub mod cuda;
mod decode;
mod decode_proj;
mod engine;
mod forward;
mod graph;
mod head_loss;
pub mod kernels;
mod layered;
pub mod layout;
mod model;
pub mod ops;
pub mod params;
pub mod profile;
mod q8;
mod work;
mod zero;

use reference::{MambaConfig, Params, TrainingEngine};

pub use engine::GpuEngine;

/// Training / inference precision of the CUDA tier. Master weights and AdamW state are f32
/// in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Bf16,
    /// fp16 GEMM inputs; the caller scales the loss dynamically: it passes
    /// `grad_scale = loss_scale / accumulation_steps`, and `optimizer_step` divides the
    /// gradients by the sum of the `grad_scale`s since `zero_grad` (the loss scale) before
    /// clipping and AdamW. An overflow makes the gradient non-finite: the step is skipped.
    Fp16,
    F32,
}

/// Options of the CUDA engine.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// CUDA device ordinal (`cuda:N`).
    pub ordinal: usize,
    pub precision: Precision,
}

/// Whether a CUDA device can be used here (libraries load and at least one device exists).
pub fn available() -> Result<(), String> {
    cuda::probe_libraries()?;
    match std::panic::catch_unwind(cudarc::driver::CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("no CUDA device: the driver reports 0 devices".into()),
        Ok(Err(e)) => Err(format!("no CUDA device: {e:?}")),
        Err(_) => Err("no CUDA device: the driver library panicked".into()),
    }
}

/// Builds the CUDA engine for `cfg` with `params` on device `opts.ordinal`.
pub fn engine(
    cfg: &MambaConfig,
    params: Params<f32>,
    opts: &GpuOptions,
) -> reference::Result<Box<dyn TrainingEngine>> {
    Ok(Box::new(GpuEngine::new(cfg, params, opts)?))
}
