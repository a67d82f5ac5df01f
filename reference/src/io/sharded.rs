//! Sharded Hugging Face checkpoints: `model.safetensors.index.json`
//! (`{"metadata": {"total_size": N}, "weight_map": {tensor: file}}`) naming
//! `model-0000K-of-0000N.safetensors` files, read as one set of tensors ([`StFiles`]) and
//! written the way transformers' `save_pretrained(max_shard_size=...)` splits them
//! ([`plan_shards`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorInfo;

use super::paths::ckpt_err;
use super::Header;
use crate::error::Result;
use crate::float::Float;
use crate::tensor::Tensor;

/// transformers' default `max_shard_size`.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The safetensors files of a checkpoint (one file, or the shards of an index) and which of
/// them holds each tensor.
pub(super) struct StFiles {
    /// The file, or the index: what errors name.
    pub path: PathBuf,
    pub headers: Vec<Header>,
    /// Tensor name -> (index into `headers`, its info).
    pub tensors: HashMap<String, (usize, TensorInfo)>,
    /// Tensor names in file order (shard by shard).
    pub order: Vec<String>,
}

impl StFiles {
    pub fn single(path: &Path) -> Result<StFiles> {
        let h = Header::open(path)?;
        let order: Vec<String> = h.entries.iter().map(|(n, _)| n.clone()).collect();
        let tensors = h
            .entries
            .iter()
            .map(|(n, i)| (n.clone(), (0, i.clone())))
            .collect();
        Ok(StFiles {
            path: path.to_path_buf(),
            headers: vec![h],
            tensors,
            order,
        })
    }

    /// Opens every shard `index` names and checks that each tensor is where the index says,
    /// and in one shard only.
    pub fn sharded(index: &Path) -> Result<StFiles> {
        let weight_map = read_index(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<&str> = weight_map.values().map(String::as_str).collect();
        files.sort_unstable();
        files.dedup();
        let mut headers = Vec::with_capacity(files.len());
        let mut tensors: HashMap<String, (usize, TensorInfo)> = HashMap::new();
        let mut order = Vec::new();
        for (k, file) in files.iter().enumerate() {
            let shard = dir.join(file);
            if !shard.is_file() {
                return Err(ckpt_err(
                    index,
                    format!("names shard {file}, which is missing"),
                ));
            }
            let h = Header::open(&shard)?;
            for (name, info) in &h.entries {
                if let Some((other, _)) = tensors.get(name) {
                    return Err(ckpt_err(
                        index,
                        format!(
                            "tensor `{name}` is in two shards: {} and {file}",
                            files[*other]
                        ),
                    ));
                }
                match weight_map.get(name) {
                    Some(f) if f == file => {}
                    Some(f) => {
                        return Err(ckpt_err(
                            index,
                            format!("tensor `{name}` is in {file}, but the index puts it in {f}"),
                        ))
                    }
                    None => {
                        return Err(ckpt_err(
                            index,
                            format!(
                                "shard {file} holds tensor `{name}`, which the index does not list"
                            ),
                        ))
                    }
                }
                tensors.insert(name.clone(), (k, info.clone()));
                order.push(name.clone());
            }
            headers.push(h);
        }
        if let Some((name, file)) = weight_map.iter().find(|(n, _)| !tensors.contains_key(*n)) {
            return Err(ckpt_err(
                index,
                format!("names tensor `{name}` in {file}, which does not hold it"),
            ));
        }
        Ok(StFiles {
            path: index.to_path_buf(),
            headers,
            tensors,
            order,
        })
    }

    /// Bytes of tensor data in all files.
    pub fn data_len(&self) -> Result<u64> {
        self.headers.iter().map(Header::data_len).sum()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(|(_, i)| i)
    }

    /// The file holding `name` and the absolute offset of its first byte.
    pub fn location(&self, name: &str) -> Option<(&Path, u64)> {
        let (k, info) = self.tensors.get(name)?;
        let h = &self.headers[*k];
        Some((&h.path, h.data_start + info.data_offsets.0 as u64))
    }

    pub fn read_float<T: Float>(&mut self, name: &str) -> Result<Tensor<T>> {
        let (k, info) = self
            .tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ckpt_err(&self.path, format!("tensor `{name}` is missing")))?;
        self.headers[k].read_float(name, &info)
    }
}

/// The `weight_map` of an index file, checked to be a JSON object of strings that name plain
/// files beside it.
fn read_index(index: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read(index).map_err(|e| crate::error::Error::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| ckpt_err(index, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ckpt_err(index, "has no `weight_map` object"))?;
    let mut out = BTreeMap::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(ckpt_err(
                index,
                format!("weight_map: `{name}` maps to {file}, not a file name"),
            ));
        };
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if file.is_empty() || !plain || file.contains('/') || file.contains('\\') {
            return Err(ckpt_err(
                index,
                format!("weight_map: `{name}` maps to `{file}`, not a file beside the index"),
            ));
        }
        out.insert(name.clone(), file.to_string());
    }
    if out.is_empty() {
        return Err(ckpt_err(index, "weight_map is empty"));
    }
    Ok(out)
}

/// Splits tensors (name, bytes) into shards as `huggingface_hub`'s
/// `split_state_dict_into_shards_factory` does for `save_pretrained(max_shard_size=...)`: in
/// order, a new shard starts when the next tensor would push the current one over `max`; a
/// tensor larger than `max` gets a shard of its own (placed before the one being filled).
/// Returns the tensor indices of each shard.
pub fn plan_shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The file name of shard `k` (from 1) of `n`, as transformers spells it.
pub fn shard_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// Whether `name` is a shard file name ([`shard_name`]).
pub fn is_shard_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let parts: Vec<&str> = rest.split("-of-").collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| p.len() >= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses a shard size as transformers does (`convert_file_size_to_int`): a byte count, or a
/// number with `KB`/`MB`/`GB` (powers of 1000) or `KiB`/`MiB`/`GiB` (powers of 1024);
/// a lowercase `b` means bits (`5Gb` = 625,000,000 bytes).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let bad = || format!("`{text}` is not a size: use a byte count or e.g. 500MB, 5GB, 2GiB");
    let units: [(&str, f64); 12] = [
        ("GIB", 1073741824.0),
        ("MIB", 1048576.0),
        ("KIB", 1024.0),
        ("GB", 1e9),
        ("MB", 1e6),
        ("KB", 1e3),
        ("Gb", 1e9 / 8.0),
        ("Mb", 1e6 / 8.0),
        ("Kb", 1e3 / 8.0),
        ("GiB", 1073741824.0),
        ("MiB", 1048576.0),
        ("KiB", 1024.0),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((t, 1.0));
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    let bytes = n * mult;
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes as u64)
}
