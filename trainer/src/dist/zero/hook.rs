//! The stage-3 hook ([`Gather`]): each group's parameters all-gathered from the ranks' chunks
//! when the engine asks for them, with the next group of the fill order prefetched where the
//! limits allow, and (its gradient side, [`Scatter`]) each group's gradient reduce-scattered
//! into this rank's chunk.

use std::ops::Range;
use std::sync::mpsc;

use reference::comm::{Comm, CommResult};
use reference::engine::{ParamGroup, ParamHook};
use reference::Tensor;

use super::ranges::{lopsided, parts};
use super::stage3::{stopped, Job};
use super::{timed, CommRecord};
use crate::dist::shard::FlatLayout;

/// The stage-3 hook of one step ([`ZeroDriver::step_layered`]): parameters all-gathered from
/// the ranks' shards a group at a time, gradients reduce-scattered into this rank's chunk a
/// group at a time. A group's flat range generally straddles chunks: rank `q` contributes the
/// part of the range inside its chunk, every part padded to the longest, so every rank calls
/// each collective with the same length; where that padding would stage more than twice the
/// range (a range inside one or two chunks of a large world), each owner's part moves on its
/// own instead ([`lopsided`]). The sums are the rank-order sums of the whole-model
/// reduce-scatter, element for element, so the gradient shard has the same bits.
///
/// [`ZeroDriver::step_layered`]: super::ZeroDriver::step_layered
pub(super) struct Gather<'a> {
    layout: &'a FlatLayout,
    groups: &'a [Vec<Range<usize>>],
    rank: usize,
    /// This rank's chunk of the master weights.
    master: &'a [f32],
    /// Where each group's gradient goes: reduce-scattered in line, or sent to the
    /// communication thread (`overlap_comm`), which then also runs every gather, in order.
    pub(super) grads: GradSink<'a>,
    /// The communicator, or with `overlap_comm` a [`Relay`] to the communication thread.
    ///
    /// [`Relay`]: super::stage3::Relay
    comm: &'a mut dyn Comm,
    comms: &'a mut Vec<CommRecord>,
    pub(super) secs: f64,
    /// Elements of each group.
    sizes: &'a [usize],
    /// The order in which an engine fills the groups in one micro-batch
    /// ([`ParamGroup::fill_order`]), and where in it the next fill is expected.
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
    pub(super) peak: usize,
}

/// What a [`Gather`] reads: the layout, its groups and this rank's master weights, the fill
/// order, and the stage-3 limits.
#[derive(Clone, Copy)]
pub(super) struct GatherCfg<'a> {
    pub(super) layout: &'a FlatLayout,
    pub(super) groups: &'a [Vec<Range<usize>>],
    pub(super) rank: usize,
    pub(super) master: &'a [f32],
    pub(super) sizes: &'a [usize],
    pub(super) order: &'a [ParamGroup],
    pub(super) max_live: usize,
    pub(super) prefetch_bucket: usize,
}

impl<'a> Gather<'a> {
    pub(super) fn new(
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

impl Gather<'_> {
    fn index(&self, g: ParamGroup) -> usize {
        g.index(self.groups.len() - 1)
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
        // Tensor by tensor (their lengths sum to `want`, checked above).
        let mut at = 0;
        for t in tensors.iter_mut() {
            let n = t.data.len();
            t.data.copy_from_slice(&data[at..at + n]);
            at += n;
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
        let mut values = Vec::with_capacity(want);
        for t in grads {
            values.extend_from_slice(&t.data);
        }
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
pub(super) enum GradSink<'a> {
    Inline(Scatter<'a>),
    Thread(mpsc::Sender<Job>),
}

/// The gradient side of the stage-3 hook: each group's gradient reduce-scattered into this
/// rank's chunk (see [`Gather`] for the parts and [`lopsided`] ranges), added to what earlier
/// micro-batches left there.
pub(super) struct Scatter<'a> {
    pub(super) layout: &'a FlatLayout,
    pub(super) groups: &'a [Vec<Range<usize>>],
    pub(super) rank: usize,
    /// This rank's chunk of the summed gradient.
    pub(super) grad: &'a mut [f32],
    /// Groups whose gradient arrived already this step (the next one adds to it).
    pub(super) seen: Vec<bool>,
    pub(super) log: Vec<CommRecord>,
}

impl Scatter<'_> {
    pub(super) fn reduce(
        &mut self,
        comm: &mut dyn Comm,
        idx: usize,
        values: &[f32],
    ) -> CommResult<()> {
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
