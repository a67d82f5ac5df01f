//! Single kernels on host data, for the conformance suite: each op uploads its inputs, runs
//! the same launchers the engine runs (the kernel and its fixed-order reduction), and
//! downloads the outputs, each wrapped in sentinel padding that must come back untouched.

use std::sync::Arc;

use reference::ops::conv1d::ConvDims;
use reference::ops::norm::NormStats;
use reference::ops::selective_scan::{ScanDims, ScanGrads, ScanInputs};
use reference::{Error, NormKind, Result};

use super::conv1d::{
    conv1d_bwd_dw_partial, conv1d_bwd_dx, conv1d_bwd_init, conv1d_fwd, conv1d_last,
    Conv1dBwdDwPartialF32, Conv1dBwdDxF32, Conv1dBwdInitF32, Conv1dFwdF32, Conv1dLastF32,
    ConvInF32,
};
use super::decode::{ssm_update, SsmUpdateF32};
use super::elementwise::{colsum_final, ColsumFinalF32};
use super::norm::{
    norm_bwd_dw_partial, norm_bwd_dx, norm_fwd, NormBwdDwPartialF32, NormBwdDxF32, NormFwdF32,
};
use super::selective_scan::{
    plan_segments, scan_blocks, scan_fwd_segments, scan_reduce_batch, scan_reduce_bc,
    scan_seg_count, scan_seg_floats, selective_scan_bwd, selective_scan_fwd, ScanInF32,
    ScanReduceBatchF32, ScanReduceBcF32, SelectiveScanBwdF32, SelectiveScanFwdF32,
};
use crate::cuda::{Buf, Dev};
use crate::kernels::KernelShape;
use crate::params::{Ptr, PtrMut};
use crate::work::{doc_starts, row_blocks};

mod loss;

/// Elements of sentinel padding on each side of every output.
pub const PAD: usize = 61;
/// The sentinel: a quiet NaN with a payload no kernel writes.
pub const SENTINEL: u32 = 0x7fc0_dead;

/// A device for op-level checks, its kernels built for `d_state` and `d_conv`.
pub struct OpDev {
    dev: Arc<Dev>,
    shape: KernelShape,
}

/// An output buffer with sentinel padding.
struct Guarded {
    buf: Buf,
    len: usize,
    what: &'static str,
}

impl Guarded {
    fn ptr(&self) -> PtrMut<f32> {
        PtrMut::new(self.buf.at::<f32>(PAD))
    }
}

fn ro(b: &Buf) -> Ptr<f32> {
    Ptr::new(b.ptr)
}

fn ro_opt(b: &Option<Buf>) -> Ptr<f32> {
    Ptr::or_null(b.as_ref().map(|b| b.ptr))
}

impl OpDev {
    pub fn open(d_state: usize, d_conv: usize) -> Result<OpDev> {
        let d_state_pad = d_state.next_power_of_two();
        let shape = KernelShape {
            d_state_pad,
            d_conv,
            chunk: crate::kernels::scan_chunk_for(d_state_pad)?,
        };
        Ok(OpDev {
            dev: Arc::new(Dev::open(0, shape, &super::all_kernels())?),
            shape,
        })
    }

    /// Shared memory the device granted the cross-entropy kernel for a staged row, and the
    /// compute capability's major number.
    pub fn ce_stage_bytes(&self) -> (usize, i32) {
        let cc = self.dev.ctx.compute_capability().map_or(0, |c| c.0);
        (self.dev.ce_stage_bytes, cc)
    }

    fn put<T: Copy>(&self, v: &[T]) -> Result<Buf> {
        self.dev.upload(v)
    }

    fn out(&self, len: usize, what: &'static str) -> Result<Guarded> {
        let host = vec![f32::from_bits(SENTINEL); len + 2 * PAD];
        Ok(Guarded {
            buf: self.dev.upload(&host)?,
            len,
            what,
        })
    }

    /// Downloads the interior; an error if a sentinel moved.
    fn take(&self, g: Guarded) -> Result<Vec<f32>> {
        let mut host = vec![0f32; g.len + 2 * PAD];
        g.buf.read(0, &mut host)?;
        let pads = host[..PAD].iter().chain(&host[PAD + g.len..]);
        if let Some(bad) = pads.map(|v| v.to_bits()).find(|&b| b != SENTINEL) {
            return Err(Error::Device {
                device: self.dev.name.clone(),
                msg: format!(
                    "{}: a write past the end of the output (sentinel now {bad:#x})",
                    g.what
                ),
            });
        }
        Ok(host[PAD..PAD + g.len].to_vec())
    }

    /// Positions per stored scan state in this build.
    pub fn chunk(&self) -> usize {
        self.shape.chunk
    }

    /// Positions per scan segment for `segs` segments (`None`: the engine's choice).
    fn seg_len(&self, d: ScanDims, segs: Option<usize>) -> Result<usize> {
        let (sm, chunk) = (self.dev.sm_count, self.shape.chunk);
        Ok(match segs {
            None => scan_fwd_segments(sm, d.batch, d.seq_len, d.d_inner, chunk)?,
            Some(n) => plan_segments(sm, d.batch, d.seq_len, d.d_inner, chunk, Some(n)),
        })
    }

    fn scan_common(&self, inp: &ScanInputs<f32>) -> Result<ScanBufs> {
        let d = inp.dims;
        let n = d.batch * d.seq_len;
        let mut xbc = Vec::with_capacity(n * 2 * d.d_state);
        for r in 0..n {
            xbc.extend_from_slice(&inp.b[r * d.d_state..(r + 1) * d.d_state]);
            xbc.extend_from_slice(&inp.c[r * d.d_state..(r + 1) * d.d_state]);
        }
        let a_log: Vec<f32> = inp.a.iter().map(|&a| (-a).ln()).collect();
        Ok(ScanBufs {
            u: self.put(inp.u)?,
            delta: self.put(inp.delta)?,
            a_log: self.put(&a_log)?,
            xbc: self.put(&xbc)?,
            d: self.put(inp.d)?,
            z: inp.z.map(|z| self.put(z)).transpose()?,
            bias: self.put(inp.delta_bias)?,
            starts: self.put(&doc_starts(inp.resets, d.batch, d.seq_len))?,
            h0: inp.h0.map(|h| self.put(h)).transpose()?,
            chunks: self.dev.alloc(
                4 * d.batch * d.seq_len.div_ceil(self.shape.chunk) * d.d_inner * d.d_state,
            )?,
        })
    }

    fn scan_in(&self, inp: &ScanInputs<f32>, s: &ScanBufs) -> ScanInF32 {
        let d = inp.dims;
        ScanInF32 {
            u: ro(&s.u),
            delta: ro(&s.delta),
            a_log: ro(&s.a_log),
            xbc: ro(&s.xbc),
            ldbc: 2 * d.d_state as i64,
            col_b: 0,
            dvec: ro(&s.d),
            z: ro_opt(&s.z),
            ldz: d.d_inner as i64,
            dt_bias: ro(&s.bias),
            starts: Ptr::new(s.starts.ptr),
        }
    }

    /// The forward scan into `out` and `last`; returns the positions per segment it ran with.
    fn scan_fwd_launch(
        &self,
        inp: &ScanInputs<f32>,
        s: &ScanBufs,
        out: PtrMut<f32>,
        last: PtrMut<f32>,
        segs: Option<usize>,
    ) -> Result<usize> {
        let d = inp.dims;
        let seg_len = self.seg_len(d, segs)?;
        let floats = scan_seg_floats(d.batch, d.seq_len, d.d_inner, d.d_state, seg_len);
        let seg = self.dev.alloc(4 * 2 * floats)?;
        let p = SelectiveScanFwdF32 {
            scan: self.scan_in(inp, s),
            h0: ro_opt(&s.h0),
            out,
            chunk_states: PtrMut::new(s.chunks.ptr),
            last,
            batch: d.batch as i64,
            seq_len: d.seq_len as i64,
            d_inner: d.d_inner as i64,
            d_state: d.d_state as i64,
            out_lp: PtrMut::NULL,
            lp_mode: 0,
            seg_len: seg_len as i64,
            seg_p: PtrMut::new(seg.ptr),
            seg_q: PtrMut::new(seg.at::<f32>(floats)),
            seg_pass: 0,
        };
        // SAFETY: `scan_common` uploaded every input at the shapes of `inp.dims` (checked by
        // the caller's `ScanInputs`), and sized the chunk states for this build's chunk; `out`
        // and `last` hold `batch * seq_len * d_inner` and `batch * d_inner * d_state` f32;
        // `seg` holds both state maps of `seg_len`, a multiple of the chunk.
        unsafe { selective_scan_fwd(&self.dev, &p) }?;
        self.dev.sync()?;
        Ok(seg_len)
    }

    /// `selective_scan_fwd` on the device: (out, final state), cut into the segments the
    /// engine would choose for this shape.
    pub fn selective_scan_fwd(&self, inp: &ScanInputs<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        self.selective_scan_fwd_segs(inp, None)
            .map(|(o, l, _)| (o, l))
    }

    /// `selective_scan_fwd` on the device cut into `segs` segments of whole chunks (`None`:
    /// the engine's choice): (out, final state, the segments it ran).
    pub fn selective_scan_fwd_segs(
        &self,
        inp: &ScanInputs<f32>,
        segs: Option<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>, usize)> {
        let d = inp.dims;
        let s = self.scan_common(inp)?;
        let out = self.out(d.batch * d.seq_len * d.d_inner, "selective_scan_fwd out")?;
        let last = self.out(d.batch * d.d_inner * d.d_state, "selective_scan_fwd last")?;
        let seg_len = self.scan_fwd_launch(inp, &s, out.ptr(), last.ptr(), segs)?;
        let ran = scan_seg_count(d.seq_len, seg_len);
        Ok((self.take(out)?, self.take(last)?, ran))
    }

    /// One decode step of the scan (`ssm_update_f32`, the step batches above the GEMV's rows
    /// run) for `seq_len` 1: (out, the state after the step). The state starts at `inp.h0`
    /// (zeros without it) and is updated in place, between sentinels: 16-byte aligned where
    /// `aligned` (the kernel's 16-byte path), else 4 bytes past (its one-value path).
    pub fn ssm_update(&self, inp: &ScanInputs<f32>, aligned: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        let d = inp.dims;
        if d.seq_len != 1 {
            return Err(Error::Shape {
                op: "ssm_update",
                msg: format!("one position a step, not {}", d.seq_len),
            });
        }
        let s = self.scan_common(inp)?;
        let n_state = d.batch * d.d_inner * d.d_state;
        // PAD + 3 floats is 256 bytes into the allocation; the 3 floats on the other side stay
        // sentinels.
        let skew = if aligned { 3 } else { 0 };
        let state = self.out(n_state + 3, "ssm_update state")?;
        let zeros = vec![0f32; n_state];
        state.buf.write(PAD + skew, inp.h0.unwrap_or(&zeros))?;
        let out = self.out(d.batch * d.d_inner, "ssm_update out")?;
        let p = SsmUpdateF32 {
            scan: self.scan_in(inp, &s),
            h_state: PtrMut::new(state.buf.at::<f32>(PAD + skew)),
            out: out.ptr(),
            out_lp: PtrMut::NULL,
            lp_mode: 0,
            batch: d.batch as i64,
            d_inner: d.d_inner as i64,
            d_state: d.d_state as i64,
        };
        // SAFETY: `scan_common` uploaded every input for one position of `inp.dims`; the state
        // holds `batch * d_inner * d_state` f32 and `out` `batch * d_inner`.
        unsafe { ssm_update(&self.dev, &p) }?;
        let all = self.take(state)?;
        let (before, rest) = all.split_at(skew);
        let (h, after) = rest.split_at(n_state);
        if before.iter().chain(after).any(|v| v.to_bits() != SENTINEL) {
            return Err(Error::Device {
                device: self.dev.name.clone(),
                msg: "ssm_update state: a write outside the state".into(),
            });
        }
        Ok((self.take(out)?, h.to_vec()))
    }

    /// `selective_scan_bwd` on the device (the forward runs first for the chunk states), in
    /// the segments the engine would choose.
    pub fn selective_scan_bwd(
        &self,
        inp: &ScanInputs<f32>,
        dout: &[f32],
    ) -> Result<ScanGrads<f32>> {
        self.selective_scan_bwd_segs(inp, dout, None)
    }

    /// `selective_scan_bwd` on the device, forward and backward cut into `segs` segments
    /// (`None`: the engine's choice).
    pub fn selective_scan_bwd_segs(
        &self,
        inp: &ScanInputs<f32>,
        dout: &[f32],
        segs: Option<usize>,
    ) -> Result<ScanGrads<f32>> {
        let d = inp.dims;
        let (n, di, ds) = (d.batch * d.seq_len, d.d_inner, d.d_state);
        let s = self.scan_common(inp)?;
        let tmp = self.dev.alloc(4 * n * di)?;
        let seg_len = self.scan_fwd_launch(inp, &s, PtrMut::new(tmp.ptr), PtrMut::NULL, segs)?;
        let n_seg = scan_seg_count(d.seq_len, seg_len);
        let floats = scan_seg_floats(d.batch, d.seq_len, di, ds, seg_len);
        let seg = self.dev.alloc(4 * 2 * floats)?;
        let nblk = scan_blocks(di);
        let dout = self.put(dout)?;
        let du = self.out(n * di, "scan du")?;
        let ddelta = self.out(n * di, "scan ddelta")?;
        let dz = self.out(n * di, "scan dz")?;
        let part_bc = self.dev.alloc(4 * nblk * n * 2 * ds)?;
        let rows = n_seg * d.batch;
        let (pa, pd, pdb) = (
            self.dev.alloc(4 * rows * di * ds)?,
            self.dev.alloc(4 * rows * di)?,
            self.dev.alloc(4 * rows * di)?,
        );
        let dh0 = self.out(d.batch * di * ds, "scan dh0")?;
        let p = SelectiveScanBwdF32 {
            scan: self.scan_in(inp, &s),
            chunk_states: Ptr::new(s.chunks.ptr),
            dout: ro(&dout),
            du_out: du.ptr(),
            ddelta_out: ddelta.ptr(),
            dz_out: dz.ptr(),
            ldz_out: di as i64,
            part_bc: PtrMut::new(part_bc.ptr),
            part_a: PtrMut::new(pa.ptr),
            part_d: PtrMut::new(pd.ptr),
            part_db: PtrMut::new(pdb.ptr),
            dh_last: Ptr::NULL,
            dh0: dh0.ptr(),
            batch: d.batch as i64,
            seq_len: d.seq_len as i64,
            d_inner: di as i64,
            d_state: ds as i64,

            gated_lp: PtrMut::NULL,
            ddelta_lp: PtrMut::NULL,
            dz_lp: PtrMut::NULL,
            lp_mode: 0,
            seg_len: seg_len as i64,
            seg_p: PtrMut::new(seg.ptr),
            seg_q: PtrMut::new(seg.at::<f32>(floats)),
        };
        // SAFETY: the inputs as in `scan_fwd_launch`, whose chunk states the forward above
        // wrote (in the same segments); every output and partial buffer is allocated here at
        // the kernel's extents.
        unsafe { selective_scan_bwd(&self.dev, &p) }?;
        let dbc = self.out(n * 2 * ds, "scan dB/dC")?;
        let p = ScanReduceBcF32 {
            part_bc: Ptr::new(part_bc.ptr),
            n_blocks: nblk as i64,
            rows: n as i64,
            d_state: ds as i64,
            out: dbc.ptr(),
            ldo: 2 * ds as i64,
        };
        // SAFETY: the partials of the backward above; `dbc` holds `n * 2 d_state` f32.
        unsafe { scan_reduce_bc(&self.dev, &p) }?;
        let [da, dd, ddb] = self.scan_reduce_batch(rows, di, ds, [&pa, &pd, &pdb])?;
        let dbc = self.take(dbc)?;
        let (mut gb, mut gc) = (Vec::with_capacity(n * ds), Vec::with_capacity(n * ds));
        for r in 0..n {
            gb.extend_from_slice(&dbc[r * 2 * ds..r * 2 * ds + ds]);
            gc.extend_from_slice(&dbc[r * 2 * ds + ds..(r + 1) * 2 * ds]);
        }
        let dz = self.take(dz)?;
        Ok(ScanGrads {
            u: self.take(du)?,
            delta: self.take(ddelta)?,
            a: self.take(da)?,
            b: gb,
            c: gc,
            d: self.take(dd)?,
            z: inp.z.map(|_| dz),
            delta_bias: self.take(ddb)?,
            h0: self.take(dh0)?,
        })
    }

    /// The batch sums of the scan backward's partials `[part_a, part_d, part_db]`: (dA, dD, d
    /// delta_bias), each from zero.
    fn scan_reduce_batch(
        &self,
        batch: usize,
        di: usize,
        ds: usize,
        parts: [&Buf; 3],
    ) -> Result<[Guarded; 3]> {
        let out = [
            self.zeros_guarded(di * ds, "scan dA")?,
            self.zeros_guarded(di, "scan dD")?,
            self.zeros_guarded(di, "scan d delta_bias")?,
        ];
        for ((part, m), dst) in parts.iter().zip([di * ds, di, di]).zip(&out) {
            // Destinations start at 0 (the kernel adds).
            let p = ScanReduceBatchF32 {
                part: ro(part),
                batch: batch as i64,
                m: m as i64,
                dst: dst.ptr(),
                a_log: Ptr::NULL,
            };
            // SAFETY: `part` holds `batch * m` partials, `dst` `m` f32.
            unsafe { scan_reduce_batch(&self.dev, &p) }?;
        }
        Ok(out)
    }

    /// `conv1d_fwd` (+ the SiLU output the engine also writes): (u, silu(u), final window).
    pub fn conv1d_fwd(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        resets: Option<&[bool]>,
        init: Option<&[f32]>,
        dims: ConvDims,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let n = dims.batch * dims.seq_len;
        let km1 = dims.d_conv - 1;
        let (xb, wb) = (self.put(x)?, self.put(w)?);
        let bb = bias.map(|b| self.put(b)).transpose()?;
        let starts = self.put(&doc_starts(resets, dims.batch, dims.seq_len))?;
        let ib = init.map(|i| self.put(i)).transpose()?;
        let u = self.out(n * dims.d_inner, "conv1d_fwd u")?;
        let xs = self.out(n * dims.d_inner, "conv1d_fwd silu")?;
        let last = self.out(dims.batch * dims.d_inner * km1, "conv1d_fwd last")?;
        let (bi, ip) = (
            bb.as_ref().map_or(0, |b| b.ptr),
            ib.as_ref().map_or(0, |b| b.ptr),
        );
        let (batch, l, di) = (dims.batch as i64, dims.seq_len as i64, dims.d_inner as i64);
        let fwd = Conv1dFwdF32 {
            conv: ConvInF32 {
                x: ro(&xb),
                ldx: di,
                w: ro(&wb),
                bias: Ptr::new(bi),
                starts: Ptr::new(starts.ptr),
            },
            init: Ptr::new(ip),
            u: u.ptr(),
            xs: xs.ptr(),
            xs_lp: PtrMut::NULL,
            lp_mode: 0,
            batch,
            seq_len: l,
            d_inner: di,
        };
        let lastp = Conv1dLastF32 {
            x: ro(&xb),
            ldx: di,
            starts: Ptr::new(starts.ptr),
            init: Ptr::new(ip),
            last: last.ptr(),
            batch,
            seq_len: l,
            d_inner: di,
        };
        // SAFETY: every input uploaded here at the shapes of `dims` (the device was opened
        // for `dims.d_conv`); the outputs are allocated at the kernels' extents.
        unsafe {
            conv1d_fwd(&self.dev, &fwd)?;
            conv1d_last(&self.dev, &lastp)?;
        }
        Ok((self.take(u)?, self.take(xs)?, self.take(last)?))
    }

    /// `conv1d_bwd`: (dx, d init, grad_w, grad_bias) with the gradients starting at zero.
    #[allow(clippy::type_complexity)]
    pub fn conv1d_bwd(
        &self,
        x: &[f32],
        w: &[f32],
        du: &[f32],
        resets: Option<&[bool]>,
        init: Option<&[f32]>,
        dims: ConvDims,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)> {
        let n = dims.batch * dims.seq_len;
        let (di, dc, km1) = (dims.d_inner, dims.d_conv, dims.d_conv - 1);
        let (xb, wb, dub) = (self.put(x)?, self.put(w)?, self.put(du)?);
        let starts = self.put(&doc_starts(resets, dims.batch, dims.seq_len))?;
        let ib = init.map(|i| self.put(i)).transpose()?;
        let ip = ib.as_ref().map_or(0, |b| b.ptr);
        let (batch, l, dil) = (dims.batch as i64, dims.seq_len as i64, di as i64);
        let dx = self.out(n * di, "conv1d_bwd dx")?;
        let dinit = self.out(dims.batch * di * km1, "conv1d_bwd dinit")?;
        let (n_rb, rows_per) = row_blocks(n);
        let (pw, pb) = (
            self.dev.alloc(4 * n_rb * di * dc)?,
            self.dev.alloc(4 * n_rb * di)?,
        );
        let (du, w, st) = (ro(&dub), ro(&wb), Ptr::new(starts.ptr));
        let dxp = Conv1dBwdDxF32 {
            du,
            w,
            starts: st,
            dx: dx.ptr(),
            ldx: dil,
            batch,
            seq_len: l,
            d_inner: dil,
            u: Ptr::NULL,
            g_out: PtrMut::NULL,
            dx_lp: PtrMut::NULL,
            lp_mode: 0,
            d_last: Ptr::NULL,
        };
        let initp = Conv1dBwdInitF32 {
            du,
            w,
            starts: st,
            dinit: dinit.ptr(),
            batch,
            seq_len: l,
            d_inner: dil,
        };
        let dwp = Conv1dBwdDwPartialF32 {
            x: ro(&xb),
            ldx: dil,
            du,
            starts: st,
            init: Ptr::new(ip),
            batch,
            seq_len: l,
            d_inner: dil,
            rows_per: rows_per as i64,
            part_w: PtrMut::new(pw.ptr),
            part_b: PtrMut::new(pb.ptr),
        };
        // SAFETY: every input uploaded here at the shapes of `dims`; outputs and partials
        // allocated at the kernels' extents.
        unsafe {
            conv1d_bwd_dx(&self.dev, &dxp)?;
            conv1d_bwd_init(&self.dev, &initp)?;
            conv1d_bwd_dw_partial(&self.dev, &dwp)?;
        }
        let gw = self.zeros_guarded(di * dc, "conv1d_bwd grad_w")?;
        let gb = self.zeros_guarded(di, "conv1d_bwd grad_bias")?;
        self.colsum_final(&pw, n_rb, di * dc, gw.ptr())?;
        self.colsum_final(&pb, n_rb, di, gb.ptr())?;
        Ok((
            self.take(dx)?,
            self.take(dinit)?,
            self.take(gw)?,
            self.take(gb)?,
        ))
    }

    /// `dst += Σ_rb part[rb, :]` over `n_rb` partials of `cols` columns.
    fn colsum_final(&self, part: &Buf, n_rb: usize, cols: usize, dst: PtrMut<f32>) -> Result<()> {
        let p = ColsumFinalF32 {
            partial: ro(part),
            n_rb: n_rb as i64,
            cols: cols as i64,
            dst,
        };
        // SAFETY: `part` holds `n_rb * cols` f32 (allocated by the caller), `dst` `cols`.
        unsafe { colsum_final(&self.dev, &p) }
    }

    fn zeros_guarded(&self, len: usize, what: &'static str) -> Result<Guarded> {
        let g = self.out(len, what)?;
        g.buf.write(PAD, &vec![0f32; len])?;
        Ok(g)
    }

    /// Fused residual add + norm: (x + add, norm(x + add), mean, rstd).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn add_norm_fwd(
        &self,
        kind: NormKind,
        x: &[f32],
        add: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        eps: f64,
        n: usize,
        d: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, NormStats<f32>)> {
        let (xb, ab, wb) = (self.put(x)?, self.put(add)?, self.put(w)?);
        let bb = bias.map(|b| self.put(b)).transpose()?;
        let xo = self.out(n * d, "norm_fwd residual")?;
        let y = self.out(n * d, "norm_fwd y")?;
        let mean = self.out(n, "norm_fwd mean")?;
        let rstd = self.out(n, "norm_fwd rstd")?;
        let p = NormFwdF32 {
            x_in: ro(&xb),
            add: ro(&ab),
            x_out: xo.ptr(),
            y: y.ptr(),
            mean_out: mean.ptr(),
            rstd_out: rstd.ptr(),
            w: ro(&wb),
            b: ro_opt(&bb),
            d: d as i64,
            eps: eps as f32,
            is_layer: (kind == NormKind::Layer) as i32,
            y_lp: PtrMut::NULL,
            lp_mode: 0,
            x_out_lp: PtrMut::NULL,
        };
        // SAFETY: inputs uploaded here (`n * d`, `d` values), outputs allocated at `n * d`
        // and `n`.
        unsafe { norm_fwd(&self.dev, n, &p) }?;
        let stats = NormStats {
            mean: self.take(mean)?,
            rstd: self.take(rstd)?,
        };
        Ok((self.take(xo)?, self.take(y)?, stats))
    }

    /// Norm backward: (dx, grad_w, grad_bias) with the gradients starting at zero.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn norm_bwd(
        &self,
        kind: NormKind,
        x: &[f32],
        w: &[f32],
        stats: &NormStats<f32>,
        dy: &[f32],
        n: usize,
        d: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (xb, wb, dyb) = (self.put(x)?, self.put(w)?, self.put(dy)?);
        let (mb, rb) = (self.put(&stats.mean)?, self.put(&stats.rstd)?);
        let dx = self.out(n * d, "norm_bwd dx")?;
        let is_layer = (kind == NormKind::Layer) as i32;
        let (n_rb, rows_per) = row_blocks(n);
        let (pw, pb) = (self.dev.alloc(4 * n_rb * d)?, self.dev.alloc(4 * n_rb * d)?);
        let dxp = NormBwdDxF32 {
            x: ro(&xb),
            w: ro(&wb),
            mean_in: ro(&mb),
            rstd_in: ro(&rb),
            dy: ro(&dyb),
            dx_out: dx.ptr(),
            d: d as i64,
            is_layer,
            accum: 0,
        };
        let dwp = NormBwdDwPartialF32 {
            x: ro(&xb),
            mean_in: ro(&mb),
            rstd_in: ro(&rb),
            dy: ro(&dyb),
            rows: n as i64,
            d: d as i64,
            rows_per: rows_per as i64,
            part_w: PtrMut::new(pw.ptr),
            part_b: PtrMut::new(pb.ptr),
        };
        // SAFETY: inputs uploaded here (`n * d`, `n`, `d` values); outputs and partials
        // allocated at the kernels' extents.
        unsafe {
            norm_bwd_dx(&self.dev, n, &dxp)?;
            norm_bwd_dw_partial(&self.dev, &dwp)?;
        }
        let gw = self.zeros_guarded(d, "norm_bwd grad_w")?;
        let gb = self.zeros_guarded(d, "norm_bwd grad_bias")?;
        self.colsum_final(&pw, n_rb, d, gw.ptr())?;
        self.colsum_final(&pb, n_rb, d, gb.ptr())?;
        Ok((self.take(dx)?, self.take(gw)?, self.take(gb)?))
    }
}

struct ScanBufs {
    u: Buf,
    delta: Buf,
    a_log: Buf,
    xbc: Buf,
    d: Buf,
    z: Option<Buf>,
    bias: Buf,
    starts: Buf,
    h0: Option<Buf>,
    chunks: Buf,
}
