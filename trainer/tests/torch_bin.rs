//! A checkpoint directory holding `config.json` + mamba_ssm's `pytorch_model.bin` (no
//! `model.safetensors`) loads wherever the safetensors one does: the trainer's checkpoint
//! loader and `vet-chat --model DIR` on the reference and cpu engines, with the same output.

use std::process::{Command, Output};

const CHAT: &str = env!("CARGO_BIN_EXE_vet-chat");

fn chat(model: &std::path::Path, device: &str) -> Output {
    Command::new(CHAT)
        .args(["--model", model.to_str().unwrap(), "--device", device])
        .args([
            "--tokens",
            "5,17,200,3,99",
            "--greedy",
            "--max-new-tokens",
            "8",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn checkpoint_load_reads_a_pytorch_model_bin_directory() {
    let st = trainer::checkpoint::load(&fixtures::tiny_checkpoint()).unwrap();
    let bin = trainer::checkpoint::load(&fixtures::root().join("torch_bin/tiny")).unwrap();
    assert!(!bin.dir.join("model.safetensors").exists());
    let bits = |p: &reference::Params<f32>| -> Vec<u32> {
        p.tensors()
            .iter()
            .flat_map(|t| t.data.iter().map(|x| x.to_bits()))
            .collect()
    };
    assert_eq!(bits(&bin.params), bits(&st.params));
}

#[test]
fn vet_chat_runs_a_pytorch_model_bin_directory() {
    for device in ["reference", "cpu"] {
        let want = chat(&fixtures::tiny_checkpoint(), device);
        let got = chat(&fixtures::root().join("torch_bin/tiny"), device);
        let err = String::from_utf8_lossy(&got.stderr);
        assert!(got.status.success(), "{device}: {err}");
        assert!(!want.stdout.is_empty());
        assert_eq!(got.stdout, want.stdout, "{device}: {err}");
    }
}
