//! ZeRO stages 1–2 with the optimizer on the device: the GPU engine's side of
//! `TrainingEngine::shard_optimizer` and its step (the trainer's `dist::zero` drives it).
//!
//! Flat indices are the layout's offsets (every parameter end to end in canonical order, the
//! order `trainer::dist::FlatLayout` shards), padded with zeros to `world × chunk` so that
//! NCCL's in-place reduce-scatter and all-gather work on the engine's own buffers:
//! - the gradients are summed where they live: all-reduced (stage 1) or reduce-scattered
//!   (stage 2), after which this rank's chunk of the gradient buffer holds the sum;
//! - Σ g² over the chunk is this rank's share of the global norm;
//! - AdamW runs on the chunk only, with moments that hold the chunk only (the memory saved:
//!   8 bytes a parameter × (1 − 1/world));
//! - the updated chunks are all-gathered in place into the f32 parameters, and the
//!   low-precision shadow is refreshed.
//!
//! At world size 1 every step is the plain engine's step bit for bit: the same norm kernel
//! over the same elements, the same AdamW launches. What is not sharded here: the f32
//! parameters and the whole gradient buffer stay on every rank (the backward accumulates
//! into every layer's gradients), so stage 2 saves no more device memory than stage 1.

use std::ops::Range;

use reference::comm::Comm;
use reference::engine::OptimizerShard;
use reference::{AdamWConfig, Error, Result};

use crate::engine::GpuEngine;
use crate::Precision;

/// Where this rank's optimizer chunk lies.
#[derive(Clone, Debug)]
pub(crate) struct ShardOn {
    pub(crate) range: Range<usize>,
    pub(crate) padded: usize,
}

impl GpuEngine {
    fn shard_err(&self, msg: String) -> Error {
        self.model.dev.err("sharded optimizer", msg)
    }

    /// The chunk, or the error for a call that needs a sharded optimizer.
    fn shard_on(&self) -> Result<ShardOn> {
        self.train
            .shard
            .clone()
            .ok_or_else(|| self.shard_err("the optimizer is not sharded".into()))
    }

    /// `TrainingEngine::shard_optimizer`.
    pub(crate) fn shard_optimizer_dev(
        &mut self,
        comm: &mut dyn Comm,
        chunk: Range<usize>,
        padded: usize,
    ) -> Result<bool> {
        let numel = self.model.layout.numel;
        let world = comm.world();
        if self.model.precision == Precision::Fp16 || self.train.shard.is_some() {
            // A loss-scaled run keeps the optimizer in the driver; sharding happens once.
            return Ok(false);
        }
        let c = chunk.len();
        if padded < numel
            || padded != world * c
            || chunk != (comm.rank() * c..(comm.rank() + 1) * c)
        {
            return Err(self.shard_err(format!(
                "chunk {chunk:?} of {padded} for rank {} of {world} over {numel} parameters",
                comm.rank()
            )));
        }
        self.model.dev.bind()?;
        // Every rank probes the same communicator kind, so all agree.
        if !(comm.reduce_scatter_sum_device(0, 0)? && comm.all_gather_device(0, 0)?) {
            return Ok(false);
        }
        let dev = self.model.dev.clone();
        if padded > numel {
            let grow = |old: &crate::cuda::Buf| -> Result<crate::cuda::Buf> {
                let b = dev.zeros(4 * padded)?;
                b.copy_from(0, old, 4 * numel)?;
                Ok(b)
            };
            let params = grow(&self.model.params)?;
            let grads = grow(&self.train.grads)?;
            self.model.params = params;
            self.train.grads = grads;
            // A decode graph captured the old weights' address.
            self.decoder.forget_graph();
        }
        self.train.opt_step = 0;
        self.train.shard = Some(ShardOn {
            range: chunk,
            padded,
        });
        // Allocated again at the chunk's length.
        self.train.moments = None;
        self.moments()?;
        dev.sync()?;
        Ok(true)
    }

    /// `TrainingEngine::reduce_gradient_shard`.
    pub(crate) fn reduce_gradient_shard_dev(
        &mut self,
        comm: &mut dyn Comm,
        scatter: bool,
    ) -> Result<f64> {
        let on = self.shard_on()?;
        self.model.dev.bind()?;
        self.model.dev.sync()?;
        let ptr = self.train.grads.ptr;
        let done = if scatter {
            comm.reduce_scatter_sum_device(ptr, on.range.len())?
        } else {
            comm.all_reduce_sum_device(ptr, on.padded)?
        };
        if !done {
            return Err(self.shard_err("the communicator stopped reaching device memory".into()));
        }
        self.model.dev.bind()?;
        self.grad_sumsq(on.range.start, on.range.len())
    }

    /// `TrainingEngine::optimizer_step_shard`.
    pub(crate) fn optimizer_step_shard_dev(
        &mut self,
        comm: &mut dyn Comm,
        hp: &AdamWConfig,
        lr: f64,
        grad_norm: f64,
    ) -> Result<()> {
        let on = self.shard_on()?;
        self.model.dev.bind()?;
        let coef = hp.clip_coef(grad_norm).map(|c| c as f32);
        let start = on.range.start;
        self.adamw_flat(hp, lr, on.range.clone(), start, coef)?;
        self.model.dev.sync()?;
        if !comm.all_gather_device(self.model.params.ptr, on.range.len())? {
            return Err(self.shard_err("the communicator stopped reaching device memory".into()));
        }
        self.model.dev.bind()?;
        self.model.refresh_shadow()?;
        self.model.dev.sync()
    }

    /// `TrainingEngine::optimizer_shard`.
    pub(crate) fn optimizer_shard_dev(&self) -> Result<OptimizerShard> {
        let on = self.shard_on()?;
        self.model.dev.bind()?;
        let n = on.range.len();
        let mut s = OptimizerShard {
            master: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: self.train.opt_step,
            range: on.range.clone(),
        };
        self.model.params.read(on.range.start, &mut s.master)?;
        if let Some((m, v)) = &self.train.moments {
            m.read(0, &mut s.m)?;
            v.read(0, &mut s.v)?;
        }
        Ok(s)
    }

    /// `TrainingEngine::set_optimizer_shard`.
    pub(crate) fn set_optimizer_shard_dev(&mut self, s: &OptimizerShard) -> Result<()> {
        let on = self.shard_on()?;
        let n = on.range.len();
        if s.range != on.range || s.m.len() != n || s.v.len() != n {
            return Err(self.shard_err(format!(
                "a shard of {:?} ({} moments) for the chunk {:?}",
                s.range,
                s.m.len(),
                on.range
            )));
        }
        self.model.dev.bind()?;
        self.moments()?;
        let (m, v) = self.train.moments.as_ref().expect("allocated above");
        m.write(0, &s.m)?;
        v.write(0, &s.v)?;
        self.train.opt_step = s.step;
        Ok(())
    }
}
