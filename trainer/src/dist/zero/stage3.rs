//! Stage 3 layer by layer: [`ZeroDriver`]'s layered step, which runs each micro-batch with a
//! [`Gather`] hook, and with `overlap_comm` the communication thread every collective of the
//! step goes through: the gradients queued as [`Job`]s, the hook's gathers waited for through
//! a [`Relay`].

use std::sync::mpsc;
use std::time::Instant;

use reference::comm::{Comm, CommResult};
use reference::{AdamWConfig, TrainingEngine};

use super::driver::Grad;
use super::hook::{Gather, GatherCfg, GradSink, Scatter};
use super::{batch, Breakdown, MicroOut, StepOut, ZeroDriver};
use crate::dist::DistError;
use crate::train::source::TrainBatch;

impl ZeroDriver {
    /// Stage 3 with an engine that steps layer by layer: each micro-batch runs through
    /// [`TrainingEngine::loss_and_backward_layered`] with a [`Gather`] hook, which all-gathers a
    /// group's parameters from every rank's shard when the engine asks for them and
    /// reduce-scatters each group's gradient into this rank's chunk as soon as the engine hands
    /// it over: in line, or with `overlap_comm` queued on a communication thread that runs the
    /// gathers too (through a [`Relay`]), in the hook's order. No whole-model buffer exists on
    /// this path. `None`: the engine cannot (nothing happened), and the caller takes the
    /// whole-model path.
    pub(super) fn step_layered(
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
        // Each group's gradient writes its part of this rank's parameters.
        let mut grad = self.take_grad_chunk();
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
        // No whole-model buffer on this path. The engine holds no parameters now; a sync
        // gathers them all.
        self.named = Vec::new();
        self.engine_current = false;
        let bd = Breakdown {
            forward_backward: t.elapsed().as_secs_f64() - (secs - overlapped),
            comm: secs,
            step: 0.0,
            comm_overlapped: overlapped,
        };
        self.finish(engine, comm, bd, Grad::Chunk(grad), out, count, (hp, lr))
            .map(Some)
    }
}

/// What the stage-3 hook asks of the communication thread, in order: a group's gradient to
/// reduce-scatter (nothing waits for it), or a collective to run for the hook (which waits).
pub(super) enum Job {
    Grad(usize, Vec<f32>),
    Call(Call),
}

/// A collective for the communication thread to run, with where its result goes.
pub(super) type Call = Box<dyn FnOnce(&mut dyn Comm) + Send>;

pub(super) fn stopped(rank: usize) -> reference::comm::CommError {
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
pub(super) struct Relay {
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
