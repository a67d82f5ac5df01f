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
pub mod cuda;
mod decode;
mod engine;
mod graph;
pub mod kernels;
pub mod layout;
pub mod ops;
mod work;

use std::sync::Arc;

use reference::{Error, MambaConfig, Params, TrainingEngine};

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

impl GpuEngine {
    /// Uploads `params` to device `opts.ordinal`.
    pub fn new(
        cfg: &MambaConfig,
        params: Params<f32>,
        opts: &GpuOptions,
    ) -> reference::Result<GpuEngine> {
        let device = format!("cuda:{}", opts.ordinal);
        let unsupported = |msg: String| Error::Device {
            device: device.clone(),
            msg,
        };
        if cfg.d_state == 0 || cfg.d_state > 32 {
            return Err(unsupported(format!(
                "d_state {} is not supported (1..=32)",
                cfg.d_state
            )));
        }
        if cfg.d_conv == 0 || cfg.d_conv > 16 {
            return Err(unsupported(format!(
                "d_conv {} is not supported (1..=16)",
                cfg.d_conv
            )));
        }
        if cfg.n_layer == 0 {
            return Err(unsupported("a model with no layers".into()));
        }
        let d_state_pad = cfg.d_state.next_power_of_two();
        let shape = kernels::KernelShape {
            d_state_pad,
            d_conv: cfg.d_conv,
            chunk: kernels::scan_chunk_for(d_state_pad)?,
        };
        let dev = Arc::new(cuda::Dev::open(opts.ordinal, shape)?);
        let layout = layout::Layout::new(cfg);
        let numel = layout.numel;
        let mut flat = Vec::with_capacity(numel);
        for t in params.tensors() {
            flat.extend_from_slice(&t.data);
        }
        if flat.len() != numel {
            return Err(unsupported(format!(
                "parameters hold {} values, the config {numel}",
                flat.len()
            )));
        }
        let params_buf = dev.upload(&flat)?;
        drop(flat);
        let shadow = match opts.precision {
            Precision::F32 => None,
            _ => Some(dev.alloc(2 * numel)?),
        };
        let e = GpuEngine {
            cfg: cfg.clone(),
            precision: opts.precision,
            shape,
            params: params_buf,
            grads: dev.zeros(4 * numel)?,
            m: dev.zeros(4 * numel)?,
            v: dev.zeros(4 * numel)?,
            shadow,
            opt_step: 0,
            grad_scale_sum: 0.0,
            norm_part: dev.alloc(8 * engine::NORM_BLOCKS)?,
            norm_out: dev.alloc(8)?,
            train_ws: None,
            infer_ws: None,
            decode_ws: None,
            graph: None,
            held: None,
            next_held: 0,
            layout,
            dev,
        };
        e.refresh_shadow()?;
        e.dev.sync()?;
        Ok(e)
    }

    /// Activation bytes per token of the training workspace (after a `loss_and_backward`).
    pub fn train_activation_bytes_per_token(&self) -> Option<f64> {
        self.train_ws
            .as_ref()
            .map(|w| w.activation_bytes_per_token())
    }

    /// Whether decode steps replay a CUDA graph.
    pub fn decode_uses_graph(&self) -> bool {
        graph::uses_graph(self)
    }
}
