//! A user's bad checkpoint or config is a clear error naming the file, tensor or key — never a
//! panic — and good checkpoints round trip exactly.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use reference::io::{
    load_params, read_i64, read_tensors, save_params, write_tensors, SaveDtype, TensorOut,
};
use reference::{param_specs, Error, MambaConfig, NormKind, Params};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// splitmix64: a tiny seeded generator, the same on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1), never exactly zero in practice.
    fn signed_unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A fresh, empty directory for one test.
fn test_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vet-mamba-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small config: d_model 8, 2 layers, vocab 16, d_state 4, d_conv 3, dt_rank 1.
fn small_config(norm: NormKind, tie_embeddings: bool) -> MambaConfig {
    let mut cfg = MambaConfig::new(8, 2, 16);
    cfg.d_state = 4;
    cfg.d_conv = 3;
    cfg.norm = norm;
    cfg.tie_embeddings = tie_embeddings;
    cfg.use_bias = true;
    cfg
}

/// Parameters of `cfg` filled from a seeded generator.
fn random_params(cfg: &MambaConfig, seed: u64) -> Params<f32> {
    let mut rng = SplitMix64(seed);
    let mut p = Params::<f32>::zeros(cfg);
    for t in p.tensors_mut() {
        t.data.iter_mut().for_each(|v| *v = rng.signed_unit());
    }
    p
}

/// `params` as f32 tensors under their canonical names.
fn as_tensor_out(cfg: &MambaConfig, params: &Params<f32>) -> Vec<(String, TensorOut)> {
    params
        .named(cfg)
        .into_iter()
        .map(|(n, t)| {
            let out = TensorOut::F32 {
                shape: t.shape.clone(),
                data: t.data.clone(),
            };
            (n, out)
        })
        .collect()
}

/// The message of a checkpoint error, checking it names `path`.
fn checkpoint_error<T: std::fmt::Debug>(result: reference::Result<T>, path: &Path) -> String {
    match result {
        Err(e @ Error::Checkpoint { .. }) => {
            let msg = e.to_string();
            let shown = path.display().to_string();
            assert!(msg.contains(&shown), "message does not name {shown}: {msg}");
            msg
        }
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn truncated_file_is_an_error_naming_the_path() {
    let dir = test_dir("truncated");
    let cfg = small_config(NormKind::Rms, true);
    let good = dir.join("good.safetensors");
    save_params(&good, &cfg, &random_params(&cfg, 1), SaveDtype::F32).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Cut inside the data, inside the header, and inside the length prefix.
    for cut in [
        bytes.len() - 1,
        bytes.len() - 37,
        8 + header_len,
        8 + header_len / 2,
        5,
        0,
    ] {
        let bad = dir.join(format!("cut{cut}.safetensors"));
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        checkpoint_error(load_params::<f32>(&bad, &cfg), &bad);
        checkpoint_error(read_tensors(&bad), &bad);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_dtype_is_an_error_naming_the_tensor() {
    let dir = test_dir("wrong-dtype");
    let cfg = small_config(NormKind::Rms, true);
    let params = random_params(&cfg, 2);
    let d_inner = cfg.d_inner;
    let named = params.named(&cfg);
    let mut bytes_of = Vec::new();
    for (name, t) in &named {
        let bytes: Vec<u8> = if name == "backbone.layers.1.mixer.D" {
            (0..d_inner).map(|i| i as u8 + 1).collect()
        } else {
            t.data.iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        bytes_of.push((name.clone(), t.shape.clone(), bytes));
    }
    let views = bytes_of.iter().map(|(name, shape, bytes)| {
        let dtype = if name == "backbone.layers.1.mixer.D" {
            Dtype::U8
        } else {
            Dtype::F32
        };
        (
            name.clone(),
            TensorView::new(dtype, shape.clone(), bytes).unwrap(),
        )
    });
    let path = dir.join("u8.safetensors");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    for msg in [
        checkpoint_error(load_params::<f32>(&path, &cfg), &path),
        checkpoint_error(read_tensors(&path), &path),
    ] {
        assert!(
            msg.contains("backbone.layers.1.mixer.D") && msg.contains("U8"),
            "{msg}"
        );
    }
    // An I64 where a weight belongs, written through our own writer.
    let mut tensors = as_tensor_out(&cfg, &params);
    let in_proj = tensors
        .iter_mut()
        .find(|(n, _)| n == "backbone.layers.0.mixer.in_proj.weight")
        .unwrap();
    in_proj.1 = TensorOut::I64 {
        shape: vec![2 * d_inner, cfg.d_model],
        data: (1..=(2 * d_inner * cfg.d_model) as i64).collect(),
    };
    write_tensors(&path, &tensors).unwrap();
    let msg = checkpoint_error(load_params::<f32>(&path, &cfg), &path);
    assert!(
        msg.contains("backbone.layers.0.mixer.in_proj.weight") && msg.contains("I64"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shape_mismatch_names_the_tensor_and_both_shapes() {
    let dir = test_dir("shape");
    let cfg = small_config(NormKind::Rms, true);
    let mut tensors = as_tensor_out(&cfg, &random_params(&cfg, 3));
    let a_log = tensors
        .iter_mut()
        .find(|(n, _)| n == "backbone.layers.1.mixer.A_log")
        .unwrap();
    let TensorOut::F32 { shape, .. } = &mut a_log.1 else {
        unreachable!()
    };
    *shape = vec![cfg.d_state, cfg.d_inner]; // transposed
    let path = dir.join("model.safetensors");
    write_tensors(&path, &tensors).unwrap();
    let msg = checkpoint_error(load_params::<f32>(&dir, &cfg), &path);
    assert!(
        msg.contains("backbone.layers.1.mixer.A_log: got [4, 16], expected [16, 4]"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_and_unexpected_tensors_are_listed_in_one_error() {
    let dir = test_dir("missing-extra");
    let cfg = small_config(NormKind::Layer, false);
    let mut tensors = as_tensor_out(&cfg, &random_params(&cfg, 4));
    tensors.retain(|(n, _)| n != "lm_head.weight" && n != "backbone.layers.0.norm.bias");
    tensors.push((
        "backbone.layers.7.mixer.extra".to_string(),
        TensorOut::F32 {
            shape: vec![3],
            data: vec![0.5, -1.5, 2.5],
        },
    ));
    let path = dir.join("model.safetensors");
    write_tensors(&path, &tensors).unwrap();
    let msg = checkpoint_error(load_params::<f32>(&path, &cfg), &path);
    for name in [
        "lm_head.weight",
        "backbone.layers.0.norm.bias",
        "backbone.layers.7.mixer.extra",
    ] {
        assert!(msg.contains(name), "{name} not listed: {msg}");
    }
    assert!(
        msg.contains("missing") && msg.contains("unexpected"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_config_value_is_an_error_naming_the_key() {
    let dir = test_dir("bad-config");
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 16, "state_size": -4}"#,
    )
    .unwrap();
    let err = MambaConfig::load(&dir).unwrap_err();
    assert!(
        matches!(err, Error::Config { ref key, .. } if key == "state_size"),
        "{err}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");
    // A config made in code is checked before a checkpoint is read with it.
    let mut cfg = small_config(NormKind::Rms, true);
    cfg.d_conv = 0;
    let err = load_params::<f32>(&dir.join("absent.safetensors"), &cfg).unwrap_err();
    assert!(err.to_string().contains("conv_kernel"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn garbage_and_lying_headers_are_errors() {
    let dir = test_dir("garbage");
    let cfg = small_config(NormKind::Rms, true);
    let mut rng = SplitMix64(5);
    let garbage: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    let mut header_past_end = 1000u64.to_le_bytes().to_vec();
    header_past_end.extend_from_slice(b"{}");
    let mut huge_header = u64::MAX.to_le_bytes().to_vec();
    huge_header.extend_from_slice(&[7; 64]);
    let header = br#"{"w":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}"#;
    let mut offsets_past_end = (header.len() as u64).to_le_bytes().to_vec();
    offsets_past_end.extend_from_slice(header);
    offsets_past_end.extend_from_slice(&[0; 16]);
    let not_json = [8u64.to_le_bytes().to_vec(), b"not json".to_vec()].concat();
    let cases = [
        ("garbage", garbage),
        ("header-past-end", header_past_end),
        ("huge-header", huge_header),
        ("offsets-past-end", offsets_past_end),
        ("not-json", not_json),
        ("empty", Vec::new()),
    ];
    for (name, bytes) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        checkpoint_error(load_params::<f32>(&path, &cfg), &path);
        checkpoint_error(read_tensors(&path), &path);
        checkpoint_error(read_i64(&path, "tokens"), &path);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bf16_and_f16_files_load_as_the_converted_values() {
    let dir = test_dir("half");
    let cfg = small_config(NormKind::Layer, false);
    let params = random_params(&cfg, 6);
    type Convert = fn(f32) -> f32;
    let cases: [(SaveDtype, Convert); 2] = [
        (SaveDtype::Bf16, |v| bf16::from_f32(v).to_f32()),
        (SaveDtype::F16, |v| f16::from_f32(v).to_f32()),
    ];
    for (dtype, convert) in cases {
        let path = dir.join(format!("{dtype:?}.safetensors"));
        save_params(&path, &cfg, &params, dtype).unwrap();
        let loaded = load_params::<f32>(&path, &cfg).unwrap();
        let mut changed = 0;
        for (want, got) in params.tensors().into_iter().zip(loaded.tensors()) {
            assert_eq!(want.shape, got.shape);
            for (&w, &g) in want.data.iter().zip(&got.data) {
                assert_eq!(
                    convert(w).to_bits(),
                    g.to_bits(),
                    "{dtype:?}: {w} loaded as {g}"
                );
                changed += usize::from(w != g);
            }
        }
        assert!(
            changed > 0,
            "{dtype:?} lost no precision: was it really written as {dtype:?}?"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn f32_save_then_load_is_bit_exact() {
    let dir = test_dir("roundtrip");
    for (norm, tie) in [(NormKind::Rms, true), (NormKind::Layer, false)] {
        let cfg = small_config(norm, tie);
        let params = random_params(&cfg, 7);
        save_params(&dir, &cfg, &params, SaveDtype::F32).unwrap();
        let loaded = load_params::<f32>(&dir, &cfg).unwrap();
        assert_eq!(loaded, params);
        let bits = |p: &Params<f32>| -> Vec<u32> {
            p.tensors()
                .iter()
                .flat_map(|t| t.data.iter().map(|v| v.to_bits()))
                .collect()
        };
        assert_eq!(bits(&loaded), bits(&params));
        // f64 parameters widen exactly.
        let wide = load_params::<f64>(&dir, &cfg).unwrap();
        assert_eq!(wide, params.cast::<f64>(&cfg));
        // The file says format=pt (transformers requires it) and names match param_specs.
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let format = meta.metadata().as_ref().and_then(|m| m.get("format"));
        assert_eq!(format.map(String::as_str), Some("pt"));
        let mut names: Vec<String> = param_specs(&cfg).into_iter().map(|(n, _)| n).collect();
        names.sort();
        let read: Vec<String> = read_tensors(&dir.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(read, names);
    }
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["model.safetensors"],
        "a temporary file was left behind"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mamba_ssm_embedding_name_is_accepted_and_a_tied_lm_head_ignored() {
    let dir = test_dir("mamba-ssm-names");
    let cfg = small_config(NormKind::Layer, true);
    let params = random_params(&cfg, 8);
    let mut tensors = as_tensor_out(&cfg, &params);
    assert_eq!(tensors[0].0, "backbone.embeddings.weight");
    tensors[0].0 = "backbone.embedding.weight".to_string();
    let head = TensorOut::F32 {
        shape: vec![cfg.vocab_size, cfg.d_model],
        data: (0..cfg.vocab_size * cfg.d_model)
            .map(|i| i as f32 * 0.25 + 1.0)
            .collect(),
    };
    tensors.push(("lm_head.weight".to_string(), head));
    let path = dir.join("model.safetensors");
    write_tensors(&path, &tensors).unwrap();
    assert_eq!(load_params::<f32>(&path, &cfg).unwrap(), params);
    // Both spellings at once is ambiguous.
    let mut both = tensors.clone();
    both.push((
        "backbone.embeddings.weight".to_string(),
        tensors[0].1.clone(),
    ));
    write_tensors(&path, &both).unwrap();
    let msg = checkpoint_error(load_params::<f32>(&path, &cfg), &path);
    assert!(msg.contains("backbone.embedding.weight"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn integer_tensors_read_as_i64() {
    let dir = test_dir("i64");
    let path = dir.join("tokens.safetensors");
    let mut rng = SplitMix64(9);
    let tokens: Vec<i64> = (0..24)
        .map(|_| (rng.next_u64() % 50280) as i64 + 1)
        .collect();
    let tensors = [
        (
            "tokens".to_string(),
            TensorOut::I64 {
                shape: vec![2, 12],
                data: tokens.clone(),
            },
        ),
        (
            "weights".to_string(),
            TensorOut::F32 {
                shape: vec![2],
                data: vec![0.5, -0.25],
            },
        ),
    ];
    write_tensors(&path, &tensors).unwrap();
    assert_eq!(
        read_i64(&path, "tokens").unwrap(),
        (vec![2, 12], tokens.clone())
    );
    let msg = checkpoint_error(read_i64(&path, "weights"), &path);
    assert!(msg.contains("weights") && msg.contains("F32"), "{msg}");
    let msg = checkpoint_error(read_i64(&path, "absent"), &path);
    assert!(msg.contains("absent") && msg.contains("tokens"), "{msg}");
    // I32 widens.
    let small: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| (t as i32).to_le_bytes())
        .collect();
    let view = TensorView::new(Dtype::I32, vec![24], &small).unwrap();
    std::fs::write(
        &path,
        safetensors::serialize([("ids", view)], None).unwrap(),
    )
    .unwrap();
    assert_eq!(read_i64(&path, "ids").unwrap(), (vec![24], tokens));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writer_rejects_a_shape_that_does_not_match_the_data() {
    let dir = test_dir("writer-shape");
    let path = dir.join("bad.safetensors");
    let tensors = [(
        "w".to_string(),
        TensorOut::F32 {
            shape: vec![2, 3],
            data: vec![1.0; 5],
        },
    )];
    let msg = checkpoint_error(write_tensors(&path, &tensors), &path);
    assert!(msg.contains("[2, 3]") && msg.contains('5'), "{msg}");
    let dup = [tensors[0].clone(), tensors[0].clone()];
    assert!(write_tensors(&path, &dup).is_err());
    assert!(!path.exists());
    let left = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(left, 0, "a temporary file was left behind");
    // Params that do not belong to the config are refused, not silently cut short.
    let cfg = small_config(NormKind::Rms, true);
    let mut bigger = cfg.clone();
    bigger.n_layer = 3;
    let err = save_params(&path, &cfg, &random_params(&bigger, 10), SaveDtype::F32).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
