//! Checkpoints written by PyTorch itself, by mamba_ssm's `save_pretrained` and by transformers'
//! `save_pretrained(max_shard_size=...)` (`fixtures/torch_bin/real`, made on the GPU machine
//! by `fixtures/scripts/make_torch_fixtures.py`): each `pytorch_model.bin` loads to the same
//! bits as its safetensors twin and gives the same logits bit for bit; the sharded checkpoint
//! equals the unsharded one; and our logits agree with the ones torch computed.

use std::path::{Path, PathBuf};

use reference::io::{load_params, read_i64, read_tensors};
use reference::model::{forward, Batch};
use reference::{MambaConfig, NormKind, Params};

/// Our f32 reference against torch's f32 logits (mamba_ssm's Python model with its
/// `selective_scan_ref`, and transformers' slow path; on an H100, TF32 off): relative error
/// ‖ours − torch‖ / ‖torch‖. Measured 2.2e-7 .. 5.0e-7 on these fixtures (summation order
/// and libm differ, nothing else); 1e-5 leaves room for other torch builds.
const TORCH_LOGITS_REL: f64 = 1e-5;

fn real() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/torch_bin/real")
}

fn bits(p: &Params<f32>) -> Vec<Vec<u32>> {
    p.tensors()
        .iter()
        .map(|t| t.data.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// Logits on the golden input ids (`[2, 32]`, the ones the script fed torch).
fn logits(cfg: &MambaConfig, p: &Params<f32>) -> Vec<f32> {
    let inputs = real().join("../../goldens/tiny_inputs.safetensors");
    let (shape, ids) = read_i64(&inputs, "input_ids").unwrap();
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let batch = Batch::new(&ids, shape[0], shape[1]);
    forward(cfg, p, &batch, None, false).unwrap().0.data
}

fn torch_logits(dir: &Path) -> Vec<f32> {
    let t = read_tensors(&dir.join("logits.safetensors")).unwrap();
    t.into_iter().find(|(n, _)| n == "logits").unwrap().1.data
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(
        got.iter().all(|x| x.is_finite()),
        "NaN or inf in our logits"
    );
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

const CASES: &[(&str, NormKind, bool)] = &[
    ("ln_tied_f32", NormKind::Layer, true),
    ("ln_untied_bf16", NormKind::Layer, false),
    ("rms_tied_bf16", NormKind::Rms, true),
    ("rms_untied_f32", NormKind::Rms, false),
    ("rms_tied_f32", NormKind::Rms, true),
];

#[test]
fn torch_saved_bins_equal_their_safetensors_twins_bit_for_bit() {
    for &(name, norm, tied) in CASES {
        let dir = real().join("mamba_ssm").join(name);
        let cfg = MambaConfig::load(&dir.join("config.json")).unwrap();
        assert_eq!((cfg.norm, cfg.tie_embeddings), (norm, tied), "{name}");
        let bin: Params<f32> = load_params(&dir, &cfg).unwrap();
        let twin: Params<f32> = load_params(&dir.join("twin.safetensors"), &cfg).unwrap();
        assert_eq!(bits(&bin), bits(&twin), "{name}: parameters");
        let (a, b) = (logits(&cfg, &bin), logits(&cfg, &twin));
        let a: Vec<u32> = a.iter().map(|x| x.to_bits()).collect();
        let b: Vec<u32> = b.iter().map(|x| x.to_bits()).collect();
        assert_eq!(a, b, "{name}: logits");
    }
}

#[test]
fn torch_saved_tiny_is_the_bundled_tiny_checkpoint() {
    let tiny = real().join("../../tiny");
    let cfg = MambaConfig::load(&tiny.join("config.json")).unwrap();
    let st: Params<f32> = load_params(&tiny, &cfg).unwrap();
    let bin: Params<f32> = load_params(&real().join("mamba_ssm/rms_tied_f32"), &cfg).unwrap();
    assert_eq!(bits(&bin), bits(&st));
}

#[test]
fn our_logits_match_mamba_ssm_on_the_torch_saved_bins() {
    for &(name, _, _) in CASES {
        let dir = real().join("mamba_ssm").join(name);
        let cfg = MambaConfig::load(&dir.join("config.json")).unwrap();
        let p: Params<f32> = load_params(&dir, &cfg).unwrap();
        let e = rel_err(&logits(&cfg, &p), &torch_logits(&dir));
        eprintln!("{name}: relative error {e:.3e} against mamba_ssm");
        assert!(e <= TORCH_LOGITS_REL, "{name}: relative error {e:.3e}");
    }
}

#[test]
fn a_layernorm_model_saved_by_mamba_ssm_loads_with_its_padded_vocabulary() {
    let dir = real().join("mamba_ssm_saved/ln_pad");
    let cfg = MambaConfig::load(&dir.join("config.json")).unwrap();
    // config.json says 261; mamba_ssm padded the embedding to a multiple of 8.
    assert_eq!(cfg.vocab_size, 264);
    assert_eq!(cfg.norm, NormKind::Layer);
    let p: Params<f32> = load_params(&dir, &cfg).unwrap();
    let e = rel_err(&logits(&cfg, &p), &torch_logits(&dir));
    eprintln!("ln_pad: relative error {e:.3e} against mamba_ssm");
    assert!(e <= TORCH_LOGITS_REL, "relative error {e:.3e}");
}

#[test]
fn a_sharded_transformers_checkpoint_equals_the_unsharded_one() {
    let (sharded, full) = (real().join("hf/sharded"), real().join("hf/full"));
    assert!(sharded.join("model-00005-of-00005.safetensors").is_file());
    let cfg = MambaConfig::load(&full.join("config.json")).unwrap();
    assert_eq!(
        MambaConfig::load(&sharded.join("config.json")).unwrap(),
        cfg
    );
    let a: Params<f32> = load_params(&sharded, &cfg).unwrap();
    let b: Params<f32> = load_params(&full, &cfg).unwrap();
    assert_eq!(bits(&a), bits(&b));
    let e = rel_err(&logits(&cfg, &a), &torch_logits(&full));
    eprintln!("hf sharded: relative error {e:.3e} against transformers");
    assert!(
        e <= TORCH_LOGITS_REL,
        "transformers: relative error {e:.3e}"
    );
}
