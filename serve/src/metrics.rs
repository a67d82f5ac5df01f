//! Counters behind `GET /metrics`, in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Every counter the server keeps; shared by the HTTP handlers and the decode loop.
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests_chat: AtomicU64,
    pub requests_completions: AtomicU64,
    /// Requests answered with a 4xx or 5xx status.
    pub errors: AtomicU64,
    /// 429s: the queue was full.
    pub rejected_busy: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Tokens actually run through a prefill (prompt tokens minus those a cache hit skipped).
    pub prefill_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub finished: AtomicU64,
    /// Generations stopped because their client went away.
    pub cancelled: AtomicU64,
    /// Requests accepted and not finished (waiting or decoding).
    pub in_flight: AtomicU64,
    /// Sequences in the decode batch.
    pub active: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Sum of the batch sizes of all decode steps, and the largest.
    pub decode_rows: AtomicU64,
    pub max_batch: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_entries: AtomicU64,
    pub cache_bytes: AtomicU64,
    /// Decode tokens per second over the last few seconds (f64 bits).
    pub tokens_per_second: AtomicU64,
    /// (window start, tokens in it) for `tokens_per_second`.
    pub window: Mutex<Option<(std::time::Instant, u64)>>,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        add(c, 1);
    }

    pub fn add(c: &AtomicU64, n: u64) {
        add(c, n);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Records one decode step of `rows` sequences.
    pub fn step(&self, rows: u64) {
        add(&self.decode_steps, 1);
        add(&self.decode_rows, rows);
        self.max_batch.fetch_max(rows, Ordering::Relaxed);
    }

    /// Counts `n` generated tokens and refreshes the tokens/s gauge (a 2 s window).
    pub fn generated(&self, n: u64) {
        add(&self.generated_tokens, n);
        let now = std::time::Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let (start, count) = w.get_or_insert((now, 0));
        *count += n;
        let secs = now.duration_since(*start).as_secs_f64();
        if secs >= 2.0 {
            let rate = *count as f64 / secs;
            self.tokens_per_second
                .store(rate.to_bits(), Ordering::Relaxed);
            *w = Some((now, 0));
        }
    }

    /// The cache hit rate so far (0 before any lookup).
    pub fn hit_rate(&self) -> f64 {
        let (h, m) = (Self::get(&self.cache_hits), Self::get(&self.cache_misses));
        if h + m == 0 {
            0.0
        } else {
            h as f64 / (h + m) as f64
        }
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let g = Self::get;
        let queued = g(&self.in_flight).saturating_sub(g(&self.active));
        let mut out = String::new();
        let c = |n: u64| n.to_string();
        // Labelled series are written by hand: one HELP/TYPE, several lines.
        let _ = writeln!(
            out,
            "# HELP vet_serve_requests_total Requests received, by endpoint."
        );
        let _ = writeln!(out, "# TYPE vet_serve_requests_total counter");
        let _ = writeln!(
            out,
            "vet_serve_requests_total{{endpoint=\"chat\"}} {}",
            g(&self.requests_chat)
        );
        let _ = writeln!(
            out,
            "vet_serve_requests_total{{endpoint=\"completions\"}} {}",
            g(&self.requests_completions)
        );
        let mut m = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP vet_serve_{name} {help}");
            let _ = writeln!(out, "# TYPE vet_serve_{name} {kind}");
            let _ = writeln!(out, "vet_serve_{name} {value}");
        };
        m(
            "errors_total",
            "counter",
            "Requests answered with a 4xx or 5xx status.",
            c(g(&self.errors)),
        );
        m(
            "rejected_busy_total",
            "counter",
            "Requests refused with 429 (queue full).",
            c(g(&self.rejected_busy)),
        );
        m(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of accepted requests.",
            c(g(&self.prompt_tokens)),
        );
        m(
            "prefill_tokens_total",
            "counter",
            "Prompt tokens run through the model (cache hits skip the rest).",
            c(g(&self.prefill_tokens)),
        );
        m(
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            c(g(&self.generated_tokens)),
        );
        m(
            "tokens_per_second",
            "gauge",
            "Generated tokens per second over the last window.",
            format!("{:.3}", f64::from_bits(g(&self.tokens_per_second))),
        );
        m(
            "finished_total",
            "counter",
            "Generations finished.",
            c(g(&self.finished)),
        );
        m(
            "cancelled_total",
            "counter",
            "Generations cancelled because the client disconnected.",
            c(g(&self.cancelled)),
        );
        m(
            "queue_length",
            "gauge",
            "Requests waiting for a decode slot.",
            c(queued),
        );
        m(
            "active_sequences",
            "gauge",
            "Sequences being decoded.",
            c(g(&self.active)),
        );
        m(
            "decode_steps_total",
            "counter",
            "Batched decode steps.",
            c(g(&self.decode_steps)),
        );
        m(
            "decode_rows_total",
            "counter",
            "Sequences summed over decode steps (rows / steps = mean batch).",
            c(g(&self.decode_rows)),
        );
        m(
            "decode_batch_max",
            "gauge",
            "Largest decode batch so far.",
            c(g(&self.max_batch)),
        );
        m(
            "state_cache_hits_total",
            "counter",
            "Prompts that continued a cached state.",
            c(g(&self.cache_hits)),
        );
        m(
            "state_cache_misses_total",
            "counter",
            "Prompts that started from a zero state.",
            c(g(&self.cache_misses)),
        );
        m(
            "state_cache_hit_rate",
            "gauge",
            "Hits / (hits + misses).",
            format!("{:.4}", self.hit_rate()),
        );
        m(
            "state_cache_entries",
            "gauge",
            "States held.",
            c(g(&self.cache_entries)),
        );
        m(
            "state_cache_bytes",
            "gauge",
            "Bytes held by the state cache.",
            c(g(&self.cache_bytes)),
        );
        out
    }
}
