//! Loading a checkpoint directory into [`Weights`], memory-mapping the matrices whose file
//! precision is the one asked for.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use reference::engine::NamedTensors;
use reference::io::{bytes_to_f32, locate_params, Dtype, TensorLocation};
use reference::{Error, MambaConfig, Tensor};

use crate::model::{a_from_log, LayerWeights, Weights};
use crate::weights::{Buf, Mat, MatData};
use crate::WeightDtype;

/// Opens `dir/model.safetensors` (checked against `cfg` like `reference::io::load_params`)
/// and builds the weights in `dtype`.
pub fn load_weights(
    dir: &Path,
    cfg: &MambaConfig,
    dtype: WeightDtype,
) -> reference::Result<Weights> {
    let (path, locs) = locate_params(dir, cfg)?;
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    // SAFETY: the map is read-only; a checkpoint rewritten under a running process is the
    // same hazard as for every mmap-based loader (llama.cpp, safetensors), and checkpoints
    // are written by rename, never in place.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?);
    let mut it = locs.iter();
    let mut next = || it.next().expect("locate_params follows param_specs");
    let vecf = |l: &TensorLocation| f32s(&map, l);
    let matf = |l: &TensorLocation| mat(&map, l, dtype);
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
    Ok(Weights {
        dtype,
        embed,
        layers,
        norm_f_w,
        norm_f_b,
        lm_head,
    })
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
    let specs = reference::param_specs(cfg);
    let mut vals: Vec<Vec<f32>> = vec![w.embed.to_f32()];
    for l in &w.layers {
        vals.push(l.norm_w.clone());
        vals.extend(l.norm_b.clone());
        vals.push(l.in_proj.to_f32());
        vals.extend(l.in_proj_b.clone());
        vals.push(l.conv_w.clone());
        vals.extend(l.conv_b.clone());
        vals.push(l.x_proj.to_f32());
        vals.push(l.dt_proj.to_f32());
        vals.push(l.dt_b.clone());
        // A_log = ln(−A): exact inverse of the load up to one rounding.
        vals.push(l.a.iter().map(|&a| libm::logf(-a)).collect());
        vals.push(l.d.clone());
        vals.push(l.out_proj.to_f32());
        vals.extend(l.out_b.clone());
    }
    vals.push(w.norm_f_w.clone());
    vals.extend(w.norm_f_b.clone());
    if let Some(h) = &w.lm_head {
        vals.push(h.to_f32());
    }
    specs
        .into_iter()
        .zip(vals)
        .map(|((n, shape), v)| (n, Tensor::from_vec(&shape, v)))
        .collect()
}
