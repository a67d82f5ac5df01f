//! # simd — the fast CPU tier (not written yet)
//!
//! Will implement [`reference::Engine`] with `wide` vectors, `matrixmultiply` GEMMs and a
//! thread pool (see the SIMD issue). Nothing here pretends to work yet: [`available`] says so.

/// Whether this tier can run models yet.
pub fn available() -> Result<(), &'static str> {
    Err("the simd CPU tier is not implemented yet; use --device reference")
}
