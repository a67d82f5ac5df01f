//! Setting a run up: the model to start from, its tokenizer, the data source, the schedule, the
//! loss scaler, and the checks of a `--resume`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use reference::{MambaConfig, Params};

use super::deepspeed::Precision;
use super::loss_scale::DynamicLossScaler;
use super::resume;
use super::run_config::{preset, RunConfig, ScheduleKind, Stage};
use super::schedule::{Schedule, WarmupType};
use super::source::Source;
use crate::checkpoint;
use crate::data::verify::ShardCheck;
use serde_json::json;
use std::io::Write;

/// fp16 trains with DeepSpeed's dynamic loss scaler; other precisions need none.
pub(super) fn new_loss_scaler(cfg: &RunConfig) -> Option<DynamicLossScaler> {
    (cfg.optim.precision == Precision::Fp16)
        .then(|| DynamicLossScaler::new(cfg.optim.loss_scale.clone().unwrap_or_default()))
}

pub(super) fn schedule(cfg: &RunConfig, total: u64) -> Schedule {
    let o = &cfg.optim;
    match o.schedule {
        ScheduleKind::Constant => Schedule::Constant { lr: o.lr },
        ScheduleKind::Cosine => Schedule::Cosine {
            min_lr: o.min_lr,
            max_lr: o.lr,
            warmup_steps: o.warmup_steps,
            total_steps: total,
        },
        ScheduleKind::WarmupDecay => Schedule::WarmupDecay {
            min_lr: o.min_lr,
            max_lr: o.lr,
            warmup_steps: o.warmup_steps,
            total_steps: total,
            warmup_type: WarmupType::Log,
        },
    }
}

/// The tokenizer: `data.tokenizer`, else the starting checkpoint's.
pub(super) fn tokenizer_path(cfg: &RunConfig) -> Result<PathBuf> {
    if let Some(t) = &cfg.data.tokenizer {
        return Ok(t.clone());
    }
    if let Some(from) = cfg.model.from.as_ref().or(cfg.model.init_from.as_ref()) {
        return checkpoint::tokenizer_file(from, None)
            .context("no `data.tokenizer` in the run config, so the checkpoint's is used");
    }
    bail!("no tokenizer: set `data.tokenizer` (or start from a checkpoint that has tokenizer.json)")
}

/// The model a preset names, its vocabulary fitted to the tokenizer's for the small presets.
pub(super) fn preset_model(cfg: &RunConfig, tok_vocab: usize) -> Result<MambaConfig> {
    let name = cfg.model.preset.as_deref().unwrap_or_default();
    let mut mcfg = preset(name)?;
    if matches!(name, "quickstart" | "tiny" | "small") {
        mcfg.vocab_size = tok_vocab.div_ceil(8) * 8;
        mcfg.pad_vocab_size_multiple = 8;
    }
    Ok(mcfg)
}

/// The model to start from: a checkpoint, or a preset initialised from the seed.
pub(super) fn starting_model(
    cfg: &RunConfig,
    tok_vocab: usize,
) -> Result<(MambaConfig, Params<f32>)> {
    if let Some(from) = &cfg.model.from {
        let ck = checkpoint::load(from)?;
        return Ok((ck.config, ck.params));
    }
    if let Some(dir) = &cfg.model.init_from {
        let ck =
            checkpoint::load(dir).with_context(|| format!("model.init_from {}", dir.display()))?;
        if cfg.model.preset.is_some() {
            let want = preset_model(cfg, tok_vocab)?;
            checkpoint::check_same_model(&want, &ck.config).with_context(|| {
                format!(
                    "model.init_from {}: the checkpoint is not the run config's model",
                    dir.display()
                )
            })?;
        }
        return Ok((ck.config, ck.params));
    }
    let mcfg = preset_model(cfg, tok_vocab)?;
    Ok((
        mcfg.clone(),
        reference::init::init_params(&mcfg, cfg.train.seed),
    ))
}

/// `--resume` from `dir` (holding model `ck_model`): refuses a run config that now describes
/// another model, warns about any other change ([`resume::check`]).
pub(super) fn check_resume(
    cfg: &RunConfig,
    dir: &Path,
    ck_model: &MambaConfig,
    tok_vocab: usize,
) -> Result<()> {
    let new_model = match (&cfg.model.from, &cfg.model.init_from, &cfg.model.preset) {
        (Some(from), _, _) | (None, Some(from), None) => {
            MambaConfig::load(&from.join("config.json")).ok()
        }
        _ => preset_model(cfg, tok_vocab).ok(),
    };
    let saved = resume::saved_config_toml(dir)?;
    if let Some(w) = resume::check(dir, ck_model, new_model.as_ref(), &saved, &cfg.to_toml()?)? {
        eprintln!("{w}");
    }
    Ok(())
}

pub(super) fn open_source(
    cfg: &RunConfig,
    split_train: bool,
    tok: &tokenizers::Tokenizer,
    tok_sha: &str,
    vocab: usize,
) -> Result<Source> {
    open_source_ranked(cfg, split_train, tok, tok_sha, vocab, (0, 1))
}

/// [`open_source`] for data-parallel rank `rank.0` of `rank.1`: token shards are sliced by
/// rank, and so are QA batches (each rank its block of every global batch).
pub(super) fn open_source_ranked(
    cfg: &RunConfig,
    split_train: bool,
    tok: &tokenizers::Tokenizer,
    tok_sha: &str,
    vocab: usize,
    (rank, world): (usize, usize),
) -> Result<Source> {
    let t = &cfg.train;
    match cfg.stage {
        Stage::Pretrain | Stage::Eval if cfg.data.manifest.is_some() => {
            let manifest = cfg.data.manifest.as_deref().unwrap_or(Path::new(""));
            let mut lc = t.loader_config();
            lc.rank = rank;
            lc.world_size = world;
            // Stateful training reads streams; validation here stays on plain windows (a
            // carrying run validates on streams through `open_val_streams` where it can).
            let open = if split_train && !t.carry_state.is_off() {
                Source::streams
            } else {
                Source::tokens
            };
            let source = open(
                manifest,
                if split_train { "train" } else { "val" },
                lc,
                Some(tok_sha),
                vocab,
            )?;
            match t.carry_state.windows() {
                Some(k) if split_train => source.interleave(t.carry_streams, k),
                _ => Ok(source),
            }
        }
        _ => {
            let path = if split_train {
                cfg.data.qa_train.as_deref()
            } else {
                cfg.data.qa_eval.as_deref()
            };
            let path =
                path.context("no QA file for this stage: set `data.qa_train` / `data.qa_eval`")?;
            let qc = crate::data::qa::QaConfig {
                rank,
                world_size: world,
                ..t.qa_config()
            };
            Source::qa(path, tok, qc)
        }
    }
}

/// The validation split as streams (each row consecutive windows of whole documents, no
/// interleaving) for a stateful run's validation with the state carried; `None` when the run
/// does not carry state, reads QA pairs, or the split holds fewer documents than one batch has
/// rows (its validation then stays on plain windows).
pub(super) fn open_val_streams(
    cfg: &RunConfig,
    tok_sha: &str,
    vocab: usize,
) -> Result<Option<Source>> {
    let Some(manifest) = cfg.data.manifest.as_deref() else {
        return Ok(None);
    };
    if cfg.train.carry_state.is_off() || !matches!(cfg.stage, Stage::Pretrain | Stage::Eval) {
        return Ok(None);
    }
    let (m, _) = crate::data::manifest::Manifest::load(manifest)?;
    if m.split("val")?.docs < cfg.train.batch as u64 {
        return Ok(None);
    }
    Source::streams(
        manifest,
        "val",
        cfg.train.loader_config(),
        Some(tok_sha),
        vocab,
    )
    .map(Some)
}

/// Opens `metrics.jsonl` for appending; after a resume, first writes the `resumed_from` line:
/// rows after that step are from the interrupted run and are written again, so readers drop
/// the earlier rows past it (plot does).
pub(super) fn open_metrics(
    path: &Path,
    resumed_from: Option<&(u64, PathBuf)>,
) -> Result<std::fs::File> {
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if let Some((step, dir)) = resumed_from {
        let line = json!({"resumed_from": step, "checkpoint": dir.display().to_string()});
        writeln!(metrics, "{line}")?;
    }
    Ok(metrics)
}

/// The background check of the token shards a pretraining run reads (train, and val when
/// `[eval]` is set); none for QA data.
pub(super) fn start_shard_check(cfg: &RunConfig) -> Result<Option<ShardCheck>> {
    let Some(manifest) = cfg.data.manifest.as_deref() else {
        return Ok(None);
    };
    if cfg.stage != Stage::Pretrain {
        return Ok(None);
    }
    let splits: &[&str] = if cfg.eval.is_some() {
        &["train", "val"]
    } else {
        &["train"]
    };
    ShardCheck::spawn(manifest, splits).map(Some)
}
