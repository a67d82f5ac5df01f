//! Writing safetensors files: any tensors ([`write_tensors`]) or a model's parameters
//! ([`save_params`]), streamed tensor by tensor and written atomically.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, View};

use super::paths::{ckpt_err, safetensors_file, SAFETENSORS_FILE, SHARD_INDEX_FILE};
use super::sharded::{plan_shards, shard_name};
use crate::config::MambaConfig;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::params::{param_specs, Params};

/// The element type a checkpoint is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    /// IEEE single precision (f64 parameters are rounded to it).
    F32,
    /// bfloat16, rounded to nearest even from f32.
    Bf16,
    /// IEEE half precision, rounded to nearest even from f32.
    F16,
}

impl SaveDtype {
    fn dtype(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::Bf16 => Dtype::BF16,
            SaveDtype::F16 => Dtype::F16,
        }
    }
}

/// A tensor to write with [`write_tensors`].
#[derive(Clone, Debug, PartialEq)]
pub enum TensorOut {
    /// Written as `F32`.
    F32 { shape: Vec<usize>, data: Vec<f32> },
    /// Written as `BF16`.
    Bf16 { shape: Vec<usize>, data: Vec<bf16> },
    /// Written as `F16`.
    F16 { shape: Vec<usize>, data: Vec<f16> },
    /// Written as `I64` (token ids, counters).
    I64 { shape: Vec<usize>, data: Vec<i64> },
    /// Written as `I8` (quantised weights).
    I8 { shape: Vec<usize>, data: Vec<i8> },
}

/// A tensor whose bytes are produced only when the serializer writes it.
struct LazyView<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    byte_len: usize,
    bytes: Box<dyn Fn() -> Vec<u8> + 'a>,
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned((self.bytes)())
    }
    fn data_len(&self) -> usize {
        self.byte_len
    }
}

impl TensorOut {
    /// The shape, the number of values, and a lazy view for the serializer.
    fn view(&self) -> (&[usize], usize, LazyView<'_>) {
        let (dtype, shape, n): (Dtype, &[usize], usize) = match self {
            TensorOut::F32 { shape, data } => (Dtype::F32, shape, data.len()),
            TensorOut::Bf16 { shape, data } => (Dtype::BF16, shape, data.len()),
            TensorOut::F16 { shape, data } => (Dtype::F16, shape, data.len()),
            TensorOut::I64 { shape, data } => (Dtype::I64, shape, data.len()),
            TensorOut::I8 { shape, data } => (Dtype::I8, shape, data.len()),
        };
        let bytes: Box<dyn Fn() -> Vec<u8> + '_> = match self {
            TensorOut::F32 { data, .. } => Box::new(|| le_bytes(data, |v| v.to_le_bytes())),
            TensorOut::Bf16 { data, .. } => {
                Box::new(|| le_bytes(data, |v| v.to_bits().to_le_bytes()))
            }
            TensorOut::F16 { data, .. } => {
                Box::new(|| le_bytes(data, |v| v.to_bits().to_le_bytes()))
            }
            TensorOut::I64 { data, .. } => Box::new(|| le_bytes(data, |v| v.to_le_bytes())),
            TensorOut::I8 { data, .. } => Box::new(|| le_bytes(data, |v| v.to_le_bytes())),
        };
        let byte_len = n * dtype.bitsize() / 8;
        let view = LazyView {
            dtype,
            shape: shape.to_vec(),
            byte_len,
            bytes,
        };
        (shape, n, view)
    }
}

fn le_bytes<V: Copy, const N: usize>(data: &[V], f: impl Fn(V) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * N);
    for &v in data {
        out.extend_from_slice(&f(v));
    }
    out
}

/// Writes f32 / bf16 / f16 / i64 tensors to a safetensors file atomically, with the metadata
/// `{"format": "pt"}` that transformers requires.
pub fn write_tensors(path: &Path, tensors: &[(String, TensorOut)]) -> Result<()> {
    write_tensors_with_metadata(path, tensors, &[])
}

/// [`write_tensors`] with extra `__metadata__` strings beside `{"format": "pt"}`.
pub fn write_tensors_with_metadata(
    path: &Path,
    tensors: &[(String, TensorOut)],
    extra: &[(&str, &str)],
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (shape, n, view) = t.view();
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(n) {
            return Err(ckpt_err(
                path,
                format!("tensor `{name}`: shape {shape:?} does not match its {n} values"),
            ));
        }
        views.push((name.clone(), view));
    }
    write_views(path, views, extra)
}

/// Saves `params` under their canonical names in `dtype` (`path/model.safetensors` when `path`
/// is a directory), atomically, with metadata `{"format": "pt"}`.
pub fn save_params<T: Float>(
    path: &Path,
    cfg: &MambaConfig,
    params: &Params<T>,
    dtype: SaveDtype,
) -> Result<()> {
    let path = safetensors_file(path);
    write_views(&path, param_views(cfg, params, dtype)?, &[])
}

/// Saves `params` into the directory `dir` as transformers' `save_pretrained(max_shard_size=
/// max_shard_bytes)` would: `model.safetensors` when it fits in one shard, else
/// `model-0000K-of-0000N.safetensors` files and `model.safetensors.index.json`
/// (`metadata.total_size`, `weight_map`). Returns the names of the files written.
pub fn save_params_sharded<T: Float>(
    dir: &Path,
    cfg: &MambaConfig,
    params: &Params<T>,
    dtype: SaveDtype,
    max_shard_bytes: u64,
) -> Result<Vec<String>> {
    let mut views = param_views(cfg, params, dtype)?;
    // transformers splits in its state-dict order; ours differs inside a layer.
    views.sort_by_key(|(name, _)| hf_state_dict_rank(name));
    let sizes: Vec<u64> = views.iter().map(|(_, v)| v.byte_len as u64).collect();
    let numel: usize = views
        .iter()
        .map(|(_, v)| v.shape.iter().product::<usize>())
        .sum();
    let plan = plan_shards(&sizes, max_shard_bytes.max(1));
    if plan.len() <= 1 {
        write_views(&dir.join(SAFETENSORS_FILE), views, &[])?;
        return Ok(vec![SAFETENSORS_FILE.to_string()]);
    }
    let mut shard_of = vec![0usize; views.len()];
    for (k, idx) in plan.iter().enumerate() {
        for &i in idx {
            shard_of[i] = k;
        }
    }
    let n = plan.len();
    let mut groups: Vec<Vec<(String, LazyView<'_>)>> = (0..n).map(|_| Vec::new()).collect();
    let mut weight_map = serde_json::Map::new();
    for (i, (name, view)) in views.into_iter().enumerate() {
        let k = shard_of[i];
        weight_map.insert(name.clone(), shard_name(k + 1, n).into());
        groups[k].push((name, view));
    }
    let mut written = Vec::with_capacity(n + 1);
    for (k, group) in groups.into_iter().enumerate() {
        let file = shard_name(k + 1, n);
        write_views(&dir.join(&file), group, &[])?;
        written.push(file);
    }
    let index = serde_json::json!({
        "metadata": {"total_parameters": numel, "total_size": sizes.iter().sum::<u64>()},
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&index).expect("a JSON value serialises");
    let index_path = dir.join(SHARD_INDEX_FILE);
    crate::fs::atomic_write(&index_path, format!("{text}\n").as_bytes())?;
    written.push(SHARD_INDEX_FILE.to_string());
    Ok(written)
}

/// Where `name` comes in the state dict of transformers' `MambaForCausalLM` (the order its
/// `save_pretrained` fills shards in): the embedding, each layer (its norm, then the mixer's
/// own parameters `A_log`, `D`, then `conv1d`, `in_proj`, `x_proj`, `dt_proj`, `out_proj`),
/// `norm_f`, the head.
fn hf_state_dict_rank(name: &str) -> (u8, usize, usize) {
    const LAYER: [&str; 13] = [
        "norm.weight",
        "norm.bias",
        "mixer.A_log",
        "mixer.D",
        "mixer.conv1d.weight",
        "mixer.conv1d.bias",
        "mixer.in_proj.weight",
        "mixer.in_proj.bias",
        "mixer.x_proj.weight",
        "mixer.dt_proj.weight",
        "mixer.dt_proj.bias",
        "mixer.out_proj.weight",
        "mixer.out_proj.bias",
    ];
    if let Some(rest) = name.strip_prefix("backbone.layers.") {
        let (i, what) = rest.split_once('.').unwrap_or((rest, ""));
        let rank = LAYER.iter().position(|n| *n == what).unwrap_or(LAYER.len());
        return (1, i.parse().unwrap_or(usize::MAX), rank);
    }
    match name {
        "backbone.embeddings.weight" => (0, 0, 0),
        "backbone.norm_f.weight" => (2, 0, 0),
        "backbone.norm_f.bias" => (2, 0, 1),
        _ => (3, 0, 0),
    }
}

/// Lazy views of `params` under their canonical names, in `dtype`, checked against the config.
fn param_views<'a, T: Float>(
    cfg: &MambaConfig,
    params: &'a Params<T>,
    dtype: SaveDtype,
) -> Result<Vec<(String, LazyView<'a>)>> {
    let specs = param_specs(cfg);
    let tensors = params.tensors();
    if specs.len() != tensors.len() {
        return Err(Error::Shape {
            op: "save_params",
            msg: format!(
                "params hold {} tensors, the config has {}",
                tensors.len(),
                specs.len()
            ),
        });
    }
    let mut views = Vec::with_capacity(specs.len());
    for ((name, shape), t) in specs.into_iter().zip(tensors) {
        if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
            return Err(Error::Shape {
                op: "save_params",
                msg: format!(
                    "{name} is {:?} with {} values, expected {shape:?}",
                    t.shape,
                    t.data.len()
                ),
            });
        }
        let data = &t.data;
        let bytes: Box<dyn Fn() -> Vec<u8> + 'a> = match dtype {
            SaveDtype::F32 => Box::new(move || le_bytes(data, |v| v.to_f32().to_le_bytes())),
            SaveDtype::Bf16 => Box::new(move || {
                le_bytes(data, |v| bf16::from_f32(v.to_f32()).to_bits().to_le_bytes())
            }),
            SaveDtype::F16 => Box::new(move || {
                le_bytes(data, |v| f16::from_f32(v.to_f32()).to_bits().to_le_bytes())
            }),
        };
        let dt = dtype.dtype();
        let view = LazyView {
            dtype: dt,
            byte_len: data.len() * dt.bitsize() / 8,
            shape,
            bytes,
        };
        views.push((name, view));
    }
    Ok(views)
}

/// Serialises `views` (names must be unique) to `path` through a temporary file.
fn write_views(
    path: &Path,
    views: Vec<(String, LazyView<'_>)>,
    extra: &[(&str, &str)],
) -> Result<()> {
    let mut seen = HashSet::new();
    for (name, _) in &views {
        if name == "__metadata__" || !seen.insert(name.as_str()) {
            return Err(ckpt_err(
                path,
                format!("tensor name `{name}` is reserved or repeated"),
            ));
        }
    }
    let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    metadata.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    crate::fs::atomic_write_path(path, |tmp| {
        safetensors::serialize_to_file(views, Some(metadata), tmp)
            .map_err(|e| ckpt_err(path, format!("writing safetensors: {e}")))
    })
}
