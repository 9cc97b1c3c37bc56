//! The reader's I/O: header checks, whole-shard loads, planned ranged GETs, and `verify`.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use sha2::Digest;

use super::{Inner, Key, Shard};
use crate::error::CorpusError;
use crate::format::{hex, HEADER_BYTES};
use crate::ranges::{coalesce, Need};
use crate::store::StoreError;

/// A shard's sha256 while it is read front to back by ranged GETs.
pub(super) enum StreamHash {
    /// Bytes `[0, pos)` hashed so far.
    Running(u64, sha2::Sha256),
    /// Checked (or abandoned: a whole-shard read checked it instead).
    Done,
}

impl StreamHash {
    pub(super) fn new() -> StreamHash {
        StreamHash::Running(0, sha2::Sha256::new())
    }
}

impl Shard {
    /// Feeds bytes `[at, at + data.len())` of the object to the running hash if they continue
    /// it; `Some(sha)` when that completes the object.
    fn feed(&self, at: u64, data: &[u8]) -> Option<String> {
        let mut h = self.stream_hash.lock().unwrap();
        let StreamHash::Running(pos, hasher) = &mut *h else { return None };
        let end = at + data.len() as u64;
        if at > *pos || end <= *pos {
            return None;
        }
        hasher.update(&data[(*pos - at) as usize..]);
        *pos = end;
        if end < self.info.bytes {
            return None;
        }
        let StreamHash::Running(_, hasher) = std::mem::replace(&mut *h, StreamHash::Done) else { unreachable!() };
        Some(hex(&hasher.finalize()))
    }
}

/// One piece of a requested key: tokens `[lo, hi)` of shard `shard`, landing at `dst` in the key.
struct Piece {
    key: usize,
    shard: usize,
    lo: u64,
    hi: u64,
    dst: usize,
}

impl Inner {
    pub(super) fn store_err(&self, op: &'static str, shard: &Shard, e: object_store::Error) -> CorpusError {
        StoreError::from_object_store(op, shard.uri.clone(), e).into()
    }

    pub(super) fn count_get(&self, bytes: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes_fetched.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Checks shard `k`'s size and header against the manifest (once).
    async fn check_header(&self, k: usize) -> Result<(), CorpusError> {
        let shard = &self.shards[k];
        shard
            .header_ok
            .get_or_try_init(|| async {
                let _permit = self.permits.acquire().await.expect("semaphore never closed");
                let store = self.dir.store();
                let meta = store.head(&shard.path).await.map_err(|e| self.store_err("head", shard, e))?;
                self.count_get(0);
                let n = HEADER_BYTES.min(meta.size);
                let head = store.get_range(&shard.path, 0..n).await.map_err(|e| self.store_err("get_range", shard, e))?;
                self.count_get(head.len());
                self.check_header_bytes(shard, &head, meta.size)?;
                shard.feed(0, &head);
                Ok::<(), CorpusError>(())
            })
            .await
            .map(|_| ())
    }

    pub(super) fn check_header_bytes(&self, shard: &Shard, head: &[u8], size: u64) -> Result<(), CorpusError> {
        let bad = |reason: String| CorpusError::bad_shard(&shard.uri, reason);
        let h = crate::format::ShardHeader::parse(head).map_err(bad)?;
        let m = &self.manifest;
        if h.dtype != m.dtype {
            return Err(bad(format!("header says dtype {}, the manifest {}", h.dtype.name(), m.dtype.name())));
        }
        if h.tokens != shard.info.tokens {
            return Err(bad(format!("header says {} tokens, the manifest {}", h.tokens, shard.info.tokens)));
        }
        if h.vocab_size != m.vocab_size || h.eot_token != m.eot_token {
            return Err(bad(format!(
                "header says vocabulary {} and end-of-text {}, the manifest {} and {}",
                h.vocab_size, h.eot_token, m.vocab_size, m.eot_token
            )));
        }
        let want = h.object_bytes();
        if size < want {
            return Err(bad(format!(
                "truncated: {size} bytes, expected {want} ({HEADER_BYTES}-byte header + {} tokens x {} bytes)",
                h.tokens,
                h.dtype.bytes()
            )));
        }
        if size > want {
            return Err(bad(format!("{size} bytes, expected {want}: {} bytes of trailing data", size - want)));
        }
        Ok(())
    }

    pub(super) fn check_sha(&self, shard: &Shard, sha: &str) -> Result<(), CorpusError> {
        if sha != shard.info.sha256 {
            return Err(CorpusError::bad_shard(&shard.uri, format!("sha256 {sha} does not match the manifest's {}", shard.info.sha256)));
        }
        self.shards_verified.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn check_ids(&self, shard: &Shard, first: u64, ids: &[u32]) -> Result<(), CorpusError> {
        let v = self.manifest.vocab_size;
        if let Some(p) = ids.iter().position(|&t| t >= v) {
            return Err(CorpusError::bad_shard(
                &shard.uri,
                format!("token {} (position {} of the shard) is outside the vocabulary of {v}", ids[p], first + p as u64),
            ));
        }
        Ok(())
    }

    // ---- whole-shard mode --------------------------------------------------------------------

    /// Shard `k` read whole and checked (header, size, sha256, token ids), once.
    pub(super) async fn load_whole(&self, k: usize) -> Result<Bytes, CorpusError> {
        let shard = &self.shards[k];
        shard
            .whole
            .get_or_try_init(|| async {
                let _permit = self.permits.acquire().await.expect("semaphore never closed");
                let store = self.dir.store();
                let got = store.get(&shard.path).await.map_err(|e| self.store_err("get", shard, e))?;
                let data = got.bytes().await.map_err(|e| self.store_err("get", shard, e))?;
                self.count_get(data.len());
                self.check_header_bytes(shard, &data, data.len() as u64)?;
                self.check_sha(shard, &hex(&sha2::Sha256::digest(&data)))?;
                *shard.stream_hash.lock().unwrap() = StreamHash::Done;
                // every id, in chunks (no second copy of the shard)
                let mut ids = vec![0u32; 1 << 16];
                let w = self.dtype.bytes() as usize;
                for (c, bytes) in data[HEADER_BYTES as usize..].chunks(ids.len() * w).enumerate() {
                    let n = bytes.len() / w;
                    self.dtype.decode_to(bytes, &mut ids[..n]);
                    self.check_ids(shard, (c * ids.len()) as u64, &ids[..n])?;
                }
                Ok::<Bytes, CorpusError>(data)
            })
            .await
            .cloned()
    }

    /// Loads (concurrently) every shard `key` touches.
    pub(super) async fn load_whole_range(&self, key: Key) -> Result<(), CorpusError> {
        let loads: FuturesUnordered<_> = self.shards_of(key).map(|k| self.load_whole(k)).collect();
        let results: Vec<_> = loads.collect().await;
        results.into_iter().try_for_each(|r| r.map(|_| ()))
    }

    /// Tokens `key` if every shard they lie in is loaded.
    pub(super) fn slice_loaded(&self, (start, len): Key) -> Option<Vec<u32>> {
        let w = self.dtype.bytes();
        let mut out = vec![0u32; len as usize];
        let (mut pos, end) = (start, start + len);
        for k in self.shards_of((start, len)) {
            let shard = &self.shards[k];
            let data = shard.whole.get()?;
            let lo = pos - shard.start;
            let hi = (end - shard.start).min(shard.info.tokens);
            let dst = (pos - start) as usize;
            let bytes = &data[(HEADER_BYTES + lo * w) as usize..(HEADER_BYTES + hi * w) as usize];
            self.dtype.decode_to(bytes, &mut out[dst..dst + (hi - lo) as usize]);
            pos = shard.start + hi;
        }
        debug_assert_eq!(pos, end);
        Some(out)
    }

    // ---- ranged mode -------------------------------------------------------------------------

    /// Bytes `range` of shard `k`, with one GET.
    async fn get_extent(&self, k: usize, range: std::ops::Range<u64>) -> Result<Bytes, CorpusError> {
        let shard = &self.shards[k];
        let _permit = self.permits.acquire().await.expect("semaphore never closed");
        let data = self.dir.store().get_range(&shard.path, range.clone()).await.map_err(|e| self.store_err("get_range", shard, e))?;
        self.count_get(data.len());
        if data.len() as u64 != range.end - range.start {
            return Err(CorpusError::bad_shard(&shard.uri, format!("asked for bytes {range:?}, got {}", data.len())));
        }
        if let Some(sha) = shard.feed(range.start, &data) {
            self.check_sha(shard, &sha)?; // the shard has now been read front to back
        }
        Ok(data)
    }

    /// Fetches token ranges `keys` of the split: each shard's header checked (once), the byte
    /// ranges planned by [`coalesce`] and fetched concurrently; `done(i, result)` is called once
    /// for every key, as soon as all of its bytes are in (or one of its GETs failed).
    pub(super) async fn fetch_keys(&self, keys: &[Key], mut done: impl FnMut(usize, Result<Vec<u32>, CorpusError>)) {
        let w = self.dtype.bytes();
        // a key longer than one GET may be is cut into pieces that each fit
        let max_tokens = self.coalesce.map_or(u64::MAX, |c| (c.max_len / w).max(1));
        let mut pieces = Vec::new();
        let mut needs = Vec::new();
        let mut left = vec![0usize; keys.len()];
        // None once a key is answered (an error, or handed over)
        let mut bufs: Vec<Option<Vec<u32>>> = keys.iter().map(|&(_, len)| Some(vec![0u32; len as usize])).collect();
        fn fail(bufs: &mut [Option<Vec<u32>>], done: &mut impl FnMut(usize, Result<Vec<u32>, CorpusError>), ki: usize, e: &CorpusError) {
            if bufs[ki].take().is_some() {
                done(ki, Err(e.clone()));
            }
        }
        let mut scratch = Vec::new();
        for (ki, &(start, len)) in keys.iter().enumerate() {
            let end = start + len;
            let mut pos = start;
            while pos < end {
                let k = self.shards.partition_point(|s| s.start <= pos) - 1;
                let shard = &self.shards[k];
                let lo = pos - shard.start;
                let hi = (end - shard.start).min(shard.info.tokens).min(lo.saturating_add(max_tokens));
                if let Some(file) = shard.local.get() {
                    // in the disk cache: a positioned read of the local file
                    let dst = (pos - start) as usize;
                    pos = shard.start + hi;
                    let Some(buf) = bufs[ki].as_mut() else { continue };
                    let out = &mut buf[dst..dst + (hi - lo) as usize];
                    if let Err(e) = self.read_cached(k, file, lo, out, &mut scratch) {
                        fail(&mut bufs, &mut done, ki, &e);
                    }
                    continue;
                }
                needs.push(Need { object: k, range: HEADER_BYTES + lo * w..HEADER_BYTES + hi * w });
                pieces.push(Piece { key: ki, shard: k, lo, hi, dst: (pos - start) as usize });
                left[ki] += 1;
                pos = shard.start + hi;
            }
        }
        // keys read wholly from the disk cache are complete already
        for ki in 0..keys.len() {
            if left[ki] == 0 {
                if let Some(v) = bufs[ki].take() {
                    done(ki, Ok(v));
                }
            }
        }

        let touched: BTreeSet<usize> = pieces.iter().map(|p| p.shard).collect();
        let checks: Vec<(usize, Result<(), CorpusError>)> =
            touched.iter().map(|&k| async move { (k, self.check_header(k).await) }).collect::<FuturesUnordered<_>>().collect().await;
        for (k, r) in checks {
            if let Err(e) = r {
                for p in pieces.iter().filter(|p| p.shard == k) {
                    fail(&mut bufs, &mut done, p.key, &e);
                }
            }
        }

        let mut gets = FuturesUnordered::new();
        for e in coalesce(&needs, self.coalesce) {
            if e.needs.iter().all(|&n| bufs[pieces[n].key].is_none()) {
                continue; // every key it serves has failed already
            }
            gets.push(async move {
                let r = self.get_extent(e.object, e.range.clone()).await;
                (e, r)
            });
        }
        while let Some((e, r)) = gets.next().await {
            let data = match r {
                Ok(d) => d,
                Err(err) => {
                    for &n in &e.needs {
                        fail(&mut bufs, &mut done, pieces[n].key, &err);
                    }
                    continue;
                }
            };
            for &n in &e.needs {
                let p = &pieces[n];
                let Some(buf) = bufs[p.key].as_mut() else { continue };
                let off = (needs[n].range.start - e.range.start) as usize;
                let out = &mut buf[p.dst..p.dst + (p.hi - p.lo) as usize];
                self.dtype.decode_to(&data[off..off + out.len() * w as usize], out);
                if let Err(err) = self.check_ids(&self.shards[p.shard], p.lo, out) {
                    fail(&mut bufs, &mut done, p.key, &err);
                    continue;
                }
                left[p.key] -= 1;
                if left[p.key] == 0 {
                    let v = bufs[p.key].take().expect("still open");
                    done(p.key, Ok(v));
                }
            }
        }
    }

    // ---- verify ------------------------------------------------------------------------------

    async fn verify_shard(&self, shard: &Shard) -> Result<(u64, u64), CorpusError> {
        let store = self.dir.store();
        let got = store.get(&shard.path).await.map_err(|e| self.store_err("get", shard, e))?;
        let size = got.meta.size;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut stream = got.into_stream();
        let mut hasher = sha2::Sha256::new();
        let mut head = Vec::with_capacity(HEADER_BYTES as usize);
        let mut carry: Vec<u8> = Vec::new();
        let mut ids = Vec::new();
        let mut seen = 0u64;
        let mut tokens = 0u64;
        let w = self.dtype.bytes() as usize;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.store_err("get", shard, e))?;
            hasher.update(&chunk);
            seen += chunk.len() as u64;
            let mut body: &[u8] = &chunk;
            if head.len() < HEADER_BYTES as usize {
                let take = (HEADER_BYTES as usize - head.len()).min(body.len());
                head.extend_from_slice(&body[..take]);
                body = &body[take..];
                if head.len() == HEADER_BYTES as usize {
                    self.check_header_bytes(shard, &head, size)?;
                }
            }
            carry.extend_from_slice(body);
            let whole = carry.len() / w * w;
            ids.clear();
            self.dtype.decode_into(&carry[..whole], &mut ids);
            self.check_ids(shard, tokens, &ids)?;
            tokens += ids.len() as u64;
            carry.drain(..whole);
        }
        self.bytes_fetched.fetch_add(seen, Ordering::Relaxed);
        if head.len() < HEADER_BYTES as usize {
            self.check_header_bytes(shard, &head, seen)?;
        }
        if seen != size {
            return Err(CorpusError::bad_shard(&shard.uri, format!("read {seen} bytes of an object of {size}")));
        }
        self.check_sha(shard, &hex(&hasher.finalize()))?;
        Ok((seen, tokens))
    }

    pub(super) async fn verify_all(&self) -> Result<super::VerifyReport, CorpusError> {
        // Both splits, whichever this reader serves.
        let mut all: Vec<Shard> = Vec::new();
        for info in self.manifest.train.shards.iter().chain(&self.manifest.val.shards) {
            all.push(Shard::new(&self.dir, info, 0));
        }
        // Every shard is read, so one run names every bad one; a store that fails otherwise
        // (unreachable, refusing) would fail each alike, and stops the run.
        let mut report = super::VerifyReport::default();
        let mut bad = Vec::new();
        let every = (all.len() / 10).max(1);
        for (i, s) in all.iter().enumerate() {
            match self.verify_shard(s).await {
                Ok((bytes, tokens)) => {
                    report.shards += 1;
                    report.bytes += bytes;
                    report.tokens += tokens;
                }
                Err(e @ (CorpusError::BadShard { .. } | CorpusError::Store(StoreError::NotFound { .. }))) => {
                    tracing::warn!(shard = %s.uri, error = %e, "shard failed verification");
                    bad.push(e);
                }
                Err(e) => return Err(e),
            }
            if (i + 1) % every == 0 && i + 1 < all.len() {
                tracing::info!(shards = i + 1, of = all.len(), bad = bad.len(), "verifying");
            }
        }
        if !bad.is_empty() {
            return Err(CorpusError::BadShards { uri: self.dir.uri().to_string(), shards: all.len() as u64, bad });
        }
        Ok(report)
    }
}
