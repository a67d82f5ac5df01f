//! The one error type of the `reference` crate.

/// Everything that can go wrong in `reference`. Messages name the file, key, tensor or op.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value is missing, has the wrong type or is out of range. `key` names it.
    #[error("config {source_name}: `{key}` {msg}")]
    Config {
        source_name: String,
        key: String,
        msg: String,
    },
    /// A config file is not valid JSON.
    #[error("config {source_name}: {msg}")]
    ConfigSyntax { source_name: String, msg: String },
    /// A checkpoint file is unreadable, truncated, or holds the wrong tensors.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    /// Inputs to an op have the wrong shape or values (token id out of range, ...).
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// A tier cannot run here, or its device failed (no CUDA driver, out of memory, ...).
    #[error("{device}: {msg}")]
    Device { device: String, msg: String },
    /// A file-system error, with the path. The OS error is part of the message, not a
    /// `source`: a caller printing the chain (`{:#}`) would show it twice.
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<std::path::Path>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            err,
        }
    }
}
