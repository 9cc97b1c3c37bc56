//! Whether a run's failure was the infrastructure's rather than the job's: an object store that
//! could not be reached (`StoreError::is_transient`). The coordinator restarts such a failure
//! after a back-off even when its words repeat at the same step; the same error twice is
//! otherwise taken for one that would always repeat (a missing file, a NaN at the same step).

use smelt_checkpoint::CheckpointError;
use smelt_corpus::{CorpusError, StoreError};

/// An error told in words of its own (its store error's text rewritten, as the checkpoint store's
/// write probe does with its unique object name) that was a store outage: transient all the same.
#[derive(Debug)]
pub struct Outage(pub String);

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Outage {}

/// True when some cause in `e`'s chain is a store error that passes with time (or an `Outage`). The corpus' and
/// the checkpoint's errors hold theirs transparently (their `source` is the store error's own
/// source, not the store error), so each is looked into. A broken collective is not transient:
/// it echoes a peer's own failure, which names the cause.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if c.is::<Outage>() {
            return true;
        }
        let store = c
            .downcast_ref::<StoreError>()
            .or_else(|| match c.downcast_ref::<CorpusError>() {
                Some(CorpusError::Store(s)) => Some(s),
                _ => None,
            })
            .or_else(|| match c.downcast_ref::<CheckpointError>() {
                Some(CheckpointError::Store(s)) => Some(s),
                _ => None,
            });
        store.is_some_and(StoreError::is_transient)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A store error as object_store gives one for a connection the store refused.
    fn refused() -> StoreError {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = object_store::Error::Generic { store: "S3", source: Box::new(io) };
        StoreError::Op { op: "reading", uri: "s3://b/c/manifest.json".into(), error: Arc::new(e) }
    }

    #[test]
    fn a_store_outage_is_transient_however_it_is_wrapped() {
        assert!(is_transient(&anyhow::Error::from(refused())));
        let corpus = anyhow::Error::from(CorpusError::from(refused())).context("opening data.corpus s3://b/c");
        assert!(is_transient(&corpus), "{corpus:#}");
        let ckpt = anyhow::Error::from(CheckpointError::from(refused())).context("loading the checkpoint");
        assert!(is_transient(&ckpt), "{ckpt:#}");
        // told in words of its own (the checkpoint store's write probe)
        let probe = anyhow::Error::new(Outage("the checkpoint store cannot be written: ...".into())).context("rank 0");
        assert!(is_transient(&probe), "{probe:#}");
    }

    #[test]
    fn a_missing_object_or_bad_uri_is_not() {
        let missing = anyhow::Error::from(StoreError::NotFound { uri: "s3://b/x".into() }).context("opening data.corpus s3://b/x");
        assert!(!is_transient(&missing));
        assert!(!is_transient(&anyhow::anyhow!("connection refused, but only in words")));
        let bad = StoreError::BadUri { uri: "s3://".into(), reason: "no bucket".into() };
        assert!(!is_transient(&anyhow::Error::from(CorpusError::from(bad)).context("opening")));
        let missing = anyhow::Error::from(CorpusError::from(StoreError::NotFound { uri: "s3://b/x".into() }));
        assert!(!is_transient(&missing));
    }
}
