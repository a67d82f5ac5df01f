//! Stateful training on the device (`[train] carry_state`, see trainer/src/train/carry.rs):
//! [`reference::TrainingEngine::loss_and_backward_carry`] and
//! [`reference::TrainingEngine::forward_state`] for [`GpuEngine`].
//!
//! One window is the ordinary training step (`loss_and_backward`) with two additions, both on
//! the device: the final state (conv window and SSM state), which the forward already leaves
//! in the workspace (`state_out_*`), is read back; and the final state's gradient from later
//! windows of the same rows is uploaded here and handed to the backward
//! ([`crate::backward::Backward::with_final_grad`]): the scan backward starts its adjoint from
//! it (`dh_last`) and `conv1d_last_bwd_f32` adds the conv window's part into dx and the initial
//! window's gradient. No second forward, no logits to the host.

use reference::engine::LossOutput;
use reference::model::Batch;
use reference::{Result, State, TrainingEngine};

use crate::cuda::Buf;
use crate::engine::GpuEngine;

/// The device copy of the final state's gradient for the window being trained, and whether
/// the next backward reads it.
#[derive(Default)]
pub(crate) struct CarryGrad {
    /// (conv, ssm) halves of a `State`, sized for `batch` rows.
    bufs: Option<(Buf, Buf, usize)>,
    armed: bool,
}

impl CarryGrad {
    /// Device addresses (conv, ssm) of the final state's gradient while a carried window's
    /// backward runs; `None` otherwise (the backward starts from zeros).
    pub(crate) fn final_grad(&self) -> Option<(u64, u64)> {
        match (&self.bufs, self.armed) {
            (Some((c, s, _)), true) => Some((c.ptr, s.ptr)),
            _ => None,
        }
    }
}

impl GpuEngine {
    /// Uploads `g` (checked against the config and `batch`) into the carry buffers and arms
    /// them for the next backward.
    fn arm_final_grad(&mut self, g: &State<f32>, batch: usize) -> Result<()> {
        g.check(
            &self.model.cfg,
            batch,
            "loss_and_backward_carry (final-state gradient)",
        )?;
        let cg = &mut self.train.carry;
        if cg.bufs.as_ref().is_none_or(|b| b.2 != batch) {
            cg.bufs = None;
            let dev = &self.model.dev;
            let conv = dev.alloc(4 * g.conv.data.len())?;
            let ssm = dev.alloc(4 * g.ssm.data.len())?;
            cg.bufs = Some((conv, ssm, batch));
        }
        let (conv, ssm, _) = cg.bufs.as_ref().expect("allocated above");
        conv.write(0, &g.conv.data)?;
        ssm.write(0, &g.ssm.data)?;
        cg.armed = true;
        Ok(())
    }

    /// The final state the last training forward left in the training workspace.
    fn train_final_state(&self, batch: usize) -> Result<State<f32>> {
        let ws = self.train.ws.as_ref().expect("a training forward ran");
        let mut st = State::<f32>::zeros(&self.model.cfg, batch);
        ws.state_out_conv.read(0, &mut st.conv.data)?;
        ws.state_out_ssm.read(0, &mut st.ssm.data)?;
        Ok(st)
    }

    /// [`TrainingEngine::loss_and_backward_carry`] on the device.
    pub(crate) fn loss_and_backward_carry_dev(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_final: Option<&State<f32>>,
        grad_scale: f64,
    ) -> Result<(LossOutput, State<f32>)> {
        if let Some(g) = grad_final {
            self.model.dev.bind()?;
            self.arm_final_grad(g, input.batch)?;
        }
        let r = self.loss_and_backward(input, targets, mask, state, grad_scale);
        self.train.carry.armed = false;
        let lo = r?;
        // With no counted target and no final-state gradient the step returns before its
        // forward; the final state then comes from a forward of its own.
        let last = if lo.n_targets == 0 && grad_final.is_none() {
            self.forward_state(input, state)?
        } else {
            self.train_final_state(input.batch)?
        };
        Ok((lo, last))
    }

    /// [`TrainingEngine::forward_state`] on the device: the forward in the inference
    /// workspace with one row through the lm_head (its logits stay on the device).
    pub(crate) fn forward_state_dev(
        &mut self,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> Result<State<f32>> {
        input.check(&self.model.cfg, "forward_state")?;
        if let Some(s) = state {
            s.check(&self.model.cfg, input.batch, "forward_state")?;
        }
        self.model.dev.bind()?;
        self.infer_ws_for(input.batch, input.seq_len, 1)?;
        let ws = self.infer_ws.as_ref().expect("workspace");
        self.model.upload_inputs(ws, input, state)?;
        self.model.forward_dev(ws, state.is_some(), 0)?;
        let mut st = State::<f32>::zeros(&self.model.cfg, input.batch);
        ws.state_out_conv.read(0, &mut st.conv.data)?;
        ws.state_out_ssm.read(0, &mut st.ssm.data)?;
        Ok(st)
    }
}
