//! Collective communication between the ranks of a data-parallel job (see DESIGN.md and
//! DeepSpeed's ZeRO): the five collectives a sharded trainer needs, behind one small trait.
//!
//! Implementations: NCCL (`gpu` crate) for real runs, ranks as threads of one process for tests,
//! and a TCP one for CPU ranks in separate processes (`trainer`). Every implementation
//! reduces in a fixed order, so two runs with the same world size give the same bits.
//!
//! Buffers are host slices. Lengths must agree on every rank; a collective whose lengths do
//! not is an error on every rank, never a hang.

use std::fmt;

mod in_process;

pub use self::in_process::{InProcess, DEFAULT_TIMEOUT};

/// What went wrong in a collective. `rank` is the rank that reports it; `peer` names the
/// rank that failed or went missing, where known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommError {
    pub rank: usize,
    pub peer: Option<usize>,
    pub op: &'static str,
    pub msg: String,
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {}: {}", self.rank, self.op)?;
        if let Some(p) = self.peer {
            write!(f, " (rank {p})")?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for CommError {}

impl From<CommError> for crate::Error {
    fn from(e: CommError) -> crate::Error {
        crate::Error::Device {
            device: format!("rank {}", e.rank),
            msg: e.to_string(),
        }
    }
}

pub type CommResult<T> = std::result::Result<T, CommError>;

/// The collectives of a data-parallel job. Every rank calls the same collectives in the same
/// order with the same lengths. Sums are over ranks in rank order `((r0 + r1) + r2) + ...`
/// where the implementation controls the order (in-process, TCP); NCCL's order is fixed for
/// a fixed world size and topology.
pub trait Comm: Send {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Sum of `data` over every rank, left in `data` on every rank.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> CommResult<()>;
    /// [`Comm::all_reduce_sum`] in f64 (losses, token counts, gradient norms).
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> CommResult<()>;
    /// `input` (`world() × output.len()`) summed over ranks; rank `r` keeps chunk `r`.
    fn reduce_scatter_sum(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()>;
    /// Every rank's `input` concatenated in rank order into `output`
    /// (`world() × input.len()`).
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()>;
    /// `data` from rank `root` copied to every rank.
    fn broadcast(&mut self, data: &mut [u8], root: usize) -> CommResult<()>;
    /// Returns when every rank has called it.
    fn barrier(&mut self) -> CommResult<()>;
    /// Sum over every rank of `len` f32 at the device address `ptr`, in place, where this
    /// communicator reaches device memory (NCCL); `Ok(false)` where it does not, and the
    /// caller reduces a host copy instead. The caller's writes to that memory are complete
    /// (its stream synchronised), and the sum is in place when this returns. Every rank calls
    /// it with the same `len`.
    fn all_reduce_sum_device(&mut self, ptr: u64, len: usize) -> CommResult<bool> {
        let _ = (ptr, len);
        Ok(false)
    }
    /// Reduce-scatter in place in device memory: `ptr` holds `world() × chunk` f32, and rank
    /// `r`'s chunk `r` (`ptr + 4·r·chunk`) becomes the sum over ranks of that chunk; the other
    /// chunks are left undefined. `Ok(false)` where this communicator does not reach device
    /// memory (nothing is touched). The same contract as
    /// [`Comm::all_reduce_sum_device`] otherwise.
    fn reduce_scatter_sum_device(&mut self, ptr: u64, chunk: usize) -> CommResult<bool> {
        let _ = (ptr, chunk);
        Ok(false)
    }
    /// All-gather in place in device memory: `ptr` holds `world() × chunk` f32 and rank `r`
    /// supplies chunk `r`; every rank ends with every chunk. `Ok(false)` where this
    /// communicator does not reach device memory.
    fn all_gather_device(&mut self, ptr: u64, chunk: usize) -> CommResult<bool> {
        let _ = (ptr, chunk);
        Ok(false)
    }
    /// Queues the sum over every rank of `len` f32 at the device address `ptr`, in place, and
    /// returns without waiting for it: on every rank (`root` `None`, an all-reduce) or on rank
    /// `root` only (a reduce; the other ranks' memory is left as it was). The collective
    /// starts once the device work queued so far on the stream `after` (a `CUstream` of the
    /// same context, as an integer) is done, so an engine can queue a bucket of gradients
    /// while its backward goes on. [`Comm::wait_device`] waits for every queued collective.
    /// Every rank queues the same calls in the same order. `Ok(false)` where this
    /// communicator does not reach device memory (nothing is queued).
    fn reduce_sum_device_queued(
        &mut self,
        ptr: u64,
        len: usize,
        root: Option<usize>,
        after: u64,
    ) -> CommResult<bool> {
        let _ = (ptr, len, root, after);
        Ok(false)
    }
    /// Waits for every collective [`Comm::reduce_sum_device_queued`] queued.
    fn wait_device(&mut self) -> CommResult<()> {
        Ok(())
    }
}

/// The error for lengths that do not fit a collective.
pub fn length_error(rank: usize, op: &'static str, msg: String) -> CommError {
    CommError {
        rank,
        peer: None,
        op,
        msg,
    }
}

/// The message for a reduce-scatter or all-gather whose long buffer is not `world ×` its
/// short one, e.g. `("input", 10)`, `4`, `("output", 3)`; `None` when the lengths fit. Every
/// implementation checks with it, so they all name a mismatch the same way.
pub fn world_multiple_mismatch(
    long: (&str, usize),
    world: usize,
    short: (&str, usize),
) -> Option<String> {
    (long.1 != world * short.1).then(|| {
        format!(
            "{} has {} elements, expected world {world} × {} {}",
            long.0, long.1, short.0, short.1
        )
    })
}
