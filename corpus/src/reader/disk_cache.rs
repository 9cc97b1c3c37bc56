//! The local-disk shard cache of a remote store (see the module docs of [`super`]).

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use sha2::Digest;

use super::{Inner, Shard};
use crate::error::CorpusError;
use crate::format::{hex, Manifest, HEADER_BYTES};
use crate::store::has_scheme;

/// Downloads into the cache in flight at once (per reader; at most its `concurrency`).
pub(super) const DOWNLOADS: usize = 4;

/// A cached file as checked: path, size, modification time, the sha256 it was checked against.
type Stamp = (PathBuf, u64, Option<SystemTime>, String);

/// Cached files whose sha256 this process has checked (and that have not changed since).
fn verified() -> &'static Mutex<HashSet<Stamp>> {
    static V: OnceLock<Mutex<HashSet<Stamp>>> = OnceLock::new();
    V.get_or_init(Default::default)
}

fn stamp(path: &Path, sha: &str) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((path.to_path_buf(), m.len(), m.modified().ok(), sha.to_string()))
}

/// Whether `uri` names a remote store (one worth a local cache): not a local path or `file://`.
pub(super) fn is_remote(uri: &str) -> bool {
    has_scheme(uri) && !uri.trim().to_ascii_lowercase().starts_with("file://")
}

/// This corpus's directory in the cache under `root`: named by the digest of its manifest, so
/// a corpus prepared again (other shards, same names) never meets the old files.
pub(super) fn cache_dir(root: &Path, manifest: &Manifest) -> PathBuf {
    let json = serde_json::to_vec(manifest).expect("a manifest serializes");
    root.join(&hex(&sha2::Sha256::digest(&json))[..16])
}

impl Inner {
    fn cached_path(&self, shard: &Shard) -> PathBuf {
        self.disk_cache.as_ref().expect("disk cache in use").join(&shard.info.name)
    }

    /// At open: the cached files this process has checked already (unchanged since) are used at once.
    pub(super) fn adopt_verified(&self) {
        if self.disk_cache.is_none() {
            return;
        }
        for s in &self.shards {
            let p = self.cached_path(s);
            let Ok(st) = stamp(&p, &s.info.sha256) else { continue };
            if st.1 == s.info.bytes && verified().lock().unwrap().contains(&st) {
                if let Ok(f) = File::open(&p) {
                    let _ = s.local.set(f);
                }
            }
        }
    }

    /// Puts shard `k` into the disk cache (once): reuses a good copy, deletes a bad one (with a
    /// warning), downloads it otherwise.
    pub(super) async fn cache_shard(&self, k: usize) -> Result<(), CorpusError> {
        if self.disk_cache.is_none() {
            return Ok(());
        }
        let shard = &self.shards[k];
        let _guard = shard.cache_lock.lock().await;
        if shard.local.get().is_some() {
            return Ok(());
        }
        let _permit = self.dl_permits.acquire().await.expect("semaphore never closed");
        let path = self.cached_path(shard);
        match tokio::task::block_in_place(|| self.check_cached(shard, &path)) {
            Ok(Some(f)) => {
                let _ = shard.local.set(f);
                return Ok(());
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!("disk cache: {}: {reason}; deleting it and downloading {} again", path.display(), shard.uri);
                let _ = std::fs::remove_file(&path);
            }
        }
        static N: AtomicU64 = AtomicU64::new(0);
        let part = path.with_file_name(format!("{}.{}-{}.part", shard.info.name, std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let r = self.download(shard, &part).await;
        let r = r.and_then(|()| std::fs::rename(&part, &path).map_err(|e| CorpusError::io(path.display().to_string(), e)));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        let io = |e| CorpusError::io(path.display().to_string(), e);
        let st = stamp(&path, &shard.info.sha256).map_err(io)?;
        let f = File::open(&path).map_err(io)?;
        verified().lock().unwrap().insert(st);
        let _ = shard.local.set(f);
        Ok(())
    }

    /// The cached copy at `path`, checked (size; header and sha256 unless this process checked
    /// this very file before); `Ok(None)` if there is none, `Err(why)` if it is bad.
    fn check_cached(&self, shard: &Shard, path: &Path) -> Result<Option<File>, String> {
        let st = match stamp(path, &shard.info.sha256) {
            Ok(st) => st,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        if st.1 != shard.info.bytes {
            return Err(format!("{} bytes, the manifest says {}", st.1, shard.info.bytes));
        }
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        if verified().lock().unwrap().contains(&st) {
            return Ok(Some(f));
        }
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut head = Vec::new();
        loop {
            let n = f.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            if head.len() < HEADER_BYTES as usize {
                let take = (HEADER_BYTES as usize - head.len()).min(n);
                head.extend_from_slice(&buf[..take]);
            }
            hasher.update(&buf[..n]);
        }
        self.check_header_bytes(shard, &head, st.1).map_err(|e| e.to_string())?;
        let sha = hex(&hasher.finalize());
        if sha != shard.info.sha256 {
            return Err(format!("sha256 {sha} does not match the manifest's {}", shard.info.sha256));
        }
        self.shards_verified.fetch_add(1, Ordering::Relaxed);
        verified().lock().unwrap().insert(st);
        Ok(Some(f))
    }

    /// Shard `shard` downloaded whole to `part` with one streaming GET: size, header and
    /// sha256 checked against the manifest.
    async fn download(&self, shard: &Shard, part: &Path) -> Result<(), CorpusError> {
        let io = |e| CorpusError::io(part.display().to_string(), e);
        let mut file = File::create(part).map_err(io)?;
        let got = self.dir.store().get(&shard.path).await.map_err(|e| self.store_err("get", shard, e))?;
        let size = got.meta.size;
        self.count_get(0);
        let mut stream = got.into_stream();
        let mut hasher = sha2::Sha256::new();
        let mut head = Vec::with_capacity(HEADER_BYTES as usize);
        let mut seen = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.store_err("get", shard, e))?;
            hasher.update(&chunk);
            seen += chunk.len() as u64;
            self.bytes_fetched.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if head.len() < HEADER_BYTES as usize {
                let take = (HEADER_BYTES as usize - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
                if head.len() == HEADER_BYTES as usize {
                    self.check_header_bytes(shard, &head, size)?;
                }
            }
            file.write_all(&chunk).map_err(io)?;
        }
        if head.len() < HEADER_BYTES as usize {
            self.check_header_bytes(shard, &head, seen)?;
        }
        if seen != size {
            return Err(CorpusError::bad_shard(&shard.uri, format!("read {seen} bytes of an object of {size}")));
        }
        if seen != shard.info.bytes {
            return Err(CorpusError::bad_shard(&shard.uri, format!("{seen} bytes, the manifest says {}", shard.info.bytes)));
        }
        self.check_sha(shard, &hex(&hasher.finalize()))?;
        file.sync_data().map_err(io)?;
        Ok(())
    }

    /// Tokens `[lo, lo + out.len())` of shard `k` from its cached copy, ids checked.
    pub(super) fn read_cached(&self, k: usize, file: &File, lo: u64, out: &mut [u32], scratch: &mut Vec<u8>) -> Result<(), CorpusError> {
        let shard = &self.shards[k];
        let w = self.dtype.bytes();
        scratch.resize(out.len() * w as usize, 0);
        file.read_exact_at(scratch, HEADER_BYTES + lo * w).map_err(|e| {
            CorpusError::bad_shard(&shard.uri, format!("reading its cached copy {}: {e}", self.cached_path(shard).display()))
        })?;
        self.dtype.decode_to(scratch, out);
        self.check_ids(shard, lo, out)
    }
}
