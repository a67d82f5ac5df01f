//! Stages 0–2 with the gradients streamed out of the backward: [`ZeroDriver`]'s streamed step
//! and [`stream`], which runs the last micro-batch with a [`Packer`] as the hook and sums the
//! buckets in line or on a communication thread (`overlap_comm`).

use std::ops::Range;
use std::sync::mpsc;
use std::time::Instant;

use reference::comm::{Comm, CommResult};
use reference::engine::SumInBackward;
use reference::{AdamWConfig, TrainingEngine};

use super::bucket::{Bucket, Packer, Reducer, Sink};
use super::driver::Grad;
use super::par;
use super::{batch, Breakdown, CommRecord, MicroOut, StepOut, ZeroDriver};
use crate::dist::shard::FlatLayout;
use crate::dist::DistError;
use crate::train::source::TrainBatch;

impl ZeroDriver {
    /// Stages 0–2 on the host: every micro-batch but the last accumulates in the engine, and
    /// the last runs through [`TrainingEngine::loss_and_backward_streamed`], which hands each
    /// group's (now final) gradient out as the backward finishes it. The driver packs them into
    /// buckets of about `reduce_bucket_size` elements in that order and sums each full bucket
    /// over the ranks (all-reduce at stages 0–1, reduce-scatter at stage 2) on a communication
    /// thread while the backward goes on (`overlap_comm`), or in line in the hook (without it).
    /// Each element is still the rank-order sum of the engine's buffers, so the bits are those
    /// of the whole-model path. An engine that cannot stream takes that path (from its last
    /// micro-batch on, nothing run twice).
    pub(super) fn step_streamed(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        micro: &[TrainBatch],
        hp: &AdamWConfig,
        lr: f64,
    ) -> Result<StepOut, DistError> {
        let (mut bd, t, scale, mut out) = self.all_but_last(engine, comm, micro)?;
        let count = micro.len();
        let last = micro.last().expect("at least one micro-batch");
        let scatter = self.cfg.stage == 2;
        // Stages 0–1 sum into the whole flat buffer; stage 2 into this rank's chunk.
        let mut dest = if scatter {
            // The reducer writes every element of this rank's parameters.
            self.take_grad_chunk()
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
            if scatter {
                self.grad_chunk = dest;
            } else {
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
            par::unflatten_into(&self.pool, &self.layout, &dest, &mut self.named);
            engine.set_gradients(&self.named)?;
            self.flat_grad = dest;
            let stats = [out.loss_sum, out.bad, out.tokens as f64];
            return self.step_in_engine(engine, comm, bd, stats, count, (hp, lr), true);
        }
        let grad = if scatter {
            Grad::Chunk(dest)
        } else {
            self.flat_grad = dest;
            Grad::Flat
        };
        self.finish(engine, comm, bd, grad, out, count, (hp, lr))
    }

    /// The start of a step whose last micro-batch's backward hands out or sums its gradients:
    /// the engine brought up to date and zeroed, and every micro-batch but the last run into
    /// its buffers. Returns the breakdown so far, when the forward and backward began, each
    /// micro-batch's loss scale, and what they gave.
    fn all_but_last(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        micro: &[TrainBatch],
    ) -> Result<(Breakdown, Instant, f64, MicroOut), DistError> {
        let bd = Breakdown {
            comm: self.sync_engine(engine, comm)?,
            ..Breakdown::default()
        };
        let t = Instant::now();
        engine.zero_grad()?;
        let scale = self.loss_scale / (micro.len() * comm.world()) as f64;
        let mut out = MicroOut::default();
        for b in &micro[..micro.len().saturating_sub(1)] {
            let lo =
                engine.loss_and_backward(&batch(b), &b.targets, b.mask.as_deref(), None, scale)?;
            out.add(lo.loss, b.inputs.len());
        }
        Ok((bd, t, scale, out))
    }

    /// Stages 0–2 with the optimizer in the engine (stage 0, or a sharded optimizer on the
    /// device) and `overlap_comm`: every micro-batch but the last accumulates in the engine,
    /// and the last runs through [`TrainingEngine::loss_and_backward_summed`], whose backward
    /// queues the sum over the ranks of each bucket of `reduce_bucket_size` elements where
    /// the gradients live as soon as its layers are done (all-reduce at stages 0–1, a reduce
    /// to each chunk's rank at stage 2). An engine that cannot takes the path that sums after
    /// the backward (from its last micro-batch on, nothing run twice).
    pub(super) fn step_summed(
        &mut self,
        engine: &mut dyn TrainingEngine,
        comm: &mut dyn Comm,
        micro: &[TrainBatch],
        hp: &AdamWConfig,
        lr: f64,
    ) -> Result<StepOut, DistError> {
        let (mut bd, t, scale, mut out) = self.all_but_last(engine, comm, micro)?;
        let count = micro.len();
        let last = micro.last().expect("at least one micro-batch");
        let sum = SumInBackward {
            comm: &mut *comm,
            bucket: self.cfg.reduce_bucket_size,
            scatter: self.cfg.stage == 2 && self.on_device,
        };
        let (input, mask) = (batch(last), last.mask.as_deref());
        let summed =
            match engine.loss_and_backward_summed(&input, &last.targets, mask, scale, sum)? {
                Some(lo) => {
                    out.add(lo.loss, last.inputs.len());
                    true
                }
                None => {
                    // Every rank runs the same engine kind, so every rank falls back here.
                    let lo = engine.loss_and_backward(&input, &last.targets, mask, None, scale)?;
                    out.add(lo.loss, last.inputs.len());
                    false
                }
            };
        self.summed = Some(summed);
        bd.forward_backward = t.elapsed().as_secs_f64();
        // The collectives of a summed backward ran on the device beside it and have no time
        // of their own: `comms_logger` shows none for them (they are in `forward_backward`).
        if self.in_engine {
            let stats = [out.loss_sum, out.bad, out.tokens as f64];
            return self.step_in_engine(engine, comm, bd, stats, count, (hp, lr), summed);
        }
        let stats = [out.loss_sum, out.bad, out.tokens as f64, 0.0];
        self.step_on_device(engine, comm, bd, stats, count, (hp, lr), summed)
    }

    /// Stages 0–2 with the optimizer in the engine and `overlap_comm`: whether the engine
    /// sums its gradients during the last backward (`Some(true)`) or after it (`Some(false)`:
    /// it cannot); `None` before the first such step.
    pub fn summed(&self) -> Option<bool> {
        self.summed
    }

    /// Stages 0–2: whether the engine hands its gradients out during the backward, so that
    /// buckets are reduced as they fill (`Some(true)`), or the driver reduces them after the
    /// backward (`Some(false)`: it cannot); `None` before the first step and at stage 3.
    pub fn streamed(&self) -> Option<bool> {
        self.streamed
    }
}

/// How [`stream`] reduces a step's gradient.
pub(super) struct ReduceCfg<'a> {
    layout: &'a FlatLayout,
    /// The flat ranges and elements of each [`ParamGroup`] (the layers in order, then the
    /// outer group).
    ///
    /// [`ParamGroup`]: reference::engine::ParamGroup
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
pub(super) struct Streamed {
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
pub(super) fn stream(
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
