//! Checkpoint directories: `config.json` + `model.safetensors` + `tokenizer.json`, the layout
//! `transformers.MambaForCausalLM.from_pretrained` reads. Loading also takes a sharded
//! `model.safetensors.index.json` and mamba_ssm's `pytorch_model.bin`
//! ([`reference::io::checkpoint_layout`] decides which).
//!
//! A directory is written beside its destination under a temporary name, every file fsync'd,
//! then renamed into place, so a crash never leaves a half-written checkpoint.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use reference::io::{
    checkpoint_layout, is_shard_name, load_params, save_params_sharded, Layout, SaveDtype,
    DEFAULT_MAX_SHARD_BYTES,
};
use reference::{MambaConfig, Params};

/// A model read from a checkpoint directory.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: MambaConfig,
    pub params: Params<f32>,
}

/// Checks that `dir` is a checkpoint directory with a `config.json` and weights in one of the
/// layouts [`checkpoint_layout`] knows; the error names what is missing and what was looked
/// for.
pub fn check_dir(dir: &Path) -> Result<Layout> {
    if dir.is_file() {
        bail!(
            "checkpoint {}: is a file; expected a checkpoint directory (config.json and \
             model.safetensors, model.safetensors.index.json or pytorch_model.bin)",
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!("checkpoint {}: no such directory", dir.display());
    }
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!(
            "checkpoint {}: {} is missing (a checkpoint directory holds config.json and the weights)",
            dir.display(),
            config.display()
        );
    }
    Ok(checkpoint_layout(dir)?)
}

/// The tokenizer for the checkpoint `dir`: `explicit` (`--tokenizer FILE`) when given, else
/// `dir/tokenizer.json`. Neither is an error saying that the checkpoint ships no tokenizer
/// (mamba_ssm checkpoints do not: they use GPT-NeoX's) and suggesting `--tokenizer`.
pub fn tokenizer_file(dir: &Path, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(t) = explicit {
        if !t.is_file() {
            bail!("--tokenizer {}: no such file", t.display());
        }
        return Ok(t.to_path_buf());
    }
    let own = dir.join("tokenizer.json");
    if own.is_file() {
        return Ok(own);
    }
    bail!(
        "checkpoint {}: {} is missing: the checkpoint has no tokenizer (mamba_ssm checkpoints \
         ship none; theirs is GPT-NeoX's): pass --tokenizer FILE with the tokenizer.json the \
         model was trained with",
        dir.display(),
        own.display()
    )
}

/// Reads `dir/config.json` and the weights in any layout [`checkpoint_layout`] accepts
/// (`model.safetensors`, sharded, or mamba_ssm's `pytorch_model.bin`). A checkpoint of
/// `vet-train quantize` (int8 or int4) is dequantised to f32 (`q · scale`, the values the CPU
/// tier computes with), with a note on stderr.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let ctx = || format!("loading checkpoint {}", dir.display());
    check_dir(dir).with_context(ctx)?;
    let config = MambaConfig::load(&dir.join("config.json")).with_context(ctx)?;
    let params = match simd::load::stored_quantization(dir).with_context(ctx)? {
        Some(kind) => {
            eprintln!(
                "note: {} holds {}-quantised weights (`vet-train quantize`); this command uses them dequantised to f32",
                dir.display(),
                kind.name()
            );
            simd::load::load_dequantized(dir, &config, kind).with_context(ctx)?
        }
        None => load_params(dir, &config).with_context(ctx)?,
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        config,
        params,
    })
}

/// Checks that `got` (a checkpoint's config) describes the model `want` (a run config's):
/// the first key that differs is named, with both values.
pub fn check_same_model(want: &MambaConfig, got: &MambaConfig) -> Result<()> {
    let keys: [(&str, String, String); 14] = [
        ("d_model", want.d_model.to_string(), got.d_model.to_string()),
        ("n_layer", want.n_layer.to_string(), got.n_layer.to_string()),
        (
            "vocab_size",
            want.vocab_size.to_string(),
            got.vocab_size.to_string(),
        ),
        ("d_state", want.d_state.to_string(), got.d_state.to_string()),
        ("d_conv", want.d_conv.to_string(), got.d_conv.to_string()),
        ("expand", want.expand.to_string(), got.expand.to_string()),
        ("d_inner", want.d_inner.to_string(), got.d_inner.to_string()),
        ("dt_rank", want.dt_rank.to_string(), got.dt_rank.to_string()),
        (
            "norm",
            format!("{:?}", want.norm),
            format!("{:?}", got.norm),
        ),
        (
            "norm_eps",
            want.norm_eps.to_string(),
            got.norm_eps.to_string(),
        ),
        (
            "tie_embeddings",
            want.tie_embeddings.to_string(),
            got.tie_embeddings.to_string(),
        ),
        (
            "use_bias",
            want.use_bias.to_string(),
            got.use_bias.to_string(),
        ),
        (
            "conv_bias",
            want.conv_bias.to_string(),
            got.conv_bias.to_string(),
        ),
        (
            "residual_in_fp32",
            want.residual_in_fp32.to_string(),
            got.residual_in_fp32.to_string(),
        ),
    ];
    for (key, w, g) in keys {
        if w != g {
            bail!("config key `{key}` is {g} in the checkpoint but {w} in the run config");
        }
    }
    Ok(())
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
    write_model_files_as(
        dir,
        cfg,
        params,
        tokenizer,
        SaveDtype::F32,
        DEFAULT_MAX_SHARD_BYTES,
    )
}

/// [`write_model_files`] in `dtype`, split into shards above `max_shard_bytes` as
/// transformers' `save_pretrained(max_shard_size=...)` splits them.
pub fn write_model_files_as(
    dir: &Path,
    cfg: &MambaConfig,
    params: &Params<f32>,
    tokenizer: Option<&Path>,
    dtype: SaveDtype,
    max_shard_bytes: u64,
) -> Result<()> {
    cfg.save(&dir.join("config.json"))?;
    save_params_sharded(dir, cfg, params, dtype, max_shard_bytes)?;
    if let Some(tok) = tokenizer {
        let bytes = fs::read(tok).with_context(|| format!("reading {}", tok.display()))?;
        reference::fs::atomic_write(&dir.join("tokenizer.json"), &bytes)?;
    }
    Ok(())
}

/// Builds a directory with `write` inside `.NAME.tmp` beside `dir`, fsyncs it, then renames it
/// to `dir`. An existing `dir` is first renamed to `.NAME.old`, and that is removed once the new
/// one is in place, file by file, only the files a checkpoint holds ([`CHECKPOINT_FILES`]): the
/// caller checks that `dir` is a checkpoint (see [`check_new_checkpoint_dir`]). On any error the
/// temporary directory is removed and `dir` is left as it was.
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
            let old = parent.join(format!(".{}.old", name.to_string_lossy()));
            if old.exists() {
                remove_checkpoint_dir(&old)?;
            }
            fs::rename(dir, &old)
                .with_context(|| format!("renaming {} to {}", dir.display(), old.display()))?;
            if let Err(e) = fs::rename(&tmp, dir) {
                // Put the old one back: `dir` is as it was.
                let _ = fs::rename(&old, dir);
                return Err(e)
                    .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()));
            }
            if let Err(e) = remove_checkpoint_dir(&old) {
                eprintln!("warning: {e:#}");
            }
        } else {
            fs::rename(&tmp, dir)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        }
        fs::File::open(parent).and_then(|d| d.sync_all()).ok();
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// The files a checkpoint directory may hold: the Hugging Face model files and the training
/// state, and the shards of a sharded checkpoint ([`is_checkpoint_file`]). A folder holding
/// anything else is not one, and no tool here deletes it.
pub const CHECKPOINT_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "optimizer.safetensors",
    "trainer_state.json",
];

/// Whether a file of this name belongs in a checkpoint directory: [`CHECKPOINT_FILES`] or a
/// `model-0000K-of-0000N.safetensors` shard.
pub fn is_checkpoint_file(name: &str) -> bool {
    CHECKPOINT_FILES.contains(&name) || is_shard_name(name)
}

/// Removes a checkpoint directory's files ([`CHECKPOINT_FILES`]) and then the directory; fails,
/// naming them, when it holds anything else, which it leaves alone.
fn remove_checkpoint_dir(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let f = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if is_checkpoint_file(&name) && f.is_file() {
            fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))?;
        }
    }
    let others = foreign_files(dir)?;
    if !others.is_empty() {
        bail!(
            "{} holds files that are not part of a checkpoint ({}): left in place; move them and remove the folder",
            dir.display(),
            others.join(", ")
        );
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// The entries of `dir` that are not checkpoint files (at most a few named, then a count).
fn foreign_files(dir: &Path) -> Result<Vec<String>> {
    const SHOWN: usize = 5;
    let mut out = Vec::new();
    let mut more = 0usize;
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let known = is_checkpoint_file(&name) && e.path().is_file();
        if known {
            continue;
        }
        if out.len() < SHOWN {
            out.push(name);
        } else {
            more += 1;
        }
    }
    if more > 0 {
        out.push(format!("and {more} more"));
    }
    Ok(out)
}

/// `path` made absolute with symbolic links resolved, also when its last components do not
/// exist yet.
fn resolved(path: &Path) -> Result<PathBuf> {
    let mut rest = Vec::new();
    let mut p = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(path)
    };
    loop {
        if let Ok(c) = p.canonicalize() {
            return Ok(rest
                .into_iter()
                .rev()
                .fold(c, |acc: PathBuf, n| acc.join(n)));
        }
        match (p.file_name().map(|n| n.to_os_string()), p.parent()) {
            (Some(n), Some(parent)) => {
                rest.push(n);
                p = parent.to_path_buf();
            }
            _ => bail!("cannot resolve {}", path.display()),
        }
    }
}

/// Checks that a checkpoint made from `source` may be written to `out`:
/// - never `source` itself, nor a folder that contains it;
/// - a missing or empty folder is fine;
/// - a folder holding a checkpoint (only [`CHECKPOINT_FILES`]) is replaced only with `force`;
/// - a folder holding anything else is refused even with `force`: its files are not ours to
///   delete.
pub fn check_new_checkpoint_dir(out: &Path, source: &Path, force: bool) -> Result<()> {
    let (out_r, src_r) = (resolved(out)?, resolved(source)?);
    if src_r.starts_with(&out_r) {
        let what = if src_r == out_r { "is" } else { "contains" };
        bail!(
            "--out {} {what} the source checkpoint {}: writing there would destroy it; choose another folder",
            out.display(),
            source.display()
        );
    }
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("--out {} is a file, not a folder", out.display());
    }
    let others = foreign_files(out)?;
    if !others.is_empty() {
        bail!(
            "--out {} is not empty and is not a checkpoint (it holds {}): choose a new or empty folder (nothing there is deleted, even with --force)",
            out.display(),
            others.join(", ")
        );
    }
    let empty = fs::read_dir(out)
        .with_context(|| format!("listing {}", out.display()))?
        .next()
        .is_none();
    if !empty && !force {
        bail!(
            "--out {} already holds a checkpoint: pass --force to replace it, or choose a new folder",
            out.display()
        );
    }
    Ok(())
}
