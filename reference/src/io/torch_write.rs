//! Writing `pytorch_model.bin` as mamba_ssm's `save_pretrained` does: a `torch.save` zip
//! (torch >= 1.6 layout: `archive/data.pkl`, `archive/byteorder`, `archive/data/<key>`,
//! `archive/version`, entries stored uncompressed and 64-byte aligned) whose pickle is a
//! protocol-2 `collections.OrderedDict` of `torch._utils._rebuild_tensor_v2` tensors. It uses
//! only the globals `torch.load(weights_only=True)` accepts. Names are mamba_ssm's
//! (`backbone.embedding.weight`); a tied `lm_head.weight` shares the embedding's storage, as
//! in a state dict torch saves (mamba_ssm's `load_state_dict` is strict and wants it).
//!
//! Written by hand because no crate writes torch's format; the pickle is a few fixed opcode
//! sequences, read back by our own allow-list unpickler in the tests.

use std::io::Write;
use std::path::Path;

use half::{bf16, f16};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::write::SaveDtype;
use crate::config::MambaConfig;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::params::{param_specs, Params};

/// torch's record alignment (`kFieldAlignment`).
const ALIGN: u16 = 64;
const ARCHIVE: &str = "archive";

/// A protocol-2 pickle, written opcode by opcode.
struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: usize) {
        if let Ok(v) = i32::try_from(v) {
            self.0.push(b'J');
            self.0.extend_from_slice(&v.to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, 9 bytes cover any usize with a sign bit.
            self.0.extend_from_slice(&[0x8a, 9]);
            self.0.extend_from_slice(&(v as u64).to_le_bytes());
            self.0.push(0);
        }
    }
    fn tuple(&mut self, items: &[usize]) {
        self.0.push(b'(');
        for &i in items {
            self.int(i);
        }
        self.0.push(b't');
    }
    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R");
    }
    /// `name: _rebuild_tensor_v2(storage(key, numel), 0, shape, contiguous stride, False, {})`.
    fn tensor(&mut self, storage_type: &str, key: &str, numel: usize, shape: &[usize]) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.0.extend_from_slice(b"((");
        self.str("storage");
        self.global("torch", storage_type);
        self.str(key);
        self.str("cpu");
        self.int(numel);
        self.0.extend_from_slice(b"tQ");
        self.int(0);
        self.tuple(shape);
        let mut stride = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        self.tuple(&stride);
        self.0.push(0x89); // NEWFALSE: requires_grad
        self.empty_ordered_dict(); // backward hooks
        self.0.extend_from_slice(b"tR");
    }
}

/// The mamba_ssm name of a canonical parameter name.
fn mamba_ssm_name(name: &str) -> &str {
    if name == "backbone.embeddings.weight" {
        "backbone.embedding.weight"
    } else {
        name
    }
}

fn storage_bytes<T: Float>(data: &[T], dtype: SaveDtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for v in data {
        let f = v.to_f32();
        match dtype {
            SaveDtype::F32 => out.extend_from_slice(&f.to_le_bytes()),
            SaveDtype::Bf16 => out.extend_from_slice(&bf16::from_f32(f).to_bits().to_le_bytes()),
            SaveDtype::F16 => out.extend_from_slice(&f16::from_f32(f).to_bits().to_le_bytes()),
        }
    }
    out
}

/// Writes `params` to `path` as mamba_ssm's `pytorch_model.bin`, atomically.
pub fn save_params_torch<T: Float>(
    path: &Path,
    cfg: &MambaConfig,
    params: &Params<T>,
    dtype: SaveDtype,
) -> Result<()> {
    let specs = param_specs(cfg);
    let tensors = params.tensors();
    if specs.len() != tensors.len() {
        return Err(Error::Shape {
            op: "save_params_torch",
            msg: format!(
                "params hold {} tensors, the config has {}",
                tensors.len(),
                specs.len()
            ),
        });
    }
    let storage_type = match dtype {
        SaveDtype::F32 => "FloatStorage",
        SaveDtype::Bf16 => "BFloat16Storage",
        SaveDtype::F16 => "HalfStorage",
    };
    let mut p = Pickle(vec![0x80, 2]);
    p.empty_ordered_dict();
    p.0.push(b'(');
    for (k, ((name, shape), t)) in specs.iter().zip(&tensors).enumerate() {
        if &t.shape != shape {
            return Err(Error::Shape {
                op: "save_params_torch",
                msg: format!("{name} is {:?}, expected {shape:?}", t.shape),
            });
        }
        p.str(mamba_ssm_name(name));
        p.tensor(storage_type, &k.to_string(), t.data.len(), shape);
    }
    if cfg.tie_embeddings {
        // The embedding is storage "0": the head is the same storage, as torch saves it.
        p.str("lm_head.weight");
        p.tensor(storage_type, "0", tensors[0].data.len(), &tensors[0].shape);
    }
    p.0.extend_from_slice(b"u.");
    crate::fs::atomic_write_with(path, |f| {
        let mut z = ZipWriter::new(f);
        let big = tensors
            .iter()
            .any(|t| t.data.len() * 4 >= u32::MAX as usize);
        let opts = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .with_alignment(ALIGN)
            .large_file(big);
        let mut put = |name: String, bytes: &[u8]| -> zip::result::ZipResult<()> {
            z.start_file(name, opts)?;
            z.write_all(bytes)?;
            Ok(())
        };
        put(format!("{ARCHIVE}/data.pkl"), &p.0)?;
        put(format!("{ARCHIVE}/byteorder"), b"little")?;
        for (k, t) in tensors.iter().enumerate() {
            put(
                format!("{ARCHIVE}/data/{k}"),
                &storage_bytes(&t.data, dtype),
            )?;
        }
        put(format!("{ARCHIVE}/version"), b"3\n")?;
        z.finish()?;
        Ok(())
    })
    .map_err(|e| Error::io(path, e))
}
