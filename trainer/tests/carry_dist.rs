//! Stateful training (`[train] carry_state`) under data parallelism: two in-process ranks
//! (simd engine, ZeRO), each carrying its own rows' states. The sharded checkpoint holds every
//! rank's carried states beside its optimizer shard, and a resumed run is the same bits as an
//! uninterrupted one.

use std::path::{Path, PathBuf};
use std::thread;

use reference::comm::InProcess;
use reference::io::read_tensors;
use trainer::dist::ckpt::ZERO_DIR;
use trainer::dist::{train_distributed, ZeroConfig};
use trainer::train::carry::carry_file;
use trainer::train::run::{RunOptions, RunSummary};
use trainer::train::run_config::RunConfig;
use trainer::train::state;

mod common;

fn config(out: &Path, manifest: &Path, steps: u64, carry: &str) -> RunConfig {
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
        seed = 5
        carry_state = {carry}
        [optim]
        lr = 3e-3
        min_lr = 0.0
        warmup_steps = 2
        [checkpoint]
        every = 2
        keep_last = 3
        "#,
        out.display(),
        manifest.display(),
        common::tokenizer().display()
    ))
    .unwrap()
}

/// Runs `steps` steps of the job in `out` on two in-process ranks.
fn run_world_2(
    out: &Path,
    manifest: &Path,
    steps: u64,
    carry: &str,
    resume: bool,
) -> Vec<RunSummary> {
    let zero = ZeroConfig {
        stage: 2,
        reduce_bucket_size: 3000,
        threads: 1,
        ..ZeroConfig::default()
    };
    let handles: Vec<_> = InProcess::group(2)
        .into_iter()
        .map(|comm| {
            let (out, manifest, zero) = (out.to_path_buf(), manifest.to_path_buf(), zero.clone());
            let carry = carry.to_string();
            thread::spawn(move || {
                let o = RunOptions {
                    device: "cpu".into(),
                    threads: 1,
                    resume,
                    ..RunOptions::default()
                };
                train_distributed(
                    config(&out, &manifest, steps, &carry),
                    &o,
                    Box::new(comm),
                    zero,
                )
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

fn carried(ck: &Path, rank: usize) -> Vec<u8> {
    std::fs::read(ck.join(ZERO_DIR).join(carry_file(rank))).unwrap()
}

fn resumes_to_the_same_bits(name: &str, carry: &str) {
    let dir = common::scratch("carry_dist", name);
    let manifest = common::byte_shards(&dir, 3000);
    let whole = dir.join("whole");
    let w = run_world_2(&whole, &manifest, 4, carry, false);
    let split: PathBuf = dir.join("split");
    run_world_2(&split, &manifest, 2, carry, false);
    let mid = state::step_dir(&split, 2);
    let (s0, s1) = (carried(&mid, 0), carried(&mid, 1));
    assert_ne!(s0, s1, "{name}: each rank saves its own rows' states");
    let st = read_tensors(&mid.join(ZERO_DIR).join(carry_file(1))).unwrap();
    assert!(
        st.iter().any(|(_, t)| t.data.iter().any(|&v| v != 0.0)),
        "{name}: rank 1's checkpoint holds a carried state"
    );
    let r = run_world_2(&split, &manifest, 4, carry, true);
    assert_eq!(r[0].steps, 4);
    let (a, b) = (&w[0].checkpoint, &r[0].checkpoint);
    let model = |ck: &Path| std::fs::read(ck.join("model.safetensors")).unwrap();
    assert!(model(a) == model(b), "{name}: weights differ after resume");
    for rank in 0..2 {
        assert!(
            carried(a, rank) == carried(b, rank),
            "{name}: rank {rank}'s carried states differ after resume"
        );
    }
}

#[test]
fn world_2_detached_carry_resumes_to_the_same_bits() {
    resumes_to_the_same_bits("detach", "\"detach\"");
}

#[test]
fn world_2_carry_through_two_windows_resumes_to_the_same_bits() {
    resumes_to_the_same_bits("k2", "2");
}

#[test]
fn world_2_interleaved_streams_resume_to_the_same_bits() {
    resumes_to_the_same_bits("s2", "\"detach\"\n        carry_streams = 2");
}

#[test]
fn a_carry_checkpoint_of_another_world_size_is_refused() {
    let dir = common::scratch("carry_dist", "world");
    let manifest = common::byte_shards(&dir, 3000);
    let out = dir.join("run");
    run_world_2(&out, &manifest, 2, "\"detach\"", false);
    // Resume the two-rank checkpoint at world 1 through the driver: rank 1's carried states
    // are one file too many (its rows would be dropped), so the resume is refused.
    let zero = ZeroConfig {
        stage: 2,
        threads: 1,
        ..ZeroConfig::default()
    };
    let comm = InProcess::group(1).pop().unwrap();
    let o = RunOptions {
        device: "cpu".into(),
        threads: 1,
        resume: true,
        ..RunOptions::default()
    };
    let err = train_distributed(
        config(&out, &manifest, 4, "\"detach\""),
        &o,
        Box::new(comm),
        zero,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&carry_file(1)) && msg.contains("same number of ranks"),
        "{msg}"
    );
}
