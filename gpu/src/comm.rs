//! [`Nccl`]: `reference::comm::Comm` through NCCL (`cudarc::nccl`), one process per GPU.
//!
//! Rank 0 makes the unique id with [`unique_id`]; the launcher's rendezvous ships its 128
//! bytes to the other ranks, and every rank then calls [`Nccl::new`].
//!
//! For now every collective takes host slices: the data is staged through device buffers
//! (copy in, collective on this communicator's own stream, copy out, synchronise). That costs
//! two PCIe copies per collective; engines that keep gradients on the device use the
//! device-slice entry points beside the trait. The staging buffers are kept and grown on
//! demand, so that a collective allocates no device memory once the largest has run.
//!
//! At world size 1 the host collectives touch no device: NCCL's sum over one rank, its
//! broadcast and its all-gather return the input, so an all-reduce or a broadcast leaves the
//! data as it is and a reduce-scatter or an all-gather copies its input (the same bits).
//!
//! NCCL's reduction order is fixed for a fixed world size and topology, so a run is
//! reproducible at the same world size. NVLink multicast (NVLS) is never turned on here, and
//! the NCCL environment is left as the machine sets it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, DriverError,
};
use cudarc::nccl::safe::{Comm as NcclComm, Id, ReduceOp};
use reference::comm::{length_error, world_multiple_mismatch, Comm, CommError, CommResult};

/// An error of this rank's NCCL communicator.
fn nccl_err(rank: usize, op: &'static str, e: impl std::fmt::Debug) -> CommError {
    CommError {
        rank,
        peer: None,
        op,
        msg: format!("{e:?}"),
    }
}

/// A fresh NCCL unique id (call on rank 0 only), as the 128 bytes the rendezvous ships.
pub fn unique_id() -> CommResult<[u8; 128]> {
    let id = catch_unwind(Id::new)
        .map_err(|_| nccl_err(0, "unique_id", "the NCCL library could not be loaded"))?
        .map_err(|e| nccl_err(0, "unique_id", e))?;
    let mut out = [0u8; 128];
    for (o, &c) in out.iter_mut().zip(id.internal().iter()) {
        *o = c as u8;
    }
    Ok(out)
}

/// One rank of an NCCL communicator on one GPU.
pub struct Nccl {
    comm: NcclComm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    /// Device staging of the f32 host collectives, kept between calls and grown on demand:
    /// the input (the all-reduce's buffer in place) and the output.
    send: Option<CudaSlice<f32>>,
    recv: Option<CudaSlice<f32>>,
    /// Marks the caller's stream for [`Comm::reduce_sum_device_queued`] (made at its first
    /// use): recorded there, waited on by this communicator's stream.
    after: Option<CudaEvent>,
}

/// `dst = src` (equal lengths) split over the machine's cores: at world size 1 a
/// reduce-scatter or an all-gather copies a whole model, gigabytes, which one thread copies at
/// a fraction of the memory bandwidth.
fn copy_host(dst: &mut [f32], src: &[f32]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let piece = src.len().div_ceil(threads).max(1 << 20);
    if src.len() <= piece {
        dst.copy_from_slice(src);
        return;
    }
    std::thread::scope(|s| {
        for (d, x) in dst.chunks_mut(piece).zip(src.chunks(piece)) {
            s.spawn(move || d.copy_from_slice(x));
        }
    });
}

/// `buf`, replaced by a larger one where it holds fewer than `len` elements.
fn staging<'a>(
    stream: &Arc<CudaStream>,
    buf: &'a mut Option<CudaSlice<f32>>,
    len: usize,
) -> Result<&'a mut CudaSlice<f32>, DriverError> {
    if buf.as_ref().is_none_or(|b| b.len() < len) {
        *buf = None; // the old buffer goes before the new one is made
        *buf = Some(stream.alloc_zeros::<f32>(len)?);
    }
    Ok(buf.as_mut().expect("made above"))
}

// SAFETY: the communicator and its stream are used by one thread at a time (every method
// takes `&mut self`); NCCL and CUDA allow a communicator to move between threads as long as
// its calls are not concurrent, and the context is bound on the calling thread before use.
unsafe impl Send for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl(rank {} of {})", self.rank, self.world)
    }
}

impl Nccl {
    /// Joins the communicator `id` (from rank 0's [`unique_id`]) as `rank` of `world` on GPU
    /// `ordinal`. Blocks until every rank has joined (NCCL's own init).
    pub fn new(rank: usize, world: usize, id: &[u8; 128], ordinal: usize) -> CommResult<Nccl> {
        let op = "nccl_init";
        if rank >= world {
            return Err(length_error(
                rank,
                op,
                format!("rank {rank} of a world of {world}"),
            ));
        }
        let ctx = catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| nccl_err(rank, op, "the CUDA driver could not be loaded"))?
            .map_err(|e| nccl_err(rank, op, e))?;
        let stream = ctx.new_stream().map_err(|e| nccl_err(rank, op, e))?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, &b) in internal.iter_mut().zip(id) {
            *d = b as std::ffi::c_char;
        }
        let comm = catch_unwind(AssertUnwindSafe(|| {
            NcclComm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
        }))
        .map_err(|_| nccl_err(rank, op, "the NCCL library could not be loaded"))?
        .map_err(|e| nccl_err(rank, op, e))?;
        Ok(Nccl {
            comm,
            stream,
            rank,
            world,
            send: None,
            recv: None,
            after: None,
        })
    }

    fn bind(&self, op: &'static str) -> CommResult<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err(self.rank, op, e))
    }

    fn sync(&self, op: &'static str) -> CommResult<()> {
        self.stream
            .synchronize()
            .map_err(|e| nccl_err(self.rank, op, e))
    }

    /// A collective from host `input` into host `output` (lengths already checked), staged
    /// through the kept device buffers; nothing to do when either is empty.
    fn staged(
        &mut self,
        op: &'static str,
        input: &[f32],
        output: &mut [f32],
        collective: impl FnOnce(
            &NcclComm,
            &CudaView<f32>,
            &mut CudaViewMut<f32>,
        ) -> Result<
            cudarc::nccl::result::NcclStatus,
            cudarc::nccl::result::NcclError,
        >,
    ) -> CommResult<()> {
        if input.is_empty() || output.is_empty() {
            return Ok(());
        }
        self.bind(op)?;
        let rank = self.rank;
        let e = |x: String| nccl_err(rank, op, x);
        let (n_in, n_out) = (input.len(), output.len());
        let send = staging(&self.stream, &mut self.send, n_in).map_err(|x| e(format!("{x:?}")))?;
        let recv = staging(&self.stream, &mut self.recv, n_out).map_err(|x| e(format!("{x:?}")))?;
        self.stream
            .memcpy_htod(input, &mut send.slice_mut(..n_in))
            .map_err(|x| e(format!("{x:?}")))?;
        let mut dst = recv.slice_mut(..n_out);
        collective(&self.comm, &send.slice(..n_in), &mut dst).map_err(|x| e(format!("{x:?}")))?;
        self.stream
            .memcpy_dtoh(&dst, output)
            .map_err(|x| e(format!("{x:?}")))?;
        self.sync(op)
    }

    /// All-reduce (sum) of host f32 staged through the kept device buffer, in place; nothing
    /// to do at world size 1 (a sum over one rank).
    fn all_reduce_f32(&mut self, data: &mut [f32], op: &'static str) -> CommResult<()> {
        if data.is_empty() || self.world == 1 {
            return Ok(());
        }
        self.bind(op)?;
        let rank = self.rank;
        let e = |x: String| nccl_err(rank, op, x);
        let n = data.len();
        let buf = staging(&self.stream, &mut self.send, n).map_err(|x| e(format!("{x:?}")))?;
        let mut d = buf.slice_mut(..n);
        self.stream
            .memcpy_htod(&*data, &mut d)
            .map_err(|x| e(format!("{x:?}")))?;
        self.comm
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(|x| e(format!("{x:?}")))?;
        self.stream
            .memcpy_dtoh(&d, data)
            .map_err(|x| e(format!("{x:?}")))?;
        self.sync(op)
    }

    /// All-reduce (sum) of a few host values staged through a fresh device buffer, element
    /// type `T`; nothing to do at world size 1.
    fn all_reduce_host<T>(&mut self, data: &mut [T], op: &'static str) -> CommResult<()>
    where
        T: cudarc::nccl::safe::NcclType
            + cudarc::driver::DeviceRepr
            + cudarc::driver::ValidAsZeroBits
            + Copy,
    {
        if data.is_empty() || self.world == 1 {
            return Ok(());
        }
        self.bind(op)?;
        let e = |x| nccl_err(self.rank, op, x);
        let mut d = self
            .stream
            .clone_htod(data)
            .map_err(|x| e(format!("{x:?}")))?;
        self.comm
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(|x| e(format!("{x:?}")))?;
        self.stream
            .memcpy_dtoh(&d, data)
            .map_err(|x| e(format!("{x:?}")))?;
        self.sync(op)
    }
}

impl Comm for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> CommResult<()> {
        self.all_reduce_f32(data, "all_reduce_sum")
    }

    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> CommResult<()> {
        self.all_reduce_host(data, "all_reduce_sum_f64")
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        let op = "reduce_scatter_sum";
        let mismatch =
            world_multiple_mismatch(("input", input.len()), self.world, ("output", output.len()));
        if let Some(msg) = mismatch {
            return Err(length_error(self.rank, op, msg));
        }
        if self.world == 1 {
            copy_host(output, input);
            return Ok(());
        }
        self.staged(op, input, output, |comm, src, dst| {
            comm.reduce_scatter(src, dst, &ReduceOp::Sum)
        })
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        let op = "all_gather";
        let mismatch =
            world_multiple_mismatch(("output", output.len()), self.world, ("input", input.len()));
        if let Some(msg) = mismatch {
            return Err(length_error(self.rank, op, msg));
        }
        if self.world == 1 {
            copy_host(output, input);
            return Ok(());
        }
        self.staged(op, input, output, |comm, src, dst| {
            comm.all_gather(src, dst)
        })
    }

    fn broadcast(&mut self, data: &mut [u8], root: usize) -> CommResult<()> {
        let op = "broadcast";
        if root >= self.world {
            return Err(length_error(
                self.rank,
                op,
                format!("root {root} of a world of {}", self.world),
            ));
        }
        if data.is_empty() || self.world == 1 {
            return Ok(());
        }
        self.bind(op)?;
        let e = |x: String| nccl_err(self.rank, op, x);
        let mut d = self
            .stream
            .clone_htod(data)
            .map_err(|x| e(format!("{x:?}")))?;
        self.comm
            .broadcast_in_place(&mut d, root as i32)
            .map_err(|x| e(format!("{x:?}")))?;
        self.stream
            .memcpy_dtoh(&d, data)
            .map_err(|x| e(format!("{x:?}")))?;
        self.sync(op)
    }

    fn barrier(&mut self) -> CommResult<()> {
        // NCCL has no barrier: an all-reduce of one value is one.
        let mut one = [0.0f32];
        self.all_reduce_host(&mut one, "barrier")
    }

    fn all_reduce_sum_device(&mut self, ptr: u64, len: usize) -> CommResult<bool> {
        let op = "all_reduce_sum_device";
        if len == 0 {
            return Ok(true);
        }
        self.bind(op)?;
        let mut buf = self.device(ptr, len);
        self.comm
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|x| nccl_err(self.rank, op, x))?;
        self.sync(op)?;
        Ok(true)
    }

    fn reduce_scatter_sum_device(&mut self, ptr: u64, chunk: usize) -> CommResult<bool> {
        let op = "reduce_scatter_sum_device";
        if chunk == 0 {
            return Ok(true);
        }
        self.bind(op)?;
        // NCCL's in-place form: the output is the rank's own chunk of the input.
        let src = self.device(ptr, self.world * chunk);
        let mut dst = self.device(ptr + (4 * self.rank * chunk) as u64, chunk);
        self.comm
            .reduce_scatter(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|x| nccl_err(self.rank, op, x))?;
        self.sync(op)?;
        Ok(true)
    }

    fn all_gather_device(&mut self, ptr: u64, chunk: usize) -> CommResult<bool> {
        let op = "all_gather_device";
        if chunk == 0 {
            return Ok(true);
        }
        self.bind(op)?;
        // NCCL's in-place form: the input is the rank's own chunk of the output.
        let src = self.device(ptr + (4 * self.rank * chunk) as u64, chunk);
        let mut dst = self.device(ptr, self.world * chunk);
        self.comm
            .all_gather(&src, &mut dst)
            .map_err(|x| nccl_err(self.rank, op, x))?;
        self.sync(op)?;
        Ok(true)
    }

    fn reduce_sum_device_queued(
        &mut self,
        ptr: u64,
        len: usize,
        root: Option<usize>,
        after: u64,
    ) -> CommResult<bool> {
        let op = "reduce_sum_device_queued";
        if let Some(r) = root.filter(|&r| r >= self.world) {
            return Err(length_error(
                self.rank,
                op,
                format!("root {r} of a world of {}", self.world),
            ));
        }
        if len == 0 {
            return Ok(true);
        }
        self.bind(op)?;
        if self.after.is_none() {
            let ev = self
                .stream
                .context()
                .new_event(None)
                .map_err(|x| nccl_err(self.rank, op, x))?;
            self.after = Some(ev);
        }
        let ev = self.after.as_ref().expect("made above").cu_event();
        // SAFETY: `after` is a live stream of this context (the caller's contract) and the
        // event is this communicator's own. The wait takes the event as recorded now, so the
        // next call may record it again.
        unsafe {
            cudarc::driver::result::event::record(ev, after as _).and_then(|()| {
                cudarc::driver::result::stream::wait_event(
                    self.stream.cu_stream(),
                    ev,
                    cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            })
        }
        .map_err(|x| nccl_err(self.rank, op, x))?;
        let mut buf = self.device(ptr, len);
        match root {
            None => self.comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum),
            Some(r) => {
                let src = self.device(ptr, len);
                let dst = (r == self.rank).then_some(&mut buf);
                self.comm.reduce(&src, dst, &ReduceOp::Sum, r as i32)
            }
        }
        .map_err(|x| nccl_err(self.rank, op, x))?;
        Ok(true)
    }

    fn wait_device(&mut self) -> CommResult<()> {
        self.bind("wait_device")?;
        self.sync("wait_device")
    }
}

impl Nccl {
    /// `len` f32 of another owner's device memory at `ptr`, on this communicator's stream.
    fn device(&self, ptr: u64, len: usize) -> DeviceF32 {
        DeviceF32 {
            ptr,
            len,
            stream: self.stream.clone(),
        }
    }
}

/// `len` f32 of device memory another owner allocated (an engine's flat gradient buffer in
/// the same context), seen by NCCL as a slice on this communicator's stream. The owner has
/// synchronised its writes before the collective (or, for
/// [`Comm::reduce_sum_device_queued`], this stream waits for an event on the owner's), and
/// the collectives synchronise this stream before returning (the queued ones before
/// [`Comm::wait_device`] returns), so no event tracking is needed.
struct DeviceF32 {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
}

impl cudarc::driver::DeviceSlice<f32> for DeviceF32 {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl cudarc::driver::DevicePtr<f32> for DeviceF32 {
    fn device_ptr<'a>(
        &'a self,
        _stream: &'a CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        (self.ptr, cudarc::driver::SyncOnDrop::Sync(None))
    }
}

impl cudarc::driver::DevicePtrMut<f32> for DeviceF32 {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        (self.ptr, cudarc::driver::SyncOnDrop::Sync(None))
    }
}

#[cfg(test)]
mod tests {
    use super::copy_host;

    #[test]
    fn copy_host_copies_every_element() {
        for n in [0, 5, (1 << 20) + 3, 5 << 20] {
            let src: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
            let mut dst = vec![f32::NAN; n];
            copy_host(&mut dst, &src);
            assert!(dst
                .iter()
                .zip(&src)
                .all(|(d, s)| d.to_bits() == s.to_bits()));
        }
    }
}
