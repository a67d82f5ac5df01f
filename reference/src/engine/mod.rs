//! The model-level interface every tier implements, and the reference's implementation.

use crate::config::MambaConfig;
use crate::decode::{not_held, HeldState};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::loss::cross_entropy;
use crate::model::{backward, forward, step, Batch};
use crate::optim::{AdamW, AdamWConfig, StepStats};
use crate::params::{param_specs, Params};
use crate::state::State;
use crate::tensor::Tensor;

/// Result of [`Engine::loss_and_backward`].
#[derive(Clone, Debug)]
pub struct LossOutput {
    /// Mean cross-entropy over the masked target positions (not multiplied by `grad_scale`).
    pub loss: f64,
    /// Number of target positions the mean is over.
    pub n_targets: usize,
    /// Gradient of `grad_scale · loss` w.r.t. the initial state (zeros stand for "no state").
    pub grad_state: State<f32>,
}

/// What an engine with its own device memory reports ([`Engine::memory`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryUse {
    /// Training activations kept for the backward, per token of the last batch (`None`
    /// before the first `loss_and_backward`).
    pub activation_bytes_per_token: Option<f64>,
    /// Bytes in use on the device (every process), and its total.
    pub device_used: u64,
    pub device_total: u64,
}

/// Named f32 tensors in canonical order (parameters, gradients, optimizer moments).
pub type NamedTensors = Vec<(String, Tensor<f32>)>;

/// AdamW state for checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    pub m: NamedTensors,
    pub v: NamedTensors,
}

impl OptimizerState {
    /// The checkpointable state of `opt`.
    pub fn of<T: Float>(cfg: &MambaConfig, opt: &AdamW<T>) -> OptimizerState {
        OptimizerState {
            step: opt.step,
            m: to_named(cfg, &opt.m),
            v: to_named(cfg, &opt.v),
        }
    }

    /// Back to moments in `T`, checked against `cfg`.
    pub fn to_adamw<T: Float>(&self, cfg: &MambaConfig) -> Result<AdamW<T>> {
        Ok(AdamW {
            m: params_from_named(cfg, &self.m)?,
            v: params_from_named(cfg, &self.v)?,
            step: self.step,
        })
    }
}

/// A Mamba model on some device. Every tier implements this; the trainer, `vet-chat` and the
/// conformance suite only talk to models through it. Values cross the boundary as f32.
pub trait Engine {
    /// Short name of the tier ("reference-f64", "simd", "cuda:0").
    fn name(&self) -> String;
    fn config(&self) -> &MambaConfig;
    /// Logits `[batch, seq_len, vocab]` and the state after the last position.
    fn forward(
        &mut self,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> Result<(Tensor<f32>, State<f32>)>;
    /// Forward, masked cross-entropy against `targets` `[batch, seq_len]`, and backward of
    /// `grad_scale · loss`, *adding* to the gradient buffers.
    fn loss_and_backward(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
    ) -> Result<LossOutput>;
    /// Clears the gradient buffers.
    fn zero_grad(&mut self);
    /// Clips and applies AdamW with learning rate `lr`. A non-finite gradient skips the step.
    fn optimizer_step(&mut self, hp: &AdamWConfig, lr: f64) -> Result<StepStats>;
    /// One token per row (`tokens` `[batch]`), updating `state` in place; returns logits
    /// `[batch, vocab]`. `resets[b]` starts row `b` afresh.
    fn step(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
    ) -> Result<Tensor<f32>>;
    /// [`Engine::step`] into a caller-owned `logits` buffer (`[batch, vocab]`). Fast tiers
    /// override it so that decoding allocates nothing per token.
    fn step_into(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
        logits: &mut [f32],
    ) -> Result<()> {
        let l = self.step(tokens, resets, state)?;
        check_len("step_into", "logits", logits.len(), l.data.len())?;
        logits.copy_from_slice(&l.data);
        Ok(())
    }
    /// Prefill of one sequence (batch 1): runs `tokens` from `state`, leaves the state after
    /// the last token in `state` and that token's logits (`[vocab]`) in `logits`. Only the last
    /// position goes through the lm_head, so fast tiers override it.
    fn prefill(
        &mut self,
        tokens: &[u32],
        state: &mut State<f32>,
        logits: &mut [f32],
    ) -> Result<()> {
        let vocab = self.config().vocab_size;
        check_len("prefill", "logits", logits.len(), vocab)?;
        if tokens.is_empty() {
            return Err(Error::Shape {
                op: "prefill",
                msg: "no tokens to prefill".into(),
            });
        }
        let (l, st) = self.forward(&Batch::new(tokens, 1, tokens.len()), Some(state))?;
        logits.copy_from_slice(&l.data[(tokens.len() - 1) * vocab..]);
        *state = st;
        Ok(())
    }
    /// Moves `state` onto the engine (device memory on a GPU), replacing any state it held,
    /// and returns the ticket for it; `None` (the default): this engine decodes from host
    /// memory, through [`Engine::step_into`] and [`Engine::prefill`]. Use it through
    /// [`crate::decode::DecodeState`].
    fn hold_state(&mut self, state: &State<f32>) -> Result<Option<HeldState>> {
        let _ = state;
        Ok(None)
    }
    /// Copies the held state into `state`.
    fn read_held(&mut self, held: HeldState, state: &mut State<f32>) -> Result<()> {
        let _ = state;
        Err(not_held(&self.name(), "read_held", held))
    }
    /// [`Engine::step_into`] on the held state.
    fn step_held(
        &mut self,
        held: HeldState,
        tokens: &[u32],
        resets: Option<&[bool]>,
        logits: &mut [f32],
    ) -> Result<()> {
        let _ = (tokens, resets, logits);
        Err(not_held(&self.name(), "step_held", held))
    }
    /// [`Engine::prefill`] on the held state (batch 1).
    fn prefill_held(&mut self, held: HeldState, tokens: &[u32], logits: &mut [f32]) -> Result<()> {
        let _ = (tokens, logits);
        Err(not_held(&self.name(), "prefill_held", held))
    }
    /// Device memory in use, for engines with their own memory (GPU); `None` by default.
    fn memory(&self) -> Option<MemoryUse> {
        None
    }
    fn parameters(&self) -> NamedTensors;
    fn set_parameters(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()>;
    fn gradients(&self) -> NamedTensors;
    fn optimizer_state(&self) -> OptimizerState;
    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()>;
}

/// An error unless a caller's buffer has the length an op needs.
pub fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape {
            op,
            msg: format!("{what} has {got} elements, expected {want}"),
        });
    }
    Ok(())
}

/// The specification as an engine: scalar loops in `T` (`f32` or `f64`).
#[derive(Clone, Debug)]
pub struct ReferenceEngine<T> {
    pub cfg: MambaConfig,
    pub params: Params<T>,
    pub grads: Params<T>,
    pub opt: AdamW<T>,
}

impl<T: Float> ReferenceEngine<T> {
    pub fn new(cfg: MambaConfig, params: Params<T>) -> Self {
        let grads = Params::zeros(&cfg);
        let opt = AdamW::new(&cfg);
        ReferenceEngine {
            cfg,
            params,
            grads,
            opt,
        }
    }
}

/// Parameters (or gradients, moments) as named f32 tensors in canonical order.
pub fn to_named<T: Float>(cfg: &MambaConfig, p: &Params<T>) -> NamedTensors {
    p.named(cfg)
        .into_iter()
        .map(|(n, t)| (n, t.cast()))
        .collect()
}

/// Checks `named` against the spec (names, order, shapes) and builds `Params<T>`.
pub fn params_from_named<T: Float>(
    cfg: &MambaConfig,
    named: &[(String, Tensor<f32>)],
) -> Result<Params<T>> {
    let specs = param_specs(cfg);
    let mismatch = specs.len() != named.len()
        || specs
            .iter()
            .zip(named)
            .any(|((sn, ss), (n, t))| sn != n || ss != &t.shape);
    if mismatch {
        let want: Vec<_> = specs.iter().map(|(n, s)| format!("{n} {s:?}")).collect();
        let got: Vec<_> = named
            .iter()
            .map(|(n, t)| format!("{n} {:?}", t.shape))
            .collect();
        return Err(Error::Shape {
            op: "set_parameters",
            msg: format!("got [{}], expected [{}]", got.join(", "), want.join(", ")),
        });
    }
    Ok(Params::from_ordered(
        cfg,
        named.iter().map(|(_, t)| t.cast()).collect(),
    ))
}

impl<T: Float> Engine for ReferenceEngine<T> {
    fn name(&self) -> String {
        format!("reference-{}", T::NAME)
    }

    fn config(&self) -> &MambaConfig {
        &self.cfg
    }

    fn forward(
        &mut self,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> Result<(Tensor<f32>, State<f32>)> {
        let st = state.map(|s| s.cast::<T>());
        let (logits, out, _) = forward(&self.cfg, &self.params, input, st.as_ref(), false)?;
        Ok((logits.cast(), out.cast()))
    }

    fn loss_and_backward(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
    ) -> Result<LossOutput> {
        let st = state.map(|s| s.cast::<T>());
        let (logits, _, cache) = forward(&self.cfg, &self.params, input, st.as_ref(), true)?;
        let lo = cross_entropy(
            &logits.data,
            targets,
            mask,
            self.cfg.vocab_size,
            T::from_f64(grad_scale),
        )?;
        let cache = cache.expect("forward keeps the cache when asked");
        let gs = backward(
            &self.cfg,
            &self.params,
            input,
            st.as_ref(),
            &cache,
            &lo.d_logits,
            &mut self.grads,
        )?;
        Ok(LossOutput {
            loss: lo.loss.to_f64(),
            n_targets: lo.n_targets,
            grad_state: gs.cast(),
        })
    }

    fn zero_grad(&mut self) {
        for t in self.grads.tensors_mut() {
            t.fill(T::ZERO);
        }
    }

    fn optimizer_step(&mut self, hp: &AdamWConfig, lr: f64) -> Result<StepStats> {
        Ok(self
            .opt
            .step(&self.cfg, &mut self.params, &mut self.grads, hp, lr))
    }

    fn step(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
    ) -> Result<Tensor<f32>> {
        let mut st = state.cast::<T>();
        let logits = step(&self.cfg, &self.params, tokens, resets, &mut st)?;
        *state = st.cast();
        Ok(logits.cast())
    }

    fn parameters(&self) -> NamedTensors {
        to_named(&self.cfg, &self.params)
    }

    fn set_parameters(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()> {
        self.params = params_from_named(&self.cfg, named)?;
        Ok(())
    }

    fn gradients(&self) -> NamedTensors {
        to_named(&self.cfg, &self.grads)
    }

    fn optimizer_state(&self) -> OptimizerState {
        OptimizerState::of(&self.cfg, &self.opt)
    }

    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        self.opt = state.to_adamw(&self.cfg)?;
        Ok(())
    }
}
