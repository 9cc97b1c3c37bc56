//! Object storage behind one URI: `file://`, a plain local path, `memory://`, `s3://`, `gs://`,
//! `az://` (and the https URLs of those clouds that `object_store` recognises).
//!
//! [`StoreDir::open`] turns a URI into a store and a root path; the blocking helpers
//! ([`StoreDir::get`], [`StoreDir::put`], ...) run on a small process-wide tokio runtime that this
//! module owns ([`io_runtime`]), so callers never need to be inside a runtime (and may be: the
//! helpers wait on a plain channel, not on `Runtime::block_on`). Every error names the object's
//! URI.
//!
//! - A path without a scheme is a local path (relative paths are taken from the current
//!   directory); `file:///abs/dir` is the same.
//! - `memory://NAME/dir` is an in-memory store shared by every `StoreDir` of this process that
//!   names the same `NAME` (tests, benchmarks); it is empty when the process starts.
//! - `s3://bucket/dir`, `gs://bucket/dir`, `az://container/dir` build their client from the
//!   environment (`AWS_*`, `GOOGLE_*`, `AZURE_*` variables, as the `object_store` builders'
//!   `from_env` read them; an `AWS_ENDPOINT` of `http://host:port` reaches an S3-protocol server
//!   in plain text, such as one on loopback: see [`s3_builder`]).

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutPayload};
use thiserror::Error;
use url::Url;

/// The S3 client's settings from the environment (`AWS_*`), its endpoint checked: one written
/// without its scheme (`localhost:9000`) passed the builder and panicked on the first request
/// (object_store signs it with `expect`), far from the variable that was wrong. An `http://`
/// endpoint is a server the user chose to reach in plain text (MinIO, a loopback test server):
/// plain HTTP is allowed for it unless `AWS_ALLOW_HTTP` says otherwise (the builder refused
/// it with "builder error" only).
fn s3_builder(uri: &str) -> Result<AmazonS3Builder, StoreError> {
    use object_store::aws::AmazonS3ConfigKey as Key;
    let mut builder = AmazonS3Builder::from_env();
    let mut plain = false;
    // the endpoint the client will use: AWS_ENDPOINT_URL_S3 over AWS_ENDPOINT(_URL), as the
    // builder chooses (the other, aimed at other services, is not looked at)
    let used = [(Key::S3Endpoint, "AWS_ENDPOINT_URL_S3"), (Key::Endpoint, "AWS_ENDPOINT (or AWS_ENDPOINT_URL)")]
        .into_iter()
        .find_map(|(key, var)| builder.get_config_value(&key).map(|e| (e, var)));
    if let Some((endpoint, var)) = used {
        let refuse = |why: &str| StoreError::BadUri {
            uri: uri.to_string(),
            reason: format!("{var} is {endpoint:?}, {why}: write the server's URL with its scheme, e.g. http://localhost:9000 or https://s3.example.com"),
        };
        let url = Url::parse(endpoint.trim()).map_err(|e| refuse(&format!("not a URL ({e})")))?;
        match url.scheme() {
            "http" => plain = true,
            "https" => {}
            other => return Err(refuse(&format!("whose scheme {other:?} is neither http nor https"))),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(refuse("a URL without a host"));
        }
    }
    // (the builder reports a default for the setting, so the variable itself is looked at)
    if plain && std::env::var_os("AWS_ALLOW_HTTP").is_none() {
        builder = builder.with_allow_http(true);
    }
    Ok(builder)
}

#[derive(Debug, Error, Clone)]
pub enum StoreError {
    #[error("{uri}: not a usable storage location: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("{uri}: not found")]
    NotFound { uri: String },
    /// "Not found" in answer to a write: no object is missing, the bucket (or container) is.
    #[error("{op} {uri}: the store answered \"not found\" to a write: its bucket (or container) does not exist")]
    NoBucket { op: &'static str, uri: String },
    /// The store's error, told in one line (its Display already carries every cause, so it is
    /// not also given as a `source`, which would print each cause again), with what to set when
    /// no credentials were found.
    #[error("{op} {uri}: {}{}", without_xml_body(error.to_string()), credentials_hint(error))]
    Op { op: &'static str, uri: String, error: Arc<object_store::Error> },
    #[error("{op} {uri}: the I/O runtime stopped before answering")]
    RuntimeGone { op: &'static str, uri: String },
}

impl StoreError {
    /// The URI of the object (or location) the error is about.
    pub fn uri(&self) -> &str {
        match self {
            StoreError::BadUri { uri, .. }
            | StoreError::NotFound { uri }
            | StoreError::NoBucket { uri, .. }
            | StoreError::Op { uri, .. }
            | StoreError::RuntimeGone { uri, .. } => uri,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// A write refused for want of its bucket: "not found" to a put, or the service's own
    /// code for it (S3's NoSuchBucket, Azure's ContainerNotFound) in an error the client did
    /// not class.
    pub fn is_no_bucket(&self) -> bool {
        match self {
            StoreError::NoBucket { .. } => true,
            StoreError::Op { error, .. } => ["NoSuchBucket", "ContainerNotFound"].iter().any(|code| error.to_string().contains(code)),
            _ => false,
        }
    }

    /// Whether the store could not be reached or answered "try later" (a refused or dropped
    /// connection, a timeout, a name that did not resolve, a 5xx or SlowDown after the client's
    /// own retries): an outage that passes, not a fault of the job (a missing object, refused
    /// credentials, a bad URI are none of these).
    pub fn is_transient(&self) -> bool {
        let StoreError::Op { error, .. } = self else { return false };
        if matches!(
            **error,
            object_store::Error::NotFound { .. }
                | object_store::Error::InvalidPath { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
                | object_store::Error::UnknownConfigurationKey { .. }
        ) {
            return false;
        }
        // no credentials: the instance metadata service off the cloud does not answer either,
        // which reads like an outage but never passes
        if !credentials_hint(error).is_empty() {
            return false;
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**error);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::*;
                if matches!(io.kind(), ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | TimedOut | BrokenPipe | HostUnreachable | NetworkUnreachable | UnexpectedEof) {
                    return true;
                }
            }
            cause = c.source();
        }
        // the HTTP client's errors do not all keep their causes as sources: their words
        let text = error.to_string().to_lowercase();
        ["error sending request", "connection refused", "connection reset", "timed out", "dns error", "service unavailable", "bad gateway", "gateway timeout", "slowdown", "slow down", "internal server error"]
            .iter()
            .any(|w| text.contains(w))
    }

    /// Wraps an `object_store` error about `uri`, keeping "not found" distinct (and telling a
    /// write's "not found", a missing bucket, from a read's).
    pub fn from_object_store(op: &'static str, uri: String, e: object_store::Error) -> Self {
        match e {
            // (not a multipart upload's: S3 answers NoSuchUpload to a completion retried after a
            // lost reply, which the upload retries)
            object_store::Error::NotFound { .. } if matches!(op, "put" | "put (create)") => StoreError::NoBucket { op, uri },
            object_store::Error::NotFound { .. } => StoreError::NotFound { uri },
            e => StoreError::Op { op, uri, error: Arc::new(e) },
        }
    }
}

/// `abs` without `.` and `..` components, which object_store's paths refuse: a `..` leaves the
/// directory the system would reach there (symbolic links up to it resolved, as `ls a/b/..`
/// does), so `../runs` and `/data/x/../y` name what the shell would.
fn without_dots(abs: &std::path::Path) -> PathBuf {
    use std::path::Component;
    if !abs.components().any(|c| matches!(c, Component::CurDir | Component::ParentDir)) {
        return abs.to_path_buf();
    }
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if let Ok(real) = std::fs::canonicalize(&out) {
                    out = real;
                }
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A store's error with the XML body of the service's answer (S3's `<Error><Code>NoSuchBucket
/// </Code><Message>...</Message><RequestId>...`, several lines, in the middle of a job's error)
/// told as its code and message.
fn without_xml_body(text: String) -> String {
    let Some(start) = text.find("<?xml").or_else(|| text.find("<Error>")) else { return text };
    let tag = |t: &str| {
        let (open, close) = (format!("<{t}>"), format!("</{t}>"));
        let i = text[start..].find(&open)? + start + open.len();
        let j = text[i..].find(&close)? + i;
        Some(text[i..j].trim().to_string())
    };
    let head = text[..start].trim_end().trim_end_matches([':', ',', '"']).trim_end();
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{head}: {code}: {message}"),
        (Some(code), None) => format!("{head}: {code}"),
        _ => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// What to set when `e` is a failure to find credentials: object_store looks in the
/// environment, then asks the cloud's instance metadata service (169.254.169.254), and off
/// the cloud that request is what fails.
fn credentials_hint(e: &object_store::Error) -> &'static str {
    let (store, text) = match e {
        object_store::Error::Generic { store, .. } => (*store, e.to_string()),
        _ => return "",
    };
    // the services' address, or their token paths (AWS_METADATA_ENDPOINT may move the address)
    let asked_metadata = ["169.254.169.254", "/latest/api/token", "/latest/meta-data/", "computeMetadata/", "metadata/identity/"]
        .iter()
        .any(|s| text.contains(s));
    if !asked_metadata {
        return "";
    }
    match store {
        "S3" => " (no S3 credentials: none in the environment and none from the instance metadata service; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT for a server other than AWS)",
        "GCS" => " (no GCS credentials: none in the environment and none from the instance metadata service; set GOOGLE_SERVICE_ACCOUNT to a service-account key file)",
        "MicrosoftAzure" => " (no Azure credentials: none in the environment and none from the instance metadata service; set AZURE_STORAGE_ACCOUNT_KEY, or AZURE_CLIENT_ID, AZURE_CLIENT_SECRET and AZURE_TENANT_ID)",
        _ => "",
    }
}

/// The process-wide runtime for object-store I/O: two worker threads named `smelt-io`, never
/// shut down (so no drop can panic inside someone else's runtime).
pub fn io_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("smelt-io")
            .enable_all()
            .build()
            .expect("cannot start the smelt-io tokio runtime")
    })
}

/// Runs `fut` on [`io_runtime`] and blocks this thread until it finishes. Works from any thread,
/// inside another runtime or not (it waits on a std channel). `None` if the task panicked.
pub fn block_on_io<F>(fut: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    io_runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().ok()
}

/// Whether `s` starts with a URI scheme (`s3://`, `file://`, ...) rather than being a path.
pub fn has_scheme(s: &str) -> bool {
    let s = s.trim();
    s.find("://").is_some_and(|i| i > 1 && s[..i].chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
}

fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// What a listing says about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// The store's version tag of the content (S3: the MD5 of a simple upload; local disk:
    /// inode, size and modification time), if it gives one.
    pub e_tag: Option<String>,
    /// When the object was last written, by the store's clock (milliseconds since the Unix
    /// epoch): S3's `LastModified`, a local file's modification time.
    pub modified_ms: i64,
}

/// A "directory" in an object store: a store, a root path inside it, and the URI it was opened
/// from (used in every error message).
#[derive(Clone, Debug)]
pub struct StoreDir {
    store: Arc<dyn ObjectStore>,
    root: Path,
    uri: String,
}

impl StoreDir {
    /// Opens `uri` (see the module docs for the forms it takes). Nothing is read or written.
    pub fn open(uri: &str) -> Result<StoreDir, StoreError> {
        let bad = |reason: String| StoreError::BadUri { uri: uri.to_string(), reason };
        let trimmed = uri.trim();
        if trimmed.is_empty() {
            return Err(bad("empty location".into()));
        }
        let shown = if trimmed.len() > 1 { trimmed.trim_end_matches('/') } else { trimmed }.to_string();

        if let Some(rest) = trimmed.strip_prefix("memory://") {
            let (name, dir) = rest.split_once('/').unwrap_or((rest, ""));
            let store = memory_stores().lock().unwrap().entry(name.to_string()).or_default().clone();
            let root = Path::parse(dir).map_err(|e| bad(e.to_string()))?;
            return Ok(StoreDir { store, root, uri: shown });
        }

        if !has_scheme(trimmed) {
            let p = PathBuf::from(trimmed);
            let abs = if p.is_absolute() {
                p
            } else {
                std::env::current_dir().map_err(|e| bad(format!("cannot resolve a relative path: {e}")))?.join(p)
            };
            return Self::local(abs, shown);
        }

        let url = Url::parse(trimmed).map_err(|e| bad(e.to_string()))?;
        let (scheme, root) = ObjectStoreScheme::parse(&url).map_err(|e| bad(e.to_string()))?;
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::Local => {
                let p = url.to_file_path().map_err(|_| bad("not an absolute local path".into()))?;
                return Self::local(p, shown);
            }
            ObjectStoreScheme::Memory => unreachable!("memory:// handled above"),
            ObjectStoreScheme::AmazonS3 => Arc::new(s3_builder(&shown)?.with_url(trimmed).build().map_err(|e| bad(e.to_string()))?),
            ObjectStoreScheme::GoogleCloudStorage => Arc::new(
                GoogleCloudStorageBuilder::from_env().with_url(trimmed).build().map_err(|e| bad(e.to_string()))?,
            ),
            ObjectStoreScheme::MicrosoftAzure => Arc::new(
                MicrosoftAzureBuilder::from_env().with_url(trimmed).build().map_err(|e| bad(e.to_string()))?,
            ),
            ObjectStoreScheme::Http => {
                return Err(bad("plain http(s) stores are not supported; use s3://, gs://, az://, file:// or a local path".into()))
            }
            other => return Err(bad(format!("unsupported store {other:?}"))),
        };
        Ok(StoreDir { store, root, uri: shown })
    }

    fn local(abs: PathBuf, shown: String) -> Result<StoreDir, StoreError> {
        let abs = without_dots(&abs);
        let root = Path::from_absolute_path(&abs)
            .map_err(|e| StoreError::BadUri { uri: shown.clone(), reason: e.to_string() })?;
        Ok(StoreDir { store: Arc::new(LocalFileSystem::new()), root, uri: shown })
    }

    /// A store and root given directly (e.g. a client built by hand); `uri` is how errors name it.
    pub fn from_parts(store: Arc<dyn ObjectStore>, root: Path, uri: impl Into<String>) -> StoreDir {
        StoreDir { store, root, uri: uri.into() }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The location as given (without a trailing `/`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The store path of `name` under the root (`name` may contain `/`).
    pub fn path(&self, name: &str) -> Path {
        name.split('/').filter(|s| !s.is_empty()).fold(self.root.clone(), |p, part| p.join(part))
    }

    /// How errors name `name`: `<uri>/<name>`.
    pub fn uri_of(&self, name: &str) -> String {
        if self.uri.ends_with('/') {
            format!("{}{name}", self.uri)
        } else {
            format!("{}/{name}", self.uri)
        }
    }

    /// The directory on this machine's file system for a local store (`file://` or a plain
    /// path); None for the others.
    pub fn local_dir(&self) -> Option<PathBuf> {
        (self.uri.starts_with("file://") || !has_scheme(&self.uri)).then(|| PathBuf::from(format!("/{}", self.root.as_ref())))
    }

    /// A sub-directory.
    pub fn join(&self, name: &str) -> StoreDir {
        StoreDir { store: self.store.clone(), root: self.path(name), uri: self.uri_of(name) }
    }

    fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        name: &str,
        fut: impl Future<Output = Result<T, object_store::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let uri = self.uri_of(name);
        match block_on_io(fut) {
            Some(r) => r.map_err(|e| StoreError::from_object_store(op, uri, e)),
            None => Err(StoreError::RuntimeGone { op, uri }),
        }
    }

    /// The whole object `name`.
    pub fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        let (store, path) = (self.store.clone(), self.path(name));
        self.run("get", name, async move { store.get(&path).await?.bytes().await })
    }

    /// Bytes `range` of `name`.
    pub fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let (store, path) = (self.store.clone(), self.path(name));
        self.run("get_range", name, async move { store.get_range(&path, range).await })
    }

    /// The size of `name`, `None` if it does not exist.
    pub fn size(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let (store, path) = (self.store.clone(), self.path(name));
        match self.run("head", name, async move { store.head(&path).await }) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `name` whole (atomically on every backend: a reader sees the old object or the new
    /// one, never a part).
    pub fn put(&self, name: &str, data: impl Into<Bytes>) -> Result<(), StoreError> {
        let (store, path) = (self.store.clone(), self.path(name));
        let payload = PutPayload::from_bytes(data.into());
        self.run("put", name, async move { store.put(&path, payload).await.map(|_| ()) })
    }

    /// [`StoreDir::put`], returning the new object's ETag where the store gives one.
    pub fn put_tagged(&self, name: &str, data: impl Into<Bytes>) -> Result<Option<String>, StoreError> {
        let (store, path) = (self.store.clone(), self.path(name));
        let payload = PutPayload::from_bytes(data.into());
        self.run("put", name, async move { store.put(&path, payload).await.map(|r| r.e_tag) })
    }

    /// Writes `name` only if it does not exist yet (S3 conditional put, an exclusive create on
    /// local disk): `Ok(false)` when it already exists, and then nothing was written. For
    /// "written last, exactly once" objects such as a checkpoint's manifest.
    pub fn put_create(&self, name: &str, data: impl Into<Bytes>) -> Result<bool, StoreError> {
        let (store, path) = (self.store.clone(), self.path(name));
        let payload = PutPayload::from_bytes(data.into());
        self.run("put (create)", name, async move {
            match store.put_opts(&path, payload, PutMode::Create.into()).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// Objects under `prefix` (a name or a sub-directory, `""` for everything), recursively:
    /// names relative to this directory, and sizes, sorted by name.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self.list_info(prefix)?.into_iter().map(|(name, o)| (name, o.size)).collect())
    }

    /// [`StoreDir::list`] with each object's ETag too (one listing; no object is read).
    pub fn list_info(&self, prefix: &str) -> Result<Vec<(String, ObjectInfo)>, StoreError> {
        let (store, root) = (self.store.clone(), self.root.clone());
        let at = if prefix.is_empty() { root.clone() } else { self.path(prefix) };
        let mut found = self
            .run("list", prefix, async move {
                use futures::TryStreamExt;
                let metas: Vec<object_store::ObjectMeta> = store.list(Some(&at)).try_collect().await?;
                Ok(metas)
            })?
            .into_iter()
            .filter_map(|m| {
                let rel: Vec<String> = m.location.prefix_match(&root)?.map(|p| p.as_ref().to_string()).collect();
                Some((rel.join("/"), ObjectInfo { size: m.size, e_tag: m.e_tag, modified_ms: m.last_modified.timestamp_millis() }))
            })
            .collect::<Vec<_>>();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    /// Deletes `name`; a missing object is not an error.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let (store, path) = (self.store.clone(), self.path(name));
        match self.run("delete", name, async move { store.delete(&path).await }) {
            Err(StoreError::NotFound { .. }) => Ok(()),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_in_answer_to_a_write_is_a_missing_bucket() {
        let nf = || object_store::Error::NotFound { path: "b/ts/x".into(), source: "404".into() };
        let put = StoreError::from_object_store("put", "s3://b/ts/x".into(), nf());
        assert!(put.is_no_bucket() && !put.is_not_found() && !put.is_transient());
        assert_eq!(put.to_string(), "put s3://b/ts/x: the store answered \"not found\" to a write: its bucket (or container) does not exist");
        assert!(StoreError::from_object_store("put (create)", "s3://b/ts/x".into(), nf()).is_no_bucket());
        // a multipart completion's NoSuchUpload (a retry after a lost reply) is retried as before
        assert!(StoreError::from_object_store("put (multipart)", "s3://b/ts/x".into(), nf()).is_not_found());
        let get = StoreError::from_object_store("get", "s3://b/ts/x".into(), nf());
        assert!(get.is_not_found() && !get.is_no_bucket());
        let generic = object_store::Error::Generic { store: "S3", source: "404 Not Found: NoSuchBucket: The specified bucket does not exist".into() };
        assert!(StoreError::from_object_store("put", "s3://b/ts/x".into(), generic).is_no_bucket());
    }

    #[test]
    fn an_xml_error_body_is_told_by_its_code_and_message() {
        // object_store's text of an S3 answer (the body as the service sent it)
        let s3 = "Generic S3 error: Error performing PUT http://127.0.0.1:9000/ckb/runs/x in 1.2ms - Server returned non-2xx status code: 404 Not Found: \
                  <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchBucket</Code>\n<Message>The specified bucket does not exist</Message>\
                  <BucketName>ckb</BucketName><RequestId>1X2Y</RequestId><HostId>abc=</HostId></Error>";
        assert_eq!(
            without_xml_body(s3.into()),
            "Generic S3 error: Error performing PUT http://127.0.0.1:9000/ckb/runs/x in 1.2ms - Server returned non-2xx status code: 404 Not Found: NoSuchBucket: The specified bucket does not exist"
        );
        let plain = "Generic LocalFileSystem error: Unable to open file /x: Permission denied (os error 13)";
        assert_eq!(without_xml_body(plain.into()), plain);
    }

    #[test]
    fn dots_in_local_paths_are_resolved_as_the_system_would() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(real.join("a/b")).unwrap();
        std::os::unix::fs::symlink(real.join("a/b"), real.join("link")).unwrap();
        // `link/..` is `a`, where the link leads, not the directory holding the link
        let s = StoreDir::open(real.join("link/../c/./d").to_str().unwrap()).unwrap();
        assert_eq!(s.root().as_ref(), real.join("a/c/d").to_str().unwrap().trim_start_matches('/'));
        s.put("x.txt", &b"hi"[..]).unwrap();
        assert_eq!(std::fs::read(real.join("a/c/d/x.txt")).unwrap(), b"hi");
        // a directory that does not exist yet is stepped out of by name
        let t = StoreDir::open(real.join("new/../e").to_str().unwrap()).unwrap();
        assert_eq!(t.root().as_ref(), real.join("e").to_str().unwrap().trim_start_matches('/'));
        // and relative ones from the current directory
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        let r = StoreDir::open("../f").unwrap();
        assert_eq!(r.root().as_ref(), cwd.parent().unwrap().join("f").to_str().unwrap().trim_start_matches('/'));
        assert_eq!(r.uri(), "../f");
    }

    #[test]
    fn local_and_memory_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for uri in [
            dir.path().join("a").to_str().unwrap().to_string(),
            format!("file://{}/b/", dir.path().display()),
            "memory://store-test/x/y".to_string(),
        ] {
            let s = StoreDir::open(&uri).unwrap();
            assert_eq!(s.size("obj").unwrap(), None);
            let e = s.get("obj").unwrap_err();
            assert!(e.is_not_found(), "{e}");
            assert_eq!(e.to_string(), format!("{}/obj: not found", uri.trim_end_matches('/')));
            s.put("obj", b"hello".to_vec()).unwrap();
            assert_eq!(s.size("obj").unwrap(), Some(5));
            assert_eq!(&s.get("obj").unwrap()[..], b"hello");
            assert_eq!(&s.get_range("obj", 1..3).unwrap()[..], b"el");
            s.delete("obj").unwrap();
            s.delete("obj").unwrap();
            assert_eq!(s.size("obj").unwrap(), None);
            // create-only puts, listing
            assert!(s.put_create("sub/m.json", b"first".to_vec()).unwrap());
            assert!(!s.put_create("sub/m.json", b"second".to_vec()).unwrap());
            assert_eq!(&s.get("sub/m.json").unwrap()[..], b"first");
            s.put("sub/deeper/x", b"12".to_vec()).unwrap();
            s.put("top", b"1".to_vec()).unwrap();
            assert_eq!(
                s.list("").unwrap(),
                [("sub/deeper/x".to_string(), 2), ("sub/m.json".to_string(), 5), ("top".to_string(), 1)]
            );
            assert_eq!(s.list("sub").unwrap().len(), 2);
            assert_eq!(s.join("sub").list("").unwrap()[1], ("m.json".to_string(), 5));
            assert!(s.list("nothing").unwrap().is_empty());
        }
        // memory:// stores with the same name are shared
        StoreDir::open("memory://store-test2/d").unwrap().put("o", b"1".to_vec()).unwrap();
        assert_eq!(StoreDir::open("memory://store-test2/d/").unwrap().size("o").unwrap(), Some(1));
        assert_eq!(StoreDir::open("memory://store-test3/d/").unwrap().size("o").unwrap(), None);
    }

    #[test]
    fn bad_uris_are_named() {
        let e = StoreDir::open("http://example.com/x").unwrap_err();
        assert!(e.to_string().starts_with("http://example.com/x: not a usable storage location"), "{e}");
        assert!(StoreDir::open("").is_err());
        assert!(StoreDir::open("ftp://host/x").is_err());
    }

    #[test]
    fn works_inside_another_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let s = StoreDir::open("memory://store-test-rt/d").unwrap();
            s.put("o", b"abc".to_vec()).unwrap();
            assert_eq!(&s.get("o").unwrap()[..], b"abc");
        });
    }
}
