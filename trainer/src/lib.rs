//! # trainer — the `vet-train` tool
//!
//! Checkpoint directories, the `debug-state` dump for cross-checking other implementations,
//! and text generation. The training loop, data pipeline and chat UI grow here in later issues.

pub mod assistant;
pub mod batched;
pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod convert;
pub mod data;
pub mod debug_state;
pub mod device;
pub mod dist;
pub mod export;
pub mod generate;
pub mod launch;
pub mod lock;
pub mod quickstart;
pub mod tokenizer;
pub mod tokenizer_train;
pub mod train;
