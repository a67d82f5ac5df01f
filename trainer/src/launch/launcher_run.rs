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
    let mut failure: Option<Failure> = None;
    let mut signalled = 0i32;
    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    while !alive.is_empty() {
        if let Ok((rank, status)) = rx.recv_timeout(Duration::from_millis(50)) {
            alive.retain(|(r, _)| *r != rank);
            if !status.success() && failure.is_none() && signalled == 0 {
                eprintln!(
                    "launch: rank {rank} failed ({}); stopping the other ranks",
                    describe(status)
                );
                failure = Some(Failure { rank, status });
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
    Ok(report(&ranks, failure, signalled))
}

/// Prints the failing rank's error; returns the launcher's exit code.
fn report(ranks: &[Started], failure: Option<Failure>, signalled: i32) -> i32 {
    let Some(f) = failure else {
        return if signalled != 0 { 128 + signalled } else { 0 };
    };
    let tail = ranks
        .iter()
        .find(|s| s.rank == f.rank)
        .map(|s| s.tail.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default();
    let said = match tail.iter().rev().find(|l| l.starts_with("error")) {
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
            last.join("\n  ")
        }
    };
    eprintln!(
        "error: rank {} failed ({}): {said}",
        f.rank,
        describe(f.status)
    );
    code_of(f.status)
}
