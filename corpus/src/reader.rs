//! The streaming loader: training sequences of a prepared corpus, read with ranged GETs.
//!
//! [`CorpusReader`] is blocking on the outside (the training thread calls it; no runtime
//! needed) and asynchronous inside: fetches run on [`crate::store::io_runtime`], at most
//! `concurrency` at a time. [`CorpusReader::prefetch`] starts fetching sequences that will be
//! needed soon; [`CorpusReader::sequence`] returns one, from the cache, from a fetch already on
//! its way (waiting for it), or by fetching it now. The time spent waiting is counted in
//! [`ReaderStats`], so a trainer can tell an input-bound step from a compute-bound one.
//!
//! Sequence `i` of length `T` is tokens `[i*T, i*T + T + 1)` of the split's stream — the shards
//! concatenated — so a sequence may span two (or more) shards.
//!
//! Checks: the manifest is checked for consistency when opened; a shard's size and header
//! (magic, version, dtype, token count, vocabulary, end-of-text id) are checked against the
//! manifest when the shard is first touched; every token read is checked against the vocabulary;
//! a shard's sha256 is checked when it has been read whole — by one read, or by reads that arrive
//! front to back (a sequential pass such as an evaluation over the validation split) — and
//! [`CorpusReader::verify`] reads every shard to check all of it. Reads in a shuffled order do
//! not add up to a hash: `verify` (or `smelt corpus verify`) is the check for those. Every error
//! names the object.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use sha2::Digest;
use tokio::sync::{OnceCell, Semaphore};

use crate::error::CorpusError;
use crate::format::{hex, Dtype, Manifest, ShardHeader, ShardInfo, SplitInfo, FORMAT, HEADER_BYTES, MANIFEST, MANIFEST_VERSION};
use crate::sample_order::SampleOrder;
use crate::store::{block_on_io, io_runtime, StoreDir, StoreError};

/// Which split a reader serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Split {
    #[default]
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "validation",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ReaderOptions {
    pub split: Split,
    /// Decoded sequences kept in memory (least recently used dropped first), in bytes of u32
    /// tokens. Prefetching further ahead than this holds is wasted.
    pub cache_bytes: usize,
    /// Fetches in flight at once.
    pub concurrency: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions { split: Split::Train, cache_bytes: 256 << 20, concurrency: 16 }
    }
}

/// Counters since the reader was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReaderStats {
    /// Sequences (or token ranges) handed out by [`CorpusReader::sequence`] and friends.
    pub sequences: u64,
    /// ...of which were ready (cached or prefetched and arrived) when asked for.
    pub ready: u64,
    /// Seconds the caller spent blocked waiting for data.
    pub wait_seconds: f64,
    /// GET requests sent (ranged or whole; header checks included).
    pub requests: u64,
    pub bytes_fetched: u64,
    /// Shards whose sha256 was checked (whole reads and [`CorpusReader::verify`]).
    pub shards_verified: u64,
}

/// What [`CorpusReader::verify`] checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub shards: u64,
    pub bytes: u64,
    pub tokens: u64,
}

/// Cache key: a token range of the split, `(start, len)`.
type Key = (u64, u64);
type Tokens = Arc<Vec<u32>>;

enum Lookup {
    Ready(Tokens),
    Pending(Arc<Slot>),
}

struct Slot {
    done: Mutex<Option<Result<Tokens, CorpusError>>>,
    cv: Condvar,
}

#[derive(Default)]
struct CacheState {
    map: HashMap<Key, (Tokens, u64)>,
    order: VecDeque<(Key, u64)>,
    tick: u64,
    bytes: usize,
    inflight: HashMap<Key, Arc<Slot>>,
}

impl CacheState {
    fn get(&mut self, key: &Key) -> Option<Tokens> {
        self.tick += 1;
        let tick = self.tick;
        let (v, t) = self.map.get_mut(key)?;
        *t = tick;
        let v = v.clone();
        self.order.push_back((*key, tick));
        Some(v)
    }

    fn insert(&mut self, key: Key, v: Tokens, cap: usize) {
        self.tick += 1;
        let size = v.len() * 4;
        if let Some((old, _)) = self.map.insert(key, (v, self.tick)) {
            self.bytes -= old.len() * 4;
        }
        self.bytes += size;
        self.order.push_back((key, self.tick));
        while self.bytes > cap {
            let Some((k, t)) = self.order.pop_front() else { break };
            if self.map.get(&k).is_some_and(|(_, cur)| *cur == t) {
                let (old, _) = self.map.remove(&k).unwrap();
                self.bytes -= old.len() * 4;
            }
        }
        // stale entries of the order queue are dropped lazily; keep it from growing unboundedly
        if self.order.len() > 4 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|(k, t)| map.get(k).is_some_and(|(_, cur)| cur == t));
        }
    }
}

struct Shard {
    info: ShardInfo,
    uri: String,
    path: object_store::path::Path,
    start: u64,
    header_ok: OnceCell<()>,
    /// sha256 of the shard's bytes `[0, pos)` while it is being read front to back.
    stream_hash: Mutex<StreamHash>,
}

enum StreamHash {
    /// Bytes `[0, pos)` hashed so far.
    Running(u64, sha2::Sha256),
    /// Checked (or abandoned: a whole-shard read checked it instead).
    Done,
}

impl Shard {
    fn new(dir: &StoreDir, info: &ShardInfo, start: u64) -> Shard {
        Shard {
            info: info.clone(),
            uri: dir.uri_of(&info.name),
            path: dir.path(&info.name),
            start,
            header_ok: OnceCell::new(),
            stream_hash: Mutex::new(StreamHash::Running(0, sha2::Sha256::new())),
        }
    }

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

struct Inner {
    dir: StoreDir,
    manifest: Manifest,
    split: Split,
    shards: Vec<Shard>,
    total: u64,
    dtype: Dtype,
    cache_bytes: usize,
    permits: Arc<Semaphore>,
    state: Mutex<CacheState>,
    sequences: AtomicU64,
    ready: AtomicU64,
    wait_nanos: AtomicU64,
    requests: AtomicU64,
    bytes_fetched: AtomicU64,
    shards_verified: AtomicU64,
}

/// A prepared corpus, opened for reading one split. Cheap to clone (shared state).
#[derive(Clone)]
pub struct CorpusReader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CorpusReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorpusReader")
            .field("uri", &self.uri())
            .field("split", &self.inner.split)
            .field("tokens", &self.inner.total)
            .field("shards", &self.inner.shards.len())
            .finish()
    }
}

fn check_manifest(m: &Manifest) -> Result<(), String> {
    if m.format != FORMAT {
        return Err(format!("format {:?}, expected {FORMAT:?}", m.format));
    }
    if m.version != MANIFEST_VERSION {
        return Err(format!("manifest version {}; this smelt reads version {MANIFEST_VERSION}", m.version));
    }
    if m.vocab_size as usize != m.tokenizer.corpus_vocab_size() {
        return Err(format!(
            "vocab_size {} but the {} tokenizer makes {}",
            m.vocab_size,
            m.tokenizer.kind(),
            m.tokenizer.corpus_vocab_size()
        ));
    }
    if m.eot_token != m.tokenizer.eot_token() {
        return Err(format!("eot_token {} but the {} tokenizer's is {}", m.eot_token, m.tokenizer.kind(), m.tokenizer.eot_token()));
    }
    if m.dtype.bytes() < Dtype::for_vocab(m.vocab_size as u64).bytes() {
        return Err(format!("dtype {} cannot hold a vocabulary of {}", m.dtype.name(), m.vocab_size));
    }
    for (name, split) in [("train", &m.train), ("val", &m.val)] {
        let tokens: u64 = split.shards.iter().map(|s| s.tokens).sum();
        if tokens != split.tokens {
            return Err(format!("{name}: {} tokens listed but its shards hold {tokens}", split.tokens));
        }
        for s in &split.shards {
            if s.name.is_empty() || s.name.contains(['/', '\\']) || s.name.starts_with('.') {
                return Err(format!("{name}: bad shard name {:?}", s.name));
            }
            if s.bytes != HEADER_BYTES + s.tokens * m.dtype.bytes() {
                return Err(format!("{}: {} bytes listed, but {} {} tokens take {}", s.name, s.bytes, s.tokens, m.dtype.name(), HEADER_BYTES + s.tokens * m.dtype.bytes()));
            }
            if s.tokens == 0 {
                return Err(format!("{}: an empty shard", s.name));
            }
        }
    }
    Ok(())
}

/// Reads and checks the manifest at `dir`.
pub fn read_manifest(dir: &StoreDir) -> Result<Manifest, CorpusError> {
    let bytes = dir.get(MANIFEST).map_err(|e| match e {
        StoreError::NotFound { .. } => CorpusError::NoCorpus { uri: dir.uri().to_string() },
        e => e.into(),
    })?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| CorpusError::BadManifest { uri: dir.uri_of(MANIFEST), reason: e.to_string() })?;
    check_manifest(&m).map_err(|reason| CorpusError::BadManifest { uri: dir.uri_of(MANIFEST), reason })?;
    Ok(m)
}

impl CorpusReader {
    /// Opens the training split of the corpus at `uri` (see [`StoreDir::open`]).
    pub fn open(uri: &str) -> Result<CorpusReader, CorpusError> {
        Self::open_with(uri, ReaderOptions::default())
    }

    pub fn open_with(uri: &str, opts: ReaderOptions) -> Result<CorpusReader, CorpusError> {
        let dir = StoreDir::open(uri)?;
        let manifest = read_manifest(&dir)?;
        let split_info: &SplitInfo = match opts.split {
            Split::Train => &manifest.train,
            Split::Val => &manifest.val,
        };
        if split_info.tokens == 0 {
            return Err(CorpusError::Empty(format!("{}: the {} split holds no tokens", dir.uri(), opts.split.name())));
        }
        let mut start = 0;
        let shards = split_info
            .shards
            .iter()
            .map(|info| {
                let s = Shard::new(&dir, info, start);
                start += info.tokens;
                s
            })
            .collect();
        let inner = Inner {
            total: split_info.tokens,
            dtype: manifest.dtype,
            dir,
            split: opts.split,
            shards,
            cache_bytes: opts.cache_bytes,
            permits: Arc::new(Semaphore::new(opts.concurrency.max(1))),
            state: Mutex::new(CacheState::default()),
            sequences: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            wait_nanos: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            shards_verified: AtomicU64::new(0),
            manifest,
        };
        Ok(CorpusReader { inner: Arc::new(inner) })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }
    pub fn uri(&self) -> &str {
        self.inner.dir.uri()
    }
    pub fn split(&self) -> Split {
        self.inner.split
    }
    /// Tokens in this split.
    pub fn n_tokens(&self) -> u64 {
        self.inner.total
    }
    pub fn vocab_size(&self) -> u32 {
        self.inner.manifest.vocab_size
    }

    /// Whole sequences of `seq_len` inputs (plus the one target after them): `(n_tokens - 1) / seq_len`.
    pub fn n_sequences(&self, seq_len: usize) -> u64 {
        assert!(seq_len > 0, "seq_len must be at least 1");
        (self.inner.total - 1) / seq_len as u64
    }

    /// The sample order of this split's sequences (see [`SampleOrder`]).
    pub fn sample_order(&self, seq_len: usize, seed: u64) -> Result<SampleOrder, CorpusError> {
        SampleOrder::try_new(self.n_sequences(seq_len), seed).map_err(|e| {
            CorpusError::Empty(format!("{}: {} ({} tokens, sequences of {seq_len})", self.uri(), e, self.inner.total))
        })
    }

    fn seq_key(&self, seq_len: usize, i: u64) -> Result<Key, CorpusError> {
        let n = self.n_sequences(seq_len);
        if i >= n {
            return Err(CorpusError::Invalid(format!(
                "{}: sequence {i} is outside the {n} sequences of {seq_len} tokens in the {} split",
                self.uri(),
                self.inner.split.name()
            )));
        }
        Ok((i * seq_len as u64, seq_len as u64 + 1))
    }

    /// Starts fetching sequences `indices` (of length `seq_len`) in the background; returns at
    /// once. Asking for them later with [`CorpusReader::sequence`] finds them ready or on their
    /// way. Indices out of range are ignored here (and refused by `sequence`).
    pub fn prefetch(&self, seq_len: usize, indices: impl IntoIterator<Item = u64>) {
        for i in indices {
            if let Ok(key) = self.seq_key(seq_len, i) {
                self.slot_for(key);
            }
        }
    }

    /// Sequence `i`: tokens `[i*seq_len, i*seq_len + seq_len + 1)` — `seq_len` inputs and, shifted
    /// by one, `seq_len` targets.
    pub fn sequence(&self, seq_len: usize, i: u64) -> Result<Vec<u32>, CorpusError> {
        let key = self.seq_key(seq_len, i)?;
        Ok(self.fetch_cached(key)?.as_ref().clone())
    }

    /// Sequences `indices`, back to back: inputs `(B, T)` and targets `(B, T)`. All are
    /// requested at once, so they are fetched concurrently.
    pub fn batch(&self, seq_len: usize, indices: &[u64]) -> Result<(Vec<u32>, Vec<u32>), CorpusError> {
        let keys = indices.iter().map(|&i| self.seq_key(seq_len, i)).collect::<Result<Vec<_>, _>>()?;
        for &k in &keys {
            self.slot_for(k);
        }
        let (mut x, mut y) = (Vec::with_capacity(keys.len() * seq_len), Vec::with_capacity(keys.len() * seq_len));
        for k in keys {
            let t = self.fetch_cached(k)?;
            x.extend_from_slice(&t[..seq_len]);
            y.extend_from_slice(&t[1..]);
        }
        Ok((x, y))
    }

    /// Tokens `range` of the split, fetched now (not cached).
    pub fn tokens(&self, range: Range<u64>) -> Result<Vec<u32>, CorpusError> {
        if range.start > range.end || range.end > self.inner.total {
            return Err(CorpusError::Invalid(format!(
                "{}: tokens {range:?} outside the {} tokens of the {} split",
                self.uri(),
                self.inner.total,
                self.inner.split.name()
            )));
        }
        let inner = self.inner.clone();
        let t = Instant::now();
        let r = block_on_io(async move { inner.fetch(range.start, range.end - range.start).await })
            .unwrap_or_else(|| Err(CorpusError::Invalid("a fetch task panicked".into())));
        self.inner.wait_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.inner.sequences.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Reads every shard of both splits whole: header, size, sha256, every token id.
    pub fn verify(&self) -> Result<VerifyReport, CorpusError> {
        let inner = self.inner.clone();
        block_on_io(async move { inner.verify_all().await }).unwrap_or_else(|| Err(CorpusError::Invalid("verify task panicked".into())))
    }

    pub fn stats(&self) -> ReaderStats {
        let i = &self.inner;
        ReaderStats {
            sequences: i.sequences.load(Ordering::Relaxed),
            ready: i.ready.load(Ordering::Relaxed),
            wait_seconds: i.wait_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            requests: i.requests.load(Ordering::Relaxed),
            bytes_fetched: i.bytes_fetched.load(Ordering::Relaxed),
            shards_verified: i.shards_verified.load(Ordering::Relaxed),
        }
    }

    /// The cached value of `key`, or the slot of its fetch (started here if none is running).
    fn slot_for(&self, key: Key) -> Lookup {
        let mut st = self.inner.state.lock().unwrap();
        if let Some(v) = st.get(&key) {
            return Lookup::Ready(v);
        }
        if let Some(slot) = st.inflight.get(&key) {
            return Lookup::Pending(slot.clone());
        }
        let slot = Arc::new(Slot { done: Mutex::new(None), cv: Condvar::new() });
        st.inflight.insert(key, slot.clone());
        drop(st);
        let inner = self.inner.clone();
        let s = slot.clone();
        io_runtime().spawn(async move {
            let r = {
                let _permit = inner.permits.clone().acquire_owned().await.expect("semaphore never closed");
                inner.fetch(key.0, key.1).await.map(Arc::new)
            };
            {
                let mut st = inner.state.lock().unwrap();
                st.inflight.remove(&key);
                if let Ok(v) = &r {
                    st.insert(key, v.clone(), inner.cache_bytes);
                }
            }
            *s.done.lock().unwrap() = Some(r);
            s.cv.notify_all();
        });
        Lookup::Pending(slot)
    }

    fn fetch_cached(&self, key: Key) -> Result<Tokens, CorpusError> {
        self.inner.sequences.fetch_add(1, Ordering::Relaxed);
        let slot = match self.slot_for(key) {
            Lookup::Ready(v) => {
                self.inner.ready.fetch_add(1, Ordering::Relaxed);
                return Ok(v);
            }
            Lookup::Pending(slot) => slot,
        };
        let mut done = slot.done.lock().unwrap();
        if done.is_some() {
            self.inner.ready.fetch_add(1, Ordering::Relaxed);
        } else {
            let t = Instant::now();
            while done.is_none() {
                done = slot.cv.wait(done).unwrap();
            }
            self.inner.wait_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        done.as_ref().unwrap().clone()
    }
}

impl Inner {
    fn store_err(&self, op: &'static str, shard: &Shard, e: object_store::Error) -> CorpusError {
        StoreError::from_object_store(op, shard.uri.clone(), e).into()
    }

    /// Checks shard `k`'s size and header against the manifest (once).
    async fn check_header(&self, k: usize) -> Result<(), CorpusError> {
        let shard = &self.shards[k];
        shard
            .header_ok
            .get_or_try_init(|| async {
                let store = self.dir.store();
                let meta = store.head(&shard.path).await.map_err(|e| self.store_err("head", shard, e))?;
                let n = HEADER_BYTES.min(meta.size);
                let head = store.get_range(&shard.path, 0..n).await.map_err(|e| self.store_err("get_range", shard, e))?;
                self.requests.fetch_add(2, Ordering::Relaxed);
                self.bytes_fetched.fetch_add(head.len() as u64, Ordering::Relaxed);
                self.check_header_bytes(shard, &head, meta.size)?;
                shard.feed(0, &head);
                Ok::<(), CorpusError>(())
            })
            .await
            .map(|_| ())
    }

    fn check_header_bytes(&self, shard: &Shard, head: &[u8], size: u64) -> Result<(), CorpusError> {
        let bad = |reason: String| CorpusError::bad_shard(&shard.uri, reason);
        let h = ShardHeader::parse(head).map_err(bad)?;
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

    fn check_sha(&self, shard: &Shard, sha: &str) -> Result<(), CorpusError> {
        if sha != shard.info.sha256 {
            return Err(CorpusError::bad_shard(&shard.uri, format!("sha256 {sha} does not match the manifest's {}", shard.info.sha256)));
        }
        self.shards_verified.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn check_ids(&self, shard: &Shard, first: u64, ids: &[u32]) -> Result<(), CorpusError> {
        let v = self.manifest.vocab_size;
        if let Some(p) = ids.iter().position(|&t| t >= v) {
            return Err(CorpusError::bad_shard(
                &shard.uri,
                format!("token {} (position {} of the shard) is outside the vocabulary of {v}", ids[p], first + p as u64),
            ));
        }
        Ok(())
    }

    /// Tokens `[start, start + len)` of the split.
    async fn fetch(&self, start: u64, len: u64) -> Result<Vec<u32>, CorpusError> {
        let end = start + len;
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = start;
        while pos < end {
            let k = self.shards.partition_point(|s| s.start <= pos) - 1;
            let shard = &self.shards[k];
            let lo = pos - shard.start;
            let hi = (end - shard.start).min(shard.info.tokens);
            self.read_shard(k, lo, hi, &mut out).await?;
            pos = shard.start + hi;
        }
        Ok(out)
    }

    /// Appends tokens `[lo, hi)` of shard `k` to `out`.
    async fn read_shard(&self, k: usize, lo: u64, hi: u64, out: &mut Vec<u32>) -> Result<(), CorpusError> {
        self.check_header(k).await?;
        let shard = &self.shards[k];
        let w = self.dtype.bytes();
        let store = self.dir.store();
        let before = out.len();
        if lo == 0 && hi == shard.info.tokens {
            // A whole shard: check its hash too.
            let data = store.get(&shard.path).await.map_err(|e| self.store_err("get", shard, e))?;
            let data = data.bytes().await.map_err(|e| self.store_err("get", shard, e))?;
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.bytes_fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
            self.check_header_bytes(shard, &data, data.len() as u64)?;
            let sha = hex(&sha2::Sha256::digest(&data));
            self.check_sha(shard, &sha)?;
            *shard.stream_hash.lock().unwrap() = StreamHash::Done;
            self.dtype.decode_into(&data[HEADER_BYTES as usize..], out);
        } else {
            let range = HEADER_BYTES + lo * w..HEADER_BYTES + hi * w;
            let data = store.get_range(&shard.path, range.clone()).await.map_err(|e| self.store_err("get_range", shard, e))?;
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.bytes_fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
            if data.len() as u64 != range.end - range.start {
                return Err(CorpusError::bad_shard(&shard.uri, format!("asked for bytes {range:?}, got {}", data.len())));
            }
            if let Some(sha) = shard.feed(range.start, &data) {
                self.check_sha(shard, &sha)?; // the shard has now been read front to back
            }
            self.dtype.decode_into(&data, out);
        }
        self.check_ids(shard, lo, &out[before..])
    }

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

    async fn verify_all(&self) -> Result<VerifyReport, CorpusError> {
        // Both splits, whichever this reader serves.
        let mut all: Vec<Shard> = Vec::new();
        for info in self.manifest.train.shards.iter().chain(&self.manifest.val.shards) {
            all.push(Shard::new(&self.dir, info, 0));
        }
        let mut report = VerifyReport::default();
        for s in &all {
            let (bytes, tokens) = self.verify_shard(s).await?;
            report.shards += 1;
            report.bytes += bytes;
            report.tokens += tokens;
        }
        Ok(report)
    }
}
