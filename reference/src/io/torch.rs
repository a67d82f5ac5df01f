//! `pytorch_model.bin`: the zip archive `torch.save` has written since PyTorch 1.6
//! (`<archive>/data.pkl`, `<archive>/data/<key>` with each storage's little-endian bytes,
//! `<archive>/version`, maybe `<archive>/byteorder`). The pickle goes through the allow-list
//! unpickler of [`super::torch_pickle`]; tensors are views of storages (offset, size,
//! stride, storages shared between tensors), copied out contiguous and converted to f32.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use half::{bf16, f16};

use super::paths::ckpt_err;
use super::torch_pickle::{unpickle, StorageDtype, TensorRef, Value};
use super::Dtype;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One tensor of a torch state dict: its name, the dtype it was stored in, and its values.
pub(super) type TorchTensor = (String, Dtype, Tensor<f32>);

/// Whether `path` is a torch checkpoint: a `.bin` file, or a file that starts as a zip does.
pub fn is_torch_file(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e == "bin") {
        return true;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"PK\x03\x04"
}

/// Every tensor of the state dict in a `torch.save` zip, in pickle order, as f32.
pub(super) fn read_state_dict(path: &Path) -> Result<Vec<TorchTensor>> {
    let mut zip = open_zip(path)?;
    let pkl = zip
        .file_names()
        .map(str::to_string)
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| {
            ckpt_err(
                path,
                "the zip holds no <archive>/data.pkl (not a torch.save file?)",
            )
        })?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Ok(order) = read_entry(&mut zip, path, &format!("{prefix}byteorder"), 16) {
        if order != b"little" {
            return Err(ckpt_err(
                path,
                "the storages are big-endian; only little-endian is supported",
            ));
        }
    }
    let pickle = read_entry(&mut zip, path, &pkl, 1 << 30)?;
    let value = unpickle(&pickle).map_err(|e| ckpt_err(path, format!("{pkl}: {e}")))?;
    let Value::Dict(items) = value else {
        return Err(ckpt_err(path, format!("{pkl} holds no dict of tensors")));
    };
    let mut storages: HashMap<String, (StorageDtype, u64, Vec<u8>)> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
            return Err(ckpt_err(
                path,
                format!("{pkl}: a state-dict entry is not a name and a tensor"),
            ));
        };
        match storages.get(&t.key) {
            None => {
                let bytes = read_storage(&mut zip, path, &prefix, &t)?;
                storages.insert(t.key.clone(), (t.dtype, t.numel, bytes));
            }
            // A shared storage (a tied head) must be named the same way each time.
            Some((dtype, numel, _)) if (*dtype, *numel) != (t.dtype, t.numel) => {
                return Err(ckpt_err(
                    path,
                    format!(
                        "tensor `{name}`: storage {} is {numel} elements of {dtype:?} elsewhere but {} of {:?} here",
                        t.key, t.numel, t.dtype
                    ),
                ));
            }
            Some(_) => {}
        }
        let tensor = materialize(&storages[&t.key].2, &t)
            .map_err(|e| ckpt_err(path, format!("tensor `{name}`: {e}")))?;
        let dtype = match t.dtype {
            StorageDtype::F32 => Dtype::F32,
            StorageDtype::F16 => Dtype::F16,
            StorageDtype::BF16 => Dtype::BF16,
        };
        out.push((name, dtype, tensor));
    }
    Ok(out)
}

/// The zip archive at `path`; a legacy (pre-1.6, raw pickle) torch file is named as such.
fn open_zip(path: &Path) -> Result<zip::ZipArchive<File>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    zip::ZipArchive::new(file).map_err(|e| {
        let mut head = [0u8; 2];
        let legacy = File::open(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && head[0] == 0x80;
        if legacy {
            ckpt_err(path, "legacy torch.save format is not supported: re-save with PyTorch >= 1.6 or convert to safetensors")
        } else {
            ckpt_err(path, format!("not a torch.save zip archive ({e})"))
        }
    })
}

fn read_entry(
    zip: &mut zip::ZipArchive<File>,
    path: &Path,
    name: &str,
    max: u64,
) -> Result<Vec<u8>> {
    let mut f = zip
        .by_name(name)
        .map_err(|e| ckpt_err(path, format!("zip entry {name}: {e}")))?;
    if f.size() > max {
        return Err(ckpt_err(
            path,
            format!(
                "zip entry {name} is {} bytes, over the {max}-byte limit",
                f.size()
            ),
        ));
    }
    // The sizes in the zip are not trusted for allocation: read at most `max` bytes.
    let mut buf = Vec::new();
    (&mut f)
        .take(max)
        .read_to_end(&mut buf)
        .map_err(|e| ckpt_err(path, format!("reading zip entry {name}: {e}")))?;
    Ok(buf)
}

/// The bytes of one storage, checked against the element count the pickle gives.
fn read_storage(
    zip: &mut zip::ZipArchive<File>,
    path: &Path,
    prefix: &str,
    t: &TensorRef,
) -> Result<Vec<u8>> {
    let name = format!("{prefix}data/{}", t.key);
    let want = t.numel.checked_mul(t.dtype.size() as u64);
    let len = zip
        .by_name(&name)
        .map_err(|e| ckpt_err(path, format!("storage {name}: {e}")))?
        .size();
    if want != Some(len) {
        return Err(ckpt_err(
            path,
            format!(
                "storage {name} is {len} bytes, but the pickle gives it {} elements of {} bytes",
                t.numel,
                t.dtype.size()
            ),
        ));
    }
    let bytes = read_entry(zip, path, &name, len)?;
    if bytes.len() as u64 != len {
        return Err(ckpt_err(path, format!("storage {name} ends early")));
    }
    Ok(bytes)
}

/// The view `t` of `storage`, copied out in row-major order and converted to f32.
fn materialize(storage: &[u8], t: &TensorRef) -> std::result::Result<Tensor<f32>, String> {
    let mut numel: u64 = 1;
    let mut last: u64 = t.offset;
    for (&n, &s) in t.size.iter().zip(&t.stride) {
        numel = numel.checked_mul(n).ok_or("its size overflows")?;
        if n > 0 {
            last = (n - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or("its strides overflow")?;
        }
    }
    if numel > t.numel {
        return Err(format!(
            "size {:?} has {numel} elements, more than its {}-element storage holds",
            t.size, t.numel
        ));
    }
    if numel > 0 && last >= t.numel {
        return Err(format!(
            "storage offset {} with size {:?} and stride {:?} reaches element {last}, past the end of its {}-element storage",
            t.offset, t.size, t.stride, t.numel
        ));
    }
    let shape: Vec<usize> = t.size.iter().map(|&n| n as usize).collect();
    let es = t.dtype.size();
    let mut data = Vec::with_capacity(numel as usize);
    let mut idx = vec![0u64; t.size.len()];
    for _ in 0..numel {
        let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<u64>();
        let start = at as usize * es;
        let b = storage
            .get(start..start + es)
            .ok_or_else(|| format!("element {at} is past the end of its storage"))?;
        data.push(match t.dtype {
            StorageDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageDtype::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            StorageDtype::BF16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        });
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Tensor { shape, data })
}
