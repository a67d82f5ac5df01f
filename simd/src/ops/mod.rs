//! The model's ops, one file per op named after its twin in `reference::ops`: each holds the
//! op's forward (and one-token step, where it has one) and its backward. The model-level code
//! (`forward`, `backward`, `engine`) calls them.

pub mod conv1d;
pub mod linear;
pub mod norm;
pub mod selective_scan;

/// A mutable f32 buffer that pool tasks write through at disjoint indices.
pub(crate) type Shared = crate::SyncPtr<f32>;
