//! The ZeRO step driver: one data-parallel optimizer step over a [`TrainingEngine`] and a
//! [`Comm`], for stages 0 to 3 (see the module docs of [`crate::dist`] for what each does
//! here).
//!
//! Gradients are averaged over ranks as DeepSpeed does, by scaling each micro-batch's
//! backward by `1 / (accum × world)` and summing over ranks. With one micro-batch per rank
//! the rank-order sum is the order a one-rank run with `world` micro-batches accumulates in,
//! so the gradients (and, without clipping, the weights) agree bit for bit with that run.
//!
//! The files of this module:
//! - `driver.rs`: [`ZeroDriver`] itself, its construction, the whole-model step (the
//!   gradients reduced in buckets after the backward, or summed where they live when the
//!   engine keeps the optimizer or its chunk of it), AdamW on the shard and the weights back
//!   to the engine;
//! - `streamed.rs`: the stages 0–2 step whose last micro-batch hands its gradients out during
//!   the backward, with the communication thread of `overlap_comm`;
//! - `bucket.rs`: the bucket packer of that step and the reducer that sums each bucket over
//!   the ranks;
//! - `stage3.rs`: the layer-by-layer stage-3 step, with its communication thread and the relay
//!   through which the hook's gathers reach it;
//! - `hook.rs`: the stage-3 hook: parameters gathered a group at a time (with prefetch), and
//!   each group's gradient reduce-scattered into this rank's chunk;
//! - `par.rs`: whole-model copies and scalings on the driver's thread pool;
//! - `ranges.rs`: flat-range bookkeeping: the range each rank's optimizer owns, each group's
//!   ranges and each rank's part of a range.
//!
//! [`Comm`]: reference::comm::Comm
//! [`TrainingEngine`]: reference::TrainingEngine

mod bucket;
mod driver;
mod hook;
pub(crate) mod par;
mod ranges;
mod stage3;
mod streamed;

use std::time::Instant;

use reference::comm::CommResult;
use reference::model::Batch;

use crate::train::source::TrainBatch;

pub use driver::ZeroDriver;
pub use par::sum_of_squares;
pub use ranges::owned;

/// One collective as `comms_logger` records it.
#[derive(Clone, Debug, PartialEq)]
pub struct CommRecord {
    pub op: &'static str,
    pub bytes: usize,
    pub secs: f64,
}

/// Seconds spent in one step, for `wall_clock_breakdown`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Breakdown {
    /// Forward and backward together (the engines fuse them).
    pub forward_backward: f64,
    /// The AdamW update on the host.
    pub step: f64,
    /// Every collective of the step, on this thread or the communication thread
    /// (`overlap_comm`), overlapped or not.
    pub comm: f64,
    /// The part of `comm` that ran on the communication thread while this rank's engine was
    /// not waiting for it (`overlap_comm` on an engine that hands its gradients out during the
    /// backward). Stages 0–2: each bucket's collective from its start to its end or to the end
    /// of the backward, whichever came first. Stage 3: each gradient's collectives less the
    /// times the engine waited for a gather (queued behind them) or for the thread to finish.
    /// `comm − comm_overlapped` is about what the step waited for.
    pub comm_overlapped: f64,
}

/// What one step did, the same on every rank.
#[derive(Clone, Debug)]
pub struct StepOut {
    /// Mean loss over every micro-batch of every rank; `None` when the step was skipped.
    pub loss: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens of the step over every rank.
    pub tokens: u64,
    pub breakdown: Breakdown,
}

/// What one rank's micro-batches of a step did: the sum of the finite losses, how many were
/// not finite, tokens read.
#[derive(Clone, Copy, Debug, Default)]
pub struct MicroOut {
    pub loss_sum: f64,
    pub bad: f64,
    pub tokens: usize,
}

impl MicroOut {
    /// Counts one micro-batch of mean loss `loss` over `tokens` tokens.
    pub fn add(&mut self, loss: f64, tokens: usize) {
        if loss.is_finite() {
            self.loss_sum += loss;
        } else {
            self.bad += 1.0;
        }
        self.tokens += tokens;
    }
}

/// The optimizer shard this rank owns: flat f32 master weights and AdamW moments over
/// `range` (flat indices; stage 0 owns every parameter).
pub type Shard = reference::engine::OptimizerShard;

/// Runs one collective, timing it into `log`.
fn timed(
    log: &mut Vec<CommRecord>,
    op: &'static str,
    bytes: usize,
    f: impl FnOnce() -> CommResult<()>,
) -> CommResult<f64> {
    let t = Instant::now();
    f()?;
    let secs = t.elapsed().as_secs_f64();
    log.push(CommRecord { op, bytes, secs });
    Ok(secs)
}

/// The batch of a micro-batch, as the engines take it.
fn batch(b: &TrainBatch) -> Batch<'_> {
    Batch {
        batch: b.batch,
        seq_len: b.seq_len,
        tokens: &b.inputs,
        resets: Some(&b.resets),
    }
}
