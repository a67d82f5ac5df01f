//! The forward on the device (twin of reference/src/model/forward.rs), and the per-layer
//! pieces the decode step shares with it: the fused residual add + norm and in_proj, x_proj
//! and dt_proj, out_proj, the final norm and the lm_head.

use reference::engine::ParamGroup;
use reference::model::Batch;
use reference::{Result, State};

use crate::layout::LayerOffs;
use crate::model::{Model, Opnd};
use crate::ops::conv1d::{conv1d_fwd, conv1d_last, Conv1dFwdF32, Conv1dLastF32, ConvInF32};
use crate::ops::elementwise::{round_lowp, RoundLowpF32};
use crate::ops::embedding::{embedding_fwd, EmbeddingFwdF32};
use crate::ops::norm::{norm_fwd, NormFwdF32};
use crate::ops::selective_scan::{selective_scan_fwd, ScanInF32, SelectiveScanFwdF32};
use crate::params::{Ptr, PtrMut};
use crate::work::{doc_starts, LayerActs, Mode, Work};

/// Where a pass over the model stands, for a caller that holds the parameters group by group
/// (ZeRO stage 3, `crate::layered`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The group's parameters are needed now.
    Fill(ParamGroup),
    /// The group's parameters are not needed any more (kernels may still be running).
    Release(ParamGroup),
    /// The backward is done with the group's gradient.
    Grads(ParamGroup),
}

/// Told each [`Phase`] as a pass reaches it; an error stops the pass.
pub(crate) type OnPhase<'a> = &'a mut dyn FnMut(Phase) -> Result<()>;

impl Model {
    /// Layer input of `rows` rows: `resid_in = x_in + add` (fused), the norm into `ws.hn`,
    /// in_proj (+ bias) into `la.xz` (in a lean workspace into `ws.xz32`, then rounded to the
    /// stored precision into `la.xz` and back).
    pub(crate) fn norm_in_proj(
        &self,
        ws: &Work,
        la: &LayerActs,
        lo: &LayerOffs,
        rows: usize,
        (x_in, add): (u64, u64),
    ) -> Result<()> {
        let (dm, di) = (self.cfg.d_model, self.cfg.d_inner);
        let (hn_lp, hn) = self.lp_out(ws, ws.hn.ptr, dm, rows, dm);
        self.dev.tag("norm+in_proj");
        // A lean workspace runs the f32 stream through `resid32` (in place) and keeps the
        // layer's residual in the GEMM precision; the GEMM reads only hn's copy.
        let lean = ws.lean();
        let p = NormFwdF32 {
            x_in: Ptr::new(x_in),
            add: Ptr::new(add),
            x_out: PtrMut::new(ws.resid_f32(la)),
            y: PtrMut::new(if lean { 0 } else { ws.hn.ptr }),
            mean_out: PtrMut::new(la.mean.ptr),
            rstd_out: PtrMut::new(la.rstd.ptr),
            y_lp: PtrMut::new(hn_lp),
            x_out_lp: PtrMut::new(if lean { la.resid_in.ptr } else { 0 }),
            ..self.norm_params(lo.norm_w, lo.norm_b)
        };
        // SAFETY: the residual buffers hold `rows` rows of `d_model` (f32, or u16 for the
        // kept copy), the statistics `rows` f32, `hn` and its copy `rows × d_model`; `x_out`
        // may be `x_in` (the kernel reads each element before writing it, in one thread).
        unsafe { norm_fwd(&self.dev, rows, &p) }?;
        self.mm(
            ws,
            true,
            false,
            (2 * di, rows, dm),
            Opnd::W(lo.in_w, dm),
            hn,
            (ws.xz_f32(la), 2 * di),
            0.0,
        )?;
        if !ws.lean() {
            return self.bias_add(la.xz.ptr, 2 * di, rows, 2 * di, lo.in_b);
        }
        let p = RoundLowpF32 {
            x: PtrMut::new(ws.xz32.ptr),
            ld: 2 * di as i64,
            rows: rows as i64,
            cols: 2 * di as i64,
            b: self.pin_opt(lo.in_b),
            dst: PtrMut::new(la.xz.ptr),
            mode: self.lp_mode(),
        };
        // SAFETY: a lean workspace's `xz32` holds `n × 2 d_inner` f32 and each layer's `xz`
        // as many u16 (`Work::new`); the bias is a parameter of `2 d_inner`.
        unsafe { round_lowp(&self.dev, &p) }
    }

    /// x_proj of `xs` (`rows` rows) into `la.xdbl` (dt, B, C), then dt_proj of its dt columns
    /// into `ws.delta` (no bias: the scan adds it).
    pub(crate) fn x_dt_proj(
        &self,
        ws: &Work,
        la: &LayerActs,
        lo: &LayerOffs,
        rows: usize,
        xs: Opnd,
    ) -> Result<()> {
        let (di, xr) = (self.cfg.d_inner, self.cfg.x_proj_rows());
        self.dev.tag("x_proj");
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
        self.dt_proj(ws, la, lo, rows)
    }

    /// dt_proj of the dt columns of `la.xdbl` (`rows` rows) into `ws.delta` (no bias); the
    /// backward calls it again to recompute `delta`.
    pub(crate) fn dt_proj(
        &self,
        ws: &Work,
        la: &LayerActs,
        lo: &LayerOffs,
        rows: usize,
    ) -> Result<()> {
        let (di, r, xr) = (self.cfg.d_inner, self.cfg.dt_rank, self.cfg.x_proj_rows());
        self.dev.tag("dt_proj");
        self.mm(
            ws,
            true,
            false,
            (di, rows, r),
            Opnd::W(lo.dt_w, r),
            Opnd::A(la.xdbl.ptr, xr, rows, r),
            (ws.delta.ptr, di),
            0.0,
        )
    }

    /// The leading parameters of the conv kernels (`conv1d_fwd_f32`, `conv_update_f32`): the
    /// x half of xz and its row stride, the conv weight and bias, the document starts.
    pub(crate) fn conv_in(&self, ws: &Work, la: &LayerActs, lo: &LayerOffs) -> ConvInF32 {
        ConvInF32 {
            x: Ptr::new(ws.xz_f32(la)),
            ldx: 2 * self.cfg.d_inner as i64,
            w: self.pin(lo.conv_w),
            bias: self.pin_opt(lo.conv_b),
            starts: Ptr::new(ws.starts.ptr),
        }
    }

    /// The parameters every scan kernel (forward, backward, decode update) starts with: x
    /// (the conv output after SiLU), delta, A_log, B and C inside x_proj's output, D, z inside
    /// in_proj's output, the dt bias, the document starts.
    pub(crate) fn scan_in(&self, ws: &Work, la: &LayerActs, lo: &LayerOffs) -> ScanInF32 {
        let di = self.cfg.d_inner;
        ScanInF32 {
            u: Ptr::new(ws.xs.ptr),
            delta: Ptr::new(ws.delta.ptr),
            a_log: self.pin(lo.a_log),
            xbc: Ptr::new(la.xdbl.ptr),
            ldbc: self.cfg.x_proj_rows() as i64,
            col_b: self.cfg.dt_rank as i64,
            dvec: self.pin(lo.d),
            z: Ptr::new(ws.xz_f32(la) + 4 * di as u64),
            ldz: 2 * di as i64,
            dt_bias: self.pin(lo.dt_b),
            starts: Ptr::new(ws.starts.ptr),
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
        self.forward_dev_with(ws, has_state, head_row0, &mut |_| Ok(()))
    }

    /// [`Model::forward_dev`], telling `on` when each group's parameters are needed and when
    /// they are no longer (ZeRO stage 3 layer by layer, `crate::layered`): `Fill(Outer)`, the
    /// embedding, `Release(Outer)`, then `Fill(Layer(i))`, layer `i`, `Release(Layer(i))` for
    /// each layer; a training workspace ends with `Fill(Outer)` and the final norm (the loss
    /// and the backward use the outer group next), an inference one with the head and
    /// `Release(Outer)`.
    pub(crate) fn forward_dev_with(
        &self,
        ws: &Work,
        has_state: bool,
        head_row0: usize,
        on: OnPhase<'_>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let train = ws.mode == Mode::Train;
        on(Phase::Fill(ParamGroup::Outer))?;
        self.embed(ws, ws.n)?;
        on(Phase::Release(ParamGroup::Outer))?;
        for (i, lo) in self.layout.layers.iter().enumerate() {
            let la = &ws.layers[if train { i } else { 0 }];
            // Fused residual add + norm: resid_in[i] = resid_in[i-1] + out[i-1].
            let (x_in, add) = match (i, train) {
                (0, _) => (ws.resid_f32(la), 0),
                (_, true) => (ws.resid_f32(&ws.layers[i - 1]), ws.out.ptr),
                (_, false) => (la.resid_in.ptr, ws.out.ptr),
            };
            on(Phase::Fill(ParamGroup::Layer(i)))?;
            self.norm_in_proj(ws, la, lo, ws.n, (x_in, add))?;
            self.mixer_fwd(ws, i, la, lo, has_state)?;
            on(Phase::Release(ParamGroup::Layer(i)))?;
        }
        on(Phase::Fill(ParamGroup::Outer))?;
        let last = &ws.layers[if train { cfg.n_layer - 1 } else { 0 }];
        let resid_final = if train {
            ws.resid_final.ptr
        } else {
            last.resid_in.ptr
        };
        let add = if cfg.n_layer > 0 { ws.out.ptr } else { 0 };
        let head_rows = match ws.mode {
            // Training runs the lm_head with the loss, in chunks of rows (`head_loss.rs`).
            Mode::Train => {
                let x_in = ws.resid_f32(last);
                self.final_norm(ws, ws.n, (x_in, add, resid_final))?;
                return Ok(());
            }
            Mode::Infer { head_rows } => head_rows,
        };
        self.final_head(
            ws,
            ws.n,
            (last.resid_in.ptr, add, resid_final),
            head_rows,
            head_row0,
        )?;
        on(Phase::Release(ParamGroup::Outer))
    }

    /// Layer `i`'s mixer after in_proj: conv (+ its final window), x_proj and dt_proj, the
    /// scan (+ its final state), out_proj into `ws.out`.
    fn mixer_fwd(
        &self,
        ws: &Work,
        i: usize,
        la: &LayerActs,
        lo: &LayerOffs,
        has_state: bool,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (n, di, ds) = (ws.n, cfg.d_inner, cfg.d_state);
        let (batch, seq_len) = (ws.batch, ws.seq_len);
        let ssm_at = i * batch * di * ds;
        self.conv_fwd(ws, i, la, lo, has_state, true)?;
        self.x_dt_proj(ws, la, lo, n, self.xs_opnd(ws))?;
        // A lean workspace writes only the GEMM's copy of the gated output (not kept). In
        // bf16 / fp16 inference the scan writes out_proj's operand itself (no cast kernel;
        // the same rounding, so the same bits) and no f32 copy, which nothing reads.
        let lean = ws.lean();
        let (out_lp, gated) = if lean {
            (ws.gated_lp.ptr, Opnd::Lp(ws.gated_lp.ptr, di))
        } else {
            self.lp_out(ws, la.gated.ptr, di, n, di)
        };
        let infer = matches!(ws.mode, Mode::Infer { .. });
        let out = if lean || (infer && out_lp != 0) {
            0
        } else {
            la.gated.ptr
        };
        let scan = SelectiveScanFwdF32 {
            scan: self.scan_in(ws, la, lo),
            h0: Ptr::new(if has_state {
                ws.state_in_ssm.at::<f32>(ssm_at)
            } else {
                0
            }),
            out: PtrMut::new(out),
            chunk_states: PtrMut::or_null(la.chunks.as_ref().map(|c| c.ptr)),
            last: PtrMut::new(ws.state_out_ssm.at::<f32>(ssm_at)),
            batch: batch as i64,
            seq_len: seq_len as i64,
            d_inner: di as i64,
            d_state: ds as i64,
            out_lp: PtrMut::new(out_lp),
            lp_mode: self.lp_mode(),
            seg_len: ws.seg_len as i64,
            seg_p: ws.seg_maps().0,
            seg_q: ws.seg_maps().1,
            seg_pass: 0,
        };
        self.dev.tag("scan");
        // SAFETY: every buffer is this workspace's (`Work::new` sizes them for `batch ×
        // seq_len` and `n_layer` states) or a parameter of the layout; the chunk states
        // (training only) hold every chunk of the kernels' build (same `KernelShape`).
        unsafe { selective_scan_fwd(&self.dev, &scan) }?;
        self.out_proj(ws, lo, n, gated)
    }

    /// The conv's SiLU output as a GEMM operand: its low-precision copy `ws.xs_lp` (which
    /// [`Model::conv_fwd`] writes) in bf16 / fp16, else `ws.xs`.
    pub(crate) fn xs_opnd(&self, ws: &Work) -> Opnd {
        let (n, di) = (ws.n, self.cfg.d_inner);
        match self.shadow {
            Some(_) => Opnd::Lp(ws.xs_lp.ptr, di),
            None => Opnd::A(ws.xs.ptr, di, n, di),
        }
    }

    /// Layer `i`'s causal conv of the x half of `la.xz` into `ws.u` (before SiLU) and `ws.xs`
    /// (after; in bf16 / fp16 also `ws.xs_lp`), and with `last` its final window into the state out. The backward calls it
    /// again (without `last`) to recompute `u` and `xs`: same kernel, same inputs, same bits.
    pub(crate) fn conv_fwd(
        &self,
        ws: &Work,
        i: usize,
        la: &LayerActs,
        lo: &LayerOffs,
        has_state: bool,
        last: bool,
    ) -> Result<()> {
        let di = self.cfg.d_inner;
        let (batch, seq_len) = (ws.batch, ws.seq_len);
        let conv_at = i * batch * di * (self.cfg.d_conv - 1);
        let init_conv = Ptr::new(if has_state {
            ws.state_in_conv.at::<f32>(conv_at)
        } else {
            0
        });
        let conv = Conv1dFwdF32 {
            conv: self.conv_in(ws, la, lo),
            init: init_conv,
            // Only the backward reads the pre-SiLU `u` (conv1d_bwd_dx's SiLU gradient), after
            // its own recompute: the forward's call (`last`) skips writing it.
            u: PtrMut::new(if last { 0 } else { ws.u.ptr }),
            xs: PtrMut::new(ws.xs.ptr),
            batch: batch as i64,
            seq_len: seq_len as i64,
            d_inner: di as i64,
            xs_lp: PtrMut::new(if self.shadow.is_some() {
                ws.xs_lp.ptr
            } else {
                0
            }),
            lp_mode: self.lp_mode(),
        };
        let fin = Conv1dLastF32 {
            x: conv.conv.x,
            ldx: conv.conv.ldx,
            starts: conv.conv.starts,
            init: init_conv,
            last: PtrMut::new(ws.state_out_conv.at::<f32>(conv_at)),
            batch: batch as i64,
            seq_len: seq_len as i64,
            d_inner: di as i64,
        };
        self.dev.tag("conv");
        // SAFETY: every buffer is this workspace's (`Work::new` sizes them for `batch ×
        // seq_len` and `n_layer` states) or a parameter of the layout.
        unsafe {
            conv1d_fwd(&self.dev, &conv)?;
            if last {
                conv1d_last(&self.dev, &fin)?;
            }
        }
        Ok(())
    }

    /// The token embedding of `ws.tokens` (`rows` of them) into layer 0's residual input.
    pub(crate) fn embed(&self, ws: &Work, rows: usize) -> Result<()> {
        self.dev.tag("embedding");
        let p = EmbeddingFwdF32 {
            tokens: Ptr::new(ws.tokens.ptr),
            emb: self.pin(self.layout.emb),
            out: PtrMut::new(ws.resid_f32(&ws.layers[0])),
            d: self.cfg.d_model as i64,
        };
        // SAFETY: the tokens were checked against the vocabulary (`Batch::check`) and
        // uploaded; the residual input holds `rows` rows of `d_model` f32.
        unsafe { embedding_fwd(&self.dev, rows, &p) }
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
        self.dev.tag("out_proj");
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
        self.final_norm(ws, rows, (x_in, add, resid_out))?;
        self.dev.tag("lm_head");
        self.mm(
            ws,
            true,
            false,
            (v, head_rows, dm),
            Opnd::W(self.layout.head, dm),
            self.hf_rows(ws, head_row0, head_rows),
            (ws.logits.ptr, v),
            0.0,
        )
    }

    /// The final norm over `rows` rows (`resid_out = x_in + add`, fused) into `ws.hf` (and,
    /// in bf16 / fp16, its copy in `ws.lp[1]`, which [`Model::hf_rows`] hands to the lm_head).
    pub(crate) fn final_norm(
        &self,
        ws: &Work,
        rows: usize,
        (x_in, add, resid_out): (u64, u64, u64),
    ) -> Result<()> {
        let dm = self.cfg.d_model;
        let lay = &self.layout;
        let (hf_lp, _) = self.lp_out(ws, ws.hf.ptr, dm, rows, dm);
        self.dev.tag("norm_f");
        self.norm_fwd(
            rows,
            (x_in, add, resid_out),
            ws.hf.ptr,
            (ws.fmean.ptr, ws.frstd.ptr),
            (lay.norm_f_w, lay.norm_f_b),
            hf_lp,
        )
    }

    /// Rows `row0 .. row0 + rows` of the final norm's output as a GEMM operand (its
    /// low-precision copy in bf16 / fp16 modes, valid until the next cast into `ws.lp[1]`).
    pub(crate) fn hf_rows(&self, ws: &Work, row0: usize, rows: usize) -> Opnd {
        let dm = self.cfg.d_model;
        match self.shadow {
            Some(_) => Opnd::Lp(ws.lp[1].at::<u16>(row0 * dm), dm),
            None => Opnd::A(ws.hf.at::<f32>(row0 * dm), dm, rows, dm),
        }
    }
}
