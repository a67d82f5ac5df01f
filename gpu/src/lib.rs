//! # gpu — the CUDA tier (not written yet)
//!
//! Will implement [`reference::Engine`] on CUDA through `cudarc` with NVRTC kernels and
//! cuBLAS (see the CUDA issue). Nothing here pretends to work yet: [`engine`] says so.

use reference::{Engine, MambaConfig, Params};

/// Training / inference precision of the CUDA tier. Master weights and AdamW state are f32
/// in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Bf16,
    /// fp16 GEMM inputs; the caller scales the loss (`grad_scale`) dynamically.
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

/// Whether this tier can run models yet.
pub fn available() -> Result<(), &'static str> {
    Err("the CUDA tier is not implemented yet; use --device reference")
}

/// Builds the CUDA engine for `cfg` with `params` on device `opts.ordinal`.
pub fn engine(
    _cfg: &MambaConfig,
    _params: Params<f32>,
    opts: &GpuOptions,
) -> reference::Result<Box<dyn Engine>> {
    Err(reference::Error::Device {
        device: format!("cuda:{}", opts.ordinal),
        msg: "the CUDA tier is not implemented yet; use --device reference".into(),
    })
}
