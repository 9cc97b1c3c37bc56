//! Errors of the engine crate.

use thiserror::Error;

use crate::collective::CollectiveError;

/// A configuration value that cannot work, naming the field and what is allowed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        ConfigError { field: field.to_string(), message: message.into() }
    }
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("bad batch: {0}")]
    Batch(String),
    #[error("loss is not finite ({loss}) at step {step}; the update was not applied")]
    NonFiniteLoss { step: u64, loss: f32 },
    #[error("gradient norm is not finite ({norm}) at step {step}; the update was not applied")]
    NonFiniteGrad { step: u64, norm: f32 },
    #[error("weights file {path}: {message}")]
    Weights { path: String, message: String },
    /// `cause`, not `source`: the message already says it, and `{:#}` would say it twice.
    #[error("i/o on {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    /// A GPU could not be used, or a device operation failed (names the device and the op).
    #[error("device: {0}")]
    Device(String),
    /// The cause is the source, not part of the message: `{:#}` shows the chain, and would
    /// otherwise say it twice ("collective: the collective was aborted: the collective was
    /// aborted"). It stays the source so a chain can be asked whether a collective failed.
    #[error("collective")]
    Collective(#[from] CollectiveError),
}
