//! # reference — the bit-exact specification of Vet-Mamba
//!
//! A Mamba-1 (selective state space) language model written as plain loops: the config,
//! the parameter names and layout, safetensors I/O, the from-scratch init, the forward pass
//! (with per-position document resets, initial state in and final state out), the recurrent
//! single-token step, masked cross-entropy, the full backward, AdamW and gradient clipping.
//!
//! Bit-exact: generic over `f32` and `f64`, `libm` transcendentals, no fused multiply-add,
//! one fixed order for every sum, no threads. The same inputs give the same bits on every
//! machine. Every faster tier (`simd`, `gpu`) implements [`InferenceEngine`] and [`TrainingEngine`] and is checked against
//! this crate.

pub mod comm;
pub mod config;
pub mod decode;
pub mod engine;
pub mod error;
pub mod float;
pub mod fs;
pub mod init;
pub mod io;
pub mod io_limits;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod rng;
pub mod state;
pub mod tensor;

pub use config::{MambaConfig, NormKind};
pub use decode::DecodeState;
pub use engine::{HeldState, InferenceEngine, ReferenceEngine, RowSampling, TrainingEngine};
pub use error::{Error, Result};
pub use float::Float;
pub use optim::AdamWConfig;
pub use params::{param_specs, LayerParams, Params};
pub use state::State;
pub use tensor::Tensor;
