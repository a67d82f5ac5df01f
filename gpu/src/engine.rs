//! `GpuEngine`: the model on one CUDA device. Parameters, gradients and AdamW moments live in
//! flat f32 buffers (offsets in [`Layout`]); bf16 / fp16 modes keep a low-precision shadow of
//! the parameters for the GEMMs and convert activation operands on the fly. The scan state, the
//! residual stream, `A_log` and `D` are f32 throughout.

use std::sync::Arc;

use reference::model::Batch;
use reference::{MambaConfig, NormKind, Result, State};

use crate::cuda::{Arg, Buf, Dev, Dt};
use crate::kernels::{scan_bwd_smem, KernelShape};
use crate::layout::{LayerOffs, Layout};
use crate::work::{row_blocks, scan_blocks, LayerActs, Mode, Work};
use crate::Precision;

/// A GEMM operand: a parameter (element offset, row stride) or an activation (pointer, row
/// stride, rows, cols) that bf16 / fp16 modes convert first.
#[derive(Clone, Copy, Debug)]
pub enum Opnd {
    W(usize, usize),
    A(u64, usize, usize, usize),
    /// An activation a kernel already wrote in the GEMM's low precision (pointer, row
    /// stride); only in bf16 / fp16 modes.
    Lp(u64, usize),
}

pub struct GpuEngine {
    pub cfg: MambaConfig,
    pub dev: Arc<Dev>,
    pub precision: Precision,
    pub shape: KernelShape,
    pub layout: Layout,
    pub params: Buf,
    pub grads: Buf,
    pub m: Buf,
    pub v: Buf,
    /// Low-precision copy of `params` (bf16 / fp16 modes).
    pub shadow: Option<Buf>,
    pub opt_step: u64,
    /// Σ grad_scale since `zero_grad`: the loss scale fp16 mode divides out in the step.
    pub grad_scale_sum: f64,
    pub norm_part: Buf,
    pub norm_out: Buf,
    pub train_ws: Option<Work>,
    pub infer_ws: Option<Work>,
    pub decode_ws: Option<Work>,
    pub graph: Option<crate::graph::DecodeGraph>,
    /// The state decode steps run on in device memory (`InferenceEngine::hold_state`).
    pub held: Option<crate::decode::Held>,
    /// Tickets handed out so far.
    pub next_held: u64,
}

/// Blocks of the gradient-norm reduction (fixed, so the order never depends on the device).
pub const NORM_BLOCKS: usize = 1024;

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

impl GpuEngine {
    pub fn dt(&self) -> Dt {
        match self.precision {
            Precision::F32 => Dt::F32,
            Precision::Bf16 => Dt::Bf16,
            Precision::Fp16 => Dt::F16,
        }
    }

    pub fn p(&self, off: usize) -> u64 {
        self.params.at::<f32>(off)
    }

    pub fn g(&self, off: usize) -> u64 {
        self.grads.at::<f32>(off)
    }

    /// Converts the parameters into the low-precision shadow.
    pub fn refresh_shadow(&self) -> Result<()> {
        if let Some(s) = &self.shadow {
            let n = self.layout.numel;
            let mode = if self.precision == Precision::Fp16 {
                1
            } else {
                0
            };
            self.dev.launch(
                "cast_lowp_f32",
                self.dev.grid1d(n),
                256,
                0,
                &[
                    Arg::P(self.params.ptr),
                    Arg::L(1),
                    Arg::L(n as i64),
                    Arg::L(1),
                    Arg::P(s.ptr),
                    Arg::I(mode),
                ],
            )?;
        }
        Ok(())
    }

    fn operand(&self, ws: &Work, o: Opnd, slot: usize) -> Result<(u64, usize)> {
        match (o, &self.shadow) {
            (Opnd::W(off, ld), None) => Ok((self.p(off), ld)),
            (Opnd::W(off, ld), Some(s)) => Ok((s.at::<u16>(off), ld)),
            (Opnd::Lp(ptr, ld), _) => Ok((ptr, ld)),
            (Opnd::A(ptr, ld, _, _), None) => Ok((ptr, ld)),
            (Opnd::A(ptr, ld, rows, cols), Some(_)) => {
                let dst = &ws.lp[slot];
                let mode = if self.precision == Precision::Fp16 {
                    1
                } else {
                    0
                };
                self.dev.launch(
                    "cast_lowp_f32",
                    self.dev.grid1d(rows * cols),
                    256,
                    0,
                    &[
                        Arg::P(ptr),
                        Arg::L(ld as i64),
                        Arg::L(rows as i64),
                        Arg::L(cols as i64),
                        Arg::P(dst.ptr),
                        Arg::I(mode),
                    ],
                )?;
                Ok((dst.ptr, cols))
            }
        }
    }

    /// Layer input of `rows` rows: `resid_in = x_in + add` (fused), the norm into `ws.hn`,
    /// in_proj (+ bias) into `la.xz`.
    pub(crate) fn norm_in_proj(
        &self,
        ws: &Work,
        la: &LayerActs,
        lo: &LayerOffs,
        rows: usize,
        x_in: u64,
        add: u64,
    ) -> Result<()> {
        let (dm, di) = (self.cfg.d_model, self.cfg.d_inner);
        let (hn_lp, hn) = self.lp_out(ws, ws.hn.ptr, dm, rows, dm);
        self.norm_fwd(
            rows,
            x_in,
            add,
            la.resid_in.ptr,
            ws.hn.ptr,
            la.mean.ptr,
            la.rstd.ptr,
            lo.norm_w,
            lo.norm_b,
            hn_lp,
        )?;
        self.mm(
            ws,
            true,
            false,
            (2 * di, rows, dm),
            Opnd::W(lo.in_w, dm),
            hn,
            (la.xz.ptr, 2 * di),
            0.0,
        )?;
        self.bias_add(la.xz.ptr, 2 * di, rows, 2 * di, lo.in_b)
    }

    /// x_proj of `xs` (`rows` rows) into `la.xdbl` (dt, B, C), then dt_proj of its dt columns
    /// into `la.delta` (no bias: the scan adds it).
    pub(crate) fn x_dt_proj(
        &self,
        ws: &Work,
        la: &LayerActs,
        lo: &LayerOffs,
        rows: usize,
        xs: Opnd,
    ) -> Result<()> {
        let (di, r, xr) = (self.cfg.d_inner, self.cfg.dt_rank, self.cfg.x_proj_rows());
        self.mm(
            ws,
            true,
            false,
            (xr, rows, di),
            Opnd::W(lo.x_w, di),
            xs,
            (la.xdbl.ptr, xr),
            0.0,
        )?;
        self.mm(
            ws,
            true,
            false,
            (di, rows, r),
            Opnd::W(lo.dt_w, r),
            Opnd::A(la.xdbl.ptr, xr, rows, r),
            (la.delta.ptr, di),
            0.0,
        )
    }

    /// The leading arguments of the conv kernels (`conv1d_fwd_f32`, `conv_update_f32`): the x
    /// half of xz and its row stride, the conv weight and bias, the reset flags.
    pub(crate) fn conv_in_args(&self, ws: &Work, la: &LayerActs, lo: &LayerOffs) -> [Arg; 5] {
        [
            Arg::P(la.xz.ptr),
            Arg::L(2 * self.cfg.d_inner as i64),
            Arg::P(self.p(lo.conv_w)),
            Arg::P(lo.conv_b.map_or(0, |o| self.p(o))),
            Arg::P(ws.starts.ptr),
        ]
    }

    /// The arguments every scan kernel (forward, backward, decode update) starts with: x (the
    /// conv output after SiLU), delta, A_log, B and C inside x_proj's output (row stride,
    /// column of B), D, z inside in_proj's output (row stride), the dt bias, document starts.
    pub(crate) fn scan_in_args(&self, ws: &Work, la: &LayerActs, lo: &LayerOffs) -> [Arg; 11] {
        let (di, r) = (self.cfg.d_inner, self.cfg.dt_rank);
        [
            Arg::P(ws.xs.ptr),
            Arg::P(la.delta.ptr),
            Arg::P(self.p(lo.a_log)),
            Arg::P(la.xdbl.ptr),
            Arg::L(self.cfg.x_proj_rows() as i64),
            Arg::L(r as i64),
            Arg::P(self.p(lo.d)),
            Arg::P(la.xz.at::<f32>(di)),
            Arg::L(2 * di as i64),
            Arg::P(self.p(lo.dt_b)),
            Arg::P(ws.starts.ptr),
        ]
    }

    /// Column-major `C = op(A) op(B) + beta C` (see `Dev::gemm`) with precision handling.
    #[allow(clippy::too_many_arguments)]
    pub fn mm(
        &self,
        ws: &Work,
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        a: Opnd,
        b: Opnd,
        c: (u64, usize),
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        let a = self.operand(ws, a, 0)?;
        let b = self.operand(ws, b, 1)?;
        self.dev.gemm(ta, tb, m, n, k, a, b, c, beta, self.dt())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn norm_fwd(
        &self,
        rows: usize,
        x_in: u64,
        add: u64,
        x_out: u64,
        y: u64,
        mean: u64,
        rstd: u64,
        w: usize,
        b: Option<usize>,
        y_lp: u64,
    ) -> Result<()> {
        let cfg = &self.cfg;
        self.dev.launch(
            "norm_fwd_f32",
            (rows as u32, 1, 1),
            256,
            0,
            &[
                Arg::P(x_in),
                Arg::P(add),
                Arg::P(x_out),
                Arg::P(y),
                Arg::P(mean),
                Arg::P(rstd),
                Arg::P(self.p(w)),
                Arg::P(b.map_or(0, |o| self.p(o))),
                Arg::L(cfg.d_model as i64),
                Arg::F(cfg.norm_eps as f32),
                Arg::I((cfg.norm == NormKind::Layer) as i32),
                Arg::P(y_lp),
                Arg::I(self.lp_mode()),
            ],
        )
    }

    /// 0: bf16, 1: fp16 (the low-precision kernels' `mode` argument).
    pub fn lp_mode(&self) -> i32 {
        (self.precision == Precision::Fp16) as i32
    }

    /// Where a kernel writes the low-precision copy of the activation the next GEMM reads
    /// (`ws.lp[1]`, the slot of a GEMM's second operand), and that operand; f32 mode: no copy
    /// (`0`) and the f32 activation itself.
    pub fn lp_out(
        &self,
        ws: &Work,
        f32_ptr: u64,
        ld: usize,
        rows: usize,
        cols: usize,
    ) -> (u64, Opnd) {
        match &self.shadow {
            Some(_) => (ws.lp[1].ptr, Opnd::Lp(ws.lp[1].ptr, cols)),
            None => (0, Opnd::A(f32_ptr, ld, rows, cols)),
        }
    }

    pub(crate) fn bias_add(
        &self,
        y: u64,
        ld: usize,
        rows: usize,
        cols: usize,
        b: Option<usize>,
    ) -> Result<()> {
        match b {
            None => Ok(()),
            Some(off) => self.dev.launch(
                "bias_add_f32",
                self.dev.grid1d(rows * cols),
                256,
                0,
                &[
                    Arg::P(y),
                    Arg::L(ld as i64),
                    Arg::L(rows as i64),
                    Arg::L(cols as i64),
                    Arg::P(self.p(off)),
                ],
            ),
        }
    }

    /// Uploads tokens, document starts and the initial state into `ws`.
    pub fn upload_inputs(
        &self,
        ws: &Work,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> Result<()> {
        ws.tokens.write(0, input.tokens)?;
        ws.starts
            .write(0, &doc_starts(input.resets, input.batch, input.seq_len))?;
        if let Some(s) = state {
            ws.state_in_conv.write(0, &s.conv.data)?;
            ws.state_in_ssm.write(0, &s.ssm.data)?;
        }
        Ok(())
    }

    /// The forward over `ws` (inputs already uploaded). `has_state`: read the initial state.
    /// The lm_head runs on `ws`'s head rows starting at row `head_row0`.
    pub fn forward_dev(&self, ws: &Work, has_state: bool, head_row0: usize) -> Result<()> {
        let cfg = &self.cfg;
        let (n, di, ds) = (ws.n, cfg.d_inner, cfg.d_state);
        let (batch, seq_len) = (ws.batch, ws.seq_len);
        let km1 = cfg.d_conv - 1;
        let train = ws.mode == Mode::Train;
        let lay = &self.layout;
        self.embed(ws, n)?;
        let nblk = scan_blocks(cfg, self.shape);
        for (i, lo) in lay.layers.iter().enumerate() {
            let la = &ws.layers[if train { i } else { 0 }];
            // Fused residual add + norm: resid_in[i] = resid_in[i-1] + out[i-1].
            let (x_in, add) = match (i, train) {
                (0, _) => (la.resid_in.ptr, 0),
                (_, true) => (ws.layers[i - 1].resid_in.ptr, ws.out.ptr),
                (_, false) => (la.resid_in.ptr, ws.out.ptr),
            };
            self.norm_in_proj(ws, la, lo, n, x_in, add)?;
            let init_conv = if has_state {
                ws.state_in_conv.at::<f32>(i * batch * di * km1)
            } else {
                0
            };
            let init_ssm = if has_state {
                ws.state_in_ssm.at::<f32>(i * batch * di * ds)
            } else {
                0
            };
            self.dev.launch(
                "conv1d_fwd_f32",
                self.dev.grid1d(n * di),
                256,
                0,
                &[
                    &self.conv_in_args(ws, la, lo)[..],
                    &[
                        Arg::P(init_conv),
                        Arg::P(la.u.ptr),
                        Arg::P(ws.xs.ptr),
                        Arg::L(batch as i64),
                        Arg::L(seq_len as i64),
                        Arg::L(di as i64),
                    ],
                ]
                .concat(),
            )?;
            if km1 > 0 {
                self.dev.launch(
                    "conv1d_last_f32",
                    self.dev.grid1d(batch * di * km1),
                    256,
                    0,
                    &[
                        Arg::P(la.xz.ptr),
                        Arg::L(2 * di as i64),
                        Arg::P(ws.starts.ptr),
                        Arg::P(init_conv),
                        Arg::P(ws.state_out_conv.at::<f32>(i * batch * di * km1)),
                        Arg::L(batch as i64),
                        Arg::L(seq_len as i64),
                        Arg::L(di as i64),
                    ],
                )?;
            }
            self.x_dt_proj(ws, la, lo, n, Opnd::A(ws.xs.ptr, di, n, di))?;
            self.dev.launch(
                "selective_scan_fwd_f32",
                (nblk as u32, batch as u32, 1),
                crate::kernels::SCAN_FWD_THREADS as u32,
                0,
                &[
                    &self.scan_in_args(ws, la, lo)[..],
                    &[
                        Arg::P(init_ssm),
                        Arg::P(la.gated.ptr),
                        Arg::P(la.chunks.as_ref().map_or(0, |c| c.ptr)),
                        Arg::P(ws.state_out_ssm.at::<f32>(i * batch * di * ds)),
                        Arg::L(batch as i64),
                        Arg::L(seq_len as i64),
                        Arg::L(di as i64),
                        Arg::L(ds as i64),
                    ],
                ]
                .concat(),
            )?;
            self.out_proj(ws, lo, n, Opnd::A(la.gated.ptr, di, n, di))?;
        }
        let last = &ws.layers[if train { cfg.n_layer - 1 } else { 0 }];
        let resid_final = if train {
            ws.resid_final.ptr
        } else {
            last.resid_in.ptr
        };
        let add = if cfg.n_layer > 0 { ws.out.ptr } else { 0 };
        let head_rows = match ws.mode {
            Mode::Train => n,
            Mode::Infer { head_rows } => head_rows,
        };
        self.final_head(
            ws,
            n,
            (last.resid_in.ptr, add, resid_final),
            head_rows,
            head_row0,
        )
    }

    /// The token embedding of `ws.tokens` (`rows` of them) into layer 0's residual input.
    pub(crate) fn embed(&self, ws: &Work, rows: usize) -> Result<()> {
        self.dev.launch(
            "embedding_fwd_f32",
            (rows as u32, 1, 1),
            256,
            0,
            &[
                Arg::P(ws.tokens.ptr),
                Arg::P(self.p(self.layout.emb)),
                Arg::P(ws.layers[0].resid_in.ptr),
                Arg::L(self.cfg.d_model as i64),
            ],
        )
    }

    /// out_proj (+ bias) of the gated scan output (`rows` rows) into `ws.out`.
    pub(crate) fn out_proj(
        &self,
        ws: &Work,
        lo: &LayerOffs,
        rows: usize,
        gated: Opnd,
    ) -> Result<()> {
        let (dm, di) = (self.cfg.d_model, self.cfg.d_inner);
        self.mm(
            ws,
            true,
            false,
            (dm, rows, di),
            Opnd::W(lo.out_w, di),
            gated,
            (ws.out.ptr, dm),
            0.0,
        )?;
        self.bias_add(ws.out.ptr, dm, rows, dm, lo.out_b)
    }

    /// The final norm over `rows` rows (`resid_out = x_in + add`, fused) into `ws.hf`, then the
    /// lm_head over `head_rows` of them from row `head_row0` into `ws.logits`.
    pub(crate) fn final_head(
        &self,
        ws: &Work,
        rows: usize,
        (x_in, add, resid_out): (u64, u64, u64),
        head_rows: usize,
        head_row0: usize,
    ) -> Result<()> {
        let (dm, v) = (self.cfg.d_model, self.cfg.vocab_size);
        let lay = &self.layout;
        let (hf_lp, hf) = self.lp_out(ws, ws.hf.ptr, dm, rows, dm);
        self.norm_fwd(
            rows,
            x_in,
            add,
            resid_out,
            ws.hf.ptr,
            ws.fmean.ptr,
            ws.frstd.ptr,
            lay.norm_f_w,
            lay.norm_f_b,
            hf_lp,
        )?;
        let hf = match hf {
            Opnd::Lp(p, ld) => Opnd::Lp(p + (2 * head_row0 * dm) as u64, ld),
            _ => Opnd::A(ws.hf.at::<f32>(head_row0 * dm), dm, head_rows, dm),
        };
        self.mm(
            ws,
            true,
            false,
            (v, head_rows, dm),
            Opnd::W(lay.head, dm),
            hf,
            (ws.logits.ptr, v),
            0.0,
        )
    }
}

/// A workspace for `(batch, seq_len, mode)`, reused when the shape matches.
pub fn ensure_ws(
    slot: &mut Option<Work>,
    dev: &Arc<Dev>,
    cfg: &MambaConfig,
    shape: KernelShape,
    (batch, seq_len, mode): (usize, usize, Mode),
    lowp: bool,
) -> Result<()> {
    let fits = slot
        .as_ref()
        .is_some_and(|w| w.batch == batch && w.seq_len == seq_len && w.mode == mode);
    if !fits {
        *slot = None;
        *slot = Some(Work::new(dev, cfg, shape, batch, seq_len, mode, lowp)?);
    }
    Ok(())
}

/// Scan backward shared memory for this engine.
pub fn scan_smem(shape: KernelShape) -> u32 {
    scan_bwd_smem(shape) as u32
}

/// Row blocks for column sums over `n` rows (re-exported for the backward).
pub fn col_blocks(n: usize) -> (usize, usize) {
    row_blocks(n)
}
