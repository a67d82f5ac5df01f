//! [`ReferenceEngine`]: the specification behind [`InferenceEngine`] and [`TrainingEngine`].

use std::ops::Range;

use super::{
    check_param_range, params_from_named, to_named, EvalLoss, InferenceEngine, LossOutput,
    NamedTensors, OptimizerState, TrainingEngine,
};
use crate::config::MambaConfig;
use crate::error::Result;
use crate::float::Float;
use crate::loss::{cross_entropy, cross_entropy_loss};
use crate::model::{backward_final, forward, step, Batch};
use crate::optim::{grad_norm, AdamW, AdamWConfig, StepStats};
use crate::params::Params;
use crate::state::State;
use crate::tensor::Tensor;

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

impl<T: Float> InferenceEngine for ReferenceEngine<T> {
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

    /// The forward in `T` without its cache, and the loss of [`cross_entropy`] in `T`: the
    /// same bits as [`TrainingEngine::loss_and_backward`]'s loss.
    fn loss(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
    ) -> Result<EvalLoss> {
        let st = state.map(|s| s.cast::<T>());
        let (logits, _, _) = forward(&self.cfg, &self.params, input, st.as_ref(), false)?;
        let (loss, n_targets) =
            cross_entropy_loss(&logits.data, targets, mask, self.cfg.vocab_size)?;
        Ok(EvalLoss {
            loss: loss.to_f64(),
            n_targets,
        })
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

    fn parameters(&self) -> Result<NamedTensors> {
        Ok(to_named(&self.cfg, &self.params))
    }
}

impl<T: Float> TrainingEngine for ReferenceEngine<T> {
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
        let st = state.map(|s| s.cast::<T>());
        let d_final = grad_final.map(|s| s.cast::<T>());
        let (logits, last, cache) = forward(&self.cfg, &self.params, input, st.as_ref(), true)?;
        let lo = cross_entropy(
            &logits.data,
            targets,
            mask,
            self.cfg.vocab_size,
            T::from_f64(grad_scale),
        )?;
        let cache = cache.expect("forward keeps the cache when asked");
        let gs = backward_final(
            &self.cfg,
            &self.params,
            input,
            st.as_ref(),
            &cache,
            &lo.d_logits,
            d_final.as_ref(),
            &mut self.grads,
        )?;
        let out = LossOutput {
            loss: lo.loss.to_f64(),
            n_targets: lo.n_targets,
            grad_state: gs.cast(),
        };
        Ok((out, last.cast()))
    }

    fn zero_grad(&mut self) -> Result<()> {
        for t in self.grads.tensors_mut() {
            t.fill(T::ZERO);
        }
        Ok(())
    }

    fn gradients(&self) -> Result<NamedTensors> {
        Ok(to_named(&self.cfg, &self.grads))
    }

    fn optimizer_step(&mut self, hp: &AdamWConfig, lr: f64) -> Result<StepStats> {
        Ok(self
            .opt
            .step(&self.cfg, &mut self.params, &mut self.grads, hp, lr))
    }

    fn optimizer_step_range(
        &mut self,
        hp: &AdamWConfig,
        lr: f64,
        range: Range<usize>,
        grad_norm: f64,
    ) -> Result<StepStats> {
        check_param_range(&self.cfg, &range)?;
        let (cfg, p, g) = (&self.cfg, &mut self.params, &mut self.grads);
        Ok(self.opt.step_range(cfg, p, g, hp, lr, range, grad_norm))
    }

    fn set_parameters(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()> {
        self.params = params_from_named(&self.cfg, named)?;
        Ok(())
    }

    fn optimizer_state(&self) -> Result<OptimizerState> {
        Ok(OptimizerState::of(&self.cfg, &self.opt))
    }

    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        self.opt = state.to_adamw(&self.cfg)?;
        Ok(())
    }
}

impl<T: Float> ReferenceEngine<T> {
    /// The global gradient norm [`AdamW::step`] clips with (f64, canonical order): what a
    /// caller of [`TrainingEngine::optimizer_step_range`] passes on one rank.
    pub fn grad_norm(&self) -> f64 {
        grad_norm(&self.grads)
    }
}
