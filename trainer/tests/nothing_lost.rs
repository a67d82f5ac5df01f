//! Issue 18's data-loss cases, each as a user met it: `quantize --out` over other files or the
//! source, a fresh run in a used run folder, two processes in one folder (and a lock left by
//! `kill -9`), a damaged shard, and `prepare` resuming from stale work.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use reference::rng::Rng;
use trainer::data::prepare::{prepare, Options};
use trainer::data::shard::HEADER_LEN;
use trainer::train::run::{train, RunOptions};
use trainer::train::run_config::RunConfig;
use trainer::train::state;

mod common;

use common::tokenizer;

fn scratch(name: &str) -> PathBuf {
    common::scratch("nothing-lost", name)
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn vet_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vet-train"))
        .args(args)
        .output()
        .unwrap()
}

/// Byte-token shards (`train-0.bin`, `val-0.bin`) of bundled corpus documents, and a manifest.
fn shards(dir: &Path) -> PathBuf {
    common::byte_shards(dir, 2000)
}

fn config(out: &Path, manifest: &Path, steps: u64) -> RunConfig {
    RunConfig::parse(&format!(
        r#"
        stage = "pretrain"
        out_dir = "{}"
        [model]
        preset = "quickstart"
        [data]
        manifest = "{}"
        tokenizer = "{}"
        [train]
        batch = 2
        seq_len = 16
        steps = {steps}
        seed = 7
        [optim]
        lr = 1e-3
        [checkpoint]
        every = 2
        keep_last = 2
        "#,
        out.display(),
        manifest.display(),
        tokenizer().display()
    ))
    .unwrap()
}

/// `cfg` as a TOML file for the command line.
fn config_file(dir: &Path, name: &str, cfg: &RunConfig) -> String {
    let path = dir.join(name);
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    path.display().to_string()
}

fn steps_kept(out: &Path) -> Vec<u64> {
    state::list(out)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// A copy of the tiny checkpoint in `dir`.
fn copy_checkpoint(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixtures::tiny_checkpoint().join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn quantize_never_deletes_what_it_did_not_write() {
    let tmp = scratch("quantize");
    let src = tmp.join("src");
    let model = src.join("model");
    copy_checkpoint(&model);
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let quantize = |out: &Path, extra: &[&str]| {
        let mut args = vec!["quantize", "--model", model.to_str().unwrap()];
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(extra);
        vet_train(&args)
    };
    // A folder with the user's files in it.
    let other = tmp.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"my notes").unwrap();
    for extra in [&[][..], &["--force"][..]] {
        let o = quantize(&other, extra);
        assert!(
            !o.status.success() && text(&o).contains("notes.txt"),
            "{extra:?}: {}",
            text(&o)
        );
        assert_eq!(std::fs::read(other.join("notes.txt")).unwrap(), b"my notes");
    }
    // The source itself, and a folder that contains it.
    for out in [&model, &src] {
        let o = quantize(out, &["--force"]);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("source checkpoint"), "{}", text(&o));
        assert_eq!(
            std::fs::read(model.join("model.safetensors")).unwrap(),
            weights
        );
    }
    // The same folder through another spelling of its path.
    let alias = src.join("model").join("..").join("model");
    let o = quantize(&alias, &["--force"]);
    assert!(
        !o.status.success() && text(&o).contains("source checkpoint"),
        "{}",
        text(&o)
    );
    // A new folder, then the checkpoint there replaced only with --force, leaving nothing behind.
    let q = tmp.join("q");
    let o = quantize(&q, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let int8 = std::fs::read(q.join("model.safetensors")).unwrap();
    let o = quantize(&q, &["--dtype", "bf16"]);
    assert!(
        !o.status.success() && text(&o).contains("--force"),
        "{}",
        text(&o)
    );
    let o = quantize(&q, &["--dtype", "bf16", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    let bf16 = std::fs::read(q.join("model.safetensors")).unwrap();
    assert!(
        bf16.len() > int8.len(),
        "the int8 checkpoint was not replaced"
    );
    let mut left: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["other", "q", "src"]);
}

#[test]
fn a_fresh_run_refuses_a_folder_holding_another_runs_checkpoints() {
    let dir = scratch("fresh");
    let manifest = shards(&dir);
    let out = dir.join("run");
    train(config(&out, &manifest, 4), &RunOptions::default()).unwrap();
    assert_eq!(steps_kept(&out), [2, 4]);
    // A shorter fresh run would have its step 2 pruned in favour of the old 4 (keep_last 2).
    let err = format!(
        "{:#}",
        train(config(&out, &manifest, 2), &RunOptions::default()).unwrap_err()
    );
    assert!(
        err.contains("step-00000004") && err.contains("--resume") && err.contains("--out-dir"),
        "{err}"
    );
    assert_eq!(steps_kept(&out), [2, 4], "the old checkpoints were touched");
    // Told to overwrite, it starts afresh: only its own checkpoint and metrics remain.
    let cfg = config_file(&dir, "short.toml", &config(&out, &manifest, 2));
    let o = vet_train(&["--config", &cfg, "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("removing checkpoint"), "{}", text(&o));
    assert_eq!(steps_kept(&out), [2]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.matches("\"loss\"").count(), 2, "{metrics}");
}

#[test]
fn a_second_process_in_a_run_folder_fails_at_once_and_a_killed_ones_lock_is_taken_over() {
    let dir = scratch("lock");
    let manifest = shards(&dir);
    let out = dir.join("run");
    let cfg = config_file(&dir, "long.toml", &config(&out, &manifest, 100_000));
    /// Kills the child however the test ends (a failed assertion must not leave it training).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut first = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_vet-train"))
            .args(["--config", &cfg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while steps_kept(&out).is_empty() {
        assert!(t0.elapsed().as_secs() < 120, "training never checkpointed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = vet_train(&["--config", &cfg, "--resume", "--steps", "1"]);
    let want = format!("already in use by PID {}", first.0.id());
    assert!(
        !second.status.success() && text(&second).contains(&want),
        "{}",
        text(&second)
    );
    first.0.kill().unwrap(); // SIGKILL: no chance to clean up
    first.0.wait().unwrap();
    let third = vet_train(&["--config", &cfg, "--resume", "--steps", "1"]);
    assert!(third.status.success(), "{}", text(&third));
}

#[test]
fn training_on_a_shard_with_one_flipped_byte_fails_naming_the_shard() {
    let dir = scratch("flip");
    let manifest = shards(&dir);
    let shard = dir.join("train-0.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    // A token's low byte (u16 tokens): still a valid token id, only the checksum can tell.
    let at = HEADER_LEN + 2 * (1 + Rng::new(18).below(500) as usize);
    bytes[at] ^= 0x20;
    std::fs::write(&shard, &bytes).unwrap();
    let out = dir.join("run");
    let err = train(config(&out, &manifest, 2), &RunOptions::default()).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("train-0.bin") && err.contains("checksum"),
        "{err}"
    );
}

fn prep_opts(input: &Path, out: &Path) -> Options {
    let mut o = Options::new(vec![input.to_path_buf()], tokenizer(), out.to_path_buf());
    o.val_fraction = 0.2;
    o.threads = Some(2);
    o
}

/// Every `.bin` file of a folder and its bytes.
fn shard_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".bin"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// A JSON Lines corpus of `n` bundled documents picked by `seed`.
fn corpus(path: &Path, seed: u64, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(fixtures::data().join("corpus.jsonl")).unwrap();
    let docs: Vec<&str> = text.lines().collect();
    let mut rng = Rng::new(seed);
    let lines: Vec<String> = (0..n)
        .map(|_| docs[rng.below(docs.len() as u64) as usize].to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    lines
}

#[test]
fn prepare_redoes_a_same_size_edit_even_with_the_old_modification_time() {
    let dir = scratch("edit");
    let input = dir.join("docs.jsonl");
    corpus(&input, 3, 12);
    let out = dir.join("out");
    prepare(&prep_opts(&input, &out)).unwrap();
    let mtime = std::fs::metadata(&input).unwrap().modified().unwrap();
    // Same size: one letter of one document changes case.
    let mut bytes = std::fs::read(&input).unwrap();
    let at = bytes.len() / 2
        + bytes[bytes.len() / 2..]
            .iter()
            .position(u8::is_ascii_lowercase)
            .unwrap();
    bytes[at] = bytes[at].to_ascii_uppercase();
    std::fs::write(&input, &bytes).unwrap();
    let f = std::fs::File::options().write(true).open(&input).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let s = prepare(&prep_opts(&input, &out)).unwrap();
    assert_eq!(
        (s.units_done, s.units_kept),
        (1, 0),
        "the edited input was not re-prepared"
    );
    let fresh = dir.join("fresh");
    prepare(&prep_opts(&input, &fresh)).unwrap();
    assert!(
        shard_bytes(&out) == shard_bytes(&fresh),
        "resumed output differs from a fresh one"
    );
    // Nothing changed since: kept.
    let s = prepare(&prep_opts(&input, &out)).unwrap();
    assert_eq!((s.units_done, s.units_kept), (0, 1));
}

#[test]
fn a_strict_rerun_over_a_lenient_output_rechecks_the_units_that_skipped_records() {
    let dir = scratch("strict");
    let (good, bad) = (dir.join("a-good.jsonl"), dir.join("b-bad.jsonl"));
    corpus(&good, 5, 6);
    let mut lines = corpus(&bad, 6, 6);
    lines[3] = r#"{"text": 38.5}"#.into();
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let out = dir.join("out");
    let mut o = Options::new(vec![good.clone(), bad.clone()], tokenizer(), out.clone());
    o.threads = Some(2);
    let s = prepare(&o).unwrap();
    assert_eq!(s.skipped, 1);
    o.strict = true;
    let err = format!("{:#}", prepare(&o).unwrap_err());
    assert!(err.contains("b-bad.jsonl:4"), "{err}");
    // A strict run's output serves a lenient one as is.
    let mut g = prep_opts(&good, &dir.join("good-out"));
    g.strict = true;
    prepare(&g).unwrap();
    g.strict = false;
    let s = prepare(&g).unwrap();
    assert_eq!((s.units_done, s.units_kept), (0, 1));
}

#[test]
fn prepare_refuses_an_output_folder_another_process_holds_and_takes_over_a_dead_ones() {
    use fs4::FileExt;
    let dir = scratch("prepare-lock");
    let input = dir.join("docs.jsonl");
    corpus(&input, 9, 4);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // What a process that died holding the lock leaves: its PID, no lock.
    std::fs::write(out.join(".vet-lock"), "999999999\n").unwrap();
    prepare(&prep_opts(&input, &out)).unwrap();
    // A live holder (this process, through another open file).
    let f = std::fs::File::options()
        .write(true)
        .open(out.join(".vet-lock"))
        .unwrap();
    FileExt::try_lock(&f).unwrap();
    std::fs::write(out.join(".vet-lock"), format!("{}\n", std::process::id())).unwrap();
    let err = format!("{:#}", prepare(&prep_opts(&input, &out)).unwrap_err());
    let want = format!("already in use by PID {}", std::process::id());
    assert!(err.contains(&want) && err.contains("out"), "{err}");
    FileExt::unlock(&f).unwrap();
    prepare(&prep_opts(&input, &out)).unwrap();
}

#[test]
fn a_second_quickstart_in_the_same_folder_fails_at_once_naming_the_first() {
    use fs4::FileExt;
    let out = scratch("quickstart");
    let f = std::fs::File::create(out.join(".vet-lock")).unwrap();
    FileExt::try_lock(&f).unwrap();
    std::fs::write(out.join(".vet-lock"), format!("{}\n", std::process::id())).unwrap();
    let t0 = Instant::now();
    let o = trainer::quickstart::QuickstartOptions::smoke(out.clone());
    let err = format!("{:#}", trainer::quickstart::run(&o).unwrap_err());
    let want = format!("already in use by PID {}", std::process::id());
    assert!(err.contains(&want), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "it did not fail at once"
    );
    assert!(!out.join("data").exists(), "it started work in the folder");
}
