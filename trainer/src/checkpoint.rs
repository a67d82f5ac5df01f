//! Checkpoint directories: `config.json` + `model.safetensors` + `tokenizer.json`, the layout
//! `transformers.MambaForCausalLM.from_pretrained` reads.
//!
//! A directory is written beside its destination under a temporary name, every file fsync'd,
//! then renamed into place, so a crash never leaves a half-written checkpoint.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use reference::io::{load_params, save_params, SaveDtype};
use reference::{MambaConfig, Params};

/// A model read from a checkpoint directory.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: MambaConfig,
    pub params: Params<f32>,
}

/// Reads `dir/config.json` and `dir/model.safetensors`.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    if dir.is_file() {
        bail!(
            "checkpoint {}: is a file; expected a checkpoint directory (config.json, model.safetensors, tokenizer.json)",
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!("checkpoint {}: no such directory", dir.display());
    }
    let config = MambaConfig::load(&dir.join("config.json"))
        .with_context(|| format!("loading checkpoint {}", dir.display()))?;
    let params = load_params(&dir.join("model.safetensors"), &config)
        .with_context(|| format!("loading checkpoint {}", dir.display()))?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        config,
        params,
    })
}

/// Writes `config.json`, `model.safetensors` (f32) and a copy of `tokenizer` (when given) to
/// `dir`, atomically (see [`save_dir_atomically`]).
pub fn save(
    dir: &Path,
    cfg: &MambaConfig,
    params: &Params<f32>,
    tokenizer: Option<&Path>,
) -> Result<()> {
    save_dir_atomically(dir, |tmp| write_model_files(tmp, cfg, params, tokenizer))
}

/// The model files of a checkpoint, written into `dir`.
pub fn write_model_files(
    dir: &Path,
    cfg: &MambaConfig,
    params: &Params<f32>,
    tokenizer: Option<&Path>,
) -> Result<()> {
    cfg.save(&dir.join("config.json"))?;
    save_params(&dir.join("model.safetensors"), cfg, params, SaveDtype::F32)?;
    if let Some(tok) = tokenizer {
        let bytes = fs::read(tok).with_context(|| format!("reading {}", tok.display()))?;
        reference::io::atomic_write(&dir.join("tokenizer.json"), &bytes)?;
    }
    Ok(())
}

/// Builds a directory with `write` inside `.NAME.tmp` beside `dir`, fsyncs it, then renames it
/// over `dir`. On any error the temporary directory is removed and `dir` is left as it was.
pub fn save_dir_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir
        .file_name()
        .with_context(|| format!("checkpoint path {} has no final component", dir.display()))?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{}.tmp", name.to_string_lossy()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    let result = (|| -> Result<()> {
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        write(&tmp).with_context(|| format!("writing checkpoint {}", dir.display()))?;
        fs::File::open(&tmp).and_then(|d| d.sync_all()).ok();
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
        }
        fs::rename(&tmp, dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        fs::File::open(parent).and_then(|d| d.sync_all()).ok();
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}
