//! A damaged checkpoint never panics the loader: random truncations and random byte
//! overwrites of a valid file (header and data) give `Ok` or a clear `Err`, never a panic.

use std::path::PathBuf;

use proptest::prelude::*;
use reference::io::{load_params, read_tensors, save_params, SaveDtype};
use reference::{init::init_params, MambaConfig, NormKind, Params};

fn valid_file() -> (MambaConfig, Vec<u8>) {
    let mut cfg = MambaConfig::new(8, 1, 10);
    cfg.d_state = 4;
    cfg.norm = NormKind::Layer;
    cfg.use_bias = true;
    cfg.tie_embeddings = false;
    let p: Params<f32> = init_params(&cfg, 3);
    let path = scratch("valid");
    save_params(&path, &cfg, &p, SaveDtype::F32).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    (cfg, bytes)
}

fn scratch(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "vet-mamba-fuzz-{}-{tag}.safetensors",
        std::process::id()
    ))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn damaged_checkpoints_are_errors_not_panics(
        cut in proptest::option::of(0.0f64..1.0),
        edits in proptest::collection::vec((0.0f64..1.0, any::<u8>(), any::<bool>()), 0..6),
    ) {
        let (cfg, mut bytes) = valid_file();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (at, v, in_header) in edits {
            // Half the edits land in the 8-byte length or the JSON header, where parsing happens.
            let span = if in_header { header_end } else { bytes.len() };
            let i = ((at * span as f64) as usize).min(bytes.len() - 1);
            bytes[i] = v;
        }
        if let Some(c) = cut {
            bytes.truncate((c * bytes.len() as f64) as usize);
        }
        let path = scratch(&format!("{:x}", bytes.iter().fold(0u64, |h, &b| h.wrapping_mul(31) ^ b as u64)));
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load_params::<f32>(&path, &cfg);
        let read = read_tensors(&path);
        let _ = std::fs::remove_file(&path);
        if let Err(e) = &loaded {
            prop_assert!(e.to_string().contains("vet-mamba-fuzz"), "error does not name the file: {e}");
        }
        if bytes.len() < header_end {
            prop_assert!(loaded.is_err() && read.is_err(), "a file cut inside its header loaded");
        }
    }
}
