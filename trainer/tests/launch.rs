//! `vet-train launch` with real processes: three ranks run every TCP collective and agree with
//! the closed form; a rank that exits mid-run stops the others in bounded time, every one
//! naming it, and the launcher exits with its code; a signal reaches every rank.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vet_train() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vet-train"));
    for var in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "OMPI_COMM_WORLD_RANK",
    ] {
        c.env_remove(var);
    }
    c
}

fn run(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = vet_train().args(args).output().unwrap();
    (out, t.elapsed())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn three_launched_ranks_pass_every_collective() {
    let (out, _) = run(&[
        "launch",
        "--nproc-per-node",
        "3",
        "--",
        "comm-selftest",
        "--rounds",
        "4",
        "--len",
        "1001",
    ]);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    for r in 0..3 {
        let want = format!("[rank {r}] comm-selftest: rank {r} of 3: 4 rounds");
        assert!(so.contains(&want), "missing `{want}` in:\n{so}\n{se}");
    }
}

#[test]
fn a_rank_that_dies_stops_the_others_naming_it() {
    let (out, took) = run(&[
        "launch",
        "--nproc-per-node",
        "3",
        "--",
        "comm-selftest",
        "--rounds",
        "1000",
        "--die-at",
        "1:2",
    ]);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{se}");
    assert!(took < Duration::from_secs(20), "{took:?}\n{se}");
    assert!(se.contains("error: rank 1 failed (exit code 3)"), "{se}");
    for r in [0, 2] {
        let line = se
            .lines()
            .find(|l| l.starts_with(&format!("[rank {r}] error:")))
            .unwrap_or_else(|| panic!("rank {r} printed no error:\n{se}"));
        assert!(
            line.contains("(rank 1)") && line.contains("rank 1 failed"),
            "{line}"
        );
    }
}

#[test]
fn sigterm_reaches_every_rank_and_sets_the_exit_code() {
    let child = vet_train()
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "comm-selftest",
            "--rounds",
            "100000",
            "--len",
            "16",
            "--sleep-ms",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{se}");
    assert!(t.elapsed() < Duration::from_secs(20), "{se}");
    for r in 0..2 {
        assert!(
            se.contains(&format!(
                "[rank {r}] comm-selftest: rank {r} stopped by a signal"
            )),
            "{se}"
        );
    }
}

#[test]
fn bad_launcher_variables_and_flags_are_named() {
    let out = vet_train()
        .args(["comm-selftest"])
        .env("RANK", "3")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .output()
        .unwrap();
    let se = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        se.contains("RANK=\"3\"") && se.contains("WORLD_SIZE=2"),
        "{se}"
    );

    let (out, _) = run(&["launch", "--nnodes", "2", "--", "comm-selftest"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--master-addr"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_rank_whose_peers_never_come_names_them() {
    // Rank 0 of a world of 3, started alone: it names ranks 1 and 2 and the address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = vet_train()
        .args(["comm-selftest", "--rendezvous-timeout-s", "1"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "3")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .output()
        .unwrap();
    let se = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        se.contains("rank(s) [1, 2] of 3 never arrived")
            && se.contains(&format!("127.0.0.1:{port}")),
        "{se}"
    );
}

#[test]
fn two_launchers_as_two_nodes_make_one_world() {
    // Two "nodes" on this host: node 1's ranks reach rank 0 through --master-addr/--master-port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = |r: usize| {
        let (port, r) = (port.to_string(), r.to_string());
        let args = [
            "launch",
            "--nnodes",
            "2",
            "--node-rank",
            &r,
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port,
            "--",
            "comm-selftest",
            "--rounds",
            "2",
            "--len",
            "777",
        ];
        vet_train()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (n1, n0) = (node(1), node(0));
    for (n, out) in [
        (0, n0.wait_with_output().unwrap()),
        (1, n1.wait_with_output().unwrap()),
    ] {
        let so = text(&out.stdout);
        assert!(
            out.status.success(),
            "node {n}: {so}\n{}",
            text(&out.stderr)
        );
        for r in [2 * n, 2 * n + 1] {
            assert!(
                so.contains(&format!(
                    "[rank {r}] comm-selftest: rank {r} of 4: 2 rounds"
                )),
                "{so}"
            );
        }
    }
}

/// Starts 3 launched selftest ranks that run until stopped, and returns the launcher and the
/// pid of rank 1 (read from its output).
fn three_long_ranks(extra: &[&str]) -> (std::process::Child, u32, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader};
    let mut args = vec![
        "launch",
        "--nproc-per-node",
        "3",
        "--stop-grace-s",
        "1",
        "--",
    ];
    args.extend([
        "comm-selftest",
        "--rounds",
        "100000",
        "--len",
        "16",
        "--sleep-ms",
        "10",
    ]);
    args.extend(extra);
    let mut child = vet_train()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let pid = loop {
        let line = lines.next().expect("rank 1 never said its pid").unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if let Some(p) = line.strip_prefix("[rank 1] comm-selftest: rank 1 of 3 is pid ") {
            break p.trim().parse().unwrap();
        }
    };
    let rest = std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .fold(seen, |acc, l| acc + &l + "\n")
    });
    (child, pid, rest)
}

fn kill(sig: &str, pid: u32) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn a_rank_killed_with_sigkill_is_named() {
    let (child, pid, rest) = three_long_ranks(&[]);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    kill("-KILL", pid);
    let out = child.wait_with_output().unwrap();
    let se = rest.join().unwrap();
    assert_eq!(out.status.code(), Some(128 + 9), "{se}");
    assert!(t.elapsed() < Duration::from_secs(20), "{se}");
    assert!(
        se.contains("error: rank 1 failed (killed by signal 9)"),
        "{se}"
    );
    for r in [0, 2] {
        let line = se
            .lines()
            .find(|l| l.starts_with(&format!("[rank {r}] error:")));
        assert!(line.is_some_and(|l| l.contains("(rank 1)")), "{se}");
    }
}

#[test]
fn a_stopped_rank_is_named_after_the_hang_timeout() {
    // SIGSTOP: the rank neither dies nor answers, nor sends heartbeats.
    let (child, pid, rest) = three_long_ranks(&["--hang-s", "2"]);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    kill("-STOP", pid);
    let out = child.wait_with_output().unwrap();
    let took = t.elapsed();
    let se = rest.join().unwrap();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "{took:?}\n{se}"
    );
    assert!(se.contains("not even a heartbeat"), "{se}");
    // The launcher killed the stopped rank and blames it.
    assert!(
        se.contains("error: rank 1 failed (killed by signal 9)"),
        "{se}"
    );
    assert_eq!(out.status.code(), Some(128 + 9), "{se}");
}
