//! Input files in object storage for `corpus prepare`: expanding a URI (an object, a prefix, or
//! a glob over keys) into objects, and reading one as a blocking [`Read`] stream.

use std::io::Read;

use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStoreExt;

use crate::error::CorpusError;
use crate::input::Location;
use crate::store::{io_runtime, StoreDir, StoreError};

fn supported(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    if n.ends_with(".parquet") {
        return true;
    }
    let n = n.strip_suffix(".gz").unwrap_or(&n);
    n.ends_with(".txt") || n.ends_with(".jsonl")
}

fn hidden(name: &str) -> bool {
    name.split('/').any(|s| s.starts_with('.'))
}

/// The objects `uri` names, with their sizes, sorted by key (see [`crate::input::expand_inputs`]).
pub fn expand_uri(uri: &str) -> Result<Vec<(Location, u64)>, CorpusError> {
    let uri = uri.trim();
    let i = uri.find("://").expect("a URI with a scheme");
    let (scheme, rest) = (&uri[..i + 3], &uri[i + 3..]);
    let segments: Vec<&str> = rest.split('/').collect();
    let glob_at = segments.iter().position(|s| s.contains(['*', '?', '[']));
    let join = |segs: &[&str]| format!("{scheme}{}", segs.join("/"));
    let Some(g) = glob_at else {
        // an object, or else a prefix
        let (last, parent) = segments.split_last().expect("split gives one segment at least");
        if !last.is_empty() && segments.len() > 1 {
            let dir = StoreDir::open(&join(parent))?;
            if let Some(n) = dir.size(last)? {
                return Ok(vec![(Location::Object { dir, name: last.to_string() }, n)]);
            }
        }
        let dir = StoreDir::open(uri)?;
        let found: Vec<(Location, u64)> = dir
            .list("")?
            .into_iter()
            .filter(|(name, _)| supported(name) && !hidden(name))
            .map(|(name, n)| (Location::Object { dir: dir.clone(), name }, n))
            .collect();
        if found.is_empty() {
            return Err(CorpusError::input(uri, None, "input not found: no such object, and no .txt, .jsonl, .txt.gz, .jsonl.gz or .parquet objects under it"));
        }
        return Ok(found);
    };
    if g == 0 {
        return Err(CorpusError::input(uri, None, "a glob in the bucket (or store) name is not supported; put it in the key"));
    }
    let dir = StoreDir::open(&join(&segments[..g]))?;
    let pattern = segments[g..].join("/");
    let pat = glob::Pattern::new(&pattern).map_err(|e| CorpusError::input(uri, None, format!("bad glob pattern: {e}")))?;
    let how = glob::MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: true };
    let found: Vec<(Location, u64)> = dir
        .list("")?
        .into_iter()
        .filter(|(name, _)| pat.matches_with(name, how) && !hidden(name))
        .map(|(name, n)| (Location::Object { dir: dir.clone(), name }, n))
        .collect();
    if found.is_empty() {
        return Err(CorpusError::input(uri, None, "glob pattern matches no objects"));
    }
    Ok(found)
}

/// An object's bytes as a blocking stream: one GET, its body handed over chunk by chunk through
/// a small bounded channel (so a large object is never held whole). Works from any thread.
pub struct ObjectReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, StoreError>>,
    cur: Bytes,
    task: tokio::task::JoinHandle<()>,
}

impl ObjectReader {
    pub fn open(dir: &StoreDir, name: &str) -> ObjectReader {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (store, path, uri) = (dir.store().clone(), dir.path(name), dir.uri_of(name));
        let task = io_runtime().spawn(async move {
            let err = |e| StoreError::from_object_store("get", uri.clone(), e);
            let mut body = match store.get(&path).await {
                Ok(got) => got.into_stream(),
                Err(e) => {
                    let _ = tx.send(Err(err(e))).await;
                    return;
                }
            };
            while let Some(chunk) = body.next().await {
                let stop = chunk.is_err();
                if tx.send(chunk.map_err(err)).await.is_err() || stop {
                    return;
                }
            }
        });
        ObjectReader { rx, cur: Bytes::new(), task }
    }
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            // futures' executor, not tokio's: this may run on a thread inside a tokio runtime
            match futures::executor::block_on(self.rx.recv()) {
                None => return Ok(0),
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

impl Drop for ObjectReader {
    fn drop(&mut self) {
        self.task.abort(); // a reader stopped early does not download the rest
    }
}
