//! The local-disk shard cache of a remote store (`memory://` here, with the whole-shard limit
//! forced to 0): batches through it match the other ways of reading byte for byte, a second
//! reader reuses the cached files without a shard GET, a corrupted cached file is replaced, and
//! a bad remote shard still errors naming the object.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use smelt_corpus::{CorpusReader, ReaderOptions, ReaderStats, StoreDir};

type Batches = Vec<(Vec<u32>, Vec<u32>)>;

/// One epoch in steps of 8 sequences of 13 in sample order, 2 steps prefetched, as a worker reads.
fn epoch(r: &CorpusReader) -> (Batches, ReaderStats) {
    let (t, batch, ahead) = (13, 8, 2);
    let order = r.sample_order(t, 11).unwrap();
    let idx: Vec<u64> = (0..order.n_sequences()).map(|k| order.sequence_at(k)).collect();
    let steps: Vec<&[u64]> = idx.chunks(batch).collect();
    for s in steps.iter().take(ahead) {
        r.prefetch(t, s.iter().copied());
    }
    let mut out = Vec::new();
    for (n, s) in steps.iter().enumerate() {
        if let Some(next) = steps.get(n + ahead) {
            r.prefetch(t, next.iter().copied());
        }
        out.push(r.batch(t, s).unwrap());
    }
    (out, r.stats())
}

/// A byte-token corpus of 5 shards at `uri` (some sequences straddle two).
fn prepare(dir: &Path, uri: &str) -> smelt_corpus::Manifest {
    txt_dir(&dir.join("in"), &documents());
    let m = run(&opts(vec![s(&dir.join("in"))], "byte", uri, 800)).manifest.unwrap();
    assert_eq!(m.train.shards.len(), 5);
    m
}

fn cached(cache: &Path) -> ReaderOptions {
    ReaderOptions { whole_split_max_bytes: 0, disk_cache: Some(cache.to_path_buf()), ..Default::default() }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn cached_batches_match_and_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let uri = "memory://disk-cache-test/match";
    let m = prepare(dir.path(), uri);
    let cache = dir.path().join("cache");

    let whole = epoch(&CorpusReader::open_with(uri, ReaderOptions::default()).unwrap()).0;
    let single = epoch(&CorpusReader::open_with(uri, ReaderOptions { whole_split_max_bytes: 0, coalesce: None, ..Default::default() }).unwrap()).0;
    assert!(whole == single);

    // first reader: downloads in the background while reading by ranged GETs
    let r = CorpusReader::open_with(uri, cached(&cache)).unwrap();
    let cdir = r.disk_cache().expect("a remote store over the limit uses the cache").to_path_buf();
    assert!(cdir.starts_with(&cache));
    let (got, _) = epoch(&r);
    assert!(got == whole, "batches through the cache differ from whole shards");
    assert_eq!(r.fill_disk_cache().unwrap(), 5);
    let names: Vec<PathBuf> = m.train.shards.iter().map(|s| cdir.join(&s.name)).collect();
    assert_eq!(files(&cdir), names, "the shards, whole, and no .part file left");
    for (p, sh) in names.iter().zip(&m.train.shards) {
        assert_eq!(std::fs::metadata(p).unwrap().len(), sh.bytes);
    }
    // sequences asked for after the shards are cached are local reads too
    let (again, _) = epoch(&r);
    assert!(again == whole);

    // a second reader: everything from the cached files, not one GET
    let r2 = CorpusReader::open_with(uri, cached(&cache)).unwrap();
    assert_eq!(r2.cached_shards(), 5);
    let (got2, st) = epoch(&r2);
    assert!(got2 == whole);
    assert_eq!((st.requests, st.bytes_fetched), (0, 0), "{st:?}");
    assert_eq!(r2.tokens(0..r2.n_tokens()).unwrap(), CorpusReader::open(uri).unwrap().tokens(0..r2.n_tokens()).unwrap());

    // local stores need no cache
    let local = dir.path().join("local");
    run(&opts(vec![s(&dir.path().join("in"))], "byte", &s(&local), 800));
    assert!(CorpusReader::open_with(&s(&local), cached(&cache)).unwrap().disk_cache().is_none());
    assert!(CorpusReader::open_with(&format!("file://{}", s(&local)), cached(&cache)).unwrap().disk_cache().is_none());
    // nor a split read whole into memory
    let o = ReaderOptions { disk_cache: Some(cache.clone()), ..Default::default() };
    assert!(CorpusReader::open_with(uri, o).unwrap().disk_cache().is_none());
}

#[test]
fn a_corrupted_cached_file_is_downloaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let uri = "memory://disk-cache-test/corrupt";
    let m = prepare(dir.path(), uri);
    let cache = dir.path().join("cache");
    let want = epoch(&CorpusReader::open_with(uri, ReaderOptions::default()).unwrap()).0;
    let r = CorpusReader::open_with(uri, cached(&cache)).unwrap();
    assert_eq!(r.fill_disk_cache().unwrap(), 5);
    let cdir = r.disk_cache().unwrap().to_path_buf();

    // one byte of a token flipped (same size: only the sha256 tells), another file cut short
    let p1 = cdir.join(&m.train.shards[1].name);
    let good = std::fs::read(&p1).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x01;
    std::fs::write(&p1, &bad).unwrap();
    let p3 = cdir.join(&m.train.shards[3].name);
    let good3 = std::fs::read(&p3).unwrap();
    std::fs::write(&p3, &good3[..good3.len() / 2]).unwrap();

    let r2 = CorpusReader::open_with(uri, cached(&cache)).unwrap();
    assert_eq!(r2.cached_shards(), 3, "the changed files are not trusted");
    let (got, _) = epoch(&r2);
    assert!(got == want, "batches are right while the bad copies are replaced");
    assert_eq!(r2.fill_disk_cache().unwrap(), 5);
    assert_eq!(std::fs::read(&p1).unwrap(), good);
    assert_eq!(std::fs::read(&p3).unwrap(), good3);
    let st = r2.stats();
    assert!(st.shards_verified >= 2 && st.bytes_fetched >= (good.len() + good3.len()) as u64, "{st:?}");
    let (again, _) = epoch(&r2);
    assert!(again == want);
}

#[test]
fn a_truncated_remote_shard_errors_naming_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let uri = "memory://disk-cache-test/truncated";
    let m = prepare(dir.path(), uri);
    let name = &m.train.shards[2].name;
    let store = StoreDir::open(uri).unwrap();
    let data = store.get(name).unwrap();
    store.put(name, data.slice(..data.len() - 7)).unwrap();
    let cache = dir.path().join("cache");
    let r = CorpusReader::open_with(uri, cached(&cache)).unwrap();
    let object = format!("{uri}/{name}");

    // a sequence inside that shard, read before anything is cached
    let t = 13;
    let i = (m.train.shards[0].tokens + m.train.shards[1].tokens + 100) / t as u64;
    let e = r.batch(t, &[i]).unwrap_err().to_string();
    assert!(e.contains(&object) && e.contains("truncated"), "{e}");
    let e = r.fill_disk_cache().unwrap_err().to_string();
    assert!(e.contains(&object) && e.contains("truncated"), "{e}");
    let cdir = r.disk_cache().unwrap();
    assert!(files(cdir).iter().all(|p| p.file_name().unwrap() != name.as_str() && p.extension().unwrap() != "part"), "{:?}", files(cdir));
    assert_eq!(r.cached_shards(), 4);
    let e = CorpusReader::open_with(uri, cached(&cache)).unwrap().batch(t, &[i]).unwrap_err().to_string();
    assert!(e.contains(&object), "{e}");
}
