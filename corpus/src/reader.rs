//! The streaming loader: training sequences of a prepared corpus, read from object storage.
//!
//! [`CorpusReader`] is blocking on the outside (the training thread calls it; no runtime
//! needed) and asynchronous inside: fetches run on [`crate::store::io_runtime`], at most
//! `concurrency` GETs at a time. [`CorpusReader::prefetch`] starts fetching sequences that will
//! be needed soon; [`CorpusReader::sequence`] and [`CorpusReader::batch`] return them, from
//! memory, from a fetch already on its way (waiting for it), or by fetching them now. The time
//! spent waiting is counted in [`ReaderStats`], so a trainer can tell an input-bound step from a
//! compute-bound one.
//!
//! Sequence `i` of length `T` is tokens `[i*T, i*T + T + 1)` of the split's stream — the shards
//! concatenated — so a sequence may span two (or more) shards.
//!
//! Two ways of reading, chosen when the reader is opened:
//! - **whole shards**, when the split's shards add up to at most
//!   [`ReaderOptions::whole_split_max_bytes`]: each shard is read with one GET the first time a
//!   sequence needs it, checked whole (header, size, sha256, every token id) and kept in memory;
//!   every sequence after that is a slice of it. Over a high-latency store the corpus then costs
//!   one request per shard per run.
//! - **ranged GETs** otherwise: the sequences asked for together (a step's batch, one prefetch
//!   call) are mapped to byte ranges of their shards, and neighbouring ranges are merged into few
//!   large GETs ([`crate::ranges::coalesce`]) fetched concurrently; decoded sequences are kept in
//!   a bounded cache. With [`ReaderOptions::coalesce`] = `None` every sequence is its own GET.
//!
//! - **a local-disk shard cache**, when [`ReaderOptions::disk_cache`] is set, the store is remote
//!   (`s3://`, `gs://`, `az://`, `memory://`) and the split is over the whole-shard limit: each
//!   shard a sequence touches is downloaded whole in the background (one streaming GET, into
//!   `<cache>/<manifest digest>/<shard>`, checked — size, header, sha256 — before it is renamed
//!   into place), at most a few at a time, in the order the reads first touch them. Until a
//!   shard is in the cache its sequences are read by ranged GETs as above, so the first steps
//!   never wait for a download; after that they are positioned reads of the local file. Files
//!   left by an earlier run are reused when their size is right and their sha256 (checked once
//!   per process) matches; a corrupt one is deleted and downloaded again, with a warning.
//!
//! Checks: the manifest is checked for consistency when opened; a shard's size and header
//! (magic, version, dtype, token count, vocabulary, end-of-text id) are checked against the
//! manifest when the shard is first touched; every token read is checked against the vocabulary;
//! a shard's sha256 is checked when it has been read whole — by one read (always, in the
//! whole-shard mode), or by ranged reads that arrive front to back — and
//! [`CorpusReader::verify`] reads every shard to check all of it. Ranged reads in a shuffled
//! order do not add up to a hash: `verify` (or `smelt corpus verify`) is the check for those.
//! Every error names the object.

mod disk_cache;
mod fetch;

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{OnceCell, Semaphore};

use crate::error::CorpusError;
use crate::format::{Dtype, Manifest, ShardInfo, SplitInfo, FORMAT, MANIFEST, MANIFEST_VERSION};
use crate::ranges::Coalesce;
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
    /// Decoded sequences kept in memory by the ranged mode (least recently used dropped first),
    /// in bytes of u32 tokens. Prefetching further ahead than this holds is wasted.
    pub cache_bytes: usize,
    /// GETs in flight at once.
    pub concurrency: usize,
    /// How the ranged mode merges the byte ranges of sequences asked for together; `None`: one
    /// GET per sequence (per shard it touches).
    pub coalesce: Option<Coalesce>,
    /// A split whose shards add up to at most this many bytes is read whole shard by shard and
    /// held in memory (see the module docs); 0 always reads ranges.
    pub whole_split_max_bytes: u64,
    /// A local directory for the shard cache of a remote store (see the module docs); `None`:
    /// no cache. Ignored for local stores and for splits read whole into memory.
    pub disk_cache: Option<PathBuf>,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            split: Split::Train,
            cache_bytes: 256 << 20,
            concurrency: 16,
            // Merging pays when reading the hole costs less than another request. Sequences in
            // sample order are sparse, so a wide gap reads mostly holes: with 1 MiB, an epoch of
            // a 13 MB corpus fetched 1.36 GB and was slower over S3 on loopback than one GET per
            // sequence (bench/NOTES.md). 64 KiB merges near neighbours only; raise it for stores
            // with a long round trip. 16 MiB per GET keeps one response from holding up the
            // sequences behind it.
            coalesce: Some(Coalesce { max_gap: 64 << 10, max_len: 16 << 20 }),
            whole_split_max_bytes: 256 << 20,
            disk_cache: None,
        }
    }
}

impl ReaderOptions {
    fn validate(&self) -> Result<(), CorpusError> {
        if self.concurrency == 0 {
            return Err(CorpusError::Invalid("reader concurrency must be at least 1".into()));
        }
        if self.coalesce.is_some_and(|c| c.max_len == 0) {
            return Err(CorpusError::Invalid("the longest coalesced GET (max_len) must be at least 1 byte".into()));
        }
        Ok(())
    }
}

/// Counters since the reader was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReaderStats {
    /// Sequences (or token ranges) handed out by [`CorpusReader::sequence`] and friends.
    pub sequences: u64,
    /// ...of which were ready (in memory, or prefetched and arrived) when asked for.
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

impl Slot {
    fn finish(&self, r: Result<Tokens, CorpusError>) {
        *self.done.lock().unwrap() = Some(r);
        self.cv.notify_all();
    }
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
    /// Index of its first token in the split.
    start: u64,
    header_ok: OnceCell<()>,
    /// The whole object, checked (whole-shard mode).
    whole: OnceCell<Bytes>,
    /// A background load of `whole` was started by a prefetch.
    whole_requested: AtomicBool,
    /// sha256 of the shard's bytes `[0, pos)` while it is being read front to back.
    stream_hash: Mutex<fetch::StreamHash>,
    /// Its checked copy in the disk cache, once there.
    local: std::sync::OnceLock<std::fs::File>,
    /// Serializes the checks and the download of its cached copy.
    cache_lock: tokio::sync::Mutex<()>,
    /// A background download was started.
    cache_requested: AtomicBool,
}

impl Shard {
    fn new(dir: &StoreDir, info: &ShardInfo, start: u64) -> Shard {
        Shard {
            info: info.clone(),
            uri: dir.uri_of(&info.name),
            path: dir.path(&info.name),
            start,
            header_ok: OnceCell::new(),
            whole: OnceCell::new(),
            whole_requested: AtomicBool::new(false),
            stream_hash: Mutex::new(fetch::StreamHash::new()),
            local: std::sync::OnceLock::new(),
            cache_lock: tokio::sync::Mutex::new(()),
            cache_requested: AtomicBool::new(false),
        }
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
    coalesce: Option<Coalesce>,
    /// Whole-shard mode (see the module docs).
    whole: bool,
    /// The shard cache's directory for this corpus, when the disk cache is in use.
    disk_cache: Option<PathBuf>,
    permits: Arc<Semaphore>,
    /// Downloads into the disk cache in flight at once.
    dl_permits: Arc<Semaphore>,
    state: Mutex<CacheState>,
    sequences: AtomicU64,
    ready: AtomicU64,
    wait_nanos: AtomicU64,
    requests: AtomicU64,
    bytes_fetched: AtomicU64,
    shards_verified: AtomicU64,
}

impl Inner {
    /// The shards holding tokens `[start, start + len)`.
    fn shards_of(&self, (start, len): Key) -> Range<usize> {
        let first = self.shards.partition_point(|s| s.start <= start) - 1;
        let last = self.shards.partition_point(|s| s.start < start + len);
        first..last.max(first + 1)
    }
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
            .field("whole_shards", &self.inner.whole)
            .field("disk_cache", &self.inner.disk_cache)
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
            let want = crate::format::HEADER_BYTES + s.tokens * m.dtype.bytes();
            if s.bytes != want {
                return Err(format!("{}: {} bytes listed, but {} {} tokens take {want}", s.name, s.bytes, s.tokens, m.dtype.name()));
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
        Self::open_dir(StoreDir::open(uri)?, opts)
    }

    /// Opens the corpus in `dir` (e.g. a store client built by hand with [`StoreDir::from_parts`]).
    pub fn open_dir(dir: StoreDir, opts: ReaderOptions) -> Result<CorpusReader, CorpusError> {
        opts.validate()?;
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
        let split_bytes: u64 = split_info.shards.iter().map(|s| s.bytes).sum();
        let whole = split_bytes <= opts.whole_split_max_bytes;
        let disk_cache = match &opts.disk_cache {
            Some(root) if !whole && disk_cache::is_remote(dir.uri()) => Some(disk_cache::cache_dir(root, &manifest)),
            _ => None,
        };
        if let Some(d) = &disk_cache {
            std::fs::create_dir_all(d).map_err(|e| CorpusError::io(d.display().to_string(), e))?;
        }
        let inner = Inner {
            total: split_info.tokens,
            dtype: manifest.dtype,
            dir,
            split: opts.split,
            shards,
            cache_bytes: opts.cache_bytes,
            coalesce: opts.coalesce,
            whole,
            disk_cache,
            permits: Arc::new(Semaphore::new(opts.concurrency)),
            dl_permits: Arc::new(Semaphore::new(opts.concurrency.min(disk_cache::DOWNLOADS))),
            state: Mutex::new(CacheState::default()),
            sequences: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            wait_nanos: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            shards_verified: AtomicU64::new(0),
            manifest,
        };
        inner.adopt_verified();
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
    /// Whether the split is read whole shard by shard (see the module docs).
    pub fn whole_shards(&self) -> bool {
        self.inner.whole
    }

    /// The directory of this corpus's shard cache, when reads go through one (see the module docs).
    pub fn disk_cache(&self) -> Option<&std::path::Path> {
        self.inner.disk_cache.as_deref()
    }

    /// Shards of the split whose checked copy is in the disk cache.
    pub fn cached_shards(&self) -> usize {
        self.inner.shards.iter().filter(|s| s.local.get().is_some()).count()
    }

    /// Puts every shard of the split into the disk cache now (reusing good copies, downloading
    /// the rest), waiting for downloads already on their way; the number of shards cached. 0
    /// when the reader uses no disk cache.
    pub fn fill_disk_cache(&self) -> Result<usize, CorpusError> {
        if self.inner.disk_cache.is_none() {
            return Ok(0);
        }
        let inner = self.inner.clone();
        block_on_io(async move {
            let all: FuturesUnordered<_> = (0..inner.shards.len()).map(|k| inner.cache_shard(k)).collect();
            let results: Vec<_> = all.collect().await;
            results.into_iter().collect::<Result<Vec<()>, _>>()
        })
        .unwrap_or_else(|| Err(CorpusError::Invalid("a cache task panicked".into())))?;
        Ok(self.cached_shards())
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
    /// way. Indices out of range are ignored here (and refused by `sequence`). The sequences of
    /// one call are fetched together (their ranges coalesced).
    pub fn prefetch(&self, seq_len: usize, indices: impl IntoIterator<Item = u64>) {
        let keys: Vec<Key> = indices.into_iter().filter_map(|i| self.seq_key(seq_len, i).ok()).collect();
        if self.inner.whole {
            self.load_shards_in_background(&keys);
        } else {
            self.request(&keys);
        }
    }

    /// Sequence `i`: tokens `[i*seq_len, i*seq_len + seq_len + 1)` — `seq_len` inputs and, shifted
    /// by one, `seq_len` targets.
    pub fn sequence(&self, seq_len: usize, i: u64) -> Result<Vec<u32>, CorpusError> {
        let key = self.seq_key(seq_len, i)?;
        Ok(self.fetch_cached(key)?.as_ref().clone())
    }

    /// Sequences `indices`, back to back: inputs `(B, T)` and targets `(B, T)`. All are
    /// requested at once, so they are fetched together.
    pub fn batch(&self, seq_len: usize, indices: &[u64]) -> Result<(Vec<u32>, Vec<u32>), CorpusError> {
        let keys = indices.iter().map(|&i| self.seq_key(seq_len, i)).collect::<Result<Vec<_>, _>>()?;
        if self.inner.whole {
            self.load_shards_in_background(&keys);
        } else {
            self.request(&keys);
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
        let key = (range.start, range.end - range.start);
        let inner = self.inner.clone();
        let t = Instant::now();
        let r = block_on_io(async move {
            if key.1 == 0 {
                return Ok(Vec::new());
            }
            if inner.whole {
                inner.load_whole_range(key).await?;
                return Ok(inner.slice_loaded(key).expect("its shards were just loaded"));
            }
            let mut out = None;
            inner.fetch_keys(&[key], |_, r| out = Some(r)).await;
            out.expect("fetch_keys answers every key")
        })
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

    /// Whole-shard mode: starts loading the shards `keys` need that nobody has asked for yet.
    fn load_shards_in_background(&self, keys: &[Key]) {
        for &key in keys {
            for k in self.inner.shards_of(key) {
                let shard = &self.inner.shards[k];
                if shard.whole.initialized() || shard.whole_requested.swap(true, Ordering::Relaxed) {
                    continue;
                }
                let inner = self.inner.clone();
                io_runtime().spawn(async move {
                    // an error is reported to whoever asks for the sequence (which loads again)
                    if inner.load_whole(k).await.is_err() {
                        inner.shards[k].whole_requested.store(false, Ordering::Relaxed);
                    }
                });
            }
        }
    }

    /// Disk cache: starts downloading the shards `keys` touch that are neither cached nor on
    /// their way, in the order the keys touch them.
    fn start_downloads(&self, keys: &[Key]) {
        for &key in keys {
            for k in self.inner.shards_of(key) {
                let shard = &self.inner.shards[k];
                if shard.local.get().is_some() || shard.cache_requested.swap(true, Ordering::Relaxed) {
                    continue;
                }
                let inner = self.inner.clone();
                io_runtime().spawn(async move {
                    // reads go on by ranged GETs (which report a bad object themselves)
                    if let Err(e) = inner.cache_shard(k).await {
                        tracing::warn!("disk cache: {e}");
                        inner.shards[k].cache_requested.store(false, Ordering::Relaxed);
                    }
                });
            }
        }
    }

    /// Ranged mode: for each key, its cached value or the slot of its fetch. The keys neither
    /// cached nor on their way are fetched by one new task, their ranges coalesced.
    fn request(&self, keys: &[Key]) -> Vec<Lookup> {
        if self.inner.disk_cache.is_some() {
            self.start_downloads(keys);
        }
        let mut out = Vec::with_capacity(keys.len());
        let mut new: Vec<(Key, Arc<Slot>)> = Vec::new();
        {
            let mut st = self.inner.state.lock().unwrap();
            for &key in keys {
                if let Some(v) = st.get(&key) {
                    out.push(Lookup::Ready(v));
                } else if let Some(slot) = st.inflight.get(&key) {
                    out.push(Lookup::Pending(slot.clone()));
                } else {
                    let slot = Arc::new(Slot { done: Mutex::new(None), cv: Condvar::new() });
                    st.inflight.insert(key, slot.clone());
                    new.push((key, slot.clone()));
                    out.push(Lookup::Pending(slot));
                }
            }
        }
        if !new.is_empty() {
            let inner = self.inner.clone();
            io_runtime().spawn(async move {
                let keys: Vec<Key> = new.iter().map(|(k, _)| *k).collect();
                inner
                    .fetch_keys(&keys, |i, r| {
                        let (key, slot) = &new[i];
                        let r = r.map(Arc::new);
                        {
                            let mut st = inner.state.lock().unwrap();
                            st.inflight.remove(key);
                            if let Ok(v) = &r {
                                st.insert(*key, v.clone(), inner.cache_bytes);
                            }
                        }
                        slot.finish(r);
                    })
                    .await;
            });
        }
        out
    }

    fn fetch_cached(&self, key: Key) -> Result<Tokens, CorpusError> {
        self.inner.sequences.fetch_add(1, Ordering::Relaxed);
        if self.inner.whole {
            if let Some(v) = self.inner.slice_loaded(key) {
                self.inner.ready.fetch_add(1, Ordering::Relaxed);
                return Ok(Arc::new(v));
            }
            let inner = self.inner.clone();
            let t = Instant::now();
            let r = block_on_io(async move { inner.load_whole_range(key).await })
                .unwrap_or_else(|| Err(CorpusError::Invalid("a fetch task panicked".into())));
            self.inner.wait_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            r?;
            return Ok(Arc::new(self.inner.slice_loaded(key).expect("its shards were just loaded")));
        }
        let slot = match self.request(&[key]).pop().expect("one key, one lookup") {
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
