//! Errors of corpus preparation and reading. Every variant names the object (a URI) or the input
//! file it is about and says what is wrong.

use std::sync::Arc;

use thiserror::Error;

use crate::store::StoreError;
use crate::tokenizer::TokenizerError;

#[derive(Debug, Error, Clone)]
pub enum CorpusError {
    /// Storage failed, or an object is missing.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No corpus at a location (its manifest is missing).
    #[error("{uri}: no corpus here: manifest.json not found (was `smelt corpus prepare` run to the end?)")]
    NoCorpus { uri: String },
    /// `manifest.json` is unreadable or inconsistent.
    #[error("{uri}: bad manifest: {reason}")]
    BadManifest { uri: String, reason: String },
    /// A shard's bytes disagree with its header or the manifest (truncated, wrong magic, hash
    /// mismatch, token id outside the vocabulary, ...).
    #[error("{uri}: {reason}")]
    BadShard { uri: String, reason: String },
    /// `verify`: the shards that failed (each error names its shard), of `shards` in all.
    #[error("{uri}: {} of {shards} shards failed verification:\n  {}", bad.len(), bad.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    BadShards { uri: String, shards: u64, bad: Vec<CorpusError> },
    /// An input file (with a line number where there is one) cannot be used.
    #[error("{path}{}: {reason}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Input { path: String, line: Option<u64>, reason: String },
    // `cause`, not a `#[source]`: the message already says it, and `{:#}` would say it twice.
    #[error("{path}: {cause}")]
    Io { path: String, cause: Arc<std::io::Error> },
    #[error("{path}: {cause}")]
    Tokenize { path: String, cause: Arc<TokenizerError> },
    /// Nothing to train on.
    #[error("empty corpus: {0}")]
    Empty(String),
    /// Options that cannot work together, or a rerun with settings that differ from the
    /// partial output it would resume.
    #[error("{0}")]
    Invalid(String),
}

impl CorpusError {
    pub fn io(path: impl Into<String>, e: std::io::Error) -> Self {
        CorpusError::Io { path: path.into(), cause: Arc::new(e) }
    }
    pub fn input(path: impl Into<String>, line: Option<u64>, reason: impl Into<String>) -> Self {
        CorpusError::Input { path: path.into(), line, reason: reason.into() }
    }
    pub fn bad_shard(uri: impl Into<String>, reason: impl Into<String>) -> Self {
        CorpusError::BadShard { uri: uri.into(), reason: reason.into() }
    }
}
