//! What a demanding new user hit in the first hour (issue 18): flags that were silently
//! ignored, errors that read differently under RUST_BACKTRACE, exit codes, odd inputs.

use std::path::PathBuf;
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("first-hour-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(bin: &str, args: &[&str], backtrace: &str) -> Output {
    Command::new(bin)
        .args(args)
        .env("RUST_BACKTRACE", backtrace)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const TRAIN: &str = env!("CARGO_BIN_EXE_vet-train");
const DATA: &str = env!("CARGO_BIN_EXE_vet-data");
const CHAT: &str = env!("CARGO_BIN_EXE_vet-chat");

#[test]
fn training_flags_without_a_config_are_refused_not_ignored() {
    let out = scratch("quickstart-flags");
    let o = out.join("qs");
    let o = o.to_str().unwrap();
    for (flags, named) in [
        (
            vec!["--steps", "3", "--lr", "1e-9", "--threads", "1", "--resume"],
            "--steps, --lr, --resume",
        ),
        (vec!["--steps", "3"], "--steps"),
        (vec!["--resume"], "--resume"),
        (vec!["--deepspeed", "ds.json"], "--deepspeed"),
    ] {
        let mut args = flags.clone();
        args.extend(["--out-dir", o]);
        let r = run(TRAIN, &args, "0");
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(1), "{flags:?}: {err}");
        assert!(
            err.contains(named) && err.contains("--config"),
            "{flags:?}: {err}"
        );
        assert!(
            !err.contains("1/5"),
            "{flags:?} started the quickstart: {err}"
        );
        assert!(!std::path::Path::new(o).exists(), "{flags:?} wrote {o}");
    }
}

/// Each failure reads the same with RUST_BACKTRACE=1 as without: `error: …`, no backtrace.
#[test]
fn a_users_error_reads_the_same_with_or_without_rust_backtrace() {
    let dir = scratch("plain-errors");
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a checkpoint").unwrap();
    let bad_toml = dir.join("run.toml");
    std::fs::write(&bad_toml, "stage = [").unwrap();
    let (f, t) = (file.to_str().unwrap(), bad_toml.to_str().unwrap());
    let tok = fixtures::tokenizer();
    let tok = tok.to_str().unwrap();
    let prep = dir.join("prepared");
    let prep = prep.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (TRAIN, vec!["--config", "/no/such/run.toml"]),
        (TRAIN, vec!["--config", t]),
        (TRAIN, vec!["--steps", "3"]),
        (TRAIN, vec!["generate", "--model", f, "--prompt", "hi"]),
        (
            TRAIN,
            vec!["quantize", "--model", "/no/such/ck", "--out", "/tmp/x"],
        ),
        (TRAIN, vec!["plot", "/no/such/run"]),
        (DATA, vec!["inspect", "/no/such/shard.bin"]),
        (
            DATA,
            vec![
                "prepare",
                "--input",
                "/no/such.txt",
                "--tokenizer",
                tok,
                "--out",
                prep,
            ],
        ),
        (CHAT, vec!["--model", f, "--question", "hi"]),
        (CHAT, vec!["--model", "/no/such/ck", "--question", "hi"]),
    ];
    for (bin, args) in cases {
        let plain = run(bin, &args, "0");
        let traced = run(bin, &args, "1");
        let (a, b) = (stderr(&plain), stderr(&traced));
        assert!(!plain.status.success(), "{args:?} succeeded");
        assert_eq!(a, b, "{args:?}: stderr differs under RUST_BACKTRACE=1");
        assert_eq!(plain.status.code(), traced.status.code(), "{args:?}");
        for bad in ["Stack backtrace", "Caused by", "panicked", "RUST_BACKTRACE"] {
            assert!(!b.contains(bad), "{args:?}: {bad}: {b}");
        }
        assert!(
            b.starts_with("error: ") || b.contains("\nerror: "),
            "{args:?}: {b}"
        );
    }
}

#[test]
fn a_missing_file_names_the_os_error_once() {
    let r = run(DATA, &["inspect", "/no/such/shard.bin"], "0");
    let err = stderr(&r);
    assert!(err.contains("/no/such/shard.bin"), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    // A checkpoint without its weights file.
    let ck = scratch("no-weights");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixtures::tiny_checkpoint().join(f), ck.join(f)).unwrap();
    }
    let r = run(
        TRAIN,
        &[
            "generate",
            "--model",
            ck.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        "0",
    );
    let err = stderr(&r);
    assert!(err.contains("model.safetensors"), "{err}");
    // The loader names what it looked for; an OS error, if any, appears once.
    assert!(err.matches("os error 2").count() <= 1, "{err}");
}

#[test]
fn prepare_refuses_an_input_with_no_documents() {
    let dir = scratch("no-documents");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let garbage = dir.join("garbage.txt.zst");
    std::fs::write(&garbage, b"not a zstd stream at all").unwrap();
    let tok = fixtures::tokenizer();
    for input in [&empty, &garbage] {
        let out = dir.join(format!(
            "out-{}",
            input.file_name().unwrap().to_string_lossy()
        ));
        let args = [
            "prepare",
            "--input",
            input.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        let r = run(DATA, &args, "0");
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(1), "{input:?}: {err}");
        assert!(err.contains("error: no documents in the input"), "{err}");
        assert!(
            !out.join("manifest.json").exists(),
            "{input:?}: a manifest was written"
        );
    }
}

#[test]
fn a_model_that_is_a_file_is_named_as_a_file() {
    let file = fixtures::tiny_checkpoint().join("config.json");
    let args = [
        "generate",
        "--model",
        file.to_str().unwrap(),
        "--prompt",
        "hi",
    ];
    let r = run(TRAIN, &args, "0");
    let err = stderr(&r);
    assert!(
        err.contains("is a file; expected a checkpoint directory"),
        "{err}"
    );
}

/// Ctrl-C during the quickstart's pretraining: a checkpoint, then the quickstart stops there
/// (no fine-tuning on an interrupted model) and exits 130.
#[test]
fn ctrl_c_stops_the_quickstart_after_its_checkpoint_with_130() {
    use std::io::BufRead;
    let out = scratch("quickstart-ctrl-c");
    let mut child = Command::new(TRAIN)
        .args(["--device", "cpu", "--threads", "1", "--out-dir"])
        .arg(out.join("qs"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    // The first logged training step: the stop handler is installed by then.
    for line in lines.by_ref() {
        let line = line.unwrap();
        log += &line;
        log.push('\n');
        if line.trim_start().starts_with("step") {
            break;
        }
    }
    let kill = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    for line in lines {
        log += &line.unwrap();
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(
        log.contains("error: interrupted during pretraining"),
        "{log}"
    );
    assert!(!log.contains("3/5"), "fine-tuning started: {log}");
    let ckpts = out.join("qs/pretrain/checkpoints");
    assert_eq!(std::fs::read_dir(&ckpts).unwrap().count(), 1, "{log}");
}
