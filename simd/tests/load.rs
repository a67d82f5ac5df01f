//! Loading checkpoint directories: matrices stored in the file's own precision are
//! memory-mapped, not copied; other combinations are converted at load; either way the model
//! computes exactly what an engine built from the same values computes. Bad files are errors.

use std::path::PathBuf;

use reference::io::{save_params, SaveDtype};
use reference::model::Batch;
use reference::{InferenceEngine, MambaConfig, NormKind};
use simd::{SimdEngine, SimdOptions, WeightDtype};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vet-simd-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model() -> (MambaConfig, reference::Params<f32>) {
    let mut cfg = MambaConfig::new(24, 2, 97);
    cfg.norm = NormKind::Rms;
    cfg.tie_embeddings = false;
    let p = reference::init::init_params::<f32>(&cfg, 31);
    (cfg, p)
}

fn opts(dtype: WeightDtype) -> SimdOptions {
    SimdOptions {
        threads: 1,
        dtype,
        isa: None,
    }
}

#[test]
fn file_precision_is_mapped_and_computes_the_same_bits() {
    let (cfg, p) = model();
    let tokens: Vec<u32> = (0..20).map(|i| (i * 13 + 5) % 97).collect();
    let batch = Batch::new(&tokens, 1, 20);
    for (save, dtype, mapped) in [
        (SaveDtype::F32, WeightDtype::F32, true),
        (SaveDtype::Bf16, WeightDtype::Bf16, true),
        (SaveDtype::F32, WeightDtype::Bf16, false),
        (SaveDtype::Bf16, WeightDtype::F32, false),
        (SaveDtype::F32, WeightDtype::Int8, false),
    ] {
        let dir = tmp(&format!("{save:?}-{dtype:?}"));
        cfg.save(&dir.join("config.json")).unwrap();
        save_params(&dir, &cfg, &p, save).unwrap();
        let mut loaded = SimdEngine::load(&dir, &opts(dtype)).unwrap();
        assert_eq!(
            loaded.weights().is_mapped(),
            mapped,
            "{save:?} file as {dtype:?}"
        );
        // The same values through `new`: the file's values (bf16-rounded when saved so).
        let file_params = reference::io::load_params::<f32>(&dir, &cfg).unwrap();
        let mut built = SimdEngine::new(cfg.clone(), file_params, &opts(dtype)).unwrap();
        let (a, _) = loaded.forward(&batch, None).unwrap();
        let (b, _) = built.forward(&batch, None).unwrap();
        let same = a
            .data
            .iter()
            .zip(&b.data)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{save:?} file as {dtype:?}: logits differ from the engine built from the same values"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn truncated_or_mismatched_checkpoints_are_errors() {
    let (cfg, p) = model();
    let dir = tmp("bad");
    cfg.save(&dir.join("config.json")).unwrap();
    save_params(&dir, &cfg, &p, SaveDtype::F32).unwrap();
    let f = dir.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len - 100).unwrap();
    let err =
        SimdEngine::load(&dir, &opts(WeightDtype::F32)).expect_err("truncated file must fail");
    assert!(err.to_string().contains("truncated"), "{err}");
    // A config that does not match the tensors.
    save_params(&dir, &cfg, &p, SaveDtype::F32).unwrap();
    let mut other = cfg.clone();
    other.d_model = 32;
    other.d_inner = 64;
    other.save(&dir.join("config.json")).unwrap();
    let err = SimdEngine::load(&dir, &opts(WeightDtype::F32)).expect_err("mismatch must fail");
    assert!(
        err.to_string().contains("does not match the config"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An int8 checkpoint written by `save_int8` is memory-mapped as it is and computes exactly
/// what quantising at load computes; other dtypes are refused with a message; a damaged
/// int8 file is an error.
#[test]
fn int8_checkpoints_round_trip_mapped() {
    let (cfg, p) = model();
    let tokens: Vec<u32> = (0..17).map(|i| (i * 7 + 2) % 97).collect();
    let batch = Batch::new(&tokens, 1, 17);
    let mut at_load = SimdEngine::new(cfg.clone(), p.clone(), &opts(WeightDtype::Int8)).unwrap();
    let dir = tmp("int8");
    simd::load::save_int8(&dir, &cfg, at_load.weights()).unwrap();
    let f32_bytes = {
        let d = tmp("int8-f32");
        save_params(&d, &cfg, &p, SaveDtype::F32).unwrap();
        let n = std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len();
        std::fs::remove_dir_all(&d).unwrap();
        n
    };
    let int8_bytes = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        int8_bytes * 2 < f32_bytes,
        "int8 file {int8_bytes} B vs f32 {f32_bytes} B"
    );
    let mut loaded = SimdEngine::load(&dir, &opts(WeightDtype::Int8)).unwrap();
    assert!(loaded.weights().is_mapped());
    let (a, _) = loaded.forward(&batch, None).unwrap();
    let (b, _) = at_load.forward(&batch, None).unwrap();
    assert!(a
        .data
        .iter()
        .zip(&b.data)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    let err = SimdEngine::load(&dir, &opts(WeightDtype::F32)).expect_err("f32 of an int8 file");
    assert!(err.to_string().contains("--dtype int8"), "{err}");
    // A config with another width no longer matches the tensors.
    let mut other = cfg.clone();
    other.vocab_size = 98;
    other.save(&dir.join("config.json")).unwrap();
    let err = SimdEngine::load(&dir, &opts(WeightDtype::Int8)).expect_err("mismatch");
    assert!(
        err.to_string().contains("does not match the config"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An int4 checkpoint written by `save_quantized` is memory-mapped as it is (codes and
/// scales), computes exactly what quantising at load computes, is well under f32's size, and
/// is refused for another dtype or a config it does not match.
#[test]
fn int4_checkpoints_round_trip_mapped() {
    let (cfg, p) = model();
    let tokens: Vec<u32> = (0..17).map(|i| (i * 5 + 1) % 97).collect();
    let batch = Batch::new(&tokens, 1, 17);
    let mut at_load = SimdEngine::new(cfg.clone(), p.clone(), &opts(WeightDtype::Int4)).unwrap();
    let dir = tmp("int4");
    simd::load::save_quantized(&dir, &cfg, at_load.weights()).unwrap();
    let d = tmp("int4-f32");
    save_params(&d, &cfg, &p, SaveDtype::F32).unwrap();
    let size = |d: &std::path::Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    let (f32_bytes, int4_bytes) = (size(&d), size(&dir));
    std::fs::remove_dir_all(&d).unwrap();
    assert!(
        int4_bytes * 2 < f32_bytes,
        "int4 file {int4_bytes} B vs f32 {f32_bytes} B"
    );
    let mut loaded = SimdEngine::load(&dir, &opts(WeightDtype::Int4)).unwrap();
    assert!(loaded.weights().is_mapped());
    let (a, _) = loaded.forward(&batch, None).unwrap();
    let (b, _) = at_load.forward(&batch, None).unwrap();
    assert!(a
        .data
        .iter()
        .zip(&b.data)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
    let err = SimdEngine::load(&dir, &opts(WeightDtype::Int8)).expect_err("int8 of an int4 file");
    assert!(err.to_string().contains("--dtype int4"), "{err}");
    let mut other = cfg.clone();
    other.vocab_size = 98;
    other.save(&dir.join("config.json")).unwrap();
    let err = SimdEngine::load(&dir, &opts(WeightDtype::Int4)).expect_err("mismatch");
    assert!(
        err.to_string().contains("does not match the config"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
