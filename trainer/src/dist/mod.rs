//! Data-parallel training with DeepSpeed's ZeRO stages over any [`TrainingEngine`] and any
//! [`Comm`](reference::comm::Comm): the flat sharding bookkeeping ([`shard`]), the step
//! driver ([`zero`]), the rank shards of a checkpoint ([`ckpt`]) and the training loop's
//! entry point ([`train_distributed`]).
//!
//! # What the driver does and does not do yet
//! - Stage 0 without `offload_optimizer` on an engine that sums its gradients where they live
//!   ([`TrainingEngine::all_reduce_gradients`]) is plain data parallelism: every rank runs
//!   the engine's own AdamW on identical sums, and the driver's shard is only a copy for
//!   checkpoints. On the GPU engine over NCCL the flat gradient buffer is all-reduced in place
//!   on the device (no host copy at all; at world size 1 this is the plain run bit for bit);
//!   the CPU engines sum their host tensors with the host collective.
//! - Stages 1–2 without `offload_optimizer` on an engine that shards its optimizer where the
//!   gradients live ([`TrainingEngine::shard_optimizer`]; the GPU engine over NCCL, see
//!   `gpu/src/zero.rs`): the engine keeps AdamW's moments for this rank's flat chunk only,
//!   sums the gradients in place on the device (all-reduce at stage 1, in-place reduce-scatter
//!   at stage 2), runs AdamW on its chunk and all-gathers the updated weights in place. The
//!   f32 weights and the whole gradient buffer stay on every rank (the backward accumulates
//!   into every layer), so stage 2 saves no more device memory than stage 1 here.
//! - Otherwise the optimizer (f32 master weights and AdamW moments) lives in the driver, in
//!   host memory, and AdamW runs on the host with the simd tier's kernel: what DeepSpeed calls
//!   `offload_optimizer: {device: "cpu"}`. On the CPU engine that is the only place it could
//!   be; GPU engines take it with `offload_optimizer` and at stage 3.
//! - The engines run the forward and backward of a whole step at once
//!   ([`TrainingEngine::loss_and_backward`]), so gradient buckets are reduced after the
//!   backward, not overlapped with it (`overlap_comm` has no effect and says so), and the
//!   wall-clock breakdown reports forward and backward together.
//! - Stage 3 keeps the parameters sharded in the driver between steps and all-gathers them
//!   into the engine at the start of each step. The engines cannot gather, use and free one
//!   layer at a time, so the engine still holds every parameter during the step: stage 3
//!   saves no device memory over stage 2 here. `stage3_*` keys other than the persistence
//!   threshold have no effect and are reported as such.
//!
//! [`TrainingEngine`]: reference::TrainingEngine

pub mod ckpt;
pub mod config;
pub mod ds;
pub mod join;
pub mod run;
pub mod shard;
pub mod zero;

pub use config::ZeroConfig;
pub use run::train_distributed;
pub use shard::FlatLayout;
pub use zero::{StepOut, ZeroDriver};

use reference::comm::CommError;

/// What can go wrong in the distributed driver.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    #[error("engine: {0}")]
    Engine(#[from] reference::Error),
    #[error("flat layout: {0}")]
    Layout(String),
    #[error("zero config: {0}")]
    Config(String),
    #[error("{path}: {msg}")]
    Checkpoint { path: String, msg: String },
}
