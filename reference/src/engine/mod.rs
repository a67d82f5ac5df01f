//! The model-level interface every tier implements, in two parts: [`InferenceEngine`]
//! (forward, prefill, decode steps, held states, a forward-only loss) and [`TrainingEngine`]
//! built on it (loss + backward, gradients, the optimizer step, parameters and optimizer
//! state in and out). The reference's implementation is [`ReferenceEngine`].

mod reference;

pub use self::reference::ReferenceEngine;

use std::ops::Range;

use crate::config::MambaConfig;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::loss::cross_entropy_loss;
use crate::model::Batch;
use crate::optim::{AdamW, AdamWConfig, StepStats};
use crate::params::{param_specs, Params};
use crate::state::State;
use crate::tensor::Tensor;

/// Result of [`TrainingEngine::loss_and_backward`].
#[derive(Clone, Debug)]
pub struct LossOutput {
    /// Mean cross-entropy over the masked target positions (not multiplied by `grad_scale`).
    pub loss: f64,
    /// Number of target positions the mean is over.
    pub n_targets: usize,
    /// Gradient of `grad_scale · loss` w.r.t. the initial state (zeros stand for "no state").
    pub grad_state: State<f32>,
}

/// Result of the forward-only [`InferenceEngine::loss`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalLoss {
    /// Mean cross-entropy over the masked target positions (0 when there are none).
    pub loss: f64,
    /// Number of target positions the mean is over.
    pub n_targets: usize,
}

/// What an engine with its own device memory reports ([`InferenceEngine::memory`]).
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

/// One rank's slice of a flat-sharded optimizer (ZeRO stages 1–3): the f32 master weights and
/// AdamW moments of the flat elements `range` (every parameter laid end to end in canonical
/// order, padded with zeros to a multiple of the world size), and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerShard {
    pub range: Range<usize>,
    pub master: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
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

/// A group of parameters that layer-by-layer training ([`TrainingEngine::loss_and_backward_layered`],
/// ZeRO stage 3) gathers, frees and reduces together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamGroup {
    /// `backbone.layers.{i}.*`.
    Layer(usize),
    /// Everything outside the layers: the embedding, the final norm and the untied lm_head.
    Outer,
}

impl ParamGroup {
    /// Indices into [`param_specs`] of the group's tensors, in canonical order.
    pub fn tensors(self, cfg: &MambaConfig) -> Vec<usize> {
        let specs = param_specs(cfg);
        let keep = |n: &str| match self {
            ParamGroup::Layer(i) => n.starts_with(&format!("backbone.layers.{i}.")),
            ParamGroup::Outer => !n.starts_with("backbone.layers."),
        };
        (0..specs.len()).filter(|&i| keep(&specs[i].0)).collect()
    }

    /// Every group of `cfg`: the layers in order, then [`ParamGroup::Outer`].
    pub fn all(cfg: &MambaConfig) -> Vec<ParamGroup> {
        let mut g: Vec<_> = (0..cfg.n_layer).map(ParamGroup::Layer).collect();
        g.push(ParamGroup::Outer);
        g
    }

    /// Where the group stands in [`ParamGroup::all`] of a model of `n_layer` layers.
    pub fn index(self, n_layer: usize) -> usize {
        match self {
            ParamGroup::Layer(i) => i,
            ParamGroup::Outer => n_layer,
        }
    }

    /// The order in which [`TrainingEngine::loss_and_backward_layered`] fills the groups of
    /// one micro-batch: the outer group (embedding lookup), every layer, the outer group
    /// (final norm and head), every layer in reverse.
    pub fn fill_order(n_layer: usize) -> Vec<ParamGroup> {
        let mut o = vec![ParamGroup::Outer];
        o.extend((0..n_layer).map(ParamGroup::Layer));
        o.push(ParamGroup::Outer);
        o.extend((0..n_layer).rev().map(ParamGroup::Layer));
        o
    }

    /// The order in which a backward finishes the groups' gradients
    /// ([`TrainingEngine::loss_and_backward_streamed`], the gradients of
    /// [`TrainingEngine::loss_and_backward_layered`]): every layer in reverse, then the outer
    /// group (the tied embedding's gradient is final only after the lookup's backward).
    pub fn grads_order(n_layer: usize) -> Vec<ParamGroup> {
        let mut o: Vec<_> = (0..n_layer).rev().map(ParamGroup::Layer).collect();
        o.push(ParamGroup::Outer);
        o
    }
}

/// The caller's side of [`TrainingEngine::loss_and_backward_layered`]: where the engine gets a
/// group's parameters just before it uses them, says when it no longer holds them, and hands
/// over a group's gradients once they are final. ZeRO stage 3 implements it with an
/// all-gather per fill and a reduce-scatter per gradient (`trainer::dist::zero`).
pub trait ParamHook {
    /// Fills `tensors` (the group's tensors in canonical order, shaped as [`param_specs`]
    /// says, contents undefined) with the current parameters.
    fn fill(&mut self, group: ParamGroup, tensors: &mut [Tensor<f32>]) -> Result<()>;
    /// The engine no longer holds the group's parameters (freed since the last fill).
    fn release(&mut self, group: ParamGroup) -> Result<()>;
    /// The gradient of this call's `grad_scale · loss` w.r.t. the group's tensors (canonical
    /// order), complete for this call: every group is handed over exactly once per call,
    /// and the engine frees the buffers afterwards.
    fn gradients(&mut self, group: ParamGroup, grads: &[&Tensor<f32>]) -> Result<()>;
}

/// The caller's side of [`TrainingEngine::loss_and_backward_streamed`]: where the engine hands
/// over each [`ParamGroup`]'s gradient as soon as the backward is done with it, so that the
/// caller can start summing it over the ranks while the backward goes on (ZeRO stages 0–2 with
/// `overlap_comm`, `trainer::dist::zero`).
pub trait GradHook {
    /// The group's gradient buffers (its tensors in canonical order) as they stand now and
    /// will stay when the call returns: what the buffers held before the call plus this call's
    /// gradient, final for this call. Every group is handed over exactly once per call. The
    /// hook copies what it needs; the engine keeps the buffers.
    fn gradients(&mut self, group: ParamGroup, grads: &[&Tensor<f32>]) -> Result<()>;
}

/// How [`TrainingEngine::loss_and_backward_summed`] sums the gradients during the backward.
pub struct SumInBackward<'a> {
    pub comm: &'a mut dyn crate::comm::Comm,
    /// Elements a bucket holds at least (`reduce_bucket_size`); 0 counts as 1.
    pub bucket: usize,
    /// With a sharded optimizer at stage 2: each element is summed on the rank whose chunk
    /// holds it only (a reduce per chunk); otherwise on every rank (an all-reduce).
    pub scatter: bool,
}

impl std::fmt::Debug for SumInBackward<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SumInBackward")
            .field("bucket", &self.bucket)
            .field("scatter", &self.scatter)
            .finish_non_exhaustive()
    }
}

/// A ticket for a state an engine holds (see [`InferenceEngine::hold_state`]). An engine
/// holds one state at a time: holding another invalidates earlier tickets, and using a stale
/// ticket is an error, never a silent use of someone else's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldState {
    /// Unique per engine and per call to [`InferenceEngine::hold_state`].
    pub id: u64,
    /// Rows of the held state.
    pub batch: usize,
}

/// How an engine draws one row's next token ([`InferenceEngine::step_held_sample`]), in the
/// order of the host sampler: repetition penalty on the raw logits, temperature, top-k, top-p,
/// a draw. Temperature 0 (or `top_k` 1) is greedy: the argmax, the first on ties.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 1 = off.
    pub top_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    /// The draw uses the random number `(seed, draw)`: the same pair gives the same token.
    pub seed: u64,
    pub draw: u64,
    /// Ids at or above this are never drawn (a vocabulary padded beyond the tokenizer's).
    pub sampleable: u32,
}

impl RowSampling {
    /// Greedy over the first `sampleable` ids.
    pub fn greedy(sampleable: u32) -> RowSampling {
        RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            draw: 0,
            sampleable,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// The error for a ticket an engine does not (or no longer) recognise.
pub fn not_held(engine: &str, op: &'static str, held: HeldState) -> Error {
    Error::Shape {
        op,
        msg: format!(
            "{engine} does not hold state #{} any more (another state was moved onto it since)",
            held.id
        ),
    }
}

/// The error of a tier that does not implement `op` yet.
pub fn unsupported(engine: &str, op: &'static str) -> Error {
    Error::Device {
        device: engine.to_string(),
        msg: format!("{op} is not supported by this engine yet"),
    }
}

/// A Mamba model on some device, for inference. Every tier implements this; `vet-chat`,
/// generation, evaluation and the app API (`trainer::assistant`) only need it. Values cross
/// the boundary as f32; every method that touches a device returns `Result`.
pub trait InferenceEngine {
    /// Short name of the tier ("reference-f64", "simd", "cuda:0").
    fn name(&self) -> String;
    fn config(&self) -> &MambaConfig;
    /// Logits `[batch, seq_len, vocab]` and the state after the last position.
    fn forward(
        &mut self,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> Result<(Tensor<f32>, State<f32>)>;
    /// Forward and masked mean cross-entropy against `targets` `[batch, seq_len]`, with no
    /// backward: gradients are left untouched and no activation is kept for a backward. The
    /// loss equals [`TrainingEngine::loss_and_backward`]'s (bit for bit on the reference).
    /// The default runs [`InferenceEngine::forward`] and the cross-entropy on the host.
    fn loss(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
    ) -> Result<EvalLoss> {
        let (logits, _) = self.forward(input, state)?;
        let vocab = self.config().vocab_size;
        let (loss, n_targets) = cross_entropy_loss(&logits.data, targets, mask, vocab)?;
        Ok(EvalLoss {
            loss: f64::from(loss),
            n_targets,
        })
    }
    /// One token per row (`tokens` `[batch]`), updating `state` in place; returns logits
    /// `[batch, vocab]`. `resets[b]` starts row `b` afresh.
    fn step(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
    ) -> Result<Tensor<f32>>;
    /// [`InferenceEngine::step`] into a caller-owned `logits` buffer (`[batch, vocab]`). Fast
    /// tiers override it so that decoding allocates nothing per token.
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
    /// memory, through [`InferenceEngine::step_into`] and [`InferenceEngine::prefill`]. Use
    /// it through [`crate::decode::DecodeState`].
    fn hold_state(&mut self, state: &State<f32>) -> Result<Option<HeldState>> {
        let _ = state;
        Ok(None)
    }
    /// Copies the held state into `state`.
    fn read_held(&mut self, held: HeldState, state: &mut State<f32>) -> Result<()> {
        let _ = state;
        Err(not_held(&self.name(), "read_held", held))
    }
    /// [`InferenceEngine::step_into`] on the held state.
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
    /// [`InferenceEngine::prefill`] on the held state (batch 1).
    fn prefill_held(&mut self, held: HeldState, tokens: &[u32], logits: &mut [f32]) -> Result<()> {
        let _ = (tokens, logits);
        Err(not_held(&self.name(), "prefill_held", held))
    }
    /// Starts a new sequence in row `row` of the held state: the row restarts from the zero
    /// state and runs `tokens` (at least one); `logits` (`[vocab]`) gets the last token's
    /// logits. The other rows are untouched. Continuous batching admits a waiting sequence
    /// into a finished one's row with it. `None` (the default): not supported.
    fn prefill_held_row(
        &mut self,
        held: HeldState,
        row: usize,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<Option<()>> {
        let _ = (held, row, tokens, logits);
        Ok(None)
    }
    /// [`InferenceEngine::step_held`], then one token per row drawn on the engine as
    /// `how[row]` says, into `ids` (`[batch]`): only the ids leave the device. The penalty
    /// context of a row is the prompt of its last [`InferenceEngine::prefill_held_row`] and
    /// every token fed to it since. `None` (the default): not supported; nothing ran.
    fn step_held_sample(
        &mut self,
        held: HeldState,
        tokens: &[u32],
        how: &[RowSampling],
        ids: &mut [u32],
    ) -> Result<Option<()>> {
        let _ = (held, tokens, how, ids);
        Ok(None)
    }
    /// Device memory in use, for engines with their own memory (GPU); `None` by default.
    fn memory(&self) -> Result<Option<MemoryUse>> {
        Ok(None)
    }
    /// The weights, read out as named f32 tensors in canonical order.
    fn parameters(&self) -> Result<NamedTensors>;
}

/// A Mamba model that trains: [`InferenceEngine`] plus the backward, the gradient buffers,
/// AdamW, and parameters and optimizer state in and out.
///
/// # What comes next: sharded and overlapped training
///
/// Two methods are here for the distributed trainer (DeepSpeed ZeRO, see DESIGN.md):
/// - [`TrainingEngine::gradients_of_layer`] hands out one layer's gradients after the
///   backward; [`TrainingEngine::loss_and_backward_streamed`] hands each group's out from
///   inside the backward as soon as it is final (layers in reverse order, `n_layer - 1`
///   first, then the embedding and head) through a [`GradHook`], so that the caller can sum
///   them over the ranks while the backward goes on (the simd engine implements it).
/// - [`TrainingEngine::optimizer_step_range`] steps only a slice of the parameters (the
///   rank's shard of the AdamW state), clipped with a global gradient norm the caller
///   reduced over every rank.
///
/// A tier that does not implement one of them yet returns an error saying so.
///
/// [`TrainingEngine::loss_and_backward_layered`] is ZeRO stage 3's interface: the engine gets
/// each [`ParamGroup`]'s parameters from a [`ParamHook`] just before it uses them, frees them
/// after, and hands each group's gradient to the hook as soon as it is final. The simd engine
/// implements it; a tier that does not keeps the default (`Ok(None)`), and the caller gathers
/// every parameter into it instead.
pub trait TrainingEngine: InferenceEngine {
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
    /// [`TrainingEngine::loss_and_backward`] for stateful training over consecutive windows:
    /// also returns the state after the last position, and adds `grad_final` (the gradient of
    /// the later windows' scaled loss w.r.t. that final state) into the backward, so that
    /// the returned `grad_state` is the gradient through this window and every later one.
    /// The default runs the backward, then a forward for the final state, and supports no
    /// `grad_final` (an error says so).
    fn loss_and_backward_carry(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_final: Option<&State<f32>>,
        grad_scale: f64,
    ) -> Result<(LossOutput, State<f32>)> {
        if grad_final.is_some() {
            return Err(unsupported(
                &self.name(),
                "back-propagation through several windows (a final-state gradient)",
            ));
        }
        let lo = self.loss_and_backward(input, targets, mask, state, grad_scale)?;
        let (_, last) = self.forward(input, state)?;
        Ok((lo, last))
    }
    /// The state after `input` from `state` (zeros when `None`), without the loss: the
    /// forward-only pass of stateful training through several windows. The default runs
    /// [`InferenceEngine::forward`]; a fast tier skips the logits.
    fn forward_state(&mut self, input: &Batch, state: Option<&State<f32>>) -> Result<State<f32>> {
        Ok(self.forward(input, state)?.1)
    }
    /// [`TrainingEngine::loss_and_backward`] layer by layer, for ZeRO stage 3: the engine
    /// holds no parameter and no gradient buffer between calls (any it held are dropped first),
    /// asks `hook` to fill each [`ParamGroup`] just before using it (the outer group for the
    /// embedding lookup, each layer for its forward, the outer group again for the final norm
    /// and head through their backward, each layer again for its backward) and releases it
    /// right after, and hands each group's gradient to `hook` as soon as it is final (layers
    /// in reverse order, the outer group last, as the tied embedding's gradient is final only
    /// after the lookup's backward) instead of adding it to its own buffers. After the call
    /// the engine holds no parameters: [`TrainingEngine::set_parameters`] gives it some again.
    /// The gradients are the bits [`TrainingEngine::loss_and_backward`] would add to zeroed
    /// buffers. `Ok(None)` (the default): this engine cannot, and nothing happened (the hook
    /// is not called); the caller gathers every parameter into the engine instead.
    fn loss_and_backward_layered(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn ParamHook,
    ) -> Result<Option<LossOutput>> {
        let _ = (input, targets, mask, state, grad_scale, hook);
        Ok(None)
    }
    /// [`TrainingEngine::loss_and_backward`] (no state carried out; the same gradient buffers,
    /// *added* to, and the same bits) that hands each [`ParamGroup`]'s accumulated gradient to
    /// `hook` as soon as the backward has finished with it: the layers in reverse order
    /// (`n_layer - 1` first), then the outer group (the tied embedding's gradient is final only
    /// after the lookup's backward). The engine keeps its parameters and buffers (unlike
    /// [`TrainingEngine::loss_and_backward_layered`]). An error from the hook stops the
    /// backward and is returned. `Ok(None)` (the default): this engine cannot, and nothing
    /// happened (the hook is not called); the caller runs
    /// [`TrainingEngine::loss_and_backward`] and reads [`TrainingEngine::gradients`] after it
    /// instead. A device engine would implement it by handing over host copies of each group
    /// (or a device variant of the hook) as its backward passes that group.
    fn loss_and_backward_streamed(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn GradHook,
    ) -> Result<Option<LossOutput>> {
        let _ = (input, targets, mask, state, grad_scale, hook);
        Ok(None)
    }
    /// [`TrainingEngine::loss_and_backward`] for a step's last micro-batch where the engine
    /// sums its own gradients (after [`TrainingEngine::all_reduce_gradients`] or
    /// [`TrainingEngine::shard_optimizer`] said it can): the backward also queues on
    /// `sum.comm` the sum over the ranks of the gradients it has finished, whole
    /// [`ParamGroup`]s in the backward's order packed into buckets of at least `sum.bucket`
    /// elements (the last may be smaller), each as soon as its groups are done, so that the
    /// collectives overlap the rest of the backward (ZeRO's `overlap_comm`). When it returns,
    /// the buffers hold what [`TrainingEngine::all_reduce_gradients`] (with a sharded
    /// optimizer, [`TrainingEngine::reduce_gradient_shard`] with `sum.scatter`: each element
    /// summed at least on the rank whose chunk holds it) would have left, and those two then
    /// sum nothing again until [`TrainingEngine::zero_grad`]. `Ok(None)` (the default): this
    /// engine cannot, and nothing happened.
    fn loss_and_backward_summed(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        grad_scale: f64,
        sum: SumInBackward<'_>,
    ) -> Result<Option<LossOutput>> {
        let _ = (input, targets, mask, grad_scale, sum);
        Ok(None)
    }
    /// Replaces the gradient buffers (named f32 tensors in canonical order), e.g. with sums
    /// over the ranks computed outside the engine, before [`TrainingEngine::optimizer_step`].
    /// An engine that implements [`TrainingEngine::loss_and_backward_streamed`] and sums its
    /// own gradients ([`TrainingEngine::all_reduce_gradients`]) implements this too. The
    /// default says this engine cannot.
    fn set_gradients(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()> {
        let _ = named;
        Err(unsupported(&self.name(), "set_gradients"))
    }
    /// Clears the gradient buffers.
    fn zero_grad(&mut self) -> Result<()>;
    /// The gradient buffers as named f32 tensors in canonical order.
    fn gradients(&self) -> Result<NamedTensors>;
    /// The gradients of layer `layer` (the tensors named `backbone.layers.{layer}.*`, in
    /// canonical order). The default picks them out of [`TrainingEngine::gradients`].
    fn gradients_of_layer(&self, layer: usize) -> Result<NamedTensors> {
        check_layer(self.config(), layer)?;
        let prefix = format!("backbone.layers.{layer}.");
        let mut all = self.gradients()?;
        all.retain(|(n, _)| n.starts_with(&prefix));
        Ok(all)
    }
    /// Clips and applies AdamW with learning rate `lr`. A non-finite gradient skips the step.
    fn optimizer_step(&mut self, hp: &AdamWConfig, lr: f64) -> Result<StepStats>;
    /// AdamW on the parameters `range` (indices into [`param_specs`], canonical order) only,
    /// clipped with `grad_norm`, the global gradient norm over every parameter (a sharded
    /// optimizer reduces it over the ranks). The step count moves once per call. Over every
    /// parameter with the engine's own norm this is [`TrainingEngine::optimizer_step`].
    fn optimizer_step_range(
        &mut self,
        hp: &AdamWConfig,
        lr: f64,
        range: Range<usize>,
        grad_norm: f64,
    ) -> Result<StepStats> {
        let _ = (hp, lr, range, grad_norm);
        Err(unsupported(&self.name(), "optimizer_step_range"))
    }
    fn set_parameters(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()>;
    fn optimizer_state(&self) -> Result<OptimizerState>;
    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()>;
    /// Sums the accumulated gradients over the ranks of `comm` where they live (on the
    /// device, through [`Comm::all_reduce_sum_device`]), so that
    /// [`TrainingEngine::optimizer_step`] then takes the same data-parallel step on every
    /// rank. `Ok(false)`: this engine or communicator cannot (the default), and the caller
    /// reduces host copies of the gradients instead.
    ///
    /// [`Comm::all_reduce_sum_device`]: crate::comm::Comm::all_reduce_sum_device
    fn all_reduce_gradients(&mut self, comm: &mut dyn crate::comm::Comm) -> Result<bool> {
        let _ = comm;
        Ok(false)
    }
    /// ZeRO stages 1–2 with the optimizer where the gradients live (a GPU engine over NCCL):
    /// from now on the engine keeps AdamW's moments for the flat elements `chunk` only (flat
    /// as in [`OptimizerShard`], `padded` long, this rank's chunk of `comm`'s world), and
    /// steps through [`TrainingEngine::reduce_gradient_shard`] and
    /// [`TrainingEngine::optimizer_step_shard`] instead of
    /// [`TrainingEngine::optimizer_step`]. Moments start at zero. `Ok(false)`: this engine or
    /// communicator cannot (the default), and nothing changed.
    fn shard_optimizer(
        &mut self,
        comm: &mut dyn crate::comm::Comm,
        chunk: Range<usize>,
        padded: usize,
    ) -> Result<bool> {
        let _ = (comm, chunk, padded);
        Ok(false)
    }
    /// With a sharded optimizer: sums the accumulated gradients over the ranks where they
    /// live, by all-reduce or (`scatter`, stage 2) by reduce-scatter, which leaves only this
    /// rank's chunk summed. Returns Σ g² over the chunk (the caller sums it over the ranks
    /// for the global norm).
    fn reduce_gradient_shard(
        &mut self,
        comm: &mut dyn crate::comm::Comm,
        scatter: bool,
    ) -> Result<f64> {
        let _ = (comm, scatter);
        Err(unsupported(&self.name(), "a sharded optimizer"))
    }
    /// With a sharded optimizer: clipping with the global `grad_norm`, AdamW on this rank's
    /// chunk, and the updated chunks all-gathered so every rank holds every parameter.
    fn optimizer_step_shard(
        &mut self,
        comm: &mut dyn crate::comm::Comm,
        hp: &AdamWConfig,
        lr: f64,
        grad_norm: f64,
    ) -> Result<()> {
        let _ = (comm, hp, lr, grad_norm);
        Err(unsupported(&self.name(), "a sharded optimizer"))
    }
    /// With a sharded optimizer: the chunk's master weights, moments and step, for a
    /// checkpoint.
    fn optimizer_shard(&self) -> Result<OptimizerShard> {
        Err(unsupported(&self.name(), "a sharded optimizer"))
    }
    /// With a sharded optimizer: sets the chunk's moments and step (a resume; the weights
    /// come through [`TrainingEngine::set_parameters`]).
    fn set_optimizer_shard(&mut self, shard: &OptimizerShard) -> Result<()> {
        let _ = shard;
        Err(unsupported(&self.name(), "a sharded optimizer"))
    }
}

/// An error unless `layer` is a layer of `cfg`.
fn check_layer(cfg: &MambaConfig, layer: usize) -> Result<()> {
    if layer >= cfg.n_layer {
        return Err(Error::Shape {
            op: "gradients_of_layer",
            msg: format!("layer {layer} of a model with {} layers", cfg.n_layer),
        });
    }
    Ok(())
}

/// An error unless `range` is a range of parameter indices of `cfg`.
pub fn check_param_range(cfg: &MambaConfig, range: &Range<usize>) -> Result<()> {
    let n = param_specs(cfg).len();
    if range.start > range.end || range.end > n {
        return Err(Error::Shape {
            op: "optimizer_step_range",
            msg: format!("parameters {range:?} of a model with {n} parameter tensors"),
        });
    }
    Ok(())
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
    check_named(cfg, named)?;
    Ok(Params::from_ordered(
        cfg,
        named.iter().map(|(_, t)| t.cast()).collect(),
    ))
}

/// Checks `named` against the spec: names, order, shapes, and each tensor's data as long as
/// its shape says (what [`params_from_named`] checks, without building anything).
pub fn check_named(cfg: &MambaConfig, named: &[(String, Tensor<f32>)]) -> Result<()> {
    let specs = param_specs(cfg);
    let mismatch = specs.len() != named.len()
        || specs.iter().zip(named).any(|((sn, ss), (n, t))| {
            sn != n || ss != &t.shape || t.data.len() != ss.iter().product::<usize>()
        });
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
    Ok(())
}
