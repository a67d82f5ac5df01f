//! What the reading and the writing halves of [`crate::io`] share: checkpoint errors and
//! where a checkpoint directory keeps its tensors.

use std::path::{Path, PathBuf};

use crate::error::Error;

pub(super) fn ckpt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// `dir/model.safetensors` when `path` is a directory (or `dir/pytorch_model.bin` when only
/// that is there), else `path`.
pub(super) fn model_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        let st = path.join("model.safetensors");
        let bin = path.join("pytorch_model.bin");
        if !st.exists() && bin.is_file() {
            bin
        } else {
            st
        }
    } else {
        path.to_path_buf()
    }
}

/// `dir/model.safetensors` when `path` is a directory, else `path`: where a save goes.
pub(super) fn safetensors_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    }
}
