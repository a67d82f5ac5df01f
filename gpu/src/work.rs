//! Activation buffers of one call shape (batch × seq_len), training or inference.

use std::sync::Arc;

use reference::{MambaConfig, Result};

use crate::cuda::{Buf, Dev};
use crate::kernels::{scan_blocks, KernelShape};

/// What a workspace is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Keeps every layer's activations for the backward.
    Train,
    /// One set of layer buffers reused by every layer; `head_rows` rows through the lm_head.
    Infer { head_rows: usize },
}

/// Activations one layer keeps for the backward (`Mode::Train`), or the scratch every layer
/// reuses (`Mode::Infer`).
pub struct LayerActs {
    /// Residual stream entering the layer `[n, d_model]`.
    pub resid_in: Buf,
    pub mean: Buf,
    pub rstd: Buf,
    /// in_proj output `[n, 2 d_inner]` (x then z).
    pub xz: Buf,
    /// Conv output before SiLU `[n, d_inner]`.
    pub u: Buf,
    /// x_proj output `[n, dt_rank + 2 d_state]`.
    pub xdbl: Buf,
    /// dt_proj output (no bias) `[n, d_inner]`.
    pub delta: Buf,
    /// Gated scan output `[n, d_inner]`.
    pub gated: Buf,
    /// Scan states every `shape.chunk` positions `[batch, n_chunks, d_state, d_inner]`.
    pub chunks: Option<Buf>,
}

/// Buffers only the backward needs.
pub struct GradWork {
    pub d_resid: Buf,
    pub d_hn: Buf,
    pub d_gated: Buf,
    pub d_xs: Buf,
    pub d_delta: Buf,
    pub d_xz: Buf,
    pub d_xdbl: Buf,
    pub part_bc: Buf,
    pub part_a: Buf,
    pub part_d: Buf,
    pub part_db: Buf,
    pub colpart: Buf,
    pub colpart_b: Buf,
    pub gstate_conv: Buf,
    pub gstate_ssm: Buf,
    pub targets: Buf,
    pub mask: Buf,
    pub row_loss: Buf,
}

/// Every device buffer of one call shape.
pub struct Work {
    pub batch: usize,
    pub seq_len: usize,
    pub mode: Mode,
    pub n: usize,
    pub tokens: Buf,
    pub starts: Buf,
    pub layers: Vec<LayerActs>,
    pub resid_final: Buf,
    pub hn: Buf,
    pub xs: Buf,
    pub out: Buf,
    pub hf: Buf,
    pub fmean: Buf,
    pub frstd: Buf,
    pub logits: Buf,
    pub state_in_conv: Buf,
    pub state_in_ssm: Buf,
    pub state_out_conv: Buf,
    pub state_out_ssm: Buf,
    /// Low-precision copies of GEMM activation operands (bf16 / fp16 modes).
    pub lp: Vec<Buf>,
    pub grad: Option<GradWork>,
}

/// Document starts per position: `−1` while the row has not been reset since position 0.
pub fn doc_starts(resets: Option<&[bool]>, batch: usize, seq_len: usize) -> Vec<i32> {
    let mut out = vec![-1i32; batch * seq_len];
    if let Some(r) = resets {
        for b in 0..batch {
            let mut cur = -1i32;
            for t in 0..seq_len {
                if r[b * seq_len + t] {
                    cur = t as i32;
                }
                out[b * seq_len + t] = cur;
            }
        }
    }
    out
}

/// Rows per column-sum partial for `n` rows.
pub fn row_blocks(n: usize) -> (usize, usize) {
    let n_rb = n.clamp(1, 256);
    let rows_per = n.div_ceil(n_rb).max(1);
    (n.div_ceil(rows_per).max(1), rows_per)
}

impl Work {
    pub fn new(
        dev: &Arc<Dev>,
        cfg: &MambaConfig,
        shape: KernelShape,
        batch: usize,
        seq_len: usize,
        mode: Mode,
        lowp: bool,
    ) -> Result<Work> {
        let n = batch * seq_len;
        let (dm, di, ds, v) = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.vocab_size);
        let xr = cfg.x_proj_rows();
        let km1 = cfg.d_conv - 1;
        let f = |k: usize| dev.alloc(4 * k);
        let train = mode == Mode::Train;
        let n_chunks = seq_len.div_ceil(shape.chunk);
        let n_layers = if train { cfg.n_layer } else { 1 };
        let mut layers = Vec::with_capacity(n_layers);
        for _ in 0..n_layers {
            layers.push(LayerActs {
                resid_in: f(n * dm)?,
                mean: f(n)?,
                rstd: f(n)?,
                xz: f(n * 2 * di)?,
                u: f(n * di)?,
                xdbl: f(n * xr)?,
                delta: f(n * di)?,
                gated: f(n * di)?,
                chunks: if train {
                    Some(f(batch * n_chunks * di * ds)?)
                } else {
                    None
                },
            });
        }
        let head_rows = match mode {
            Mode::Train => n,
            Mode::Infer { head_rows } => head_rows,
        };
        let st_conv = cfg.n_layer * batch * di * km1;
        let st_ssm = cfg.n_layer * batch * di * ds;
        let grad = if train {
            let (n_rb, _) = row_blocks(n);
            let nblk = scan_blocks(cfg.d_inner);
            Some(GradWork {
                d_resid: f(n * dm)?,
                d_hn: f(n * dm)?,
                d_gated: f(n * di)?,
                d_xs: f(n * di)?,
                d_delta: f(n * di)?,
                d_xz: f(n * 2 * di)?,
                d_xdbl: f(n * xr)?,
                part_bc: f(nblk * n * 2 * ds)?,
                part_a: f(batch * di * ds)?,
                part_d: f(batch * di)?,
                part_db: f(batch * di)?,
                colpart: f(n_rb * (2 * di).max(dm).max(di * cfg.d_conv))?,
                colpart_b: f(n_rb * di.max(dm))?,
                gstate_conv: f(st_conv)?,
                gstate_ssm: f(st_ssm)?,
                targets: dev.alloc(4 * n)?,
                mask: dev.alloc(n)?,
                row_loss: f(n)?,
            })
        } else {
            None
        };
        let lp = if lowp {
            let big = n * v.max(2 * di).max(dm).max(xr);
            vec![dev.alloc(2 * big)?, dev.alloc(2 * big)?]
        } else {
            Vec::new()
        };
        Ok(Work {
            batch,
            seq_len,
            mode,
            n,
            tokens: dev.alloc(4 * n)?,
            starts: dev.alloc(4 * n)?,
            layers,
            resid_final: f(n * dm)?,
            hn: f(n * dm)?,
            xs: f(n * di)?,
            out: f(n * dm)?,
            hf: f(n * dm)?,
            fmean: f(n)?,
            frstd: f(n)?,
            logits: f(head_rows * v)?,
            state_in_conv: f(st_conv)?,
            state_in_ssm: f(st_ssm)?,
            state_out_conv: f(st_conv)?,
            state_out_ssm: f(st_ssm)?,
            lp,
            grad,
        })
    }

    /// Activation bytes per token this workspace holds (all buffers but the logits, the
    /// low-precision copies and the states).
    pub fn activation_bytes_per_token(&self) -> f64 {
        let mut b = 0usize;
        for l in &self.layers {
            b += l.resid_in.bytes + l.mean.bytes + l.rstd.bytes + l.xz.bytes + l.u.bytes;
            b += l.xdbl.bytes + l.delta.bytes + l.gated.bytes;
            b += l.chunks.as_ref().map_or(0, |c| c.bytes);
        }
        b += self.resid_final.bytes + self.hf.bytes + self.fmean.bytes + self.frstd.bytes;
        b as f64 / self.n.max(1) as f64
    }
}
