//! `trainer::dist::train_distributed`: the training loop at world size 2 on in-process ranks
//! (simd engine) against the one-process loop with the same global batch, and the sharded
//! checkpoint it leaves behind.

use std::path::{Path, PathBuf};
use std::thread;

use reference::comm::InProcess;
use trainer::dist::{train_distributed, ZeroConfig};
use trainer::train::run::{train, RunOptions, RunSummary};
use trainer::train::run_config::RunConfig;

mod common;

fn config(out: &Path, manifest: &Path, batch: usize, accum: usize) -> RunConfig {
    config_steps(out, manifest, batch, accum, 4)
}

fn config_steps(out: &Path, manifest: &Path, batch: usize, accum: usize, steps: u64) -> RunConfig {
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
        batch = {batch}
        grad_accum = {accum}
        seq_len = 24
        steps = {steps}
        seed = 5
        [optim]
        lr = 3e-3
        min_lr = 0.0
        warmup_steps = 2
        [checkpoint]
        every = 2
        keep_last = 2
        "#,
        out.display(),
        manifest.display(),
        common::tokenizer().display()
    ))
    .unwrap()
}

fn opts() -> RunOptions {
    RunOptions {
        device: "cpu".into(),
        threads: 1,
        ..RunOptions::default()
    }
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

fn run_world(out: PathBuf, manifest: PathBuf, world: usize, zero: ZeroConfig) -> Vec<RunSummary> {
    run_steps(out, manifest, world, zero, 4, false)
}

fn run_steps(
    out: PathBuf,
    manifest: PathBuf,
    world: usize,
    zero: ZeroConfig,
    steps: u64,
    resume: bool,
) -> Vec<RunSummary> {
    let handles: Vec<_> = InProcess::group(world)
        .into_iter()
        .map(|comm| {
            let (out, manifest, zero) = (out.clone(), manifest.clone(), zero.clone());
            thread::spawn(move || {
                let cfg = config_steps(&out, &manifest, 2, 1, steps);
                let o = RunOptions { resume, ..opts() };
                train_distributed(cfg, &o, Box::new(comm), zero)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

#[test]
fn world_2_trains_like_one_process_with_the_same_global_batch() {
    let dir = common::scratch("dist_train", "w2");
    let manifest = common::byte_shards(&dir, 3000);
    let one = dir.join("one");
    train(config(&one, &manifest, 2, 2), &opts()).unwrap();
    let two = dir.join("two");
    let zero = ZeroConfig {
        stage: 2,
        reduce_bucket_size: 10_000,
        wall_clock_breakdown: true,
        comms_logger: true,
        threads: 1,
        ..ZeroConfig::default()
    };
    let sums = run_world(two.clone(), manifest, 2, zero);
    assert_eq!(sums[0].losses, sums[1].losses, "ranks disagree");
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4, "rank 0 alone writes the metrics");
    for (x, y) in a.iter().zip(&b) {
        // Same samples (the loader slices each step's rows by rank), another sum order.
        assert!((x - y).abs() <= 1e-5 * x.abs(), "losses {a:?} vs {b:?}");
    }
    let ck = &sums[0].checkpoint;
    for f in ["model.safetensors", "config.json", "trainer_state.json"] {
        assert!(ck.join(f).is_file(), "{f} missing in {}", ck.display());
    }
    for r in 0..2 {
        assert!(ck.join(format!("zero/rank_{r}_of_2.safetensors")).is_file());
    }
    let metrics = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    for key in [
        "communication_s",
        "\"collective\"",
        "peak_host_rss_bytes_per_rank",
    ] {
        assert!(metrics.contains(key), "{key} not logged");
    }
}

fn model_bytes(ck: &Path) -> Vec<u8> {
    std::fs::read(ck.join("model.safetensors")).unwrap()
}

#[test]
fn stage_3_at_world_2_resumes_bit_for_bit() {
    let dir = common::scratch("dist_train", "resume");
    let manifest = common::byte_shards(&dir, 3000);
    let zero = ZeroConfig {
        stage: 3,
        reduce_bucket_size: 3000,
        threads: 1,
        ..ZeroConfig::default()
    };
    let whole = run_steps(
        dir.join("whole"),
        manifest.clone(),
        2,
        zero.clone(),
        4,
        false,
    );
    let split = dir.join("split");
    run_steps(split.clone(), manifest.clone(), 2, zero.clone(), 2, false);
    let resumed = run_steps(split, manifest, 2, zero, 4, true);
    assert_eq!(resumed[0].steps, 4);
    assert_eq!(
        model_bytes(&whole[0].checkpoint),
        model_bytes(&resumed[0].checkpoint),
        "2 steps + resume for 2 more differ from 4 steps"
    );
}

/// A QA fine-tune from `from`: `batch` rows, `accum` micro-batches, 3 steps.
fn qa_config(out: &Path, from: &Path, batch: usize, accum: usize) -> RunConfig {
    RunConfig::parse(&format!(
        r#"
        stage = "finetune"
        out_dir = "{}"
        [model]
        from = "{}"
        [data]
        qa_train = "{}"
        tokenizer = "{}"
        [train]
        batch = {batch}
        grad_accum = {accum}
        seq_len = 48
        steps = 3
        seed = 9
        [optim]
        lr = 1e-3
        min_lr = 0.0
        warmup_steps = 1
        "#,
        out.display(),
        from.display(),
        fixtures::qa_train().display(),
        common::tokenizer().display()
    ))
    .unwrap()
}

#[test]
fn a_qa_fine_tune_at_world_2_reads_what_one_process_reads() {
    let dir = common::scratch("dist_train", "qa");
    let manifest = common::byte_shards(&dir, 3000);
    let pre = train(config(&dir.join("pre"), &manifest, 2, 1), &opts()).unwrap();
    let one = dir.join("one");
    train(qa_config(&one, &pre.checkpoint, 2, 2), &opts()).unwrap();
    let two = dir.join("two");
    let zero = ZeroConfig {
        stage: 1,
        threads: 1,
        ..ZeroConfig::default()
    };
    let handles: Vec<_> = InProcess::group(2)
        .into_iter()
        .map(|comm| {
            let (two, from, zero) = (two.clone(), pre.checkpoint.clone(), zero.clone());
            thread::spawn(move || {
                train_distributed(qa_config(&two, &from, 2, 1), &opts(), Box::new(comm), zero)
            })
        })
        .collect();
    let sums: Vec<RunSummary> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_eq!(sums[0].losses, sums[1].losses, "ranks disagree");
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!((a.len(), b.len()), (3, 3));
    for (x, y) in a.iter().zip(&b) {
        // Rank r reads row block r of each global batch: one process's micro-batches 2s and
        // 2s + 1. Another sum order only.
        assert!((x - y).abs() <= 1e-5 * x.abs(), "losses {a:?} vs {b:?}");
    }
}
