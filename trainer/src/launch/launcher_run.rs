//! The launcher's watch loop: start the ranks, wait, stop them all when one fails or a signal
//! comes.

use std::process::{ExitCode, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{code_of, describe, plan, signal_all, spawn_rank, LaunchArgs, Plan, Started};

/// Runs `vet-train launch`; the exit code is the failing rank's (or 128 + a forwarded
/// signal's number, or 0).
pub fn launch(a: &LaunchArgs) -> ExitCode {
    match plan(a, super::count_gpus).and_then(|p| supervise(a, &p)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Which signal asked the launcher to stop (0 = none).
fn signal_flag() -> Arc<AtomicUsize> {
    let flag = Arc::new(AtomicUsize::new(0));
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        for sig in [SIGINT, SIGTERM, SIGHUP] {
            let _ = signal_hook::flag::register_usize(sig, Arc::clone(&flag), sig as usize);
        }
    }
    flag
}

/// The first failure: its rank and how it ended.
struct Failure {
    rank: usize,
    status: ExitStatus,
}

fn supervise(a: &LaunchArgs, p: &Plan) -> Result<i32> {
    let flag = signal_flag();
    eprintln!(
        "launch: ranks {}..{} of {} on this node, rendezvous at {}:{}",
        p.first_rank,
        p.first_rank + p.nproc,
        p.world,
        p.master_addr,
        p.master_port
    );
    let (tx, rx) = mpsc::channel();
    let mut ranks: Vec<Started> = Vec::with_capacity(p.nproc);
    for local in 0..p.nproc {
        match spawn_rank(p, local, &a.command, tx.clone()) {
            Ok(s) => ranks.push(s),
            Err(e) => {
                let pids: Vec<(usize, u32)> = ranks.iter().map(|s| (s.rank, s.pid)).collect();
                signal_all(&pids, 9);
                return Err(e);
            }
        }
    }
    drop(tx);
    let grace = Duration::from_secs_f64(a.stop_grace_s.max(0.0));
    let mut alive: Vec<(usize, u32)> = ranks.iter().map(|s| (s.rank, s.pid)).collect();
    let mut failures: Vec<Failure> = Vec::new();
    let mut signalled = 0i32;
    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    while !alive.is_empty() {
        if let Ok((rank, status)) = rx.recv_timeout(Duration::from_millis(50)) {
            alive.retain(|(r, _)| *r != rank);
            if !status.success() && signalled == 0 {
                failures.push(Failure { rank, status });
            }
            if failures.len() == 1 && stopping.is_none() {
                eprintln!(
                    "launch: rank {rank} failed ({}); stopping the other ranks",
                    describe(status)
                );
                signal_all(&alive, 15);
                stopping.get_or_insert_with(Instant::now);
            }
        }
        let sig = flag.swap(0, Ordering::SeqCst) as i32;
        if sig != 0 {
            if signalled != 0 {
                eprintln!("launch: signal {sig} again: killing every rank");
                signal_all(&alive, 9);
                killed = true;
            } else {
                eprintln!("launch: signal {sig}: passing it to every rank");
                signal_all(&alive, sig);
            }
            signalled = sig;
            stopping.get_or_insert_with(Instant::now);
        }
        if !killed && stopping.is_some_and(|t| t.elapsed() > grace) && !alive.is_empty() {
            let left: Vec<usize> = alive.iter().map(|(r, _)| *r).collect();
            eprintln!(
                "launch: rank(s) {left:?} did not stop within {:.0} s: killing them",
                grace.as_secs_f64()
            );
            signal_all(&alive, 9);
            killed = true;
        }
    }
    for s in &mut ranks {
        for t in s.pumps.drain(..) {
            let _ = t.join();
        }
    }
    Ok(report(&ranks, &failures, signalled))
}

/// The last `error…` line a rank printed on stderr, or its last lines.
fn last_words(ranks: &[Started], rank: usize) -> String {
    let tail = ranks
        .iter()
        .find(|s| s.rank == rank)
        .map(|s| s.tail.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default();
    match tail.iter().rev().find(|l| l.starts_with("error")) {
        Some(l) => l.clone(),
        None if tail.is_empty() => "(it printed nothing on stderr)".into(),
        None => {
            let last: Vec<&str> = tail
                .iter()
                .rev()
                .take(5)
                .rev()
                .map(|s| s.as_str())
                .collect();
            format!("its last output: {}", last.join("\n  "))
        }
    }
}

/// The rank an error line blames: a collective's error reads `rank R: op (rank P): …`.
pub(super) fn blamed(line: &str) -> Option<usize> {
    let at = line.find("(rank ")? + "(rank ".len();
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The rank whose failure started it all. A dead rank's peers see its connection close
/// before the launcher can collect its exit status, so they may be seen to fail first; their
/// errors name the rank at fault, which is followed while it too failed.
fn culprit<'a>(ranks: &[Started], failures: &'a [Failure]) -> Option<&'a Failure> {
    let mut f = failures.first()?;
    for _ in 0..failures.len() {
        let next = blamed(&last_words(ranks, f.rank))
            .filter(|p| *p != f.rank)
            .and_then(|p| failures.iter().find(|g| g.rank == p));
        match next {
            Some(g) => f = g,
            None => break,
        }
    }
    Some(f)
}

/// Prints the failing rank's error; returns the launcher's exit code.
fn report(ranks: &[Started], failures: &[Failure], signalled: i32) -> i32 {
    let Some(f) = culprit(ranks, failures) else {
        return if signalled != 0 { 128 + signalled } else { 0 };
    };
    let said = last_words(ranks, f.rank);
    eprintln!(
        "error: rank {} failed ({}): {said}",
        f.rank,
        describe(f.status)
    );
    code_of(f.status)
}
