//! Single kernels on host data, for the conformance suite: each op runs one kernel (or the
//! kernel and its fixed-order reduction) exactly as the engine does, with every output
//! buffer wrapped in sentinel padding that must come back untouched.

use std::sync::Arc;

use reference::ops::conv1d::ConvDims;
use reference::ops::norm::NormStats;
use reference::ops::selective_scan::{ScanGrads, ScanInputs};
use reference::{Error, NormKind, Result};

use crate::cuda::{Arg, Buf, Dev};
use crate::engine::doc_starts;
use crate::kernels::{scan_bwd_smem, KernelShape, SCAN_THREADS};
use crate::work::row_blocks;

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
    fn ptr(&self) -> u64 {
        self.buf.at::<f32>(PAD)
    }
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
            dev: Arc::new(Dev::open(0, shape)?),
            shape,
        })
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

    fn scan_fwd_launch(
        &self,
        inp: &ScanInputs<f32>,
        s: &ScanBufs,
        out: u64,
        last: u64,
    ) -> Result<()> {
        let d = inp.dims;
        let nblk = d.d_inner.div_ceil(SCAN_THREADS);
        self.dev.launch(
            "selective_scan_fwd_f32",
            (nblk as u32, d.batch as u32, 1),
            crate::kernels::SCAN_FWD_THREADS as u32,
            0,
            &[
                Arg::P(s.u.ptr),
                Arg::P(s.delta.ptr),
                Arg::P(s.a_log.ptr),
                Arg::P(s.xbc.ptr),
                Arg::L(2 * d.d_state as i64),
                Arg::L(0),
                Arg::P(s.d.ptr),
                Arg::P(s.z.as_ref().map_or(0, |z| z.ptr)),
                Arg::L(d.d_inner as i64),
                Arg::P(s.bias.ptr),
                Arg::P(s.starts.ptr),
                Arg::P(s.h0.as_ref().map_or(0, |h| h.ptr)),
                Arg::P(out),
                Arg::P(s.chunks.ptr),
                Arg::P(last),
                Arg::L(d.batch as i64),
                Arg::L(d.seq_len as i64),
                Arg::L(d.d_inner as i64),
                Arg::L(d.d_state as i64),
            ],
        )
    }

    /// `selective_scan_fwd` on the device: (out, final state).
    pub fn selective_scan_fwd(&self, inp: &ScanInputs<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        let d = inp.dims;
        let s = self.scan_common(inp)?;
        let out = self.out(d.batch * d.seq_len * d.d_inner, "selective_scan_fwd out")?;
        let last = self.out(d.batch * d.d_inner * d.d_state, "selective_scan_fwd last")?;
        self.scan_fwd_launch(inp, &s, out.ptr(), last.ptr())?;
        Ok((self.take(out)?, self.take(last)?))
    }

    /// `selective_scan_bwd` on the device (the forward runs first for the chunk states).
    pub fn selective_scan_bwd(
        &self,
        inp: &ScanInputs<f32>,
        dout: &[f32],
    ) -> Result<ScanGrads<f32>> {
        let d = inp.dims;
        let (n, di, ds) = (d.batch * d.seq_len, d.d_inner, d.d_state);
        let s = self.scan_common(inp)?;
        let tmp = self.dev.alloc(4 * n * di)?;
        self.scan_fwd_launch(inp, &s, tmp.ptr, 0)?;
        let nblk = di.div_ceil(SCAN_THREADS);
        let dout = self.put(dout)?;
        let du = self.out(n * di, "scan du")?;
        let ddelta = self.out(n * di, "scan ddelta")?;
        let dz = self.out(n * di, "scan dz")?;
        let part_bc = self.dev.alloc(4 * nblk * n * 2 * ds)?;
        let (pa, pd, pdb) = (
            self.dev.alloc(4 * d.batch * di * ds)?,
            self.dev.alloc(4 * d.batch * di)?,
            self.dev.alloc(4 * d.batch * di)?,
        );
        let dh0 = self.out(d.batch * di * ds, "scan dh0")?;
        self.dev.launch(
            crate::kernels::scan_bwd_kernel(),
            (nblk as u32, d.batch as u32, 1),
            SCAN_THREADS as u32,
            scan_bwd_smem(self.shape) as u32,
            &[
                Arg::P(s.u.ptr),
                Arg::P(s.delta.ptr),
                Arg::P(s.a_log.ptr),
                Arg::P(s.xbc.ptr),
                Arg::L(2 * ds as i64),
                Arg::L(0),
                Arg::P(s.d.ptr),
                Arg::P(s.z.as_ref().map_or(0, |z| z.ptr)),
                Arg::L(di as i64),
                Arg::P(s.bias.ptr),
                Arg::P(s.starts.ptr),
                Arg::P(s.chunks.ptr),
                Arg::P(dout.ptr),
                Arg::P(du.ptr()),
                Arg::P(ddelta.ptr()),
                Arg::P(dz.ptr()),
                Arg::L(di as i64),
                Arg::P(part_bc.ptr),
                Arg::P(pa.ptr),
                Arg::P(pd.ptr),
                Arg::P(pdb.ptr),
                Arg::P(dh0.ptr()),
                Arg::L(d.batch as i64),
                Arg::L(d.seq_len as i64),
                Arg::L(di as i64),
                Arg::L(ds as i64),
            ],
        )?;
        let dbc = self.out(n * 2 * ds, "scan dB/dC")?;
        self.dev.launch(
            "scan_reduce_bc_f32",
            self.dev.grid1d(n * 2 * ds),
            256,
            0,
            &[
                Arg::P(part_bc.ptr),
                Arg::L(nblk as i64),
                Arg::L(n as i64),
                Arg::L(ds as i64),
                Arg::P(dbc.ptr()),
                Arg::L(2 * ds as i64),
            ],
        )?;
        let da = self.zeros_guarded(di * ds, "scan dA")?;
        let dd = self.zeros_guarded(di, "scan dD")?;
        let ddb = self.zeros_guarded(di, "scan d delta_bias")?;
        for (part, m, dst) in [
            (pa.ptr, di * ds, da.ptr()),
            (pd.ptr, di, dd.ptr()),
            (pdb.ptr, di, ddb.ptr()),
        ] {
            // Destinations start at 0 (the kernel adds).
            self.dev.launch(
                "scan_reduce_batch_f32",
                self.dev.grid1d(m),
                256,
                0,
                &[
                    Arg::P(part),
                    Arg::L(d.batch as i64),
                    Arg::L(m as i64),
                    Arg::P(dst),
                    Arg::P(0),
                ],
            )?;
        }
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
        self.dev.launch(
            "conv1d_fwd_f32",
            self.dev.grid1d(n * dims.d_inner),
            256,
            0,
            &[
                Arg::P(xb.ptr),
                Arg::L(di),
                Arg::P(wb.ptr),
                Arg::P(bi),
                Arg::P(starts.ptr),
                Arg::P(ip),
                Arg::P(u.ptr()),
                Arg::P(xs.ptr()),
                Arg::L(batch),
                Arg::L(l),
                Arg::L(di),
            ],
        )?;
        if km1 > 0 {
            self.dev.launch(
                "conv1d_last_f32",
                self.dev.grid1d(dims.batch * dims.d_inner * km1),
                256,
                0,
                &[
                    Arg::P(xb.ptr),
                    Arg::L(di),
                    Arg::P(starts.ptr),
                    Arg::P(ip),
                    Arg::P(last.ptr()),
                    Arg::L(batch),
                    Arg::L(l),
                    Arg::L(di),
                ],
            )?;
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
        self.dev.launch(
            "conv1d_bwd_dx_f32",
            self.dev.grid1d(n * di),
            256,
            0,
            &[
                Arg::P(dub.ptr),
                Arg::P(wb.ptr),
                Arg::P(starts.ptr),
                Arg::P(dx.ptr()),
                Arg::L(dil),
                Arg::L(batch),
                Arg::L(l),
                Arg::L(dil),
            ],
        )?;
        if km1 > 0 {
            self.dev.launch(
                "conv1d_bwd_init_f32",
                self.dev.grid1d(dims.batch * di * km1),
                256,
                0,
                &[
                    Arg::P(dub.ptr),
                    Arg::P(wb.ptr),
                    Arg::P(starts.ptr),
                    Arg::P(dinit.ptr()),
                    Arg::L(batch),
                    Arg::L(l),
                    Arg::L(dil),
                ],
            )?;
        }
        let (n_rb, rows_per) = row_blocks(n);
        let (pw, pb) = (
            self.dev.alloc(4 * n_rb * di * dc)?,
            self.dev.alloc(4 * n_rb * di)?,
        );
        self.dev.launch(
            "conv1d_bwd_dw_partial_f32",
            (di.div_ceil(256) as u32, n_rb as u32, 1),
            256,
            0,
            &[
                Arg::P(xb.ptr),
                Arg::L(dil),
                Arg::P(dub.ptr),
                Arg::P(starts.ptr),
                Arg::P(ip),
                Arg::L(batch),
                Arg::L(l),
                Arg::L(dil),
                Arg::L(rows_per as i64),
                Arg::P(pw.ptr),
                Arg::P(pb.ptr),
            ],
        )?;
        let gw = self.zeros_guarded(di * dc, "conv1d_bwd grad_w")?;
        let gb = self.zeros_guarded(di, "conv1d_bwd grad_bias")?;
        self.dev.colsum_final(pw.ptr, n_rb, di * dc, gw.ptr())?;
        self.dev.colsum_final(pb.ptr, n_rb, di, gb.ptr())?;
        Ok((
            self.take(dx)?,
            self.take(dinit)?,
            self.take(gw)?,
            self.take(gb)?,
        ))
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
        self.dev.launch(
            "norm_fwd_f32",
            (n as u32, 1, 1),
            256,
            0,
            &[
                Arg::P(xb.ptr),
                Arg::P(ab.ptr),
                Arg::P(xo.ptr()),
                Arg::P(y.ptr()),
                Arg::P(mean.ptr()),
                Arg::P(rstd.ptr()),
                Arg::P(wb.ptr),
                Arg::P(bb.as_ref().map_or(0, |b| b.ptr)),
                Arg::L(d as i64),
                Arg::F(eps as f32),
                Arg::I((kind == NormKind::Layer) as i32),
                Arg::P(0),
                Arg::I(0),
            ],
        )?;
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
        self.dev.launch(
            "norm_bwd_dx_f32",
            (n as u32, 1, 1),
            256,
            0,
            &[
                Arg::P(xb.ptr),
                Arg::P(wb.ptr),
                Arg::P(mb.ptr),
                Arg::P(rb.ptr),
                Arg::P(dyb.ptr),
                Arg::P(dx.ptr()),
                Arg::L(d as i64),
                Arg::I(is_layer),
                Arg::I(0),
            ],
        )?;
        let (n_rb, rows_per) = row_blocks(n);
        let (pw, pb) = (self.dev.alloc(4 * n_rb * d)?, self.dev.alloc(4 * n_rb * d)?);
        self.dev.launch(
            "norm_bwd_dw_partial_f32",
            (d.div_ceil(256) as u32, n_rb as u32, 1),
            256,
            0,
            &[
                Arg::P(xb.ptr),
                Arg::P(mb.ptr),
                Arg::P(rb.ptr),
                Arg::P(dyb.ptr),
                Arg::L(n as i64),
                Arg::L(d as i64),
                Arg::L(rows_per as i64),
                Arg::P(pw.ptr),
                Arg::P(pb.ptr),
            ],
        )?;
        let gw = self.zeros_guarded(d, "norm_bwd grad_w")?;
        let gb = self.zeros_guarded(d, "norm_bwd grad_bias")?;
        self.dev.colsum_final(pw.ptr, n_rb, d, gw.ptr())?;
        self.dev.colsum_final(pb.ptr, n_rb, d, gb.ptr())?;
        Ok((self.take(dx)?, self.take(gw)?, self.take(gb)?))
    }

    /// Fused softmax + cross-entropy + gradient: (mean loss, d logits).
    pub fn cross_entropy(
        &self,
        logits: &[f32],
        targets: &[u32],
        mask: Option<&[bool]>,
        vocab: usize,
        scale: f32,
    ) -> Result<(f32, Vec<f32>)> {
        let n = targets.len();
        let counts = |i: usize| mask.is_none_or(|m| m[i]);
        let n_targets = (0..n).filter(|&i| counts(i)).count().max(1);
        let g = self.out(n * vocab, "cross_entropy d_logits")?;
        g.buf.write(PAD, logits)?;
        let tb = self.put(targets)?;
        let mb = mask
            .map(|m| self.put(&m.iter().map(|&b| b as u8).collect::<Vec<u8>>()))
            .transpose()?;
        let rows = self.out(n, "cross_entropy row loss")?;
        let inv = 1.0f32 / n_targets as f32;
        self.dev.launch(
            "cross_entropy_fwd_bwd_f32",
            (n as u32, 1, 1),
            1024,
            0,
            &[
                Arg::P(g.ptr()),
                Arg::P(tb.ptr),
                Arg::P(mb.as_ref().map_or(0, |m| m.ptr)),
                Arg::L(vocab as i64),
                Arg::F(scale * inv),
                Arg::P(rows.ptr()),
            ],
        )?;
        let rows = self.take(rows)?;
        let mut total = 0f32;
        for (i, l) in rows.iter().enumerate() {
            if counts(i) {
                total += *l;
            }
        }
        Ok((total * inv, self.take(g)?))
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
