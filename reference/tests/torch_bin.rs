//! `pytorch_model.bin` (torch.save zip) checkpoints: the bundled fixtures (written by
//! `fixtures/scripts/make_torch_bin.py`) load to the same parameters and the same logits as
//! the safetensors checkpoint, bit for bit; pickles that name other globals, truncated zips and
//! bad storage offsets are clear errors; random damage never panics.

use std::io::Write;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use reference::io::{load_params, save_params, SaveDtype};
use reference::model::{forward, Batch};
use reference::rng::Rng;
use reference::{MambaConfig, Params};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn tiny_cfg() -> MambaConfig {
    MambaConfig::load(&fixtures().join("tiny/config.json")).unwrap()
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vet-torch-bin-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bits(p: &Params<f32>) -> Vec<Vec<u32>> {
    p.tensors()
        .iter()
        .map(|t| t.data.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn logits(cfg: &MambaConfig, p: &Params<f32>) -> Vec<u32> {
    let mut rng = Rng::new(20);
    let tokens: Vec<u32> = (0..2 * 9)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    let batch = Batch {
        batch: 2,
        seq_len: 9,
        tokens: &tokens,
        resets: None,
    };
    let (out, _, _) = forward(cfg, p, &batch, None, false).unwrap();
    out.data.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn f32_bin_gives_the_safetensors_logits_bit_for_bit() {
    let cfg = tiny_cfg();
    let st: Params<f32> = load_params(&fixtures().join("tiny"), &cfg).unwrap();
    // The directory holds config.json + pytorch_model.bin and no model.safetensors.
    let bin: Params<f32> = load_params(&fixtures().join("torch_bin/tiny"), &cfg).unwrap();
    assert_eq!(bits(&bin), bits(&st));
    assert_eq!(logits(&cfg, &bin), logits(&cfg, &st));
}

#[test]
fn bf16_bin_gives_the_bf16_safetensors_logits_bit_for_bit() {
    let cfg = tiny_cfg();
    let st: Params<f32> = load_params(&fixtures().join("tiny"), &cfg).unwrap();
    let dir = scratch("bf16");
    save_params(&dir, &cfg, &st, SaveDtype::Bf16).unwrap();
    let st16: Params<f32> = load_params(&dir, &cfg).unwrap();
    let bin = fixtures().join("torch_bin/tiny_bf16/pytorch_model.bin");
    let bin16: Params<f32> = load_params(&bin, &cfg).unwrap();
    assert_eq!(bits(&bin16), bits(&st16));
    assert_eq!(logits(&cfg, &bin16), logits(&cfg, &st16));
    assert_ne!(bits(&bin16), bits(&st), "bf16 must differ from f32");
    let _ = std::fs::remove_dir_all(dir);
}

/// A torch-layout zip holding `pickle` and the given storages.
fn torch_zip(tag: &str, pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> PathBuf {
    let path = scratch(tag).join("pytorch_model.bin");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    for (key, bytes) in storages {
        z.start_file(format!("archive/data/{key}"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.start_file("archive/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
    path
}

fn load_err(path: &Path) -> String {
    match load_params::<f32>(path, &tiny_cfg()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn pickles_naming_other_globals_are_refused_by_name() {
    let cases: [(&str, &[u8], &str); 3] = [
        (
            "os",
            b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echoq\x00\x85R.",
            "os.system",
        ),
        (
            "posix",
            b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.",
            "posix.system",
        ),
        (
            "eval",
            b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93X\x01\x00\x00\x001\x85R.",
            "builtins.eval",
        ),
    ];
    for (tag, pkl, name) in cases {
        let e = load_err(&torch_zip(tag, pkl, &[]));
        assert!(
            e.contains(&format!("pickle names the global {name}")) && e.contains("refusing"),
            "{tag}: {e}"
        );
    }
}

/// `{'w': _rebuild_tensor_v2(storage('0', FloatStorage, numel 4), offset, (4,), (1,), False, OrderedDict())}`
fn one_tensor_pickle(offset: u8) -> Vec<u8> {
    let mut p = b"\x80\x02ccollections\nOrderedDict\n)R".to_vec();
    p.extend_from_slice(&tensor_item(b'w', b"FloatStorage", 4, offset));
    p.extend_from_slice(b"s.");
    p
}

/// `name`, `_rebuild_tensor_v2(storage('0', class, numel), offset, (4,), (1,), False, OrderedDict())`
fn tensor_item(name: u8, class: &[u8], numel: u8, offset: u8) -> Vec<u8> {
    let mut p = vec![b'X', 1, 0, 0, 0, name];
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\n");
    p.extend_from_slice(class);
    p.extend_from_slice(b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK");
    p.extend_from_slice(&[numel, b't', b'Q', b'K', offset]);
    p.extend_from_slice(b"K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR");
    p
}

#[test]
fn a_storage_named_with_two_sizes_is_an_error() {
    let mut p = b"\x80\x02ccollections\nOrderedDict\n)R(".to_vec();
    p.extend_from_slice(&tensor_item(b'a', b"FloatStorage", 4, 0));
    // The same storage key again, claiming 200 bf16 elements (it holds 16 bytes).
    p.extend_from_slice(&tensor_item(b'b', b"BFloat16Storage", 200, 100));
    p.extend_from_slice(b"u.");
    let bytes: Vec<u8> = (0..16).collect();
    let e = load_err(&torch_zip("twice", &p, &[("0", bytes)]));
    assert!(e.contains("tensor `b`: storage 0 is 4 elements"), "{e}");
}

#[test]
fn a_storage_offset_past_the_end_is_an_error() {
    let bytes: Vec<u8> = (0..16).collect();
    // Offset 0 reads (it then fails the config's checks, naming the unexpected tensor).
    let ok = load_err(&torch_zip(
        "off0",
        &one_tensor_pickle(0),
        &[("0", bytes.clone())],
    ));
    assert!(ok.contains("unexpected tensors: w"), "{ok}");
    let e = load_err(&torch_zip("off2", &one_tensor_pickle(2), &[("0", bytes)]));
    assert!(
        e.contains("tensor `w`") && e.contains("past the end"),
        "{e}"
    );
    // A storage shorter than the pickle says.
    let e = load_err(&torch_zip(
        "short",
        &one_tensor_pickle(0),
        &[("0", vec![0; 12])],
    ));
    assert!(e.contains("12 bytes") && e.contains("4 elements"), "{e}");
}

#[test]
fn truncated_zips_and_legacy_files_are_errors() {
    let good = std::fs::read(fixtures().join("torch_bin/tiny/pytorch_model.bin")).unwrap();
    let dir = scratch("trunc");
    for cut in [10, good.len() / 2, good.len() - 30] {
        let p = dir.join(format!("cut{cut}.bin"));
        std::fs::write(&p, &good[..cut]).unwrap();
        load_err(&p);
    }
    let legacy = dir.join("legacy.bin");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    let e = load_err(&legacy);
    assert!(
        e.contains("legacy torch.save format is not supported"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn damaged_bins_are_errors_not_panics(
        cut in proptest::option::of(0.0f64..1.0),
        edits in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 0..6),
        in_pickle in any::<bool>(),
    ) {
        let mut bytes = std::fs::read(fixtures().join("torch_bin/tiny/pytorch_model.bin")).unwrap();
        // Aim half the edits at the pickle (the zip's first entry, after a 30-byte header and
        // its name), the rest anywhere.
        let span = if in_pickle { 1_600 } else { bytes.len() };
        for (at, b) in edits {
            let i = ((at * span as f64) as usize).min(bytes.len() - 1);
            bytes[i] = b;
        }
        if let Some(c) = cut {
            bytes.truncate((c * bytes.len() as f64) as usize);
        }
        let p = scratch("fuzz").join("pytorch_model.bin");
        std::fs::write(&p, &bytes).unwrap();
        let _ = load_params::<f32>(&p, &tiny_cfg());
    }
}

/// The fixture's pickle and storages (`key`, bytes), out of its zip.
fn fixture_entries() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    use std::io::Read;
    let f = std::fs::File::open(fixtures().join("torch_bin/tiny/pytorch_model.bin")).unwrap();
    let mut z = zip::ZipArchive::new(f).unwrap();
    let mut read = |name: &str| {
        let mut v = Vec::new();
        z.by_name(name).unwrap().read_to_end(&mut v).unwrap();
        v
    };
    let pkl = read("archive/data.pkl");
    let storages = (0..21)
        .map(|k| (k.to_string(), read(&format!("archive/data/{k}"))))
        .collect();
    (pkl, storages)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Damage inside the pickle itself (re-zipped, so the zip's CRC does not catch it first).
    #[test]
    fn damaged_pickles_are_errors_not_panics(
        cut in proptest::option::of(0.0f64..1.0),
        edits in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 1..6),
    ) {
        let (mut pkl, storages) = fixture_entries();
        for (at, b) in edits {
            let i = ((at * pkl.len() as f64) as usize).min(pkl.len() - 1);
            pkl[i] = b;
        }
        if let Some(c) = cut {
            pkl.truncate((c * pkl.len() as f64) as usize);
        }
        let st: Vec<(&str, Vec<u8>)> = storages.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let _ = load_params::<f32>(&torch_zip("fuzz-pkl", &pkl, &st), &tiny_cfg());
    }
}
