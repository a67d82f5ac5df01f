//! The TOML run config of `vet-train --config run.toml`.
//!
//! ```toml
//! stage = "pretrain"                # pretrain | finetune | eval
//! out_dir = "runs/quickstart"
//! [model]
//! preset = "tiny"                   # or: from = "runs/x/checkpoints/final" (a checkpoint dir)
//! [data]
//! manifest = "runs/data/manifest.json"   # pretrain / eval: token shards
//! # qa_train = "fixtures/data/qa_train.jsonl"; qa_eval = "..."   (finetune / eval)
//! tokenizer = "fixtures/tokenizer/tokenizer.json"
//! [train]
//! batch = 8
//! seq_len = 256
//! grad_accum = 1
//! steps = 1000                      # or epochs = 2
//! seed = 0
//! # carry_state = "detach"        # stateful training: true / "detach", or k (windows back-propagated)
//! # carry_streams = 1             # stateful training: groups of `batch` streams taken in turn
//! [optim]
//! lr = 3e-3
//! min_lr = 3e-4
//! schedule = "cosine"               # cosine | warmup_decay | constant
//! warmup_steps = 50
//! betas = [0.9, 0.95]
//! eps = 1e-8
//! weight_decay = 0.1
//! grad_clip = 1.0                   # 0 disables clipping
//! precision = "f32"                 # f32 | bf16 | fp16
//! [checkpoint]
//! every = 500
//! keep_last = 3
//! [eval]
//! every = 200
//! batches = 20
//! ```
//! Unknown keys are errors that name them, so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use reference::{MambaConfig, NormKind};
use serde::{Deserialize, Serialize};

use super::carry::CarryState;

/// Training precision (`[optim] precision` in the TOML, `fp16` / `bf16` in a DeepSpeed
/// config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    Fp16,
}

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Pretrain,
    Finetune,
    Eval,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A named size (see [`preset`]).
    pub preset: Option<String>,
    /// A checkpoint directory to start from.
    pub from: Option<PathBuf>,
    /// Weights to start from (any layout the loader reads: Hugging Face, sharded, mamba_ssm's
    /// pytorch_model.bin), with a fresh optimizer. With `preset` the checkpoint's config
    /// must match the preset's; alone, the checkpoint's config is the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub manifest: Option<PathBuf>,
    pub qa_train: Option<PathBuf>,
    pub qa_eval: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub batch: usize,
    pub seq_len: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub steps: Option<u64>,
    pub epochs: Option<u64>,
    #[serde(default)]
    pub seed: u64,
    /// Stateful training over long documents (see [`super::carry`]); off by default.
    #[serde(default, skip_serializing_if = "CarryState::is_off")]
    pub carry_state: CarryState,
    /// Stateful training: interleaved groups of streams, each `batch` rows, the steps taking
    /// them in turn (see [`crate::data::stream`]); 1 (the default): one group.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub carry_streams: usize,
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

fn one() -> usize {
    1
}

impl TrainSection {
    /// The shard loader's settings for this run (one process: rank 0 of 1).
    pub fn loader_config(&self) -> crate::data::loader::LoaderConfig {
        crate::data::loader::LoaderConfig {
            batch: self.batch,
            seq_len: self.seq_len,
            seed: self.seed,
            rank: 0,
            world_size: 1,
        }
    }

    /// The QA batcher's settings for this run (one process, packed rows).
    pub fn qa_config(&self) -> crate::data::qa::QaConfig {
        crate::data::qa::QaConfig {
            batch: self.batch,
            seq_len: self.seq_len,
            seed: self.seed,
            rank: 0,
            world_size: 1,
            pack: true,
        }
    }
}

/// Which schedule `[optim]` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Cosine,
    WarmupDecay,
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default = "cosine")]
    pub schedule: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "betas")]
    pub betas: [f64; 2],
    #[serde(default = "eps")]
    pub eps: f64,
    #[serde(default = "wd")]
    pub weight_decay: f64,
    #[serde(default = "clip")]
    pub grad_clip: f64,
    #[serde(default = "f32p")]
    pub precision: Precision,
    /// fp16 dynamic loss scaling (DeepSpeed's defaults when absent).
    #[serde(default)]
    pub loss_scale: Option<super::loss_scale::LossScaleConfig>,
}

fn cosine() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn eps() -> f64 {
    1e-8
}
fn wd() -> f64 {
    0.1
}
fn clip() -> f64 {
    1.0
}
fn f32p() -> Precision {
    Precision::F32
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    pub every: u64,
    #[serde(default = "three")]
    pub keep_last: usize,
}

fn three() -> usize {
    3
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    pub every: u64,
    #[serde(default = "twenty")]
    pub batches: usize,
    /// QA pairs answered by the eval stage (all when absent).
    #[serde(default)]
    pub qa_limit: Option<usize>,
    /// Longest greedy answer, in tokens.
    #[serde(default = "sixty_four")]
    pub max_new_tokens: usize,
}

fn sixty_four() -> usize {
    64
}

fn twenty() -> usize {
    20
}

/// A whole run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub stage: Stage,
    pub out_dir: PathBuf,
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    pub train: TrainSection,
    pub optim: OptimSection,
    pub checkpoint: Option<CheckpointSection>,
    pub eval: Option<EvalSection>,
}

impl RunConfig {
    /// Reads and validates a TOML run config.
    pub fn load(path: &Path) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading run config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("run config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<RunConfig> {
        let cfg: RunConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML (what is saved in the run directory).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Checks values and cross-field rules, naming the key.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.batch == 0 || t.seq_len == 0 || t.grad_accum == 0 {
            bail!("`train.batch`, `train.seq_len` and `train.grad_accum` must be > 0");
        }
        if t.carry_streams == 0 || (t.carry_streams > 1 && t.carry_state.is_off()) {
            bail!(
                "`train.carry_streams` is {}: give a number of groups of streams >= 1, with \
                 `train.carry_state` on",
                t.carry_streams
            );
        }
        if t.steps.is_some() == t.epochs.is_some() && self.stage != Stage::Eval {
            bail!("give exactly one of `train.steps` and `train.epochs`");
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr.is_finite()) || o.min_lr < 0.0 || o.min_lr > o.lr {
            bail!(
                "`optim.lr` must be > 0 and `optim.min_lr` within [0, lr]; got lr {} min_lr {}",
                o.lr,
                o.min_lr
            );
        }
        if !(0.0..1.0).contains(&o.betas[0]) || !(0.0..1.0).contains(&o.betas[1]) || o.eps <= 0.0 {
            bail!("`optim.betas` must be in [0, 1) and `optim.eps` > 0");
        }
        if o.weight_decay < 0.0 || o.grad_clip < 0.0 {
            bail!("`optim.weight_decay` and `optim.grad_clip` must be >= 0");
        }
        match (&self.model.preset, &self.model.from, &self.model.init_from) {
            (Some(p), None, _) => {
                preset(p)?;
            }
            (None, Some(_), None) | (None, None, Some(_)) => {}
            (_, Some(_), Some(_)) => bail!(
                "`model.from` and `model.init_from` both set: `from` starts from a checkpoint, \
                 `init_from` takes its weights; give one"
            ),
            _ => bail!("`model` needs exactly one of `preset` and `from` (or `init_from`)"),
        }
        let d = &self.data;
        match self.stage {
            Stage::Pretrain if d.manifest.is_none() => {
                bail!("stage pretrain needs `data.manifest`")
            }
            Stage::Finetune if d.qa_train.is_none() => {
                bail!("stage finetune needs `data.qa_train`")
            }
            Stage::Finetune if self.model.from.is_none() && self.model.init_from.is_none() => {
                bail!("stage Finetune starts from a checkpoint: set `model.from` or `model.init_from`")
            }
            Stage::Eval if self.model.from.is_none() => {
                bail!(
                    "stage {:?} starts from a checkpoint: set `model.from`",
                    self.stage
                )
            }
            _ => {}
        }
        if let Some(c) = &self.checkpoint {
            if c.every == 0 || c.keep_last == 0 {
                bail!("`checkpoint.every` and `checkpoint.keep_last` must be > 0");
            }
        }
        Ok(())
    }
}

/// Model sizes by name. `vocab` is the tokenizer's size for presets that follow it
/// (`quickstart`, `tiny`, `small`), fixed for the published shapes. `small` (d_model 512, 8
/// layers, about 15.7 M parameters with the bundled tokenizer) is for experiments on one GPU.
pub fn preset(name: &str) -> Result<MambaConfig> {
    let c = match name {
        "quickstart" => MambaConfig::new(64, 2, 4096),
        "tiny" => MambaConfig::new(128, 4, 4096),
        "small" => MambaConfig::new(512, 8, 4096),
        "130m" => MambaConfig::new(768, 24, 50280),
        "370m" => MambaConfig::new(1024, 48, 50280),
        "1.4b-hf" => MambaConfig::new(2048, 48, 50280),
        "1.3b-ln" => {
            let mut c = MambaConfig::new(2048, 48, 32000);
            c.norm = NormKind::Layer;
            c.pad_vocab_size_multiple = 8;
            c
        }
        other => {
            bail!("unknown model preset {other:?} (quickstart, tiny, small, 130m, 370m, 1.4b-hf, 1.3b-ln)")
        }
    };
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        stage = "pretrain"
        out_dir = "runs/x"
        [model]
        preset = "tiny"
        [data]
        manifest = "runs/data/manifest.json"
        [train]
        batch = 4
        seq_len = 64
        steps = 10
        [optim]
        lr = 1e-3
    "#;

    #[test]
    fn minimal_config_gets_defaults_and_round_trips() {
        let c = RunConfig::parse(MIN).unwrap();
        assert_eq!(c.train.grad_accum, 1);
        assert_eq!(c.optim.betas, [0.9, 0.95]);
        assert_eq!(c.optim.schedule, ScheduleKind::Cosine);
        assert_eq!(c.optim.precision, Precision::F32);
        assert_eq!(RunConfig::parse(&c.to_toml().unwrap()).unwrap(), c);
    }

    #[test]
    fn typos_and_bad_values_are_errors_that_name_the_key() {
        let e = RunConfig::parse(&MIN.replace("seq_len", "seqlen")).unwrap_err();
        assert!(format!("{e:#}").contains("seqlen"), "{e:#}");
        let e = RunConfig::parse(&MIN.replace("batch = 4", "batch = 0")).unwrap_err();
        assert!(format!("{e:#}").contains("train.batch"), "{e:#}");
        let e = RunConfig::parse(&MIN.replace("preset = \"tiny\"", "preset = \"7b\"")).unwrap_err();
        assert!(format!("{e:#}").contains("7b"), "{e:#}");
        let e = RunConfig::parse(&MIN.replace("steps = 10", "")).unwrap_err();
        assert!(format!("{e:#}").contains("train.steps"), "{e:#}");
    }

    #[test]
    fn the_original_projects_two_models_have_their_shapes() {
        let hf = preset("1.4b-hf").unwrap();
        assert_eq!(
            (hf.d_model, hf.n_layer, hf.vocab_size, hf.norm),
            (2048, 48, 50280, NormKind::Rms)
        );
        let params = reference::io_limits::param_count(&hf);
        assert!(
            (1_370_000_000..1_380_000_000).contains(&params),
            "1.4b-hf has {params} parameters"
        );
        let ln = preset("1.3b-ln").unwrap();
        assert_eq!(
            (ln.d_model, ln.n_layer, ln.vocab_size, ln.norm),
            (2048, 48, 32000, NormKind::Layer)
        );
    }

    #[test]
    fn the_small_preset_has_the_size_its_doc_gives() {
        let small = preset("small").unwrap();
        assert_eq!((small.d_model, small.n_layer), (512, 8));
        let params = reference::io_limits::param_count(&small);
        assert!(
            (15_600_000..15_800_000).contains(&params),
            "small has {params} parameters"
        );
    }
}
