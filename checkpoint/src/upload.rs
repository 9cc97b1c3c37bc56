//! One object up: a single put when small, a multipart upload when large (parts go up in
//! parallel; the object appears only when the upload completes, so a killed upload leaves
//! nothing at the final name). Transient failures are retried with exponential backoff, each
//! retry logged.

use std::time::Duration;

use bytes::Bytes;
use object_store::{ObjectStoreExt, WriteMultipart};
use smelt_corpus::store::block_on_io;
use smelt_corpus::{StoreDir, StoreError};
use tracing::warn;

/// Parts in flight at once per object.
const PARTS_IN_FLIGHT: usize = 8;

/// How objects go up.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadOptions {
    pub retry: RetryPolicy,
    /// Objects at least this large go up as multipart uploads.
    pub multipart_threshold: usize,
    /// Part size (S3 wants at least 5 MiB per part but the last).
    pub part_size: usize,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions { retry: RetryPolicy::default(), multipart_threshold: 32 << 20, part_size: 16 << 20 }
    }
}

/// How often and how patiently a failed upload is tried again.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Tries in all (1: no retry).
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 5, first_backoff: Duration::from_millis(500), max_backoff: Duration::from_secs(8) }
    }
}

/// Errors that retrying cannot fix (the request itself is wrong or refused).
fn is_permanent(e: &StoreError) -> bool {
    match e {
        StoreError::BadUri { .. } | StoreError::RuntimeGone { .. } | StoreError::NoBucket { .. } => true,
        StoreError::NotFound { .. } => false,
        StoreError::Op { error, .. } => matches!(
            **error,
            object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented { .. }
                | object_store::Error::InvalidPath { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ),
    }
}

/// Runs `op` until it succeeds, fails permanently, or `policy.attempts` are used.
pub fn with_retry<T>(policy: &RetryPolicy, what: &str, mut op: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let mut backoff = policy.first_backoff;
    let mut attempt = 1;
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= policy.attempts.max(1) || is_permanent(&e) => return Err(e),
            Err(e) => {
                warn!(
                    object = %what,
                    attempt,
                    of = policy.attempts,
                    retry_in_ms = backoff.as_millis() as u64,
                    error = %e,
                    "checkpoint upload failed; retrying"
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(policy.max_backoff);
                attempt += 1;
            }
        }
    }
}

/// Writes `name` under `dir` whole (overwriting), multipart when large; retried. Returns the
/// new object's ETag where the store gives one (how the commit tells its own file from another
/// writer's of the same size).
pub fn put_object(dir: &StoreDir, name: &str, data: Bytes, opts: &UploadOptions) -> Result<Option<String>, StoreError> {
    let (uri, policy, part) = (dir.uri_of(name), &opts.retry, opts.part_size.max(1));
    if data.len() < opts.multipart_threshold {
        return with_retry(policy, &uri, || dir.put_tagged(name, data.clone()));
    }
    with_retry(policy, &uri, || {
        let (store, path, data) = (dir.store().clone(), dir.path(name), data.clone());
        let r = block_on_io(async move {
            let upload = store.put_multipart(&path).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, part);
            let mut at = 0;
            while at < data.len() {
                let end = (at + part).min(data.len());
                if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    // Parts already up are discarded by the store; nothing becomes visible.
                    let _ = w.abort().await;
                    return Err(e);
                }
                w.put(data.slice(at..end));
                at = end;
            }
            w.finish().await.map(|r| r.e_tag)
        });
        match r {
            Some(r) => r.map_err(|e| StoreError::from_object_store("put (multipart)", uri.clone(), e)),
            None => Err(StoreError::RuntimeGone { op: "put (multipart)", uri: uri.clone() }),
        }
    })
}
