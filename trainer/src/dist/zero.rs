//! The ZeRO step driver: one data-parallel optimizer step over a [`TrainingEngine`] and a
//! [`Comm`], for stages 0 to 3 (see the module docs of [`crate::dist`] for what each does
//! here).
//!
//! Gradients are averaged over ranks as DeepSpeed does, by scaling each micro-batch's
//! backward by `1 / (accum × world)` and summing over ranks. With one micro-batch per rank
//! the rank-order sum is the order a one-rank run with `world` micro-batches accumulates in,
//! so the gradients (and, without clipping, the weights) agree bit for bit with that run.

use std::ops::Range;
use std::sync::mpsc;
use std::time::Instant;

use rayon::ThreadPool;
use reference::comm::{Comm, CommResult};
use reference::engine::{GradHook, ParamGroup, ParamHook};
use reference::model::Batch;
use reference::{AdamWConfig, Tensor, TrainingEngine};

use super::config::ZeroConfig;
use super::shard::FlatLayout;
use super::DistError;
use crate::train::source::TrainBatch;

/// One collective as `comms_logger` records it.
#[derive(Clone, Debug, PartialEq)]
pub struct CommRecord {
    pub op: &'static str,
    pub bytes: usize,
    pub secs: f64,
}

/// Seconds spent in one step, for `wall_clock_breakdown`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Breakdown {
    /// Forward and backward together (the engines fuse them).
    pub forward_backward: f64,
    /// The AdamW update on the host.
    pub step: f64,
    /// Every collective of the step, on this thread or the communication thread
    /// (`overlap_comm`), overlapped or not.
    pub comm: f64,
    /// The part of `comm` that ran on the communication thread while this rank's engine was
    /// not waiting for it (`overlap_comm` on an engine that hands its gradients out during the
    /// backward). Stages 0–2: each bucket's collective from its start to its end or to the end
    /// of the backward, whichever came first. Stage 3: each gradient's collectives less the
    /// times the engine waited for a gather (queued behind them) or for the thread to finish.
    /// `comm − comm_overlapped` is about what the step waited for.
    pub comm_overlapped: f64,
}

/// What one step did, the same on every rank.
#[derive(Clone, Debug)]
pub struct StepOut {
    /// Mean loss over every micro-batch of every rank; `None` when the step was skipped.
    pub loss: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens of the step over every rank.
    pub tokens: u64,
    pub breakdown: Breakdown,
}

/// What one rank's micro-batches of a step did: the sum of the finite losses, how many were
/// not finite, tokens read.
#[derive(Clone, Copy, Debug, Default)]
pub struct MicroOut {
    pub loss_sum: f64,
    pub bad: f64,
    pub tokens: usize,
}

impl MicroOut {
    /// Counts one micro-batch of mean loss `loss` over `tokens` tokens.
    pub fn add(&mut self, loss: f64, tokens: usize) {
        if loss.is_finite() {
            self.loss_sum += loss;
        } else {
            self.bad += 1.0;
        }
        self.tokens += tokens;
    }
}

/// The optimizer shard this rank owns: flat f32 master weights and AdamW moments over
/// `range` (flat indices; stage 0 owns every parameter).
pub type Shard = reference::engine::OptimizerShard;

/// The driver of one rank. Every rank makes one with the same config and calls
/// [`ZeroDriver::step`] in step.
pub struct ZeroDriver {
    pub cfg: ZeroConfig,
    /// The layout over the world (the optimizer of stage 0 uses a one-rank layout).
    pub layout: FlatLayout,
    rank: usize,
    shard: Shard,
    /// Decay runs, relative to the shard's start.
    runs: Vec<(Range<usize>, bool)>,
    flat_grad: Vec<f32>,
    pool: ThreadPool,
    /// Stage 3: the engine's parameters are current (gathered since the last update).
    engine_current: bool,
    /// Stage 0 without `offload_optimizer` on an engine that sums its gradients where they
    /// live (the GPU engine over NCCL on the device, the CPU engines with the host
    /// collective): the engine keeps the optimizer, and `shard` is a copy refreshed for
    /// checkpoints ([`ZeroDriver::refresh_shard`]).
    in_engine: bool,
    /// Stages 1–2 without `offload_optimizer` on an engine that shards its own optimizer
    /// where the gradients live ([`TrainingEngine::shard_optimizer`]: the GPU engine over
    /// NCCL): the engine holds this rank's chunk of the moments, and `shard` is a copy
    /// refreshed for checkpoints.
    on_device: bool,
    /// `comms_logger`: the collectives since the last [`ZeroDriver::take_comms`].
    comms: Vec<CommRecord>,
    /// fp16's loss scale ([`ZeroDriver::set_loss_scale`]; 1 otherwise).
    loss_scale: f64,
    /// Stage 3: the flat ranges of each [`ParamGroup`] (the layers in order, then the outer
    /// group), which are gathered and reduce-scattered one group at a time.
    groups: Vec<Vec<Range<usize>>>,
    /// Stage 3: elements of each group, and the order an engine fills them in.
    group_sizes: Vec<usize>,
    fill_order: Vec<ParamGroup>,
    /// Stage 3: the most parameter elements live at once during the last layered step.
    live_peak: Option<usize>,
    /// Stage 3: whether the engine steps layer by layer
    /// ([`TrainingEngine::loss_and_backward_layered`]); `None` until the first step asks.
    layered: Option<bool>,
    /// Stages 0–2: whether the engine hands each group's gradient out during its backward
    /// ([`TrainingEngine::loss_and_backward_streamed`]), so that buckets are reduced as they
    /// fill; `None` until the first step asks.
    streamed: Option<bool>,
}

/// Runs one collective, timing it into `log`.
fn timed(
    log: &mut Vec<CommRecord>,
    op: &'static str,
    bytes: usize,
    f: impl FnOnce() -> CommResult<()>,
) -> CommResult<f64> {
    let t = Instant::now();
    f()?;
    let secs = t.elapsed().as_secs_f64();
    log.push(CommRecord { op, bytes, secs });
    Ok(secs)
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
        let layout = FlatLayout::new(engine.config(), comm.world());
        let mut flat = layout.flatten(&engine.parameters()?)?;
        let mut bytes: Vec<u8> = flat.iter().flat_map(|x| x.to_le_bytes()).collect();
        comm.broadcast(&mut bytes, 0)?;
        for (x, b) in flat.iter_mut().zip(bytes.chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        if comm.rank() != 0 {
            engine.set_parameters(&layout.unflatten(&flat))?;
        }
        // Every rank probes the same engine kind and communicator, so all agree. A loss-scaled
        // run (fp16) keeps the optimizer here: the engine's own step would divide by its
        // rank's share of the scale, not by the scale of the summed gradient.
        let in_engine = cfg.stage == 0
            && cfg.offload_optimizer == super::config::OffloadDevice::None
            && !cfg.loss_scaled
            && {
                engine.zero_grad()?;
                engine.all_reduce_gradients(comm)?
            };
        let (range, runs) = owned(&layout, cfg.stage, comm.rank());
        let on_device = matches!(cfg.stage, 1 | 2)
            && cfg.offload_optimizer == super::config::OffloadDevice::None
            && !cfg.loss_scaled
            && engine.shard_optimizer(comm, range.clone(), layout.padded())?;
        // With the optimizer in the engine the shard is filled only for checkpoints.
        let in_engine_any = in_engine || on_device;
        let n = if in_engine_any { 0 } else { range.len() };
        let shard = Shard {
            master: if in_engine_any {
                Vec::new()
            } else {
                flat[range.clone()].to_vec()
            },
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
            range,
        };
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| DistError::Config(format!("host thread pool: {e}")))?;
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
            fill_order: fill_order(engine.config().n_layer),
            live_peak: None,
            layered: None,
            streamed: None,
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
            && !self.on_device
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
    fn after_backward(
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
            return self.step_on_device(engine, comm, bd, stats, count, (hp, lr));
        }
        if self.flat_grad.len() != self.layout.padded() {
            self.flat_grad = vec![0.0; self.layout.padded()];
        }
        self.layout
            .flatten_into(&engine.gradients()?, &mut self.flat_grad)?;
        bd.comm += self.reduce_gradients(comm)?;
        let grad = self.take_grad_shard();
        self.finish(engine, comm, bd, grad, micro, count, (hp, lr))
    }

    /// Stages 0–2 on the host: every micro-batch but the last accumulates in the engine, and
    /// the last runs through [`TrainingEngine::loss_and_backward_streamed`], which hands each
    /// group's (now final) gradient out as the backward finishes it. The driver packs them into
    /// buckets of about `reduce_bucket_size` elements in that order and sums each full bucket
    /// over the ranks (all-reduce at stages 0–1, reduce-scatter at stage 2) on a communication
    /// thread while the backward goes on (`overlap_comm`), or in line in the hook (without it).
    /// Each element is still the rank-order sum of the engine's buffers, so the bits are those
    /// of the whole-model path. An engine that cannot stream takes that path (from its last
    /// micro-batch on, nothing run twice).
    fn step_streamed(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        micro: &[TrainBatch],
        hp: &AdamWConfig,
        lr: f64,
    ) -> Result<StepOut, DistError> {
        let mut bd = Breakdown {
            comm: self.sync_engine(engine, comm)?,
            ..Breakdown::default()
        };
        let t = Instant::now();
        engine.zero_grad()?;
        let count = micro.len();
        let scale = self.loss_scale / (count * comm.world()) as f64;
        let mut out = MicroOut::default();
        let (last, rest) = micro.split_last().expect("at least one micro-batch");
        for b in rest {
            let lo =
                engine.loss_and_backward(&batch(b), &b.targets, b.mask.as_deref(), None, scale)?;
            out.add(lo.loss, b.inputs.len());
        }
        let scatter = self.cfg.stage == 2;
        // Stages 0–1 sum into the whole flat buffer; stage 2 into this rank's chunk.
        let mut dest = if scatter {
            vec![0.0f32; self.layout.chunk]
        } else {
            let mut f = std::mem::take(&mut self.flat_grad);
            f.resize(self.layout.padded(), 0.0);
            f[self.layout.numel..].iter_mut().for_each(|x| *x = 0.0);
            f
        };
        let red = ReduceCfg {
            layout: &self.layout,
            groups: &self.groups,
            sizes: &self.group_sizes,
            bucket: self.cfg.reduce_bucket_size.max(1),
            scatter,
            overlap: self.cfg.overlap_comm,
        };
        let streamed = stream(engine, comm, last, scale, &red, &mut dest, t)?;
        let Some(s) = streamed else {
            // Every rank runs the same engine kind, so every rank falls back here.
            self.streamed = Some(false);
            if !scatter {
                self.flat_grad = dest;
            }
            let b = last;
            let lo =
                engine.loss_and_backward(&batch(b), &b.targets, b.mask.as_deref(), None, scale)?;
            out.add(lo.loss, b.inputs.len());
            bd.forward_backward = t.elapsed().as_secs_f64();
            return self.after_backward(engine, comm, bd, out, count, (hp, lr));
        };
        self.streamed = Some(true);
        out.add(s.loss, last.inputs.len());
        bd.forward_backward = s.forward_backward;
        bd.comm += s.secs;
        bd.comm_overlapped = s.overlapped;
        self.comms.extend(s.log);
        if self.in_engine {
            // The sums go back into the engine, which runs its own AdamW on them.
            engine.set_gradients(&self.layout.unflatten(&dest))?;
            self.flat_grad = dest;
            let stats = [out.loss_sum, out.bad, out.tokens as f64];
            return self.step_in_engine(engine, comm, bd, stats, count, (hp, lr), true);
        }
        let grad = if scatter {
            dest
        } else {
            let g = dest[self.shard.range.clone()].to_vec();
            self.flat_grad = dest;
            g
        };
        self.finish(engine, comm, bd, grad, out, count, (hp, lr))
    }

    /// Stages 0–2: whether the engine hands its gradients out during the backward, so that
    /// buckets are reduced as they fill (`Some(true)`), or the driver reduces them after the
    /// backward (`Some(false)`: it cannot); `None` before the first step and at stage 3.
    pub fn streamed(&self) -> Option<bool> {
        self.streamed
    }

    /// Stage 3 with an engine that steps layer by layer: each micro-batch runs through
    /// [`TrainingEngine::loss_and_backward_layered`] with a [`Gather`] hook, which all-gathers a
    /// group's parameters from every rank's shard when the engine asks for them and
    /// reduce-scatters each group's gradient into this rank's chunk as soon as the engine hands
    /// it over: in line, or with `overlap_comm` queued on a communication thread that runs the
    /// gathers too (through a [`Relay`]), in the hook's order. No whole-model buffer exists on
    /// this path. `None`: the engine cannot (nothing happened), and the caller takes the
    /// whole-model path.
    fn step_layered(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        micro: &[TrainBatch],
        hp: &AdamWConfig,
        lr: f64,
    ) -> Result<Option<StepOut>, DistError> {
        let t = Instant::now();
        let count = micro.len();
        let scale = self.loss_scale / (count * comm.world()) as f64;
        let mut grad = vec![0.0f32; self.layout.chunk];
        let scatter = Scatter {
            layout: &self.layout,
            groups: &self.groups,
            rank: self.rank,
            grad: &mut grad,
            seen: vec![false; self.groups.len()],
            log: Vec::new(),
        };
        let cfg = GatherCfg {
            layout: &self.layout,
            groups: &self.groups,
            rank: self.rank,
            master: &self.shard.master,
            sizes: &self.group_sizes,
            order: &self.fill_order,
            max_live: self.cfg.stage3_max_live_parameters,
            prefetch_bucket: self.cfg.stage3_prefetch_bucket_size,
        };
        let comms = &mut self.comms;
        let run = |hook: &mut Gather, engine: &mut dyn TrainingEngine| {
            let mut out = MicroOut::default();
            for b in micro {
                let mask = b.mask.as_deref();
                let lo = engine.loss_and_backward_layered(
                    &batch(b),
                    &b.targets,
                    mask,
                    None,
                    scale,
                    &mut *hook,
                )?;
                match lo {
                    Some(lo) => out.add(lo.loss, b.inputs.len()),
                    None => return Ok(None),
                }
            }
            Ok::<_, DistError>(Some(out))
        };
        // The micro-batches' result, the gradient side's log, the live peak, and the seconds
        // of communication in all and overlapped with the engine.
        let (res, log, peak, secs, overlapped) = if !self.cfg.overlap_comm {
            let mut hook = Gather::new(cfg, GradSink::Inline(scatter), &mut *comm, comms);
            let res = run(&mut hook, engine);
            let GradSink::Inline(s) = hook.grads else {
                unreachable!("made inline")
            };
            let secs = hook.secs + s.log.iter().map(|c| c.secs).sum::<f64>();
            (res, s.log, hook.peak, secs, 0.0)
        } else {
            // Every collective of the step runs on the communication thread in the order the
            // hook issues it: gradients queued (the backward goes on), gathers waited for
            // through a `Relay`. So the order is the same on every rank.
            let (rank, world) = (comm.rank(), comm.world());
            let mut s = scatter;
            let c: &mut dyn Comm = &mut *comm;
            std::thread::scope(|sc| {
                let (tx, rx) = mpsc::channel::<Job>();
                // Each job's seconds, and when each gradient's collectives ran.
                let thread = sc.spawn(move || {
                    let (mut busy, mut spans) = (0.0, Vec::new());
                    for job in rx {
                        let t = Instant::now();
                        let r = match job {
                            Job::Grad(i, v) => {
                                let r = s.reduce(&mut *c, i, &v);
                                spans.push((t, Instant::now()));
                                r
                            }
                            Job::Call(f) => {
                                f(&mut *c);
                                Ok(())
                            }
                        };
                        busy += t.elapsed().as_secs_f64();
                        if r.is_err() {
                            return (r, s, busy, spans);
                        }
                    }
                    (Ok(()), s, busy, spans)
                });
                let mut relay = Relay {
                    tx: tx.clone(),
                    rank,
                    world,
                    waits: Vec::new(),
                };
                let mut hook = Gather::new(cfg, GradSink::Thread(tx), &mut relay, comms);
                let res = run(&mut hook, engine);
                let peak = hook.peak;
                drop(hook);
                let t = Instant::now();
                let mut waits = std::mem::take(&mut relay.waits);
                drop(relay); // closes the channel: the thread ends after the last job
                let (r, s, busy, spans) = thread.join().expect("the communication thread panicked");
                waits.push((t, Instant::now()));
                // A gradient's collectives overlapped the engine while this thread was not
                // waiting for a gather or for the end.
                let overlapped: f64 = spans
                    .iter()
                    .map(|&(a, e)| {
                        let hidden = waits
                            .iter()
                            .map(|&(wa, we)| e.min(we).saturating_duration_since(a.max(wa)));
                        (e - a).saturating_sub(hidden.sum()).as_secs_f64()
                    })
                    .sum();
                // A failed collective first: the engine's error is then "thread stopped".
                let res = match r {
                    Err(e) => Err(e.into()),
                    Ok(()) => res,
                };
                (res, s.log, peak, busy, overlapped.min(busy))
            })
        };
        let out = match res {
            Ok(Some(out)) => out,
            Ok(None) => {
                // Every rank runs the same engine kind, so every rank falls back here.
                self.layered = Some(false);
                return Ok(None);
            }
            Err(e) => {
                self.engine_current = false;
                return Err(e);
            }
        };
        self.comms.extend(log);
        self.live_peak = Some(peak);
        self.layered = Some(true);
        // The engine holds no parameters now; a sync gathers them all.
        self.engine_current = false;
        let bd = Breakdown {
            forward_backward: t.elapsed().as_secs_f64() - (secs - overlapped),
            comm: secs,
            step: 0.0,
            comm_overlapped: overlapped,
        };
        self.finish(engine, comm, bd, grad, out, count, (hp, lr))
            .map(Some)
    }

    /// The end of a host-side step: this rank's summed gradient shard `grad` unscaled, the
    /// global norm and the step's statistics summed over ranks, then (unless skipped) clipping,
    /// AdamW on the shard and the new weights to the engine (at stage 3 at the next gather).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        mut bd: Breakdown,
        mut grad: Vec<f32>,
        micro: MicroOut,
        count: usize,
        (hp, lr): (&AdamWConfig, f64),
    ) -> Result<StepOut, DistError> {
        let MicroOut {
            loss_sum,
            bad,
            tokens,
        } = micro;
        if self.loss_scale != 1.0 {
            let inv = (1.0 / self.loss_scale) as f32;
            grad.iter_mut().for_each(|g| *g *= inv);
        }
        let local_sq: f64 = grad.iter().map(|&g| f64::from(g) * f64::from(g)).sum();
        let mut stats = [loss_sum, bad, tokens as f64, local_sq];
        if self.cfg.stage == 0 {
            stats[3] = 0.0; // every rank holds the whole gradient: not summed over ranks
        }
        bd.comm += timed(&mut self.comms, "all_reduce_f64", 32, || {
            comm.all_reduce_sum_f64(&mut stats)
        })?;
        let sq = if self.cfg.stage == 0 {
            local_sq
        } else {
            stats[3]
        };
        let grad_norm = sq.sqrt();
        let out = |loss, bd| StepOut {
            loss,
            grad_norm,
            tokens: stats[2] as u64,
            breakdown: bd,
        };
        if stats[1] > 0.0 || !grad_norm.is_finite() {
            return Ok(out(None, bd));
        }
        let t = Instant::now();
        self.adamw(&mut grad, hp, lr, grad_norm);
        bd.step = t.elapsed().as_secs_f64();
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
    fn step_in_engine(
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
    fn step_on_device(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        mut bd: Breakdown,
        mut stats: [f64; 4],
        micro: usize,
        (hp, lr): (&AdamWConfig, f64),
    ) -> Result<StepOut, DistError> {
        let scatter = self.cfg.stage >= 2;
        let t = Instant::now();
        stats[3] = engine.reduce_gradient_shard(comm, scatter)?;
        let secs = t.elapsed().as_secs_f64();
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

    /// Sums the flat gradient over ranks: all-reduce in buckets (stages 0, 1), or
    /// reduce-scatter in buckets (stages 2, 3: only this rank's chunk is summed, into the
    /// start of `flat_grad`). Returns the seconds spent.
    fn reduce_gradients(&mut self, comm: &mut dyn Comm) -> Result<f64, DistError> {
        let bucket = self.cfg.reduce_bucket_size.max(1);
        let mut secs = 0.0;
        if self.cfg.stage < 2 {
            for b in self.flat_grad.chunks_mut(bucket) {
                let bytes = 4 * b.len();
                secs += timed(&mut self.comms, "all_reduce", bytes, || {
                    comm.all_reduce_sum(b)
                })?;
            }
            return Ok(secs);
        }
        let (w, c) = (self.layout.world, self.layout.chunk);
        let mut mine = vec![0.0f32; c];
        let mut input = Vec::with_capacity(w * bucket.min(c));
        let mut at = 0;
        while at < c {
            let n = bucket.min(c - at);
            input.clear();
            for r in 0..w {
                input.extend_from_slice(&self.flat_grad[r * c + at..r * c + at + n]);
            }
            let out = &mut mine[at..at + n];
            secs += timed(&mut self.comms, "reduce_scatter", 4 * w * n, || {
                comm.reduce_scatter_sum(&input, out)
            })?;
            at += n;
        }
        self.flat_grad[..c].copy_from_slice(&mine);
        Ok(secs)
    }

    /// This rank's summed gradient shard.
    fn take_grad_shard(&self) -> Vec<f32> {
        match self.cfg.stage {
            0 | 1 => self.flat_grad[self.shard.range.clone()].to_vec(),
            _ => self.flat_grad[..self.layout.chunk].to_vec(),
        }
    }

    /// Clipping with the global norm and AdamW on the shard (the simd tier's kernel).
    fn adamw(&mut self, grad: &mut [f32], hp: &AdamWConfig, lr: f64, norm: f64) {
        if let Some(coef) = hp.clip_coef(norm) {
            let c = coef as f32;
            grad.iter_mut().for_each(|g| *g *= c);
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
            engine.set_parameters(&self.layout.unflatten(&s.master))?;
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
        engine.set_parameters(&self.layout.unflatten(&full))?;
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

/// The flat ranges of each [`ParamGroup`] of `cfg` (the layers in order, then the outer
/// group), adjacent tensors merged.
fn group_ranges(cfg: &reference::MambaConfig, layout: &FlatLayout) -> Vec<Vec<Range<usize>>> {
    ParamGroup::all(cfg)
        .into_iter()
        .map(|g| {
            let mut out: Vec<Range<usize>> = Vec::new();
            for i in g.tensors(cfg) {
                let f = layout.slots[i].flat.clone();
                match out.last_mut() {
                    Some(last) if last.end == f.start => last.end = f.end,
                    _ => out.push(f),
                }
            }
            out
        })
        .collect()
}

/// The stage-3 hook of one step ([`ZeroDriver::step_layered`]): parameters all-gathered from
/// the ranks' shards a group at a time, gradients reduce-scattered into this rank's chunk a
/// group at a time. A group's flat range generally straddles chunks: rank `q` contributes the
/// part of the range inside its chunk, every part padded to the longest, so every rank calls
/// each collective with the same length; where that padding would stage more than twice the
/// range (a range inside one or two chunks of a large world), each owner's part moves on its
/// own instead ([`lopsided`]). The sums are the rank-order sums of the whole-model
/// reduce-scatter, element for element, so the gradient shard has the same bits.
struct Gather<'a> {
    layout: &'a FlatLayout,
    groups: &'a [Vec<Range<usize>>],
    rank: usize,
    /// This rank's chunk of the master weights.
    master: &'a [f32],
    /// Where each group's gradient goes: reduce-scattered in line, or sent to the
    /// communication thread (`overlap_comm`), which then also runs every gather, in order.
    grads: GradSink<'a>,
    /// The communicator, or with `overlap_comm` a [`Relay`] to the communication thread.
    comm: &'a mut dyn Comm,
    comms: &'a mut Vec<CommRecord>,
    secs: f64,
    /// Elements of each group.
    sizes: &'a [usize],
    /// The order in which an engine fills the groups in one micro-batch
    /// ([`fill_order`]), and where in it the next fill is expected.
    order: &'a [ParamGroup],
    pos: usize,
    /// A group gathered ahead of its fill, with its values.
    ahead: Option<(ParamGroup, Vec<f32>)>,
    /// `stage3_max_live_parameters` and `stage3_prefetch_bucket_size`.
    max_live: usize,
    prefetch_bucket: usize,
    /// Elements of the groups filled and not released yet.
    held: usize,
    /// The most parameter elements live at once (held by the engine plus gathered ahead).
    peak: usize,
}

/// What a [`Gather`] reads: the layout, its groups and this rank's master weights, the fill
/// order, and the stage-3 limits.
#[derive(Clone, Copy)]
struct GatherCfg<'a> {
    layout: &'a FlatLayout,
    groups: &'a [Vec<Range<usize>>],
    rank: usize,
    master: &'a [f32],
    sizes: &'a [usize],
    order: &'a [ParamGroup],
    max_live: usize,
    prefetch_bucket: usize,
}

impl<'a> Gather<'a> {
    fn new(
        c: GatherCfg<'a>,
        grads: GradSink<'a>,
        comm: &'a mut dyn Comm,
        comms: &'a mut Vec<CommRecord>,
    ) -> Gather<'a> {
        Gather {
            layout: c.layout,
            groups: c.groups,
            rank: c.rank,
            master: c.master,
            grads,
            comm,
            comms,
            secs: 0.0,
            sizes: c.sizes,
            order: c.order,
            pos: 0,
            ahead: None,
            max_live: c.max_live,
            prefetch_bucket: c.prefetch_bucket,
            held: 0,
            peak: 0,
        }
    }
}

/// The order in which [`TrainingEngine::loss_and_backward_layered`] fills the groups of one
/// micro-batch: the outer group (embedding lookup), every layer, the outer group (final norm
/// and head), every layer in reverse.
fn fill_order(n_layer: usize) -> Vec<ParamGroup> {
    let mut o = vec![ParamGroup::Outer];
    o.extend((0..n_layer).map(ParamGroup::Layer));
    o.push(ParamGroup::Outer);
    o.extend((0..n_layer).rev().map(ParamGroup::Layer));
    o
}

impl Gather<'_> {
    fn index(&self, g: ParamGroup) -> usize {
        match g {
            ParamGroup::Layer(i) => i,
            ParamGroup::Outer => self.groups.len() - 1,
        }
    }

    /// The values of `groups` (each in its tensors' canonical order) gathered from every
    /// rank's chunk: the groups' flat ranges sorted and merged where they touch, one range at a
    /// time ([`Gather::gather_range`]).
    fn gather_groups(&mut self, groups: &[Option<ParamGroup>]) -> reference::Result<Vec<Vec<f32>>> {
        let groups: Vec<ParamGroup> = groups.iter().flatten().copied().collect();
        let mut ranges: Vec<Range<usize>> = groups
            .iter()
            .flat_map(|&g| self.groups[self.index(g)].clone())
            .collect();
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::new();
        for r in ranges {
            match merged.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => merged.push(r),
            }
        }
        let mut values = Vec::with_capacity(merged.len());
        for m in &merged {
            values.push(self.gather_range(m)?);
        }
        Ok(groups
            .iter()
            .map(|&g| {
                let mut out = Vec::with_capacity(self.sizes[self.index(g)]);
                for r in &self.groups[self.index(g)] {
                    let k = merged
                        .iter()
                        .position(|m| m.start <= r.start && r.end <= m.end);
                    let k = k.expect("every range lies in a merged one");
                    let at = r.start - merged[k].start;
                    out.extend_from_slice(&values[k][at..at + r.len()]);
                }
                out
            })
            .collect())
    }

    /// The flat range `r` of the master weights gathered from the ranks' chunks: one padded
    /// all-gather, or a broadcast from each owner where the parts are [`lopsided`].
    fn gather_range(&mut self, r: &Range<usize>) -> reference::Result<Vec<f32>> {
        let (world, base) = (self.layout.world, self.rank * self.layout.chunk);
        let (parts, n) = self.parts(r);
        let mut out = Vec::with_capacity(r.len());
        if lopsided(world, n, r) {
            // Each owner's part broadcast from it: staging of one part, not `world` parts.
            for (q, p) in parts.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
                let mut bytes = vec![0u8; 4 * p.len()];
                if q == self.rank {
                    let mine = &self.master[p.start - base..p.end - base];
                    for (b, x) in bytes.chunks_exact_mut(4).zip(mine) {
                        b.copy_from_slice(&x.to_le_bytes());
                    }
                }
                let comm = &mut *self.comm;
                self.secs += timed(self.comms, "broadcast_group", bytes.len(), || {
                    comm.broadcast(&mut bytes, q)
                })?;
                out.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
            }
            return Ok(out);
        }
        let mut mine = vec![0.0f32; n];
        let p = &parts[self.rank];
        mine[..p.len()].copy_from_slice(&self.master[p.start - base..p.end - base]);
        let mut all = vec![0.0f32; n * world];
        let comm = &mut *self.comm;
        self.secs += timed(self.comms, "all_gather_group", 4 * all.len(), || {
            comm.all_gather(&mine, &mut all)
        })?;
        for (q, p) in parts.iter().enumerate() {
            out.extend_from_slice(&all[q * n..q * n + p.len()]);
        }
        Ok(out)
    }

    fn parts(&self, r: &Range<usize>) -> (Vec<Range<usize>>, usize) {
        parts(self.layout, r)
    }
}

/// Each rank's part of the flat range `r` (inside its chunk) and the longest part.
fn parts(layout: &FlatLayout, r: &Range<usize>) -> (Vec<Range<usize>>, usize) {
    {
        let c = layout.chunk;
        let parts: Vec<Range<usize>> = (0..layout.world)
            .map(|q| {
                let (lo, hi) = (r.start.max(q * c), r.end.min((q + 1) * c));
                // An empty part sits at the chunk's start.
                if lo < hi {
                    lo..hi
                } else {
                    q * c..q * c
                }
            })
            .collect();
        let n = parts.iter().map(|p| p.len()).max().unwrap_or(0);
        (parts, n)
    }
}

/// Whether the parts of a range are so uneven (the longest `n` of `world`) that one
/// collective padding every part to the longest would stage more than twice the range: then
/// each owner's part moves on its own (a broadcast of the parameters, an all-reduce of the
/// gradient), staging one part at a time.
fn lopsided(world: usize, n: usize, r: &Range<usize>) -> bool {
    world * n > 2 * r.len()
}

fn group_error(g: ParamGroup, got: usize, want: usize) -> reference::Error {
    reference::Error::Shape {
        op: "stage-3 gather",
        msg: format!("{g:?}: the engine passed {got} elements, the layout has {want}"),
    }
}

impl ParamHook for Gather<'_> {
    fn fill(&mut self, g: ParamGroup, tensors: &mut [Tensor<f32>]) -> reference::Result<()> {
        let idx = self.index(g);
        let want = self.sizes[idx];
        let got: usize = tensors.iter().map(|t| t.numel()).sum();
        if got != want {
            return Err(group_error(g, got, want));
        }
        let data = match self.ahead.take() {
            Some((a, d)) if a == g => d,
            _ => {
                // Not prefetched: gather it, with the next group of the order when the limits
                // allow (one collective for both where their ranges touch).
                let next = self.order.get(self.pos + 1).copied();
                let next = next.filter(|&n| {
                    let sn = self.sizes[self.index(n)];
                    n != g && sn <= self.prefetch_bucket && self.held + want + sn <= self.max_live
                });
                let mut got = self.gather_groups(&[Some(g), next])?;
                if let Some(n) = next {
                    self.ahead = Some((n, got.pop().expect("two groups")));
                }
                got.pop().expect("one group")
            }
        };
        self.pos = if self.order.get(self.pos) == Some(&g) {
            (self.pos + 1) % self.order.len()
        } else {
            // A caller off the usual order: prefetch again from where it is.
            self.order.iter().position(|&o| o == g).map_or(0, |p| p + 1) % self.order.len()
        };
        for (s, d) in data
            .iter()
            .zip(tensors.iter_mut().flat_map(|t| t.data.iter_mut()))
        {
            *d = *s;
        }
        self.held += want;
        let ahead = self.ahead.as_ref().map_or(0, |a| a.1.len());
        self.peak = self.peak.max(self.held + ahead);
        Ok(())
    }

    fn release(&mut self, g: ParamGroup) -> reference::Result<()> {
        self.held = self.held.saturating_sub(self.sizes[self.index(g)]);
        Ok(())
    }

    fn gradients(&mut self, g: ParamGroup, grads: &[&Tensor<f32>]) -> reference::Result<()> {
        let idx = self.index(g);
        let want: usize = self.groups[idx].iter().map(|r| r.len()).sum();
        let got: usize = grads.iter().map(|t| t.numel()).sum();
        if got != want {
            return Err(group_error(g, got, want));
        }
        let values: Vec<f32> = grads.iter().flat_map(|t| t.data.iter().copied()).collect();
        match &mut self.grads {
            GradSink::Inline(s) => s.reduce(&mut *self.comm, idx, &values)?,
            GradSink::Thread(tx) => tx
                .send(Job::Grad(idx, values))
                .map_err(|_| stopped(self.rank))?,
        }
        Ok(())
    }
}

/// Where the stage-3 hook's gradients go.
enum GradSink<'a> {
    Inline(Scatter<'a>),
    Thread(mpsc::Sender<Job>),
}

/// What the stage-3 hook asks of the communication thread, in order: a group's gradient to
/// reduce-scatter (nothing waits for it), or a collective to run for the hook (which waits).
enum Job {
    Grad(usize, Vec<f32>),
    Call(Call),
}

/// A collective for the communication thread to run, with where its result goes.
type Call = Box<dyn FnOnce(&mut dyn Comm) + Send>;

fn stopped(rank: usize) -> reference::comm::CommError {
    reference::comm::CommError {
        rank,
        peer: None,
        op: "communication thread",
        msg: "it stopped (a collective failed)".into(),
    }
}

/// The stage-3 hook's communicator with `overlap_comm`: each collective runs on the
/// communication thread, after the gradients queued before it, and the caller waits for it.
/// Buffers cross as copies.
struct Relay {
    tx: mpsc::Sender<Job>,
    rank: usize,
    world: usize,
    /// When the caller waited for a collective.
    waits: Vec<(Instant, Instant)>,
}

impl Relay {
    fn call<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut dyn Comm) -> CommResult<R> + Send + 'static,
    ) -> CommResult<R> {
        let t = Instant::now();
        let (rtx, rrx) = mpsc::channel();
        let job = Job::Call(Box::new(move |c: &mut dyn Comm| {
            let _ = rtx.send(f(c));
        }));
        self.tx.send(job).map_err(|_| stopped(self.rank))?;
        let r = rrx.recv().map_err(|_| stopped(self.rank))?;
        self.waits.push((t, Instant::now()));
        r
    }
}

impl Comm for Relay {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> CommResult<()> {
        let mut v = data.to_vec();
        let v = self.call(move |c| c.all_reduce_sum(&mut v).map(|_| v))?;
        data.copy_from_slice(&v);
        Ok(())
    }
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> CommResult<()> {
        let mut v = data.to_vec();
        let v = self.call(move |c| c.all_reduce_sum_f64(&mut v).map(|_| v))?;
        data.copy_from_slice(&v);
        Ok(())
    }
    fn reduce_scatter_sum(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        let (i, mut o) = (input.to_vec(), output.to_vec());
        let o = self.call(move |c| c.reduce_scatter_sum(&i, &mut o).map(|_| o))?;
        output.copy_from_slice(&o);
        Ok(())
    }
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        let (i, mut o) = (input.to_vec(), output.to_vec());
        let o = self.call(move |c| c.all_gather(&i, &mut o).map(|_| o))?;
        output.copy_from_slice(&o);
        Ok(())
    }
    fn broadcast(&mut self, data: &mut [u8], root: usize) -> CommResult<()> {
        let mut v = data.to_vec();
        let v = self.call(move |c| c.broadcast(&mut v, root).map(|_| v))?;
        data.copy_from_slice(&v);
        Ok(())
    }
    fn barrier(&mut self) -> CommResult<()> {
        self.call(|c| c.barrier())
    }
}

/// The gradient side of the stage-3 hook: each group's gradient reduce-scattered into this
/// rank's chunk (see [`Gather`] for the parts and [`lopsided`] ranges), added to what earlier
/// micro-batches left there.
struct Scatter<'a> {
    layout: &'a FlatLayout,
    groups: &'a [Vec<Range<usize>>],
    rank: usize,
    /// This rank's chunk of the summed gradient.
    grad: &'a mut [f32],
    /// Groups whose gradient arrived already this step (the next one adds to it).
    seen: Vec<bool>,
    log: Vec<CommRecord>,
}

impl Scatter<'_> {
    fn reduce(&mut self, comm: &mut dyn Comm, idx: usize, values: &[f32]) -> CommResult<()> {
        let first = !self.seen[idx];
        self.seen[idx] = true;
        let (world, base) = (self.layout.world, self.rank * self.layout.chunk);
        let mut src = values.iter();
        for r in &self.groups[idx] {
            let (parts, n) = parts(self.layout, r);
            if lopsided(world, n, r) {
                // Each owner's part all-reduced (the same rank-order sums), kept by the owner.
                for (q, p) in parts.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
                    let mut part: Vec<f32> = src.by_ref().take(p.len()).copied().collect();
                    timed(&mut self.log, "all_reduce_group", 4 * part.len(), || {
                        comm.all_reduce_sum(&mut part)
                    })?;
                    if q == self.rank {
                        let dst = &mut self.grad[p.start - base..p.end - base];
                        if first {
                            dst.copy_from_slice(&part);
                        } else {
                            dst.iter_mut().zip(&part).for_each(|(d, s)| *d += *s);
                        }
                    }
                }
                continue;
            }
            let mut input = vec![0.0f32; n * world];
            for (q, p) in parts.iter().enumerate() {
                for (d, s) in input[q * n..q * n + p.len()].iter_mut().zip(src.by_ref()) {
                    *d = *s;
                }
            }
            let mut out = vec![0.0f32; n];
            timed(
                &mut self.log,
                "reduce_scatter_group",
                4 * input.len(),
                || comm.reduce_scatter_sum(&input, &mut out),
            )?;
            let p = &parts[self.rank];
            let dst = &mut self.grad[p.start - base..p.end - base];
            if first {
                dst.copy_from_slice(&out[..p.len()]);
            } else {
                dst.iter_mut().zip(&out).for_each(|(d, s)| *d += *s);
            }
        }
        Ok(())
    }
}

/// The batch of a micro-batch, as the engines take it.
fn batch(b: &TrainBatch) -> Batch<'_> {
    Batch {
        batch: b.batch,
        seq_len: b.seq_len,
        tokens: &b.inputs,
        resets: Some(&b.resets),
    }
}

/// How [`stream`] reduces a step's gradient.
struct ReduceCfg<'a> {
    layout: &'a FlatLayout,
    /// The flat ranges and elements of each [`ParamGroup`] (the layers in order, then the
    /// outer group).
    groups: &'a [Vec<Range<usize>>],
    sizes: &'a [usize],
    /// `reduce_bucket_size` (at least 1).
    bucket: usize,
    /// Stage 2: reduce-scatter into this rank's chunk; otherwise all-reduce into the flat
    /// buffer.
    scatter: bool,
    /// `overlap_comm`: reduce on a communication thread.
    overlap: bool,
}

/// What [`stream`] did: the last micro-batch's loss, the collectives, their seconds (all, and
/// overlapped with the backward), and the seconds of the forward and backward.
struct Streamed {
    loss: f64,
    log: Vec<CommRecord>,
    secs: f64,
    overlapped: f64,
    forward_backward: f64,
}

/// Runs micro-batch `b` through [`TrainingEngine::loss_and_backward_streamed`] with a
/// [`Packer`] as the hook, and sums every bucket into `dest` (the padded flat buffer, or this
/// rank's chunk at stage 2). With `overlap` the buckets go to a scoped communication thread,
/// which owns `comm` until the backward is done and every bucket is reduced; the collectives
/// are issued in the order the buckets filled, which is the same on every rank. `t`: when the
/// step's forward and backward began. `None`: the engine cannot (nothing happened).
fn stream(
    engine: &mut dyn TrainingEngine,
    comm: &mut dyn Comm,
    b: &TrainBatch,
    scale: f64,
    red: &ReduceCfg,
    dest: &mut [f32],
    t: Instant,
) -> Result<Option<Streamed>, DistError> {
    let input = batch(b);
    let mask = b.mask.as_deref();
    let packer = |sink| Packer {
        groups: red.groups,
        sizes: red.sizes,
        bucket: red.bucket,
        cur: Bucket::default(),
        seen: vec![false; red.groups.len()],
        sink,
    };
    let reducer = Reducer {
        comm,
        layout: red.layout,
        scatter: red.scatter,
        dest,
        log: Vec::new(),
        spans: Vec::new(),
    };
    if !red.overlap {
        let mut p = packer(Sink::Inline(reducer));
        let lo =
            engine.loss_and_backward_streamed(&input, &b.targets, mask, None, scale, &mut p)?;
        let Some(lo) = lo else { return Ok(None) };
        p.finish()?;
        let Sink::Inline(r) = p.sink else {
            unreachable!("made inline")
        };
        let secs = r.log.iter().map(|c| c.secs).sum::<f64>();
        return Ok(Some(Streamed {
            loss: lo.loss,
            forward_backward: t.elapsed().as_secs_f64() - secs,
            log: r.log,
            secs,
            overlapped: 0.0,
        }));
    }
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<Bucket>();
        let thread = s.spawn(move || -> CommResult<Reducer> {
            let mut r = reducer;
            for b in rx {
                r.reduce(b)?;
            }
            Ok(r)
        });
        let mut p = packer(Sink::Thread(tx));
        let lo = engine.loss_and_backward_streamed(&input, &b.targets, mask, None, scale, &mut p);
        let lo = lo.and_then(|lo| {
            if lo.is_some() {
                p.finish()?;
            }
            Ok(lo)
        });
        let done = Instant::now();
        drop(p); // closes the channel: the thread ends after the last bucket
        let r = thread.join().expect("the communication thread panicked");
        // A failed collective first: the engine's error is then the hook's "thread stopped".
        let r = r?;
        let Some(lo) = lo? else { return Ok(None) };
        let overlapped = r
            .spans
            .iter()
            .map(|&(a, e)| e.min(done).saturating_duration_since(a).as_secs_f64())
            .sum();
        Ok(Some(Streamed {
            loss: lo.loss,
            forward_backward: (done - t).as_secs_f64(),
            secs: r.log.iter().map(|c| c.secs).sum(),
            log: r.log,
            overlapped,
        }))
    })
}

/// Gradients packed for one collective: flat ranges and their values, end to end.
#[derive(Default)]
struct Bucket {
    ranges: Vec<Range<usize>>,
    values: Vec<f32>,
}

/// Where a full bucket goes: reduced in line, or sent to the communication thread.
enum Sink<'a> {
    Inline(Reducer<'a>),
    Thread(mpsc::Sender<Bucket>),
}

/// The [`GradHook`] of a streamed step: packs each group's gradient, as the engine hands it
/// over, into the current bucket. A group goes into the bucket whole; the bucket is sent
/// before a group that would take it past `bucket` elements, and as soon as it holds
/// `bucket` or more (so a group larger than the bucket size is a bucket by itself). The last
/// bucket is sent by [`Packer::finish`].
struct Packer<'a> {
    groups: &'a [Vec<Range<usize>>],
    sizes: &'a [usize],
    bucket: usize,
    cur: Bucket,
    /// Groups handed over this call.
    seen: Vec<bool>,
    sink: Sink<'a>,
}

impl Packer<'_> {
    fn send(&mut self) -> reference::Result<()> {
        if self.cur.values.is_empty() {
            return Ok(());
        }
        let b = std::mem::take(&mut self.cur);
        match &mut self.sink {
            Sink::Inline(r) => r.reduce(b)?,
            Sink::Thread(tx) => tx.send(b).map_err(|_| reference::Error::Device {
                device: "communication thread".into(),
                msg: "it stopped (a collective failed)".into(),
            })?,
        }
        Ok(())
    }

    /// Sends the last bucket, after checking that every group came.
    fn finish(&mut self) -> reference::Result<()> {
        if let Some(i) = self.seen.iter().position(|s| !s) {
            return Err(reference::Error::Shape {
                op: "streamed backward",
                msg: format!("group {i} of {} was never handed over", self.seen.len()),
            });
        }
        self.send()
    }
}

impl GradHook for Packer<'_> {
    fn gradients(&mut self, g: ParamGroup, grads: &[&Tensor<f32>]) -> reference::Result<()> {
        let idx = match g {
            ParamGroup::Layer(i) => i,
            ParamGroup::Outer => self.groups.len() - 1,
        };
        let want = self.sizes.get(idx).copied();
        let got: usize = grads.iter().map(|t| t.numel()).sum();
        if want != Some(got)
            || self.seen[idx]
            || (g != ParamGroup::Outer && idx + 1 >= self.groups.len())
        {
            return Err(reference::Error::Shape {
                op: "streamed backward",
                msg: format!(
                    "{g:?}: {got} elements (the layout has {want:?}), or handed over twice"
                ),
            });
        }
        self.seen[idx] = true;
        if !self.cur.values.is_empty() && self.cur.values.len() + got > self.bucket {
            self.send()?;
        }
        self.cur.ranges.extend(self.groups[idx].iter().cloned());
        for t in grads {
            self.cur.values.extend_from_slice(&t.data);
        }
        if self.cur.values.len() >= self.bucket {
            self.send()?;
        }
        Ok(())
    }
}

/// Sums buckets over the ranks into `dest`: all-reduce, the sums copied to their flat
/// ranges of the padded flat buffer; or (`scatter`, stage 2) each rank's part of the bucket
/// (its elements inside the rank's chunk) padded to the longest part and reduce-scattered, so
/// this rank keeps the sums of its part, in its chunk. Where that padding would move more
/// than twice the bucket (a bucket inside one or two chunks of a large world) the bucket is
/// all-reduced instead and this rank keeps its part. Either way each element is the
/// rank-order sum of the ranks' values: the bits of the whole-model path.
struct Reducer<'a> {
    comm: &'a mut dyn Comm,
    layout: &'a FlatLayout,
    scatter: bool,
    dest: &'a mut [f32],
    log: Vec<CommRecord>,
    /// When each collective started and ended.
    spans: Vec<(Instant, Instant)>,
}

impl Reducer<'_> {
    fn record(&mut self, op: &'static str, bytes: usize, start: Instant) {
        let end = Instant::now();
        let secs = (end - start).as_secs_f64();
        self.log.push(CommRecord { op, bytes, secs });
        self.spans.push((start, end));
    }

    fn reduce(&mut self, b: Bucket) -> CommResult<()> {
        let Bucket { ranges, mut values } = b;
        if !self.scatter {
            let start = Instant::now();
            self.comm.all_reduce_sum(&mut values)?;
            self.record("all_reduce", 4 * values.len(), start);
            let mut at = 0;
            for r in ranges {
                self.dest[r.clone()].copy_from_slice(&values[at..at + r.len()]);
                at += r.len();
            }
            return Ok(());
        }
        let (w, c, me) = (self.layout.world, self.layout.chunk, self.comm.rank());
        // Each rank's part: (offset in the bucket, flat range) of its elements, in order.
        let mut parts: Vec<Vec<(usize, Range<usize>)>> = vec![Vec::new(); w];
        let mut at = 0;
        for r in &ranges {
            let mut lo = r.start;
            while lo < r.end {
                let q = lo / c;
                let hi = r.end.min((q + 1) * c);
                parts[q].push((at + lo - r.start, lo..hi));
                lo = hi;
            }
            at += r.len();
        }
        let len = |p: &[(usize, Range<usize>)]| p.iter().map(|s| s.1.len()).sum::<usize>();
        let n = parts.iter().map(|p| len(p)).max().unwrap_or(0);
        let base = me * c;
        let start = Instant::now();
        if w * n > 2 * values.len() {
            self.comm.all_reduce_sum(&mut values)?;
            self.record("all_reduce", 4 * values.len(), start);
            for (off, f) in &parts[me] {
                self.dest[f.start - base..f.end - base]
                    .copy_from_slice(&values[*off..*off + f.len()]);
            }
            return Ok(());
        }
        let mut input = vec![0.0f32; w * n];
        for (q, p) in parts.iter().enumerate() {
            let mut k = q * n;
            for (off, f) in p {
                input[k..k + f.len()].copy_from_slice(&values[*off..*off + f.len()]);
                k += f.len();
            }
        }
        let mut out = vec![0.0f32; n];
        self.comm.reduce_scatter_sum(&input, &mut out)?;
        self.record("reduce_scatter", 4 * input.len(), start);
        let mut k = 0;
        for (_, f) in &parts[me] {
            self.dest[f.start - base..f.end - base].copy_from_slice(&out[k..k + f.len()]);
            k += f.len();
        }
        Ok(())
    }
}

/// The flat range the optimizer of `rank` owns at `stage` and its decay runs (relative to
/// the range's start).
pub fn owned(
    layout: &FlatLayout,
    stage: u8,
    rank: usize,
) -> (Range<usize>, Vec<(Range<usize>, bool)>) {
    if stage == 0 {
        let one = FlatLayout {
            world: 1,
            chunk: layout.numel,
            ..layout.clone()
        };
        (0..layout.numel, one.decay_runs(0))
    } else {
        (layout.chunk_range(rank), layout.decay_runs(rank))
    }
}
