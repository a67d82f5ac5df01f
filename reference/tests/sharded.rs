//! Sharded Hugging Face checkpoints: our split is transformers' split (same files, same index
//! json), a sharded save loads back to the same bits, and a missing or corrupt shard, an
//! index naming a tensor its shard lacks, and a tensor in two shards are clear errors.

use std::path::{Path, PathBuf};

use reference::io::{
    checkpoint_layout, load_params, parse_size, save_params_sharded, write_tensors, Layout,
    SaveDtype, TensorOut,
};
use reference::{MambaConfig, Params};
use serde_json::Value;

fn real() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/torch_bin/real/hf")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vet-sharded-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bits(p: &Params<f32>) -> Vec<Vec<u32>> {
    p.tensors()
        .iter()
        .map(|t| t.data.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The transformers-made unsharded model, saved again by us in 100KB shards.
fn our_shards(tag: &str) -> (PathBuf, MambaConfig, Params<f32>) {
    let cfg = MambaConfig::load(&real().join("full/config.json")).unwrap();
    let p: Params<f32> = load_params(&real().join("full"), &cfg).unwrap();
    let dir = scratch(tag);
    let max = parse_size("100KB").unwrap();
    save_params_sharded(&dir, &cfg, &p, SaveDtype::F32, max).unwrap();
    (dir, cfg, p)
}

#[test]
fn our_split_is_transformers_split() {
    let (dir, cfg, p) = our_shards("split");
    let theirs = real().join("sharded");
    let index = "model.safetensors.index.json";
    assert_eq!(json(&dir.join(index)), json(&theirs.join(index)));
    for k in 1..=5 {
        let f = format!("model-{k:05}-of-00005.safetensors");
        assert!(dir.join(&f).is_file(), "{f}");
    }
    let back: Params<f32> = load_params(&dir, &cfg).unwrap();
    assert_eq!(bits(&back), bits(&p));
    assert!(matches!(
        checkpoint_layout(&dir).unwrap(),
        Layout::Sharded(_)
    ));
}

#[test]
fn a_model_under_the_limit_is_one_file() {
    let cfg = MambaConfig::load(&real().join("full/config.json")).unwrap();
    let p: Params<f32> = load_params(&real().join("full"), &cfg).unwrap();
    let dir = scratch("one");
    let files = save_params_sharded(&dir, &cfg, &p, SaveDtype::Bf16, 5_000_000_000).unwrap();
    assert_eq!(files, vec!["model.safetensors".to_string()]);
    assert!(!dir.join("model.safetensors.index.json").exists());
}

fn err(dir: &Path, cfg: &MambaConfig) -> String {
    load_params::<f32>(dir, cfg).err().unwrap().to_string()
}

#[test]
fn a_missing_or_truncated_shard_is_named() {
    let (dir, cfg, _) = our_shards("missing");
    let third = dir.join("model-00003-of-00005.safetensors");
    let bytes = std::fs::read(&third).unwrap();
    std::fs::remove_file(&third).unwrap();
    let e = err(&dir, &cfg);
    assert!(
        e.contains("model-00003-of-00005.safetensors") && e.contains("missing"),
        "{e}"
    );
    std::fs::write(&third, &bytes[..bytes.len() - 10]).unwrap();
    let e = err(&dir, &cfg);
    assert!(
        e.contains("model-00003-of-00005.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn an_index_naming_a_tensor_its_shard_lacks_is_an_error() {
    let (dir, cfg, _) = our_shards("lacks");
    let path = dir.join("model.safetensors.index.json");
    let mut index = json(&path);
    index["weight_map"]["backbone.layers.9.mixer.D"] = "model-00002-of-00005.safetensors".into();
    std::fs::write(&path, index.to_string()).unwrap();
    let e = err(&dir, &cfg);
    assert!(
        e.contains("backbone.layers.9.mixer.D") && e.contains("does not hold it"),
        "{e}"
    );
    // A tensor the index puts in another shard than the one holding it.
    let mut index = json(&path);
    let wm = index["weight_map"].as_object_mut().unwrap();
    wm.remove("backbone.layers.9.mixer.D");
    wm["backbone.norm_f.weight"] = "model-00001-of-00005.safetensors".into();
    std::fs::write(&path, index.to_string()).unwrap();
    let e = err(&dir, &cfg);
    assert!(
        e.contains("backbone.norm_f.weight") && e.contains("the index puts it in"),
        "{e}"
    );
}

#[test]
fn a_tensor_in_two_shards_is_an_error() {
    let (dir, cfg, p) = our_shards("dup");
    let extra = "model-extra.safetensors";
    let norm_f = p.norm_f_weight.clone();
    let t = |d: Vec<f32>| TensorOut::F32 {
        shape: vec![d.len()],
        data: d,
    };
    write_tensors(
        &dir.join(extra),
        &[
            ("backbone.norm_f.weight".into(), t(norm_f.data.clone())),
            ("spare".into(), t(vec![1.5, -2.0])),
        ],
    )
    .unwrap();
    let path = dir.join("model.safetensors.index.json");
    let mut index = json(&path);
    index["weight_map"]["spare"] = extra.into();
    std::fs::write(&path, index.to_string()).unwrap();
    let e = err(&dir, &cfg);
    assert!(
        e.contains("backbone.norm_f.weight") && e.contains("two shards"),
        "{e}"
    );
}

#[test]
fn a_folder_without_weights_says_what_it_looked_for() {
    let dir = scratch("empty");
    let e = checkpoint_layout(&dir).err().unwrap().to_string();
    for f in [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ] {
        assert!(e.contains(f), "{e}");
    }
}

#[test]
fn shard_sizes_parse_as_transformers_does() {
    assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
    assert_eq!(parse_size("500MB"), Ok(500_000_000));
    assert_eq!(parse_size("100KB"), Ok(100_000));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert_eq!(parse_size("5Gb"), Ok(625_000_000));
    assert_eq!(parse_size("12345"), Ok(12345));
    for bad in ["", "GB", "-5GB", "0", "five", "5 TB"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
}
