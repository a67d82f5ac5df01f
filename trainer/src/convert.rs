//! `vet-train convert`: a checkpoint in any layout the loader reads, written as mamba_ssm's
//! (`config.json` with mamba_ssm's keys + `pytorch_model.bin`, which
//! `MambaLMHeadModel.from_pretrained` loads) or Hugging Face's (`config.json` +
//! `model.safetensors`, sharded above `max_shard_bytes`). `tokenizer.json` is copied when the
//! source has one (or `--tokenizer` names one).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use reference::io::{save_params_torch, SaveDtype, TORCH_FILE};
use reference::{MambaConfig, NormKind};
use serde_json::Value;

use crate::checkpoint::{
    self, check_new_checkpoint_dir, save_dir_atomically, write_model_files_as,
};

/// The layout `convert` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// mamba_ssm's `MambaLMHeadModel` (`pytorch_model.bin`).
    MambaSsm,
    /// Hugging Face `MambaForCausalLM` (`model.safetensors`).
    Hf,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mamba_ssm" | "mamba-ssm" => Ok(Target::MambaSsm),
            "hf" => Ok(Target::Hf),
            _ => Err(format!("--to {s}: expected mamba_ssm or hf")),
        }
    }
}

/// What `convert` does.
pub struct ConvertOptions {
    pub to: Target,
    pub dtype: SaveDtype,
    /// Hugging Face shards ([`reference::io::parse_size`]).
    pub max_shard_bytes: u64,
    /// A tokenizer.json to copy instead of the source's own.
    pub tokenizer: Option<PathBuf>,
    /// Replace a checkpoint already in the output folder.
    pub force: bool,
}

/// mamba_ssm's `config.json`: only the keys its `MambaConfig` dataclass has (it is built with
/// `MambaConfig(**json)`, so any other key is an error there). mamba_ssm fixes the norm's eps
/// at 1e-5 and derives `d_inner = expand * d_model`: a model that differs cannot be written.
pub fn mamba_ssm_config(cfg: &MambaConfig) -> Result<Value> {
    if cfg.norm_eps != 1e-5 {
        bail!(
            "config key `norm_eps` (layer_norm_epsilon) is {}: mamba_ssm's MambaLMHeadModel always uses 1e-5",
            cfg.norm_eps
        );
    }
    if cfg.expand.checked_mul(cfg.d_model) != Some(cfg.d_inner) {
        bail!(
            "config key `intermediate_size` is {}: mamba_ssm derives it as expand * d_model = {}",
            cfg.d_inner,
            cfg.expand * cfg.d_model
        );
    }
    let mut v = cfg.to_mamba_ssm_json();
    if let Some(o) = v.as_object_mut() {
        o.remove("norm_epsilon");
    }
    Ok(v)
}

/// Converts the checkpoint `model` into `out` (written atomically; see
/// [`check_new_checkpoint_dir`] for what may be replaced). Returns the files written.
pub fn convert(model: &Path, out: &Path, o: &ConvertOptions) -> Result<Vec<String>> {
    check_new_checkpoint_dir(out, model, o.force)?;
    let tokenizer = match &o.tokenizer {
        Some(t) => Some(checkpoint::tokenizer_file(model, Some(t))?),
        None => Some(model.join("tokenizer.json")).filter(|t| t.is_file()),
    };
    let ck = checkpoint::load(model)?;
    let cfg = &ck.config;
    let mut files = Vec::new();
    save_dir_atomically(out, |tmp| {
        match o.to {
            Target::MambaSsm => {
                let json = mamba_ssm_config(cfg)?;
                let text = serde_json::to_string_pretty(&json)? + "\n";
                reference::fs::atomic_write(&tmp.join("config.json"), text.as_bytes())?;
                save_params_torch(&tmp.join(TORCH_FILE), cfg, &ck.params, o.dtype)?;
                files = vec!["config.json".to_string(), TORCH_FILE.to_string()];
                if let Some(t) = &tokenizer {
                    std::fs::copy(t, tmp.join("tokenizer.json"))
                        .with_context(|| format!("copying {}", t.display()))?;
                }
            }
            Target::Hf => {
                if cfg.norm == NormKind::Layer {
                    eprintln!(
                        "note: a LayerNorm model: transformers' MambaForCausalLM has no LayerNorm, \
                         so config.json keeps mamba_ssm's keys (Vet-Mamba reads it; transformers does not)"
                    );
                }
                write_model_files_as(
                    tmp,
                    cfg,
                    &ck.params,
                    tokenizer.as_deref(),
                    o.dtype,
                    o.max_shard_bytes,
                )?;
            }
        }
        Ok(())
    })?;
    if files.is_empty() {
        let mut names: Vec<String> = std::fs::read_dir(out)
            .with_context(|| format!("listing {}", out.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        files = names;
    } else if tokenizer.is_some() {
        files.push("tokenizer.json".to_string());
    }
    Ok(files)
}
