//! `vet-train quantize`: an int8 checkpoint is a quarter of the f32 file and, loaded with
//! `vet-chat --dtype int8`, generates exactly what quantising the f32 checkpoint at load does;
//! a bf16 checkpoint is a Hugging Face checkpoint that loads like any other.

use std::path::Path;
use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(bin).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

fn ids(dir: &Path, dtype: &str) -> String {
    let (ok, out) = run(
        env!("CARGO_BIN_EXE_vet-chat"),
        &[
            "--model",
            dir.to_str().unwrap(),
            "--dtype",
            dtype,
            "--tokens",
            "72,111,114,115,101",
            "--greedy",
            "--max-new-tokens",
            "24",
        ],
    );
    assert!(ok, "{out}");
    out.lines()
        .find(|l| l.contains(','))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn quantized_checkpoints_load_and_generate_like_quantising_at_load() {
    let tiny = fixtures::tiny_checkpoint();
    let tmp = std::env::temp_dir().join(format!("vet-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for dtype in ["int8", "bf16"] {
        let out = tmp.join(dtype);
        let (ok, text) = run(
            env!("CARGO_BIN_EXE_vet-train"),
            &[
                "quantize",
                "--model",
                tiny.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--dtype",
                dtype,
            ],
        );
        assert!(ok, "{text}");
        assert!(out.join("tokenizer.json").exists());
        let size = |d: &Path| {
            std::fs::metadata(d.join("model.safetensors"))
                .unwrap()
                .len()
        };
        let ratio = size(&out) as f64 / size(&tiny) as f64;
        // The tiny model carries relatively many f32 vectors (norms, conv, A_log, D, biases).
        let want = if dtype == "int8" { 0.4 } else { 0.55 };
        assert!(ratio < want, "{dtype}: {ratio:.2} of the f32 file");
        assert_eq!(ids(&out, dtype), ids(&tiny, dtype), "{dtype}");
    }
    // The bf16 checkpoint is an ordinary one: it also loads for f32 inference.
    assert!(!ids(&tmp.join("bf16"), "f32").is_empty());
    let (ok, text) = run(
        env!("CARGO_BIN_EXE_vet-chat"),
        &[
            "--model",
            tmp.join("int8").to_str().unwrap(),
            "--tokens",
            "1,2",
            "--greedy",
        ],
    );
    assert!(!ok && text.contains("--dtype int8"), "{text}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
