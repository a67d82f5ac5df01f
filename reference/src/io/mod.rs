//! safetensors I/O: reading checkpoints (f32, f64, bf16, f16 -> f32 or f64), checking them
//! against the config's parameter list, and writing them atomically.
//!
//! Files are read tensor by tensor (header first, then each tensor's bytes), so loading a
//! model needs memory for the model plus one tensor, not for the whole file twice. Every
//! malformed file (truncated, bad header, garbage) is an [`Error::Checkpoint`] naming the path.
//! All byte conversions are explicitly little-endian.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};
pub use safetensors::Dtype;

use crate::config::MambaConfig;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::io_limits::{self, capped_list, check_fits};
use crate::params::{param_specs, Params};
use crate::tensor::Tensor;
use paths::ckpt_err;
pub use paths::{checkpoint_layout, Layout, SAFETENSORS_FILE, SHARD_INDEX_FILE, TORCH_FILE};
use sharded::StFiles;
pub use sharded::{is_shard_name, parse_size, DEFAULT_MAX_SHARD_BYTES};
pub use torch_write::save_params_torch;
pub use write::{
    save_params, save_params_sharded, write_tensors, write_tensors_with_metadata, SaveDtype,
    TensorOut,
};

mod paths;
mod sharded;
mod torch;
pub mod torch_pickle;
mod torch_write;
mod write;

pub use torch::is_torch_file;

/// Kept for callers of the old path; the atomic write lives in [`crate::fs`].
pub use crate::fs::atomic_write;

/// The largest header accepted (the safetensors crate's own limit).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// The mamba_ssm spelling of the embedding, renamed on load.
const MAMBA_SSM_EMBEDDING: &str = "backbone.embedding.weight";
const EMBEDDING: &str = "backbone.embeddings.weight";
const LM_HEAD: &str = "lm_head.weight";

/// An open safetensors file whose header has been read and checked against the file size.
struct Header {
    path: PathBuf,
    file: File,
    /// Byte offset of the tensor data (8 + header length).
    data_start: u64,
    /// Every tensor, in file order.
    entries: Vec<(String, TensorInfo)>,
    /// The header's `__metadata__` strings.
    metadata: HashMap<String, String>,
}

impl Header {
    fn open(path: &Path) -> Result<Header> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < 8 {
            return Err(ckpt_err(
                path,
                format!("file is {file_len} bytes, too short for a safetensors header"),
            ));
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|e| ckpt_err(path, format!("reading the header length: {e}")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_LEN {
            return Err(ckpt_err(
                path,
                format!("header length {header_len} is over the {MAX_HEADER_LEN}-byte limit (not a safetensors file?)"),
            ));
        }
        if header_len > file_len - 8 {
            return Err(ckpt_err(
                path,
                format!("header length {header_len} runs past the end of the {file_len}-byte file (truncated or not a safetensors file)"),
            ));
        }
        // Bounded by MAX_HEADER_LEN above, so the cast cannot truncate.
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| ckpt_err(path, format!("reading the header: {e}")))?;
        let meta: Metadata = serde_json::from_slice(&header).map_err(|e| {
            let why = io_limits::explain_header(&header, file_len - 8 - header_len);
            ckpt_err(
                path,
                why.unwrap_or(format!("invalid safetensors header: {e}")),
            )
        })?;
        let data_start = 8 + header_len;
        let data_len = meta.data_len() as u64;
        if data_start.checked_add(data_len) != Some(file_len) {
            return Err(ckpt_err(
                path,
                format!(
                    "header describes {data_len} bytes of tensor data but the file holds {} (truncated or corrupt file)",
                    file_len - data_start
                ),
            ));
        }
        let entries = meta
            .offset_keys()
            .into_iter()
            .filter_map(|name| meta.info(&name).cloned().map(|info| (name, info)))
            .collect();
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(Header {
            path: path.to_path_buf(),
            file,
            data_start,
            entries,
            metadata,
        })
    }

    /// Bytes of tensor data after the header.
    fn data_len(&self) -> Result<u64> {
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, e))?
            .len();
        Ok(len.saturating_sub(self.data_start))
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, i)| i)
    }

    /// The raw little-endian bytes of one tensor.
    fn read_bytes(&mut self, name: &str, info: &TensorInfo) -> Result<Vec<u8>> {
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| ckpt_err(&self.path, format!("reading tensor `{name}`: {e}")))?;
        Ok(bytes)
    }

    /// One floating-point tensor, converted to `T`.
    fn read_float<T: Float>(&mut self, name: &str, info: &TensorInfo) -> Result<Tensor<T>> {
        check_float_dtype(&self.path, name, info.dtype)?;
        let bytes = self.read_bytes(name, info)?;
        Ok(Tensor {
            shape: info.shape.clone(),
            data: decode_float(&bytes, info.dtype),
        })
    }
}

fn is_float_dtype(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::BF16 | Dtype::F16)
}

fn check_float_dtype(path: &Path, name: &str, dtype: Dtype) -> Result<()> {
    if is_float_dtype(dtype) {
        Ok(())
    } else {
        Err(ckpt_err(
            path,
            format!("tensor `{name}` has dtype {dtype}; expected F32, F64, BF16 or F16"),
        ))
    }
}

/// Converts little-endian bytes of a float dtype (checked by the caller) to `T`. f64 goes to
/// `T` directly, so an f64 file read as f64 keeps every bit.
fn decode_float<T: Float>(bytes: &[u8], dtype: Dtype) -> Vec<T> {
    fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    }
    match dtype {
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| T::from_f64(f64::from_le_bytes(arr(c))))
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| T::from_f32(f32::from_le_bytes(arr(c))))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| T::from_f32(bf16::from_bits(u16::from_le_bytes(arr(c))).to_f32()))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| T::from_f32(f16::from_bits(u16::from_le_bytes(arr(c))).to_f32()))
            .collect(),
        _ => Vec::new(),
    }
}

/// Every tensor of a safetensors file as f32 (F32, F64, BF16 and F16 are converted), sorted by
/// name. Another dtype is an error naming the tensor.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor<f32>)>> {
    let mut h = Header::open(path)?;
    if let Some((name, info)) = h.entries.iter().find(|(_, i)| !is_float_dtype(i.dtype)) {
        return Err(ckpt_err(
            path,
            format!(
                "tensor `{name}` has dtype {}; expected F32, F64, BF16 or F16",
                info.dtype
            ),
        ));
    }
    let entries = h.entries.clone();
    let mut out = Vec::with_capacity(entries.len());
    for (name, info) in &entries {
        out.push((name.clone(), h.read_float(name, info)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// One integer tensor (I64 or I32) of a safetensors file, e.g. token ids: `(shape, values)`.
pub fn read_i64(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
    let mut h = Header::open(path)?;
    let Some(info) = h.info(name).cloned() else {
        let names: Vec<&str> = h.entries.iter().map(|(n, _)| n.as_str()).collect();
        return Err(ckpt_err(
            path,
            format!("no tensor `{name}` (the file has: {})", names.join(", ")),
        ));
    };
    let bytes = h.read_bytes(name, &info)?;
    let data = match info.dtype {
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                i64::from_le_bytes(a)
            })
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| {
                let mut a = [0u8; 4];
                a.copy_from_slice(c);
                i64::from(i32::from_le_bytes(a))
            })
            .collect(),
        other => {
            return Err(ckpt_err(
                path,
                format!("tensor `{name}` has dtype {other}; expected I64 or I32"),
            ))
        }
    };
    Ok((info.shape, data))
}

/// Maps each canonical parameter name to the name it has in the file: accepts mamba_ssm's
/// `backbone.embedding.weight` and ignores `lm_head.weight` when the config ties it.
fn canonical_names<'a>(
    path: &Path,
    file_names: impl Iterator<Item = &'a str>,
    cfg: &MambaConfig,
) -> Result<HashMap<String, String>> {
    let mut map = HashMap::new();
    for name in file_names {
        let canonical = if name == MAMBA_SSM_EMBEDDING {
            EMBEDDING
        } else if name == LM_HEAD && cfg.tie_embeddings {
            continue;
        } else {
            name
        };
        if map
            .insert(canonical.to_string(), name.to_string())
            .is_some()
        {
            return Err(ckpt_err(
                path,
                format!("holds both `{EMBEDDING}` and `{MAMBA_SSM_EMBEDDING}`"),
            ));
        }
    }
    Ok(map)
}

/// Checks the file's tensors (`info` gives a file name's dtype and shape) against
/// [`param_specs`]; one error lists every problem.
fn check_against_specs(
    path: &Path,
    names: &HashMap<String, String>,
    specs: &[(String, Vec<usize>)],
    info: impl Fn(&str) -> Option<(Dtype, Vec<usize>)>,
) -> Result<()> {
    let expected: HashSet<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
    let mut missing = Vec::new();
    let mut shapes = Vec::new();
    let mut dtypes = Vec::new();
    for (name, shape) in specs {
        let Some((dtype, got)) = names.get(name).and_then(|file_name| info(file_name)) else {
            missing.push(name.clone());
            continue;
        };
        if &got != shape {
            shapes.push(format!("{name}: got {got:?}, expected {shape:?}"));
        }
        if !is_float_dtype(dtype) {
            dtypes.push(format!("{name}: {dtype}"));
        }
    }
    let mut unexpected: Vec<&String> = names
        .iter()
        .filter(|(canonical, _)| !expected.contains(canonical.as_str()))
        .map(|(_, file_name)| file_name)
        .collect();
    unexpected.sort();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing tensors: {}", capped_list(&missing, ", ")));
    }
    if !unexpected.is_empty() {
        let list: Vec<String> = unexpected.iter().map(|s| s.to_string()).collect();
        problems.push(format!("unexpected tensors: {}", capped_list(&list, ", ")));
    }
    if !shapes.is_empty() {
        problems.push(format!("wrong shapes: {}", capped_list(&shapes, "; ")));
    }
    if !dtypes.is_empty() {
        problems.push(format!(
            "unsupported dtypes (expected F32, F64, BF16 or F16): {}",
            capped_list(&dtypes, ", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ckpt_err(
            path,
            format!("does not match the config: {}", problems.join("; ")),
        ))
    }
}

/// Loads the parameters of `cfg` from a checkpoint, converting to `T`. `path` is a directory
/// (its layout decided by [`checkpoint_layout`]: `model.safetensors`, a sharded
/// `model.safetensors.index.json`, or mamba_ssm's `pytorch_model.bin`) or one such file. A
/// torch zip is read by [`torch`] and goes through the same name and shape checks. Accepts
/// mamba_ssm's `backbone.embedding.weight`; ignores `lm_head.weight` when the config ties it to
/// the embedding. Missing, unexpected and wrongly shaped tensors are reported together in one
/// error.
pub fn load_params<T: Float>(path: &Path, cfg: &MambaConfig) -> Result<Params<T>> {
    cfg.validate()?;
    let mut files = match checkpoint_layout(path)? {
        Layout::Torch(p) => return load_torch_params(&p, cfg),
        Layout::Safetensors(p) => StFiles::single(&p)?,
        Layout::Sharded(p) => StFiles::sharded(&p)?,
    };
    let names = checked_names(&files, cfg)?;
    let specs = param_specs(cfg);
    let mut tensors = Vec::with_capacity(specs.len());
    for (name, _) in &specs {
        let file_name = names
            .get(name)
            .ok_or_else(|| ckpt_err(&files.path, format!("tensor `{name}` is missing")))?;
        tensors.push(files.read_float::<T>(file_name)?);
    }
    Ok(Params::from_ordered(cfg, tensors))
}

/// The canonical -> file name map of `files`, after checking size, names, shapes and dtypes
/// against `cfg`.
fn checked_names(files: &StFiles, cfg: &MambaConfig) -> Result<HashMap<String, String>> {
    let names = canonical_names(&files.path, files.order.iter().map(String::as_str), cfg)?;
    check_fits(&files.path, cfg, files.data_len()?, 16)?;
    check_against_specs(&files.path, &names, &param_specs(cfg), |n| {
        files.info(n).map(|i| (i.dtype, i.shape.clone()))
    })?;
    Ok(names)
}

/// [`load_params`] for a `torch.save` zip: the tensors are read as f32 first.
fn load_torch_params<T: Float>(path: &Path, cfg: &MambaConfig) -> Result<Params<T>> {
    let tensors = torch::read_state_dict(path)?;
    let names = canonical_names(path, tensors.iter().map(|(n, _, _)| n.as_str()), cfg)?;
    let mut by_name: HashMap<String, (Dtype, Tensor<f32>)> =
        tensors.into_iter().map(|(n, d, t)| (n, (d, t))).collect();
    let specs = param_specs(cfg);
    check_against_specs(path, &names, &specs, |n| {
        by_name.get(n).map(|(d, t)| (*d, t.shape.clone()))
    })?;
    let mut out = Vec::with_capacity(specs.len());
    for (name, _) in &specs {
        let missing = || ckpt_err(path, format!("tensor `{name}` is missing"));
        let file_name = names.get(name).ok_or_else(missing)?;
        let (_, t) = by_name.remove(file_name).ok_or_else(missing)?;
        out.push(Tensor {
            shape: t.shape,
            data: t.data.into_iter().map(T::from_f32).collect(),
        });
    }
    Ok(Params::from_ordered(cfg, out))
}

/// Where one parameter's bytes lie in a safetensors file (see [`locate_params`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorLocation {
    /// Canonical (Hugging Face) name.
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The file holding it (one shard of a sharded checkpoint).
    pub file: PathBuf,
    /// Absolute byte offset of the little-endian data in `file`.
    pub offset: u64,
    /// Byte length.
    pub len: usize,
}

/// Checks a safetensors checkpoint (file, directory with `model.safetensors`, or a sharded
/// one) against `cfg` exactly as [`load_params`] does, without reading the tensor data, and
/// returns the weights file (the index when sharded) and where every parameter lies, in
/// canonical order. For readers that memory-map the files. A torch checkpoint is an error
/// (it cannot be mapped; use [`load_params`]).
pub fn locate_params(path: &Path, cfg: &MambaConfig) -> Result<(PathBuf, Vec<TensorLocation>)> {
    cfg.validate()?;
    let files = match checkpoint_layout(path)? {
        Layout::Torch(p) => {
            return Err(ckpt_err(
                &p,
                "a torch.save file cannot be memory-mapped: load it with load_params",
            ))
        }
        Layout::Safetensors(p) => StFiles::single(&p)?,
        Layout::Sharded(p) => StFiles::sharded(&p)?,
    };
    let names = checked_names(&files, cfg)?;
    let specs = param_specs(cfg);
    let mut out = Vec::with_capacity(specs.len());
    for (name, _) in &specs {
        let missing = || ckpt_err(&files.path, format!("tensor `{name}` is missing"));
        let file_name = names.get(name).ok_or_else(missing)?;
        let info = files.info(file_name).ok_or_else(missing)?;
        let (file, offset) = files.location(file_name).ok_or_else(missing)?;
        out.push(TensorLocation {
            name: name.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            file: file.to_path_buf(),
            offset,
            len: info.data_offsets.1 - info.data_offsets.0,
        });
    }
    Ok((files.path.clone(), out))
}

/// Every tensor of a safetensors file (or `path/model.safetensors`) with where its bytes lie,
/// in file order, plus the header's metadata strings. The header is checked against the file
/// size; names, dtypes and shapes are the caller's to check. A sharded checkpoint gives every
/// shard's tensors and the first shard's metadata.
pub fn list_tensors(
    path: &Path,
) -> Result<(PathBuf, HashMap<String, String>, Vec<TensorLocation>)> {
    let files = match checkpoint_layout(path)? {
        Layout::Torch(p) => {
            return Err(ckpt_err(&p, "a torch.save file has no safetensors header"))
        }
        Layout::Safetensors(p) => StFiles::single(&p)?,
        Layout::Sharded(p) => StFiles::sharded(&p)?,
    };
    let locs = files
        .order
        .iter()
        .filter_map(|name| {
            let info = files.info(name)?;
            let (file, offset) = files.location(name)?;
            Some(TensorLocation {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                file: file.to_path_buf(),
                offset,
                len: info.data_offsets.1 - info.data_offsets.0,
            })
        })
        .collect();
    let meta = files.headers[0].metadata.clone();
    Ok((files.path, meta, locs))
}

/// Converts the little-endian bytes of an F32, F64, BF16 or F16 tensor to f32 (other dtypes
/// give an empty vector; [`locate_params`] has refused them already).
pub fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    decode_float(bytes, dtype)
}
