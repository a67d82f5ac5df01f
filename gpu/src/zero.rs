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
        match self.train.summed {
            // Summed during the backward (`loss_and_backward_summed`).
            Some(s) if s == scatter => return self.grad_sumsq(on.range.start, on.range.len()),
            Some(s) => {
                return Err(self.shard_err(format!(
                "the gradients were summed in the backward with scatter {s}, asked for {scatter}"
            )))
            }
            None => {}
        }
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

/// One collective of [`bucket_plan`]: flat elements `range`, summed on every rank (`root`
/// `None`) or on rank `root` only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) range: Range<usize>,
    pub(crate) root: Option<usize>,
}

/// The buckets of a backward that sums its gradients as it goes
/// (`TrainingEngine::loss_and_backward_summed`). `groups` holds each group's flat ranges in
/// the order the backward finishes them. Whole groups are packed into a bucket until it
/// holds at least `bucket` elements; a bucket's ranges are merged where they touch, and with
/// `chunk` (each rank's share of a sharded flat buffer) split where a chunk ends, each piece
/// summed on the rank that owns it. Returns, for each bucket, how many groups must be done
/// before it is queued, and its pieces. Every element of every group is in exactly one piece.
pub(crate) fn bucket_plan(
    groups: &[Vec<Range<usize>>],
    bucket: usize,
    chunk: Option<usize>,
) -> Vec<(usize, Vec<Piece>)> {
    let bucket = bucket.max(1);
    let mut out = Vec::new();
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut held = 0;
    for (i, g) in groups.iter().enumerate() {
        for r in g.iter().filter(|r| !r.is_empty()) {
            held += r.len();
            ranges.push(r.clone());
        }
        if held >= bucket || i + 1 == groups.len() {
            ranges.sort_by_key(|r| r.start);
            let mut merged: Vec<Range<usize>> = Vec::new();
            for r in ranges.drain(..) {
                match merged.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => merged.push(r),
                }
            }
            let mut pieces = Vec::new();
            for r in merged {
                match chunk {
                    None => pieces.push(Piece {
                        range: r,
                        root: None,
                    }),
                    Some(c) => {
                        let c = c.max(1);
                        let mut a = r.start;
                        while a < r.end {
                            let owner = a / c;
                            let b = r.end.min((owner + 1) * c);
                            pieces.push(Piece {
                                range: a..b,
                                root: Some(owner),
                            });
                            a = b;
                        }
                    }
                }
            }
            if !pieces.is_empty() {
                out.push((i + 1, pieces));
            }
            held = 0;
        }
    }
    out
}

/// The backward's side of `loss_and_backward_summed`: told each group's `Phase::Grads`, it
/// queues every bucket whose groups are done.
pub(crate) struct SumAsDone<'a> {
    comm: &'a mut dyn Comm,
    /// The groups in the order the backward finishes them.
    order: Vec<reference::engine::ParamGroup>,
    plan: std::iter::Peekable<std::vec::IntoIter<(usize, Vec<Piece>)>>,
    done: usize,
    grads: u64,
    stream: u64,
    dev: std::sync::Arc<crate::cuda::Dev>,
    /// Elements queued, for the check that every one was.
    pub(crate) queued: usize,
}

impl<'a> SumAsDone<'a> {
    pub(crate) fn new(
        e: &GpuEngine,
        comm: &'a mut dyn Comm,
        bucket: usize,
        scatter: bool,
    ) -> Result<SumAsDone<'a>> {
        let order = reference::engine::ParamGroup::grads_order(e.model.cfg.n_layer);
        let groups: Vec<Vec<Range<usize>>> = order
            .iter()
            .map(|&g| crate::layered::group(&e.model, g).ranges)
            .collect();
        let chunk = match (&e.train.shard, scatter) {
            (Some(on), true) => Some(on.range.len()),
            (_, false) => None,
            (None, true) => {
                return Err(
                    e.shard_err("a reduce to each chunk's rank without a sharded optimizer".into())
                )
            }
        };
        Ok(SumAsDone {
            comm,
            order,
            plan: bucket_plan(&groups, bucket, chunk).into_iter().peekable(),
            done: 0,
            grads: e.train.grads.ptr,
            stream: e.model.dev.cu_stream() as u64,
            dev: e.model.dev.clone(),
            queued: 0,
        })
    }

    /// Waits for every queued sum.
    pub(crate) fn wait(&mut self) -> Result<()> {
        Ok(self.comm.wait_device()?)
    }

    /// What the backward calls at each phase: on a group's final gradient, queues the
    /// buckets it completes.
    pub(crate) fn on(&mut self, p: crate::forward::Phase) -> Result<()> {
        let crate::forward::Phase::Grads(g) = p else {
            return Ok(());
        };
        if self.order.get(self.done) != Some(&g) {
            let next = self.order.get(self.done);
            return Err(self.dev.err(
                "summing gradients in the backward",
                format!("the backward finished {g:?} where {next:?} was next"),
            ));
        }
        self.done += 1;
        while self
            .plan
            .peek()
            .is_some_and(|(after, _)| *after <= self.done)
        {
            let (_, pieces) = self.plan.next().expect("peeked");
            for p in pieces {
                let ptr = self.grads + 4 * p.range.start as u64;
                if !self
                    .comm
                    .reduce_sum_device_queued(ptr, p.range.len(), p.root, self.stream)?
                {
                    return Err(self.dev.err(
                        "summing gradients in the backward",
                        "the communicator stopped reaching device memory",
                    ));
                }
                self.queued += p.range.len();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each element of every group in exactly one piece, and with `chunk` on its owner.
    fn covers(groups: &[Vec<Range<usize>>], plan: &[(usize, Vec<Piece>)], chunk: Option<usize>) {
        let n = groups.iter().flatten().map(|r| r.end).max().unwrap_or(0);
        let mut seen = vec![0u8; n];
        for (_, pieces) in plan {
            for p in pieces {
                for x in p.range.clone() {
                    seen[x] += 1;
                }
                match chunk {
                    None => assert_eq!(p.root, None),
                    Some(c) => {
                        assert_eq!(p.root, Some(p.range.start / c), "{p:?}");
                        assert_eq!(
                            (p.range.end - 1) / c,
                            p.range.start / c,
                            "{p:?} spans chunks"
                        );
                    }
                }
            }
        }
        for r in groups.iter().flatten() {
            assert!(seen[r.clone()].iter().all(|&k| k == 1), "{r:?}: {seen:?}");
        }
        assert_eq!(
            seen.iter().map(|&k| k as usize).sum::<usize>(),
            groups.iter().flatten().map(|r| r.len()).sum::<usize>()
        );
    }

    /// A model of 4 layers of 10 elements after an outer group of 3 at the front and 2 at the
    /// back, in the backward's order (the layers in reverse, the outer group last).
    fn model() -> Vec<Vec<Range<usize>>> {
        let mut g: Vec<Vec<Range<usize>>> = (0..4)
            .rev()
            .map(|i| std::iter::once(3 + 10 * i..13 + 10 * i).collect())
            .collect();
        g.push(vec![0..3, 43..45]);
        g
    }

    #[test]
    fn buckets_hold_whole_groups_in_the_backwards_order_and_every_element_once() {
        let g = model();
        let plan = bucket_plan(&g, 15, None);
        // Two layers a bucket (20 ≥ 15), then the outer group alone.
        let after: Vec<usize> = plan.iter().map(|b| b.0).collect();
        assert_eq!(after, vec![2, 4, 5]);
        // Neighbouring layers merge into one range.
        assert_eq!(
            plan[0].1,
            vec![Piece {
                range: 23..43,
                root: None
            }]
        );
        assert_eq!(plan[2].1.len(), 2);
        covers(&g, &plan, None);
        // One element a bucket: one bucket per group; a bucket past the model: one bucket.
        assert_eq!(bucket_plan(&g, 0, None).len(), 5);
        let one = bucket_plan(&g, 1000, None);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0, 5);
        covers(&g, &one, None);
    }

    #[test]
    fn a_sharded_bucket_is_cut_where_each_ranks_chunk_ends() {
        let g = model();
        // 45 elements over 4 ranks: chunks of 12 (the last rank's padded).
        for bucket in [1, 7, 15, 1000] {
            let plan = bucket_plan(&g, bucket, Some(12));
            covers(&g, &plan, Some(12));
        }
        let plan = bucket_plan(&g, 15, Some(12));
        assert_eq!(
            plan[0].1,
            vec![
                Piece {
                    range: 23..24,
                    root: Some(1)
                },
                Piece {
                    range: 24..36,
                    root: Some(2)
                },
                Piece {
                    range: 36..43,
                    root: Some(3)
                },
            ]
        );
    }
}
