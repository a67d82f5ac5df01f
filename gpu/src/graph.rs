//! The decode step as a CUDA graph: captured once per (batch size, state buffers) on the
//! decode workspace's fixed buffers, then replayed for every token. `VET_CUDA_GRAPHS=0` turns
//! it off.

use cudarc::driver::{result as drv, sys as drv_sys};
use reference::Result;

use crate::decode::StatePtrs;
use crate::engine::GpuEngine;
use crate::work::Work;

/// An instantiated decode graph.
pub struct DecodeGraph {
    graph: drv_sys::CUgraph,
    exec: drv_sys::CUgraphExec,
    /// The state the captured step updates.
    state: StatePtrs,
    /// Capture failed: run the step eagerly from now on.
    pub failed: bool,
}

impl Drop for DecodeGraph {
    fn drop(&mut self) {
        // SAFETY: created by `capture`, destroyed once.
        unsafe {
            if !self.exec.is_null() {
                let _ = drv::graph::exec_destroy(self.exec);
            }
            if !self.graph.is_null() {
                let _ = drv::graph::destroy(self.graph);
            }
        }
    }
}

fn graphs_enabled() -> bool {
    std::env::var("VET_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

fn capture(e: &GpuEngine, ws: &Work, st: StatePtrs) -> DecodeGraph {
    let stream = e.dev.cu_stream();
    let failed = DecodeGraph {
        graph: std::ptr::null_mut(),
        exec: std::ptr::null_mut(),
        state: st,
        failed: true,
    };
    // SAFETY: the stream is valid; capture only records the launches of `decode_dev`, which
    // neither allocates nor synchronises.
    unsafe {
        let mode = drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        if drv::stream::begin_capture(stream, mode).is_err() {
            return failed;
        }
        let launched = e.decode_dev(ws, st);
        let graph = drv::stream::end_capture(stream);
        let graph = match (launched, graph) {
            (Ok(()), Ok(g)) if !g.is_null() => g,
            (_, Ok(g)) => {
                if !g.is_null() {
                    let _ = drv::graph::destroy(g);
                }
                return failed;
            }
            _ => return failed,
        };
        match drv::graph::instantiate(graph, drv_sys::CUgraphInstantiate_flags(0)) {
            Ok(exec) => DecodeGraph {
                graph,
                exec,
                state: st,
                failed: false,
            },
            Err(_) => {
                let _ = drv::graph::destroy(graph);
                failed
            }
        }
    }
}

/// Runs one decode step over `ws` (tokens uploaded) on the state at `st`, capturing the
/// graph on first use (and again when the state buffers change).
pub fn run_decode(e: &mut GpuEngine, ws: &Work, st: StatePtrs) -> Result<()> {
    if !graphs_enabled() {
        return e.decode_dev(ws, st);
    }
    if e.graph.as_ref().is_none_or(|g| g.state != st) {
        e.graph = None;
        e.graph = Some(capture(e, ws, st));
    }
    let g = e.graph.as_ref().expect("graph");
    if g.failed {
        return e.decode_dev(ws, st);
    }
    // SAFETY: the graph was captured on this workspace's buffers, which are still alive
    // (a new decode workspace drops the graph first).
    unsafe { drv::graph::launch(g.exec, e.dev.cu_stream()) }
        .map_err(|err| e.dev.err("decode graph launch", err))
}

/// Whether the last decode ran through a graph.
pub fn uses_graph(e: &GpuEngine) -> bool {
    e.graph.as_ref().is_some_and(|g| !g.failed)
}
