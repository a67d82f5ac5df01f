//! The reference reproduces its goldens on the bundled tiny checkpoint bit for bit: logits,
//! loss, every gradient, a 10-step AdamW trajectory and the from-scratch init. Bytes are
//! compared, not tolerances. Regenerate with
//! `cargo run --release -p conformance --bin regen-fixtures -- --goldens-only`.

use std::collections::HashMap;

use conformance::goldens::{compute, init_fingerprint};
use reference::io::{read_i64, read_tensors};
use reference::{ReferenceEngine, Tensor, TrainingEngine};

fn golden_path() -> std::path::PathBuf {
    fixtures::goldens().join("tiny.safetensors")
}

/// `input_ids` `[2, 32]` and `init_fingerprint`, as i64.
fn inputs_path() -> std::path::PathBuf {
    fixtures::goldens().join("tiny_inputs.safetensors")
}

fn goldens() -> HashMap<String, Tensor<f32>> {
    read_tensors(&golden_path())
        .expect("reading goldens")
        .into_iter()
        .collect()
}

fn golden_tokens() -> Vec<u32> {
    let (shape, ids) = read_i64(&inputs_path(), "input_ids").expect("reading golden input_ids");
    assert_eq!(shape.len(), 2);
    ids.into_iter().map(|t| t as u32).collect()
}

/// Asserts every f32 of `got` has the golden's exact bit pattern.
fn assert_bits(name: &str, got: &Tensor<f32>, want: &Tensor<f32>) {
    assert_eq!(got.shape, want.shape, "{name}: shape");
    if let Some(i) = (0..got.numel()).find(|&i| got.data[i].to_bits() != want.data[i].to_bits()) {
        panic!(
            "{name}: first differing element {:?}: got {:e} ({:#010x}) want {:e} ({:#010x})",
            conformance::unravel(i, &got.shape),
            got.data[i],
            got.data[i].to_bits(),
            want.data[i],
            want.data[i].to_bits()
        );
    }
}

#[test]
fn reference_reproduces_logits_loss_gradients_and_trajectory_bit_for_bit() {
    let ck = trainer::checkpoint::load(&fixtures::tiny_checkpoint())
        .expect("loading the tiny checkpoint");
    let want = goldens();
    let got = compute(&ck.config, ck.params, &golden_tokens());
    let n_grads = got.iter().filter(|(n, _)| n.starts_with("grad.")).count();
    assert_eq!(
        n_grads,
        reference::param_specs(&ck.config).len(),
        "one gradient per parameter"
    );
    for (name, t) in &got {
        let w = want
            .get(name)
            .unwrap_or_else(|| panic!("golden file lacks {name}"));
        assert_bits(name, t, w);
    }
    // The trajectory must actually train: loss falls over the 10 steps.
    let traj = &want["trajectory"].data;
    assert!(
        traj[9] < traj[0],
        "golden trajectory does not descend: {traj:?}"
    );
}

#[test]
fn from_scratch_init_reproduces_its_fingerprint() {
    let (_, fp) = read_i64(&inputs_path(), "init_fingerprint").expect("reading init_fingerprint");
    assert_eq!(
        init_fingerprint() as i64,
        fp[0],
        "init of the tiny config from TINY_SEED changed"
    );
}

#[test]
fn debug_state_command_writes_the_golden_logits_loss_and_gradients() {
    let ck = trainer::checkpoint::load(&fixtures::tiny_checkpoint())
        .expect("loading the tiny checkpoint");
    let mut engine = ReferenceEngine::new(ck.config.clone(), ck.params);
    let out = std::env::temp_dir().join(format!(
        "vet-mamba-debug-state-{}.safetensors",
        std::process::id()
    ));
    let s = trainer::debug_state::run(&mut engine, &inputs_path(), &out).expect("debug-state");
    let got: HashMap<String, Tensor<f32>> = read_tensors(&out)
        .expect("reading debug-state output")
        .into_iter()
        .collect();
    let _ = std::fs::remove_file(&out);
    let want = goldens();
    assert_eq!(s.tensors, 2 + engine.gradients().unwrap().len());
    for (name, t) in &got {
        assert_bits(name, t, &want[name]);
    }
}
