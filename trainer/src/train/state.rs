//! Training checkpoints: the model directory (loadable by transformers as is) plus
//! `optimizer.safetensors` (AdamW moments `m.<name>` / `v.<name>` and the step count) and
//! `trainer_state.json` (step, data position, loss scaler, the run config).
//!
//! They live in `OUT/checkpoints/step-NNNNNNNN`, written atomically; the last `keep_last` are
//! kept, and an older one is deleted only after a newer one is complete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use reference::engine::{params_from_named, OptimizerState};
use reference::io::{read_tensors, write_tensors, TensorOut};
use reference::{MambaConfig, Params, TrainingEngine};
use serde::{Deserialize, Serialize};

use super::loss_scale::DynamicLossScaler;
use super::run_config::RunConfig;
use crate::checkpoint::{save_dir_atomically, write_model_files};
use crate::data::loader::Position;

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// Where the data source continues.
    pub data_position: Position,
    pub loss_scaler: Option<DynamicLossScaler>,
    /// Steps skipped for a non-finite loss or gradient, in total.
    pub skipped_steps: u64,
    /// AdamW's own step count (bias correction), saved with the moments.
    #[serde(default)]
    pub adam_step: u64,
    /// The run config in force (saved as TOML text so it reads like the run directory's copy).
    pub config_toml: String,
}

/// `OUT/checkpoints`.
pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

/// The directory of the checkpoint after `step` steps.
pub fn step_dir(out_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(out_dir).join(format!("step-{step:08}"))
}

/// Every complete training checkpoint under `out_dir`, oldest first.
pub fn list(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoints_dir(out_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if e.path().join("trainer_state.json").is_file() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Makes `out_dir` ready for a fresh run (no `--resume`). Checkpoints of an earlier run there
/// would be continued by a later `--resume`, and `keep_last` would prune this run's own in their
/// favour: so refuse, naming them, unless `overwrite`, which removes them and the earlier run's
/// `metrics.jsonl`, saying so.
pub fn claim_for_fresh_run(out_dir: &Path, overwrite: bool) -> Result<()> {
    let found = list(out_dir)?;
    if found.is_empty() {
        return Ok(());
    }
    if !overwrite {
        const SHOWN: usize = 3;
        let mut names: Vec<String> = found
            .iter()
            .rev()
            .take(SHOWN)
            .map(|(_, d)| d.display().to_string())
            .collect();
        if found.len() > SHOWN {
            names.push(format!("and {} older", found.len() - SHOWN));
        }
        bail!(
            "{} already holds checkpoints of another run ({}): continue that run with --resume, \
             give this one a new --out-dir, or pass --overwrite to delete them",
            out_dir.display(),
            names.join(", ")
        );
    }
    for (_, dir) in &found {
        eprintln!("--overwrite: removing checkpoint {}", dir.display());
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing old checkpoint {}", dir.display()))?;
    }
    let metrics = out_dir.join("metrics.jsonl");
    if metrics.is_file() {
        eprintln!("--overwrite: removing {}", metrics.display());
        std::fs::remove_file(&metrics)
            .with_context(|| format!("removing {}", metrics.display()))?;
    }
    Ok(())
}

/// Saves the engine's weights and optimizer state with `state` as `OUT/checkpoints/step-N`,
/// then deletes all but the newest `keep_last`.
pub fn save(
    out_dir: &Path,
    cfg: &MambaConfig,
    engine: &dyn TrainingEngine,
    tokenizer: Option<&Path>,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    save_with(
        out_dir,
        cfg,
        engine,
        tokenizer,
        state,
        keep_last,
        |_| Ok(()),
    )
}

/// [`save`], with `extra` writing more files into the checkpoint's temporary directory before
/// it is renamed into place (the carried states of stateful training).
pub fn save_with(
    out_dir: &Path,
    cfg: &MambaConfig,
    engine: &dyn TrainingEngine,
    tokenizer: Option<&Path>,
    state: &TrainerState,
    keep_last: usize,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = step_dir(out_dir, state.step);
    let params: Params<f32> = params_from_named(cfg, &engine.parameters()?)?;
    let opt = engine.optimizer_state()?;
    save_dir_atomically(&dir, |tmp| {
        write_model_files(tmp, cfg, &params, tokenizer)?;
        let mut tensors = Vec::new();
        for (prefix, named) in [("m", &opt.m), ("v", &opt.v)] {
            for (name, t) in named {
                tensors.push((
                    format!("{prefix}.{name}"),
                    TensorOut::F32 {
                        shape: t.shape.clone(),
                        data: t.data.clone(),
                    },
                ));
            }
        }
        write_tensors(&tmp.join("optimizer.safetensors"), &tensors)?;
        let state = TrainerState {
            adam_step: opt.step,
            ..state.clone()
        };
        let json = serde_json::to_string_pretty(&state)?;
        reference::fs::atomic_write(&tmp.join("trainer_state.json"), json.as_bytes())?;
        extra(tmp)
    })?;
    let all = list(out_dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep_last.max(1))) {
        std::fs::remove_dir_all(old)
            .with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(dir)
}

/// Reads a training checkpoint's optimizer state and trainer state.
pub fn load(dir: &Path, cfg: &MambaConfig) -> Result<(OptimizerState, TrainerState)> {
    let path = dir.join("optimizer.safetensors");
    let floats = read_tensors(&path)?;
    let mut m = Vec::new();
    let mut v = Vec::new();
    for (name, t) in floats {
        if let Some(n) = name.strip_prefix("m.") {
            m.push((n.to_string(), t));
        } else if let Some(n) = name.strip_prefix("v.") {
            v.push((n.to_string(), t));
        }
    }
    // read_tensors sorts by name; the engine wants canonical order.
    let order: Vec<String> = reference::param_specs(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let sort = |x: &mut Vec<(String, reference::Tensor<f32>)>| {
        x.sort_by_key(|(n, _)| order.iter().position(|o| o == n).unwrap_or(usize::MAX))
    };
    sort(&mut m);
    sort(&mut v);
    if m.len() != order.len() || v.len() != order.len() {
        bail!(
            "{}: holds {} / {} moments for {} parameters",
            path.display(),
            m.len(),
            v.len(),
            order.len()
        );
    }
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("reading {}", state_path.display()))?;
    let state: TrainerState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", state_path.display()))?;
    let _ = RunConfig::parse(&state.config_toml)
        .with_context(|| format!("{}: config_toml", state_path.display()))?;
    Ok((
        OptimizerState {
            step: state.adam_step,
            m,
            v,
        },
        state,
    ))
}
