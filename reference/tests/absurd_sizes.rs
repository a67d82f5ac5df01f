//! Absurd sizes give short errors naming the sizes (issue 18): a config far larger than its
//! weights file, a file with hundreds of unexpected tensors, a header claiming a huge tensor.

use std::path::PathBuf;

use reference::io::{load_params, locate_params, save_params, SaveDtype};
use reference::{init::init_params, MambaConfig, Params};

fn test_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vet-mamba-absurd-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn small(n_layer: usize) -> MambaConfig {
    let mut cfg = MambaConfig::new(8, n_layer, 16);
    cfg.d_state = 4;
    cfg
}

fn saved(test: &str, cfg: &MambaConfig) -> PathBuf {
    let path = test_dir(test).join("model.safetensors");
    let p: Params<f32> = init_params(cfg, 11);
    save_params(&path, cfg, &p, SaveDtype::F32).unwrap();
    path
}

#[test]
fn a_config_far_larger_than_the_file_is_refused_by_size_in_a_few_lines() {
    let path = saved("layers", &small(1));
    let mut absurd = small(100_000);
    absurd.n_layer = 100_000;
    for err in [
        load_params::<f32>(&path, &absurd).unwrap_err().to_string(),
        locate_params(&path, &absurd).unwrap_err().to_string(),
    ] {
        assert!(err.len() < 600, "{} bytes: {}", err.len(), &err[..600]);
        assert!(
            err.contains("100000 layers") && err.contains("bytes of tensor data"),
            "{err}"
        );
        assert!(err.contains("model.safetensors"), "{err}");
    }
}

#[test]
fn a_long_list_of_problems_is_capped_with_a_count() {
    // 40 layers in the file, 1 in the config: 39 × 10 unexpected tensors.
    let path = saved("unexpected", &small(40));
    let err = load_params::<f32>(&path, &small(1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected tensors: backbone.layers.1"),
        "{err}"
    );
    assert!(err.contains("… and 382 more"), "{err}");
    assert!(err.len() < 1000, "{} bytes: {err}", err.len());
}

#[test]
fn a_header_claiming_a_huge_tensor_names_its_size_against_the_files() {
    let path = test_dir("huge").join("model.safetensors");
    // A huge shape over 16 bytes; a huge extent that pushes the next tensor's offset.
    let headers: [&[u8]; 2] = [
        br#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}}"#,
        br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4000000000000]},"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
    ];
    let wants = [
        "tensor `w` (F32 [1000000, 1000000], 4000000000000 bytes) at data offsets 0..16",
        "tensor `w` (F32 [2], 8 bytes) at data offsets 0..4000000000000",
    ];
    for (header, want) in headers.iter().zip(wants) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[7u8; 16]);
        std::fs::write(&path, &bytes).unwrap();
        let err = reference::io::read_tensors(&path).unwrap_err().to_string();
        assert!(
            err.contains(want) && err.contains("holds only 16 bytes"),
            "{err}"
        );
        assert!(!err.contains("invalid offset"), "{err}");
    }
}
