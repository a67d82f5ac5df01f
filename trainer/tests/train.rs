//! The training loop end to end on the reference engine: exact resume, NaN handling,
//! checkpoint rotation and the checkpoint's layout.

use std::path::{Path, PathBuf};

use trainer::data::manifest::{Manifest, Split};
use trainer::train::run::{train, RunOptions};
use trainer::train::run_config::RunConfig;
use trainer::train::state;

mod common;

use common::tokenizer;

fn scratch(name: &str) -> PathBuf {
    common::scratch("train", name)
}

fn shards(dir: &Path) -> PathBuf {
    common::byte_shards(dir, 3000)
}

fn config(out: &Path, manifest: &Path, steps: u64, lr: f64) -> RunConfig {
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
        seq_len = 24
        steps = {steps}
        seed = 5
        [optim]
        lr = {lr:e}
        min_lr = 0.0
        warmup_steps = 2
        [checkpoint]
        every = 2
        keep_last = 2
        [eval]
        every = 100
        batches = 2
        "#,
        out.display(),
        manifest.display(),
        tokenizer().display()
    ))
    .unwrap()
}

fn metric_losses(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .map(f64::to_bits)
        .collect()
}

#[test]
fn n_steps_plus_resume_for_n_more_equals_2n_steps_bit_for_bit() {
    let dir = scratch("resume");
    let manifest = shards(&dir);
    let whole = dir.join("whole");
    let s = train(config(&whole, &manifest, 6, 3e-3), &RunOptions::default()).unwrap();
    assert_eq!(s.steps, 6);
    let split = dir.join("split");
    train(config(&split, &manifest, 3, 3e-3), &RunOptions::default()).unwrap();
    // Same run length for the schedule: the resumed run is configured for 6 steps.
    let resumed = train(
        config(&split, &manifest, 6, 3e-3),
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    assert_eq!(resumed.steps, 6);
    assert_eq!(
        metric_losses(&whole),
        metric_losses(&split),
        "losses differ after resume"
    );
    let a = std::fs::read(state::step_dir(&whole, 6).join("model.safetensors")).unwrap();
    let b = std::fs::read(state::step_dir(&split, 6).join("model.safetensors")).unwrap();
    assert!(a == b, "final weights differ after resume");
    // keep_last = 2: only the two newest checkpoints remain.
    let kept: Vec<u64> = state::list(&whole)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(kept, vec![4, 6]);
    // The checkpoint is a model directory that loads as is.
    let ck = trainer::checkpoint::load(&state::step_dir(&whole, 6)).unwrap();
    assert_eq!(ck.config.vocab_size, 264);
    assert!(state::step_dir(&whole, 6).join("tokenizer.json").is_file());
    assert!(
        s.losses.last().unwrap() < s.losses.first().unwrap(),
        "loss did not fall: {:?}",
        s.losses
    );
    assert!(s.val_loss.is_some_and(f64::is_finite));
    // A loss curve is drawn at the end of the run.
    let png = std::fs::read(whole.join("loss_curve.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn a_diverging_run_skips_non_finite_steps_then_stops_with_a_clear_message() {
    let dir = scratch("nan");
    let manifest = shards(&dir);
    let out = dir.join("run");
    let err = train(config(&out, &manifest, 20, 1e30), &RunOptions::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("consecutive steps had a non-finite loss"),
        "{msg}"
    );
    let skipped = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .matches("\"skipped\":true")
        .count();
    assert_eq!(skipped, 5, "five skipped steps are logged");
    // No checkpoint was ever written: the message says so instead of naming a missing folder.
    assert!(!state::checkpoints_dir(&out).exists());
    assert!(msg.contains("No checkpoint was written"), "{msg}");
    assert!(
        !msg.contains(&state::checkpoints_dir(&out).display().to_string()),
        "{msg}"
    );
    // After a good checkpoint, the message names it.
    let good = dir.join("good");
    train(config(&good, &manifest, 2, 1e-3), &RunOptions::default()).unwrap();
    let resumed = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let err = train(config(&good, &manifest, 40, 1e30), &resumed).unwrap_err();
    let msg = format!("{err:#}");
    let want = format!("{} (step 2)", state::step_dir(&good, 2).display());
    assert!(msg.contains(&want), "{msg}");
}

#[test]
fn a_tokenizer_that_does_not_match_the_data_is_refused() {
    let dir = scratch("mismatch");
    let manifest = shards(&dir);
    let other = dir.join("other-tokenizer.json");
    let mut text = std::fs::read_to_string(tokenizer()).unwrap();
    text.push('\n'); // same tokens, different bytes: a different tokenizer file as far as the data knows
    std::fs::write(&other, text).unwrap();
    let mut cfg = config(&dir.join("run"), &manifest, 2, 1e-3);
    cfg.data.tokenizer = Some(other);
    let err = train(cfg, &RunOptions::default()).unwrap_err();
    assert!(
        format!("{err:#}").contains("does not match the data"),
        "{err:#}"
    );
}

/// Stops a long run with `signal`; it finishes its step, writes a clean checkpoint and exits
/// 128 + the signal's number, so a scheduler sees the interruption.
fn a_signal_checkpoints_and_exits_with(signal: &str, code: i32) {
    let dir = scratch(&format!("signal-{signal}"));
    let manifest = shards(&dir);
    let out = dir.join("run");
    let cfg_path = dir.join("run.toml");
    std::fs::write(
        &cfg_path,
        config(&out, &manifest, 100_000, 1e-3).to_toml().unwrap(),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vet-train"))
        .arg("--config")
        .arg(&cfg_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(code),
        "vet-train exited with {:?} after SIG{signal}",
        output.status
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("interrupted"));
    // With stderr not a terminal the progress bar is hidden; the log line must still reach it.
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains("interrupted: checkpointing at step"),
        "stderr: {log}"
    );
    let (step, dir) = state::list(&out)
        .unwrap()
        .pop()
        .expect("a checkpoint was written");
    assert!((3..100_000).contains(&step), "checkpoint at step {step}");
    trainer::checkpoint::load(&dir).unwrap();
}

#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143() {
    a_signal_checkpoints_and_exits_with("TERM", 143);
}

#[test]
fn ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130() {
    a_signal_checkpoints_and_exits_with("INT", 130);
}

#[test]
fn a_failed_checkpoint_write_is_a_clear_error_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("diskfail");
    let manifest = shards(&dir);
    let out = dir.join("run");
    train(config(&out, &manifest, 2, 1e-3), &RunOptions::default()).unwrap();
    let good = state::step_dir(&out, 2);
    let before = std::fs::read(good.join("model.safetensors")).unwrap();
    // Something in the way of the next checkpoint's temporary directory: its write fails.
    std::fs::write(
        state::checkpoints_dir(&out).join(".step-00000004.tmp"),
        b"in the way",
    )
    .unwrap();
    let err = train(
        config(&out, &manifest, 4, 1e-3),
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("step-00000004"), "{err:#}");
    assert_eq!(
        std::fs::read(good.join("model.safetensors")).unwrap(),
        before,
        "last good checkpoint changed"
    );
    // An output directory that cannot be created is named in the error.
    let blocked = dir.join("a-file");
    std::fs::write(&blocked, b"x").unwrap();
    let err = train(
        config(&blocked.join("run"), &manifest, 2, 1e-3),
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("a-file"), "{err:#}");
}

#[test]
fn the_eval_stage_reproduces_the_runs_validation_loss_and_scores_qa_answers() {
    let dir = scratch("eval");
    let manifest = shards(&dir);
    let out = dir.join("run");
    let s = train(config(&out, &manifest, 2, 1e-3), &RunOptions::default()).unwrap();
    let mut cfg = config(&dir.join("eval"), &manifest, 2, 1e-3);
    cfg.stage = trainer::train::run_config::Stage::Eval;
    cfg.model.preset = None;
    cfg.model.from = Some(s.checkpoint.clone());
    cfg.data.qa_eval = Some(fixtures::data().join("qa_eval.jsonl"));
    cfg.eval.as_mut().unwrap().qa_limit = Some(2);
    cfg.eval.as_mut().unwrap().max_new_tokens = 4;
    cfg.validate().unwrap();
    let r = trainer::train::evaluate::evaluate(&cfg, &RunOptions::default()).unwrap();
    // Same checkpoint, same validation batches (seed, batch, seq_len, 2 batches): same bits.
    assert_eq!(r.val_loss.unwrap().to_bits(), s.val_loss.unwrap().to_bits());
    assert!((r.val_perplexity.unwrap() - r.val_loss.unwrap().exp()).abs() < 1e-9);
    let qa = r.qa.unwrap();
    assert_eq!(qa.questions, 2);
    assert!(r.qa_loss.unwrap().is_finite());
    let lines = std::fs::read_to_string(dir.join("eval/qa_report.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    assert!(dir.join("eval/eval_report.json").is_file());
}

fn metric_loss_values(out: &Path) -> Vec<f64> {
    metric_losses(out).into_iter().map(f64::from_bits).collect()
}

#[test]
fn two_accumulated_micro_batches_train_like_one_batch_of_twice_the_size() {
    let dir = scratch("accum");
    let manifest = shards(&dir);
    let (one, two) = (dir.join("batch4"), dir.join("batch2x2"));
    let mut big = config(&one, &manifest, 4, 3e-3);
    big.train.batch = 4;
    train(big, &RunOptions::default()).unwrap();
    let mut acc = config(&two, &manifest, 4, 3e-3);
    acc.train.batch = 2;
    acc.train.grad_accum = 2;
    train(acc, &RunOptions::default()).unwrap();
    let (a, b) = (metric_loss_values(&one), metric_loss_values(&two));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        // Same samples, same mean; only the order of float sums differs.
        assert!((x - y).abs() <= 1e-5 * x.abs(), "losses {a:?} vs {b:?}");
    }
    assert!(a[3] != a[0], "the model did not change");
}

#[test]
fn an_unusable_validation_split_is_refused_before_training_starts() {
    let dir = scratch("noval");
    let manifest = shards(&dir);
    // Empty the val split in the manifest.
    let (mut m, _) = Manifest::load(&manifest).unwrap();
    m.val = Split::default();
    m.save(&dir).unwrap();
    let out = dir.join("run");
    let err = train(config(&out, &manifest, 3, 1e-3), &RunOptions::default()).unwrap_err();
    assert!(format!("{err:#}").contains("evaluation data"), "{err:#}");
    assert!(
        !out.join("metrics.jsonl").exists(),
        "training started anyway"
    );
}

fn vet_train(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vet-train"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn resume_says_when_there_is_nothing_to_resume_and_warns_about_changed_keys() {
    let dir = scratch("resume-notes");
    let manifest = shards(&dir);
    let out = dir.join("run");
    let cfg_path = dir.join("run.toml");
    std::fs::write(
        &cfg_path,
        config(&out, &manifest, 2, 1e-3).to_toml().unwrap(),
    )
    .unwrap();
    let c = cfg_path.to_str().unwrap();
    let first = vet_train(&["--config", c, "--device", "reference", "--resume"]);
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    let none = format!(
        "--resume: no checkpoint in {}; starting from scratch",
        state::checkpoints_dir(&out).display()
    );
    assert!(err.contains(&none), "{err}");
    let args = [
        "--config",
        c,
        "--device",
        "reference",
        "--resume",
        "--steps",
        "4",
        "--lr",
        "2e-3",
    ];
    let second = vet_train(&args);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert!(!err.contains("starting from scratch"), "{err}");
    let warning = err
        .lines()
        .find(|l| l.starts_with("warning: --resume: the run config changed"))
        .unwrap_or_else(|| panic!("no warning: {err}"));
    assert!(
        warning.contains("optim.lr 0.001 -> 0.002") && warning.contains("train.steps 2 -> 4"),
        "{warning}"
    );
    assert!(!warning.contains("train.batch"), "{warning}");
}

#[test]
fn resume_into_another_model_shape_is_refused() {
    let dir = scratch("resume-shape");
    let manifest = shards(&dir);
    let out = dir.join("run");
    train(config(&out, &manifest, 2, 1e-3), &RunOptions::default()).unwrap();
    let mut cfg = config(&out, &manifest, 4, 1e-3);
    cfg.model.preset = Some("tiny".into());
    let resumed = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let err = format!("{:#}", train(cfg, &resumed).unwrap_err());
    assert!(
        err.contains("d_model 64 -> 128") && err.contains("n_layer 2 -> 4"),
        "{err}"
    );
    assert!(
        err.contains(&state::step_dir(&out, 2).display().to_string()),
        "{err}"
    );
    assert_eq!(state::list(&out).unwrap().len(), 1, "training went on");
}

/// A run interrupted after its checkpoint: the resumed run marks where it went back to, and the
/// stale rows past that point are dropped by readers.
#[test]
fn a_resumed_run_marks_resumed_from_in_the_metrics_and_the_plot_drops_stale_rows() {
    let dir = scratch("resumed-from");
    let manifest = shards(&dir);
    let out = dir.join("run");
    train(config(&out, &manifest, 4, 1e-3), &RunOptions::default()).unwrap();
    // As if the process had died after step 4's metrics row but before its checkpoint.
    std::fs::remove_dir_all(state::step_dir(&out, 4)).unwrap();
    let resumed = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    train(config(&out, &manifest, 4, 1e-3), &resumed).unwrap();
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mark = rows
        .iter()
        .position(|r| r.get("resumed_from").is_some())
        .expect("no resumed_from line");
    assert_eq!(rows[mark]["resumed_from"], 2);
    assert!(rows[mark]["checkpoint"]
        .as_str()
        .unwrap()
        .ends_with("step-00000002"));
    let steps = |rs: &[serde_json::Value]| -> Vec<u64> {
        rs.iter()
            .filter(|r| r.get("loss").is_some())
            .map(|r| r["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps(&rows[..mark]), [1, 2, 3, 4]);
    assert_eq!(steps(&rows[mark + 1..]), [3, 4]);
    // A resumed run that ends earlier than the stale rows: the plot keeps only live points.
    let m = dir.join("stale.jsonl");
    let mut lines = String::new();
    for step in 1..=6 {
        lines += &format!("{{\"step\":{step},\"loss\":{}}}\n", 10 - step);
    }
    lines += "{\"resumed_from\":2}\n{\"step\":3,\"loss\":1.5}\n";
    std::fs::write(&m, lines).unwrap();
    let s = trainer::train::plot::loss_curve_png(&m, &dir.join("stale.png"), "t").unwrap();
    assert_eq!((s.points, s.min_loss), (3, 1.5));
}
