//! `vet-train export --format gguf`: the file's header, keys and tensor table as llama.cpp reads
//! them, read back here by a small parser; refused checkpoints leave no file. (The full read-back
//! with llama.cpp's own `gguf` package is `scripts/gguf_readback.py`, run by `.ci/run`; llama.cpp
//! itself runs the file in `scripts/check-llamacpp.sh`.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reference::config::{MambaConfig, NormKind};
use trainer::export::{export_gguf, ExportDtype};

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("export-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the tests read back: keys (numbers and strings as text) and tensors
/// (ggml dims, type, data offset).
struct Parsed {
    kv: BTreeMap<String, String>,
    tensors: BTreeMap<String, (Vec<u64>, u32, u64)>,
    data_start: u64,
    bytes: Vec<u8>,
}

struct Cur<'a>(&'a [u8], usize);

impl Cur<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.0[self.1..self.1 + n];
        self.1 += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn str(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).unwrap()
    }
    fn value(&mut self, ty: u32) -> String {
        match ty {
            4 => self.u32().to_string(),
            5 => (self.u32() as i32).to_string(),
            6 => f32::from_bits(self.u32()).to_string(),
            7 => (self.take(1)[0] != 0).to_string(),
            8 => self.str(),
            9 => {
                let (et, n) = (self.u32(), self.u64());
                let items: Vec<String> = (0..n).map(|_| self.value(et)).collect();
                format!("[{}]", items.join("|"))
            }
            t => panic!("value type {t} not written by the exporter"),
        }
    }
}

fn parse(path: &Path) -> Parsed {
    let bytes = std::fs::read(path).unwrap();
    let mut c = Cur(&bytes, 0);
    assert_eq!(c.take(4), b"GGUF");
    assert_eq!(c.u32(), 3, "GGUF version");
    let (n_t, n_kv) = (c.u64(), c.u64());
    let mut kv = BTreeMap::new();
    for _ in 0..n_kv {
        let k = c.str();
        let ty = c.u32();
        kv.insert(k, c.value(ty));
    }
    let mut tensors = BTreeMap::new();
    for _ in 0..n_t {
        let name = c.str();
        let nd = c.u32();
        let dims: Vec<u64> = (0..nd).map(|_| c.u64()).collect();
        let (ty, off) = (c.u32(), c.u64());
        tensors.insert(name, (dims, ty, off));
    }
    let data_start = (c.1 as u64).div_ceil(32) * 32;
    Parsed {
        kv,
        tensors,
        data_start,
        bytes,
    }
}

fn f32_at(p: &Parsed, name: &str, i: usize) -> f32 {
    let at = (p.data_start + p.tensors[name].2) as usize + 4 * i;
    f32::from_le_bytes(p.bytes[at..at + 4].try_into().unwrap())
}

#[test]
fn tiny_exports_with_llama_cpp_mamba_keys_names_shapes_and_a_as_minus_exp_a_log() {
    let dir = scratch("tiny");
    let out = dir.join("tiny.gguf");
    let s = export_gguf(&fixtures::tiny_checkpoint(), &out, ExportDtype::F32).unwrap();
    let p = parse(&out);
    assert_eq!(p.kv["general.architecture"], "mamba");
    assert_eq!(p.kv["mamba.embedding_length"], "64");
    assert_eq!(p.kv["mamba.ssm.inner_size"], "128");
    assert_eq!(p.kv["mamba.ssm.time_step_rank"], "4");
    assert_eq!(p.kv["tokenizer.ggml.eos_token_id"], "256");
    assert!(p.kv["tokenizer.ggml.tokens"].ends_with(
        "|<|endoftext|>|[PAD257]|[PAD258]|[PAD259]|[PAD260]|[PAD261]|[PAD262]|[PAD263]]"
    ));
    // Tied head: no output.weight; 1 + 10 per layer + output_norm.
    assert_eq!(s.tensors, 2 + 10 * 2);
    assert!(!p.tensors.contains_key("output.weight"));
    // ggml dims are the reverse of Hugging Face's shapes; conv is 2-D.
    assert_eq!(p.tensors["token_embd.weight"].0, [64, 264]);
    assert_eq!(p.tensors["blk.1.ssm_in.weight"].0, [64, 256]);
    assert_eq!(p.tensors["blk.0.ssm_conv1d.weight"].0, [4, 128]);
    assert_eq!(p.tensors["blk.0.ssm_x.weight"].0, [128, 4 + 32]);
    assert_eq!(p.tensors["blk.0.ssm_a"].0, [16, 128]);
    assert_eq!(p.tensors["blk.1.ssm_d"].0, [128]);
    let ck = trainer::checkpoint::load(&fixtures::tiny_checkpoint()).unwrap();
    let l = &ck.params.layers[1];
    for i in [0, 17, 128 * 16 - 1] {
        assert_eq!(f32_at(&p, "blk.1.ssm_a", i), -l.a_log.data[i].exp());
        assert!(f32_at(&p, "blk.1.ssm_a", i) < 0.0);
    }
    assert_eq!(
        f32_at(&p, "blk.1.ssm_conv1d.weight", 5),
        l.conv1d_weight.data[5]
    );
    assert_eq!(
        f32_at(&p, "token_embd.weight", 64 * 263 + 63),
        ck.params.embeddings.data[64 * 263 + 63]
    );
}

#[test]
fn q8_0_keeps_small_rows_in_f16_and_vectors_in_f32() {
    let dir = scratch("q8");
    let out = dir.join("tiny-q8.gguf");
    export_gguf(&fixtures::tiny_checkpoint(), &out, ExportDtype::Q8_0).unwrap();
    let p = parse(&out);
    assert_eq!(p.kv["general.file_type"], "7");
    let ty = |n: &str| p.tensors[n].1;
    assert_eq!(ty("token_embd.weight"), 8);
    assert_eq!(ty("blk.0.ssm_in.weight"), 8);
    assert_eq!(
        ty("blk.0.ssm_dt.weight"),
        1,
        "rows of dt_rank = 4 are no whole Q8_0 block"
    );
    assert_eq!(ty("blk.0.ssm_conv1d.weight"), 0);
    assert_eq!(ty("blk.0.ssm_a"), 0);
    assert_eq!(ty("output_norm.weight"), 0);
    let f32_size = std::fs::metadata(dir.join("tiny-q8.gguf")).unwrap().len();
    assert!(f32_size < 120_000, "q8_0 file is {f32_size} bytes");
}

/// A checkpoint of `cfg` with the tiny tokenizer, in `dir`.
fn checkpoint(dir: &Path, cfg: &MambaConfig) -> PathBuf {
    let ck = dir.join("ck");
    let params = reference::init::init_params::<f32>(cfg, 7);
    let tok = fixtures::tiny_checkpoint().join("tokenizer.json");
    trainer::checkpoint::save(&ck, cfg, &params, Some(&tok)).unwrap();
    ck
}

#[test]
fn untied_heads_are_written_and_unsupported_models_are_refused_leaving_no_file() {
    let dir = scratch("refused");
    let mut cfg = MambaConfig::new(32, 1, 264);
    cfg.tie_embeddings = false;
    let out = dir.join("untied.gguf");
    export_gguf(&checkpoint(&dir, &cfg), &out, ExportDtype::F16).unwrap();
    assert_eq!(
        parse(&out).tensors["output.weight"],
        (vec![32, 264], 1, parse(&out).tensors["output.weight"].2)
    );

    cfg.norm = NormKind::Layer;
    cfg.use_bias = true;
    let ck = checkpoint(&scratch("refused-ln"), &cfg);
    let out = dir.join("layernorm.gguf");
    let e = format!(
        "{:#}",
        export_gguf(&ck, &out, ExportDtype::F32).unwrap_err()
    );
    assert!(e.contains("LayerNorm") && e.contains("use_bias"), "{e}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        !leftovers
            .iter()
            .any(|n| n.to_string_lossy().ends_with(".tmp")),
        "{leftovers:?}"
    );

    let e = format!(
        "{:#}",
        export_gguf(
            &fixtures::tiny_checkpoint(),
            &dir.join("no/such/dir/x.gguf"),
            ExportDtype::F32
        )
        .unwrap_err()
    );
    assert!(e.contains("no/such/dir/x.gguf"), "{e}");
}
