//! What can go wrong with a checkpoint; every message names the object or location at fault.

use smelt_corpus::StoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// MANIFEST.json already exists: a checkpoint is never overwritten.
    #[error("{uri}: step {step} is already committed; a committed checkpoint is never overwritten")]
    AlreadyCommitted { uri: String, step: u64 },
    /// A data file written for a commit was deleted or changed before its manifest went up
    /// (another writer's retention sweeping it): nothing was committed.
    #[error("{uri}: written for this checkpoint but {message} before the commit (another writer sharing the root?); not committed")]
    Vanished { uri: String, message: String },
    /// No MANIFEST.json: an upload that never finished, or nothing at all.
    #[error("{uri}: no MANIFEST.json, so no checkpoint here (an unfinished upload leaves none)")]
    NotCommitted { uri: String },
    /// MANIFEST.json or trainer.json does not parse or contradicts itself.
    #[error("{uri}: {message}")]
    BadMetadata { uri: String, message: String },
    #[error("{uri}: size {actual} bytes, the manifest says {expected}")]
    SizeMismatch { uri: String, expected: u64, actual: u64 },
    #[error("{uri}: sha256 {actual}, the manifest says {expected} (the file is corrupt)")]
    HashMismatch { uri: String, expected: String, actual: String },
    /// A safetensors file that does not hold the tensors its model config needs.
    #[error("{uri}: {message}")]
    BadTensors { uri: String, message: String },
    /// A model to start from that cannot be found where its name points.
    #[error("{name}: {message}")]
    NoModel { name: String, message: String },
    #[error("{root}: no good checkpoint{}", skipped_text(.skipped))]
    NoGoodCheckpoint { root: String, skipped: Vec<String> },
}

impl CheckpointError {
    /// A file's bytes are not those its manifest recorded (size or sha256): the checkpoint is
    /// damaged for good. Not a store that fails to answer, nor metadata or tensors this build
    /// cannot read (another smelt version's checkpoint may be sound).
    pub fn is_corruption(&self) -> bool {
        matches!(self, CheckpointError::SizeMismatch { .. } | CheckpointError::HashMismatch { .. })
    }
}

fn skipped_text(skipped: &[String]) -> String {
    if skipped.is_empty() {
        String::new()
    } else {
        format!(" (skipped: {})", skipped.join("; "))
    }
}

pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
