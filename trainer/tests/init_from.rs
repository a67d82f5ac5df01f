//! `[model] init_from` / `--init-from`: a run starts from the weights of a checkpoint in any
//! layout (mamba_ssm's pytorch_model.bin, a sharded Hugging Face one) with a fresh optimizer,
//! exactly as from the same weights in model.safetensors; a checkpoint that is not the run
//! config's model is refused, naming the key.

use std::path::{Path, PathBuf};

use trainer::train::run::{train, RunOptions};
use trainer::train::run_config::RunConfig;
use trainer::train::state;

mod common;

fn config(out: &Path, manifest: &Path, model: &str) -> RunConfig {
    RunConfig::parse(&text(out, manifest, model)).unwrap()
}

fn text(out: &Path, manifest: &Path, model: &str) -> String {
    format!(
        r#"
        stage = "pretrain"
        out_dir = "{}"
        [model]
        {model}
        [data]
        manifest = "{}"
        tokenizer = "{}"
        [train]
        batch = 2
        seq_len = 16
        steps = 2
        seed = 5
        [optim]
        lr = 3e-3
        min_lr = 0.0
        warmup_steps = 1
        [checkpoint]
        every = 2
        keep_last = 1
        [eval]
        every = 100
        batches = 1
        "#,
        out.display(),
        manifest.display(),
        common::tokenizer().display()
    )
}

fn final_weights(out: &Path) -> Vec<u8> {
    std::fs::read(state::step_dir(out, 2).join("model.safetensors")).unwrap()
}

fn real(name: &str) -> PathBuf {
    fixtures::root().join("torch_bin/real").join(name)
}

#[test]
fn init_from_a_bin_or_sharded_checkpoint_trains_as_from_its_safetensors() {
    let dir = common::scratch("init_from", "same");
    let manifest = common::byte_shards(&dir, 2000);
    let tiny = fixtures::tiny_checkpoint();
    let from = dir.join("from");
    train(
        config(&from, &manifest, &format!("from = \"{}\"", tiny.display())),
        &RunOptions::default(),
    )
    .unwrap();
    let want = final_weights(&from);
    // The same weights, written by torch.save (mamba_ssm layout), and by transformers-style
    // shards; with the preset (checked) and without.
    let bin = real("mamba_ssm/rms_tied_f32");
    let sharded = dir.join("sharded");
    let o = trainer::convert::ConvertOptions {
        to: trainer::convert::Target::Hf,
        dtype: reference::io::SaveDtype::F32,
        max_shard_bytes: 100_000,
        tokenizer: None,
        force: false,
    };
    trainer::convert::convert(&tiny, &sharded, &o).unwrap();
    for (k, (src, preset)) in [(&bin, true), (&sharded, false)].iter().enumerate() {
        let model = format!(
            "{}init_from = \"{}\"",
            if *preset {
                "preset = \"quickstart\"\n"
            } else {
                ""
            },
            src.display()
        );
        let out = dir.join(format!("init{k}"));
        train(config(&out, &manifest, &model), &RunOptions::default()).unwrap();
        assert!(final_weights(&out) == want, "{src:?}: weights differ");
    }
}

#[test]
fn init_from_a_checkpoint_of_another_model_names_the_key() {
    let dir = common::scratch("init_from", "mismatch");
    let manifest = common::byte_shards(&dir, 2000);
    let model = format!(
        "preset = \"quickstart\"\ninit_from = \"{}\"",
        real("mamba_ssm/ln_tied_f32").display()
    );
    let e = train(
        config(&dir.join("out"), &manifest, &model),
        &RunOptions::default(),
    )
    .err()
    .unwrap();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("config key `norm`") && msg.contains("init_from"),
        "{msg}"
    );
    let both = text(&dir, &manifest, "from = \"x\"\ninit_from = \"y\"");
    let e = RunConfig::parse(&both).err().unwrap();
    assert!(format!("{e:#}").contains("init_from"), "{e:#}");
}
