//! The `zero_optimization` settings (DeepSpeed's names and defaults), typed, and which of
//! them have no effect in this trainer (printed, never silently dropped). What stage 3 does
//! with parameters (layer by layer on the CPU engine, the whole model on the others) is in
//! the module docs of [`crate::dist`].

/// Where `offload_optimizer` / `offload_param` put their state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OffloadDevice {
    #[default]
    None,
    Cpu,
}

/// DeepSpeed's `zero_optimization` block plus the top-level `comms_logger` and
/// `wall_clock_breakdown`. Sizes are in elements, as DeepSpeed counts them.
#[derive(Clone, Debug, PartialEq)]
pub struct ZeroConfig {
    pub stage: u8,
    /// Elements per gradient bucket. Stages 0–2 on the CPU engine: the groups' gradients (a
    /// layer, or the embedding, final norm and head) are packed whole, in the order the
    /// backward finishes them, into buckets of about this many elements (a group larger than
    /// this is a bucket by itself), and each bucket is one collective; on the GPU engine with
    /// the optimizer on the device and `overlap_comm`, each bucket's sum is queued on NCCL's
    /// stream as the backward finishes its layers. Where the gradients are reduced on the host
    /// after the backward (stage 3 with `carry_state`, engines that cannot hand out gradients
    /// during the backward) the flat buffer is cut into pieces of this many elements. No
    /// effect where the GPU engine sums its own flat buffer after the backward in one
    /// collective (stages 0–2 without `offload_optimizer` or `overlap_comm`) or at stage 3
    /// layer by layer (the CPU engine, the GPU engine with `VET_GPU_LAYERED=1`: one collective
    /// per group).
    pub reduce_bucket_size: usize,
    /// Stages 0–2 reducing on the host (the CPU engine; the GPU engine with
    /// `offload_optimizer`): each full bucket is summed over the ranks on a communication
    /// thread while the engine's backward goes on (off: in line, in the backward, as each
    /// bucket fills). Stages 0–2 on the GPU engine with the optimizer on the device: each
    /// bucket's NCCL sum is queued on NCCL's stream while the backward goes on (off: one sum
    /// after the backward). Stage 3 layer by layer (the CPU engine, the GPU engine with
    /// `VET_GPU_LAYERED=1`): each group's reduce-scatter is queued on the communication
    /// thread, which runs the parameter gathers too, in order. The same bits either way at
    /// world size 1 and 2. No effect with `carry_state` (see [`ZeroConfig::no_effect`]).
    pub overlap_comm: bool,
    pub contiguous_gradients: bool,
    pub offload_optimizer: OffloadDevice,
    pub offload_param: OffloadDevice,
    pub stage3_prefetch_bucket_size: usize,
    pub stage3_param_persistence_threshold: usize,
    pub stage3_max_live_parameters: usize,
    pub stage3_gather_16bit_weights_on_model_save: bool,
    pub comms_logger: bool,
    pub wall_clock_breakdown: bool,
    /// Host threads for the driver's AdamW (0 = every core).
    pub threads: usize,
    /// The run scales its loss (fp16): the driver keeps the optimizer even at stage 0 (not
    /// a DeepSpeed key; set from the run's precision).
    pub loss_scaled: bool,
}

impl Default for ZeroConfig {
    /// DeepSpeed's defaults.
    fn default() -> Self {
        ZeroConfig {
            stage: 0,
            reduce_bucket_size: 500_000_000,
            overlap_comm: false,
            contiguous_gradients: true,
            offload_optimizer: OffloadDevice::None,
            offload_param: OffloadDevice::None,
            stage3_prefetch_bucket_size: 50_000_000,
            stage3_param_persistence_threshold: 100_000,
            stage3_max_live_parameters: 1_000_000_000,
            stage3_gather_16bit_weights_on_model_save: false,
            comms_logger: false,
            wall_clock_breakdown: false,
            threads: 0,
            loss_scaled: false,
        }
    }
}

impl ZeroConfig {
    /// The stage for `stage`, checked.
    pub fn with_stage(stage: u8) -> Result<ZeroConfig, super::DistError> {
        if stage > 3 {
            return Err(super::DistError::Config(format!(
                "zero_optimization.stage is {stage}; DeepSpeed stages are 0 to 3"
            )));
        }
        Ok(ZeroConfig {
            stage,
            ..ZeroConfig::default()
        })
    }

    /// The keys that ask for something (away from DeepSpeed's defaults), for a one-process
    /// run to report as having no effect.
    pub fn set_keys(&self) -> Vec<String> {
        let d = ZeroConfig::default();
        let z = "zero_optimization.";
        let mut out = Vec::new();
        let mut key = |set: bool, k: &str| {
            if set {
                out.push(k.to_string());
            }
        };
        key(self.stage != d.stage, &format!("{z}stage"));
        key(
            self.offload_optimizer != d.offload_optimizer,
            &format!("{z}offload_optimizer"),
        );
        key(
            self.offload_param != d.offload_param,
            &format!("{z}offload_param"),
        );
        key(self.comms_logger, "comms_logger");
        key(self.wall_clock_breakdown, "wall_clock_breakdown");
        out
    }

    /// Each setting that is on (or away from its default) but changes nothing here, with
    /// why (`carry_state`: the run is stateful, `train.carry_state`); the caller prints these.
    pub fn no_effect(&self, carry_state: bool) -> Vec<String> {
        let d = ZeroConfig::default();
        let mut out = Vec::new();
        if self.overlap_comm && carry_state {
            out.push("zero_optimization.overlap_comm: no effect with carry_state, whose steps sum the gradients after the backward of every window (without carry_state, stages 0-2 sum each bucket while the backward goes on: on the device over NCCL, or on the driver's communication thread)".to_string());
        }
        if self.stage == 3 && self.reduce_bucket_size != d.reduce_bucket_size {
            out.push("zero_optimization.reduce_bucket_size: at stage 3 the CPU engine, and the GPU engine with VET_GPU_LAYERED=1, reduce-scatter each group's gradient in its own collective (the key applies with carry_state and on the GPU engine without it)".to_string());
        }
        if self.contiguous_gradients != d.contiguous_gradients {
            out.push("zero_optimization.contiguous_gradients: gradients are always copied into one flat buffer (at stage 3 on the CPU engine, this rank's flat chunk)".to_string());
        }
        if self.offload_param == OffloadDevice::Cpu {
            out.push("zero_optimization.offload_param: the stage-3 shards live in host memory in the driver anyway; an engine that steps layer by layer (CPU, or GPU with VET_GPU_LAYERED=1, without carry_state) holds one or two layers at a time; otherwise the engine holds every parameter during a step".to_string());
        }
        let s3 = [
            (
                "stage3_prefetch_bucket_size",
                self.stage3_prefetch_bucket_size != d.stage3_prefetch_bucket_size,
            ),
            (
                "stage3_max_live_parameters",
                self.stage3_max_live_parameters != d.stage3_max_live_parameters,
            ),
        ];
        for (k, set) in s3 {
            if self.stage != 3 && set {
                out.push(format!(
                    "zero_optimization.{k}: only stage 3 gathers parameters (stage is {})",
                    self.stage
                ));
            } else if self.stage == 3 {
                out.push(format!("zero_optimization.{k}: no effect with carry_state, which gathers every parameter for each step (the layer-by-layer stage 3 of the CPU engine, and of the GPU engine with VET_GPU_LAYERED=1, uses it)"));
            }
        }
        if self.stage3_gather_16bit_weights_on_model_save {
            out.push("zero_optimization.stage3_gather_16bit_weights_on_model_save: a consolidated f32 model.safetensors is always written".to_string());
        }
        if self.stage == 3 {
            out.push("zero_optimization.stage3_param_persistence_threshold: no parameter stays whole; small tensors are gathered with their layer, in its collective".to_string());
        } else if self.stage3_param_persistence_threshold != d.stage3_param_persistence_threshold {
            out.push(format!(
                "zero_optimization.stage3_param_persistence_threshold: only stage 3 shards parameters (stage is {})",
                self.stage
            ));
        }
        out
    }
}
