//! Reading a DeepSpeed `ds_config.json` like the original project's.
//!
//! Read: `fp16` and `bf16` blocks, `optimizer` (AdamW / Adam with its `params`), `scheduler`
//! (`WarmupDecayLR`, `WarmupLR`), `gradient_accumulation_steps`, `gradient_clipping`,
//! `train_micro_batch_size_per_gpu`, `train_batch_size` (checked), `zero_optimization` (every
//! key DeepSpeed documents for stages 0–3 and CPU offload, into [`ZeroConfig`]),
//! `comms_logger` and `wall_clock_breakdown`. `"auto"` (or absence) leaves a value to the run config and the flags. Every other
//! field is listed in [`DsConfig::unsupported`] so the caller reports it instead of silently
//! ignoring it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::loss_scale::LossScaleConfig;
/// The precision lives beside the run config; re-exported for this module's callers.
pub use super::run_config::Precision;
use super::run_config::{RunConfig, ScheduleKind};
use super::schedule::WarmupType;
use crate::dist::config::ZeroConfig;
use crate::dist::ds::{read_logging, read_zero};

/// How fp16 scales the loss.
#[derive(Clone, Debug, PartialEq)]
pub enum LossScaling {
    Dynamic(LossScaleConfig),
    Static(f64),
}

/// DeepSpeed's `scheduler.params` (each `None` when absent or `"auto"`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DsScheduler {
    /// `WarmupDecayLR` (true) or `WarmupLR` (false: no decay).
    pub decay: bool,
    pub min_lr: Option<f64>,
    pub max_lr: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub total_steps: Option<u64>,
    pub warmup_type: Option<WarmupType>,
}

/// What a DeepSpeed config says; `None` = `"auto"` or absent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DsConfig {
    pub micro_batch: Option<usize>,
    pub train_batch_size: Option<usize>,
    pub grad_accum: Option<usize>,
    /// `Some(0.0)` disables clipping.
    pub grad_clip: Option<f64>,
    pub precision: Option<Precision>,
    pub loss_scaling: Option<LossScaling>,
    pub lr: Option<f64>,
    pub betas: Option<(f64, f64)>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    pub scheduler: Option<DsScheduler>,
    pub zero_stage: Option<u8>,
    /// `zero_optimization` (with the top-level `comms_logger` and `wall_clock_breakdown`),
    /// typed; [`ZeroConfig::no_effect`] lists what does nothing here.
    pub zero: Option<ZeroConfig>,
    /// Dotted paths of fields this trainer does not act on.
    pub unsupported: Vec<String>,
}

fn is_auto(v: &Value) -> bool {
    v.as_str() == Some("auto")
}

pub(crate) fn num(v: Option<&Value>, key: &str) -> Result<Option<f64>> {
    match v {
        None => Ok(None),
        Some(v) if is_auto(v) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("`{key}` must be a number or \"auto\", got {v}")),
    }
}

pub(crate) fn int(v: Option<&Value>, key: &str) -> Result<Option<u64>> {
    match v {
        None => Ok(None),
        Some(v) if is_auto(v) => Ok(None),
        Some(v) => v.as_u64().map(Some).with_context(|| {
            format!("`{key}` must be a non-negative integer or \"auto\", got {v}")
        }),
    }
}

pub(crate) fn enabled(block: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match block.get("enabled") {
        None => Ok(Some(false)),
        Some(v) if is_auto(v) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .with_context(|| format!("`{key}.enabled` must be true, false or \"auto\"")),
    }
}

pub(crate) fn unknown(
    block: &Map<String, Value>,
    known: &[&str],
    prefix: &str,
    out: &mut Vec<String>,
) {
    for k in block.keys().filter(|k| !known.contains(&k.as_str())) {
        out.push(format!("{prefix}{k}"));
    }
}

pub(crate) fn object<'a>(v: &'a Value, key: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .with_context(|| format!("`{key}` must be an object"))
}

impl DsConfig {
    /// Reads and interprets `path`.
    pub fn load(path: &Path) -> Result<DsConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading DeepSpeed config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("DeepSpeed config {}", path.display()))
    }

    /// Interprets the JSON text of a DeepSpeed config.
    pub fn parse(text: &str) -> Result<DsConfig> {
        let root: Value = serde_json::from_str(text).context("not valid JSON")?;
        let root = object(&root, "the config")?;
        let mut ds = DsConfig {
            micro_batch: int(
                root.get("train_micro_batch_size_per_gpu"),
                "train_micro_batch_size_per_gpu",
            )?
            .map(|v| v as usize),
            train_batch_size: int(root.get("train_batch_size"), "train_batch_size")?
                .map(|v| v as usize),
            grad_accum: int(
                root.get("gradient_accumulation_steps"),
                "gradient_accumulation_steps",
            )?
            .map(|v| v as usize),
            grad_clip: num(root.get("gradient_clipping"), "gradient_clipping")?,
            ..DsConfig::default()
        };
        ds.read_precision(root)?;
        if let Some(opt) = root.get("optimizer") {
            ds.read_optimizer(object(opt, "optimizer")?)?;
        }
        if let Some(s) = root.get("scheduler") {
            ds.read_scheduler(object(s, "scheduler")?)?;
        }
        if let Some(z) = root.get("zero_optimization") {
            let z = object(z, "zero_optimization")?;
            let zc = read_zero(z, &mut ds.unsupported)?;
            ds.zero_stage = Some(zc.stage);
            ds.zero = Some(zc);
        }
        read_logging(root, &mut ds)?;
        let known = [
            "train_micro_batch_size_per_gpu",
            "train_batch_size",
            "gradient_accumulation_steps",
            "gradient_clipping",
            "fp16",
            "bf16",
            "optimizer",
            "scheduler",
            "zero_optimization",
            "comms_logger",
            "wall_clock_breakdown",
        ];
        unknown(root, &known, "", &mut ds.unsupported);
        Ok(ds)
    }

    fn read_precision(&mut self, root: &Map<String, Value>) -> Result<()> {
        let fp16 = root.get("fp16").map(|v| object(v, "fp16")).transpose()?;
        let bf16 = root.get("bf16").map(|v| object(v, "bf16")).transpose()?;
        let fp16_on = fp16.map(|b| enabled(b, "fp16")).transpose()?.flatten();
        let bf16_on = bf16.map(|b| enabled(b, "bf16")).transpose()?.flatten();
        if fp16_on == Some(true) && bf16_on == Some(true) {
            bail!("`fp16.enabled` and `bf16.enabled` are both true; choose one");
        }
        self.precision = match (fp16_on, bf16_on) {
            (Some(true), _) => Some(Precision::Fp16),
            (_, Some(true)) => Some(Precision::Bf16),
            (Some(false), Some(false)) => Some(Precision::F32),
            _ => None,
        };
        if let Some(b) = fp16 {
            let d = LossScaleConfig::default();
            let static_scale = num(b.get("loss_scale"), "fp16.loss_scale")?.unwrap_or(0.0);
            self.loss_scaling = Some(if static_scale > 0.0 {
                LossScaling::Static(static_scale)
            } else {
                LossScaling::Dynamic(LossScaleConfig {
                    initial_scale_power: int(
                        b.get("initial_scale_power"),
                        "fp16.initial_scale_power",
                    )?
                    .map_or(d.initial_scale_power, |v| v as u32),
                    window: int(b.get("loss_scale_window"), "fp16.loss_scale_window")?
                        .unwrap_or(d.window),
                    hysteresis: int(b.get("hysteresis"), "fp16.hysteresis")?
                        .map_or(d.hysteresis, |v| v as u32),
                    min_scale: num(b.get("min_loss_scale"), "fp16.min_loss_scale")?
                        .unwrap_or(d.min_scale),
                })
            });
            let known = [
                "enabled",
                "loss_scale",
                "initial_scale_power",
                "loss_scale_window",
                "hysteresis",
                "min_loss_scale",
            ];
            unknown(b, &known, "fp16.", &mut self.unsupported);
        }
        if let Some(b) = bf16 {
            unknown(b, &["enabled"], "bf16.", &mut self.unsupported);
        }
        Ok(())
    }

    fn read_optimizer(&mut self, opt: &Map<String, Value>) -> Result<()> {
        let ty = opt.get("type").and_then(Value::as_str).unwrap_or("AdamW");
        if !matches!(ty.to_ascii_lowercase().as_str(), "adamw" | "adam") {
            bail!("`optimizer.type` is {ty:?}; only AdamW (and DeepSpeed's Adam, which is AdamW by default) is supported");
        }
        if let Some(p) = opt.get("params") {
            let p = object(p, "optimizer.params")?;
            self.lr = num(p.get("lr"), "optimizer.params.lr")?;
            self.eps = num(p.get("eps"), "optimizer.params.eps")?;
            self.weight_decay = num(p.get("weight_decay"), "optimizer.params.weight_decay")?;
            self.betas = match p.get("betas") {
                None => None,
                Some(v) if is_auto(v) => None,
                Some(v) => match v
                    .as_array()
                    .map(|a| a.iter().map(Value::as_f64).collect::<Vec<_>>())
                {
                    Some(b) if b.len() == 2 && b.iter().all(Option::is_some) => {
                        Some((b[0].unwrap_or(0.9), b[1].unwrap_or(0.999)))
                    }
                    _ => bail!(
                        "`optimizer.params.betas` must be [beta1, beta2] or \"auto\", got {v}"
                    ),
                },
            };
            unknown(
                p,
                &["lr", "betas", "eps", "weight_decay"],
                "optimizer.params.",
                &mut self.unsupported,
            );
        }
        unknown(
            opt,
            &["type", "params"],
            "optimizer.",
            &mut self.unsupported,
        );
        Ok(())
    }

    fn read_scheduler(&mut self, s: &Map<String, Value>) -> Result<()> {
        let ty = s.get("type").and_then(Value::as_str).unwrap_or("");
        let decay = match ty {
            "WarmupDecayLR" => true,
            "WarmupLR" => false,
            other => bail!("`scheduler.type` is {other:?}; supported: WarmupDecayLR, WarmupLR"),
        };
        let mut out = DsScheduler {
            decay,
            ..DsScheduler::default()
        };
        if let Some(p) = s.get("params") {
            let p = object(p, "scheduler.params")?;
            out.min_lr = num(p.get("warmup_min_lr"), "scheduler.params.warmup_min_lr")?;
            out.max_lr = num(p.get("warmup_max_lr"), "scheduler.params.warmup_max_lr")?;
            out.warmup_steps = int(
                p.get("warmup_num_steps"),
                "scheduler.params.warmup_num_steps",
            )?;
            out.total_steps = int(p.get("total_num_steps"), "scheduler.params.total_num_steps")?;
            out.warmup_type = match p.get("warmup_type").and_then(Value::as_str) {
                None | Some("auto") => None,
                Some("log") => Some(WarmupType::Log),
                Some("linear") => Some(WarmupType::Linear),
                Some(other) => bail!(
                    "`scheduler.params.warmup_type` is {other:?}; expected \"log\" or \"linear\""
                ),
            };
            let known = [
                "warmup_min_lr",
                "warmup_max_lr",
                "warmup_num_steps",
                "total_num_steps",
                "warmup_type",
                "last_batch_iteration",
            ];
            unknown(p, &known, "scheduler.params.", &mut self.unsupported);
        }
        unknown(s, &["type", "params"], "scheduler.", &mut self.unsupported);
        self.scheduler = Some(out);
        Ok(())
    }
}

/// Applies a DeepSpeed config to a run config: every value it sets (not `"auto"`) wins over
/// the TOML. Returns the fields that are not supported, for the caller to report.
pub fn apply_deepspeed(cfg: &mut RunConfig, ds: &DsConfig) -> Result<Vec<String>> {
    apply_deepspeed_world(cfg, ds, 1)
}

/// [`apply_deepspeed`] for a data-parallel job of `world` ranks: `train_batch_size` must be
/// micro batch × accumulation × `world`, as DeepSpeed defines it. The `zero_optimization`
/// settings are in `ds.zero`, for [`crate::dist::train_distributed`].
pub fn apply_deepspeed_world(
    cfg: &mut RunConfig,
    ds: &DsConfig,
    world: usize,
) -> Result<Vec<String>> {
    let t = &mut cfg.train;
    if let Some(m) = ds.micro_batch {
        t.batch = m;
    }
    if let Some(a) = ds.grad_accum {
        t.grad_accum = a;
    }
    if let Some(total) = ds.train_batch_size {
        // train_batch_size = micro batch × accumulation × world size.
        let global = t
            .batch
            .checked_mul(t.grad_accum)
            .and_then(|n| n.checked_mul(world));
        if Some(total) != global {
            let gpus = if world == 1 { "GPU" } else { "GPUs" };
            bail!(
                "DeepSpeed `train_batch_size` {total} != train_micro_batch_size_per_gpu {} × gradient_accumulation_steps {} × {world} {gpus}",
                t.batch,
                t.grad_accum
            );
        }
    }
    let o = &mut cfg.optim;
    if let Some(c) = ds.grad_clip {
        o.grad_clip = c;
    }
    if let Some(p) = ds.precision {
        o.precision = p;
    }
    if let Some(lr) = ds.lr {
        o.lr = lr;
    }
    if let Some((b1, b2)) = ds.betas {
        o.betas = [b1, b2];
    }
    if let Some(e) = ds.eps {
        o.eps = e;
    }
    if let Some(w) = ds.weight_decay {
        o.weight_decay = w;
    }
    if let Some(LossScaling::Dynamic(ls)) = &ds.loss_scaling {
        o.loss_scale = Some(ls.clone());
    }
    if let Some(LossScaling::Static(s)) = &ds.loss_scaling {
        bail!("a static fp16 `loss_scale` ({s}) is not supported; use 0 (dynamic)");
    }
    if let Some(s) = &ds.scheduler {
        if !s.decay {
            bail!("`scheduler.type` WarmupLR (no decay) is not supported; use WarmupDecayLR");
        }
        o.schedule = ScheduleKind::WarmupDecay;
        if let Some(v) = s.min_lr {
            o.min_lr = v;
        }
        if let Some(v) = s.max_lr {
            o.lr = v;
        }
        if let Some(v) = s.warmup_steps {
            o.warmup_steps = v;
        }
        if s.warmup_type == Some(WarmupType::Linear) {
            bail!("`scheduler.params.warmup_type` linear is read but runs are log warm-up only for now");
        }
        if let Some(v) = s.total_steps {
            cfg.train.steps = Some(v);
            cfg.train.epochs = None;
        }
    }
    cfg.validate()?;
    let mut out = ds.unsupported.clone();
    if world == 1 {
        // One process: ZeRO and its logs act only in a distributed run (`dist`).
        out.extend(ds.zero.iter().flat_map(ZeroConfig::set_keys));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::config::OffloadDevice;

    const ORIGINAL: &str = r#"{
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0,
        "fp16": {"enabled": true, "loss_scale": 0, "loss_scale_window": 500, "initial_scale_power": 12,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": false},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto",
                      "warmup_num_steps": 2000, "total_num_steps": "auto"}},
        "zero_optimization": {"stage": 2, "overlap_comm": true},
        "steps_per_print": 10,
        "wall_clock_breakdown": false
    }"#;

    #[test]
    fn reads_the_original_projects_config_and_reports_the_rest() {
        let ds = DsConfig::parse(ORIGINAL).unwrap();
        assert_eq!(ds.micro_batch, None);
        assert_eq!(ds.grad_accum, Some(4));
        assert_eq!(ds.grad_clip, Some(1.0));
        assert_eq!(ds.precision, Some(Precision::Fp16));
        let want = LossScaleConfig {
            initial_scale_power: 12,
            window: 500,
            hysteresis: 2,
            min_scale: 1.0,
        };
        assert_eq!(ds.loss_scaling, Some(LossScaling::Dynamic(want)));
        assert_eq!(ds.lr, None);
        assert_eq!(ds.betas, Some((0.9, 0.95)));
        assert_eq!(ds.weight_decay, Some(0.1));
        let s = ds.scheduler.clone().unwrap();
        assert!(s.decay);
        assert_eq!(
            (s.min_lr, s.max_lr, s.warmup_steps, s.total_steps),
            (Some(0.0), None, Some(2000), None)
        );
        assert_eq!(ds.zero_stage, Some(2));
        let z = ds.zero.clone().unwrap();
        assert!(z.overlap_comm && !z.wall_clock_breakdown);
        assert!(z.no_effect(true).iter().any(|n| n.contains("overlap_comm")));
        assert!(!z
            .no_effect(false)
            .iter()
            .any(|n| n.contains("overlap_comm")));
        assert_eq!(ds.unsupported, vec!["steps_per_print"]);
    }

    #[test]
    fn reads_every_zero_key_and_reports_those_without_effect() {
        let ds = DsConfig::parse(
            r#"{"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e5, "overlap_comm": false,
                "contiguous_gradients": true, "offload_optimizer": {"device": "cpu", "pin_memory": true},
                "offload_param": {"device": "cpu"}, "stage3_prefetch_bucket_size": 1000,
                "stage3_param_persistence_threshold": 64, "stage3_max_live_parameters": 1e9,
                "stage3_gather_16bit_weights_on_model_save": true, "sub_group_size": 1e9},
                "comms_logger": {"enabled": true}, "wall_clock_breakdown": true}"#,
        )
        .unwrap();
        let z = ds.zero.clone().unwrap();
        assert_eq!(z.stage, 3);
        assert_eq!(z.reduce_bucket_size, 500_000);
        assert_eq!(z.offload_optimizer, OffloadDevice::Cpu);
        assert_eq!(z.offload_param, OffloadDevice::Cpu);
        assert_eq!(z.stage3_prefetch_bucket_size, 1000);
        assert_eq!(z.stage3_param_persistence_threshold, 64);
        assert!(z.comms_logger && z.wall_clock_breakdown);
        assert!(z.stage3_gather_16bit_weights_on_model_save);
        assert_eq!(ds.unsupported, vec!["zero_optimization.sub_group_size"]);
        let ne = z.no_effect(false).join("\n");
        for k in [
            "offload_param",
            "stage3_prefetch_bucket_size",
            "stage3_gather_16bit",
        ] {
            assert!(ne.contains(k), "{k} not reported: {ne}");
        }
        let e =
            DsConfig::parse(r#"{"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}"#)
                .unwrap_err();
        assert!(
            format!("{e:#}").contains("offload_optimizer.device"),
            "{e:#}"
        );
    }

    #[test]
    fn train_batch_size_counts_every_rank() {
        let ds = DsConfig::parse(
            r#"{"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}"#,
        )
        .unwrap();
        let toml = "stage = \"pretrain\"\nout_dir = \"x\"\n[model]\npreset = \"quickstart\"\n[data]\nmanifest = \"m.json\"\n[train]\nbatch = 1\nseq_len = 8\nsteps = 1\n[optim]\nlr = 1e-3\n";
        let mut cfg = RunConfig::parse(toml).unwrap();
        assert!(apply_deepspeed_world(&mut cfg, &ds, 4).is_ok());
        let e = apply_deepspeed_world(&mut cfg, &ds, 3).unwrap_err();
        assert!(format!("{e:#}").contains("× 3 GPUs"), "{e:#}");
        assert!(apply_deepspeed(&mut cfg, &ds).is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = DsConfig::parse(r#"{"gradient_accumulation_steps": "four"}"#).unwrap_err();
        assert!(
            format!("{e:#}").contains("gradient_accumulation_steps"),
            "{e:#}"
        );
        let e = DsConfig::parse(r#"{"optimizer": {"type": "Lamb"}}"#).unwrap_err();
        assert!(format!("{e:#}").contains("optimizer.type"), "{e:#}");
        let e = DsConfig::parse(r#"{"fp16": {"enabled": true}, "bf16": {"enabled": true}}"#)
            .unwrap_err();
        assert!(format!("{e:#}").contains("both true"), "{e:#}");
        let e = DsConfig::parse(r#"{"scheduler": {"type": "OneCycle"}}"#).unwrap_err();
        assert!(format!("{e:#}").contains("scheduler.type"), "{e:#}");
    }

    #[test]
    fn bf16_and_static_fp16_scaling() {
        let ds = DsConfig::parse(r#"{"bf16": {"enabled": true}}"#).unwrap();
        assert_eq!(ds.precision, Some(Precision::Bf16));
        let ds = DsConfig::parse(r#"{"fp16": {"enabled": true, "loss_scale": 128}}"#).unwrap();
        assert_eq!(ds.loss_scaling, Some(LossScaling::Static(128.0)));
        let ds = DsConfig::parse(r#"{"fp16": {"enabled": "auto"}}"#).unwrap();
        assert_eq!(ds.precision, None);
    }
}
