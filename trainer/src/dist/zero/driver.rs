//! [`ZeroDriver`]: the driver of one rank, its construction and the accessors, and the step
//! everything else comes back to: the gradients summed where they live (the engine keeps the
//! optimizer, or this rank's chunk of it), or flattened, reduced over the ranks in buckets and
//! handed to AdamW on this rank's shard, whose weights then go back to the engine.

use std::ops::Range;
use std::time::Instant;

use rayon::ThreadPool;
use reference::comm::Comm;
use reference::engine::{NamedTensors, ParamGroup};
use reference::model::Batch;
use reference::{AdamWConfig, TrainingEngine};

use super::par;
use super::ranges::{group_ranges, owned};
use super::{timed, Breakdown, CommRecord, MicroOut, Shard, StepOut};
use crate::dist::config::ZeroConfig;
use crate::dist::shard::FlatLayout;
use crate::dist::DistError;
use crate::train::source::TrainBatch;

/// The driver of one rank. Every rank makes one with the same config and calls
/// [`ZeroDriver::step`] in step.
pub struct ZeroDriver {
    pub cfg: ZeroConfig,
    /// The layout over the world (the optimizer of stage 0 uses a one-rank layout).
    pub layout: FlatLayout,
    pub(super) rank: usize,
    pub(super) shard: Shard,
    /// Decay runs, relative to the shard's start.
    pub(super) runs: Vec<(Range<usize>, bool)>,
    pub(super) flat_grad: Vec<f32>,
    /// A chunk-long gradient buffer (stages 2–3: this rank's summed chunk), kept between steps
    /// so that its pages are not faulted in anew each step; empty until first needed.
    pub(super) grad_chunk: Vec<f32>,
    /// Named tensors of the layout's shapes through which the weights go back to the engine
    /// (the engine's last `gradients()`, reused): kept between steps only at whole-model
    /// stage 3, which publishes at the next step's start, and on the streamed stage-0 path
    /// whose summed gradients go back through them each step.
    pub(super) named: NamedTensors,
    pub(super) pool: ThreadPool,
    /// Stage 3: the engine's parameters are current (gathered since the last update).
    pub(super) engine_current: bool,
    /// Stage 0 without `offload_optimizer` on an engine that sums its gradients where they
    /// live (the GPU engine over NCCL on the device, the CPU engines with the host
    /// collective): the engine keeps the optimizer, and `shard` is a copy refreshed for
    /// checkpoints ([`ZeroDriver::refresh_shard`]).
    pub(super) in_engine: bool,
    /// Stages 1–2 without `offload_optimizer` on an engine that shards its own optimizer
    /// where the gradients live ([`TrainingEngine::shard_optimizer`]: the GPU engine over
    /// NCCL): the engine holds this rank's chunk of the moments, and `shard` is a copy
    /// refreshed for checkpoints.
    pub(super) on_device: bool,
    /// `comms_logger`: the collectives since the last [`ZeroDriver::take_comms`].
    pub(super) comms: Vec<CommRecord>,
    /// fp16's loss scale ([`ZeroDriver::set_loss_scale`]; 1 otherwise).
    pub(super) loss_scale: f64,
    /// Stage 3: the flat ranges of each [`ParamGroup`] (the layers in order, then the outer
    /// group), which are gathered and reduce-scattered one group at a time.
    pub(super) groups: Vec<Vec<Range<usize>>>,
    /// Stage 3: elements of each group, and the order an engine fills them in.
    pub(super) group_sizes: Vec<usize>,
    pub(super) fill_order: Vec<ParamGroup>,
    /// Stage 3: the most parameter elements live at once during the last layered step.
    pub(super) live_peak: Option<usize>,
    /// Stage 3: whether the engine steps layer by layer
    /// ([`TrainingEngine::loss_and_backward_layered`]); `None` until the first step asks.
    pub(super) layered: Option<bool>,
    /// Stages 0–2: whether the engine hands each group's gradient out during its backward
    /// ([`TrainingEngine::loss_and_backward_streamed`]), so that buckets are reduced as they
    /// fill; `None` until the first step asks.
    pub(super) streamed: Option<bool>,
    /// Stages 0–2 with the optimizer in the engine and `overlap_comm`: whether the engine
    /// sums its gradients over the ranks during the last micro-batch's backward
    /// ([`TrainingEngine::loss_and_backward_summed`]); `None` until the first step asks.
    pub(super) summed: Option<bool>,
    /// Whether the communicator reaches device memory (NCCL): with the optimizer in the
    /// engine, the gradients are then summed on the device, never through host copies.
    pub(super) device_comm: bool,
}

impl ZeroDriver {
    /// A driver for `engine` on this rank. Rank 0's parameters are broadcast to every rank
    /// (as DeepSpeed does at start), so every rank starts from the same weights.
    pub fn new(
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        cfg: ZeroConfig,
    ) -> Result<ZeroDriver, DistError> {
        if cfg.stage > 3 {
            return Err(ZeroConfig::with_stage(cfg.stage).unwrap_err());
        }
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| DistError::Config(format!("host thread pool: {e}")))?;
        let layout = FlatLayout::new(engine.config(), comm.world());
        let mut flat = vec![0.0f32; layout.padded()];
        par::flatten_into(&pool, &layout, &engine.parameters()?, &mut flat)?;
        let mut bytes = vec![0u8; 4 * flat.len()];
        par::to_le_bytes(&pool, &flat, &mut bytes);
        comm.broadcast(&mut bytes, 0)?;
        par::from_le_bytes(&pool, &bytes, &mut flat);
        drop(bytes);
        if comm.rank() != 0 {
            let mut named = Vec::new();
            par::unflatten_into(&pool, &layout, &flat, &mut named);
            engine.set_parameters(&named)?;
        }
        // Every rank probes the same engine kind and communicator, so all agree. A loss-scaled
        // run (fp16) keeps the optimizer here: the engine's own step would divide by its
        // rank's share of the scale, not by the scale of the summed gradient.
        let in_engine = cfg.stage == 0
            && cfg.offload_optimizer == crate::dist::config::OffloadDevice::None
            && !cfg.loss_scaled
            && {
                engine.zero_grad()?;
                engine.all_reduce_gradients(comm)?
            };
        let (range, runs) = owned(&layout, cfg.stage, comm.rank());
        let on_device = matches!(cfg.stage, 1 | 2)
            && cfg.offload_optimizer == crate::dist::config::OffloadDevice::None
            && !cfg.loss_scaled
            && engine.shard_optimizer(comm, range.clone(), layout.padded())?;
        // With the optimizer in the engine the shard is filled only for checkpoints.
        let in_engine_any = in_engine || on_device;
        let n = if in_engine_any { 0 } else { range.len() };
        let shard = Shard {
            master: if in_engine_any {
                Vec::new()
            } else {
                let mut m = vec![0.0; range.len()];
                par::copy(&pool, &mut m, &flat[range.clone()]);
                m
            },
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
            range,
        };
        // Every rank probes the same communicator kind (nothing moves at length 0).
        let device_comm = comm.all_reduce_sum_device(0, 0)?;
        let groups = group_ranges(engine.config(), &layout);
        let group_sizes = groups
            .iter()
            .map(|g| g.iter().map(|r| r.len()).sum())
            .collect();
        Ok(ZeroDriver {
            // Stage 3 makes its whole-model buffer only if the engine cannot step layer by layer.
            flat_grad: if in_engine_any || cfg.stage == 3 {
                Vec::new()
            } else {
                vec![0.0; layout.padded()]
            },
            grad_chunk: Vec::new(),
            named: Vec::new(),
            in_engine,
            on_device,
            cfg,
            layout,
            rank: comm.rank(),
            shard,
            runs,
            pool,
            engine_current: true,
            comms: Vec::new(),
            loss_scale: 1.0,
            groups,
            group_sizes,
            fill_order: ParamGroup::fill_order(engine.config().n_layer),
            live_peak: None,
            layered: None,
            streamed: None,
            summed: None,
            device_comm,
        })
    }

    /// The loss scale of the next steps (fp16's dynamic loss scaling; the driver must have been
    /// made with `loss_scaled` unless `scale` is 1). Every micro-batch's gradient is scaled by
    /// it and the summed gradient divided by it before clipping and AdamW, so a power of two
    /// changes no bit; an overflow on any rank skips the step on every rank.
    pub fn set_loss_scale(&mut self, scale: f64) -> Result<(), DistError> {
        if !(scale.is_finite() && scale > 0.0) || (self.in_engine && scale != 1.0) {
            return Err(DistError::Config(format!(
                "loss scale {scale}: needs a positive finite scale, and a driver made with loss_scaled"
            )));
        }
        self.loss_scale = scale;
        Ok(())
    }

    /// The optimizer shard this rank holds.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Replaces the shard (a resume); the engine gets the weights at the next gather.
    pub fn set_shard(&mut self, shard: Shard) -> Result<(), DistError> {
        if shard.range != self.shard.range
            || shard.master.len() != shard.range.len()
            || shard.m.len() != shard.range.len()
            || shard.v.len() != shard.range.len()
        {
            return Err(DistError::Layout(format!(
                "a shard over {:?} for a rank that owns {:?}",
                shard.range, self.shard.range
            )));
        }
        self.shard = shard;
        self.engine_current = false;
        Ok(())
    }

    /// The collectives logged since the last call.
    pub fn take_comms(&mut self) -> Vec<CommRecord> {
        std::mem::take(&mut self.comms)
    }

    /// Every parameter, gathered into the engine (stage 3 keeps them sharded between steps;
    /// a no-op when the engine is current). Every rank calls it.
    pub fn sync_engine(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
    ) -> Result<f64, DistError> {
        if self.engine_current {
            return Ok(0.0);
        }
        let secs = self.publish(engine, comm)?;
        self.engine_current = true;
        Ok(secs)
    }

    /// One optimizer step over this rank's micro-batches `micro` (each rank passes its own
    /// slice of the global batch; every rank the same count). A non-finite loss or gradient
    /// on any rank skips the step on every rank.
    pub fn step(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        micro: &[TrainBatch],
        hp: &AdamWConfig,
        lr: f64,
    ) -> Result<StepOut, DistError> {
        if self.cfg.stage == 3 && self.layered != Some(false) && !micro.is_empty() {
            if let Some(out) = self.step_layered(engine, comm, micro, hp, lr)? {
                return Ok(out);
            }
        }
        if self.cfg.stage < 3
            && (self.in_engine || self.on_device)
            && self.device_comm
            && self.cfg.overlap_comm
            && self.summed != Some(false)
            && !micro.is_empty()
        {
            return self.step_summed(engine, comm, micro, hp, lr);
        }
        // An engine that sums where its gradients live on the device (over NCCL) does so
        // after the backward when it does not during it: no host copies.
        if self.cfg.stage < 3
            && !self.on_device
            && !(self.in_engine && self.device_comm)
            && self.streamed != Some(false)
            && !micro.is_empty()
        {
            return self.step_streamed(engine, comm, micro, hp, lr);
        }
        self.step_with(engine, comm, micro.len(), hp, lr, |engine, scale| {
            let mut out = MicroOut::default();
            for b in micro {
                let input = Batch {
                    batch: b.batch,
                    seq_len: b.seq_len,
                    tokens: &b.inputs,
                    resets: Some(&b.resets),
                };
                let lo =
                    engine.loss_and_backward(&input, &b.targets, b.mask.as_deref(), None, scale)?;
                out.add(lo.loss, b.inputs.len());
            }
            Ok(out)
        })
    }

    /// [`ZeroDriver::step`] with this rank's forward and backward done by `micro_batches`:
    /// called once with the engine (gradients zeroed) and the scale of each of the `count`
    /// micro-batches' mean loss (`loss scale / (count × world)`), it adds their gradients into
    /// the engine. Stateful training (`crate::train::carry`) runs its windows there.
    pub fn step_with(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        count: usize,
        hp: &AdamWConfig,
        lr: f64,
        micro_batches: impl FnOnce(&mut dyn TrainingEngine, f64) -> Result<MicroOut, DistError>,
    ) -> Result<StepOut, DistError> {
        let mut bd = Breakdown {
            comm: self.sync_engine(engine, comm)?,
            ..Breakdown::default()
        };
        let t = Instant::now();
        engine.zero_grad()?;
        let scale = self.loss_scale / (count * comm.world()) as f64;
        let MicroOut {
            loss_sum,
            bad,
            tokens,
        } = micro_batches(engine, scale)?;
        bd.forward_backward = t.elapsed().as_secs_f64();
        let micro = MicroOut {
            loss_sum,
            bad,
            tokens,
        };
        self.after_backward(engine, comm, bd, micro, count, (hp, lr))
    }

    /// The rest of a step whose backward left the (unsummed) gradients in the engine: summed
    /// where they live, or copied out, reduced in buckets and handed to [`ZeroDriver::finish`].
    pub(super) fn after_backward(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        mut bd: Breakdown,
        micro: MicroOut,
        count: usize,
        (hp, lr): (&AdamWConfig, f64),
    ) -> Result<StepOut, DistError> {
        let MicroOut {
            loss_sum,
            bad,
            tokens,
        } = micro;
        if self.in_engine {
            let stats = [loss_sum, bad, tokens as f64];
            return self.step_in_engine(engine, comm, bd, stats, count, (hp, lr), false);
        }
        if self.on_device {
            let stats = [loss_sum, bad, tokens as f64, 0.0];
            return self.step_on_device(engine, comm, bd, stats, count, (hp, lr), false);
        }
        if self.flat_grad.len() != self.layout.padded() {
            self.flat_grad = vec![0.0; self.layout.padded()];
        }
        // The last step's copy goes before the engine makes a new one.
        self.named = Vec::new();
        let grads = engine.gradients()?;
        par::flatten_into(&self.pool, &self.layout, &grads, &mut self.flat_grad)?;
        // Its tensors carry the new weights back into the engine.
        self.named = grads;
        let (secs, grad) = self.reduce_gradients(comm)?;
        bd.comm += secs;
        self.finish(engine, comm, bd, grad, micro, count, (hp, lr))
    }

    /// The end of a host-side step: this rank's summed gradient shard `grad` unscaled, the
    /// global norm and the step's statistics summed over ranks, then (unless skipped) clipping,
    /// AdamW on the shard and the new weights to the engine (at stage 3 at the next gather).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        mut bd: Breakdown,
        grad: Grad,
        micro: MicroOut,
        count: usize,
        (hp, lr): (&AdamWConfig, f64),
    ) -> Result<StepOut, DistError> {
        let MicroOut {
            loss_sum,
            bad,
            tokens,
        } = micro;
        let flat = matches!(grad, Grad::Flat);
        let (mut buf, range) = match grad {
            Grad::Flat => (
                std::mem::take(&mut self.flat_grad),
                self.shard.range.clone(),
            ),
            Grad::Chunk(v) => {
                let n = v.len();
                (v, 0..n)
            }
        };
        let g = &mut buf[range];
        if self.loss_scale != 1.0 {
            let inv = (1.0 / self.loss_scale) as f32;
            par::scale(&self.pool, g, inv);
        }
        // In fixed blocks on the pool (the same bits on any number of threads).
        let local_sq: f64 = self.pool.install(|| par::sum_of_squares(g));
        let mut stats = [loss_sum, bad, tokens as f64, local_sq];
        if self.cfg.stage == 0 {
            stats[3] = 0.0; // every rank holds the whole gradient: not summed over ranks
        }
        let summed = timed(&mut self.comms, "all_reduce_f64", 32, || {
            comm.all_reduce_sum_f64(&mut stats)
        });
        let sq = if self.cfg.stage == 0 {
            local_sq
        } else {
            stats[3]
        };
        let grad_norm = sq.sqrt();
        let skip = stats[1] > 0.0 || !grad_norm.is_finite();
        let run = summed.is_ok() && !skip;
        if run {
            let t = Instant::now();
            self.adamw(g, hp, lr, grad_norm);
            bd.step = t.elapsed().as_secs_f64();
        }
        // The buffer is kept for the next step.
        if flat {
            self.flat_grad = buf;
        } else {
            self.grad_chunk = buf;
        }
        bd.comm += summed?;
        let out = |loss, bd| StepOut {
            loss,
            grad_norm,
            tokens: stats[2] as u64,
            breakdown: bd,
        };
        if !run {
            return Ok(out(None, bd));
        }
        if self.cfg.stage == 3 {
            self.engine_current = false;
        } else {
            bd.comm += self.publish(engine, comm)?;
        }
        let mean = stats[0] / (count * comm.world()) as f64;
        Ok(out(Some(mean), bd))
    }

    /// The rest of [`ZeroDriver::step`] when the engine keeps the optimizer: its gradients
    /// summed in place where they live (unless `summed`: the driver summed them in buckets and
    /// set them), then its own AdamW (identical inputs on every rank, so identical weights).
    /// `stats`: this rank's loss sum, bad micro-batches and tokens.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step_in_engine(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        mut bd: Breakdown,
        mut stats: [f64; 3],
        micro: usize,
        (hp, lr): (&AdamWConfig, f64),
        summed: bool,
    ) -> Result<StepOut, DistError> {
        if !summed {
            let t = Instant::now();
            if !engine.all_reduce_gradients(comm)? {
                return Err(DistError::Config(
                    "the engine stopped summing its own gradients".into(),
                ));
            }
            let bytes = 4 * self.layout.numel;
            let secs = t.elapsed().as_secs_f64();
            self.comms.push(CommRecord {
                op: "all_reduce_in_engine",
                bytes,
                secs,
            });
            bd.comm += secs;
        }
        bd.comm += timed(&mut self.comms, "all_reduce_f64", 24, || {
            comm.all_reduce_sum_f64(&mut stats)
        })?;
        let mut out = StepOut {
            loss: None,
            grad_norm: f64::NAN,
            tokens: stats[2] as u64,
            breakdown: Breakdown::default(),
        };
        if stats[1] == 0.0 {
            let t = Instant::now();
            let st = engine.optimizer_step(hp, lr)?;
            bd.step = t.elapsed().as_secs_f64();
            out.grad_norm = st.grad_norm;
            if !st.skipped {
                self.shard.step += 1;
                out.loss = Some(stats[0] / (micro * comm.world()) as f64);
            }
        }
        out.breakdown = bd;
        Ok(out)
    }

    /// The rest of [`ZeroDriver::step`] when the engine holds this rank's optimizer chunk
    /// (stages 1–2 on the device): the gradients summed where they live (all-reduce, or
    /// reduce-scatter at stage 2), the global norm from every rank's Σ g² over its chunk,
    /// AdamW on the chunk and the all-gather of the updated weights, all in the engine.
    /// `stats`: this rank's loss sum, bad micro-batches, tokens, and a slot for Σ g².
    /// `summed`: the engine summed the gradients during the backward (only Σ g² is left).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step_on_device(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        mut bd: Breakdown,
        mut stats: [f64; 4],
        micro: usize,
        (hp, lr): (&AdamWConfig, f64),
        summed: bool,
    ) -> Result<StepOut, DistError> {
        let scatter = self.cfg.stage >= 2;
        let t = Instant::now();
        stats[3] = engine.reduce_gradient_shard(comm, scatter)?;
        let secs = t.elapsed().as_secs_f64();
        if !summed {
            self.comms.push(CommRecord {
                op: if scatter {
                    "reduce_scatter_in_engine"
                } else {
                    "all_reduce_in_engine"
                },
                bytes: 4 * self.layout.padded(),
                secs,
            });
            bd.comm += secs;
        }
        bd.comm += timed(&mut self.comms, "all_reduce_f64", 32, || {
            comm.all_reduce_sum_f64(&mut stats)
        })?;
        let grad_norm = stats[3].sqrt();
        let mut out = StepOut {
            loss: None,
            grad_norm,
            tokens: stats[2] as u64,
            breakdown: Breakdown::default(),
        };
        if stats[1] == 0.0 && grad_norm.is_finite() {
            // The step time includes the weights' all-gather, which the engine runs.
            let t = Instant::now();
            engine.optimizer_step_shard(comm, hp, lr, grad_norm)?;
            bd.step = t.elapsed().as_secs_f64();
            self.shard.step += 1;
            out.loss = Some(stats[0] / (micro * comm.world()) as f64);
        }
        out.breakdown = bd;
        Ok(out)
    }

    /// Whether the engine keeps the optimizer (stage 0 without offload on an engine that sums
    /// its own gradients).
    pub fn in_engine(&self) -> bool {
        self.in_engine
    }

    /// Stage 3: whether the engine steps layer by layer (`Some(true)`: parameters gathered a
    /// group at a time, see [`TrainingEngine::loss_and_backward_layered`]), or gathers every
    /// parameter for each step (`Some(false)`: it cannot); `None` before the first step and
    /// at other stages.
    pub fn layered(&self) -> Option<bool> {
        self.layered
    }

    /// Stage 3 layer by layer: the most parameter elements that were live at once during the
    /// last step, the groups the engine held plus a group gathered ahead (the hook's staging
    /// buffers aside); `None` before a layered step.
    pub fn live_peak(&self) -> Option<usize> {
        self.live_peak
    }

    /// Whether the engine holds this rank's optimizer chunk (stages 1–2 without offload on
    /// an engine that shards its optimizer where the gradients live).
    pub fn on_device(&self) -> bool {
        self.on_device
    }

    /// When the engine keeps the optimizer or this rank's chunk of it: the shard (weights,
    /// moments, step) copied from it, for a checkpoint. A no-op otherwise.
    pub fn refresh_shard(&mut self, engine: &dyn TrainingEngine) -> Result<(), DistError> {
        if self.on_device {
            // Before the first sync after a resume the pending shard is the newest state.
            if self.engine_current {
                self.shard = engine.optimizer_shard()?;
            }
            return Ok(());
        }
        if !self.in_engine {
            return Ok(());
        }
        let opt = engine.optimizer_state()?;
        self.shard.master = self.layout.flatten(&engine.parameters()?)?;
        self.shard.m = self.layout.flatten(&opt.m)?;
        self.shard.v = self.layout.flatten(&opt.v)?;
        for x in [&mut self.shard.master, &mut self.shard.m, &mut self.shard.v] {
            x.truncate(self.shard.range.len());
        }
        self.shard.step = opt.step;
        Ok(())
    }

    /// Sums the flat gradient over ranks: all-reduce in buckets (stages 0, 1: this rank's
    /// shard is then its range of `flat_grad`), or reduce-scatter in buckets (stages 2, 3:
    /// only this rank's chunk is summed, into a chunk buffer). Returns the seconds spent and
    /// where the shard is.
    fn reduce_gradients(&mut self, comm: &mut dyn Comm) -> Result<(f64, Grad), DistError> {
        let bucket = self.cfg.reduce_bucket_size.max(1);
        let mut secs = 0.0;
        if self.cfg.stage < 2 {
            for b in self.flat_grad.chunks_mut(bucket) {
                let bytes = 4 * b.len();
                secs += timed(&mut self.comms, "all_reduce", bytes, || {
                    comm.all_reduce_sum(b)
                })?;
            }
            return Ok((secs, Grad::Flat));
        }
        let (w, c) = (self.layout.world, self.layout.chunk);
        let mut mine = std::mem::take(&mut self.grad_chunk);
        mine.resize(c, 0.0); // every element is written below
        let mut staged = Vec::new();
        let mut at = 0;
        while at < c {
            let n = bucket.min(c - at);
            // Every rank's elements `at..at + n` of its chunk, end to end: at world size 1
            // the flat buffer's own slice.
            let input: &[f32] = if w == 1 {
                &self.flat_grad[at..at + n]
            } else {
                staged.resize(w * n, 0.0);
                for (r, dst) in staged.chunks_mut(n).enumerate() {
                    let src = &self.flat_grad[r * c + at..r * c + at + n];
                    par::copy(&self.pool, dst, src);
                }
                &staged
            };
            let out = &mut mine[at..at + n];
            secs += timed(&mut self.comms, "reduce_scatter", 4 * w * n, || {
                comm.reduce_scatter_sum(input, out)
            })?;
            at += n;
        }
        Ok((secs, Grad::Chunk(mine)))
    }

    /// A chunk-long gradient buffer whose padding (past this rank's parameters) is zero; the
    /// rest is to be written whole.
    pub(super) fn take_grad_chunk(&mut self) -> Vec<f32> {
        let mut g = std::mem::take(&mut self.grad_chunk);
        g.resize(self.layout.chunk, 0.0);
        let owned = self.layout.owned(self.rank).len();
        g[owned..].iter_mut().for_each(|x| *x = 0.0);
        g
    }

    /// Clipping with the global norm and AdamW on the shard (the simd tier's kernel).
    fn adamw(&mut self, grad: &mut [f32], hp: &AdamWConfig, lr: f64, norm: f64) {
        if let Some(coef) = hp.clip_coef(norm) {
            par::scale(&self.pool, grad, coef as f32);
        }
        self.shard.step += 1;
        let s = &mut self.shard;
        simd::optim::adamw_update_flat(
            &self.pool,
            hp,
            lr,
            s.step,
            &mut s.master,
            grad,
            &mut s.m,
            &mut s.v,
            &self.runs,
        );
    }

    /// The updated weights into the engine: straight from the shard at stage 0, all-gathered
    /// from every rank's shard otherwise. Returns the seconds spent communicating.
    fn publish(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
    ) -> Result<f64, DistError> {
        if self.cfg.stage == 0 {
            let s = &self.shard;
            par::unflatten_into(&self.pool, &self.layout, &s.master, &mut self.named);
            let set = engine.set_parameters(&self.named);
            self.named = Vec::new(); // the next step's gradients() brings another
            set?;
            if self.in_engine {
                engine.set_optimizer_state(&reference::engine::OptimizerState {
                    step: s.step,
                    m: self.layout.unflatten(&s.m),
                    v: self.layout.unflatten(&s.v),
                })?;
            }
            return Ok(0.0);
        }
        // With the optimizer in the engine (stages 1–2 on the device) this is a resume, and
        // no host buffer is kept for it.
        let mut full = std::mem::take(&mut self.flat_grad);
        if self.on_device || full.len() != self.layout.padded() {
            full = vec![0.0f32; self.layout.padded()];
        }
        let master = &self.shard.master;
        let secs = timed(&mut self.comms, "all_gather", 4 * full.len(), || {
            comm.all_gather(master, &mut full)
        })?;
        par::unflatten_into(&self.pool, &self.layout, &full, &mut self.named);
        let set = engine.set_parameters(&self.named);
        // Only whole-model stage 3 publishes before the next gradients() (at the next step's
        // start), into the tensors kept; elsewhere they go now, as no copy outlived a step
        // before.
        if self.on_device || self.cfg.stage < 3 || self.layered == Some(true) {
            self.named = Vec::new();
        }
        set?;
        if self.on_device {
            // The moments go into the engine, which holds the optimizer from now on.
            engine.set_optimizer_shard(&self.shard)?;
            for x in [&mut self.shard.master, &mut self.shard.m, &mut self.shard.v] {
                *x = Vec::new();
            }
        } else if self.layered != Some(true) {
            // Layer-by-layer stage 3 keeps no whole-model buffer between steps.
            self.flat_grad = full;
        }
        Ok(secs)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
}

/// Where [`ZeroDriver::finish`] finds this rank's summed gradient shard.
pub(super) enum Grad {
    /// Its range of `flat_grad` (stages 0–1).
    Flat,
    /// A chunk buffer of its own (stages 2–3), kept afterwards as `grad_chunk`.
    Chunk(Vec<f32>),
}
