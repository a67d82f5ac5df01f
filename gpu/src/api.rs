//! `reference::InferenceEngine` and `reference::TrainingEngine` for [`GpuEngine`].

use reference::engine::{
    check_len, check_named, GradHook, LossOutput, MemoryUse, NamedTensors, OptimizerShard,
    OptimizerState, ParamHook, SumInBackward,
};
use reference::model::Batch;
use reference::optim::StepStats;
use reference::{
    AdamWConfig, Error, HeldState, InferenceEngine, MambaConfig, Result, RowSampling, State,
    Tensor, TrainingEngine,
};

use crate::backward::{token_csr, Backward};
use crate::decode::StepOn;
use crate::engine::GpuEngine;
use crate::forward::Phase;
use crate::head_loss::loss_dev;
use crate::layered::Groups;
use crate::model::ensure_ws;
use crate::ops::adamw::{
    adamw, sumsq_final, sumsq_partial, AdamwF32, SumsqFinalF64, SumsqPartialF64, NORM_BLOCKS,
};
use crate::params::{Ptr, PtrMut};
use crate::work::Mode;
use crate::zero::SumAsDone;
use crate::Precision;

impl GpuEngine {
    fn lowp(&self) -> bool {
        self.model.shadow.is_some()
    }

    /// `buf` (in the layout's offsets) as named tensors, read tensor by tensor straight from
    /// the device (no whole-model staging copy on the host).
    fn read_named(&self, buf: &crate::cuda::Buf) -> Result<NamedTensors> {
        let mut out = Vec::with_capacity(self.model.layout.slots.len());
        for s in &self.model.layout.slots {
            let mut t = Tensor::zeros(&s.shape);
            buf.read(s.off, &mut t.data)?;
            out.push((s.name.clone(), t));
        }
        Ok(out)
    }

    /// Writes `named` (checked against the config) into `buf` at the layout's offsets, tensor
    /// by tensor (no whole-model copy on the host).
    fn upload_named(&self, buf: &crate::cuda::Buf, named: &[(String, Tensor<f32>)]) -> Result<()> {
        check_named(&self.model.cfg, named)?;
        for (slot, (_, t)) in self.model.layout.slots.iter().zip(named) {
            buf.write_staged(slot.off, &t.data)?;
        }
        self.model.dev.sync()
    }

    fn read_state(&self, ws: &crate::work::Work, batch: usize) -> Result<State<f32>> {
        let mut st = State::<f32>::zeros(&self.model.cfg, batch);
        ws.state_out_conv.read(0, &mut st.conv.data)?;
        ws.state_out_ssm.read(0, &mut st.ssm.data)?;
        Ok(st)
    }

    /// Σ g² over the flat gradient elements `off..off + n`: f64 partial sums over a fixed
    /// grid, then one ordered sum (the same bits on every run).
    pub(crate) fn grad_sumsq(&self, off: usize, n: usize) -> Result<f64> {
        self.model.dev.tag("grad norm");
        let dev = &self.model.dev;
        let t = &self.train;
        if (off + n) * 4 > t.grads.bytes {
            return Err(dev.err(
                "grad norm",
                format!("{n} values at {off} past the gradients"),
            ));
        }
        let partial = SumsqPartialF64 {
            g: Ptr::new(t.grads.at::<f32>(off)),
            n: n as i64,
            part: PtrMut::new(t.norm_part.ptr),
        };
        let fin = SumsqFinalF64 {
            part: Ptr::new(t.norm_part.ptr),
            n: NORM_BLOCKS as i64,
            out: PtrMut::new(t.norm_out.ptr),
        };
        // SAFETY: the gradients hold `off + n` f32 (checked above), the partials NORM_BLOCKS
        // f64, the output one f64 (allocated in `GpuEngine::new`).
        unsafe {
            sumsq_partial(dev, &partial)?;
            sumsq_final(dev, &fin)?;
        }
        let mut ss = [0f64];
        self.train.norm_out.read(0, &mut ss)?;
        Ok(ss[0])
    }

    /// The error for a whole-model optimizer call once the optimizer is sharded.
    fn not_sharded(&self, op: &str) -> Result<()> {
        match &self.train.shard {
            Some(on) => Err(self.model.dev.err(
                op,
                format!("the optimizer is sharded (this rank holds {:?})", on.range),
            )),
            None => Ok(()),
        }
    }

    /// An error once the gradients were summed over the ranks during a backward: adding to
    /// them now would mix summed and unsummed terms.
    fn not_summed(&self, op: &str) -> Result<()> {
        match self.train.summed {
            Some(_) => Err(self.model.dev.err(
                op,
                "the gradients were summed over the ranks in the last backward; zero_grad first",
            )),
            None => Ok(()),
        }
    }

    /// Global gradient norm over every parameter.
    fn grad_norm(&self) -> Result<f64> {
        Ok(self.grad_sumsq(0, self.model.layout.numel)?.sqrt())
    }

    /// One AdamW step over the flat elements `range` (whole slots or parts of them; padding
    /// past the last parameter is left alone): the gradients are first multiplied by `coef`
    /// where it is `Some` (clipping, fp16's unscale), and the moments of element `i` sit at
    /// `i - mom_off` in `m` and `v`. Moves the step count.
    pub(crate) fn adamw_flat(
        &mut self,
        hp: &AdamWConfig,
        lr: f64,
        range: std::ops::Range<usize>,
        mom_off: usize,
        coef: Option<f32>,
    ) -> Result<()> {
        self.train.opt_step += 1;
        let t = self.train.opt_step as f64;
        let bc1 = 1.0 - hp.beta1.powf(t);
        let bc2 = 1.0 - hp.beta2.powf(t);
        let step_size = (lr / bc1) as f32;
        let sqrt_bc2 = bc2.sqrt() as f32;
        let decay = (1.0 - lr * hp.weight_decay) as f32;
        let (mp, vp) = self.moments()?;
        self.model.dev.tag("adamw");
        for s in &self.model.layout.slots {
            let (lo, hi) = (s.off.max(range.start), (s.off + s.numel).min(range.end));
            if lo >= hi {
                continue;
            }
            let decays = hp.weight_decay != 0.0 && s.decays;
            let p = AdamwF32 {
                p: PtrMut::new(self.model.params.at::<f32>(lo)),
                g: PtrMut::new(self.train.grads.at::<f32>(lo)),
                m: PtrMut::new(mp + 4 * (lo - mom_off) as u64),
                v: PtrMut::new(vp + 4 * (lo - mom_off) as u64),
                n: (hi - lo) as i64,
                clip: coef.is_some() as i32,
                clip_c: coef.unwrap_or(1.0),
                b1: hp.beta1 as f32,
                b2: hp.beta2 as f32,
                omb1: (1.0 - hp.beta1) as f32,
                omb2: (1.0 - hp.beta2) as f32,
                eps: hp.eps as f32,
                decays: decays as i32,
                decay,
                step_size,
                sqrt_bc2,
            };
            // SAFETY: `lo..hi` lies inside one slot and inside `range`; the parameters and
            // gradients hold every slot, the moments `range.end - mom_off` f32 (the caller's
            // contract, checked when the optimizer was sharded).
            unsafe { adamw(&self.model.dev, &p) }?;
        }
        self.model.refresh_shadow()
    }

    /// One decode step (see [`crate::decode::Decoder::step`]); logits end in the decoder.
    fn step_dev(&mut self, tokens: &[u32], resets: Option<&[bool]>, on: StepOn) -> Result<()> {
        self.decoder.step(&self.model, tokens, resets, on)
    }

    /// Downloads the logits of the last step and the host state it updated.
    fn step_out(&self, state: &mut State<f32>, logits: &mut [f32]) -> Result<()> {
        self.decoder.step_out(state, logits)
    }

    /// The held state behind `held`, or the error for a stale ticket.
    fn held(&self, held: HeldState, op: &'static str) -> Result<&crate::decode::Held> {
        self.decoder.held(&self.model.dev.name, held, op)
    }
}

impl GpuEngine {
    /// The inference workspace for `batch × seq_len` with `head_rows` rows through the
    /// lm_head (reused when the shape matches).
    pub(crate) fn infer_ws_for(
        &mut self,
        batch: usize,
        seq_len: usize,
        head_rows: usize,
    ) -> Result<()> {
        self.model.whole("a forward")?;
        let lowp = self.lowp();
        let key = (batch, seq_len, Mode::Infer { head_rows });
        ensure_ws(
            &mut self.infer_ws,
            &self.model.dev,
            &self.model.cfg,
            self.model.shape,
            key,
            lowp,
        )
    }

    /// The forward of one sequence (`tokens`, batch 1) from the state `from` (copied into the
    /// inference workspace), only the last position through the lm_head. Logits and the final
    /// state end in `infer_ws`.
    fn prefill_dev(
        &mut self,
        op: &'static str,
        tokens: &[u32],
        from: StepOn,
        logits_len: usize,
    ) -> Result<()> {
        check_len(op, "logits", logits_len, self.model.cfg.vocab_size)?;
        if tokens.is_empty() {
            return Err(Error::Shape {
                op,
                msg: "no tokens to prefill".into(),
            });
        }
        let input = Batch::new(tokens, 1, tokens.len());
        input.check(&self.model.cfg, op)?;
        match from {
            StepOn::Host(state) => state.check(&self.model.cfg, 1, op)?,
            StepOn::Held(h) if h.batch != 1 => {
                return Err(Error::Shape {
                    op,
                    msg: format!(
                        "prefill runs one sequence; the held state has {} rows",
                        h.batch
                    ),
                })
            }
            StepOn::Held(h) => {
                self.held(h, op)?;
            }
        }
        self.model.dev.bind()?;
        self.infer_ws_for(1, tokens.len(), 1)?;
        let ws = self.infer_ws.as_ref().expect("workspace");
        match from {
            StepOn::Host(state) => self.model.upload_inputs(ws, &input, Some(state))?,
            StepOn::Held(h) => {
                self.model.upload_inputs(ws, &input, None)?;
                let h = self.held(h, op)?;
                ws.state_in_conv.copy_from(0, &h.conv, h.conv.bytes)?;
                ws.state_in_ssm.copy_from(0, &h.ssm, h.ssm.bytes)?;
            }
        }
        self.model.forward_dev(ws, true, tokens.len() - 1)
    }
}

impl InferenceEngine for GpuEngine {
    fn name(&self) -> String {
        self.model.dev.name.clone()
    }

    fn config(&self) -> &MambaConfig {
        &self.model.cfg
    }

    fn forward(
        &mut self,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> Result<(Tensor<f32>, State<f32>)> {
        input.check(&self.model.cfg, "forward")?;
        if let Some(s) = state {
            s.check(&self.model.cfg, input.batch, "forward")?;
        }
        self.model.dev.bind()?;
        self.infer_ws_for(input.batch, input.seq_len, input.rows())?;
        let ws = self.infer_ws.as_ref().expect("workspace");
        self.model.upload_inputs(ws, input, state)?;
        self.model.forward_dev(ws, state.is_some(), 0)?;
        let v = self.model.cfg.vocab_size;
        let mut logits = Tensor::zeros(&[input.batch, input.seq_len, v]);
        ws.logits.read(0, &mut logits.data)?;
        let st = self.read_state(ws, input.batch)?;
        Ok((logits, st))
    }

    fn step(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
    ) -> Result<Tensor<f32>> {
        self.step_dev(tokens, resets, StepOn::Host(state))?;
        let mut logits = Tensor::zeros(&[tokens.len(), self.model.cfg.vocab_size]);
        self.step_out(state, &mut logits.data)?;
        Ok(logits)
    }

    fn step_into(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
        logits: &mut [f32],
    ) -> Result<()> {
        check_len(
            "step_into",
            "logits",
            logits.len(),
            tokens.len() * self.model.cfg.vocab_size,
        )?;
        self.step_dev(tokens, resets, StepOn::Host(state))?;
        self.step_out(state, logits)
    }

    fn hold_state(&mut self, state: &State<f32>) -> Result<Option<HeldState>> {
        self.decoder.hold(&self.model, state).map(Some)
    }

    fn read_held(&mut self, held: HeldState, state: &mut State<f32>) -> Result<()> {
        state.check(&self.model.cfg, held.batch, "read_held")?;
        self.model.dev.bind()?;
        let h = self.held(held, "read_held")?;
        h.conv.read(0, &mut state.conv.data)?;
        h.ssm.read(0, &mut state.ssm.data)
    }

    fn step_held(
        &mut self,
        held: HeldState,
        tokens: &[u32],
        resets: Option<&[bool]>,
        logits: &mut [f32],
    ) -> Result<()> {
        check_len(
            "step_held",
            "logits",
            logits.len(),
            tokens.len() * self.model.cfg.vocab_size,
        )?;
        self.step_dev(tokens, resets, StepOn::Held(held))?;
        self.decoder.logits().read(0, logits)
    }

    fn prefill_held(&mut self, held: HeldState, tokens: &[u32], logits: &mut [f32]) -> Result<()> {
        self.prefill_dev("prefill_held", tokens, StepOn::Held(held), logits.len())?;
        let ws = self.infer_ws.as_ref().expect("workspace");
        let h = self.held(held, "prefill_held")?;
        h.conv.copy_from(0, &ws.state_out_conv, h.conv.bytes)?;
        h.ssm.copy_from(0, &ws.state_out_ssm, h.ssm.bytes)?;
        ws.logits.read(0, logits)
    }

    fn prefill(
        &mut self,
        tokens: &[u32],
        state: &mut State<f32>,
        logits: &mut [f32],
    ) -> Result<()> {
        self.prefill_dev("prefill", tokens, StepOn::Host(state), logits.len())?;
        let ws = self.infer_ws.as_ref().expect("workspace");
        ws.logits.read(0, logits)?;
        ws.state_out_conv.read(0, &mut state.conv.data)?;
        ws.state_out_ssm.read(0, &mut state.ssm.data)
    }

    fn prefill_held_row(
        &mut self,
        held: HeldState,
        row: usize,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<Option<()>> {
        self.prefill_row_dev(held, row, tokens, logits).map(Some)
    }

    fn step_held_sample(
        &mut self,
        held: HeldState,
        tokens: &[u32],
        how: &[RowSampling],
        ids: &mut [u32],
    ) -> Result<Option<()>> {
        self.step_sample_dev(held, tokens, how, ids).map(Some)
    }

    fn memory(&self) -> Result<Option<MemoryUse>> {
        self.model.dev.bind()?;
        let (free, total) = cudarc::driver::result::mem_get_info().map_err(|e| Error::Device {
            device: self.model.dev.name.clone(),
            msg: format!("reading the memory in use: {e}"),
        })?;
        Ok(Some(MemoryUse {
            activation_bytes_per_token: self.train_activation_bytes_per_token(),
            device_used: (total - free) as u64,
            device_total: total as u64,
        }))
    }

    fn parameters(&self) -> Result<NamedTensors> {
        self.model.whole("parameters")?;
        self.model.dev.bind()?;
        self.read_named(&self.model.params)
    }
}

/// How [`GpuEngine::train_pass`] holds the model and what its backward tells.
enum Pass<'a, 'c> {
    /// The whole model held ([`TrainingEngine::loss_and_backward`]).
    Whole,
    /// Group by group through a stage-3 hook on paged buffers (`crate::layered`).
    Layered(&'a mut dyn ParamHook),
    /// The whole model held, each bucket of final gradients queued for the sum over the ranks
    /// ([`TrainingEngine::loss_and_backward_summed`]).
    Summed(&'a mut SumAsDone<'c>),
    /// The whole model held, each group's final gradient read out and handed to a hook
    /// ([`TrainingEngine::loss_and_backward_streamed`]).
    Streamed(&'a mut dyn GradHook),
}

impl GpuEngine {
    /// Forward, loss and backward into the gradient buffers (see [`Pass`]).
    fn train_pass(
        &mut self,
        input: &Batch,
        (targets, mask): (&[u32], Option<&[bool]>),
        state: Option<&State<f32>>,
        grad_scale: f64,
        mut pass: Pass,
    ) -> Result<LossOutput> {
        input.check(&self.model.cfg, "loss_and_backward")?;
        if let Some(s) = state {
            s.check(&self.model.cfg, input.batch, "loss_and_backward")?;
        }
        let n = input.rows();
        let v = self.model.cfg.vocab_size;
        if targets.len() != n || mask.is_some_and(|m| m.len() != n) {
            return Err(Error::Shape {
                op: "cross_entropy",
                msg: format!(
                    "{} targets and mask {:?} for [batch, seq_len] = [{}, {}]",
                    targets.len(),
                    mask.map(|m| m.len()),
                    input.batch,
                    input.seq_len
                ),
            });
        }
        let counts = |i: usize| mask.is_none_or(|m| m[i]);
        if let Some(i) = (0..n).find(|&i| counts(i) && targets[i] as usize >= v) {
            return Err(Error::Shape {
                op: "cross_entropy",
                msg: format!(
                    "target {} at position {i} is outside the vocabulary of {v}",
                    targets[i]
                ),
            });
        }
        let n_targets = (0..n).filter(|&i| counts(i)).count();
        self.train.grad_scale_sum += grad_scale;
        let final_grad = self.train.carry.final_grad();
        if n_targets == 0 && final_grad.is_none() && matches!(pass, Pass::Whole) {
            return Ok(LossOutput {
                loss: 0.0,
                n_targets,
                grad_state: State::zeros(&self.model.cfg, input.batch),
            });
        }
        self.model.dev.bind()?;
        let key = (input.batch, input.seq_len, Mode::Train);
        let lowp = self.lowp();
        ensure_ws(
            &mut self.train.ws,
            &self.model.dev,
            &self.model.cfg,
            self.model.shape,
            key,
            lowp,
        )?;
        let ws = self.train.ws.take().expect("workspace");
        let r = (|| {
            self.model.upload_inputs(&ws, input, state)?;
            let gw = ws.grad.as_ref().expect("training workspace");
            gw.targets.write(0, targets)?;
            if let Some(m) = mask {
                let bytes: Vec<u8> = m.iter().map(|&b| b as u8).collect();
                gw.mask.write(0, &bytes)?;
            }
            let inv = 1.0f32 / n_targets.max(1) as f32;
            let k = grad_scale as f32 * inv;
            let csr = token_csr(input.tokens);
            let csr = (&csr.0[..], &csr.1[..], &csr.2[..]);
            let grads = &self.train.grads;
            let back =
                Backward::new(&self.model, &ws, grads, state.is_some()).with_final_grad(final_grad);
            match &mut pass {
                Pass::Whole => {
                    self.model.forward_dev(&ws, state.is_some(), 0)?;
                    loss_dev(&self.model, &ws, grads, mask.is_some(), k)?;
                    back.run(csr)?;
                }
                Pass::Summed(sum) => {
                    self.model.forward_dev(&ws, state.is_some(), 0)?;
                    loss_dev(&self.model, &ws, grads, mask.is_some(), k)?;
                    back.run_with(csr, &mut |p| sum.on(p))?;
                }
                Pass::Streamed(hook) => {
                    self.model.forward_dev(&ws, state.is_some(), 0)?;
                    loss_dev(&self.model, &ws, grads, mask.is_some(), k)?;
                    let m = &self.model;
                    back.run_with(csr, &mut |p| match p {
                        // The read waits for the group's kernels on the stream.
                        Phase::Grads(g) => {
                            let t = crate::layered::group(m, g).read(grads)?;
                            hook.gradients(g, &t.iter().collect::<Vec<_>>())
                        }
                        _ => Ok(()),
                    })?;
                }
                Pass::Layered(hook) => {
                    let mut g = Groups::new(&self.model, grads, &mut **hook);
                    self.model
                        .forward_dev_with(&ws, state.is_some(), 0, &mut |p| g.on(p))?;
                    loss_dev(&self.model, &ws, grads, mask.is_some(), k)?;
                    back.run_with(csr, &mut |p| g.on(p))?;
                    self.train.layered_peak = Some(g.peak);
                }
            }
            let mut rows = vec![0f32; n];
            gw.row_loss.read(0, &mut rows)?;
            let mut total = 0f32;
            for (i, l) in rows.iter().enumerate() {
                if counts(i) {
                    total += *l;
                }
            }
            let mut gs = State::<f32>::zeros(&self.model.cfg, input.batch);
            gw.gstate_conv.read(0, &mut gs.conv.data)?;
            gw.gstate_ssm.read(0, &mut gs.ssm.data)?;
            Ok(LossOutput {
                loss: (total * inv) as f64,
                n_targets,
                grad_state: gs,
            })
        })();
        self.train.ws = Some(ws);
        r
    }
}

impl TrainingEngine for GpuEngine {
    fn loss_and_backward(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
    ) -> Result<LossOutput> {
        self.model.whole("loss_and_backward")?;
        self.not_summed("loss_and_backward")?;
        self.train_pass(input, (targets, mask), state, grad_scale, Pass::Whole)
    }

    /// The whole-model pass, each group's gradient read out (a copy that waits for the group's
    /// kernels) and handed to `hook` as soon as the backward has finished the group, so that
    /// the driver reduces it on the host while the backward goes on (ZeRO stages 0–2 with the
    /// optimizer in host memory). Not on paged (layer-by-layer) buffers.
    fn loss_and_backward_streamed(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn GradHook,
    ) -> Result<Option<LossOutput>> {
        if self.train.grads.is_paged() {
            return Ok(None);
        }
        self.not_summed("loss_and_backward_streamed")?;
        let out = self.train_pass(
            input,
            (targets, mask),
            state,
            grad_scale,
            Pass::Streamed(hook),
        )?;
        Ok(Some(out))
    }

    /// The whole-model pass with each bucket's sum queued on `comm` as the backward finishes
    /// its groups (`crate::zero::SumAsDone`); the communicator's stream waits for the engine's
    /// at each bucket, and the call waits for every sum before it returns. `Ok(None)` where
    /// [`TrainingEngine::all_reduce_gradients`] would say no (fp16, whose loss scale is per
    /// rank) and on paged (layer-by-layer) buffers.
    fn loss_and_backward_summed(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        grad_scale: f64,
        sum: SumInBackward<'_>,
    ) -> Result<Option<LossOutput>> {
        if self.model.precision == Precision::Fp16 || self.train.grads.is_paged() {
            return Ok(None);
        }
        self.not_summed("loss_and_backward_summed")?;
        self.model.dev.bind()?;
        let mut s = SumAsDone::new(self, sum.comm, sum.bucket, sum.scatter)?;
        let out = self.train_pass(
            input,
            (targets, mask),
            None,
            grad_scale,
            Pass::Summed(&mut s),
        );
        // Whatever was queued is waited for, also after an error.
        let waited = s.wait();
        let out = out?;
        waited?;
        if s.queued != self.model.layout.numel {
            return Err(self.model.dev.err(
                "summing gradients in the backward",
                format!(
                    "{} of {} elements were summed",
                    s.queued, self.model.layout.numel
                ),
            ));
        }
        self.model.dev.bind()?;
        self.train.summed = Some(sum.scatter);
        Ok(Some(out))
    }

    /// Layer by layer on paged buffers (`crate::layered`): the first call drops the whole
    /// model's parameter, shadow and gradient memory (and any int8 copy and decode graph);
    /// [`TrainingEngine::set_parameters`] brings it back. `Ok(None)`, nothing done, unless
    /// turned on (`GpuEngine::set_layered`), and never with a carried final-state gradient
    /// (stateful training through several windows) or a sharded on-device optimizer.
    fn loss_and_backward_layered(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn ParamHook,
    ) -> Result<Option<LossOutput>> {
        if !self.train.layered_on
            || self.train.carry.final_grad().is_some()
            || self.train.shard.is_some()
        {
            return Ok(None);
        }
        self.model.dev.bind()?;
        self.go_paged()?;
        match self.train_pass(
            input,
            (targets, mask),
            state,
            grad_scale,
            Pass::Layered(hook),
        ) {
            Ok(out) => Ok(Some(out)),
            Err(e) => {
                // Whatever the failed pass left mapped is dropped with its buffers.
                let _ = self.fresh_paged();
                Err(e)
            }
        }
    }

    fn loss_and_backward_carry(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_final: Option<&State<f32>>,
        grad_scale: f64,
    ) -> Result<(LossOutput, State<f32>)> {
        self.model.whole("loss_and_backward_carry")?;
        self.loss_and_backward_carry_dev(input, targets, mask, state, grad_final, grad_scale)
    }

    fn forward_state(&mut self, input: &Batch, state: Option<&State<f32>>) -> Result<State<f32>> {
        self.model.whole("forward_state")?;
        self.forward_state_dev(input, state)
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.train.grad_scale_sum = 0.0;
        self.train.summed = None;
        if self.train.grads.is_paged() {
            // Layer by layer: no gradient is held between calls.
            return Ok(());
        }
        self.model.dev.bind()?;
        self.train.grads.zero()
    }

    fn optimizer_step(&mut self, hp: &AdamWConfig, lr: f64) -> Result<StepStats> {
        self.model.whole("optimizer_step")?;
        self.not_sharded("optimizer_step")?;
        self.model.dev.bind()?;
        // fp16: the gradients hold loss_scale × gradient; divide it out here.
        let unscale = match self.model.precision {
            Precision::Fp16
                if self.train.grad_scale_sum.is_finite() && self.train.grad_scale_sum > 0.0 =>
            {
                1.0 / self.train.grad_scale_sum
            }
            _ => 1.0,
        };
        let norm = self.grad_norm()? * unscale;
        if !norm.is_finite() {
            return Ok(StepStats {
                grad_norm: norm,
                clipped: false,
                skipped: true,
            });
        }
        let clip = hp.clip_coef(norm);
        let (clipped, coef) = (clip.is_some(), clip.unwrap_or(1.0));
        let scale_grads = clipped || unscale != 1.0;
        let coef = scale_grads.then_some((coef * unscale) as f32);
        let n = self.model.layout.numel;
        self.adamw_flat(hp, lr, 0..n, 0, coef)?;
        self.model.dev.sync()?;
        Ok(StepStats {
            grad_norm: norm,
            clipped,
            skipped: false,
        })
    }

    fn set_parameters(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()> {
        self.model.dev.bind()?;
        check_named(&self.model.cfg, named)?;
        self.go_whole()?;
        self.upload_named(&self.model.params, named)?;
        self.model.refresh_shadow()?;
        self.model.dev.sync()
    }

    fn gradients(&self) -> Result<NamedTensors> {
        self.model.whole("gradients")?;
        self.model.dev.bind()?;
        self.read_named(&self.train.grads)
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        self.not_sharded("optimizer_state")?;
        self.model.dev.bind()?;
        let (m, v) = match &self.train.moments {
            Some((m, v)) => (self.read_named(m)?, self.read_named(v)?),
            None => {
                let zeros: NamedTensors = (self.model.layout.slots.iter())
                    .map(|s| (s.name.clone(), Tensor::zeros(&s.shape)))
                    .collect();
                (zeros.clone(), zeros)
            }
        };
        Ok(OptimizerState {
            step: self.train.opt_step,
            m,
            v,
        })
    }

    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        self.not_sharded("set_optimizer_state")?;
        self.model.dev.bind()?;
        self.moments()?;
        let (m, v) = self.train.moments.as_ref().expect("allocated above");
        self.upload_named(m, &state.m)?;
        self.upload_named(v, &state.v)?;
        self.train.opt_step = state.step;
        Ok(())
    }

    fn all_reduce_gradients(&mut self, comm: &mut dyn reference::comm::Comm) -> Result<bool> {
        self.model.whole("all_reduce_gradients")?;
        if self.model.precision == Precision::Fp16 {
            // The loss scale is per rank; the driver refuses fp16 before this.
            return Ok(false);
        }
        if self.train.summed.is_some() {
            // Summed during the backward (`loss_and_backward_summed`).
            return Ok(true);
        }
        self.model.dev.bind()?;
        self.model.dev.sync()?;
        let n = self.train.grads.bytes / 4;
        Ok(comm.all_reduce_sum_device(self.train.grads.ptr, n)?)
    }

    fn shard_optimizer(
        &mut self,
        comm: &mut dyn reference::comm::Comm,
        chunk: std::ops::Range<usize>,
        padded: usize,
    ) -> Result<bool> {
        self.model.whole("shard_optimizer")?;
        self.shard_optimizer_dev(comm, chunk, padded)
    }

    fn reduce_gradient_shard(
        &mut self,
        comm: &mut dyn reference::comm::Comm,
        scatter: bool,
    ) -> Result<f64> {
        self.reduce_gradient_shard_dev(comm, scatter)
    }

    fn optimizer_step_shard(
        &mut self,
        comm: &mut dyn reference::comm::Comm,
        hp: &AdamWConfig,
        lr: f64,
        grad_norm: f64,
    ) -> Result<()> {
        self.optimizer_step_shard_dev(comm, hp, lr, grad_norm)
    }

    fn optimizer_shard(&self) -> Result<OptimizerShard> {
        self.optimizer_shard_dev()
    }

    fn set_optimizer_shard(&mut self, shard: &OptimizerShard) -> Result<()> {
        self.set_optimizer_shard_dev(shard)
    }
}
