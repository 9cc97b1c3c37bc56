//! The corpus pipeline against a real S3-protocol server on loopback (`smelt_corpus::loopback`:
//! s3s + s3s-fs, in process): `s3://` URIs configured from the environment, as in production;
//! inputs listed and globbed from a bucket; resume; every way of reading; a missing object named
//! by its `s3://` URI. Own test binary: it sets process-wide variables.

mod common;

use common::*;
use smelt_corpus::loopback::S3Loopback;
use smelt_corpus::{CorpusReader, ReaderOptions, StoreDir, Tokenizer};

#[test]
fn prepare_from_and_to_s3_and_read_every_way() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Loopback::start(&dir.path().join("s3")).unwrap();
    server.create_bucket("bucket").unwrap();
    server.create_bucket("inputs").unwrap();
    // SAFETY: set before any other thread of this test binary reads the environment.
    for (k, v) in server.env() {
        unsafe { std::env::set_var(k, v) };
    }

    // inputs uploaded through the S3 API: .jsonl.gz and .txt under a prefix, plus objects a
    // glob must not pick up (another extension, a deeper key, a hidden one)
    let docs = documents();
    let up = StoreDir::open("s3://inputs/raw").unwrap();
    let gz = |text: &str| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    };
    up.put("part-0.jsonl.gz", gz(&jsonl(&docs[..4], "text"))).unwrap();
    up.put("part-1.jsonl.gz", gz(&jsonl(&docs[4..7], "text"))).unwrap();
    up.put("part-2.jsonl", jsonl(&docs[7..], "text").into_bytes()).unwrap();
    up.put("notes.md", b"not an input".to_vec()).unwrap();
    up.put("deeper/part-9.jsonl.gz", gz(&jsonl(&docs[..1], "text"))).unwrap();
    up.put(".hidden.jsonl", b"{\"text\": \"no\"}\n".to_vec()).unwrap();

    let uri = "s3://bucket/corpora/docs";
    let mut o = opts(vec!["s3://inputs/raw/*.jsonl.gz".into(), "s3://inputs/raw/part-2.jsonl".into()], "gpt2", uri, 40);
    o.stop_after_shards = Some(2);
    let first = run(&o);
    assert!(!first.complete && first.shards_written == 2);
    assert_eq!(first.input_files, 3);
    assert!(dir.path().join("s3/bucket/corpora/docs/progress.json").exists());
    o.stop_after_shards = None;
    let rep = run(&o);
    assert!(rep.complete);
    assert_eq!(rep.shards_kept, 2);
    // s3s-fs lists no ETags, so each kept shard's header (32 bytes) is read, not the shard
    assert_eq!(rep.resume_bytes_read, 2 * 32);
    let m = rep.manifest.unwrap();
    assert_eq!(m.settings.sources[0].path, "s3://inputs/raw/part-0.jsonl.gz");

    let all: Vec<&String> = docs.iter().collect();
    let want = expected_stream(&Tokenizer::Gpt2, &all);
    // a prefix input (every .txt/.jsonl object under it, recursively, hidden ones skipped)
    // finds the same documents plus the deeper one
    let p = opts(vec!["s3://inputs/raw/".into()], "gpt2", "memory://s3-test/prefix", 40);
    assert_eq!(run(&p).input_files, 4);

    // every way of reading gives the same sequences over S3
    let ranged = ReaderOptions { whole_split_max_bytes: 0, ..Default::default() };
    let t = 13;
    for (name, ro) in [("whole", ReaderOptions::default()), ("coalesced", ranged.clone()), ("single", ReaderOptions { coalesce: None, ..ranged })] {
        let r = CorpusReader::open_with(uri, ro).unwrap();
        assert_eq!(r.n_tokens(), want.len() as u64);
        let order = r.sample_order(t, 1).unwrap();
        let idx: Vec<u64> = (0..r.n_sequences(t)).map(|k| order.sequence_at(k)).collect();
        for (n, step) in idx.chunks(4).enumerate() {
            if let Some(next) = idx.chunks(4).nth(n + 1) {
                r.prefetch(t, next.iter().copied());
            }
            let (x, _) = r.batch(t, step).unwrap();
            for (b, &i) in step.iter().enumerate() {
                let a = i as usize * t;
                assert_eq!(&x[b * t..b * t + t], &want[a..a + t], "{name}: sequence {i}");
            }
        }
        assert_eq!(r.tokens(0..r.n_tokens()).unwrap(), want, "{name}");
    }
    assert_eq!(CorpusReader::open(uri).unwrap().verify().unwrap().shards, m.train.shards.len() as u64);

    // a missing object is named by its s3:// URI, in every mode
    std::fs::remove_file(dir.path().join("s3/bucket/corpora/docs/shard-00001.bin")).unwrap();
    for ro in [ReaderOptions::default(), ReaderOptions { whole_split_max_bytes: 0, ..Default::default() }] {
        let r = CorpusReader::open_with(uri, ro).unwrap();
        let e = r.tokens(0..r.n_tokens()).unwrap_err().to_string();
        assert!(e.contains("s3://bucket/corpora/docs/shard-00001.bin: not found"), "{e}");
    }
    let e = CorpusReader::open("s3://bucket/nothing").unwrap_err().to_string();
    assert!(e.contains("s3://bucket/nothing: no corpus here"), "{e}");
    // inputs that name nothing
    for (input, msg) in [
        ("s3://inputs/raw/*.txt", "s3://inputs/raw/*.txt: glob pattern matches no objects"),
        ("s3://inputs/none/", "s3://inputs/none/: input not found"),
        ("s3://inputs/raw/notes.md", "notes.md: unsupported input"),
    ] {
        let o = opts(vec![input.into()], "gpt2", "memory://s3-test/err", 40);
        let e = smelt_corpus::prepare(&o, &smelt_corpus::NoProgress).unwrap_err().to_string();
        assert!(e.contains(msg), "{input}: {e}");
    }

    // Parquet objects (pyarrow's, tests/fixtures/parquet) read over S3 by ranged GETs of their
    // footers and text columns: the token stream of the same files read locally
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parquet");
    let pq = StoreDir::open("s3://inputs/pq").unwrap();
    let local: Vec<String> = ["docs.snappy.parquet", "docs.zstd.parquet"].iter().map(|f| fixtures.join(f).display().to_string()).collect();
    for f in ["docs.snappy.parquet", "docs.zstd.parquet"] {
        pq.put(f, std::fs::read(fixtures.join(f)).unwrap()).unwrap();
    }
    run(&opts(local, "gpt2", "memory://s3-test/pq-local", 40));
    let rep = run(&opts(vec!["s3://inputs/pq/*.parquet".into()], "gpt2", "memory://s3-test/pq-s3", 40));
    assert_eq!(rep.input_files, 2);
    let stream = |uri: &str| {
        let r = CorpusReader::open(uri).unwrap();
        r.tokens(0..r.n_tokens()).unwrap()
    };
    let local = stream("memory://s3-test/pq-local");
    assert!(!local.is_empty());
    assert_eq!(stream("memory://s3-test/pq-s3"), local);
}
