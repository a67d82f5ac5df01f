//! Activation buffers of one call shape (batch × seq_len), training or inference.

use std::sync::Arc;

use reference::{MambaConfig, Result};

use crate::cuda::{Buf, Dev};
use crate::kernels::{scan_blocks, KernelShape};
use crate::ops::selective_scan::{scan_fwd_segments, scan_seg_count, scan_seg_floats};

/// What a workspace is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Keeps every layer's activations for the backward.
    Train,
    /// One set of layer buffers reused by every layer; `head_rows` rows through the lm_head.
    Infer { head_rows: usize },
}

/// Activations one layer keeps for the backward (`Mode::Train`), or the scratch every layer
/// reuses (`Mode::Infer`). The backward recomputes the rest from these: the conv output and
/// its SiLU (from `xz`) and dt_proj's output (from `xdbl`) into the shared [`Work::u`],
/// [`Work::xs`] and [`Work::delta`], with the same kernels on the same inputs, so the same bits.
///
/// A low-precision training workspace (bf16 / fp16, [`Work::lean`]) keeps `xz` in the GEMM
/// precision (the forward rounds in_proj's output and reads the rounded values through
/// [`Work::xz32`], the backward widens them back there) and keeps no gated output: the scan's
/// backward recomputes it into [`Work::gated_lp`] for out_proj's weight gradient. It also
/// keeps the residual entering each layer in that precision (the norm's backward reads it
/// widened, with the forward's f32 statistics); the f32 stream runs through [`Work::resid32`].
pub struct LayerActs {
    /// Residual stream entering the layer `[n, d_model]`: f32, or in a lean workspace its
    /// bf16 / fp16 copy (the stream itself stays f32 in [`Work::resid32`]).
    pub resid_in: Buf,
    pub mean: Buf,
    pub rstd: Buf,
    /// in_proj output `[n, 2 d_inner]` (x then z): f32, or u16 in a lean workspace.
    pub xz: Buf,
    /// x_proj output `[n, dt_rank + 2 d_state]`.
    pub xdbl: Buf,
    /// Gated scan output `[n, d_inner]` f32 (empty in a lean workspace: see
    /// [`Work::gated_lp`]).
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

impl GradWork {
    /// The backward's buffers for `batch` rows of `n / batch` positions; `lean`: a lean
    /// workspace (ddelta in 2 bytes), `lean_dxz`: d_xz too (see `Work::new`).
    fn new(
        dev: &Arc<Dev>,
        cfg: &MambaConfig,
        batch: usize,
        n: usize,
        (lean, lean_dxz): (bool, bool),
        n_seg: usize,
    ) -> Result<GradWork> {
        let (dm, di, ds, xr) = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.x_proj_rows());
        let f = |k: usize| dev.alloc(4 * k);
        let (n_rb, _) = row_blocks(n);
        let nblk = scan_blocks(di);
        let st_conv = cfg.n_layer * batch * di * (cfg.d_conv - 1);
        Ok(GradWork {
            d_resid: f(n * dm)?,
            d_hn: f(n * dm)?,
            d_gated: f(n * di)?,
            d_xs: f(n * di)?,
            // A lean workspace's scan backward writes ddelta in the GEMM precision.
            d_delta: dev.alloc(if lean { 2 * n * di } else { 4 * n * di })?,
            // A lean workspace without in_proj bias takes d_xz in the GEMM precision only.
            d_xz: dev.alloc(if lean_dxz { 2 } else { 4 } * n * 2 * di)?,
            d_xdbl: f(n * xr)?,
            part_bc: f(nblk * n * 2 * ds)?,
            // One partial per (scan segment, batch row).
            part_a: f(n_seg * batch * di * ds)?,
            part_d: f(n_seg * batch * di)?,
            part_db: f(n_seg * batch * di)?,
            colpart: f(n_rb * (2 * di).max(dm).max(di * cfg.d_conv))?,
            colpart_b: f(n_rb * di.max(dm))?,
            gstate_conv: f(st_conv)?,
            gstate_ssm: f(cfg.n_layer * batch * di * ds)?,
            targets: dev.alloc(4 * n)?,
            mask: dev.alloc(n)?,
            row_loss: f(n)?,
        })
    }
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
    /// Lean workspaces: the f32 residual stream of the layer at hand `[n, d_model]`
    /// (forward), or the layer's kept residual widened (backward); else empty.
    pub resid32: Buf,
    /// The layer norm's f32 output (empty in a lean workspace: the GEMMs read its copy).
    pub hn: Buf,
    pub xs: Buf,
    pub out: Buf,
    pub hf: Buf,
    pub fmean: Buf,
    pub frstd: Buf,
    /// The lm_head's output: `[head_rows, vocab]`, or in training `[ce_rows, vocab]`, one
    /// chunk of rows at a time (`head_loss.rs`): the `[n, vocab]` logits never exist at once.
    pub logits: Buf,
    /// Rows per chunk of the training head + loss ([`ce_chunk_rows`]).
    pub ce_rows: usize,
    /// Conv output before SiLU `[n, d_inner]` of the layer at hand (forward, or recomputed in
    /// the backward).
    pub u: Buf,
    /// dt_proj output (no bias) `[n, d_inner]` of the layer at hand.
    pub delta: Buf,
    /// Lean workspaces ([`Work::lean`]): in_proj's f32 output of the layer at hand
    /// `[n, 2 d_inner]`, rounded to the stored precision (forward), or widened from the
    /// layer's stored `xz` (backward); else empty.
    pub xz32: Buf,
    /// Lean workspaces: the gated scan output of the layer at hand in the GEMM precision
    /// `[n, d_inner]` u16 (the forward's scan writes it for out_proj, the backward's for its
    /// weight gradient); else empty.
    pub gated_lp: Buf,
    /// The conv's SiLU output in the GEMM precision (bf16 / fp16 modes, `[n, d_inner]` u16;
    /// else unused), written by the conv kernel for x_proj and its weight gradient.
    pub xs_lp: Buf,
    pub state_in_conv: Buf,
    pub state_in_ssm: Buf,
    pub state_out_conv: Buf,
    pub state_out_ssm: Buf,
    /// Positions per segment of the scan, forward and backward (0: one; [`scan_fwd_segments`]).
    pub seg_len: usize,
    /// The segments' maps of the state (forward) or of its gradient (backward): `seg_p` then
    /// `seg_q`, [`scan_seg_floats`] f32 each.
    pub seg: Buf,
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

/// f32 logits one chunk of the training head may hold (256 MiB: at the 1.4B's 16,384 rows
/// and its vocabulary, 13 chunks of 1,280 rows, each GEMM still 0.27 TFLOP).
const CE_CHUNK_BYTES: usize = 256 << 20;

/// Rows per chunk of the training head + loss for `n` rows and `vocab`: `VET_CE_ROWS` if set
/// (a positive integer; tests use it to cut small batches into many chunks), else as many
/// rows as fit [`CE_CHUNK_BYTES`] of f32 logits, a multiple of 64 when above 64; at most `n`.
pub fn ce_chunk_rows(n: usize, vocab: usize) -> Result<usize> {
    parse_ce_rows(std::env::var("VET_CE_ROWS").ok().as_deref(), n, vocab)
}

/// [`ce_chunk_rows`] with the variable's value given.
pub fn parse_ce_rows(value: Option<&str>, n: usize, vocab: usize) -> Result<usize> {
    let rows = match value.filter(|v| !v.is_empty()) {
        Some(v) => match v.trim().parse::<usize>() {
            Ok(r) if r > 0 => r,
            _ => {
                return Err(reference::Error::Device {
                    device: "cuda".into(),
                    msg: format!(
                        "environment variable VET_CE_ROWS={v:?} is not valid: expected a positive integer"
                    ),
                })
            }
        },
        None => {
            let r = (CE_CHUNK_BYTES / (4 * vocab.max(1))).max(1);
            if r > 64 {
                r / 64 * 64
            } else {
                r
            }
        }
    };
    Ok(rows.min(n).max(1))
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
        // A lean workspace keeps xz in 2 bytes and no gated output.
        let lean = train && lowp;
        // The backward then writes d_xz straight in the GEMM precision (no f32 copy, no cast
        // into `lp`), unless in_proj's bias gradient reads it (`Backward::lp_dxz`).
        let lean_dxz = lean && !cfg.use_bias;
        let (xz_bytes, gated_bytes, resid_bytes) = if lean {
            (2 * n * 2 * di, 0, 2 * n * dm)
        } else {
            (4 * n * 2 * di, 4 * n * di, 4 * n * dm)
        };
        for _ in 0..n_layers {
            layers.push(LayerActs {
                resid_in: dev.alloc(resid_bytes)?,
                mean: f(n)?,
                rstd: f(n)?,
                xz: dev.alloc(xz_bytes)?,
                xdbl: f(n * xr)?,
                gated: dev.alloc(gated_bytes)?,
                chunks: if train {
                    Some(f(batch * n_chunks * di * ds)?)
                } else {
                    None
                },
            });
        }
        let (head_rows, ce_rows) = match mode {
            Mode::Train => {
                let r = ce_chunk_rows(n, v)?;
                (r, r)
            }
            Mode::Infer { head_rows } => (head_rows, 0),
        };
        let st_conv = cfg.n_layer * batch * di * km1;
        let st_ssm = cfg.n_layer * batch * di * ds;
        let seg_len = scan_fwd_segments(dev.sm_count, batch, seq_len, di, shape.chunk)?;
        let grad = if train {
            let n_seg = scan_seg_count(seq_len, seg_len);
            Some(GradWork::new(dev, cfg, batch, n, (lean, lean_dxz), n_seg)?)
        } else {
            None
        };
        let lp = if lowp {
            // The largest operand a GEMM casts, or (training) one chunk's gradient of the
            // logits, which the loss kernel writes into slot 0.
            let widest = if lean_dxz {
                dm.max(xr)
            } else {
                (2 * di).max(dm).max(xr)
            };
            let big = match mode {
                Mode::Train => (n * widest).max(ce_rows * v),
                Mode::Infer { .. } => n * v.max(2 * di).max(dm).max(xr),
            };
            vec![dev.alloc(2 * big)?, dev.alloc(2 * big)?]
        } else {
            Vec::new()
        };
        let seg_floats = scan_seg_floats(batch, seq_len, di, ds, seg_len);
        Ok(Work {
            batch,
            seq_len,
            mode,
            n,
            tokens: dev.alloc(4 * n)?,
            starts: dev.alloc(4 * n)?,
            layers,
            resid_final: f(n * dm)?,
            resid32: f(if lean { n * dm } else { 0 })?,
            hn: f(if lean { 0 } else { n * dm })?,
            xs: f(n * di)?,
            out: f(n * dm)?,
            hf: f(n * dm)?,
            fmean: f(n)?,
            frstd: f(n)?,
            logits: f(head_rows * v)?,
            ce_rows,
            u: f(n * di)?,
            delta: f(n * di)?,
            xz32: f(if lean { n * 2 * di } else { 0 })?,
            gated_lp: dev.alloc(if lean { 2 * n * di } else { 0 })?,
            xs_lp: dev.alloc(if lowp { 2 * n * di } else { 0 })?,
            state_in_conv: f(st_conv)?,
            state_in_ssm: f(st_ssm)?,
            state_out_conv: f(st_conv)?,
            state_out_ssm: f(st_ssm)?,
            seg_len,
            seg: f(2 * seg_floats)?,
            lp,
            grad,
        })
    }

    /// The scan segments' two map buffers (`seg_p`, `seg_q`) inside [`Work::seg`].
    pub fn seg_maps(&self) -> (crate::params::PtrMut<f32>, crate::params::PtrMut<f32>) {
        use crate::params::PtrMut;
        (
            PtrMut::new(self.seg.ptr),
            PtrMut::new(self.seg.at::<f32>(self.seg.bytes / 8)),
        )
    }

    /// A training workspace in bf16 / fp16: the layers keep `xz` in that precision and no
    /// gated output (see [`LayerActs`]).
    pub fn lean(&self) -> bool {
        self.mode == Mode::Train && self.xz32.bytes > 0
    }

    /// Device address of the f32 in_proj output of layer `la` as the conv and the scan read
    /// it: the layer's own `xz`, or in a lean workspace [`Work::xz32`].
    pub fn xz_f32(&self, la: &LayerActs) -> u64 {
        if self.lean() {
            self.xz32.ptr
        } else {
            la.xz.ptr
        }
    }

    /// Device address of the f32 residual entering layer `la` as the forward reads and
    /// writes it: the layer's own `resid_in`, or in a lean workspace [`Work::resid32`].
    pub fn resid_f32(&self, la: &LayerActs) -> u64 {
        if self.lean() {
            self.resid32.ptr
        } else {
            la.resid_in.ptr
        }
    }

    /// Activation bytes per token this workspace holds (all buffers but the logits, the
    /// low-precision copies, the states and the layers' shared scratch).
    pub fn activation_bytes_per_token(&self) -> f64 {
        let mut b = 0usize;
        for l in &self.layers {
            b += self.layer_bytes(l);
        }
        b += self.resid_final.bytes + self.hf.bytes + self.fmean.bytes + self.frstd.bytes;
        b as f64 / self.n.max(1) as f64
    }

    /// Bytes per token one layer keeps for the backward (the first layer's; all are alike).
    pub fn layer_bytes_per_token(&self) -> f64 {
        self.layers
            .first()
            .map_or(0.0, |l| self.layer_bytes(l) as f64 / self.n.max(1) as f64)
    }

    /// Bytes of every buffer of this workspace: (kept by the layers for the backward, all
    /// the rest: shared scratch, logits chunk, low-precision copies, states, gradients' work).
    pub fn bytes(&self) -> (usize, usize) {
        let layers: usize = self.layers.iter().map(|l| self.layer_bytes(l)).sum();
        let mut rest = [
            &self.tokens,
            &self.starts,
            &self.resid_final,
            &self.resid32,
            &self.hn,
            &self.xs,
            &self.out,
            &self.hf,
            &self.fmean,
            &self.frstd,
            &self.logits,
            &self.u,
            &self.delta,
            &self.xz32,
            &self.gated_lp,
            &self.xs_lp,
            &self.state_in_conv,
            &self.state_in_ssm,
            &self.state_out_conv,
            &self.state_out_ssm,
        ]
        .iter()
        .map(|b| b.bytes)
        .sum::<usize>();
        rest += self.lp.iter().map(|b| b.bytes).sum::<usize>();
        if let Some(g) = &self.grad {
            rest += [
                &g.d_resid,
                &g.d_hn,
                &g.d_gated,
                &g.d_xs,
                &g.d_delta,
                &g.d_xz,
                &g.d_xdbl,
                &g.part_bc,
                &g.part_a,
                &g.part_d,
                &g.part_db,
                &g.colpart,
                &g.colpart_b,
                &g.gstate_conv,
                &g.gstate_ssm,
                &g.targets,
                &g.mask,
                &g.row_loss,
            ]
            .iter()
            .map(|b| b.bytes)
            .sum::<usize>();
        }
        (layers, rest)
    }

    fn layer_bytes(&self, l: &LayerActs) -> usize {
        let b = l.resid_in.bytes + l.mean.bytes + l.rstd.bytes + l.xz.bytes;
        b + l.xdbl.bytes + l.gated.bytes + l.chunks.as_ref().map_or(0, |c| c.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ce_rows;

    #[test]
    fn head_chunks_fit_256_mib_of_logits_unless_told() {
        // 256 MiB / (4 × 50280) = 1334.8 rows, rounded down to a multiple of 64.
        assert_eq!(parse_ce_rows(None, 32768, 50280).unwrap(), 1280);
        assert_eq!(parse_ce_rows(Some(""), 100, 50280).unwrap(), 100);
        assert_eq!(parse_ce_rows(Some("3"), 134, 301).unwrap(), 3);
        assert_eq!(parse_ce_rows(Some("500"), 134, 301).unwrap(), 134);
        for bad in ["0", "-2", "many"] {
            let e = parse_ce_rows(Some(bad), 10, 10).unwrap_err().to_string();
            assert!(e.contains("VET_CE_ROWS"), "{e}");
        }
    }
}
