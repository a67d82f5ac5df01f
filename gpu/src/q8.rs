//! int8 weights for generation ([`GpuEngine::quantize_int8`]): every layer's in_proj, x_proj
//! and out_proj stored as int8 rows with one f32 scale per row, which the decode step's GEMVs
//! read instead of the bf16 / fp16 shadow: half the bytes a token. The f32 parameters and the
//! shadow are set to the dequantised values `q · scale`, so the paths that still use cuBLAS
//! (prefill, batches above `GEMV_ROWS`) run the same model, rounded once more to the GEMM
//! precision. dt_proj, the conv, the norms, the embedding and the lm_head stay as they were.

use reference::{Error, Result};

use crate::cuda::Buf;
use crate::engine::GpuEngine;
use crate::layout::LayerOffs;

/// Byte alignment of each matrix's codes in [`Q8::q`] (the GEMVs load 16 bytes at a time).
const ALIGN: usize = 256;

/// One quantised matrix: its parameter offset and shape, and where its codes and scales lie.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Q8Mat {
    pub off: usize,
    pub rows: usize,
    pub cols: usize,
    /// Byte offset of its codes in [`Q8::q`] (row `r` at `q_off + r · cols`).
    pub q_off: usize,
    /// Element offset of its scales in [`Q8::scales`].
    pub s_off: usize,
}

/// The int8 copies of the quantised matrices.
pub(crate) struct Q8 {
    pub q: Buf,
    pub scales: Buf,
    /// Sorted by parameter offset.
    pub mats: Vec<Q8Mat>,
}

impl Q8 {
    /// The quantised matrix at parameter offset `off`, if any.
    pub fn find(&self, off: usize) -> Option<&Q8Mat> {
        self.mats
            .binary_search_by_key(&off, |m| m.off)
            .ok()
            .map(|i| &self.mats[i])
    }

    /// Device addresses of `m`'s codes and scales.
    pub fn ptrs(&self, m: &Q8Mat) -> (u64, u64) {
        (self.q.at::<i8>(m.q_off), self.scales.at::<f32>(m.s_off))
    }

    /// Device bytes of the codes and the scales.
    pub fn bytes(&self) -> usize {
        self.q.bytes + self.scales.bytes
    }
}

/// Where each layer's in_proj, x_proj and out_proj (`(d_model, d_inner, x_proj rows)` wide)
/// go: codes layer after layer, each matrix starting on a multiple of [`ALIGN`] bytes, scales
/// one a row in the same order; `decode_layers_lp_q8` computes the same offsets from the
/// shapes. Returns the matrices sorted by parameter offset, and the bytes of codes and the
/// scales in all.
fn plan(layers: &[LayerOffs], (dm, di, xr): (usize, usize, usize)) -> (Vec<Q8Mat>, usize, usize) {
    let mut mats = Vec::new();
    let (mut qn, mut sn) = (0usize, 0usize);
    for lo in layers {
        for (off, rows, cols) in [(lo.in_w, 2 * di, dm), (lo.x_w, xr, di), (lo.out_w, dm, di)] {
            mats.push(Q8Mat {
                off,
                rows,
                cols,
                q_off: qn,
                s_off: sn,
            });
            qn += (rows * cols).next_multiple_of(ALIGN);
            sn += rows;
        }
    }
    mats.sort_by_key(|x| x.off);
    (mats, qn, sn)
}

/// Quantises the rows of `w` (`rows × cols`) into `q` and `s` with `quantize_row`, on every
/// core, and overwrites `w` with the dequantised values `q · s`.
fn quantize_mat(
    w: &mut [f32],
    cols: usize,
    q: &mut [i8],
    s: &mut [f32],
    quantize_row: fn(&[f32], &mut [i8]) -> f32,
) {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let rows = s.len();
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        let parts = w
            .chunks_mut(per * cols)
            .zip(q.chunks_mut(per * cols))
            .zip(s.chunks_mut(per));
        for ((w, q), s) in parts {
            sc.spawn(move || {
                for ((wr, qr), sr) in w.chunks_mut(cols).zip(q.chunks_mut(cols)).zip(s) {
                    *sr = quantize_row(wr, qr);
                    for (v, &c) in wr.iter_mut().zip(qr.iter()) {
                        *v = c as f32 * *sr;
                    }
                }
            });
        }
    });
}

impl GpuEngine {
    /// Generates with int8 weights from now on: each row of every layer's in_proj, x_proj
    /// and out_proj is quantised by `quantize_row` (which returns the row's scale; the CPU
    /// tier's `simd::kernels::quant::quantize_row` gives the CPU tier's int8 values), and the
    /// decode step's GEMVs read the codes (half the bytes of bf16) and multiply each output by
    /// its row's scale. The f32 parameters and the low-precision shadow take the dequantised
    /// values, so prefill and cuBLAS decode (batches above `GEMV_ROWS`) run the same weights.
    /// For inference: training after this would update the f32 weights but not the codes.
    /// Needs bf16 or fp16 precision (the GEMVs' activations).
    pub fn quantize_int8(&mut self, quantize_row: fn(&[f32], &mut [i8]) -> f32) -> Result<()> {
        let m = &mut self.model;
        if m.shadow.is_none() {
            return Err(Error::Device {
                device: m.dev.name.clone(),
                msg: "int8 weights need bf16 or fp16 precision (the decode GEMVs' activations); this engine runs f32".into(),
            });
        }
        if m.q8.is_some() {
            return Ok(());
        }
        let dims = (m.cfg.d_model, m.cfg.d_inner, m.cfg.x_proj_rows());
        let (mats, qn, sn) = plan(&m.layout.layers, dims);
        let mut q = vec![0i8; qn.max(1)];
        let mut s = vec![0f32; sn.max(1)];
        let mut w = Vec::new();
        for x in &mats {
            w.resize(x.rows * x.cols, 0f32);
            m.params.read(x.off, &mut w)?;
            let (qm, sm) = (
                &mut q[x.q_off..x.q_off + x.rows * x.cols],
                &mut s[x.s_off..x.s_off + x.rows],
            );
            quantize_mat(&mut w, x.cols, qm, sm, quantize_row);
            m.params.write(x.off, &w)?;
        }
        m.refresh_shadow()?;
        m.q8 = Some(Q8 {
            q: m.dev.upload(&q)?,
            scales: m.dev.upload(&s)?,
            mats,
        });
        m.dev.sync()?;
        // A captured decode graph holds the old GEMV arguments.
        self.decoder.drop_graph();
        Ok(())
    }

    /// Whether the decode GEMVs read int8 weights ([`GpuEngine::quantize_int8`]).
    pub fn int8_weights(&self) -> bool {
        self.model.q8.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quant(w: &[f32], q: &mut [i8]) -> f32 {
        let amax = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        for (o, &v) in q.iter_mut().zip(w) {
            *o = (v / s).round() as i8;
        }
        s
    }

    /// The plan puts layer `l`'s matrices where the persistent kernel looks for them: codes
    /// at `l · q_stride` + 0, `q_x`, `q_out` and scales at `l · s_stride` + 0, `2·di`,
    /// `2·di + xr`, with the kernel's formulas (`decode_layers_lp_body`), at odd shapes too.
    #[test]
    fn the_plan_matches_the_persistent_kernels_offsets() {
        for (dm, layers) in [(768, 3), (136, 2), (2048, 4)] {
            let cfg = reference::MambaConfig::new(dm, layers, 1000);
            let lay = crate::layout::Layout::new(&cfg);
            let (di, xr) = (cfg.d_inner, cfg.x_proj_rows());
            let (mats, qn, sn) = plan(&lay.layers, (dm, di, xr));
            let up = |n: usize| n.div_ceil(256) * 256;
            let (q_x, q_out) = (up(2 * di * dm), up(2 * di * dm) + up(xr * di));
            let (q_stride, s_stride) = (q_out + up(dm * di), 2 * di + xr + dm);
            assert_eq!(
                (qn, sn),
                (layers * q_stride, layers * s_stride),
                "d_model {dm}"
            );
            for (l, lo) in lay.layers.iter().enumerate() {
                let at = |off: usize| mats.iter().find(|m| m.off == off).copied().unwrap();
                for (off, q, s) in [
                    (lo.in_w, 0, 0),
                    (lo.x_w, q_x, 2 * di),
                    (lo.out_w, q_out, 2 * di + xr),
                ] {
                    let m = at(off);
                    assert_eq!(
                        (m.q_off, m.s_off),
                        (l * q_stride + q, l * s_stride + s),
                        "d_model {dm} layer {l} matrix at {off}"
                    );
                }
            }
        }
    }

    /// Every row goes through the quantiser once, whatever the split into threads, and the
    /// weights come back as code times scale.
    #[test]
    fn every_row_is_quantised_and_dequantised_in_place() {
        for (rows, cols) in [(1, 8), (7, 5), (33, 16), (129, 3)] {
            let mut rng = reference::rng::Rng::new(rows as u64 * 1000 + cols as u64);
            let orig: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
            let mut w = orig.clone();
            let mut q = vec![0i8; rows * cols];
            let mut s = vec![0f32; rows];
            quantize_mat(&mut w, cols, &mut q, &mut s, quant);
            for r in 0..rows {
                let mut want_q = vec![0i8; cols];
                let want_s = quant(&orig[r * cols..(r + 1) * cols], &mut want_q);
                assert_eq!(s[r], want_s, "{rows}x{cols}: scale of row {r}");
                assert_eq!(&q[r * cols..(r + 1) * cols], &want_q[..], "row {r} codes");
                for j in 0..cols {
                    assert_eq!(
                        w[r * cols + j],
                        want_q[j] as f32 * want_s,
                        "row {r} col {j}"
                    );
                }
            }
        }
    }
}
