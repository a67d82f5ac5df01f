//! The decode step on the device (one token per row) and the state the engine holds for it.
//!
//! Per layer: fused residual add + norm, in_proj (cuBLAS), the conv update (`conv_update_f32`:
//! window shifted in place, conv + bias + SiLU), x_proj and dt_proj (cuBLAS), the scan update
//! (`ssm_update_f32`: dt bias + softplus, state in place, D skip, z gate), out_proj. Then the
//! final norm and the lm_head. The state is updated in place wherever it lives: the decode
//! workspace's buffers (a host state, copied in and out around the step) or the buffers of a
//! held state (nothing copied: only tokens in, logits out). Steps replay a CUDA graph. A
//! one-row step of a model from d_model 1024 runs all its layers in one persistent kernel
//! instead (`decode_layers_lp`, see [`persistent_default`]), with the same bits.

use reference::decode::{not_held, HeldState};
use reference::model::Batch;
use reference::{Error, Result, State};

use crate::cuda::Buf;
use crate::decode_proj::{fused, Proj};
use crate::graph::{capture, graphs_enabled, Graph};
use crate::layout::LayerOffs;
use crate::model::{ensure_ws, Model, Opnd};
use crate::ops::decode::{
    conv_update, ssm_update, ssm_update_dt, ConvUpdateF32, SsmUpdateDtF32, SsmUpdateF32,
};
use crate::ops::decode_layers::{decode_layers, DecodeLayersLp, DL_TRACE};
use crate::params::{Ptr, PtrMut};
use crate::work::{doc_starts, Mode, Work};

/// A recurrent state kept in device memory between decode steps.
pub(crate) struct Held {
    pub(crate) ticket: HeldState,
    /// `[n_layer, batch, d_inner, d_conv − 1]`.
    pub(crate) conv: Buf,
    /// `[n_layer, batch, d_inner, d_state]`.
    pub(crate) ssm: Buf,
    /// Each row's penalty context for sampling on the device: `[batch, vocab]` bytes.
    pub(crate) seen: Buf,
    /// Each row's [`crate::ops::decode::SampleHow`] (`[batch]`) and drawn id (`[batch]`).
    pub(crate) how: Buf,
    pub(crate) ids: Buf,
    /// The bytes last written to `how` (a step with the same settings skips the upload).
    pub(crate) how_last: Vec<u8>,
}

/// Device pointers of the state one decode step updates in place (layer 0; layers follow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StatePtrs {
    conv: u64,
    ssm: u64,
}

/// Where a decode step's state lives.
#[derive(Clone, Copy)]
pub(crate) enum StepOn<'a> {
    Host(&'a State<f32>),
    Held(HeldState),
}

/// The persistent kernel's blocks and parameters for a step, or `None`: layer by layer.
type Persist = Option<(usize, DecodeLayersLp)>;

/// Decoding's own state: the workspace of one step, its CUDA graph, the held state.
#[derive(Default)]
pub(crate) struct Decoder {
    ws: Option<Work>,
    /// The graph of the last step, the state buffers it updates and the persistent kernel's
    /// plan captured into it (the graph `None`: capture failed, steps run eagerly on that
    /// plan).
    graph: Option<(StatePtrs, Persist, Option<Graph>)>,
    /// The state decode steps run on in device memory (`Engine::hold_state`).
    held: Option<Held>,
    /// Tickets handed out so far.
    next_held: u64,
    /// The persistent decode kernel's blocks as set by [`Decoder::set_persistent`] (`None`:
    /// not set, [`persistent_default`] holds).
    persist: Option<Option<usize>>,
    /// Its two barrier counters (zeroed, left zeroed by every launch).
    persist_sync: Option<Buf>,
    /// Whether the last step ran in it.
    last_persistent: bool,
    /// Its per-layer clock marks (`VET_DECODE_TRACE=1`).
    persist_trace: Option<Buf>,
}

/// Whether batch-1 decode steps of a `d_model`-wide model run their layers in the persistent
/// kernel (`decode_layers_lp`) where it applies: from d_model 1024 (H100, batch 1: 370M 876 →
/// 1,038 tok/s, 1.4B 429 → 553; the 130M is faster layer by layer, 2,000 against 1,811);
/// `VET_DECODE_PERSIST=1` turns it on at every width, `0` off.
pub(crate) fn persistent_default(d_model: usize) -> bool {
    match std::env::var("VET_DECODE_PERSIST").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => d_model >= 1024,
    }
}

impl Decoder {
    /// The held state behind `held`, or the error for a stale ticket.
    pub(crate) fn held(&self, device: &str, held: HeldState, op: &'static str) -> Result<&Held> {
        match &self.held {
            Some(h) if h.ticket == held => Ok(h),
            _ => Err(not_held(device, op, held)),
        }
    }

    /// As [`Decoder::held`], mutable.
    pub(crate) fn held_mut(
        &mut self,
        device: &str,
        held: HeldState,
        op: &'static str,
    ) -> Result<&mut Held> {
        match &mut self.held {
            Some(h) if h.ticket == held => Ok(h),
            _ => Err(not_held(device, op, held)),
        }
    }

    /// Moves `state` into device memory (reusing the buffers when the batch matches).
    pub(crate) fn hold(&mut self, m: &Model, state: &State<f32>) -> Result<HeldState> {
        state.check(&m.cfg, state.batch(), "hold_state")?;
        m.dev.bind()?;
        self.next_held += 1;
        let ticket = HeldState {
            id: self.next_held,
            batch: state.batch(),
        };
        let reuse = self
            .held
            .as_ref()
            .is_some_and(|h| h.ticket.batch == ticket.batch);
        if !reuse {
            self.held = None;
            let rows = ticket.batch;
            self.held = Some(Held {
                ticket,
                conv: m.dev.alloc(4 * state.conv.data.len())?,
                ssm: m.dev.alloc(4 * state.ssm.data.len())?,
                seen: m.dev.alloc(rows * m.cfg.vocab_size)?,
                how: m
                    .dev
                    .alloc(rows * std::mem::size_of::<crate::ops::decode::SampleHow>())?,
                ids: m.dev.alloc(4 * rows)?,
                how_last: Vec::new(),
            });
        }
        let h = self.held.as_mut().expect("held state");
        h.ticket = ticket;
        h.how_last.clear();
        h.seen.zero()?;
        h.conv.write(0, &state.conv.data)?;
        h.ssm.write(0, &state.ssm.data)?;
        Ok(ticket)
    }

    /// Forgets the captured decode graph (its launches' arguments changed).
    pub(crate) fn drop_graph(&mut self) {
        self.graph = None;
    }

    /// Sets the persistent decode kernel: `None` off, `Some(0)` one block per SM, `Some(n)`
    /// `n` blocks (at most one per SM). Drops the captured graph.
    pub(crate) fn set_persistent(&mut self, blocks: Option<usize>) {
        self.persist = Some(blocks);
        self.graph = None;
    }

    /// The persistent kernel's blocks and parameters for a step over `ws` on the state at
    /// `st`, or `None` where the layer-by-layer step runs (turned off, more than one row, no
    /// low-precision weights, a device or model it does not take).
    fn persistent(&mut self, m: &Model, ws: &Work, st: StatePtrs) -> Result<Persist> {
        let blocks = match self.persist {
            Some(b) => b,
            None => persistent_default(m.cfg.d_model).then_some(0),
        };
        let Some(blocks) = blocks else {
            return Ok(None);
        };
        if ws.batch != 1 || !m.dev.persistent_decode || m.shadow.is_none() {
            return Ok(None);
        }
        if self.persist_sync.is_none() {
            self.persist_sync = Some(m.dev.zeros(8)?);
        }
        let sync = self.persist_sync.as_ref().expect("barrier counters").ptr;
        if self.persist_trace.is_none()
            && std::env::var_os("VET_DECODE_TRACE").is_some_and(|v| v == "1")
        {
            self.persist_trace = Some(m.dev.zeros(8 * DL_TRACE * m.cfg.n_layer)?);
        }
        let trace = self.persist_trace.as_ref().map_or(0, |t| t.ptr);
        let blocks = if blocks == 0 {
            m.dev.sm_count
        } else {
            blocks.min(m.dev.sm_count)
        };
        let sh = m.dev.shape.d_state_pad;
        Ok(persistent_params(m, ws, st, (sync, trace))
            .filter(|p| p.fits(blocks, m.dev.sm_count, sh))
            .map(|p| (blocks, p)))
    }

    /// The persistent kernel's clock marks of the last step (ns, [`DL_TRACE`] a layer), where
    /// `VET_DECODE_TRACE=1` was set when it first ran.
    pub(crate) fn trace(&self) -> Result<Option<Vec<u64>>> {
        let Some(t) = &self.persist_trace else {
            return Ok(None);
        };
        let mut v = vec![0u64; t.bytes / 8];
        t.read(0, &mut v)?;
        Ok(Some(v))
    }

    /// Whether the last decode step ran its layers in the persistent kernel.
    pub(crate) fn ran_persistent(&self) -> bool {
        self.last_persistent
    }

    /// Drops the captured graph (the weights moved to new buffers).
    pub(crate) fn forget_graph(&mut self) {
        self.graph = None;
    }

    /// Whether the last decode ran through a graph.
    pub(crate) fn uses_graph(&self) -> bool {
        self.graph.as_ref().is_some_and(|(_, _, g)| g.is_some())
    }

    /// The tokens of the last step (`[batch]`).
    pub(crate) fn tokens(&self) -> &Buf {
        &self.ws.as_ref().expect("decode workspace").tokens
    }

    /// The logits of the last step (`[batch, vocab]`).
    pub(crate) fn logits(&self) -> &Buf {
        &self.ws.as_ref().expect("decode workspace").logits
    }

    /// One decode step of `tokens` on the state `on` (a host state, copied into the decode
    /// workspace and updated there, or the held state), through the CUDA graph when one could
    /// be captured. Logits end in [`Decoder::logits`].
    pub(crate) fn step(
        &mut self,
        m: &Model,
        tokens: &[u32],
        resets: Option<&[bool]>,
        on: StepOn,
    ) -> Result<()> {
        m.whole("a decode step")?;
        let batch = tokens.len();
        let input = Batch {
            batch,
            seq_len: 1,
            tokens,
            resets,
        };
        input.check(&m.cfg, "step")?;
        match on {
            StepOn::Host(state) => state.check(&m.cfg, batch, "step")?,
            StepOn::Held(h) => {
                if h.batch != batch {
                    return Err(Error::Shape {
                        op: "step_held",
                        msg: format!("{batch} tokens for a held state of {} rows", h.batch),
                    });
                }
            }
        }
        m.dev.bind()?;
        let had = self.ws.as_ref().map(|w| w.batch);
        let key = (batch, 1, Mode::Infer { head_rows: batch });
        let lowp = m.shadow.is_some();
        ensure_ws(&mut self.ws, &m.dev, &m.cfg, m.shape, key, lowp)?;
        if had != Some(batch) {
            self.graph = None;
        }
        let ws = self.ws.take().expect("decode workspace");
        let r = self.step_on(m, &ws, tokens, resets, on);
        self.ws = Some(ws);
        r
    }

    fn step_on(
        &mut self,
        m: &Model,
        ws: &Work,
        tokens: &[u32],
        resets: Option<&[bool]>,
        on: StepOn,
    ) -> Result<()> {
        ws.tokens.write_staged(0, tokens)?;
        ws.starts
            .write_staged(0, &doc_starts(resets, tokens.len(), 1))?;
        let st = match on {
            StepOn::Host(state) => {
                ws.state_in_conv.write(0, &state.conv.data)?;
                ws.state_in_ssm.write(0, &state.ssm.data)?;
                StatePtrs {
                    conv: ws.state_in_conv.ptr,
                    ssm: ws.state_in_ssm.ptr,
                }
            }
            StepOn::Held(h) => {
                let held = self.held(&m.dev.name, h, "step_held")?;
                StatePtrs {
                    conv: held.conv.ptr,
                    ssm: held.ssm.ptr,
                }
            }
        };
        self.run(m, ws, st)
    }

    /// Runs one decode step over `ws` (tokens uploaded) on the state at `st`, capturing the
    /// graph on first use (and again when the state buffers change).
    fn run(&mut self, m: &Model, ws: &Work, st: StatePtrs) -> Result<()> {
        if !graphs_enabled() {
            let persist = self.persistent(m, ws, st)?;
            self.last_persistent = persist.is_some();
            return m.dev.with_pdl(|| decode_dev(m, ws, st, persist));
        }
        if self.graph.as_ref().is_none_or(|(s, _, _)| *s != st) {
            self.graph = None;
            let persist = self.persistent(m, ws, st)?;
            // SAFETY: `decode_dev` only launches kernels and GEMMs on the stream (no
            // allocation, no synchronisation, no host copy); its buffers are the decode
            // workspace's and the state's at `st`, and a new workspace or state drops the
            // graph first.
            let g =
                unsafe { capture(&m.dev, || m.dev.with_pdl(|| decode_dev(m, ws, st, persist))) };
            self.graph = Some((st, persist, g));
        }
        let (_, persist, g) = self.graph.as_ref().expect("decode graph");
        self.last_persistent = persist.is_some();
        match g {
            // SAFETY: captured on this workspace's and state's buffers, still alive.
            Some(g) => unsafe { g.launch(&m.dev) },
            None => {
                let persist = *persist;
                m.dev.with_pdl(|| decode_dev(m, ws, st, persist))
            }
        }
    }

    /// Downloads the logits of the last step and the host state it updated.
    pub(crate) fn step_out(&self, state: &mut State<f32>, logits: &mut [f32]) -> Result<()> {
        let ws = self.ws.as_ref().expect("decode workspace");
        ws.logits.read(0, logits)?;
        ws.state_in_conv.read(0, &mut state.conv.data)?;
        ws.state_in_ssm.read(0, &mut state.ssm.data)
    }
}

/// The persistent kernel's parameters for a one-row step over `ws` (the caller checks the
/// row count) on the state at `st`, or
/// `None` where the model is not what it takes: RMS norms and no projection or norm biases,
/// every layer's parameters one stride apart, the projections' low-precision rows 16-byte
/// aligned, every projection's chunk inside a slot.
fn persistent_params(
    m: &Model,
    ws: &Work,
    st: StatePtrs,
    (sync, trace): (u64, u64),
) -> Option<DecodeLayersLp> {
    let cfg = &m.cfg;
    let shadow = m.shadow.as_ref()?;
    let ls = &m.layout.layers;
    let l0 = &ls[0];
    let stride = ls.get(1).map_or(0, |l1| l1.in_w - l0.in_w);
    let offs = |l: &LayerOffs| {
        [
            l.norm_w, l.in_w, l.conv_w, l.x_w, l.dt_w, l.dt_b, l.a_log, l.d, l.out_w,
        ]
    };
    let uniform = ls.iter().enumerate().all(|(i, l)| {
        offs(l)
            .iter()
            .zip(offs(l0))
            .all(|(o, o0)| *o == o0 + i * stride)
            && l.conv_b.map(|b| b - i * stride) == l0.conv_b
            && l.norm_b.is_none()
            && l.in_b.is_none()
            && l.out_b.is_none()
    });
    let aligned = [l0.in_w, l0.x_w, l0.out_w, stride]
        .iter()
        .all(|o| o % 8 == 0);
    if !uniform || !aligned || cfg.norm != reference::config::NormKind::Rms {
        return None;
    }
    let la = &ws.layers[0];
    let (gated_lp, _) = m.lp_out(ws, la.gated.ptr, cfg.d_inner, 1, cfg.d_inner);
    let as_i64 = |v: usize| v as i64;
    let dims = [
        cfg.n_layer,
        cfg.d_model,
        cfg.d_inner,
        cfg.d_state,
        cfg.dt_rank,
    ]
    .map(as_i64);
    DecodeLayersLp {
        params: Ptr::new(m.params.ptr),
        shadow: Ptr::new(shadow.ptr),
        layer_stride: as_i64(stride),
        norm_w: as_i64(l0.norm_w),
        in_w: as_i64(l0.in_w),
        conv_w: as_i64(l0.conv_w),
        conv_b: l0.conv_b.map_or(-1, as_i64),
        x_w: as_i64(l0.x_w),
        dt_w: as_i64(l0.dt_w),
        dt_b: as_i64(l0.dt_b),
        a_log: as_i64(l0.a_log),
        d: as_i64(l0.d),
        out_w: as_i64(l0.out_w),
        resid: PtrMut::new(la.resid_in.ptr),
        out: PtrMut::new(ws.out.ptr),
        xz: PtrMut::new(la.xz.ptr),
        xs: PtrMut::new(ws.xs.ptr),
        xs_lp: PtrMut::new(ws.xs_lp.ptr),
        xdbl: PtrMut::new(la.xdbl.ptr),
        gated: PtrMut::new(la.gated.ptr),
        gated_lp: PtrMut::new(gated_lp),
        conv_state: PtrMut::new(st.conv),
        ssm_state: PtrMut::new(st.ssm),
        starts: Ptr::new(ws.starts.ptr),
        sync: PtrMut::new(sync),
        trace: PtrMut::new(trace),
        slot_bytes: std::env::var("VET_DECODE_SLOT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(crate::ops::decode_layers::DL_SLOT as i32),
        // int8 codes (`crate::q8`: per layer in_proj, x_proj, out_proj, as the kernel expects).
        q8: Ptr::new(m.q8.as_ref().map_or(0, |q| q.q.ptr)),
        q8s: Ptr::new(m.q8.as_ref().map_or(0, |q| q.scales.ptr)),
        ..DecodeLayersLp::unplaced(dims, cfg.norm_eps as f32, m.lp_mode())
    }
    .chunked()
}

/// One decode step over `ws` (tokens and starts uploaded) on the state at `st`. With
/// `persist` (blocks, parameters), every layer runs in the persistent kernel
/// (`decode_layers_lp`); else layer by layer, the projections as one GEMV
/// each where `gemv` allows (see [`crate::decode_proj`]).
fn decode_dev(m: &Model, ws: &Work, st: StatePtrs, persist: Persist) -> Result<()> {
    let cfg = &m.cfg;
    let (di, ds) = (cfg.d_inner, cfg.d_state);
    let batch = ws.batch;
    debug_assert_eq!(ws.seq_len, 1);
    let km1 = cfg.d_conv - 1;
    let la = &ws.layers[0];
    let pj = Proj::new(m, ws, batch);
    m.dev.tag("decode embedding");
    m.embed(ws, batch)?;
    if let Some((blocks, p)) = persist {
        m.dev.tag("decode layers (persistent)");
        // SAFETY: the parameters come from this model's layout (checked one stride apart and
        // aligned in `persistent_params`) and this one-row workspace; the state at `st` holds
        // `n_layer` layers of one row; the counters are the decoder's, zeroed.
        unsafe { decode_layers(&m.dev, blocks, &p) }?;
        m.dev.tag("decode norm_f+lm_head");
        let resid = la.resid_in.ptr;
        return pj.final_head((resid, ws.out.ptr, resid));
    }
    for (i, lo) in m.layout.layers.iter().enumerate() {
        let add = if i == 0 { 0 } else { ws.out.ptr };
        // The fused in_proj writes xs_lp while its other blocks still read `hn` from `ws.lp[1]`,
        // so xs_lp goes to its own buffer then.
        let (xs_lp, xs) = match (&m.shadow, fused()) {
            (Some(_), true) => (ws.xs_lp.ptr, Opnd::Lp(ws.xs_lp.ptr, di)),
            _ => m.lp_out(ws, ws.xs.ptr, di, batch, di),
        };
        let conv = ConvUpdateF32 {
            conv: m.conv_in(ws, la, lo),
            window: PtrMut::new(st.conv + (4 * i * batch * di * km1) as u64),
            xs: PtrMut::new(ws.xs.ptr),
            xs_lp: PtrMut::new(xs_lp),
            lp_mode: m.lp_mode(),
            batch: batch as i64,
            d_inner: di as i64,
        };
        m.dev.tag("decode norm+in_proj+conv");
        let fused = pj.norm_in_proj_conv(la, lo, (la.resid_in.ptr, add), &conv)?;
        if !fused {
            m.dev.tag("decode norm+in_proj");
            pj.norm_in_proj(la, lo, (la.resid_in.ptr, add))?;
            m.dev.tag("decode conv");
            // SAFETY: the decode workspace holds `batch` rows; the state at `st` holds
            // `n_layer` layers of `batch × d_inner` windows (a host state's copy or a held
            // state).
            unsafe { conv_update(&m.dev, &conv) }?;
        }
        let (gated_lp, gated) = m.lp_out(ws, la.gated.ptr, di, batch, di);
        let scan = SsmUpdateF32 {
            scan: m.scan_in(ws, la, lo),
            h_state: PtrMut::new(st.ssm + (4 * i * batch * di * ds) as u64),
            out: PtrMut::new(la.gated.ptr),
            out_lp: PtrMut::new(gated_lp),
            lp_mode: m.lp_mode(),
            batch: batch as i64,
            d_inner: di as i64,
            d_state: ds as i64,
        };
        match pj.dt_w_lp(lo).filter(|_| fused) {
            Some(dt_w) => {
                m.dev.tag("decode x_proj");
                pj.x_proj(la, lo, xs)?;
                m.dev.tag("decode scan+dt_proj");
                let p = SsmUpdateDtF32 {
                    s: scan,
                    dt_w: Ptr::new(dt_w),
                    dt_rank: m.cfg.dt_rank as i64,
                };
                // SAFETY: as below; `dt_w` is dt_proj's shadow weight (`d_inner × dt_rank`),
                // x_proj's rows (`la.xdbl`) start with the `dt_rank` dt columns.
                unsafe { ssm_update_dt(&m.dev, &p) }?;
            }
            None => {
                m.dev.tag("decode x_proj+dt_proj");
                pj.x_dt_proj(la, lo, xs)?;
                m.dev.tag("decode scan");
                // SAFETY: the decode workspace holds `batch` rows, the state at `st` `n_layer`
                // layers of `batch × d_inner × d_state` states.
                unsafe { ssm_update(&m.dev, &scan) }?;
            }
        }
        m.dev.tag("decode out_proj");
        pj.out_proj(lo, gated)?;
    }
    m.dev.tag("decode norm_f+lm_head");
    let resid = la.resid_in.ptr;
    pj.final_head((resid, ws.out.ptr, resid))
}
