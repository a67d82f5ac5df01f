//! ZeRO stage 3 on the device, layer by layer ([`TrainingEngine::loss_and_backward_layered`]):
//! the engine's parameter, shadow and gradient buffers become paged ([`Dev::paged`]: the whole
//! model's addresses, memory behind only what is in use), so every kernel and offset of the
//! whole-model step stays as it is. As the forward and the backward reach a group (the
//! embedding, final norm and head, or one layer; [`Phase`]), [`Groups`] maps its ranges, has
//! the hook fill the parameters, uploads them and casts them into the shadow; when the pass is
//! done with it, the pages go back. A group's gradient is mapped and zeroed when its backward
//! starts, read out and handed to the hook when it is final, then unmapped. So the device holds
//! the activations plus about two groups of parameters and gradients, whatever the model's
//! depth; the optimizer lives with the driver, in host memory.
//!
//! [`TrainingEngine::loss_and_backward_layered`]: reference::TrainingEngine::loss_and_backward_layered
//! [`Dev::paged`]: crate::cuda::Dev::paged

use std::ops::Range;

use reference::engine::{ParamGroup, ParamHook};
use reference::{Result, Tensor};

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};

use crate::cuda::Buf;
use crate::forward::Phase;
use crate::model::Model;
use crate::ops::elementwise::{cast_lowp, CastLowpF32};
use crate::params::{Ptr, PtrMut};

/// One group's place in the flat buffers.
pub(crate) struct Group {
    /// Its tensors: element offset, shape.
    slots: Vec<(usize, Vec<usize>)>,
    /// Its element ranges, merged where they touch.
    pub(crate) ranges: Vec<Range<usize>>,
}

impl Group {
    /// The group's tensors of `buf` (a flat f32 buffer in the layout's offsets), read out.
    pub(crate) fn read(&self, buf: &Buf) -> Result<Vec<Tensor<f32>>> {
        let mut t: Vec<Tensor<f32>> = self.slots.iter().map(|(_, s)| Tensor::zeros(s)).collect();
        for ((off, _), t) in self.slots.iter().zip(&mut t) {
            buf.read(*off, &mut t.data)?;
        }
        Ok(t)
    }
}

pub(crate) fn group(m: &Model, g: ParamGroup) -> Group {
    let mut slots = Vec::new();
    let mut ranges: Vec<Range<usize>> = Vec::new();
    // The layout's slots are `param_specs` in order, which `tensors` indexes.
    for i in g.tensors(&m.cfg) {
        let s = &m.layout.slots[i];
        slots.push((s.off, s.shape.clone()));
        let r = s.off..s.off + s.numel;
        match ranges.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => ranges.push(r),
        }
    }
    Group { slots, ranges }
}

/// What one layered pass holds, told each [`Phase`] ([`Groups::on`]).
pub(crate) struct Groups<'a> {
    m: &'a Model,
    grads: &'a Buf,
    hook: &'a mut dyn ParamHook,
    /// Every group: the layers in order, then the outer group.
    groups: Vec<Group>,
    /// Fills so far: the first `n_layer + 1` are the forward's; from the next one on (the
    /// outer group for the loss and the final norm's backward, then the layers in reverse)
    /// each fill also maps and zeroes the group's gradient.
    fills: usize,
    /// Elements of parameters and gradients held now, and the most at once.
    held: usize,
    pub(crate) peak: usize,
    /// The order the passes fill the groups in ([`ParamGroup::fill_order`]).
    order: Vec<ParamGroup>,
    /// The next group, asked of the hook and uploaded on `copy` while the current group's
    /// kernels ran ([`prefetch_on`]): its pages are mapped, and its parameters have landed
    /// once the event has.
    ahead: Option<(ParamGroup, CudaEvent)>,
    prefetch: bool,
    /// The stream of the uploads ahead, made at the first.
    copy: Option<Arc<CudaStream>>,
}

impl Drop for Groups<'_> {
    /// An upload ahead that a failed pass never waited for lands before its pages can go.
    fn drop(&mut self) {
        if let Some(c) = &self.copy {
            let _ = c.synchronize();
        }
    }
}

/// Whether a group's release first asks the hook for the next group's parameters, maps its
/// pages and uploads them on a stream of their own, so that the driver's gather, its copies
/// on the host and the upload overlap the kernels still running on the released group; the
/// next group's kernels wait for the upload's event. `VET_STAGE3_PREFETCH=0` turns it off
/// (the next group is asked for and uploaded when it is filled, after the released group's
/// kernels). The bits are the same either way.
pub(crate) fn prefetch_on() -> bool {
    std::env::var("VET_STAGE3_PREFETCH").map_or(true, |v| v != "0")
}

impl<'a> Groups<'a> {
    pub(crate) fn new(m: &'a Model, grads: &'a Buf, hook: &'a mut dyn ParamHook) -> Groups<'a> {
        Groups {
            groups: ParamGroup::all(&m.cfg)
                .into_iter()
                .map(|g| group(m, g))
                .collect(),
            m,
            grads,
            hook,
            fills: 0,
            held: 0,
            peak: 0,
            order: ParamGroup::fill_order(m.cfg.n_layer),
            ahead: None,
            prefetch: prefetch_on(),
            copy: None,
        }
    }

    /// The group's parameters from the hook, with their shapes.
    fn ask(&mut self, g: ParamGroup) -> Result<Vec<Tensor<f32>>> {
        let gr = &self.groups[g.index(self.m.cfg.n_layer)];
        let mut t: Vec<Tensor<f32>> = gr.slots.iter().map(|(_, s)| Tensor::zeros(s)).collect();
        self.hook.fill(g, &mut t)?;
        Ok(t)
    }

    fn numel(&self, g: ParamGroup) -> usize {
        let gr = &self.groups[g.index(self.m.cfg.n_layer)];
        gr.ranges.iter().map(|r| r.len()).sum()
    }

    /// Maps the group's ranges in the parameters and the shadow, and queues the upload of its
    /// parameters `t` on `stream`.
    fn map_and_upload(&self, g: ParamGroup, t: &[Tensor<f32>], stream: &CudaStream) -> Result<()> {
        let m = self.m;
        let gr = &self.groups[g.index(m.cfg.n_layer)];
        for r in &gr.ranges {
            m.params.map(4 * r.start..4 * r.end)?;
            if let Some(s) = &m.shadow {
                s.map(2 * r.start..2 * r.end)?;
            }
        }
        for ((off, _), t) in gr.slots.iter().zip(t) {
            // From pageable memory: staged by the driver before this returns, so `t` may go
            // right after.
            m.params.write_on(stream, *off, &t.data)?;
        }
        Ok(())
    }

    /// Maps the group's ranges in the parameters and the shadow, fills them from the hook (or
    /// waits for the upload ahead) and casts them into the shadow; in the backward also maps
    /// and zeroes its gradient.
    fn fill(&mut self, g: ParamGroup) -> Result<()> {
        let m = self.m;
        let backward = self.fills > m.cfg.n_layer;
        self.fills += 1;
        let asked = match self.ahead.take() {
            Some((a, ev)) if a == g => {
                m.dev
                    .stream
                    .wait(&ev)
                    .map_err(|e| m.dev.err("waiting for an upload", e))?;
                false
            }
            Some((a, _)) => {
                return Err(m.dev.err(
                    "stage 3 layer by layer",
                    format!("{a:?} was uploaded ahead, {g:?} was filled"),
                ))
            }
            None => {
                let t = self.ask(g)?;
                self.map_and_upload(g, &t, &m.dev.stream)?;
                true
            }
        };
        let gr = &self.groups[g.index(m.cfg.n_layer)];
        if let Some(s) = &m.shadow {
            for r in &gr.ranges {
                let p = CastLowpF32 {
                    src: Ptr::new(m.params.at::<f32>(r.start)),
                    ld: 1,
                    rows: r.len() as i64,
                    cols: 1,
                    dst: PtrMut::new(s.at::<u16>(r.start)),
                    mode: m.lp_mode(),
                };
                // SAFETY: both ranges were mapped, above or by the upload ahead: `r.len()` f32
                // of the parameters and as many u16 of the shadow.
                unsafe { cast_lowp(&m.dev, &p) }?;
            }
        }
        // A prefetched group counts as held from when it was asked for.
        let mut n = if asked { self.numel(g) } else { 0 };
        if backward {
            let gr = &self.groups[g.index(m.cfg.n_layer)];
            for r in &gr.ranges {
                self.grads.map(4 * r.start..4 * r.end)?;
                self.grads.zero_bytes(4 * r.start..4 * r.end)?;
            }
            n += self.numel(g);
        }
        self.held += n;
        self.peak = self.peak.max(self.held);
        Ok(())
    }

    /// Waits for the kernels that read the group, unmaps its parameters and tells the hook.
    /// First (with [`prefetch_on`]) the next group is asked for and uploaded ahead.
    fn release(&mut self, g: ParamGroup) -> Result<()> {
        let m = self.m;
        if self.prefetch && self.ahead.is_none() {
            if let Some(&next) = self.order.get(self.fills) {
                // The kernels of `g` are still running: the next group's gather, and its
                // upload on a stream of its own, overlap them.
                let t = self.ask(next)?;
                let copy = match &self.copy {
                    Some(c) => c.clone(),
                    None => {
                        let c = m
                            .dev
                            .ctx
                            .new_stream()
                            .map_err(|e| m.dev.err("creating a stream", e))?;
                        self.copy = Some(c.clone());
                        c
                    }
                };
                self.map_and_upload(next, &t, &copy)?;
                let ev = m
                    .dev
                    .ctx
                    .new_event(None)
                    .and_then(|ev| ev.record(&copy).map(|()| ev))
                    .map_err(|e| m.dev.err("recording an upload", e))?;
                self.held += self.numel(next);
                self.peak = self.peak.max(self.held);
                self.ahead = Some((next, ev));
            }
        }
        m.dev.sync()?;
        for r in &self.groups[g.index(m.cfg.n_layer)].ranges {
            m.params.unmap(4 * r.start..4 * r.end)?;
            if let Some(s) = &m.shadow {
                s.unmap(2 * r.start..2 * r.end)?;
            }
        }
        self.held -= self.numel(g);
        self.hook.release(g)
    }

    /// Reads the group's final gradient out, hands it to the hook and unmaps it.
    fn grads(&mut self, g: ParamGroup) -> Result<()> {
        let m = self.m;
        let gr = &self.groups[g.index(m.cfg.n_layer)];
        let t = gr.read(self.grads)?;
        for r in &gr.ranges {
            self.grads.unmap(4 * r.start..4 * r.end)?;
        }
        self.held -= self.numel(g);
        self.hook.gradients(g, &t.iter().collect::<Vec<_>>())
    }

    /// What the passes call at each [`Phase`].
    pub(crate) fn on(&mut self, p: Phase) -> Result<()> {
        match p {
            Phase::Fill(g) => self.fill(g),
            Phase::Release(g) => self.release(g),
            Phase::Grads(g) => self.grads(g),
        }
    }
}
