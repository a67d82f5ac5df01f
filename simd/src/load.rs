//! Loading a checkpoint directory into [`Weights`], memory-mapping the matrices whose file
//! precision is the one asked for.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use reference::engine::NamedTensors;
use reference::io::{
    bytes_to_f32, list_tensors, locate_params, write_tensors_with_metadata, Dtype, TensorLocation,
    TensorOut,
};
use reference::{Error, MambaConfig, Tensor};

use crate::kernels::{int4_groups, int4_row_bytes};
use crate::model::{a_from_log, LayerWeights, Weights};
use crate::weights::{Buf, Mat, MatData};
use crate::WeightDtype;

/// `__metadata__` key and values marking a Vet-Mamba quantised checkpoint
/// ([`save_quantized`]).
pub const QUANT_KEY: &str = "vet_mamba.quantization";
pub const QUANT_INT8: &str = "int8-rowwise";
pub const QUANT_INT4: &str = "int4-group32";

/// The parameters stored as matrices (the ones `dtype` applies to).
pub fn is_matrix(name: &str) -> bool {
    name == "backbone.embeddings.weight"
        || name == "lm_head.weight"
        || [
            "in_proj.weight",
            "x_proj.weight",
            "dt_proj.weight",
            "out_proj.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

fn map_file(path: &Path) -> reference::Result<Arc<Mmap>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; a checkpoint rewritten under a running process is the
    // same hazard as for every mmap-based loader (llama.cpp, safetensors), and checkpoints
    // are written by rename, never in place.
    Ok(Arc::new(
        unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?,
    ))
}

/// Opens `dir/model.safetensors` or its shards (checked against `cfg` like
/// `reference::io::load_params`) and builds the weights in `dtype`. An int8 or int4
/// checkpoint written by [`save_quantized`] is mapped as it is (it needs that `dtype`).
pub fn load_weights(
    dir: &Path,
    cfg: &MambaConfig,
    dtype: WeightDtype,
) -> reference::Result<Weights> {
    if is_torch_checkpoint(dir) {
        // A torch pickle cannot be mapped: read it to f32 (checked like a safetensors file).
        let params = reference::io::load_params::<f32>(dir, cfg)?;
        return Ok(Weights::from_params(cfg, &params, dtype));
    }
    let (path, meta, list) = list_tensors(dir)?;
    if let Some(kind) = quantization_of(&path, &meta)? {
        return load_quantized(&path, cfg, dtype, kind, list);
    }
    let (_, locs) = locate_params(dir, cfg)?;
    // One map per file: a sharded checkpoint's tensors lie in several.
    let mut maps: HashMap<&Path, Arc<Mmap>> = HashMap::new();
    for l in &locs {
        if !maps.contains_key(l.file.as_path()) {
            maps.insert(&l.file, map_file(&l.file)?);
        }
    }
    Ok(assemble(
        cfg,
        dtype,
        &locs,
        |l| f32s(&maps[l.file.as_path()], l),
        |l| mat(&maps[l.file.as_path()], l, dtype),
    ))
}

/// The quantisation the metadata `meta` of the safetensors file `path` names (`None`: float
/// weights).
fn quantization_of(
    path: &Path,
    meta: &HashMap<String, String>,
) -> reference::Result<Option<WeightDtype>> {
    match meta.get(QUANT_KEY).map(String::as_str) {
        Some(QUANT_INT8) => Ok(Some(WeightDtype::Int8)),
        Some(QUANT_INT4) => Ok(Some(WeightDtype::Int4)),
        Some(other) => Err(Error::Checkpoint {
            path: path.display().to_string(),
            msg: format!(
                "unknown {QUANT_KEY} `{other}` (this build reads {QUANT_INT8} and {QUANT_INT4})"
            ),
        }),
        None => Ok(None),
    }
}

/// The quantisation a checkpoint directory was written with by [`save_quantized`] (`vet-train
/// quantize`), read from its safetensors header alone; `None` for float weights (safetensors
/// or torch).
pub fn stored_quantization(dir: &Path) -> reference::Result<Option<WeightDtype>> {
    if is_torch_checkpoint(dir) {
        return Ok(None);
    }
    let (path, meta, _) = list_tensors(dir)?;
    quantization_of(&path, &meta)
}

/// The parameters of a quantised checkpoint (`kind`, from [`stored_quantization`]) as f32:
/// each matrix `q · scale` as the CPU tier computes with it, every other parameter as the file
/// holds it. For the engines that hold f32 weights (reference, CUDA) and for export.
pub fn load_dequantized(
    dir: &Path,
    cfg: &MambaConfig,
    kind: WeightDtype,
) -> reference::Result<reference::Params<f32>> {
    let (path, _, list) = list_tensors(dir)?;
    // Checked name by name against `cfg` here.
    let w = load_quantized(&path, cfg, kind, kind, list.clone())?;
    let map = map_file(&path)?;
    let by_name: HashMap<&str, &TensorLocation> =
        list.iter().map(|l| (l.name.as_str(), l)).collect();
    let named: NamedTensors = reference::param_specs(cfg)
        .into_iter()
        .zip(values(&w, &|m: &Mat| m.to_f32()))
        .map(|((name, shape), v)| {
            // The vectors as stored (A_log not through A and back).
            let v = match by_name.get(name.as_str()) {
                Some(l) if !is_matrix(&name) => f32s(&map, l),
                _ => v,
            };
            (name, Tensor::from_vec(&shape, v))
        })
        .collect();
    reference::engine::params_from_named(cfg, &named)
}

/// Whether `dir` (or the file `dir`) holds its weights in a torch `pytorch_model.bin` (the
/// layout [`reference::io::checkpoint_layout`] decides).
fn is_torch_checkpoint(dir: &Path) -> bool {
    matches!(
        reference::io::checkpoint_layout(dir),
        Ok(reference::io::Layout::Torch(_))
    )
}

/// Builds the weights from locations in canonical parameter order.
fn assemble(
    cfg: &MambaConfig,
    dtype: WeightDtype,
    locs: &[TensorLocation],
    vecf: impl Fn(&TensorLocation) -> Vec<f32>,
    matf: impl Fn(&TensorLocation) -> Mat,
) -> Weights {
    let mut it = locs.iter();
    let mut next = || it.next().expect("locations follow param_specs");
    let embed = matf(next());
    let mut layers = Vec::with_capacity(cfg.n_layer);
    for _ in 0..cfg.n_layer {
        let norm_w = vecf(next());
        let norm_b = (cfg.norm == reference::NormKind::Layer).then(|| vecf(next()));
        let in_proj = matf(next());
        let in_proj_b = cfg.use_bias.then(|| vecf(next()));
        let conv_w = vecf(next());
        let conv_b = cfg.conv_bias.then(|| vecf(next()));
        let x_proj = matf(next());
        let dt_proj = matf(next());
        let dt_b = vecf(next());
        let a = a_from_log(&vecf(next()));
        let d = vecf(next());
        let out_proj = matf(next());
        let out_b = cfg.use_bias.then(|| vecf(next()));
        layers.push(LayerWeights {
            norm_w,
            norm_b,
            in_proj,
            in_proj_b,
            conv_w,
            conv_b,
            x_proj,
            dt_proj,
            dt_b,
            a,
            d,
            out_proj,
            out_b,
        });
    }
    let norm_f_w = vecf(next());
    let norm_f_b = (cfg.norm == reference::NormKind::Layer).then(|| vecf(next()));
    let lm_head = (!cfg.tie_embeddings).then(|| matf(next()));
    Weights {
        dtype,
        embed,
        layers,
        norm_f_w,
        norm_f_b,
        lm_head,
    }
}

/// The shapes a quantised checkpoint stores for a matrix of `shape`: the codes (I8) and the
/// scales (F32). int4 codes are the packed bytes of each row.
fn quant_shapes(kind: WeightDtype, shape: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
    match kind {
        WeightDtype::Int4 => (
            vec![rows, int4_row_bytes(cols)],
            vec![rows, int4_groups(cols)],
        ),
        _ => (shape.to_vec(), vec![rows]),
    }
}

/// A quantised checkpoint (`kind` int8 or int4): every matrix `name` as I8 codes plus
/// `name.scale` F32 (shapes: [`quant_shapes`]), every other parameter as a float tensor.
/// Checked name by name against `cfg`.
fn load_quantized(
    path: &Path,
    cfg: &MambaConfig,
    dtype: WeightDtype,
    kind: WeightDtype,
    list: Vec<TensorLocation>,
) -> reference::Result<Weights> {
    let err = |msg: String| Error::Checkpoint {
        path: path.display().to_string(),
        msg,
    };
    if dtype != kind {
        return Err(err(format!(
            "is an {0}-quantised checkpoint; load it with --dtype {0}, or without --dtype (asked: {1})",
            kind.name(),
            dtype.name()
        )));
    }
    cfg.validate()?;
    // Sizes first: an absurd config must not build a list of a million names.
    let data_len = list.iter().map(|l| l.len as u64).sum();
    // int4: half a byte a code (the scales and the f32 vectors only add to it).
    let min_bits = if kind == WeightDtype::Int4 { 4 } else { 8 };
    reference::io_limits::check_fits(path, cfg, data_len, min_bits)?;
    let by_name: HashMap<&str, &TensorLocation> =
        list.iter().map(|l| (l.name.as_str(), l)).collect();
    let specs = reference::param_specs(cfg);
    let mut problems = Vec::new();
    let mut locs = Vec::with_capacity(specs.len());
    let mut used = 0;
    for (name, shape) in &specs {
        let (want, want_shape, scale_shape) = if is_matrix(name) {
            let (q, s) = quant_shapes(kind, shape);
            (Dtype::I8, q, Some(s))
        } else {
            (Dtype::F32, shape.clone(), None)
        };
        match by_name.get(name.as_str()) {
            Some(l) if l.dtype == want && l.shape == want_shape => locs.push((*l).clone()),
            Some(l) => problems.push(format!(
                "{name}: {} {:?}, expected {want} {want_shape:?}",
                l.dtype, l.shape
            )),
            None => problems.push(format!("{name}: missing")),
        }
        used += 1;
        if let Some(ss) = scale_shape {
            let sname = format!("{name}.scale");
            match by_name.get(sname.as_str()) {
                Some(l) if l.dtype == Dtype::F32 && l.shape == ss => {}
                _ => problems.push(format!("{sname}: missing or not F32 {ss:?}")),
            }
            used += 1;
        }
    }
    if used != list.len() {
        problems.push(format!(
            "{} tensors in the file, {used} expected",
            list.len()
        ));
    }
    if !problems.is_empty() {
        return Err(err(format!(
            "does not match the config: {}",
            reference::io_limits::capped_list(&problems, "; ")
        )));
    }
    let map = map_file(path)?;
    let scale_loc = |name: &str| by_name[format!("{name}.scale").as_str()];
    let specs: HashMap<&str, &Vec<usize>> = specs.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let w = assemble(
        cfg,
        dtype,
        &locs,
        |l| f32s(&map, l),
        |l| {
            let shape = specs[l.name.as_str()];
            let (rows, cols) = (shape[0], shape[1..].iter().product());
            let n = l.shape.iter().product();
            let sl = scale_loc(&l.name);
            let data = if kind == WeightDtype::Int4 {
                let q = Buf::mapped(&map, l.offset as usize, n)
                    .unwrap_or_else(|| Buf::Owned(bytes(&map, l).to_vec()));
                let ns = sl.shape.iter().product();
                let scales = Buf::mapped(&map, sl.offset as usize, ns)
                    .filter(|_| cfg!(target_endian = "little"))
                    .unwrap_or_else(|| Buf::Owned(f32s(&map, sl)));
                MatData::Int4 { q, scales }
            } else {
                let q = Buf::mapped(&map, l.offset as usize, n).unwrap_or_else(|| {
                    Buf::Owned(bytes(&map, l).iter().map(|&b| b as i8).collect())
                });
                MatData::Int8 {
                    q,
                    scales: f32s(&map, sl),
                }
            };
            Mat { rows, cols, data }
        },
    );
    Ok(w)
}

/// Writes `w` (int8 weights) as a checkpoint directory: see [`save_quantized`].
pub fn save_int8(dir: &Path, cfg: &MambaConfig, w: &Weights) -> reference::Result<()> {
    if w.dtype != WeightDtype::Int8 {
        return Err(Error::Shape {
            op: "save_int8",
            msg: format!("the weights are {}, not int8", w.dtype.name()),
        });
    }
    save_quantized(dir, cfg, w)
}

/// Writes `w` (int8 or int4 weights) as a checkpoint directory `dir`: `config.json` and a
/// `model.safetensors` that [`load_weights`] maps without converting (int8: 4× smaller than
/// f32; int4: about 6×). Not loadable by transformers (it has no such Mamba format).
pub fn save_quantized(dir: &Path, cfg: &MambaConfig, w: &Weights) -> reference::Result<()> {
    let tag = match w.dtype {
        WeightDtype::Int8 => QUANT_INT8,
        WeightDtype::Int4 => QUANT_INT4,
        other => {
            return Err(Error::Shape {
                op: "save_quantized",
                msg: format!("the weights are {}, not int8 or int4", other.name()),
            })
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let vals = values(w, &|_| Vec::new());
    let mut mi = matrices(w).into_iter();
    let mut out = Vec::with_capacity(vals.len() * 2);
    for ((name, shape), v) in reference::param_specs(cfg).into_iter().zip(vals) {
        if is_matrix(&name) {
            let m = mi.next().expect("one matrix per matrix name");
            let (qs, ss) = quant_shapes(w.dtype, &shape);
            let (data, scales) = match &m.data {
                MatData::Int8 { q, scales } => (q.as_slice().to_vec(), scales.clone()),
                MatData::Int4 { q, scales } => (
                    q.as_slice().iter().map(|&b| b as i8).collect(),
                    scales.as_slice().to_vec(),
                ),
                _ => unreachable!("checked int8 / int4 above"),
            };
            out.push((name.clone(), TensorOut::I8 { shape: qs, data }));
            let scale = TensorOut::F32 {
                shape: ss,
                data: scales,
            };
            out.push((format!("{name}.scale"), scale));
        } else {
            out.push((name, TensorOut::F32 { shape, data: v }));
        }
    }
    cfg.save(&dir.join("config.json"))?;
    write_tensors_with_metadata(&dir.join("model.safetensors"), &out, &[(QUANT_KEY, tag)])
}

/// The matrices of `w` in canonical parameter order.
fn matrices(w: &Weights) -> Vec<&Mat> {
    let mut v = vec![&w.embed];
    for l in &w.layers {
        v.extend([&l.in_proj, &l.x_proj, &l.dt_proj, &l.out_proj]);
    }
    v.extend(w.lm_head.as_ref());
    v
}

fn bytes<'a>(map: &'a Mmap, l: &TensorLocation) -> &'a [u8] {
    &map[l.offset as usize..l.offset as usize + l.len]
}

fn f32s(map: &Mmap, l: &TensorLocation) -> Vec<f32> {
    bytes_to_f32(bytes(map, l), l.dtype)
}

/// Maps the file's bytes when their precision is the one asked for (and aligned on a
/// little-endian machine); converts otherwise.
fn mat(map: &Arc<Mmap>, l: &TensorLocation, dtype: WeightDtype) -> Mat {
    let rows = l.shape[0];
    let cols = l.shape.iter().skip(1).product();
    let n = rows * cols;
    let le = cfg!(target_endian = "little");
    let off = l.offset as usize;
    let data = match (dtype, l.dtype) {
        (WeightDtype::F32, Dtype::F32) if le => Buf::mapped(map, off, n).map(MatData::F32),
        (WeightDtype::Bf16, Dtype::BF16) if le => Buf::mapped(map, off, n).map(MatData::Bf16),
        _ => None,
    };
    match data {
        Some(data) => Mat { rows, cols, data },
        None => Mat::from_f32(rows, cols, f32s(map, l), dtype),
    }
}

/// The weights as named f32 tensors in canonical order (dequantised where stored in less).
pub fn weights_to_named(cfg: &MambaConfig, w: &Weights) -> NamedTensors {
    reference::param_specs(cfg)
        .into_iter()
        .zip(values(w, &|m: &Mat| m.to_f32()))
        .map(|((n, shape), v)| (n, Tensor::from_vec(&shape, v)))
        .collect()
}

/// Every parameter's values in canonical order, matrices through `mat`.
fn values(w: &Weights, mat: &dyn Fn(&Mat) -> Vec<f32>) -> Vec<Vec<f32>> {
    let mut vals: Vec<Vec<f32>> = vec![mat(&w.embed)];
    for l in &w.layers {
        vals.push(l.norm_w.clone());
        vals.extend(l.norm_b.clone());
        vals.push(mat(&l.in_proj));
        vals.extend(l.in_proj_b.clone());
        vals.push(l.conv_w.clone());
        vals.extend(l.conv_b.clone());
        vals.push(mat(&l.x_proj));
        vals.push(mat(&l.dt_proj));
        vals.push(l.dt_b.clone());
        // A_log = ln(−A): exact inverse of the load up to one rounding.
        vals.push(l.a.iter().map(|&a| libm::logf(-a)).collect());
        vals.push(l.d.clone());
        vals.push(mat(&l.out_proj));
        vals.extend(l.out_b.clone());
    }
    vals.push(w.norm_f_w.clone());
    vals.extend(w.norm_f_b.clone());
    if let Some(h) = &w.lm_head {
        vals.push(mat(h));
    }
    vals
}
