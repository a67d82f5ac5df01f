//! Progress bar, peak memory and the end-of-run summary.

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::marker::Totals;

/// What a `prepare` run did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Units in the plan (all parts).
    pub units_total: usize,
    /// Units processed by this run.
    pub units_done: usize,
    /// Units of this part kept from an earlier run (valid done-markers).
    pub units_kept: usize,
    /// Units not done yet (other parts still running), with the reason; empty when the
    /// manifest was written.
    pub missing_units: Vec<String>,
    /// The manifest, when all units were done and it was written.
    pub manifest: Option<PathBuf>,
    /// Documents and tokens over every done unit.
    pub train_docs: u64,
    pub val_docs: u64,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub shards: usize,
    /// Bad records skipped, with up to 20 "file:line: what" examples.
    pub skipped: u64,
    pub skipped_examples: Vec<String>,
    /// Input bytes this run processed (compressed bytes for compressed files), and in all.
    pub bytes_processed: u64,
    pub bytes_total: u64,
    pub elapsed: Duration,
    pub threads: usize,
    /// VmHWM of this process, when /proc/self/status is readable.
    pub peak_rss_bytes: Option<u64>,
}

impl Summary {
    pub(super) fn fill(&mut self, t: &Totals) {
        self.train_docs = t.train_docs;
        self.val_docs = t.val_docs;
        self.train_tokens = t.train.tokens;
        self.val_tokens = t.val.tokens;
        self.shards = t.train.shards.len() + t.val.shards.len();
        self.skipped = t.skipped.records;
        self.skipped_examples = t.skipped.examples.clone();
    }

    /// Prints the summary on stdout.
    pub fn print(&self) {
        const MB: f64 = 1e6;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let rate = self.bytes_processed as f64 / MB / secs;
        println!(
            "documents: {} ({} train, {} val)",
            self.train_docs + self.val_docs,
            self.train_docs,
            self.val_docs
        );
        println!(
            "tokens: {} train, {} val, in {} shards",
            self.train_tokens, self.val_tokens, self.shards
        );
        println!("skipped: {} bad records", self.skipped);
        for e in &self.skipped_examples {
            println!("  {e}");
        }
        println!(
            "units: {} of {} processed now, {} kept from an earlier run",
            self.units_done, self.units_total, self.units_kept
        );
        println!(
            "input: {:.1} MB processed of {:.1} MB in {:.1} s: {:.2} MB/s, {:.2} MB/s per thread ({} threads)",
            self.bytes_processed as f64 / MB,
            self.bytes_total as f64 / MB,
            secs,
            rate,
            rate / self.threads.max(1) as f64,
            self.threads
        );
        match self.peak_rss_bytes {
            Some(b) => println!("peak memory: {:.1} MB", b as f64 / MB),
            None => println!("peak memory: unknown (no /proc/self/status)"),
        }
        match &self.manifest {
            Some(p) => println!("manifest: {}", p.display()),
            None => {
                println!(
                    "manifest: not written yet, {} units are not done (run the other parts, then `--merge-only`):",
                    self.missing_units.len()
                );
                for m in self.missing_units.iter().take(10) {
                    println!("  {m}");
                }
            }
        }
    }
}

/// A bar over `total` input bytes on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(total: u64) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    ) {
        pb.set_style(style);
    }
    pb
}

/// Peak resident memory of this process (VmHWM), when /proc/self/status says.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
