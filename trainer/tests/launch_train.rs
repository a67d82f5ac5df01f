//! `vet-train launch` running a real training job: two CPU ranks in separate processes meet
//! over TCP and train through the ZeRO driver (`trainer::dist::join`). Their checkpoint must
//! equal, bit for bit, the same job on two in-process ranks (TCP sums in rank order, as the
//! in-process comm does).

use std::path::Path;
use std::process::Command;
use std::thread;

use reference::comm::InProcess;
use trainer::dist::{train_distributed, ZeroConfig};
use trainer::train::run::RunOptions;
use trainer::train::run_config::RunConfig;

mod common;

fn config_text(out: &Path, manifest: &Path) -> String {
    format!(
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
        steps = 3
        seed = 11
        [optim]
        lr = 3e-3
        min_lr = 0.0
        warmup_steps = 1
        "#,
        out.display(),
        manifest.display(),
        common::tokenizer().display()
    )
}

fn model_bytes(out: &Path) -> Vec<u8> {
    let ck = out.join("checkpoints/step-00000003/model.safetensors");
    std::fs::read(&ck).unwrap_or_else(|e| panic!("{}: {e}", ck.display()))
}

#[test]
fn two_launched_cpu_ranks_train_like_two_in_process_ranks() {
    let dir = common::scratch("launch_train", "w2");
    let manifest = common::byte_shards(&dir, 3000);

    // Two processes through the launcher, stage 2 from a DeepSpeed config.
    let launched = dir.join("launched");
    let cfg_path = dir.join("run.toml");
    std::fs::write(&cfg_path, config_text(&launched, &manifest)).unwrap();
    let ds = dir.join("ds.json");
    std::fs::write(
        &ds,
        r#"{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2, "reduce_bucket_size": 5000}}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vet-train"))
        .args(["launch", "--nproc-per-node", "2", "--", "--config"])
        .arg(&cfg_path)
        .args(["--device", "cpu", "--threads", "1", "--deepspeed"])
        .arg(&ds)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vet-train launch failed:\n{text}");
    assert!(
        text.contains("data parallel: 2 ranks, ZeRO stage 2"),
        "{text}"
    );

    // The same job on two in-process ranks.
    let inproc = dir.join("inproc");
    let zero = ZeroConfig {
        stage: 2,
        reduce_bucket_size: 5000,
        ..ZeroConfig::default()
    };
    let handles: Vec<_> = InProcess::group(2)
        .into_iter()
        .map(|comm| {
            let (inproc, manifest, zero) = (inproc.clone(), manifest.clone(), zero.clone());
            thread::spawn(move || {
                let cfg = RunConfig::parse(&config_text(&inproc, &manifest)).unwrap();
                let o = RunOptions {
                    device: "cpu".into(),
                    threads: 1,
                    ..RunOptions::default()
                };
                train_distributed(cfg, &o, Box::new(comm), zero)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    assert!(
        model_bytes(&launched) == model_bytes(&inproc),
        "two launched ranks (TCP) and two in-process ranks give different weights"
    );

    // Launched again with overlap_comm: each rank's communication thread drives its TCP
    // connection while the backward runs, and the weights keep their bits.
    let overlapped = dir.join("overlapped");
    let cfg_path = dir.join("run-overlap.toml");
    std::fs::write(&cfg_path, config_text(&overlapped, &manifest)).unwrap();
    let ds = dir.join("ds-overlap.json");
    std::fs::write(
        &ds,
        r#"{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2, "reduce_bucket_size": 5000, "overlap_comm": true}}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vet-train"))
        .args(["launch", "--nproc-per-node", "2", "--", "--config"])
        .arg(&cfg_path)
        .args(["--device", "cpu", "--threads", "1", "--deepspeed"])
        .arg(&ds)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vet-train launch failed:\n{text}");
    assert!(
        model_bytes(&overlapped) == model_bytes(&inproc),
        "overlap_comm over TCP changed the weights"
    );
}
