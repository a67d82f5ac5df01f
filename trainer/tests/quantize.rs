//! `vet-train quantize`: an int8 (int4) checkpoint is a quarter (under a sixth) of the f32 file
//! and, loaded with `vet-chat --dtype int8` (`int4`), generates exactly what quantising the f32
//! checkpoint at load does; a bf16 checkpoint is a Hugging Face checkpoint that loads like any
//! other; a quantised checkpoint opens dequantised for the engines that hold f32 weights.

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

/// `vet-train quantize --model tiny --out out --dtype dtype`, which must succeed.
fn quantize(tiny: &Path, out: &Path, dtype: &str) {
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
}

#[test]
fn quantized_checkpoints_load_and_generate_like_quantising_at_load() {
    let tiny = fixtures::tiny_checkpoint();
    let tmp = std::env::temp_dir().join(format!("vet-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for dtype in ["int8", "int4", "bf16"] {
        let out = tmp.join(dtype);
        quantize(&tiny, &out, dtype);
        assert!(out.join("tokenizer.json").exists());
        let size = |d: &Path| {
            std::fs::metadata(d.join("model.safetensors"))
                .unwrap()
                .len()
        };
        let ratio = size(&out) as f64 / size(&tiny) as f64;
        // The tiny model carries relatively many f32 vectors (norms, conv, A_log, D, biases).
        let want = if dtype == "bf16" { 0.55 } else { 0.4 };
        assert!(ratio < want, "{dtype}: {ratio:.2} of the f32 file");
        assert_eq!(ids(&out, dtype), ids(&tiny, dtype), "{dtype}");
    }
    // The bf16 checkpoint is an ordinary one: it also loads for f32 inference.
    assert!(!ids(&tmp.join("bf16"), "f32").is_empty());
    // Without --dtype a quantised checkpoint runs in its own format; an explicit other one is
    // refused, naming the format.
    for q in ["int8", "int4"] {
        let chat = |extra: &[&str]| {
            let dir = tmp.join(q);
            let mut args = vec!["--model", dir.to_str().unwrap()];
            args.extend_from_slice(extra);
            args.extend_from_slice(&[
                "--tokens",
                "72,111,114,115,101",
                "--greedy",
                "--max-new-tokens",
                "24",
            ]);
            run(env!("CARGO_BIN_EXE_vet-chat"), &args)
        };
        let (ok, text) = chat(&[]);
        assert!(ok, "{text}");
        assert!(text.contains(&ids(&tmp.join(q), q)), "{q}: {text}");
        let (ok, text) = chat(&["--dtype", "f32"]);
        assert!(!ok && text.contains(&format!("--dtype {q}")), "{text}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A quantised checkpoint opens wherever a float one does (`checkpoint::load`: `vet-chat
/// --device reference` / `cuda`, export, evaluation), as its dequantised values: every
/// matrix is the CPU tier's `q · scale`, within half a step of the f32 original, and every
/// vector is the file's. Before, the loader took the int8 codes for f32 data and refused the
/// checkpoint as "config.json and the weights do not belong together".
#[test]
fn quantized_checkpoints_open_dequantised_for_every_other_engine() {
    let tiny = fixtures::tiny_checkpoint();
    let tmp = std::env::temp_dir().join(format!("vet-quantize-deq-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let orig = trainer::checkpoint::load(&tiny).unwrap();
    for (dtype, kind) in [
        ("int8", simd::WeightDtype::Int8),
        ("int4", simd::WeightDtype::Int4),
    ] {
        let out = tmp.join(dtype);
        quantize(&tiny, &out, dtype);
        assert_eq!(simd::load::stored_quantization(&out).unwrap(), Some(kind));
        let ck = trainer::checkpoint::load(&out).unwrap();
        assert_eq!(ck.config, orig.config);
        let cfg = &ck.config;
        // What the CPU tier computes with, matrix by matrix.
        let w = simd::load::load_weights(&out, cfg, kind).unwrap();
        let want = simd::load::weights_to_named(cfg, &w);
        let got = reference::engine::to_named(cfg, &ck.params);
        let base = reference::engine::to_named(cfg, &orig.params);
        let mut matrices = 0;
        for (((name, g), (_, wt)), (_, b)) in got.iter().zip(&want).zip(&base) {
            if simd::load::is_matrix(name) {
                matrices += 1;
                assert_eq!(
                    g.data, wt.data,
                    "{dtype} {name}: not the CPU tier's q · scale"
                );
                assert_ne!(
                    g.data, b.data,
                    "{dtype} {name}: the f32 values, not dequantised"
                );
                // int8: half a step (`max|row| / 127`); int4: one step (`max|group| / 8`,
                // where the code +8 the largest magnitude of the other sign needs is clamped
                // to +7).
                let cols = b.data.len() / b.shape[0];
                let (group, err_per_max) = if kind == simd::WeightDtype::Int8 {
                    (cols, 0.5 / 127.0)
                } else {
                    (32, 1.0 / 8.0)
                };
                for (gr, br) in g.data.chunks(group).zip(b.data.chunks(group)) {
                    let amax = br.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (x, y) in gr.iter().zip(br) {
                        assert!(
                            (x - y).abs() <= amax * err_per_max * 1.0001 + 1e-7,
                            "{dtype} {name}: {x} against {y} (max {amax})"
                        );
                    }
                }
            } else {
                // A_log goes A and back once in `vet-train quantize`.
                for (x, y) in g.data.iter().zip(&b.data) {
                    assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{dtype} {name}");
                }
            }
        }
        assert!(matrices >= 5, "{dtype}: {matrices} matrices");
        if kind == simd::WeightDtype::Int8 {
            // `--device cuda --dtype int8` quantises the dequantised rows again by the same
            // rule: the file's codes come back (the scale may move by its last bit).
            for (l, lw) in w.layers.iter().enumerate() {
                let simd::weights::MatData::Int8 { q, scales } = &lw.in_proj.data else {
                    panic!("int8 in_proj");
                };
                let deq = &ck.params.layers[l].in_proj_weight.data;
                let cols = lw.in_proj.cols;
                let mut codes = vec![0i8; cols];
                for (r, row) in deq.chunks(cols).enumerate() {
                    let s = simd::kernels::quantize_row(row, &mut codes);
                    assert_eq!(
                        &codes[..],
                        &q.as_slice()[r * cols..(r + 1) * cols],
                        "layer {l} row {r}"
                    );
                    assert!(
                        (s - scales[r]).abs() <= scales[r] * 2e-7,
                        "layer {l} row {r}: scale {s} against {}",
                        scales[r]
                    );
                }
            }
        }
        // The command line: greedy ids on the reference engine, with the note.
        let (ok, text) = run(
            env!("CARGO_BIN_EXE_vet-chat"),
            &[
                "--model",
                out.to_str().unwrap(),
                "--device",
                "reference",
                "--tokens",
                "72,111,114,115,101",
                "--greedy",
                "--max-new-tokens",
                "8",
            ],
        );
        assert!(ok, "{text}");
        assert!(
            text.contains(&format!("{dtype}-quantised weights")),
            "{text}"
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
