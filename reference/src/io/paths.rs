//! What the reading and the writing halves of [`crate::io`] share: checkpoint errors and
//! where a checkpoint directory keeps its tensors ([`checkpoint_layout`], the one place that
//! decides).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub(super) fn ckpt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// The single-file Hugging Face weights.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// The index of a sharded Hugging Face checkpoint.
pub const SHARD_INDEX_FILE: &str = "model.safetensors.index.json";
/// mamba_ssm's (and older transformers') `torch.save` weights.
pub const TORCH_FILE: &str = "pytorch_model.bin";

/// How a checkpoint stores its weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One safetensors file (`model.safetensors`).
    Safetensors(PathBuf),
    /// `model.safetensors.index.json` naming `model-0000K-of-0000N.safetensors` shards.
    Sharded(PathBuf),
    /// A `torch.save` zip (`pytorch_model.bin`, as mamba_ssm writes it).
    Torch(PathBuf),
}

impl Layout {
    /// The file that holds the weights (the index for a sharded checkpoint).
    pub fn path(&self) -> &Path {
        match self {
            Layout::Safetensors(p) | Layout::Sharded(p) | Layout::Torch(p) => p,
        }
    }

    /// The file's name as a checkpoint directory spells it.
    pub fn file_name(&self) -> &'static str {
        match self {
            Layout::Safetensors(_) => SAFETENSORS_FILE,
            Layout::Sharded(_) => SHARD_INDEX_FILE,
            Layout::Torch(_) => TORCH_FILE,
        }
    }
}

/// Where the weights of `path` are. A directory is looked at in this order:
/// `model.safetensors`, `model.safetensors.index.json` (sharded), `pytorch_model.bin`
/// (mamba_ssm); holding none of them is an error that names all three. A file is taken as it
/// is: an index by its `.index.json` name, a torch zip by its `.bin` name or zip magic, else
/// safetensors.
pub fn checkpoint_layout(path: &Path) -> Result<Layout> {
    if path.is_dir() {
        let st = path.join(SAFETENSORS_FILE);
        let index = path.join(SHARD_INDEX_FILE);
        let bin = path.join(TORCH_FILE);
        if st.is_file() {
            return Ok(Layout::Safetensors(st));
        }
        if index.is_file() {
            return Ok(Layout::Sharded(index));
        }
        if bin.is_file() {
            return Ok(Layout::Torch(bin));
        }
        let sharded_bin = path.join("pytorch_model.bin.index.json").is_file();
        return Err(ckpt_err(
            path,
            format!(
                "no weights: {} is missing (looked for {SAFETENSORS_FILE} (Hugging Face), \
                 {SHARD_INDEX_FILE} (sharded Hugging Face) and {TORCH_FILE} (mamba_ssm)){}",
                st.display(),
                if sharded_bin {
                    "; sharded pytorch_model-*.bin checkpoints are not supported: convert them \
                     to safetensors"
                } else {
                    ""
                }
            ),
        ));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    if name.is_some_and(|n| n.ends_with(".index.json")) {
        Ok(Layout::Sharded(path.to_path_buf()))
    } else if super::torch::is_torch_file(path) {
        Ok(Layout::Torch(path.to_path_buf()))
    } else {
        Ok(Layout::Safetensors(path.to_path_buf()))
    }
}

/// `dir/model.safetensors` when `path` is a directory, else `path`: where a save goes.
pub(super) fn safetensors_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(SAFETENSORS_FILE)
    } else {
        path.to_path_buf()
    }
}
