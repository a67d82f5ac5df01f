//! The decode step's projections (in_proj, x_proj, dt_proj, out_proj, the lm_head): one
//! `gemv_lp` launch each when the weights have a low-precision shadow and the step has at
//! most [`GEMV_ROWS`] rows, so every weight is read once per step for all rows and a row's
//! logits have the same bits at any batch up to that ([`gemv_decode`]: one split, so one order
//! of each sum, at every batch); cuBLAS (`Model::mm`) otherwise.
//! `VET_DECODE_GEMV=0` turns the GEMV off (cuBLAS throughout, for comparison).

use reference::Result;

use crate::layout::LayerOffs;
use crate::model::{Model, Opnd};
use crate::ops::decode::{gemv_conv, gemv_decode, ConvUpdateF32, GemvConvLp, GemvLp, GEMV_ROWS};
use crate::params::{Ptr, PtrMut};
use crate::work::{LayerActs, Work};

/// Whether the decode step fuses the conv update into in_proj's GEMV and dt_proj into the scan
/// update, where the GEMV runs: yes unless `VET_DECODE_FUSE=0` (H100, batch 1: 130M 1,736 →
/// 2,019 tok/s; five kernels a layer instead of seven).
pub(crate) fn fused() -> bool {
    std::env::var("VET_DECODE_FUSE").map_or(true, |v| v != "0")
}

/// Whether the GEMV may run (`VET_DECODE_GEMV` is not `0`).
pub(crate) fn gemv_enabled() -> bool {
    std::env::var("VET_DECODE_GEMV").map_or(true, |v| v != "0")
}

/// The projections of one decode step over `rows` rows of `ws`.
pub(crate) struct Proj<'a> {
    m: &'a Model,
    ws: &'a Work,
    rows: usize,
    gemv: bool,
}

impl<'a> Proj<'a> {
    pub(crate) fn new(m: &'a Model, ws: &'a Work, rows: usize) -> Proj<'a> {
        let gemv = m.shadow.is_some() && rows <= GEMV_ROWS && gemv_enabled();
        Proj { m, ws, rows, gemv }
    }

    /// The GEMV of `y[r, :] = W x[r, :]` for the weight at parameter offset `w` (`n_out × k`,
    /// row stride `ldw`) and the activation `x` (`k` columns), into `y` (row stride `ldy`);
    /// `None` where cuBLAS runs instead (no GEMV, or `x` a weight).
    fn gemv_params(
        &self,
        w: usize,
        ldw: usize,
        (n_out, k): (usize, usize),
        x: Opnd,
        y: (u64, usize),
    ) -> Option<GemvLp> {
        let (x_lp, x_f32, ldx) = match x {
            Opnd::Lp(p, ld) => (p, 0, ld),
            Opnd::A(p, ld, _, _) => (0, p, ld),
            Opnd::W(..) => (0, 0, 0),
        };
        let shadow = match (&self.m.shadow, self.gemv && (x_lp | x_f32) != 0) {
            (Some(s), true) => s,
            _ => return None,
        };
        // int8 codes where the matrix has them (and its rows are whole: ldw == k).
        let (wq, ws) = match self.m.q8.as_ref() {
            Some(q) => q
                .find(w)
                .filter(|m| m.cols == k && ldw == k && m.rows == n_out)
                .map_or((0, 0), |m| q.ptrs(m)),
            None => (0, 0),
        };
        Some(
            GemvLp {
                w: Ptr::new(shadow.at::<u16>(w)),
                ldw: ldw as i64,
                wq: Ptr::new(wq),
                ws: Ptr::new(ws),
                x_lp: Ptr::new(x_lp),
                x_f32: Ptr::new(x_f32),
                ldx: ldx as i64,
                y: PtrMut::new(y.0),
                ldy: y.1 as i64,
                n_out: n_out as i64,
                k: k as i64,
                rows: self.rows as i64,
                split: 1,
                vec: 0,
                lp_mode: self.m.lp_mode(),
            }
            .tuned(),
        )
    }

    /// `y[r, :] = W x[r, :]` (see [`Proj::gemv_params`]): the GEMV, or cuBLAS.
    fn mv(
        &self,
        w: usize,
        ldw: usize,
        (n_out, k): (usize, usize),
        x: Opnd,
        y: (u64, usize),
    ) -> Result<()> {
        let Some(p) = self.gemv_params(w, ldw, (n_out, k), x, y) else {
            let sh = (n_out, self.rows, k);
            return self
                .m
                .mm(self.ws, true, false, sh, Opnd::W(w, ldw), x, y, 0.0);
        };
        // SAFETY: `w` is a weight of the layout inside the shadow (`n_out` rows of `ldw`); `x`
        // and `y` are decode workspace buffers of `rows` rows at their strides (`Work::new`).
        unsafe { gemv_decode(&self.m.dev, &p) }
    }

    /// The residual add + norm, then in_proj with the conv update `conv` as its epilogue
    /// (`gemv_lp_conv`), where [`fused`] is on and the shapes allow it (16-byte rows, no
    /// in_proj bias); `false` (nothing launched) otherwise.
    pub(crate) fn norm_in_proj_conv(
        &self,
        la: &LayerActs,
        lo: &LayerOffs,
        (x_in, add): (u64, u64),
        conv: &ConvUpdateF32,
    ) -> Result<bool> {
        let (m, ws, rows) = (self.m, self.ws, self.rows);
        let (dm, di) = (m.cfg.d_model, m.cfg.d_inner);
        if !fused() || lo.in_b.is_some() {
            return Ok(false);
        }
        let (hn_lp, hn) = m.lp_out(ws, ws.hn.ptr, dm, rows, dm);
        let g = match self.gemv_params(lo.in_w, dm, (2 * di, dm), hn, (la.xz.ptr, 2 * di)) {
            Some(g) if g.vec == 1 => g,
            _ => return Ok(false),
        };
        self.norm(la, lo, (x_in, add), hn_lp)?;
        let p = GemvConvLp { g, c: *conv };
        // SAFETY: as in `mv`; `conv` is the decode step's conv update of these rows, its x the
        // first `d_inner` outputs (the x half of `la.xz`).
        unsafe { gemv_conv(&m.dev, &p) }?;
        Ok(true)
    }

    /// x_proj of `xs` into `la.xdbl` (dt_proj then runs inside the scan update).
    pub(crate) fn x_proj(&self, la: &LayerActs, lo: &LayerOffs, xs: Opnd) -> Result<()> {
        let cfg = &self.m.cfg;
        let (di, xr) = (cfg.d_inner, cfg.x_proj_rows());
        self.mv(lo.x_w, di, (xr, di), xs, (la.xdbl.ptr, xr))
    }

    /// dt_proj's weight in the low precision, for the fused scan update.
    pub(crate) fn dt_w_lp(&self, lo: &LayerOffs) -> Option<u64> {
        self.m.shadow.as_ref().map(|s| s.at::<u16>(lo.dt_w))
    }

    /// The layer's residual add (`la.resid_in = x_in + add`) and norm into `ws.hn` (and
    /// `hn_lp` unless null).
    fn norm(
        &self,
        la: &LayerActs,
        lo: &LayerOffs,
        (x_in, add): (u64, u64),
        hn_lp: u64,
    ) -> Result<()> {
        self.m.norm_fwd(
            self.rows,
            (x_in, add, la.resid_in.ptr),
            self.ws.hn.ptr,
            (la.mean.ptr, la.rstd.ptr),
            (lo.norm_w, lo.norm_b),
            hn_lp,
        )
    }

    /// As `Model::norm_in_proj`: the fused residual add + norm, in_proj (+ bias) into `la.xz`.
    pub(crate) fn norm_in_proj(
        &self,
        la: &LayerActs,
        lo: &LayerOffs,
        (x_in, add): (u64, u64),
    ) -> Result<()> {
        let (m, ws, rows) = (self.m, self.ws, self.rows);
        let (dm, di) = (m.cfg.d_model, m.cfg.d_inner);
        let (hn_lp, hn) = m.lp_out(ws, ws.hn.ptr, dm, rows, dm);
        self.norm(la, lo, (x_in, add), hn_lp)?;
        self.mv(lo.in_w, dm, (2 * di, dm), hn, (la.xz.ptr, 2 * di))?;
        m.bias_add(la.xz.ptr, 2 * di, rows, 2 * di, lo.in_b)
    }

    /// As `Model::x_dt_proj`: x_proj of `xs` into `la.xdbl`, dt_proj of its dt columns into
    /// `ws.delta`.
    pub(crate) fn x_dt_proj(&self, la: &LayerActs, lo: &LayerOffs, xs: Opnd) -> Result<()> {
        let cfg = &self.m.cfg;
        let (di, r, xr) = (cfg.d_inner, cfg.dt_rank, cfg.x_proj_rows());
        self.mv(lo.x_w, di, (xr, di), xs, (la.xdbl.ptr, xr))?;
        let dt_in = Opnd::A(la.xdbl.ptr, xr, self.rows, r);
        self.mv(lo.dt_w, r, (di, r), dt_in, (self.ws.delta.ptr, di))
    }

    /// As `Model::out_proj`: out_proj (+ bias) of the gated scan output into `ws.out`.
    pub(crate) fn out_proj(&self, lo: &LayerOffs, gated: Opnd) -> Result<()> {
        let (dm, di) = (self.m.cfg.d_model, self.m.cfg.d_inner);
        let out = self.ws.out.ptr;
        self.mv(lo.out_w, di, (dm, di), gated, (out, dm))?;
        self.m.bias_add(out, dm, self.rows, dm, lo.out_b)
    }

    /// As `Model::final_head` over every row: the final norm (`resid_out = x_in + add`) into
    /// `ws.hf`, the lm_head into `ws.logits`.
    pub(crate) fn final_head(&self, (x_in, add, resid_out): (u64, u64, u64)) -> Result<()> {
        let (m, ws, rows) = (self.m, self.ws, self.rows);
        let (dm, v) = (m.cfg.d_model, m.cfg.vocab_size);
        let lay = &m.layout;
        let (hf_lp, hf) = m.lp_out(ws, ws.hf.ptr, dm, rows, dm);
        m.norm_fwd(
            rows,
            (x_in, add, resid_out),
            ws.hf.ptr,
            (ws.fmean.ptr, ws.frstd.ptr),
            (lay.norm_f_w, lay.norm_f_b),
            hf_lp,
        )?;
        self.mv(lay.head, dm, (v, dm), hf, (ws.logits.ptr, v))
    }
}
