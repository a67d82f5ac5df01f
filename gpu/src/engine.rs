//! `GpuEngine`: the model on one CUDA device, with one private part per job: the weights and
//! the device ([`Model`]), training ([`Training`]: gradients, AdamW moments, the training
//! workspace), inference (its workspace) and decoding ([`Decoder`]). `reference::Engine` is
//! implemented in `api.rs`.

use std::sync::Arc;

use reference::{Error, MambaConfig, Params};

use crate::cuda::{Buf, Dev};
use crate::decode::Decoder;
use crate::kernels::{scan_chunk_for, KernelShape};
use crate::layout::Layout;
use crate::model::Model;
use crate::ops::adamw::NORM_BLOCKS;
use crate::work::Work;
use crate::{GpuOptions, Precision};

/// The model on one CUDA device.
pub struct GpuEngine {
    pub(crate) model: Model,
    pub(crate) train: Training,
    pub(crate) infer_ws: Option<Work>,
    pub(crate) decoder: Decoder,
}

/// Training's state: gradients and AdamW moments in flat f32 buffers (the layout's offsets),
/// the gradient norm's scratch, the training workspace.
pub(crate) struct Training {
    pub(crate) grads: Buf,
    /// AdamW's moments `m` and `v`, allocated at first use ([`GpuEngine::moments`]).
    pub(crate) moments: Option<(Buf, Buf)>,
    pub(crate) opt_step: u64,
    /// Σ grad_scale since `zero_grad`: the loss scale fp16 mode divides out in the step.
    pub(crate) grad_scale_sum: f64,
    pub(crate) norm_part: Buf,
    pub(crate) norm_out: Buf,
    pub(crate) ws: Option<Work>,
    /// The final state's gradient of stateful training (`crate::carry`).
    pub(crate) carry: crate::carry::CarryGrad,
    /// ZeRO stages 1–2 on the device (`crate::zero`): the moments hold this chunk only.
    pub(crate) shard: Option<crate::zero::ShardOn>,
    /// The most parameter and gradient elements the last layer-by-layer pass held at once
    /// (`crate::layered`).
    pub(crate) layered_peak: Option<usize>,
    /// Whether ZeRO stage 3 may run layer by layer here ([`GpuEngine::set_layered`]).
    pub(crate) layered_on: bool,
    /// The gradients were summed over the ranks during the last backward
    /// (`TrainingEngine::loss_and_backward_summed`; `Some(scatter)`), until `zero_grad`.
    pub(crate) summed: Option<bool>,
}

/// Whether a new engine steps ZeRO stage 3 layer by layer (`crate::layered`): opt-in with
/// `VET_GPU_LAYERED=1` until the path has run on a device (it was written and tested on no GPU
/// yet: `trainer/tests/gpu_zero.rs` holds it to stage 2's bits and turns it on itself).
/// Without it, stage 3 gathers the whole model into the engine for each step, as before.
pub fn layered_default() -> bool {
    std::env::var("VET_GPU_LAYERED").is_ok_and(|v| v == "1")
}

/// What the kernels support of `cfg`.
fn check_config(cfg: &MambaConfig) -> std::result::Result<(), String> {
    if cfg.d_state == 0 || cfg.d_state > 32 {
        return Err(format!("d_state {} is not supported (1..=32)", cfg.d_state));
    }
    if cfg.d_conv == 0 || cfg.d_conv > 16 {
        return Err(format!("d_conv {} is not supported (1..=16)", cfg.d_conv));
    }
    if cfg.n_layer == 0 {
        return Err("a model with no layers".into());
    }
    Ok(())
}

impl GpuEngine {
    /// Uploads `params` to device `opts.ordinal`.
    pub fn new(
        cfg: &MambaConfig,
        params: Params<f32>,
        opts: &GpuOptions,
    ) -> reference::Result<GpuEngine> {
        let device = format!("cuda:{}", opts.ordinal);
        let unsupported = |msg: String| Error::Device {
            device: device.clone(),
            msg,
        };
        check_config(cfg).map_err(unsupported)?;
        let d_state_pad = cfg.d_state.next_power_of_two();
        let shape = KernelShape {
            d_state_pad,
            d_conv: cfg.d_conv,
            chunk: scan_chunk_for(d_state_pad)?,
        };
        let dev = Arc::new(Dev::open(opts.ordinal, shape, &crate::ops::all_kernels())?);
        let layout = Layout::new(cfg);
        let numel = layout.numel;
        let mut flat = Vec::with_capacity(numel);
        for t in params.tensors() {
            flat.extend_from_slice(&t.data);
        }
        if flat.len() != numel {
            return Err(unsupported(format!(
                "parameters hold {} values, the config {numel}",
                flat.len()
            )));
        }
        let params_buf = dev.upload(&flat)?;
        drop(flat);
        let shadow = match opts.precision {
            Precision::F32 => None,
            _ => Some(dev.alloc(2 * numel)?),
        };
        let train = Training {
            grads: dev.zeros(4 * numel)?,
            moments: None,
            opt_step: 0,
            grad_scale_sum: 0.0,
            norm_part: dev.alloc(8 * NORM_BLOCKS)?,
            norm_out: dev.alloc(8)?,
            ws: None,
            carry: Default::default(),
            shard: None,
            layered_peak: None,
            layered_on: layered_default(),
            summed: None,
        };
        let model = Model {
            cfg: cfg.clone(),
            precision: opts.precision,
            shape,
            params: params_buf,
            shadow,
            q8: None,
            layout,
            dev,
        };
        model.refresh_shadow()?;
        model.dev.sync()?;
        Ok(GpuEngine {
            model,
            train,
            infer_ws: None,
            decoder: Decoder::default(),
        })
    }

    /// AdamW's moments `m` and `v` (device addresses), allocated as zeros at first use:
    /// `numel` f32 each, or the chunk's length once the optimizer is sharded
    /// (`crate::zero`). A run whose optimizer lives in host memory (ZeRO with
    /// `offload_optimizer`) never allocates them.
    pub(crate) fn moments(&mut self) -> reference::Result<(u64, u64)> {
        if self.train.moments.is_none() {
            let n = self
                .train
                .shard
                .as_ref()
                .map_or(self.model.layout.numel, |s| s.range.len());
            let dev = &self.model.dev;
            self.train.moments = Some((dev.zeros(4 * n)?, dev.zeros(4 * n)?));
        }
        let (m, v) = self.train.moments.as_ref().expect("allocated above");
        Ok((m.ptr, v.ptr))
    }

    /// Layer by layer (ZeRO stage 3, `crate::layered`): the parameters, their shadow and the
    /// gradients become paged buffers with nothing mapped, so only the groups a pass is using
    /// take memory. The int8 copy and the decode step's graph (which hold the old addresses)
    /// go too. Nothing to do when already paged.
    pub(crate) fn go_paged(&mut self) -> reference::Result<()> {
        if self.model.params.is_paged() {
            return Ok(());
        }
        self.fresh_paged()
    }

    /// New paged buffers with nothing mapped, in place of whatever the engine held (after a
    /// failed layered pass, the pages it left mapped go with the old ones).
    pub(crate) fn fresh_paged(&mut self) -> reference::Result<()> {
        self.model.q8 = None;
        self.new_buffers(true)
    }

    /// Back from [`GpuEngine::go_paged`]: plain buffers for the whole model (the parameters
    /// and shadow undefined until written, the gradients zero), and no training workspace.
    /// Nothing to do when whole.
    pub(crate) fn go_whole(&mut self) -> reference::Result<()> {
        if !self.model.params.is_paged() {
            return Ok(());
        }
        // The training workspace goes too (the next training pass makes it again): an
        // evaluation or a checkpoint of a model that only trains layer by layer would
        // otherwise need the whole model and the activations at once.
        self.train.ws = None;
        self.new_buffers(false)
    }

    /// New parameter, shadow and gradient buffers, paged (nothing mapped) or plain (gradients
    /// zeroed), after the old ones' kernels are done; the decode graph, which holds the old
    /// addresses, goes. Each old buffer is freed as its new one takes its place (a paged one
    /// holds next to no memory, so the whole model is never there twice).
    fn new_buffers(&mut self, paged: bool) -> reference::Result<()> {
        let dev = self.model.dev.clone();
        dev.sync()?;
        self.decoder.forget_graph();
        let numel = self.model.layout.numel;
        let make = |bytes: usize| {
            if paged {
                dev.paged(bytes)
            } else {
                dev.alloc(bytes)
            }
        };
        self.model.params = make(4 * numel)?;
        self.train.grads = make(4 * numel)?;
        if !paged {
            self.train.grads.zero()?;
        }
        if self.model.shadow.is_some() {
            self.model.shadow = Some(make(2 * numel)?);
        }
        Ok(())
    }

    /// Whether ZeRO stage 3 steps layer by layer on this engine (`crate::layered`; the default
    /// is [`layered_default`]). Off: `loss_and_backward_layered` declines and the driver
    /// gathers the whole model for each step.
    pub fn set_layered(&mut self, on: bool) {
        self.train.layered_on = on;
    }

    /// The most parameter and gradient elements the last layer-by-layer step held at once
    /// (`None` before one).
    pub fn layered_peak(&self) -> Option<usize> {
        self.train.layered_peak
    }

    /// Where every parameter lives in the flat buffers.
    pub fn layout(&self) -> &Layout {
        &self.model.layout
    }

    /// Activation bytes per token of the training workspace (after a `loss_and_backward`).
    pub fn train_activation_bytes_per_token(&self) -> Option<f64> {
        self.train
            .ws
            .as_ref()
            .map(|w| w.activation_bytes_per_token())
    }

    /// Bytes per token one layer keeps for the backward (after a `loss_and_backward`).
    pub fn train_layer_bytes_per_token(&self) -> Option<f64> {
        self.train.ws.as_ref().map(|w| w.layer_bytes_per_token())
    }

    /// Device memory this engine holds, in bytes, by part: f32 parameters, their
    /// low-precision shadow, gradients, AdamW moments, the activations the training
    /// workspace's layers keep, the rest of that workspace, the inference workspace.
    pub fn memory_breakdown(&self) -> Vec<(&'static str, usize)> {
        let t = &self.train;
        let (kept, rest) = t.ws.as_ref().map_or((0, 0), |w| w.bytes());
        let infer = self.infer_ws.as_ref().map_or(0, |w| {
            let (a, b) = w.bytes();
            a + b
        });
        vec![
            ("parameters f32", self.model.params.resident_bytes()),
            (
                "bf16/fp16 shadow",
                self.model.shadow.as_ref().map_or(0, |s| s.resident_bytes()),
            ),
            ("gradients", t.grads.resident_bytes()),
            (
                "AdamW m + v",
                t.moments.as_ref().map_or(0, |(m, v)| m.bytes + v.bytes),
            ),
            ("activations kept", kept),
            (
                "training scratch",
                rest + t.norm_part.bytes + t.norm_out.bytes,
            ),
            ("inference workspace", infer),
            (
                "int8 weights",
                self.model.q8.as_ref().map_or(0, |q| q.bytes()),
            ),
        ]
    }

    /// Per-label device times of the launches since the last [`GpuEngine::profile_reset`]
    /// and their span in ms; `None` unless `VET_PROFILE=1` was set when the engine opened.
    pub fn profile_rows(&self) -> Option<(Vec<crate::profile::ProfileRow>, f64)> {
        self.model.dev.prof.as_ref().map(|p| p.rows())
    }

    /// Forgets the launches profiled so far.
    pub fn profile_reset(&self) {
        if let Some(p) = &self.model.dev.prof {
            p.reset();
        }
    }

    /// Sets how batch-1 decode steps run their layers: `None` layer by layer, `Some(0)` in
    /// the persistent kernel with one block per SM, `Some(n)` with `n` blocks. The default is
    /// one block per SM from d_model 1024 (`VET_DECODE_PERSIST=1` at every width, `0` never);
    /// a model or device it does not take runs layer by layer anyway.
    pub fn set_persistent_decode(&mut self, blocks: Option<usize>) {
        self.decoder.set_persistent(blocks);
    }

    /// The persistent decode kernel's clock marks of the last step: block 0's time (ns) at
    /// `gpu::ops::decode_layers::DL_TRACE` points of every layer; `None` unless `VET_DECODE_TRACE=1`.
    pub fn decode_trace(&self) -> reference::Result<Option<Vec<u64>>> {
        self.decoder.trace()
    }

    /// Whether the last decode step ran its layers in the persistent kernel.
    pub fn decode_ran_persistent(&self) -> bool {
        self.decoder.ran_persistent()
    }

    /// Whether decode steps replay a CUDA graph.
    pub fn decode_uses_graph(&self) -> bool {
        self.decoder.uses_graph()
    }
}
