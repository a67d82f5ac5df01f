//! `reference::InferenceEngine` and `reference::TrainingEngine` for [`GpuEngine`].

use reference::engine::{
    check_len, params_from_named, LossOutput, MemoryUse, NamedTensors, OptimizerState,
};
use reference::model::Batch;
use reference::optim::StepStats;
use reference::{
    AdamWConfig, Error, HeldState, InferenceEngine, MambaConfig, Result, State, Tensor,
    TrainingEngine,
};

use crate::backward::token_csr;
use crate::cuda::Arg;
use crate::decode::StatePtrs;
use crate::engine::{doc_starts, ensure_ws, GpuEngine, NORM_BLOCKS};
use crate::work::Mode;
use crate::Precision;

impl GpuEngine {
    fn lowp(&self) -> bool {
        self.shadow.is_some()
    }

    fn download_flat(&self, buf: &crate::cuda::Buf) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.layout.numel];
        buf.read(0, &mut v)?;
        Ok(v)
    }

    fn named_from_flat(&self, flat: &[f32]) -> NamedTensors {
        self.layout
            .slots
            .iter()
            .map(|s| {
                let data = flat[s.off..s.off + s.numel].to_vec();
                (s.name.clone(), Tensor::from_vec(&s.shape, data))
            })
            .collect()
    }

    fn upload_named(&self, buf: &crate::cuda::Buf, named: &[(String, Tensor<f32>)]) -> Result<()> {
        params_from_named::<f32>(&self.cfg, named)?;
        let mut flat = Vec::with_capacity(self.layout.numel);
        for (_, t) in named {
            flat.extend_from_slice(&t.data);
        }
        buf.write(0, &flat)
    }

    fn read_state(&self, ws: &crate::work::Work, batch: usize) -> Result<State<f32>> {
        let mut st = State::<f32>::zeros(&self.cfg, batch);
        ws.state_out_conv.read(0, &mut st.conv.data)?;
        ws.state_out_ssm.read(0, &mut st.ssm.data)?;
        Ok(st)
    }

    /// Global gradient norm: f64 partial sums over a fixed grid, then one ordered sum.
    fn grad_norm(&self) -> Result<f64> {
        self.dev.launch(
            "sumsq_partial_f64",
            (NORM_BLOCKS as u32, 1, 1),
            256,
            0,
            &[
                Arg::P(self.grads.ptr),
                Arg::L(self.layout.numel as i64),
                Arg::P(self.norm_part.ptr),
            ],
        )?;
        self.dev.launch(
            "sumsq_final_f64",
            (1, 1, 1),
            32,
            0,
            &[
                Arg::P(self.norm_part.ptr),
                Arg::L(NORM_BLOCKS as i64),
                Arg::P(self.norm_out.ptr),
            ],
        )?;
        let mut ss = [0f64];
        self.norm_out.read(0, &mut ss)?;
        Ok(ss[0].sqrt())
    }

    /// One decode step of `tokens` on the state `on` (a host state, copied into the decode
    /// workspace and updated there, or the held state), through the CUDA graph when one could
    /// be captured. Logits end in `decode_ws.logits`.
    fn step_dev(&mut self, tokens: &[u32], resets: Option<&[bool]>, on: StepOn) -> Result<()> {
        let batch = tokens.len();
        let input = Batch {
            batch,
            seq_len: 1,
            tokens,
            resets,
        };
        input.check(&self.cfg, "step")?;
        match on {
            StepOn::Host(state) => state.check(&self.cfg, batch, "step")?,
            StepOn::Held(h) => {
                if h.batch != batch {
                    return Err(Error::Shape {
                        op: "step_held",
                        msg: format!("{batch} tokens for a held state of {} rows", h.batch),
                    });
                }
            }
        }
        self.dev.bind()?;
        let had = self.decode_ws.as_ref().map(|w| w.batch);
        let key = (batch, 1, Mode::Infer { head_rows: batch });
        let lowp = self.lowp();
        ensure_ws(
            &mut self.decode_ws,
            &self.dev,
            &self.cfg,
            self.shape,
            key,
            lowp,
        )?;
        if had != Some(batch) {
            self.graph = None;
        }
        let ws = self.decode_ws.take().expect("decode workspace");
        let r = (|| {
            ws.tokens.write(0, tokens)?;
            ws.starts.write(0, &doc_starts(resets, batch, 1))?;
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
                    let held = self.held(h, "step_held")?;
                    StatePtrs {
                        conv: held.conv.ptr,
                        ssm: held.ssm.ptr,
                    }
                }
            };
            crate::graph::run_decode(self, &ws, st)
        })();
        self.decode_ws = Some(ws);
        r
    }

    /// Downloads the logits of the last step and the host state it updated.
    fn step_out(&self, state: &mut State<f32>, logits: &mut [f32]) -> Result<()> {
        let ws = self.decode_ws.as_ref().expect("decode workspace");
        ws.logits.read(0, logits)?;
        ws.state_in_conv.read(0, &mut state.conv.data)?;
        ws.state_in_ssm.read(0, &mut state.ssm.data)
    }
}

impl GpuEngine {
    /// The inference workspace for `batch × seq_len` with `head_rows` rows through the
    /// lm_head (reused when the shape matches).
    fn infer_ws_for(&mut self, batch: usize, seq_len: usize, head_rows: usize) -> Result<()> {
        let lowp = self.lowp();
        let key = (batch, seq_len, Mode::Infer { head_rows });
        ensure_ws(
            &mut self.infer_ws,
            &self.dev,
            &self.cfg,
            self.shape,
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
        check_len(op, "logits", logits_len, self.cfg.vocab_size)?;
        if tokens.is_empty() {
            return Err(Error::Shape {
                op,
                msg: "no tokens to prefill".into(),
            });
        }
        let input = Batch::new(tokens, 1, tokens.len());
        input.check(&self.cfg, op)?;
        match from {
            StepOn::Host(state) => state.check(&self.cfg, 1, op)?,
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
        self.dev.bind()?;
        self.infer_ws_for(1, tokens.len(), 1)?;
        let ws = self.infer_ws.as_ref().expect("workspace");
        match from {
            StepOn::Host(state) => self.upload_inputs(ws, &input, Some(state))?,
            StepOn::Held(h) => {
                self.upload_inputs(ws, &input, None)?;
                let h = self.held(h, op)?;
                ws.state_in_conv.copy_from(0, h.conv.ptr, h.conv.bytes)?;
                ws.state_in_ssm.copy_from(0, h.ssm.ptr, h.ssm.bytes)?;
            }
        }
        self.forward_dev(ws, true, tokens.len() - 1)
    }
}

/// Where a decode step's state lives.
#[derive(Clone, Copy)]
enum StepOn<'a> {
    Host(&'a State<f32>),
    Held(HeldState),
}

impl InferenceEngine for GpuEngine {
    fn name(&self) -> String {
        self.dev.name.clone()
    }

    fn config(&self) -> &MambaConfig {
        &self.cfg
    }

    fn forward(
        &mut self,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> Result<(Tensor<f32>, State<f32>)> {
        input.check(&self.cfg, "forward")?;
        if let Some(s) = state {
            s.check(&self.cfg, input.batch, "forward")?;
        }
        self.dev.bind()?;
        self.infer_ws_for(input.batch, input.seq_len, input.rows())?;
        let ws = self.infer_ws.as_ref().expect("workspace");
        self.upload_inputs(ws, input, state)?;
        self.forward_dev(ws, state.is_some(), 0)?;
        let v = self.cfg.vocab_size;
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
        let mut logits = Tensor::zeros(&[tokens.len(), self.cfg.vocab_size]);
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
            tokens.len() * self.cfg.vocab_size,
        )?;
        self.step_dev(tokens, resets, StepOn::Host(state))?;
        self.step_out(state, logits)
    }

    fn hold_state(&mut self, state: &State<f32>) -> Result<Option<HeldState>> {
        self.hold(state).map(Some)
    }

    fn read_held(&mut self, held: HeldState, state: &mut State<f32>) -> Result<()> {
        state.check(&self.cfg, held.batch, "read_held")?;
        self.dev.bind()?;
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
            tokens.len() * self.cfg.vocab_size,
        )?;
        self.step_dev(tokens, resets, StepOn::Held(held))?;
        let ws = self.decode_ws.as_ref().expect("decode workspace");
        ws.logits.read(0, logits)
    }

    fn prefill_held(&mut self, held: HeldState, tokens: &[u32], logits: &mut [f32]) -> Result<()> {
        self.prefill_dev("prefill_held", tokens, StepOn::Held(held), logits.len())?;
        let ws = self.infer_ws.as_ref().expect("workspace");
        let h = self.held(held, "prefill_held")?;
        h.conv.copy_from(0, ws.state_out_conv.ptr, h.conv.bytes)?;
        h.ssm.copy_from(0, ws.state_out_ssm.ptr, h.ssm.bytes)?;
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

    fn memory(&self) -> Result<Option<MemoryUse>> {
        self.dev.bind()?;
        let (free, total) = cudarc::driver::result::mem_get_info().map_err(|e| Error::Device {
            device: self.dev.name.clone(),
            msg: format!("reading the memory in use: {e}"),
        })?;
        Ok(Some(MemoryUse {
            activation_bytes_per_token: self.train_activation_bytes_per_token(),
            device_used: (total - free) as u64,
            device_total: total as u64,
        }))
    }

    fn parameters(&self) -> Result<NamedTensors> {
        self.dev.bind()?;
        Ok(self.named_from_flat(&self.download_flat(&self.params)?))
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
        input.check(&self.cfg, "loss_and_backward")?;
        if let Some(s) = state {
            s.check(&self.cfg, input.batch, "loss_and_backward")?;
        }
        let n = input.rows();
        let v = self.cfg.vocab_size;
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
        self.grad_scale_sum += grad_scale;
        if n_targets == 0 {
            return Ok(LossOutput {
                loss: 0.0,
                n_targets,
                grad_state: State::zeros(&self.cfg, input.batch),
            });
        }
        self.dev.bind()?;
        let key = (input.batch, input.seq_len, Mode::Train);
        let lowp = self.lowp();
        ensure_ws(
            &mut self.train_ws,
            &self.dev,
            &self.cfg,
            self.shape,
            key,
            lowp,
        )?;
        let ws = self.train_ws.take().expect("workspace");
        let r = (|| {
            self.upload_inputs(&ws, input, state)?;
            let gw = ws.grad.as_ref().expect("training workspace");
            gw.targets.write(0, targets)?;
            if let Some(m) = mask {
                let bytes: Vec<u8> = m.iter().map(|&b| b as u8).collect();
                gw.mask.write(0, &bytes)?;
            }
            self.forward_dev(&ws, state.is_some(), 0)?;
            let inv = 1.0f32 / n_targets as f32;
            let k = grad_scale as f32 * inv;
            self.loss_dev(&ws, mask.is_some(), k)?;
            let csr = token_csr(input.tokens);
            self.backward_dev(&ws, state.is_some(), (&csr.0, &csr.1, &csr.2))?;
            let mut rows = vec![0f32; n];
            gw.row_loss.read(0, &mut rows)?;
            let mut total = 0f32;
            for (i, l) in rows.iter().enumerate() {
                if counts(i) {
                    total += *l;
                }
            }
            let mut gs = State::<f32>::zeros(&self.cfg, input.batch);
            gw.gstate_conv.read(0, &mut gs.conv.data)?;
            gw.gstate_ssm.read(0, &mut gs.ssm.data)?;
            Ok(LossOutput {
                loss: (total * inv) as f64,
                n_targets,
                grad_state: gs,
            })
        })();
        self.train_ws = Some(ws);
        r
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.grad_scale_sum = 0.0;
        self.dev.bind()?;
        self.grads.zero()
    }

    fn optimizer_step(&mut self, hp: &AdamWConfig, lr: f64) -> Result<StepStats> {
        self.dev.bind()?;
        // fp16: the gradients hold loss_scale × gradient; divide it out here.
        let unscale = match self.precision {
            Precision::Fp16 if self.grad_scale_sum.is_finite() && self.grad_scale_sum > 0.0 => {
                1.0 / self.grad_scale_sum
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
        let mut clipped = false;
        let mut coef = 1.0f64;
        if let Some(max) = hp.max_grad_norm {
            let c = max / (norm + 1e-6);
            if c < 1.0 {
                clipped = true;
                coef = c;
            }
        }
        let scale_grads = clipped || unscale != 1.0;
        let coef = (coef * unscale) as f32;
        self.opt_step += 1;
        let t = self.opt_step as f64;
        let bc1 = 1.0 - hp.beta1.powf(t);
        let bc2 = 1.0 - hp.beta2.powf(t);
        let step_size = (lr / bc1) as f32;
        let sqrt_bc2 = bc2.sqrt() as f32;
        let decay = (1.0 - lr * hp.weight_decay) as f32;
        for s in &self.layout.slots {
            let decays = hp.weight_decay != 0.0 && s.decays;
            self.dev.launch(
                "adamw_f32",
                self.dev.grid1d(s.numel),
                256,
                0,
                &[
                    Arg::P(self.params.at::<f32>(s.off)),
                    Arg::P(self.grads.at::<f32>(s.off)),
                    Arg::P(self.m.at::<f32>(s.off)),
                    Arg::P(self.v.at::<f32>(s.off)),
                    Arg::L(s.numel as i64),
                    Arg::I(scale_grads as i32),
                    Arg::F(coef),
                    Arg::F(hp.beta1 as f32),
                    Arg::F(hp.beta2 as f32),
                    Arg::F((1.0 - hp.beta1) as f32),
                    Arg::F((1.0 - hp.beta2) as f32),
                    Arg::F(hp.eps as f32),
                    Arg::I(decays as i32),
                    Arg::F(decay),
                    Arg::F(step_size),
                    Arg::F(sqrt_bc2),
                ],
            )?;
        }
        self.refresh_shadow()?;
        self.dev.sync()?;
        Ok(StepStats {
            grad_norm: norm,
            clipped,
            skipped: false,
        })
    }

    fn set_parameters(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()> {
        self.dev.bind()?;
        self.upload_named(&self.params, named)?;
        self.refresh_shadow()?;
        self.dev.sync()
    }

    fn gradients(&self) -> Result<NamedTensors> {
        self.dev.bind()?;
        Ok(self.named_from_flat(&self.download_flat(&self.grads)?))
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        self.dev.bind()?;
        let (m, v) = (self.download_flat(&self.m)?, self.download_flat(&self.v)?);
        Ok(OptimizerState {
            step: self.opt_step,
            m: self.named_from_flat(&m),
            v: self.named_from_flat(&v),
        })
    }

    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        self.dev.bind()?;
        self.upload_named(&self.m, &state.m)?;
        self.upload_named(&self.v, &state.v)?;
        self.opt_step = state.step;
        Ok(())
    }
}
