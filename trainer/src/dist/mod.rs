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
//!   on the device (no host copy at all; at world size 1 this is the plain run bit for bit):
//!   after the backward, or with `overlap_comm` during the last micro-batch's backward (next
//!   point but one);
//!   on the CPU engine the driver sums the gradients in buckets as the backward hands them out
//!   (next points) and puts the sums back into the engine
//!   ([`TrainingEngine::set_gradients`]; this keeps a whole-model flat gradient buffer in the
//!   driver, and copies the sums once more on the way in); an engine that cannot hand them out
//!   sums its host
//!   tensors with the host collective after the backward.
//! - Stages 1–2 without `offload_optimizer` on an engine that shards its optimizer where the
//!   gradients live ([`TrainingEngine::shard_optimizer`]; the GPU engine over NCCL, see
//!   `gpu/src/zero.rs`): the engine keeps AdamW's moments for this rank's flat chunk only,
//!   sums the gradients in place on the device (all-reduce at stage 1, in-place reduce-scatter
//!   at stage 2), runs AdamW on its chunk and all-gathers the updated weights in place. The
//!   f32 weights and the whole gradient buffer stay on every rank (the backward accumulates
//!   into every layer), so stage 2 saves no more device memory than stage 1 here.
//! - With `overlap_comm`, stages 0–2 with the optimizer on the GPU (the two points above) run
//!   the last micro-batch through [`TrainingEngine::loss_and_backward_summed`]: the engine
//!   packs whole groups, in the backward's order, into buckets of `reduce_bucket_size`
//!   elements, and as soon as a bucket's layers are done it records an event on its stream
//!   and queues the bucket's sum on NCCL's stream behind it (an all-reduce at stages 0–1; at
//!   stage 2 a reduce of each piece to the rank whose chunk holds it), so the collectives
//!   run beside the rest of the backward; the call waits for them at its end. At world size 1
//!   the bits are those of summing after the backward (`trainer/tests/gpu_zero.rs`); at
//!   world 3 and above NCCL may order a bucket's sum differently from the whole buffer's, a
//!   rounding. These collectives have no time of their own in `comms_logger` (they ran
//!   inside `forward_backward`).
//! - Otherwise the optimizer (f32 master weights and AdamW moments) lives in the driver, in
//!   host memory, and AdamW runs on the host with the simd tier's kernel: what DeepSpeed calls
//!   `offload_optimizer: {device: "cpu"}`. On the CPU engine that is the only place it could
//!   be; GPU engines take it with `offload_optimizer` and at stage 3.
//! - Stages 0–2 reducing on the host (the CPU engine on every path above; the GPU engine with
//!   `offload_optimizer`): every
//!   micro-batch but the last accumulates in the engine, and the last runs through
//!   [`TrainingEngine::loss_and_backward_streamed`], which hands each group's gradient (a layer,
//!   or the embedding, final norm and head; now final) out as soon as the backward is done
//!   with it: the layers in reverse order, the outer group last. The driver packs them whole,
//!   in that order, into buckets of about `reduce_bucket_size` elements and sums each full
//!   bucket over the ranks, all-reduce at stages 0–1, reduce-scatter at stage 2 (each rank's
//!   part of the bucket padded to the longest; a bucket so lopsided across the chunks that
//!   the padding would move more than twice it is all-reduced instead). With `overlap_comm` a
//!   communication thread (scoped to the step, owning the communicator until the last bucket
//!   is summed) runs the collectives while the backward goes on; without it they run in line,
//!   in the backward, as each bucket fills. Either way the collectives are issued in the order
//!   the buckets filled, the same on every rank, and each element is the rank-order sum of the
//!   engines' buffers, so the bits are those of reducing after the whole backward. Only the
//!   last micro-batch overlaps (the gradients are final only then), and with the default
//!   bucket size of 5·10⁸ a small model is one bucket, which nothing can overlap. The GPU
//!   engine hands each group out by copying it to the host once its kernels are done (the
//!   copy waits for them, so the device idles while it runs; the host collectives overlap).
//!   The reference engine, which cannot hand gradients out, and stateful training
//!   (`carry_state`, [`ZeroDriver::step_with`]) reduce after the backward, as before.
//! - The wall-clock breakdown reports forward and backward together (the engines fuse them;
//!   with in-line buckets their collectives are taken out), `comm` every collective's seconds
//!   wherever it ran, and `comm_overlapped` the part of them that ran on the communication
//!   thread before the backward ended (each collective counted from its start to its end or
//!   the backward's end, whichever is first), so `comm − comm_overlapped` is what the step
//!   waited for. `comms_logger` lists each bucket's collective.
//! - Stage 3 on the CPU engine reduce-scatters each layer's gradient right after that layer's
//!   backward (below). Without `overlap_comm` in line with it; with it, the gradient is queued
//!   on a communication thread (scoped to the step) and the backward goes on, and the
//!   parameter gathers go through the same thread (a relay the hook waits on) so that every
//!   collective keeps the hook's order, the same on every rank: the bits are those of the
//!   in-line run. A gather queued behind reduce-scatters waits for them, so the backward gains
//!   where the next group needs no collective (prefetched ahead) and the reduce-scatter of
//!   the last layers and the outer group; `comm_overlapped` counts the reduce-scatters'
//!   seconds while this thread was not waiting for a gather or for the thread to finish, and a
//!   gather's `comms_logger` seconds include its wait in the queue.
//! - Stage 3 keeps the parameters sharded in the driver between steps (each rank its flat
//!   chunk of the f32 master weights, with AdamW's moments) and, on an engine that steps layer
//!   by layer ([`TrainingEngine::loss_and_backward_layered`]; the simd engine), gathers them
//!   one group at a time: a group is one layer's tensors, or the *outer* group (the embedding,
//!   the final norm and an untied lm_head). For each micro-batch the engine asks for the outer
//!   group for the embedding lookup, each layer for its forward, the outer group again for the
//!   final norm and the head (kept through their backward), then each layer again, in reverse,
//!   for its backward; the driver's hook all-gathers the group from every rank's chunk (a
//!   collective per flat range of the group, not per tensor, so small tensors ride with their
//!   layer) and the engine frees it after use. Each layer's gradient is reduce-scattered into
//!   the owning ranks' chunks as soon as its backward is done and then freed; the outer
//!   group's gradient (the tied embedding's is final only after the lookup's backward) last.
//!   So the engine holds at most one group of parameters, and of gradients the outer group's
//!   plus one layer's, and no whole-model buffer exists in the engine or the driver during the
//!   step; the results are the bits of stage 2 at the same world (same rank-order sums).
//!   Details and limits:
//!   - no parameter is persistent (`stage3_param_persistence_threshold` has no effect: every
//!     tensor is gathered with its group, in the group's collective), and the outer group is
//!     gathered around its uses like a layer;
//!   - prefetch (in the driver; the engine still holds one group): when the engine asks for a group that was not gathered ahead, the hook
//!     gathers the next group of the fill order with it (their flat ranges merged where they
//!     touch, so two adjacent layers move in one collective) if that group has at most
//!     `stage3_prefetch_bucket_size` elements and both fit, with what the engine holds, in
//!     `stage3_max_live_parameters`; the next fill is then served from it. The gathers are
//!     synchronous, so this saves collectives (about half), not time overlapped with compute
//!     (with `overlap_comm`, a fill served from a prefetch does not wait behind the queued
//!     reduce-scatters).
//!     At most two groups are live (one with a live limit below two groups), plus the hook's
//!     staging buffers while a range moves (at most twice the range: a range whose parts are
//!     lopsided across the chunks moves part by part, by broadcast and all-reduce, instead of
//!     one padded all-gather and reduce-scatter). [`ZeroDriver::live_peak`] reports it; a
//!     limit below one group cannot be met and is exceeded by that group;
//!   - the GPU engine steps layer by layer too with `VET_GPU_LAYERED=1` (opt-in until it has
//!     run on a device; `gpu/src/layered.rs`): its parameter, shadow and gradient buffers
//!     become paged device memory, and only the groups in use have memory behind them;
//!   - an engine that cannot step layer by layer (the reference engine, which keeps the
//!     trait's default, and the GPU engine without `VET_GPU_LAYERED=1`) and stateful training (`carry_state`, which runs its windows through
//!     [`ZeroDriver::step_with`]) get every parameter all-gathered into the engine at the start
//!     of each step ([`ZeroDriver::sync_engine`]), as before: no memory saved over stage 2
//!     there. A checkpoint or an evaluation gathers the whole model into the engine too.
//!
//! [`Comm`]: reference::comm::Comm
//! [`TrainingEngine`]: reference::TrainingEngine
//! [`TrainingEngine::all_reduce_gradients`]: reference::TrainingEngine::all_reduce_gradients
//! [`TrainingEngine::loss_and_backward_layered`]: reference::TrainingEngine::loss_and_backward_layered
//! [`TrainingEngine::loss_and_backward_streamed`]: reference::TrainingEngine::loss_and_backward_streamed
//! [`TrainingEngine::loss_and_backward_summed`]: reference::TrainingEngine::loss_and_backward_summed
//! [`TrainingEngine::set_gradients`]: reference::TrainingEngine::set_gradients
//! [`TrainingEngine::shard_optimizer`]: reference::TrainingEngine::shard_optimizer

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
pub use zero::{sum_of_squares, StepOut, ZeroDriver};

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
