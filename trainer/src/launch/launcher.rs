//! `vet-train launch`: starts the ranks of one node as copies of this executable, torchrun
//! style (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`),
//! prefixes each rank's output lines with `[rank R]`, forwards Ctrl-C / SIGTERM / SIGHUP, and
//! when one rank fails stops the others (SIGTERM, then SIGKILL after a grace period), prints
//! that rank's error and exits with its exit code.
//!
//! Each rank runs in its own process group, so a terminal's Ctrl-C reaches it once (forwarded
//! by the launcher), and on Linux it gets SIGTERM if the launcher itself dies.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

use super::gpus::count_gpus;

/// `vet-train launch` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Ranks on this node [default: every visible GPU with --device cuda, else 1].
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Rank 0's host (needed with --nnodes > 1) [default: 127.0.0.1].
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Rank 0's rendezvous port [default: a free port on one node, 29500 on several].
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds the other ranks get to stop after one fails, before SIGKILL.
    #[arg(long, default_value_t = 30.0)]
    pub stop_grace_s: f64,
    /// The vet-train arguments every rank runs, after `--`.
    #[arg(last = true, required = true, value_name = "VET_TRAIN_ARGS")]
    pub command: Vec<String>,
}

/// What the launcher will start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub nproc: usize,
    pub world: usize,
    pub first_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// Whether `args` ask for `--device cuda[:N]`.
fn wants_cuda(args: &[String]) -> bool {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = match a.strip_prefix("--device=") {
            Some(v) => Some(v),
            None if a == "--device" => it.next().map(|s| s.as_str()),
            None => None,
        };
        if value.is_some_and(|v| v.starts_with("cuda")) {
            return true;
        }
    }
    false
}

/// Checks the flags and fills in the defaults; `gpus` counts the visible GPUs.
pub fn plan(a: &LaunchArgs, gpus: impl FnOnce() -> Result<usize>) -> Result<Plan> {
    if a.nnodes == 0 {
        bail!("--nnodes 0: a job needs at least one node");
    }
    if a.node_rank >= a.nnodes {
        bail!(
            "--node-rank {}: must be below --nnodes {}",
            a.node_rank,
            a.nnodes
        );
    }
    let nproc = match a.nproc_per_node {
        Some(0) => bail!("--nproc-per-node 0: start at least one rank"),
        Some(n) => n,
        None if wants_cuda(&a.command) => match gpus()? {
            0 => bail!(
                "--device cuda: no GPU is visible (CUDA_VISIBLE_DEVICES); pass --nproc-per-node"
            ),
            n => n,
        },
        None => 1,
    };
    if a.nnodes > 1 && a.master_addr.is_none() {
        bail!(
            "--nnodes {}: pass --master-addr, the host of node 0 (where rank 0 listens)",
            a.nnodes
        );
    }
    if a.master_port == Some(0) {
        bail!("--master-port 0: expected a TCP port in 1..=65535");
    }
    let master_port = match a.master_port {
        Some(p) => p,
        None if a.nnodes == 1 => free_port().context("finding a free port for the rendezvous")?,
        None => super::env::DEFAULT_PORT,
    };
    Ok(Plan {
        nproc,
        world: nproc * a.nnodes,
        first_rank: a.node_rank * nproc,
        master_addr: a.master_addr.clone().unwrap_or_else(|| "127.0.0.1".into()),
        master_port,
    })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A rank's ending: its exit code, or 128 + the signal that killed it.
fn code_of(status: ExitStatus) -> i32 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    status.code().unwrap_or(1)
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("killed by signal {sig}");
        }
    }
    format!("exit code {}", status.code().unwrap_or(1))
}

/// Sends `sig` to the process group of each rank in `pids`.
fn signal_all(pids: &[(usize, u32)], sig: i32) {
    for (_, pid) in pids {
        #[cfg(unix)]
        // SAFETY: kill(2) on a process group we created; a group already gone gives ESRCH.
        unsafe {
            libc::kill(-(*pid as i32), sig);
        }
        #[cfg(not(unix))]
        let _ = (pid, sig);
    }
}

/// Copies `from` line by line to stdout or stderr with `[rank R] `, keeping the last lines.
fn pump(rank: usize, from: impl Read, to_stderr: bool, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut r = BufReader::new(from);
    let mut line = Vec::new();
    while r
        .read_until(b'\n', &mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        let out = format!("[rank {rank}] {text}\n");
        let _ = if to_stderr {
            std::io::stderr().lock().write_all(out.as_bytes())
        } else {
            std::io::stdout().lock().write_all(out.as_bytes())
        };
        if to_stderr {
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == 20 {
                t.pop_front();
            }
            t.push_back(text.to_string());
        }
        line.clear();
    }
}

/// A started rank.
struct Started {
    rank: usize,
    pid: u32,
    tail: Arc<Mutex<VecDeque<String>>>,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

fn spawn_rank(
    p: &Plan,
    local: usize,
    args: &[String],
    exits: mpsc::Sender<(usize, ExitStatus)>,
) -> Result<Started> {
    let rank = p.first_rank + local;
    let exe = std::env::current_exe().context("finding the vet-train executable")?;
    let mut cmd = Command::new(&exe);
    cmd.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", p.world.to_string())
        .env("LOCAL_RANK", local.to_string())
        .env("LOCAL_WORLD_SIZE", p.nproc.to_string())
        .env("MASTER_ADDR", &p.master_addr)
        .env("MASTER_PORT", p.master_port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; it only asks the kernel for SIGTERM when the
        // launcher dies, so no rank outlives it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting rank {rank} ({})", exe.display()))?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let t = Arc::clone(&tail);
    let pumps = vec![
        std::thread::spawn(move || pump(rank, out, false, Arc::new(Mutex::new(VecDeque::new())))),
        std::thread::spawn(move || pump(rank, err, true, t)),
    ];
    let pid = child.id();
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = exits.send((rank, status));
        }
    });
    Ok(Started {
        rank,
        pid,
        tail,
        pumps,
    })
}

#[path = "launcher_run.rs"]
mod run;
pub use run::launch;

#[cfg(test)]
#[path = "launcher_tests.rs"]
mod tests;
