//! The model on one CUDA device: the configuration, the parameters in one flat f32 buffer
//! (offsets in [`Layout`]) with, in bf16 / fp16 modes, a low-precision shadow for the GEMMs,
//! and the pieces the forward, the decode step and the backward share: GEMMs with precision
//! handling, the norm, bias add. The scan state, the residual stream, `A_log` and `D` are f32
//! throughout.

use std::sync::Arc;

use reference::{MambaConfig, NormKind, Result};

use crate::cuda::{Buf, Dev, Dt};
use crate::kernels::KernelShape;
use crate::layout::Layout;
use crate::ops::elementwise::{
    bias_add, cast_lowp, widen_lowp, BiasAddF32, CastLowpF32, WidenLowpF32,
};
use crate::ops::norm::{norm_fwd, NormFwdF32};
use crate::params::{Ptr, PtrMut};
use crate::work::{Mode, Work};
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

/// The weights and the device (the engine's inference core; training state and decoding
/// state live beside it in `GpuEngine`).
pub(crate) struct Model {
    pub(crate) cfg: MambaConfig,
    pub(crate) dev: Arc<Dev>,
    pub(crate) precision: Precision,
    pub(crate) shape: KernelShape,
    pub(crate) layout: Layout,
    pub(crate) params: Buf,
    /// Low-precision copy of `params` (bf16 / fp16 modes).
    pub(crate) shadow: Option<Buf>,
    /// int8 copies of the layers' projections for the decode GEMVs (`GpuEngine::quantize_int8`).
    pub(crate) q8: Option<crate::q8::Q8>,
}

impl Model {
    pub fn dt(&self) -> Dt {
        match self.precision {
            Precision::F32 => Dt::F32,
            Precision::Bf16 => Dt::Bf16,
            Precision::Fp16 => Dt::F16,
        }
    }

    /// An error unless the whole model is on the device: after a layer-by-layer step
    /// (ZeRO stage 3, `crate::layered`) the engine holds no parameters until
    /// `TrainingEngine::set_parameters` gives it some.
    pub fn whole(&self, op: &str) -> Result<()> {
        if self.params.is_paged() {
            return Err(reference::Error::Device {
                device: self.dev.name.clone(),
                msg: format!(
                    "{op}: the engine holds no parameters (it trains layer by layer, ZeRO stage \
                     3); set_parameters gives it the whole model again"
                ),
            });
        }
        Ok(())
    }

    /// Device address of the parameter at element offset `off`.
    pub fn p(&self, off: usize) -> u64 {
        self.params.at::<f32>(off)
    }

    /// The parameter at `off` as a kernel input.
    pub fn pin(&self, off: usize) -> Ptr<f32> {
        Ptr::new(self.p(off))
    }

    /// The optional parameter at `off` as a kernel input (null when absent).
    pub fn pin_opt(&self, off: Option<usize>) -> Ptr<f32> {
        Ptr::or_null(off.map(|o| self.p(o)))
    }

    /// 0: bf16, 1: fp16 (the low-precision kernels' `mode` argument).
    pub fn lp_mode(&self) -> i32 {
        (self.precision == Precision::Fp16) as i32
    }

    /// Converts the parameters into the low-precision shadow.
    pub fn refresh_shadow(&self) -> Result<()> {
        if let Some(s) = &self.shadow {
            let n = self.layout.numel;
            let p = CastLowpF32 {
                src: Ptr::new(self.params.ptr),
                ld: 1,
                rows: n as i64,
                cols: 1,
                dst: PtrMut::new(s.ptr),
                mode: self.lp_mode(),
            };
            // SAFETY: `params` holds `numel` f32 and the shadow `numel` u16 (allocated so in
            // `GpuEngine::new`).
            unsafe { cast_lowp(&self.dev, &p) }?;
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
                let p = CastLowpF32 {
                    src: Ptr::new(ptr),
                    ld: ld as i64,
                    rows: rows as i64,
                    cols: cols as i64,
                    dst: PtrMut::new(dst.ptr),
                    mode: self.lp_mode(),
                };
                // SAFETY: an activation operand names a live workspace buffer of `rows` rows
                // at stride `ld`; the low-precision slots hold the largest operand
                // (`Work::new`).
                unsafe { cast_lowp(&self.dev, &p) }?;
                Ok((dst.ptr, cols))
            }
        }
    }

    /// `o` in the GEMM precision: in bf16 / fp16 modes an activation is cast once into
    /// `ws.lp[slot]` and comes back as [`Opnd::Lp`], so several GEMMs can read one copy (valid
    /// until the next cast into that slot: a GEMM casts its first activation operand into
    /// slot 0, its second into slot 1); parameters and f32 mode pass through.
    pub fn lp_copy(&self, ws: &Work, o: Opnd, slot: usize) -> Result<Opnd> {
        match (o, &self.shadow) {
            (Opnd::A(_, _, _, cols), Some(_)) => {
                let (ptr, _) = self.operand(ws, o, slot)?;
                Ok(Opnd::Lp(ptr, cols))
            }
            _ => Ok(o),
        }
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
        // SAFETY: a parameter operand is a tensor of the layout inside the flat buffers (or
        // the shadow); activations and `c` are buffers of `ws` (or of the state), sized by
        // `Work::new` for the shape the callers pass; the low-precision copies go to `ws.lp`.
        unsafe { self.dev.gemm(ta, tb, m, n, k, a, b, c, beta, self.dt()) }
    }

    /// The norm parameters of `rows` rows with weight `w` and bias `b` (parameter offsets);
    /// every pointer null (the caller fills in what it uses).
    pub(crate) fn norm_params(&self, w: usize, b: Option<usize>) -> NormFwdF32 {
        let cfg = &self.cfg;
        NormFwdF32 {
            x_in: Ptr::NULL,
            add: Ptr::NULL,
            x_out: PtrMut::NULL,
            y: PtrMut::NULL,
            mean_out: PtrMut::NULL,
            rstd_out: PtrMut::NULL,
            w: self.pin(w),
            b: self.pin_opt(b),
            d: cfg.d_model as i64,
            eps: cfg.norm_eps as f32,
            is_layer: (cfg.norm == NormKind::Layer) as i32,
            y_lp: PtrMut::NULL,
            lp_mode: self.lp_mode(),
            x_out_lp: PtrMut::NULL,
        }
    }

    /// The fused residual add + norm over `rows` rows: `x_out = x_in + add`, `y = norm(x_out)`
    /// (and its low-precision copy `y_lp` unless 0), the row statistics into `mean`, `rstd`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn norm_fwd(
        &self,
        rows: usize,
        (x_in, add, x_out): (u64, u64, u64),
        y: u64,
        (mean, rstd): (u64, u64),
        (w, b): (usize, Option<usize>),
        y_lp: u64,
    ) -> Result<()> {
        let p = NormFwdF32 {
            x_in: Ptr::new(x_in),
            add: Ptr::new(add),
            x_out: PtrMut::new(x_out),
            y: PtrMut::new(y),
            mean_out: PtrMut::new(mean),
            rstd_out: PtrMut::new(rstd),
            y_lp: PtrMut::new(y_lp),
            ..self.norm_params(w, b)
        };
        // SAFETY: the callers pass workspace rows of `d_model` f32 (`rows` of them), row
        // statistics of `rows` f32, and parameter offsets from the layout.
        unsafe { norm_fwd(&self.dev, rows, &p) }
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

    /// Widens `ws.n` rows of `cols` values a lean workspace's layer kept in the GEMM precision
    /// (`src`, contiguous u16) into the f32 scratch `dst` (contiguous).
    pub(crate) fn widen_lp(&self, ws: &Work, src: u64, cols: usize, dst: u64) -> Result<()> {
        debug_assert!(ws.lean());
        let p = WidenLowpF32 {
            src: Ptr::new(src),
            rows: ws.n as i64,
            cols: cols as i64,
            dst: PtrMut::new(dst),
            ld: cols as i64,
            mode: self.lp_mode(),
        };
        // SAFETY: the callers pass a layer's kept copy (`xz` or `resid_in`, `n × cols` u16)
        // and the workspace's f32 scratch for it (`xz32` or `resid32`, as many f32).
        unsafe { widen_lowp(&self.dev, &p) }
    }

    /// `y[r * ld + j] += bias[j]` over `rows` rows of `cols` (nothing without a bias).
    pub(crate) fn bias_add(
        &self,
        y: u64,
        ld: usize,
        rows: usize,
        cols: usize,
        b: Option<usize>,
    ) -> Result<()> {
        let Some(off) = b else {
            return Ok(());
        };
        let p = BiasAddF32 {
            y: PtrMut::new(y),
            ld: ld as i64,
            rows: rows as i64,
            cols: cols as i64,
            b: self.pin(off),
        };
        // SAFETY: `y` is a workspace buffer of `rows` rows at stride `ld`; the bias holds
        // `cols` f32 in the parameters.
        unsafe { bias_add(&self.dev, &p) }
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
