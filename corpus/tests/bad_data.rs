//! Bad data gets a clear error naming the object and what is wrong. Every bad file is made for
//! real, on a real store.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use smelt_corpus::{prepare, CorpusError, CorpusReader, NoProgress, ReaderOptions, TxtDocs};

/// A small gpt2 corpus in 3+ shards of 30 tokens; returns its directory.
fn corpus(dir: &Path) -> PathBuf {
    txt_dir(&dir.join("in"), &documents());
    let out = dir.join("c");
    run(&opts(vec![s(&dir.join("in"))], "gpt2", &s(&out), 30));
    out
}

fn shard(out: &Path, i: usize) -> PathBuf {
    out.join(format!("shard-{i:05}.bin"))
}

/// The reader's three ways of reading: whole shards (the default for a corpus this small),
/// coalesced ranged GETs, one GET per sequence.
fn modes() -> [(&'static str, ReaderOptions); 3] {
    let ranged = ReaderOptions { whole_split_max_bytes: 0, ..Default::default() };
    [("whole", ReaderOptions::default()), ("coalesced", ranged.clone()), ("single", ReaderOptions { coalesce: None, ..ranged })]
}

/// Reads every sequence front to back, one at a time, returning the first error.
fn read_seq(out: &Path, o: &ReaderOptions) -> Result<(), CorpusError> {
    let r = CorpusReader::open_with(&s(out), o.clone())?;
    for i in 0..r.n_sequences(8) {
        r.sequence(8, i)?;
    }
    Ok(())
}

/// Reads every sequence in steps of 4 in sample order, the next step prefetched.
fn read_batches(out: &Path, o: &ReaderOptions) -> Result<(), CorpusError> {
    let r = CorpusReader::open_with(&s(out), o.clone())?;
    let order = r.sample_order(8, 3)?;
    let idx: Vec<u64> = (0..order.n_sequences()).map(|k| order.sequence_at(k)).collect();
    for (n, step) in idx.chunks(4).enumerate() {
        if let Some(next) = idx.chunks(4).nth(n + 1) {
            r.prefetch(8, next.iter().copied());
        }
        r.batch(8, step)?;
    }
    Ok(())
}

/// Every mode, sequential and batched, fails with an error holding `parts`.
fn read_all_fails(out: &Path, parts: &[&str]) {
    for (name, o) in modes() {
        for (how, r) in [("one by one", read_seq(out, &o)), ("batched", read_batches(out, &o))] {
            let e = r.expect_err(&format!("{name} mode, {how}: no error"));
            for p in parts {
                assert!(e.to_string().contains(p), "{name} mode, {how}: error {e} lacks {p:?}");
            }
        }
    }
}


fn expect_err(r: Result<impl std::fmt::Debug, CorpusError>, parts: &[&str]) -> String {
    let e = r.unwrap_err().to_string();
    for p in parts {
        assert!(e.contains(p), "error {e:?} lacks {p:?}");
    }
    e
}

#[test]
fn truncated_shard() {
    let dir = tempfile::tempdir().unwrap();
    let out = corpus(dir.path());
    let p = shard(&out, 1);
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 7]).unwrap();
    read_all_fails(&out, &["shard-00001.bin", "truncated", &format!("{} bytes, expected {}", b.len() - 7, b.len())]);
    expect_err(CorpusReader::open(&s(&out)).unwrap().verify(), &["shard-00001.bin", "truncated"]);
    // shorter than a header
    std::fs::write(&p, &b[..5]).unwrap();
    read_all_fails(&out, &["shard-00001.bin", "truncated: 5 bytes"]);
}

#[test]
fn wrong_magic_and_header_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let out = corpus(dir.path());
    let p = shard(&out, 0);
    let good = std::fs::read(&p).unwrap();
    let mut b = good.clone();
    b[..8].copy_from_slice(b"GGUFxxxx");
    std::fs::write(&p, &b).unwrap();
    read_all_fails(&out, &["shard-00000.bin", "not a smelt shard: magic is \"GGUFxxxx\""]);
    let mut b = good.clone();
    b[8] = 7; // version
    std::fs::write(&p, &b).unwrap();
    read_all_fails(&out, &["shard-00000.bin", "version 7"]);
    let mut b = good.clone();
    b[12] = 4; // dtype u32
    std::fs::write(&p, &b).unwrap();
    read_all_fails(&out, &["shard-00000.bin", "dtype u32", "manifest u16"]);
    let mut b = good;
    b[16] = 29; // token count
    std::fs::write(&p, &b).unwrap();
    read_all_fails(&out, &["shard-00000.bin", "header says 29 tokens, the manifest 30"]);
}

#[test]
fn hash_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let out = corpus(dir.path());
    let p = shard(&out, 2);
    let mut b = std::fs::read(&p).unwrap();
    b[32] ^= 1; // a token id changes, still inside the vocabulary
    std::fs::write(&p, &b).unwrap();
    let hash = ["shard-00002.bin", "sha256", "does not match the manifest"];
    // a whole-shard read, a front-to-back pass of ranged reads, and verify() all see it
    let [(_, whole), (_, coalesced), (_, single)] = modes();
    for o in [&whole, &coalesced, &single] {
        let r = CorpusReader::open_with(&s(&out), o.clone()).unwrap();
        expect_err(r.tokens(60..90), &hash);
        expect_err(read_seq(&out, o), &hash);
        expect_err(r.verify(), &["shard-00002.bin", "sha256"]);
    }
    // reading whole shards, any order sees it
    expect_err(read_batches(&out, &whole), &hash);
    // ranged reads in shuffled order cannot add up to a hash: they see nothing wrong
    read_batches(&out, &coalesced).unwrap();
    read_batches(&out, &single).unwrap();
}

#[test]
fn token_outside_the_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let out = corpus(dir.path());
    let p = shard(&out, 1);
    let mut b = std::fs::read(&p).unwrap();
    b[32 + 2 * 5..32 + 2 * 5 + 2].copy_from_slice(&60000u16.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    // ranged reads check every id they read; a whole-shard read finds the hash wrong first
    let [(_, whole), (_, coalesced), (_, single)] = modes();
    for o in [&coalesced, &single] {
        for r in [read_seq(&out, o), read_batches(&out, o)] {
            expect_err(r, &["shard-00001.bin", "token 60000 (position 5 of the shard) is outside the vocabulary of 50257"]);
        }
    }
    expect_err(read_batches(&out, &whole), &["shard-00001.bin", "sha256"]);
    expect_err(CorpusReader::open(&s(&out)).unwrap().verify(), &["shard-00001.bin", "token 60000"]);
}

#[test]
fn missing_objects() {
    let dir = tempfile::tempdir().unwrap();
    let out = corpus(dir.path());
    std::fs::remove_file(shard(&out, 1)).unwrap();
    read_all_fails(&out, &[&format!("{}: not found", shard(&out, 1).display())]);
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    expect_err(CorpusReader::open(&s(&out)).map(|_| ()), &[&s(&out), "no corpus here: manifest.json not found"]);
    expect_err(CorpusReader::open("memory://bad-data/nothing").map(|_| ()), &["memory://bad-data/nothing: no corpus here"]);
    // a manifest that is not one
    std::fs::write(out.join("manifest.json"), b"{\"format\": 1").unwrap();
    expect_err(CorpusReader::open(&s(&out)).map(|_| ()), &["manifest.json: bad manifest"]);
}

#[test]
fn empty_corpus() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("empty.txt"), "");
    write(&dir.path().join("blank.jsonl"), "\n\n");
    for (input, tok) in [("empty.txt", "gpt2"), ("blank.jsonl", "gpt2"), ("empty.txt", "char")] {
        let o = opts(vec![s(&dir.path().join(input))], tok, &s(&dir.path().join("o")), 10);
        expect_err(prepare(&o, &NoProgress), &["empty corpus", "no "]);
    }
    let o = opts(vec![s(&dir.path().join("nothing-here"))], "gpt2", &s(&dir.path().join("o")), 10);
    expect_err(prepare(&o, &NoProgress), &["nothing-here", "input not found"]);
    let o = opts(vec![format!("{}/*.zzz", dir.path().display())], "gpt2", &s(&dir.path().join("o")), 10);
    expect_err(prepare(&o, &NoProgress), &["*.zzz", "matches no files"]);
    // a split that leaves nothing to train on
    write(&dir.path().join("one.txt"), "a\n\nb\n");
    let mut o = opts(vec![s(&dir.path().join("one.txt"))], "gpt2", &s(&dir.path().join("o")), 10);
    o.txt_docs = TxtDocs::Line;
    o.val = smelt_corpus::ValSplit::Docs(2);
    expect_err(prepare(&o, &NoProgress), &["every one of the 2 documents"]);
}

#[test]
fn bad_inputs_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = s(&d.join("o"));
    let cases: Vec<(PathBuf, Vec<u8>, Vec<&str>)> = vec![
        (d.join("a.jsonl"), b"{\"text\": \"ok\"}\n{\"text\": \"ok\"\n".to_vec(), vec!["a.jsonl:2", "not valid JSON"]),
        (d.join("b.jsonl"), b"{\"text\": \"ok\"}\n\n{\"text\": null}\n".to_vec(), vec!["b.jsonl:3", "field \"text\" is null, not a string"]),
        (d.join("c.jsonl"), b"[\"text\"]\n".to_vec(), vec!["c.jsonl:1", "not a JSON object"]),
        (d.join("d.txt"), b"fine\n\xff\xfe bad\n".to_vec(), vec!["d.txt", "invalid UTF-8 at byte 5"]),
        (d.join("e.txt.gz"), b"\x1f\x8b\x08\x00 this is not gzip".to_vec(), vec!["e.txt.gz", "corrupt gzip"]),
        (d.join("f.csv"), b"a,b\n".to_vec(), vec!["f.csv", "unsupported input"]),
    ];
    for (path, bytes, parts) in cases {
        std::fs::write(&path, bytes).unwrap();
        let o = opts(vec![s(&path)], "gpt2", &out, 10);
        expect_err(prepare(&o, &NoProgress), &parts);
    }
    let o = opts(vec![s(&d.join("d.txt"))], "bpe", &out, 10);
    expect_err(prepare(&o, &NoProgress), &["unknown tokenizer \"bpe\""]);
}
