//! [`SimdEngine`]: the CPU tier behind `reference::InferenceEngine` and
//! `reference::TrainingEngine`.

use std::path::Path;

use reference::engine::{
    check_len, params_from_named, to_named, EvalLoss, GradHook, LossOutput, NamedTensors,
    OptimizerState, ParamGroup, ParamHook,
};
use reference::model::Batch;
use reference::optim::{AdamW, StepStats};
use reference::{
    param_specs, AdamWConfig, Error, InferenceEngine, LayerParams, MambaConfig, Params, Result,
    State, Tensor, TrainingEngine,
};

use crate::forward::{forward, Logits, Scratch};
use crate::kernels::{Isa, MatRef};
use crate::model::{LayerWeights, Weights};
use crate::{SimdOptions, WeightDtype};

/// The fast CPU engine. Inference reads [`Weights`] (f32, bf16 or int8, possibly
/// memory-mapped); training keeps f32 master parameters, gradients and AdamW moments and
/// refreshes the f32 weights after each optimizer step.
pub struct SimdEngine {
    cfg: MambaConfig,
    isa: Isa,
    pool: rayon::ThreadPool,
    weights: Weights,
    /// f32 master parameters: present from [`SimdEngine::new`], made from the weights on the
    /// first training call of a loaded model.
    params: Option<Params<f32>>,
    /// The weights no longer match `params` (after an optimizer step).
    stale: bool,
    grads: Option<Params<f32>>,
    opt: Option<AdamW<f32>>,
    scratch: Scratch,
    logits: Vec<f32>,
    d_logits: Vec<f32>,
    /// A layered step ([`TrainingEngine::loss_and_backward_layered`]) left the engine without
    /// parameters: `weights` is empty and `params` `None` until `set_parameters`.
    released: bool,
    /// What the last layered call held at most at once.
    layered_peak: Option<LayeredPeak>,
}

/// The most elements a layered call ([`TrainingEngine::loss_and_backward_layered`]) held at
/// once: parameters (filled by the hook; the f32 weights the forward reads and the tensors the
/// backward reads, never both for one group; the whole model if the engine still held it when
/// the call began, as after `set_parameters`) and gradient buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayeredPeak {
    pub parameters: usize,
    pub gradients: usize,
}

/// Elements held now and at most, during a layered call.
#[derive(Default)]
struct Live {
    params: usize,
    grads: usize,
    peak: LayeredPeak,
}

impl Live {
    fn add(&mut self, params: isize, grads: isize) {
        self.params = self.params.checked_add_signed(params).expect("held counts");
        self.grads = self.grads.checked_add_signed(grads).expect("held counts");
        self.peak.parameters = self.peak.parameters.max(self.params);
        self.peak.gradients = self.peak.gradients.max(self.grads);
    }
}

/// Elements of `tensors`, as a signed count.
fn numel(tensors: &[&Tensor<f32>]) -> isize {
    tensors.iter().map(|t| t.numel() as isize).sum()
}

impl std::fmt::Debug for SimdEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimdEngine")
            .field("engine", &self.name())
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Runs an inference call: on the caller's thread for a one-thread engine (no job reaches
/// rayon, so a decode step allocates nothing at all: rayon's job queue grows a block every
/// 63 injected jobs), on the pool otherwise.
fn on_pool<R: Send>(pool: &rayon::ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    if pool.current_num_threads() == 1 {
        crate::serial(f)
    } else {
        pool.install(f)
    }
}

fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("simd-{i}"))
        .build()
        .map_err(|e| Error::Device {
            device: "cpu".into(),
            msg: format!("cannot start {threads} worker threads: {e}"),
        })
}

impl SimdEngine {
    /// An engine over `params`, storing the inference matrices as `opts.dtype`.
    pub fn new(cfg: MambaConfig, params: Params<f32>, opts: &SimdOptions) -> Result<SimdEngine> {
        cfg.validate()?;
        let weights = Weights::from_params(&cfg, &params, opts.dtype);
        Self::build(cfg, weights, Some(params), opts)
    }

    /// An inference engine over prepared weights (no f32 master copy until it trains).
    pub fn from_weights(
        cfg: MambaConfig,
        weights: Weights,
        opts: &SimdOptions,
    ) -> Result<SimdEngine> {
        cfg.validate()?;
        Self::build(cfg, weights, None, opts)
    }

    /// Loads `dir` (config.json + model.safetensors, HF or mamba_ssm names), memory-mapping the
    /// matrices whose file precision is the one asked for.
    pub fn load(dir: &Path, opts: &SimdOptions) -> Result<SimdEngine> {
        let cfg = MambaConfig::load(&dir.join("config.json"))?;
        let weights = crate::load::load_weights(dir, &cfg, opts.dtype)?;
        Self::build(cfg, weights, None, opts)
    }

    fn build(
        cfg: MambaConfig,
        weights: Weights,
        params: Option<Params<f32>>,
        opts: &SimdOptions,
    ) -> Result<SimdEngine> {
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let isa = opts.isa.unwrap_or_else(Isa::detect);
        if !isa.supported() {
            return Err(Error::Device {
                device: "cpu".into(),
                msg: format!("this CPU does not support the {} kernels", isa.name()),
            });
        }
        Ok(SimdEngine {
            isa,
            pool: pool(threads)?,
            cfg,
            weights,
            params,
            stale: false,
            grads: None,
            opt: None,
            scratch: Scratch::default(),
            logits: Vec::new(),
            d_logits: Vec::new(),
            released: false,
            layered_peak: None,
        })
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn dtype(&self) -> WeightDtype {
        self.weights.dtype
    }

    /// The inference weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// f32 master parameters, made from the weights the first time a loaded model trains.
    fn master(&mut self) -> &mut Params<f32> {
        if self.params.is_none() {
            let named = crate::load::weights_to_named(&self.cfg, &self.weights);
            let p = params_from_named(&self.cfg, &named).expect("weights follow param_specs");
            self.params = Some(p);
        }
        self.params.as_mut().expect("set above")
    }

    /// Makes the inference weights match the master parameters after an update.
    fn refresh(&mut self) {
        if self.stale {
            if let Some(p) = &self.params {
                self.weights = Weights::from_params(&self.cfg, p, self.weights.dtype);
            }
            self.stale = false;
        }
    }

    fn require_f32(&self, op: &str) -> Result<()> {
        if self.weights.dtype != WeightDtype::F32 {
            return Err(Error::Device {
                device: "cpu".into(),
                msg: format!(
                    "{op} needs f32 weights; this engine stores {} weights for inference",
                    self.weights.dtype.name()
                ),
            });
        }
        Ok(())
    }

    /// What the last [`TrainingEngine::loss_and_backward_layered`] held at most at once
    /// (`None` before the first).
    pub fn layered_peak(&self) -> Option<LayeredPeak> {
        self.layered_peak
    }

    /// Whether the engine holds its parameters (not after a layered step until
    /// `set_parameters`).
    pub fn holds_parameters(&self) -> bool {
        !self.released
    }

    /// An error while a layered step has left the engine without parameters.
    fn check_held(&self, op: &str) -> Result<()> {
        if self.released {
            return Err(Error::Device {
                device: "cpu".into(),
                msg: format!(
                    "{op}: this engine holds no parameters since a layer-by-layer (ZeRO stage 3) step; set them first"
                ),
            });
        }
        Ok(())
    }

    /// Drops every whole-model buffer (weights, master parameters, gradients).
    fn release(&mut self) {
        let dtype = self.weights.dtype;
        self.weights = Weights {
            dtype,
            embed: crate::weights::Mat::from_f32(0, 0, Vec::new(), dtype),
            layers: Vec::new(),
            norm_f_w: Vec::new(),
            norm_f_b: None,
            lm_head: None,
        };
        self.params = None;
        self.grads = None;
        self.stale = false;
        self.released = true;
    }

    /// Forward, loss and the whole-model backward of `grad_scale · loss` added to the gradient
    /// buffers, `done(group, grads)` called as each group's gradient is final
    /// ([`crate::backward::backward_each`]); returns the loss and the state after the last
    /// position. What [`TrainingEngine::loss_and_backward_carry`] and
    /// [`TrainingEngine::loss_and_backward_streamed`] share.
    fn train_step(
        &mut self,
        input: &Batch,
        (targets, mask, grad_scale): (&[u32], Option<&[bool]>, f64),
        state: Option<&State<f32>>,
        grad_final: Option<&State<f32>>,
        done: &mut dyn FnMut(ParamGroup, &Params<f32>) -> Result<()>,
    ) -> Result<(LossOutput, State<f32>)> {
        self.require_f32("training")?;
        self.check_held("training")?;
        self.refresh();
        self.master();
        self.grads_mut();
        let mut st = state
            .cloned()
            .unwrap_or_else(|| State::zeros(&self.cfg, input.batch));
        let init = st.clone();
        let mut logits = std::mem::take(&mut self.logits);
        let mut d_logits = std::mem::take(&mut self.d_logits);
        let (isa, cfg, w, s) = (self.isa, &self.cfg, &self.weights, &mut self.scratch);
        let params = self.params.as_ref().expect("made by master()");
        let grads = self.grads.as_mut().expect("made by grads_mut()");
        let pool = &self.pool;
        let out = (|| -> Result<LossOutput> {
            let (cache, loss, n_targets) = pool.install(|| -> Result<_> {
                let all = Logits::All(&mut logits);
                let cache = forward(isa, cfg, w, input, &mut st, s, all, true)?.expect("kept");
                d_logits.clear();
                d_logits.resize(logits.len(), 0.0);
                let (loss, n_targets) = crate::loss::cross_entropy_into(
                    pool,
                    &logits,
                    targets,
                    mask,
                    cfg.vocab_size,
                    grad_scale as f32,
                    &mut d_logits,
                )?;
                Ok((cache, loss, n_targets))
            })?;
            // Each piece of the backward runs on the pool; `done` on this thread.
            let grad_state = crate::backward::backward_each(
                pool,
                cfg,
                params,
                input,
                Some(&init),
                &cache,
                &d_logits,
                grad_final,
                grads,
                done,
            )?;
            Ok(LossOutput {
                loss,
                n_targets,
                grad_state,
            })
        })();
        self.logits = logits;
        self.d_logits = d_logits;
        // The forward left the state after the last position in `st`.
        Ok((out?, st))
    }

    fn grads_mut(&mut self) -> &mut Params<f32> {
        let cfg = &self.cfg;
        self.grads.get_or_insert_with(|| Params::zeros(cfg))
    }
}

impl InferenceEngine for SimdEngine {
    fn name(&self) -> String {
        format!(
            "simd ({}, {} weights, {} threads)",
            self.isa.name(),
            self.weights.dtype.name(),
            self.threads()
        )
    }

    fn config(&self) -> &MambaConfig {
        &self.cfg
    }

    fn forward(
        &mut self,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> Result<(Tensor<f32>, State<f32>)> {
        self.check_held("forward")?;
        self.refresh();
        let mut st = state
            .cloned()
            .unwrap_or_else(|| State::zeros(&self.cfg, input.batch));
        let mut logits = Vec::new();
        let (isa, cfg, w, s) = (self.isa, &self.cfg, &self.weights, &mut self.scratch);
        on_pool(&self.pool, || {
            forward(
                isa,
                cfg,
                w,
                input,
                &mut st,
                s,
                Logits::All(&mut logits),
                false,
            )
        })?;
        let shape = [input.batch, input.seq_len, self.cfg.vocab_size];
        Ok((Tensor::from_vec(&shape, logits), st))
    }

    /// The forward without the backward's cache (logits into the engine's buffer) and the
    /// loss of the training path's cross-entropy, without its gradient.
    fn loss(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
    ) -> Result<EvalLoss> {
        self.check_held("loss")?;
        self.refresh();
        let mut st = state
            .cloned()
            .unwrap_or_else(|| State::zeros(&self.cfg, input.batch));
        let mut logits = std::mem::take(&mut self.logits);
        let (isa, cfg, w, s) = (self.isa, &self.cfg, &self.weights, &mut self.scratch);
        let pool = &self.pool;
        let out = pool.install(|| -> Result<EvalLoss> {
            forward(
                isa,
                cfg,
                w,
                input,
                &mut st,
                s,
                Logits::All(&mut logits),
                false,
            )?;
            let (loss, n_targets) =
                crate::loss::cross_entropy_loss(pool, &logits, targets, mask, cfg.vocab_size)?;
            Ok(EvalLoss { loss, n_targets })
        });
        self.logits = logits;
        out
    }

    fn step(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
    ) -> Result<Tensor<f32>> {
        let mut out = vec![0f32; tokens.len() * self.cfg.vocab_size];
        self.step_into(tokens, resets, state, &mut out)?;
        Ok(Tensor::from_vec(&[tokens.len(), self.cfg.vocab_size], out))
    }

    fn step_into(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
        logits: &mut [f32],
    ) -> Result<()> {
        self.check_held("step")?;
        self.refresh();
        check_len(
            "step_into",
            "logits",
            logits.len(),
            tokens.len() * self.cfg.vocab_size,
        )?;
        let input = Batch {
            batch: tokens.len(),
            seq_len: 1,
            tokens,
            resets,
        };
        let (isa, cfg, w, s) = (self.isa, &self.cfg, &self.weights, &mut self.scratch);
        on_pool(&self.pool, || {
            forward(isa, cfg, w, &input, state, s, Logits::Last(logits), false)
        })?;
        Ok(())
    }

    fn prefill(
        &mut self,
        tokens: &[u32],
        state: &mut State<f32>,
        logits: &mut [f32],
    ) -> Result<()> {
        self.check_held("prefill")?;
        self.refresh();
        if tokens.is_empty() {
            return Err(Error::Shape {
                op: "prefill",
                msg: "no tokens to prefill".into(),
            });
        }
        let input = Batch::new(tokens, 1, tokens.len());
        let (isa, cfg, w, s) = (self.isa, &self.cfg, &self.weights, &mut self.scratch);
        on_pool(&self.pool, || {
            forward(isa, cfg, w, &input, state, s, Logits::Last(logits), false)
        })?;
        Ok(())
    }

    fn parameters(&self) -> Result<NamedTensors> {
        self.check_held("parameters")?;
        Ok(match &self.params {
            Some(p) => to_named(&self.cfg, p),
            None => crate::load::weights_to_named(&self.cfg, &self.weights),
        })
    }
}

impl TrainingEngine for SimdEngine {
    fn loss_and_backward(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
    ) -> Result<LossOutput> {
        let out = self.loss_and_backward_carry(input, targets, mask, state, None, grad_scale)?;
        Ok(out.0)
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
        let mut none = |_: ParamGroup, _: &Params<f32>| Ok(());
        self.train_step(
            input,
            (targets, mask, grad_scale),
            state,
            grad_final,
            &mut none,
        )
    }

    /// Layer by layer with the hook (see the trait): the same kernels in the same order as
    /// [`TrainingEngine::loss_and_backward`] on zeroed buffers, so the same bits, but at most
    /// one group's parameters (a layer's, or the embedding's, final norm's and head's) are
    /// held at a time, and of the gradients only the outer group's (from the head's backward
    /// until the lookup's) and the current layer's. The forward reads each layer's f32
    /// tensors moved into its weights (no copy); `A = −exp(A_log)` is kept in each layer's
    /// activation cache, as in the whole-model path. Needs f32 weights.
    fn loss_and_backward_layered(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn ParamHook,
    ) -> Result<Option<LossOutput>> {
        self.require_f32("training")?;
        input.check(&self.cfg, "simd layered step")?;
        if let Some(s) = state {
            s.check(&self.cfg, input.batch, "simd layered step")?;
        }
        // What the engine held whole when the call began counts towards the peak (a driver
        // that gathered every parameter into it first would show here).
        let whole = if self.released {
            0
        } else {
            param_specs(&self.cfg)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        self.release();
        let mut s = std::mem::take(&mut self.scratch);
        let mut logits = std::mem::take(&mut self.logits);
        let mut d_logits = std::mem::take(&mut self.d_logits);
        let mut live = Live::default();
        live.add(whole as isize, 0);
        live.add(-(whole as isize), 0);
        let out = self.layered(
            input,
            (targets, mask, state, grad_scale),
            hook,
            &mut live,
            (&mut s, &mut logits, &mut d_logits),
        );
        self.scratch = s;
        self.logits = logits;
        self.d_logits = d_logits;
        self.layered_peak = Some(live.peak);
        out.map(Some)
    }

    /// The whole-model backward of [`TrainingEngine::loss_and_backward`] (the same kernels in
    /// the same order, so the same bits), with each group's accumulated gradient handed to
    /// `hook` as the backward finishes it. The hook runs on the caller's thread, between the
    /// pieces of the backward that run on the engine's pool.
    fn loss_and_backward_streamed(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn GradHook,
    ) -> Result<Option<LossOutput>> {
        let outer = ParamGroup::Outer.tensors(&self.cfg);
        let mut done = |g: ParamGroup, grads: &Params<f32>| match g {
            ParamGroup::Layer(i) => hook.gradients(g, &grads.layers[i].tensors()),
            ParamGroup::Outer => {
                let all = grads.tensors();
                hook.gradients(g, &outer.iter().map(|&i| all[i]).collect::<Vec<_>>())
            }
        };
        let (out, _) =
            self.train_step(input, (targets, mask, grad_scale), state, None, &mut done)?;
        Ok(Some(out))
    }

    fn set_gradients(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()> {
        self.grads = Some(params_from_named(&self.cfg, named)?);
        Ok(())
    }

    fn zero_grad(&mut self) -> Result<()> {
        if let Some(g) = &mut self.grads {
            for t in g.tensors_mut() {
                t.fill(0.0);
            }
        }
        Ok(())
    }

    fn optimizer_step(&mut self, hp: &AdamWConfig, lr: f64) -> Result<StepStats> {
        self.require_f32("training")?;
        self.check_held("optimizer_step")?;
        self.master();
        self.grads_mut();
        let cfg = &self.cfg;
        let opt = self.opt.get_or_insert_with(|| AdamW::new(cfg));
        let (params, grads) = (
            self.params.as_mut().expect("made by master()"),
            self.grads.as_mut().expect("made by grads_mut()"),
        );
        let stats = crate::optim::adamw_step(&self.pool, cfg, opt, params, grads, hp, lr);
        if !stats.skipped {
            self.stale = true;
        }
        Ok(stats)
    }

    fn set_parameters(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()> {
        let p = params_from_named(&self.cfg, named)?;
        self.weights = Weights::from_params(&self.cfg, &p, self.weights.dtype);
        self.params = Some(p);
        self.stale = false;
        self.released = false;
        Ok(())
    }

    fn gradients(&self) -> Result<NamedTensors> {
        Ok(match &self.grads {
            Some(g) => to_named(&self.cfg, g),
            None => to_named(&self.cfg, &Params::<f32>::zeros(&self.cfg)),
        })
    }

    /// The gradients live in host memory: each tensor is summed over the ranks with the host
    /// collective, in place.
    fn all_reduce_gradients(&mut self, comm: &mut dyn reference::comm::Comm) -> Result<bool> {
        self.check_held("all_reduce_gradients")?;
        for t in self.grads_mut().tensors_mut() {
            comm.all_reduce_sum(&mut t.data)?;
        }
        Ok(true)
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        Ok(match &self.opt {
            Some(o) => OptimizerState::of(&self.cfg, o),
            None => OptimizerState::of(&self.cfg, &AdamW::<f32>::new(&self.cfg)),
        })
    }

    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        self.opt = Some(state.to_adamw(&self.cfg)?);
        Ok(())
    }
}

impl SimdEngine {
    /// The body of [`TrainingEngine::loss_and_backward_layered`].
    #[allow(clippy::type_complexity)]
    fn layered(
        &self,
        input: &Batch,
        (targets, mask, state, grad_scale): (&[u32], Option<&[bool]>, Option<&State<f32>>, f64),
        hook: &mut dyn ParamHook,
        live: &mut Live,
        (s, logits, d_logits): (&mut Scratch, &mut Vec<f32>, &mut Vec<f32>),
    ) -> Result<LossOutput> {
        use crate::backward::{embed_bwd, head_bwd, layer_bwd, LayerStates};
        use crate::forward::{embed, final_cache, head, layer};
        let cfg = &self.cfg;
        let (isa, pool) = (self.isa, &self.pool);
        // The outer group as `Params` of a model without layers (their canonical order).
        let outer_cfg = MambaConfig {
            n_layer: 0,
            ..cfg.clone()
        };
        let specs = param_specs(cfg);
        let fetch = |g: ParamGroup,
                     hook: &mut dyn ParamHook,
                     live: &mut Live|
         -> Result<Vec<Tensor<f32>>> {
            let mut t: Vec<Tensor<f32>> = g
                .tensors(cfg)
                .into_iter()
                .map(|i| Tensor::zeros(&specs[i].1))
                .collect();
            hook.fill(g, &mut t)?;
            live.add(numel(&t.iter().collect::<Vec<_>>()), 0);
            Ok(t)
        };
        let mut st = state
            .cloned()
            .unwrap_or_else(|| State::zeros(cfg, input.batch));
        let init = st.clone();
        // Forward: the embedding rows, each layer, the final norm and the head.
        let outer = Params::from_ordered(&outer_cfg, fetch(ParamGroup::Outer, hook, live)?);
        embed(cfg, MatRef::F32(&outer.embeddings.data), input, s);
        live.add(-numel(&outer.tensors()), 0);
        drop(outer);
        hook.release(ParamGroup::Outer)?;
        let mut caches = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let lp = LayerParams::from_ordered(cfg, fetch(ParamGroup::Layer(i), hook, live)?);
            let n = lp.numel() as isize;
            let lw = LayerWeights::from_owned(lp, crate::WeightDtype::F32);
            let st = &mut st;
            let c = pool.install(|| layer(isa, cfg, &lw, input, i, st, &mut *s, true));
            caches.push(c.expect("kept"));
            drop(lw);
            live.add(-n, 0);
            hook.release(ParamGroup::Layer(i))?;
        }
        let outer = Params::from_ordered(&outer_cfg, fetch(ParamGroup::Outer, hook, live)?);
        let n_outer = numel(&outer.tensors());
        let norm_f = (
            &outer.norm_f_weight.data[..],
            outer.norm_f_bias.as_ref().map(|t| &t.data[..]),
        );
        let head_w = MatRef::F32(&outer.lm_head_weight().data);
        pool.install(|| {
            head(
                isa,
                cfg,
                norm_f,
                head_w,
                input,
                &mut *s,
                Logits::All(&mut *logits),
            )
        })?;
        let cache = final_cache(s, caches);
        d_logits.clear();
        d_logits.resize(logits.len(), 0.0);
        let (loss, n_targets) = pool.install(|| {
            crate::loss::cross_entropy_into(
                pool,
                logits,
                targets,
                mask,
                cfg.vocab_size,
                grad_scale as f32,
                d_logits,
            )
        })?;
        // Backward: the head and final norm, each layer in reverse, the embedding rows.
        crate::backward::check(cfg, input, Some(&init), &cache, d_logits, None)?;
        let mut g_outer = Params::<f32>::zeros(&outer_cfg);
        live.add(0, n_outer);
        let n = input.rows();
        let mut d_resid =
            pool.install(|| head_bwd(pool, cfg, &outer, &cache, d_logits, n, &mut g_outer));
        drop(outer);
        live.add(-n_outer, 0);
        hook.release(ParamGroup::Outer)?;
        let mut d_state = State::zeros(cfg, input.batch);
        for i in (0..cfg.n_layer).rev() {
            let lp = LayerParams::from_ordered(cfg, fetch(ParamGroup::Layer(i), hook, live)?);
            let mut gl = LayerParams::<f32>::zeros(cfg);
            let n = lp.numel() as isize;
            live.add(0, n);
            let states = LayerStates {
                conv_init: Some(init.conv_layer(i)),
                ssm_init: Some(init.ssm_layer(i)),
                d_conv_last: None,
                d_ssm_last: None,
            };
            let lc = &cache.layers[i];
            let (d_in, d_conv, d_ssm) =
                pool.install(|| layer_bwd(pool, cfg, &lp, lc, input, states, &d_resid, &mut gl));
            drop(lp);
            live.add(-n, 0);
            hook.release(ParamGroup::Layer(i))?;
            hook.gradients(ParamGroup::Layer(i), &gl.tensors())?;
            drop(gl);
            live.add(0, -n);
            for (g, d) in d_resid.iter_mut().zip(&d_in) {
                *g += *d;
            }
            d_state.conv_layer_mut(i).copy_from_slice(&d_conv);
            d_state.ssm_layer_mut(i).copy_from_slice(&d_ssm);
        }
        embed_bwd(cfg, input, &d_resid, &mut g_outer.embeddings.data);
        hook.gradients(ParamGroup::Outer, &g_outer.tensors())?;
        live.add(0, -n_outer);
        Ok(LossOutput {
            loss,
            n_targets,
            grad_state: d_state,
        })
    }
}
