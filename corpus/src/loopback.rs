//! An S3-protocol server on 127.0.0.1, in this process: `s3s` over `s3s-fs` (a directory per
//! bucket). `smelt bench loader` times the `s3://` path against it, and tests run the real S3
//! client code (signing, ranged GETs, listing, conditional puts) without a cloud account.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::ObjectStore;

use crate::error::CorpusError;
use crate::store::StoreDir;

pub const ACCESS_KEY: &str = "smelt-loopback-key";
pub const SECRET_KEY: &str = "smelt-loopback-secret";
pub const REGION: &str = "us-east-1";

/// A running server; stopped when dropped.
pub struct S3Loopback {
    addr: SocketAddr,
    root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl S3Loopback {
    /// Serves `root` (bucket `b` is directory `root/b`) on a free port of 127.0.0.1, from a
    /// thread with its own two-thread runtime.
    pub fn start(root: &Path) -> Result<S3Loopback, CorpusError> {
        let shown = root.display().to_string();
        std::fs::create_dir_all(root).map_err(|e| CorpusError::io(&shown, e))?;
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| CorpusError::Invalid(format!("{shown}: cannot serve over S3: {e:?}")))?;
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| CorpusError::io("127.0.0.1:0", e))?;
        listener.set_nonblocking(true).map_err(|e| CorpusError::io("127.0.0.1", e))?;
        let addr = listener.local_addr().map_err(|e| CorpusError::io("127.0.0.1", e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("smelt-s3-loopback")
            .enable_all()
            .build()
            .map_err(|e| CorpusError::io("the S3 loopback runtime", e))?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("smelt-s3-loopback".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("a non-blocking listener");
                    let http = ConnBuilder::new(TokioExecutor::new());
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => {
                                let Ok((socket, _)) = accepted else { continue };
                                let _ = socket.set_nodelay(true);
                                let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                                tokio::spawn(async move {
                                    let _ = conn.await;
                                });
                            }
                        }
                    }
                });
                // connections still open are dropped with the runtime
                rt.shutdown_background();
            })
            .map_err(|e| CorpusError::io("the S3 loopback thread", e))?;
        tracing::debug!(%addr, root = %shown, "s3 loopback server started");
        Ok(S3Loopback { addr, root: root.to_path_buf(), stop: Some(stop), thread: Some(thread) })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The directory served.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates bucket `name` (a directory).
    pub fn create_bucket(&self, name: &str) -> Result<(), CorpusError> {
        let p = self.root.join(name);
        std::fs::create_dir_all(&p).map_err(|e| CorpusError::io(p.display().to_string(), e))
    }

    /// The environment that makes `s3://` URIs ([`StoreDir::open`]) reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_REGION", REGION.to_string()),
        ]
    }

    /// `s3://bucket/prefix` on this server, with a client configured by hand (the process
    /// environment is neither read nor changed).
    pub fn dir(&self, bucket: &str, prefix: &str) -> Result<StoreDir, CorpusError> {
        let uri = format!("s3://{bucket}/{}", prefix.trim_matches('/'));
        let bad = |reason: String| crate::store::StoreError::BadUri { uri: uri.clone(), reason };
        let store: Arc<dyn ObjectStore> = Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_region(REGION)
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .build()
                .map_err(|e| bad(e.to_string()))?,
        );
        let root = StorePath::parse(prefix.trim_matches('/')).map_err(|e| bad(e.to_string()))?;
        Ok(StoreDir::from_parts(store, root, uri.trim_end_matches('/').to_string()))
    }
}

impl Drop for S3Loopback {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
