//! What the three binaries share at their edge: how an error is printed and which exit code a
//! run ends with.
//!
//! `fn main() -> anyhow::Result<()>` prints the error with `{:?}`, which dumps a backtrace
//! whenever `RUST_BACKTRACE` is set: a user's plain mistake would then read like a crash.
//! [`finish`] prints `error: {:#}` (the message and its causes on one line) instead, the
//! same with or without the variable.
//!
//! Ctrl-C and SIGTERM stop training cleanly (the loop checkpoints and returns), but a
//! scheduler must still see the interruption: the run then exits 128 + the signal's number,
//! as shells and other tools do (130 for SIGINT, 143 for SIGTERM). `signal-hook` records which
//! signal came; `ctrlc` (used by vet-chat) cannot tell them apart.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The signal that asked the process to stop (0 = none yet).
static STOP_SIGNAL: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();

fn stop_flag() -> &'static Arc<AtomicUsize> {
    STOP_SIGNAL.get_or_init(|| Arc::new(AtomicUsize::new(0)))
}

/// Installs, once per process, handlers that record SIGINT, SIGTERM and SIGHUP for
/// [`stop_signal`]. The process keeps running: the caller polls and stops cleanly.
pub fn install_stop_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(unix)]
        {
            use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
            for sig in [SIGINT, SIGTERM, SIGHUP] {
                let _ =
                    signal_hook::flag::register_usize(sig, Arc::clone(stop_flag()), sig as usize);
            }
        }
        #[cfg(not(unix))]
        {
            let flag = Arc::clone(stop_flag());
            let _ = ctrlc::set_handler(move || flag.store(2, Ordering::SeqCst));
        }
    });
}

/// The signal number that asked this process to stop, if one did.
pub fn stop_signal() -> Option<i32> {
    match stop_flag().load(Ordering::SeqCst) {
        0 => None,
        s => Some(s as i32),
    }
}

/// The exit code of a run that a signal stopped: 128 + its number (130 for SIGINT, 143 for
/// SIGTERM), or success when none did.
pub fn exit_code_after_run() -> ExitCode {
    match stop_signal() {
        Some(sig) => ExitCode::from((128 + sig).clamp(1, 255) as u8),
        None => ExitCode::SUCCESS,
    }
}

/// Ends a binary: on error prints `error: {e:#}` (never a backtrace). The exit code is
/// 128 + the signal's number when a signal stopped the run (even if it then failed), else 1
/// on error and 0 on success.
pub fn finish(result: anyhow::Result<()>) -> ExitCode {
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
    }
    match (result, stop_signal()) {
        (_, Some(_)) => exit_code_after_run(),
        (Ok(()), None) => ExitCode::SUCCESS,
        (Err(_), None) => ExitCode::FAILURE,
    }
}
