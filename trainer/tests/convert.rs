//! `vet-train convert`: Hugging Face and mamba_ssm checkpoints (tied and untied, LayerNorm and
//! RMSNorm) converted to `mamba_ssm` and `hf` load back with the same parameters and logits,
//! bit for bit; the mamba_ssm config holds only the keys mamba_ssm's `MambaConfig` takes; the
//! tied head shares the embedding's storage; a sharded save is loaded by every command.

use std::path::{Path, PathBuf};
use std::process::Command;

use reference::model::{forward, Batch};
use reference::Params;
use trainer::checkpoint;
use trainer::convert::{convert, ConvertOptions, Target};

const TRAIN: &str = env!("CARGO_BIN_EXE_vet-train");
const CHAT: &str = env!("CARGO_BIN_EXE_vet-chat");

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vet-convert-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts(to: Target) -> ConvertOptions {
    ConvertOptions {
        to,
        dtype: reference::io::SaveDtype::F32,
        max_shard_bytes: reference::io::DEFAULT_MAX_SHARD_BYTES,
        tokenizer: None,
        force: false,
    }
}

fn logit_bits(ck: &checkpoint::Checkpoint) -> Vec<u32> {
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % 264).collect();
    let batch = Batch::new(&ids, 2, 12);
    let (out, _, _) = forward(&ck.config, &ck.params, &batch, None, false).unwrap();
    out.data.iter().map(|x| x.to_bits()).collect()
}

fn bits(p: &Params<f32>) -> Vec<Vec<u32>> {
    p.tensors()
        .iter()
        .map(|t| t.data.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn sources() -> Vec<PathBuf> {
    let real = fixtures::root().join("torch_bin/real/mamba_ssm");
    vec![
        fixtures::tiny_checkpoint(),
        real.join("ln_tied_f32"),
        real.join("ln_untied_bf16"),
        real.join("rms_untied_f32"),
        fixtures::root().join("torch_bin/real/mamba_ssm_saved/ln_pad"),
    ]
}

#[test]
fn convert_round_trips_bit_for_bit() {
    for (k, src) in sources().iter().enumerate() {
        let want = checkpoint::load(src).unwrap();
        let ms = scratch(&format!("ms{k}")).join("out");
        convert(src, &ms, &opts(Target::MambaSsm)).unwrap();
        let hf = scratch(&format!("hf{k}")).join("out");
        let mut o = opts(Target::Hf);
        o.max_shard_bytes = 100_000;
        convert(&ms, &hf, &o).unwrap();
        assert!(hf.join("model.safetensors.index.json").is_file(), "{src:?}");
        for dir in [&ms, &hf] {
            let got = checkpoint::load(dir).unwrap();
            assert_eq!(got.config, want.config, "{src:?} -> {dir:?}");
            assert_eq!(bits(&got.params), bits(&want.params), "{src:?} -> {dir:?}");
            assert_eq!(logit_bits(&got), logit_bits(&want), "{src:?} -> {dir:?}");
        }
    }
}

#[test]
fn the_mamba_ssm_config_has_only_mamba_ssm_keys() {
    let out = scratch("keys").join("out");
    convert(&fixtures::tiny_checkpoint(), &out, &opts(Target::MambaSsm)).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    // mamba_ssm 2.3's MambaConfig dataclass fields: it is built with MambaConfig(**json).
    assert_eq!(
        keys,
        [
            "attn_cfg",
            "attn_layer_idx",
            "d_intermediate",
            "d_model",
            "fused_add_norm",
            "n_layer",
            "pad_vocab_size_multiple",
            "residual_in_fp32",
            "rms_norm",
            "ssm_cfg",
            "tie_embeddings",
            "vocab_size"
        ]
    );
    // Tied: lm_head.weight is in the pickle but shares storage 0 (one data file per parameter).
    let zip = std::fs::read(out.join("pytorch_model.bin")).unwrap();
    let text = String::from_utf8_lossy(&zip);
    assert!(text.contains("lm_head.weight"));
    let n_params = checkpoint::load(&out).unwrap().params.tensors().len();
    assert!(text.contains(&format!("archive/data/{}", n_params - 1)));
    assert!(!text.contains(&format!("archive/data/{n_params}")));
}

#[test]
fn a_norm_eps_mamba_ssm_cannot_hold_is_refused_naming_the_key() {
    let src = scratch("eps");
    let ck = checkpoint::load(&fixtures::tiny_checkpoint()).unwrap();
    let mut cfg = ck.config.clone();
    cfg.norm_eps = 1e-6;
    checkpoint::save(&src.join("m"), &cfg, &ck.params, None).unwrap();
    let out = src.join("out");
    let e = convert(&src.join("m"), &out, &opts(Target::MambaSsm))
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("norm_eps"), "{e:#}");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn vet_train_convert_and_every_loader_take_a_sharded_checkpoint() {
    let d = scratch("cli");
    let out = d.join("sharded");
    let tiny = fixtures::tiny_checkpoint();
    let run = |args: &[&str]| Command::new(TRAIN).args(args).output().unwrap();
    let o = run(&[
        "convert",
        "--model",
        tiny.to_str().unwrap(),
        "--to",
        "hf",
        "--out",
        out.to_str().unwrap(),
        "--max-shard-size",
        "100KB",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model-00005-of-00005.safetensors").is_file());
    assert!(out.join("tokenizer.json").is_file());
    let bad = run(&[
        "convert",
        "--model",
        tiny.to_str().unwrap(),
        "--to",
        "hf",
        "--out",
        d.join("x").to_str().unwrap(),
        "--max-shard-size",
        "lots",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("--max-shard-size"),
        "{err}"
    );
    let chat = |m: &Path| {
        let o = Command::new(CHAT)
            .args(["--model", m.to_str().unwrap(), "--device", "cpu"])
            .args(["--tokens", "5,17,200", "--greedy", "--max-new-tokens", "6"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    assert_eq!(chat(&out), chat(&tiny));
    let q = run(&[
        "quantize",
        "--model",
        out.to_str().unwrap(),
        "--out",
        d.join("q").to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
}

#[test]
fn a_checkpoint_without_a_tokenizer_says_so_and_takes_tokenizer() {
    // mamba_ssm checkpoints ship no tokenizer.json.
    let dir = fixtures::root().join("torch_bin/real/mamba_ssm/rms_tied_f32");
    assert!(!dir.join("tokenizer.json").exists());
    let ask = |extra: &[&str]| {
        Command::new(CHAT)
            .args(["--model", dir.to_str().unwrap(), "--device", "cpu"])
            .args(["--question", "Is a cat a mammal?", "--greedy"])
            .args(["--max-new-tokens", "4"])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let o = ask(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("has no tokenizer") && err.contains("--tokenizer"),
        "{err}"
    );
    let tok = fixtures::tiny_checkpoint().join("tokenizer.json");
    let o = ask(&["--tokenizer", tok.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g = Command::new(TRAIN)
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "The dog",
        ])
        .args([
            "--max-new-tokens",
            "3",
            "--tokenizer",
            tok.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
}
