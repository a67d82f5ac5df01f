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

/// The unlabelled series, one per line: name, type, help ([`Metrics::values`] has their
/// values in this order).
const SERIES: &str = "\
errors_total counter Requests answered with a 4xx or 5xx status.
rejected_busy_total counter Requests refused with 429 (queue full).
prompt_tokens_total counter Prompt tokens of accepted requests.
prefill_tokens_total counter Prompt tokens run through the model (cache hits skip the rest).
generated_tokens_total counter Tokens generated.
tokens_per_second gauge Generated tokens per second over the last window.
finished_total counter Generations finished.
cancelled_total counter Generations cancelled because the client disconnected.
queue_length gauge Requests waiting for a decode slot.
active_sequences gauge Sequences being decoded.
decode_steps_total counter Batched decode steps.
decode_rows_total counter Sequences summed over decode steps (rows / steps = mean batch).
decode_batch_max gauge Largest decode batch so far.
state_cache_hits_total counter Prompts that continued a cached state.
state_cache_misses_total counter Prompts that started from a zero state.
state_cache_hit_rate gauge Hits / (hits + misses).
state_cache_entries gauge States held.
state_cache_bytes gauge Bytes held by the state cache.";

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

    /// The values of [`SERIES`], in its order.
    fn values(&self) -> [String; 18] {
        let g = |c: &AtomicU64| Self::get(c).to_string();
        let queued = Self::get(&self.in_flight).saturating_sub(Self::get(&self.active));
        [
            g(&self.errors),
            g(&self.rejected_busy),
            g(&self.prompt_tokens),
            g(&self.prefill_tokens),
            g(&self.generated_tokens),
            format!("{:.3}", f64::from_bits(Self::get(&self.tokens_per_second))),
            g(&self.finished),
            g(&self.cancelled),
            queued.to_string(),
            g(&self.active),
            g(&self.decode_steps),
            g(&self.decode_rows),
            g(&self.max_batch),
            g(&self.cache_hits),
            g(&self.cache_misses),
            format!("{:.4}", self.hit_rate()),
            g(&self.cache_entries),
            g(&self.cache_bytes),
        ]
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let g = Self::get;
        let mut out = String::new();
        // The one labelled series: one HELP/TYPE, a line per endpoint.
        let _ = writeln!(
            out,
            "# HELP vet_serve_requests_total Requests received, by endpoint."
        );
        let _ = writeln!(out, "# TYPE vet_serve_requests_total counter");
        for (endpoint, c) in [
            ("chat", &self.requests_chat),
            ("completions", &self.requests_completions),
        ] {
            let _ = writeln!(
                out,
                "vet_serve_requests_total{{endpoint=\"{endpoint}\"}} {}",
                g(c)
            );
        }
        for (line, value) in SERIES.lines().zip(self.values()) {
            let mut parts = line.splitn(3, ' ');
            let (name, kind, help) = (parts.next(), parts.next(), parts.next());
            let (Some(name), Some(kind), Some(help)) = (name, kind, help) else {
                continue;
            };
            let _ = writeln!(out, "# HELP vet_serve_{name} {help}");
            let _ = writeln!(out, "# TYPE vet_serve_{name} {kind}");
            let _ = writeln!(out, "vet_serve_{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series carries its own counter: each counter gets a distinct value and the
    /// rendered line of its series must show exactly that value.
    #[test]
    fn each_series_shows_its_own_counter() {
        let m = Metrics::default();
        let counters: [(&str, &AtomicU64); 18] = [
            ("requests_total{endpoint=\"chat\"}", &m.requests_chat),
            (
                "requests_total{endpoint=\"completions\"}",
                &m.requests_completions,
            ),
            ("errors_total", &m.errors),
            ("rejected_busy_total", &m.rejected_busy),
            ("prompt_tokens_total", &m.prompt_tokens),
            ("prefill_tokens_total", &m.prefill_tokens),
            ("generated_tokens_total", &m.generated_tokens),
            ("finished_total", &m.finished),
            ("cancelled_total", &m.cancelled),
            ("active_sequences", &m.active),
            ("decode_steps_total", &m.decode_steps),
            ("decode_rows_total", &m.decode_rows),
            ("decode_batch_max", &m.max_batch),
            ("state_cache_hits_total", &m.cache_hits),
            ("state_cache_misses_total", &m.cache_misses),
            ("state_cache_entries", &m.cache_entries),
            ("state_cache_bytes", &m.cache_bytes),
            ("queue_length", &m.in_flight),
        ];
        for (i, (_, c)) in counters.iter().enumerate() {
            c.store(100 + 7 * i as u64, Ordering::Relaxed);
        }
        let text = m.render();
        let value = |name: &str| -> String {
            let prefix = format!("vet_serve_{name} ");
            let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
            assert_eq!(lines.len(), 1, "{name}: {lines:?}");
            lines[0][prefix.len()..].to_string()
        };
        for (i, (name, _)) in counters.iter().enumerate() {
            let want = 100 + 7 * i as u64;
            // The queue is in flight minus active.
            let want = if *name == "queue_length" {
                want - (100 + 7 * 9)
            } else {
                want
            };
            assert_eq!(value(name), want.to_string(), "{name}");
        }
        // hits 191, misses 198.
        assert_eq!(
            value("state_cache_hit_rate"),
            format!("{:.4}", 191.0 / 389.0)
        );
        assert_eq!(value("tokens_per_second"), "0.000");
        for l in text.lines().filter(|l| l.starts_with("# TYPE")) {
            assert!(l.ends_with(" counter") || l.ends_with(" gauge"), "{l}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("# HELP")).count(), 19);
    }
}
