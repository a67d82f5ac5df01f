//! Loss and backward on the device (twin of reference/src/model/backward.rs + loss.rs): the
//! backward walks the layers in reverse, one method per step of a layer (out_proj, the scan,
//! dt_proj and x_proj, SiLU and the conv, in_proj and the norm), each reading the activations
//! the forward kept and writing the gradients into the flat gradient buffer.

use reference::engine::ParamGroup;
use reference::{NormKind, Result};

use crate::forward::{OnPhase, Phase};

use crate::cuda::Buf;
use crate::layout::LayerOffs;
use crate::model::{Model, Opnd};
use crate::ops::conv1d::{
    conv1d_bwd_dw_partial, conv1d_bwd_dx, conv1d_bwd_init, conv1d_last_bwd, Conv1dBwdDwPartialF32,
    Conv1dBwdDxF32, Conv1dBwdInitF32, Conv1dLastBwdF32,
};
use crate::ops::elementwise::{colsum_final, colsum_partial, ColsumFinalF32, ColsumPartialF32};
use crate::ops::embedding::{embedding_bwd, EmbeddingBwdF32};
use crate::ops::norm::{norm_bwd_dw_partial, norm_bwd_dx, NormBwdDwPartialF32, NormBwdDxF32};
use crate::ops::selective_scan::{
    scan_blocks, scan_reduce_batch, scan_reduce_bc, scan_seg_count, selective_scan_bwd,
    ScanReduceBatchF32, ScanReduceBcF32, SelectiveScanBwdF32,
};
use crate::params::{Ptr, PtrMut};
use crate::work::{row_blocks, GradWork, LayerActs, Work};

/// One backward over a training workspace whose forward and loss have run.
pub(crate) struct Backward<'a> {
    m: &'a Model,
    ws: &'a Work,
    gw: &'a GradWork,
    grads: &'a Buf,
    /// The forward read an initial state.
    has_state: bool,
    /// Device addresses of the final state's gradient (conv windows, SSM states; the layout
    /// of a `State`), from later windows of the same rows: see [`Backward::with_final_grad`].
    final_grad: Option<(u64, u64)>,
}

impl<'a> Backward<'a> {
    /// `ws` must be a training workspace (`Mode::Train`); `grads` the flat gradient buffer
    /// of `m`'s layout.
    pub(crate) fn new(m: &'a Model, ws: &'a Work, grads: &'a Buf, has_state: bool) -> Self {
        let gw = ws.grad.as_ref().expect("training workspace");
        Backward {
            m,
            ws,
            gw,
            grads,
            has_state,
            final_grad: None,
        }
    }

    /// Adds the final state's gradient (device addresses of its conv and SSM halves, each
    /// `[n_layer, batch, ...]` as in `State`) into the backward (stateful training through
    /// several windows, `crate::carry`).
    pub(crate) fn with_final_grad(mut self, final_grad: Option<(u64, u64)>) -> Self {
        self.final_grad = final_grad;
        self
    }

    /// Whether the scan's and the conv's backward write `d_xz` straight in the GEMM precision
    /// (into `gw.d_xz`'s storage, at the same row stride in u16): in a lean workspace, unless
    /// in_proj's bias gradient reads it in f32.
    fn lp_dxz(&self, lo: &LayerOffs) -> bool {
        self.ws.lean() && lo.in_b.is_none()
    }

    /// Device address of the gradient at element offset `off`.
    fn g(&self, off: usize) -> u64 {
        self.grads.at::<f32>(off)
    }

    /// The backward from `gw.d_hn`, the final norm's output gradient that the training head
    /// (`head_loss::loss_dev`) wrote. `emb_csr`: distinct tokens, offsets and positions for
    /// the embedding ([`token_csr`]).
    pub(crate) fn run(&self, emb_csr: (&[u32], &[i32], &[i32])) -> Result<()> {
        self.run_with(emb_csr, &mut |_| Ok(()))
    }

    /// [`Backward::run`], telling `on` where it stands (ZeRO stage 3 layer by layer,
    /// `crate::layered`): the final norm's backward, `Release(Outer)`, then for each layer in
    /// reverse `Fill(Layer(i))`, its backward, `Release(Layer(i))` and `Grads(Layer(i))`, and
    /// after the embedding's backward `Grads(Outer)`.
    pub(crate) fn run_with(
        &self,
        emb_csr: (&[u32], &[i32], &[i32]),
        on: OnPhase<'_>,
    ) -> Result<()> {
        self.head_bwd()?;
        on(Phase::Release(ParamGroup::Outer))?;
        for (i, lo) in self.m.layout.layers.iter().enumerate().rev() {
            let la = &self.ws.layers[i];
            on(Phase::Fill(ParamGroup::Layer(i)))?;
            let d_out = self.out_proj_bwd_dx(lo)?;
            self.scan_bwd(i, la, lo)?;
            // After the scan's backward: in a lean workspace it recomputed the gated output.
            self.out_proj_bwd_dw(la, lo, d_out)?;
            self.dt_x_proj_bwd(la, lo)?;
            self.conv_bwd(i, la, lo)?;
            self.in_proj_norm_bwd(la, lo)?;
            on(Phase::Release(ParamGroup::Layer(i)))?;
            on(Phase::Grads(ParamGroup::Layer(i)))?;
        }
        self.embedding_bwd(emb_csr)?;
        on(Phase::Grads(ParamGroup::Outer))?;
        self.m.dev.sync()
    }

    /// The final norm: `d_resid = d norm_f(resid_final)` from `d_hn`.
    fn head_bwd(&self) -> Result<()> {
        let (m, ws, gw) = (self.m, self.ws, self.gw);
        let lay = &m.layout;
        m.dev.tag("norm_f.bwd");
        self.norm_bwd(
            (ws.resid_final.ptr, ws.fmean.ptr, ws.frstd.ptr),
            gw.d_hn.ptr,
            (lay.norm_f_w, lay.norm_f_b),
            false,
        )
    }

    /// out_proj: `d_gated` from `d_resid`, and the bias gradient; returns `d_resid` as the
    /// weight gradient's operand ([`Backward::out_proj_bwd_dw`]).
    fn out_proj_bwd_dx(&self, lo: &LayerOffs) -> Result<Opnd> {
        let (m, ws, gw) = (self.m, self.ws, self.gw);
        let (n, dm, di) = (ws.n, m.cfg.d_model, m.cfg.d_inner);
        m.dev.tag("out_proj.bwd d_gated");
        // One low-precision copy for both GEMMs, in slot 0: no GEMM until the weight
        // gradient's casts its first operand (the scan's recompute of dt_proj casts its
        // second, into slot 1).
        let d_out = m.lp_copy(ws, Opnd::A(gw.d_resid.ptr, dm, n, dm), 0)?;
        m.mm(
            ws,
            false,
            false,
            (di, n, dm),
            Opnd::W(lo.out_w, di),
            d_out,
            (gw.d_gated.ptr, di),
            0.0,
        )?;
        if let Some(b) = lo.out_b {
            self.colsum_add(gw.d_resid.ptr, dm, n, dm, self.g(b))?;
        }
        Ok(d_out)
    }

    /// out_proj's weight gradient from `d_out` ([`Backward::out_proj_bwd_dx`]) and the gated
    /// output: the layer's, or in a lean workspace the scan backward's recompute.
    fn out_proj_bwd_dw(&self, la: &LayerActs, lo: &LayerOffs, d_out: Opnd) -> Result<()> {
        let (m, ws) = (self.m, self.ws);
        let (n, dm, di) = (ws.n, m.cfg.d_model, m.cfg.d_inner);
        let gated = if ws.lean() {
            Opnd::Lp(ws.gated_lp.ptr, di)
        } else {
            Opnd::A(la.gated.ptr, di, n, di)
        };
        m.dev.tag("out_proj.bwd d_weight");
        m.mm(
            ws,
            false,
            true,
            (di, dm, n),
            gated,
            d_out,
            (self.g(lo.out_w), di),
            1.0,
        )
    }

    /// The scan of layer `i` (its inputs recomputed: the conv output `u` and x = silu(u) from
    /// `xz`, delta from `xdbl`): d x, d delta, d z, d B / d C (into `d_xdbl`), the A_log, D and
    /// dt bias gradients, and the initial state's gradient.
    fn scan_bwd(&self, i: usize, la: &LayerActs, lo: &LayerOffs) -> Result<()> {
        let (m, ws, gw) = (self.m, self.ws, self.gw);
        let (n, di, ds) = (ws.n, m.cfg.d_inner, m.cfg.d_state);
        let batch = ws.batch;
        if ws.lean() {
            m.dev.tag("scan.bwd widen xz");
            m.widen_lp(ws, la.xz.ptr, 2 * di, ws.xz32.ptr)?;
        }
        m.conv_fwd(ws, i, la, lo, self.has_state, false)?;
        m.dt_proj(ws, la, lo, n)?;
        let scan = SelectiveScanBwdF32 {
            scan: m.scan_in(ws, la, lo),
            chunk_states: Ptr::or_null(la.chunks.as_ref().map(|c| c.ptr)),
            dout: Ptr::new(gw.d_gated.ptr),
            du_out: PtrMut::new(gw.d_xs.ptr),
            ddelta_out: PtrMut::new(gw.d_delta.ptr),
            dz_out: PtrMut::new(gw.d_xz.at::<f32>(di)),
            ldz_out: 2 * di as i64,
            part_bc: PtrMut::new(gw.part_bc.ptr),
            part_a: PtrMut::new(gw.part_a.ptr),
            part_d: PtrMut::new(gw.part_d.ptr),
            part_db: PtrMut::new(gw.part_db.ptr),
            dh_last: Ptr::or_null(
                self.final_grad
                    .map(|g| g.1 + (4 * i * batch * di * ds) as u64),
            ),
            dh0: PtrMut::new(gw.gstate_ssm.at::<f32>(i * batch * di * ds)),
            batch: batch as i64,
            seq_len: ws.seq_len as i64,
            d_inner: di as i64,
            d_state: ds as i64,
            gated_lp: PtrMut::new(if ws.lean() { ws.gated_lp.ptr } else { 0 }),
            // A lean workspace takes ddelta (and d_xz, see `lp_dxz`) in the GEMM precision
            // into the f32 buffers' storage: each feeds only its two GEMMs.
            ddelta_lp: PtrMut::new(if ws.lean() { gw.d_delta.ptr } else { 0 }),
            dz_lp: PtrMut::new(if self.lp_dxz(lo) {
                gw.d_xz.at::<u16>(di)
            } else {
                0
            }),
            lp_mode: m.lp_mode(),
            seg_len: ws.seg_len as i64,
            seg_p: ws.seg_maps().0,
            seg_q: ws.seg_maps().1,
        };
        let n_seg = scan_seg_count(ws.seq_len, ws.seg_len);
        let reduce_bc = ScanReduceBcF32 {
            part_bc: Ptr::new(gw.part_bc.ptr),
            n_blocks: scan_blocks(di) as i64,
            rows: n as i64,
            d_state: ds as i64,
            out: PtrMut::new(gw.d_xdbl.at::<f32>(m.cfg.dt_rank)),
            ldo: m.cfg.x_proj_rows() as i64,
        };
        m.dev.tag("scan.bwd");
        // SAFETY: every buffer is this training workspace's (sized by `Work::new` for its
        // shape, with the chunk states of the forward that just ran) or the parameters' and
        // gradients' of the layout.
        unsafe {
            selective_scan_bwd(&m.dev, &scan)?;
            scan_reduce_bc(&m.dev, &reduce_bc)?;
        }
        for (part, len, dst, alog) in [
            (gw.part_a.ptr, di * ds, self.g(lo.a_log), m.p(lo.a_log)),
            (gw.part_d.ptr, di, self.g(lo.d), 0),
            (gw.part_db.ptr, di, self.g(lo.dt_b), 0),
        ] {
            let p = ScanReduceBatchF32 {
                part: Ptr::new(part),
                batch: (n_seg * batch) as i64,
                m: len as i64,
                dst: PtrMut::new(dst),
                a_log: Ptr::new(alog),
            };
            // SAFETY: `part` holds `n_seg * batch * len` partials, `dst` (and A_log) `len` f32.
            unsafe { scan_reduce_batch(&m.dev, &p) }?;
        }
        Ok(())
    }

    /// dt_proj, then x_proj: `d_xs += x_proj^T d_xdbl` and the weight gradients.
    fn dt_x_proj_bwd(&self, la: &LayerActs, lo: &LayerOffs) -> Result<()> {
        let (m, ws, gw) = (self.m, self.ws, self.gw);
        let (n, di, r, xr) = (ws.n, m.cfg.d_inner, m.cfg.dt_rank, m.cfg.x_proj_rows());
        m.dev.tag("dt_proj.bwd d_dt");
        // One low-precision copy of each gradient for its two GEMMs (slot 1; the GEMMs cast
        // their other activation, dt_raw or xs, into slot 0).
        let d_delta = if ws.lean() {
            Opnd::Lp(gw.d_delta.ptr, di)
        } else {
            m.lp_copy(ws, Opnd::A(gw.d_delta.ptr, di, n, di), 1)?
        };
        m.mm(
            ws,
            false,
            false,
            (r, n, di),
            Opnd::W(lo.dt_w, r),
            d_delta,
            (gw.d_xdbl.ptr, xr),
            0.0,
        )?;
        let dt_raw = Opnd::A(la.xdbl.ptr, xr, n, r);
        m.dev.tag("dt_proj.bwd d_weight");
        m.mm(
            ws,
            false,
            true,
            (r, di, n),
            dt_raw,
            d_delta,
            (self.g(lo.dt_w), r),
            1.0,
        )?;
        m.dev.tag("x_proj.bwd d_x");
        let d_xdbl = m.lp_copy(ws, Opnd::A(gw.d_xdbl.ptr, xr, n, xr), 1)?;
        m.mm(
            ws,
            false,
            false,
            (di, n, xr),
            Opnd::W(lo.x_w, di),
            d_xdbl,
            (gw.d_xs.ptr, di),
            1.0,
        )?;
        // The recomputed conv wrote xs's low-precision copy (`ws.xs_lp`) in bf16 / fp16.
        let xs = m.xs_opnd(ws);
        m.dev.tag("x_proj.bwd d_weight");
        m.mm(
            ws,
            false,
            true,
            (di, xr, n),
            xs,
            d_xdbl,
            (self.g(lo.x_w), di),
            1.0,
        )
    }

    /// SiLU and the conv of layer `i`: d x (into the x half of `d_xz`), the initial window's
    /// gradient, the conv weight (and bias) gradients.
    fn conv_bwd(&self, i: usize, la: &LayerActs, lo: &LayerOffs) -> Result<()> {
        let (m, ws, gw) = (self.m, self.ws, self.gw);
        let (n, di, dc) = (ws.n, m.cfg.d_inner, m.cfg.d_conv);
        let (batch, seq_len, km1) = (ws.batch as i64, ws.seq_len as i64, dc - 1);
        let conv_at = i * ws.batch * di * km1;
        let init_conv = if self.has_state {
            ws.state_in_conv.at::<f32>(conv_at)
        } else {
            0
        };
        let (n_rb, rows_per) = row_blocks(n);
        let (w, starts) = (m.pin(lo.conv_w), Ptr::new(ws.starts.ptr));
        // The dx kernel takes the gradient through the SiLU (d_xs · silu'(u)) and writes it
        // into `d_gated` (free after the scan's backward) for the other two kernels.
        let d_u = Ptr::new(gw.d_gated.ptr);
        let dx = Conv1dBwdDxF32 {
            du: Ptr::new(gw.d_xs.ptr),
            w,
            starts,
            dx: PtrMut::new(gw.d_xz.ptr),
            ldx: 2 * di as i64,
            batch,
            seq_len,
            d_inner: di as i64,
            u: Ptr::new(ws.u.ptr),
            g_out: PtrMut::new(gw.d_gated.ptr),
            dx_lp: PtrMut::new(if self.lp_dxz(lo) { gw.d_xz.ptr } else { 0 }),
            lp_mode: m.lp_mode(),
            // The final window's gradient (stateful training) goes into dx here, before any
            // rounding; `conv1d_last_bwd` below adds only its initial-window part.
            d_last: Ptr::or_null(self.final_grad.map(|g| g.0 + (4 * conv_at) as u64)),
        };
        let dinit = Conv1dBwdInitF32 {
            du: d_u,
            w,
            starts,
            dinit: PtrMut::new(gw.gstate_conv.at::<f32>(conv_at)),
            batch,
            seq_len,
            d_inner: di as i64,
        };
        let dw = Conv1dBwdDwPartialF32 {
            x: Ptr::new(ws.xz_f32(la)),
            ldx: 2 * di as i64,
            du: d_u,
            starts,
            init: Ptr::new(init_conv),
            batch,
            seq_len,
            d_inner: di as i64,
            rows_per: rows_per as i64,
            part_w: PtrMut::new(gw.colpart.ptr),
            part_b: PtrMut::new(if lo.conv_b.is_some() {
                gw.colpart_b.ptr
            } else {
                0
            }),
        };
        m.dev.tag("conv.bwd");
        // SAFETY: every buffer is this training workspace's or the layout's; the column-sum
        // partials hold `n_rb` rows of the widest sum (`Work::new`).
        unsafe {
            conv1d_bwd_dx(&m.dev, &dx)?;
            conv1d_bwd_init(&m.dev, &dinit)?;
            conv1d_bwd_dw_partial(&m.dev, &dw)?;
        }
        if let Some((d_conv, _)) = self.final_grad {
            let last = Conv1dLastBwdF32 {
                d_last: Ptr::new(d_conv + (4 * conv_at) as u64),
                starts,
                dx: PtrMut::NULL,
                ldx: dx.ldx,
                dinit: dinit.dinit,
                batch,
                seq_len,
                d_inner: di as i64,
            };
            // SAFETY: the final-state gradient has the layout of the state buffers (`n_layer`
            // layers of `batch * d_inner * (d_conv - 1)`); dx and dinit as above.
            unsafe { conv1d_last_bwd(&m.dev, &last) }?;
        }
        self.colsum_final(gw.colpart.ptr, n_rb, di * dc, self.g(lo.conv_w))?;
        if let Some(b) = lo.conv_b {
            self.colsum_final(gw.colpart_b.ptr, n_rb, di, self.g(b))?;
        }
        Ok(())
    }

    /// in_proj (its input recomputed from the saved residual and statistics), then the
    /// layer's norm: `d_resid += d norm(resid_in)`.
    fn in_proj_norm_bwd(&self, la: &LayerActs, lo: &LayerOffs) -> Result<()> {
        let (m, ws, gw) = (self.m, self.ws, self.gw);
        let (n, dm, di) = (ws.n, m.cfg.d_model, m.cfg.d_inner);
        // In bf16 / fp16 the norm also writes the GEMM's copy of hn (slot 0, which no GEMM
        // below casts into), as the forward did.
        let (hn_lp, hn_op) = match m.shadow {
            Some(_) => (ws.lp[0].ptr, Opnd::Lp(ws.lp[0].ptr, dm)),
            None => (0, Opnd::A(ws.hn.ptr, dm, n, dm)),
        };
        // A lean workspace kept the residual in the GEMM precision: widened into `resid32`.
        let resid = ws.resid_f32(la);
        if ws.lean() {
            m.dev.tag("in_proj.bwd widen resid");
            m.widen_lp(ws, la.resid_in.ptr, dm, resid)?;
        }
        let hn = crate::ops::norm::NormFwdF32 {
            x_in: Ptr::new(resid),
            y: PtrMut::new(if ws.lean() { 0 } else { ws.hn.ptr }),
            y_lp: PtrMut::new(hn_lp),
            ..m.norm_params(lo.norm_w, lo.norm_b)
        };
        m.dev.tag("in_proj.bwd");
        // SAFETY: the saved residual and `hn` hold `n` rows of `d_model` f32, `lp[0]` at least
        // as many u16.
        unsafe { crate::ops::norm::norm_fwd(&m.dev, n, &hn) }?;
        m.dev.tag("in_proj.bwd d_hn");
        // One low-precision copy for both GEMMs (slot 1).
        let d_xz = if self.lp_dxz(lo) {
            Opnd::Lp(gw.d_xz.ptr, 2 * di)
        } else {
            m.lp_copy(ws, Opnd::A(gw.d_xz.ptr, 2 * di, n, 2 * di), 1)?
        };
        m.mm(
            ws,
            false,
            false,
            (dm, n, 2 * di),
            Opnd::W(lo.in_w, dm),
            d_xz,
            (gw.d_hn.ptr, dm),
            0.0,
        )?;
        m.dev.tag("in_proj.bwd d_weight");
        m.mm(
            ws,
            false,
            true,
            (dm, 2 * di, n),
            hn_op,
            d_xz,
            (self.g(lo.in_w), dm),
            1.0,
        )?;
        if let Some(b) = lo.in_b {
            self.colsum_add(gw.d_xz.ptr, 2 * di, n, 2 * di, self.g(b))?;
        }
        m.dev.tag("norm.bwd");
        self.norm_bwd(
            (resid, la.mean.ptr, la.rstd.ptr),
            gw.d_hn.ptr,
            (lo.norm_w, lo.norm_b),
            true,
        )
    }

    /// The embedding's gradient: each distinct token's positions summed in order.
    fn embedding_bwd(&self, (uniq, offs, pos): (&[u32], &[i32], &[i32])) -> Result<()> {
        let m = self.m;
        m.dev.tag("embedding.bwd");
        let d_uniq = m.dev.upload(uniq)?;
        let d_offs = m.dev.upload(offs)?;
        let d_pos = m.dev.upload(pos)?;
        let p = EmbeddingBwdF32 {
            uniq: Ptr::new(d_uniq.ptr),
            offsets: Ptr::new(d_offs.ptr),
            positions: Ptr::new(d_pos.ptr),
            d_resid: Ptr::new(self.gw.d_resid.ptr),
            grad: PtrMut::new(self.g(m.layout.emb)),
            d: m.cfg.d_model as i64,
        };
        // SAFETY: the CSR comes from `token_csr` of this batch's tokens (ids inside the
        // vocabulary, positions inside the batch); `d_resid` holds `n` rows of `d_model`.
        unsafe { embedding_bwd(&m.dev, uniq.len(), &p) }
    }

    /// Norm backward on `(x, mean, rstd)`: `d_resid (+)= dx`, and the weight / bias
    /// gradients.
    fn norm_bwd(
        &self,
        (x, mean, rstd): (u64, u64, u64),
        dy: u64,
        (w, b): (usize, Option<usize>),
        accum: bool,
    ) -> Result<()> {
        let (m, gw) = (self.m, self.gw);
        let (n, dm) = (self.ws.n, m.cfg.d_model);
        let (n_rb, rows_per) = row_blocks(n);
        let dx = NormBwdDxF32 {
            x: Ptr::new(x),
            w: m.pin(w),
            mean_in: Ptr::new(mean),
            rstd_in: Ptr::new(rstd),
            dy: Ptr::new(dy),
            dx_out: PtrMut::new(gw.d_resid.ptr),
            d: dm as i64,
            is_layer: (m.cfg.norm == NormKind::Layer) as i32,
            accum: accum as i32,
        };
        let dw = NormBwdDwPartialF32 {
            x: Ptr::new(x),
            mean_in: Ptr::new(mean),
            rstd_in: Ptr::new(rstd),
            dy: Ptr::new(dy),
            rows: n as i64,
            d: dm as i64,
            rows_per: rows_per as i64,
            part_w: PtrMut::new(gw.colpart.ptr),
            part_b: PtrMut::new(if b.is_some() { gw.colpart_b.ptr } else { 0 }),
        };
        // SAFETY: `x`, `dy` and `d_resid` hold `n` rows of `d_model` f32, the statistics `n`
        // f32; the column-sum partials `n_rb` rows of at least `d_model`.
        unsafe {
            norm_bwd_dx(&m.dev, n, &dx)?;
            norm_bwd_dw_partial(&m.dev, &dw)?;
        }
        self.colsum_final(gw.colpart.ptr, n_rb, dm, self.g(w))?;
        if let Some(b) = b {
            self.colsum_final(gw.colpart_b.ptr, n_rb, dm, self.g(b))?;
        }
        Ok(())
    }

    /// `dst[j] += Σ_rows src[r * ld + j]` in a fixed order.
    fn colsum_add(&self, src: u64, ld: usize, rows: usize, cols: usize, dst: u64) -> Result<()> {
        let (n_rb, rows_per) = row_blocks(rows);
        let p = ColsumPartialF32 {
            src: Ptr::new(src),
            ld: ld as i64,
            rows: rows as i64,
            cols: cols as i64,
            rows_per: rows_per as i64,
            partial: PtrMut::new(self.gw.colpart.ptr),
        };
        // SAFETY: `src` is a workspace buffer of `rows` rows at stride `ld`; the partials hold
        // `n_rb` rows of at least `cols`.
        unsafe { colsum_partial(&self.m.dev, &p) }?;
        self.colsum_final(self.gw.colpart.ptr, n_rb, cols, dst)
    }

    /// `dst[j] += Σ_rb part[rb, j]` over `n_rb` row-block partials of `cols` columns.
    fn colsum_final(&self, part: u64, n_rb: usize, cols: usize, dst: u64) -> Result<()> {
        let p = ColsumFinalF32 {
            partial: Ptr::new(part),
            n_rb: n_rb as i64,
            cols: cols as i64,
            dst: PtrMut::new(dst),
        };
        // SAFETY: `part` is one of the workspace's partial buffers holding `n_rb * cols`
        // values; `dst` a gradient of `cols` f32.
        unsafe { colsum_final(&self.m.dev, &p) }
    }
}

/// Distinct tokens (sorted), offsets into `positions`, and the positions of each token in
/// increasing order.
pub fn token_csr(tokens: &[u32]) -> (Vec<u32>, Vec<i32>, Vec<i32>) {
    let mut idx: Vec<usize> = (0..tokens.len()).collect();
    idx.sort_by_key(|&i| (tokens[i], i));
    let mut uniq = Vec::new();
    let mut offs = Vec::new();
    for (k, &i) in idx.iter().enumerate() {
        if uniq.last() != Some(&tokens[i]) {
            uniq.push(tokens[i]);
            offs.push(k as i32);
        }
    }
    offs.push(idx.len() as i32);
    (uniq, offs, idx.into_iter().map(|i| i as i32).collect())
}

#[cfg(test)]
mod tests {
    use super::token_csr;
    use crate::work::doc_starts;

    #[test]
    fn token_csr_lists_each_tokens_positions_in_order() {
        let (uniq, offs, pos) = token_csr(&[5, 2, 5, 9, 2, 5]);
        assert_eq!(uniq, vec![2, 5, 9]);
        assert_eq!(offs, vec![0, 2, 5, 6]);
        assert_eq!(pos, vec![1, 4, 0, 2, 5, 3]);
    }

    #[test]
    fn doc_starts_follow_resets_per_row() {
        let r = [false, true, false, true, false, false];
        assert_eq!(doc_starts(Some(&r), 2, 3), vec![-1, 1, 1, 0, 0, 0]);
        assert_eq!(doc_starts(None, 1, 2), vec![-1, -1]);
    }
}
