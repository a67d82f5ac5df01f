//! CUDA graphs: a stream's launches captured once, then replayed. The decode step uses one
//! (`decode.rs`); `VET_CUDA_GRAPHS=0` turns them off.

use cudarc::driver::{result as drv, sys as drv_sys};
use reference::Result;

use crate::cuda::Dev;

/// An instantiated graph.
pub(crate) struct Graph {
    graph: drv_sys::CUgraph,
    exec: drv_sys::CUgraphExec,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: created by `capture`, destroyed once.
        unsafe {
            let _ = drv::graph::exec_destroy(self.exec);
            let _ = drv::graph::destroy(self.graph);
        }
    }
}

pub(crate) fn graphs_enabled() -> bool {
    std::env::var("VET_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

/// Captures the launches `record` makes on `dev`'s stream into a graph; `None` when capture
/// or instantiation failed (the caller then runs the work eagerly).
///
/// # Safety
/// `record` only enqueues work on `dev`'s stream: it neither allocates, nor synchronises,
/// nor copies to or from the host; every buffer it names outlives the graph's replays.
pub(crate) unsafe fn capture(dev: &Dev, record: impl FnOnce() -> Result<()>) -> Option<Graph> {
    let stream = dev.cu_stream();
    // SAFETY: the stream is valid; the caller vouches that `record` is capturable.
    unsafe {
        let mode = drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        drv::stream::begin_capture(stream, mode).ok()?;
        let launched = record();
        let graph = drv::stream::end_capture(stream);
        let graph = match (launched, graph) {
            (Ok(()), Ok(g)) if !g.is_null() => g,
            (_, Ok(g)) => {
                if !g.is_null() {
                    let _ = drv::graph::destroy(g);
                }
                return None;
            }
            _ => return None,
        };
        match drv::graph::instantiate(graph, drv_sys::CUgraphInstantiate_flags(0)) {
            Ok(exec) => Some(Graph { graph, exec }),
            Err(_) => {
                let _ = drv::graph::destroy(graph);
                None
            }
        }
    }
}

impl Graph {
    /// Replays the graph on `dev`'s stream.
    ///
    /// # Safety
    /// Every buffer the captured work names is still alive.
    pub(crate) unsafe fn launch(&self, dev: &Dev) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { drv::graph::launch(self.exec, dev.cu_stream()) }
            .map_err(|err| dev.err("decode graph launch", err))
    }
}
