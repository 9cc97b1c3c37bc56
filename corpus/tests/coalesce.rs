//! The reader's three ways of reading — whole shards, coalesced ranged GETs, one GET per
//! sequence — hand out byte-identical batches, on a real `file://` store; coalescing sends far
//! fewer requests.

mod common;

use common::*;
use smelt_corpus::ranges::Coalesce;
use smelt_corpus::{CorpusReader, ReaderOptions, ReaderStats, Tokenizer};

/// Every step's (inputs, targets).
type Batches = Vec<(Vec<u32>, Vec<u32>)>;

/// Reads one epoch in steps of `batch` sequences in sample order, `ahead` steps prefetched,
/// as a worker does; returns every step's (inputs, targets) and the reader's counters.
fn epoch(uri: &str, o: ReaderOptions, t: usize, batch: usize, ahead: usize) -> (Batches, ReaderStats) {
    let r = CorpusReader::open_with(uri, o).unwrap();
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

#[test]
fn every_mode_returns_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    txt_dir(&dir.path().join("in"), &docs);
    let out = dir.path().join("c");
    // byte tokens (u16) in 5 shards: some sequences straddle two
    let m = run(&opts(vec![s(&dir.path().join("in"))], "byte", &s(&out), 800)).manifest.unwrap();
    assert_eq!(m.train.shards.len(), 5, "shards");
    let all: Vec<&String> = docs.iter().collect();
    let stream = expected_stream(&Tokenizer::Byte, &all);
    let (t, batch, ahead) = (13, 8, 2);

    let ranged = ReaderOptions { whole_split_max_bytes: 0, ..Default::default() };
    let (single, st_single) = epoch(&s(&out), ReaderOptions { coalesce: None, ..ranged.clone() }, t, batch, ahead);
    // the reference: straight from the token stream the documents make
    let mut k = 0;
    let order = smelt_corpus::SampleOrder::new((stream.len() as u64 - 1) / t as u64, 11);
    for (x, y) in &single {
        for b in 0..x.len() / t {
            let a = order.sequence_at(k) as usize * t;
            assert_eq!(&x[b * t..b * t + t], &stream[a..a + t]);
            assert_eq!(&y[b * t..b * t + t], &stream[a + 1..a + t + 1]);
            k += 1;
        }
    }
    assert_eq!(k, order.n_sequences());

    let variants = [
        ("coalesced", ranged.clone()),
        // tiny GETs: keys cut into 5-token pieces, nothing merged across a gap
        ("coalesced, 10-byte GETs", ReaderOptions { coalesce: Some(Coalesce { max_gap: 0, max_len: 10 }), ..ranged.clone() }),
        ("coalesced, concurrency 1", ReaderOptions { concurrency: 1, ..ranged.clone() }),
        ("whole shards", ReaderOptions::default()),
    ];
    let mut stats = Vec::new();
    for (name, o) in variants {
        let (got, st) = epoch(&s(&out), o, t, batch, ahead);
        assert!(got == single, "{name}: batches differ from one GET per sequence");
        assert_eq!(st.sequences, st_single.sequences, "{name}");
        stats.push((name, st));
    }
    // Requests, counted from the plan: one GET per (sequence, shard it touches) when reading one
    // by one; one per (step, shard its sequences touch) when coalescing (the shards are far below
    // the 64 KiB gap and 16 MiB cap, and every step is prefetched before it is read); plus two per
    // shard for its header check.
    let ends: Vec<u64> = m.train.shards.iter().scan(0, |e, sh| {
        *e += sh.tokens;
        Some(*e)
    }).collect();
    let shards_of = |i: u64| -> Vec<usize> {
        let (a, b) = (i * t as u64, i * t as u64 + t as u64 + 1);
        (0..ends.len()).filter(|&k| (if k == 0 { 0 } else { ends[k - 1] }) < b && a < ends[k]).collect()
    };
    let idx: Vec<u64> = (0..order.n_sequences()).map(|k| order.sequence_at(k)).collect();
    let headers = 2 * m.train.shards.len() as u64;
    let pieces: u64 = idx.iter().map(|&i| shards_of(i).len() as u64).sum();
    let per_step: u64 = idx
        .chunks(batch)
        .map(|st| st.iter().flat_map(|&i| shards_of(i)).collect::<std::collections::BTreeSet<_>>().len() as u64)
        .sum();
    assert!(pieces > order.n_sequences(), "some sequences straddle shards");
    assert_eq!(st_single.requests, headers + pieces, "{st_single:?}");
    let coalesced = stats[0].1;
    assert_eq!(coalesced.requests, headers + per_step, "{coalesced:?}");
    assert!(coalesced.requests * 2 < st_single.requests);
    // whole shards: every shard read exactly once, with one GET, and its sha256 checked
    let whole = stats[3].1;
    let bytes: u64 = m.train.shards.iter().map(|s| s.bytes).sum();
    assert_eq!((whole.requests, whole.bytes_fetched, whole.shards_verified), (m.train.shards.len() as u64, bytes, m.train.shards.len() as u64));
    // `tokens` agrees in every mode too
    for o in [ranged, ReaderOptions::default(), ReaderOptions { coalesce: Some(Coalesce { max_gap: 0, max_len: 6 }), whole_split_max_bytes: 0, ..Default::default() }] {
        let r = CorpusReader::open_with(&s(&out), o).unwrap();
        assert_eq!(r.tokens(0..r.n_tokens()).unwrap(), stream);
        assert_eq!(r.tokens(90..200).unwrap(), &stream[90..200]);
    }
}

#[test]
fn bad_options_are_refused() {
    let e = CorpusReader::open_with("memory://coalesce-opts/x", ReaderOptions { concurrency: 0, ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("concurrency must be at least 1"), "{e}");
    let o = ReaderOptions { coalesce: Some(Coalesce { max_gap: 0, max_len: 0 }), ..Default::default() };
    assert!(CorpusReader::open_with("memory://coalesce-opts/x", o).unwrap_err().to_string().contains("max_len"));
}
