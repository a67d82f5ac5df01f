//! The decode step on the device (one token per row) and the state the engine holds for it.
//!
//! Per layer: fused residual add + norm, in_proj (cuBLAS), the conv update (`conv_update_f32`:
//! window shifted in place, conv + bias + SiLU), x_proj and dt_proj (cuBLAS), the scan update
//! (`ssm_update_f32`: dt bias + softplus, state in place, D skip, z gate), out_proj. Then the
//! final norm and the lm_head. The state is updated in place wherever it lives: the decode
//! workspace's buffers (a host state, copied in and out around the step) or the buffers of a
//! held state (nothing copied: only tokens in, logits out). Steps replay a CUDA graph.

use reference::decode::{not_held, HeldState};
use reference::{Result, State};

use crate::cuda::{Arg, Buf};
use crate::engine::GpuEngine;
use crate::work::Work;

/// A recurrent state kept in device memory between decode steps.
pub struct Held {
    pub ticket: HeldState,
    /// `[n_layer, batch, d_inner, d_conv − 1]`.
    pub conv: Buf,
    /// `[n_layer, batch, d_inner, d_state]`.
    pub ssm: Buf,
}

/// Device pointers of the state one decode step updates in place (layer 0; layers follow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatePtrs {
    pub conv: u64,
    pub ssm: u64,
}

impl GpuEngine {
    /// One decode step over `ws` (tokens and starts uploaded) on the state at `st`.
    pub fn decode_dev(&self, ws: &Work, st: StatePtrs) -> Result<()> {
        let cfg = &self.cfg;
        let (di, ds) = (cfg.d_inner, cfg.d_state);
        let batch = ws.batch;
        debug_assert_eq!(ws.seq_len, 1);
        let km1 = cfg.d_conv - 1;
        let lay = &self.layout;
        let la = &ws.layers[0];
        self.embed(ws, batch)?;
        let blocks = di.div_ceil(256 / self.shape.d_state_pad);
        for (i, lo) in lay.layers.iter().enumerate() {
            let add = if i == 0 { 0 } else { ws.out.ptr };
            self.norm_in_proj(ws, la, lo, batch, la.resid_in.ptr, add)?;
            let (xs_lp, xs) = self.lp_out(ws, ws.xs.ptr, di, batch, di);
            self.dev.launch(
                "conv_update_f32",
                self.dev.grid1d(batch * di),
                256,
                0,
                &[
                    &self.conv_in_args(ws, la, lo)[..],
                    &[
                        Arg::P(st.conv + (4 * i * batch * di * km1) as u64),
                        Arg::P(ws.xs.ptr),
                        Arg::P(xs_lp),
                        Arg::I(self.lp_mode()),
                        Arg::L(batch as i64),
                        Arg::L(di as i64),
                    ],
                ]
                .concat(),
            )?;
            self.x_dt_proj(ws, la, lo, batch, xs)?;
            let (gated_lp, gated) = self.lp_out(ws, la.gated.ptr, di, batch, di);
            self.dev.launch(
                "ssm_update_f32",
                (blocks as u32, batch as u32, 1),
                256,
                0,
                &[
                    &self.scan_in_args(ws, la, lo)[..],
                    &[
                        Arg::P(st.ssm + (4 * i * batch * di * ds) as u64),
                        Arg::P(la.gated.ptr),
                        Arg::P(gated_lp),
                        Arg::I(self.lp_mode()),
                        Arg::L(batch as i64),
                        Arg::L(di as i64),
                        Arg::L(ds as i64),
                    ],
                ]
                .concat(),
            )?;
            self.out_proj(ws, lo, batch, gated)?;
        }
        let resid = la.resid_in.ptr;
        self.final_head(ws, batch, (resid, ws.out.ptr, resid), batch, 0)
    }

    /// The held state behind `held`, or the error for a stale ticket.
    pub fn held(&self, held: HeldState, op: &'static str) -> Result<&Held> {
        match &self.held {
            Some(h) if h.ticket == held => Ok(h),
            _ => Err(not_held(&self.dev.name, op, held)),
        }
    }

    /// Moves `state` into device memory (reusing the buffers when the batch matches).
    pub fn hold(&mut self, state: &State<f32>) -> Result<HeldState> {
        state.check(&self.cfg, state.batch(), "hold_state")?;
        self.dev.bind()?;
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
            self.held = Some(Held {
                ticket,
                conv: self.dev.alloc(4 * state.conv.data.len())?,
                ssm: self.dev.alloc(4 * state.ssm.data.len())?,
            });
        }
        let h = self.held.as_mut().expect("held state");
        h.ticket = ticket;
        h.conv.write(0, &state.conv.data)?;
        h.ssm.write(0, &state.ssm.data)?;
        Ok(ticket)
    }
}
