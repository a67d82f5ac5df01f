//! # gpu — the CUDA tier (not written yet)
//!
//! Will implement [`reference::Engine`] on CUDA through `cudarc` with NVRTC kernels and
//! cuBLAS (see the CUDA issue). Nothing here pretends to work yet: [`available`] says so.

/// Whether this tier can run models yet.
pub fn available() -> Result<(), &'static str> {
    Err("the CUDA tier is not implemented yet; use --device reference")
}
