//! The client side of the load test and the concurrency benchmark: one streamed request over
//! a plain loopback TCP connection, timed. (A test client only, so std's `TcpStream` and a
//! few lines of HTTP/1.1 rather than an HTTP client crate; the server itself is axum.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What one request got.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub status: u16,
    /// Time to the first generated text (streamed completions).
    pub ttft: Option<Duration>,
    pub total: Duration,
    /// From the final usage chunk (0 when absent).
    pub completion_tokens: u64,
    /// The stream ended with `data: [DONE]`.
    pub done: bool,
    /// The body of a refusal (4xx/5xx) is an OpenAI-style error.
    pub error_body: bool,
    pub retry_after: bool,
}

impl Outcome {
    /// Answered in full, or refused with a proper error body.
    pub fn clean(&self) -> bool {
        match self.status {
            200 => self.done,
            429 => self.error_body && self.retry_after,
            400..=599 => self.error_body,
            _ => false,
        }
    }
}

/// The body of a streamed completion of `max_tokens` tokens (`ignore_eos`: always that many).
pub fn completion_body(model: &str, prompt: &str, max_tokens: usize) -> String {
    serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// POSTs `body` to `path` and reads the whole (streamed) answer.
pub fn post_stream(
    addr: SocketAddr,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> std::io::Result<Outcome> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let mut ttft = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if ttft.is_none() && contains(&got, b"\"finish_reason\":null") {
            ttft = Some(start.elapsed());
        }
    }
    let total = start.elapsed();
    let text = String::from_utf8_lossy(&got);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok(Outcome {
        status,
        ttft,
        total,
        completion_tokens: number_after(rest, "\"completion_tokens\":").unwrap_or(0),
        done: rest.contains("data: [DONE]"),
        error_body: rest.contains("\"error\":{") && rest.contains("\"message\":"),
        retry_after: head.to_ascii_lowercase().contains("retry-after:"),
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.rfind(key)? + key.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The resident set size of this process in bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb << 10)
}

/// The `q`-quantile (0..=1) of `xs` (sorted in place), nearest rank.
pub fn quantile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let i = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i]
}
