//! Per-launch device times: with `VET_PROFILE=1` every kernel launch and GEMM of a [`Dev`] is
//! bracketed by two CUDA events, labelled by the current tag (the projection or step the
//! engine is in, set with [`Dev::tag`]) and the kernel's name or the GEMM's shape. The table
//! ([`Profiler::table`]) sums the times per label. `gpu-bench profile` prints it for one
//! training step. Off (the default), a launch costs one branch more.
//!
//! The events add a few microseconds of host time per launch, so the step is slower while
//! profiling; the device times of the kernels themselves are not changed.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::{result as drv, sys as drv_sys};

use crate::cuda::Dev;

/// One timed launch: its label and its two events.
struct Rec {
    label: String,
    start: drv_sys::CUevent,
    end: drv_sys::CUevent,
}

#[derive(Default)]
struct Inner {
    tag: &'static str,
    recs: Vec<Rec>,
}

/// The launches recorded since the last [`Profiler::reset`].
pub struct Profiler {
    inner: Mutex<Inner>,
}

// SAFETY: the events are plain driver handles of the device's context; every use binds the
// context first (the engine's entry points do) and the mutex serialises access.
unsafe impl Send for Profiler {}
// SAFETY: see `Send`.
unsafe impl Sync for Profiler {}

/// Whether `VET_PROFILE=1` asks for per-launch times.
pub fn profile_enabled() -> bool {
    std::env::var("VET_PROFILE").is_ok_and(|v| v == "1")
}

/// One row of the table: label, launches, total device milliseconds.
#[derive(Clone, Debug)]
pub struct ProfileRow {
    pub label: String,
    pub count: usize,
    pub ms: f64,
}

impl Profiler {
    pub fn new() -> Profiler {
        Profiler {
            inner: Mutex::new(Inner {
                tag: "-",
                recs: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_tag(&self, tag: &'static str) {
        self.lock().tag = tag;
    }

    /// Records a start event on `stream`; `None` when the event could not be made.
    pub(crate) fn start(&self, stream: drv_sys::CUstream) -> Option<drv_sys::CUevent> {
        let ev = drv::event::create(drv_sys::CUevent_flags::CU_EVENT_DEFAULT).ok()?;
        // SAFETY: a fresh event and the device's stream, in the current context.
        match unsafe { drv::event::record(ev, stream) } {
            Ok(()) => Some(ev),
            Err(_) => {
                // SAFETY: created above, not recorded.
                let _ = unsafe { drv::event::destroy(ev) };
                None
            }
        }
    }

    /// Records the end event of a launch that `start` began, labelled `what` after the tag.
    pub(crate) fn end(&self, stream: drv_sys::CUstream, start: drv_sys::CUevent, what: &str) {
        let Some(end) = self.start(stream) else {
            // SAFETY: `start` came from `Profiler::start` and is dropped from the record.
            let _ = unsafe { drv::event::destroy(start) };
            return;
        };
        let mut g = self.lock();
        let label = format!("{} {what}", g.tag);
        g.recs.push(Rec { label, start, end });
    }

    /// Forgets every recorded launch.
    pub fn reset(&self) {
        let recs = std::mem::take(&mut self.lock().recs);
        for r in recs {
            // SAFETY: each event was created by `start` and is destroyed once here.
            unsafe {
                let _ = drv::event::destroy(r.start);
                let _ = drv::event::destroy(r.end);
            }
        }
    }

    /// Device time per label since the last reset, largest first, and the span from the
    /// first start to the last end (ms). Waits for the recorded work.
    pub fn rows(&self) -> (Vec<ProfileRow>, f64) {
        let g = self.lock();
        let mut by: HashMap<&str, (usize, f64, usize)> = HashMap::new();
        for (i, r) in g.recs.iter().enumerate() {
            // SAFETY: both events were recorded on the device's stream.
            let ms = unsafe {
                let _ = drv::event::synchronize(r.end);
                drv::event::elapsed(r.start, r.end).unwrap_or(0.0)
            };
            let e = by.entry(&r.label).or_insert((0, 0.0, i));
            e.0 += 1;
            e.1 += ms as f64;
        }
        let span = match (g.recs.first(), g.recs.last()) {
            // SAFETY: as above.
            (Some(a), Some(b)) => unsafe { drv::event::elapsed(a.start, b.end).unwrap_or(0.0) },
            _ => 0.0,
        } as f64;
        let mut rows: Vec<ProfileRow> = by
            .into_iter()
            .map(|(label, (count, ms, _))| ProfileRow {
                label: label.to_string(),
                count,
                ms,
            })
            .collect();
        rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.label.cmp(&b.label)));
        (rows, span)
    }
}

impl Default for Profiler {
    fn default() -> Self {
        Profiler::new()
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        self.reset();
    }
}

impl Dev {
    /// Names what the next launches belong to in the profile (no effect unless profiling).
    pub fn tag(&self, tag: &'static str) {
        if let Some(p) = &self.prof {
            p.set_tag(tag);
        }
    }

    /// Runs `launch`, bracketed by events labelled `what()` while profiling.
    pub(crate) fn timed<T>(
        &self,
        what: impl FnOnce() -> String,
        launch: impl FnOnce() -> reference::Result<T>,
    ) -> reference::Result<T> {
        let Some(p) = &self.prof else {
            return launch();
        };
        let stream = self.cu_stream();
        let start = p.start(stream);
        let r = launch();
        if let Some(s) = start {
            p.end(stream, s, &what());
        }
        r
    }
}

/// Formats profile rows as a Markdown table with each row's share of `total_ms`.
pub fn format_table(rows: &[ProfileRow], total_ms: f64) -> String {
    let mut s = String::from("| step / kernel | launches | ms | % |\n|---|---:|---:|---:|\n");
    for r in rows {
        s += &format!(
            "| {} | {} | {:.3} | {:.1} |\n",
            r.label,
            r.count,
            r.ms,
            100.0 * r.ms / total_ms.max(1e-9)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{format_table, ProfileRow};

    #[test]
    fn the_table_gives_each_rows_share_of_the_total() {
        let rows = [
            ProfileRow {
                label: "in_proj gemm".into(),
                count: 24,
                ms: 30.0,
            },
            ProfileRow {
                label: "scan selective_scan_fwd_f32".into(),
                count: 24,
                ms: 10.0,
            },
        ];
        let t = format_table(&rows, 40.0);
        assert!(t.contains("| in_proj gemm | 24 | 30.000 | 75.0 |"), "{t}");
        assert!(
            t.contains("| scan selective_scan_fwd_f32 | 24 | 10.000 | 25.0 |"),
            "{t}"
        );
    }
}
