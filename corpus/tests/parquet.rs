//! Parquet inputs of `corpus prepare`: files written by pyarrow (`tools/golden/parquet_fixture.py`:
//! snappy with several row groups, zstd with `large_string`, a null and an empty text) give
//! exactly the token stream of the same documents as JSONL; the documents counted alike; a
//! missing column, a binary column and a damaged file are refused naming the file.

mod common;

use std::path::PathBuf;

use common::*;
use smelt_corpus::{CorpusReader, Tokenizer};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parquet").join(name).display().to_string()
}

fn stream(uri: &str) -> Vec<u32> {
    let r = CorpusReader::open(uri).unwrap();
    r.tokens(0..r.n_tokens()).unwrap()
}

#[test]
fn parquet_rows_are_the_documents_jsonl_holds() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).display().to_string();
    for tokenizer in ["gpt2", "byte"] {
        let json = run(&opts(vec![fixture("docs.jsonl")], tokenizer, &out(&format!("json-{tokenizer}")), 50));
        let want = stream(&out(&format!("json-{tokenizer}")));
        for file in ["docs.snappy.parquet", "docs.zstd.parquet"] {
            let name = format!("{file}-{tokenizer}");
            let rep = run(&opts(vec![fixture(file)], tokenizer, &out(&name), 50));
            let (m, mj) = (rep.manifest.as_ref().unwrap(), json.manifest.as_ref().unwrap());
            assert_eq!(m.train.documents, 5, "{file}: 7 rows, a null and an empty one skipped");
            assert_eq!((m.train.documents, m.train.tokens), (mj.train.documents, mj.train.tokens), "{file}");
            assert_eq!(stream(&out(&name)), want, "{file} with {tokenizer}");
        }
    }
    // and the stream is the documents' own encoding, end-of-text after each
    let docs: Vec<String> = std::fs::read_to_string(fixture("docs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    let refs: Vec<&String> = docs.iter().collect();
    assert_eq!(stream(&out("docs.snappy.parquet-gpt2")), expected_stream(&Tokenizer::Gpt2, &refs));
    // a directory of parquet files is found like one of JSONL
    let d = dir.path().join("in");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(fixture("docs.zstd.parquet"), d.join("part-0.parquet")).unwrap();
    let rep = run(&opts(vec![d.display().to_string()], "byte", &out("dir"), 50));
    assert_eq!(rep.input_files, 1);
}

#[test]
fn bad_parquet_inputs_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o").display().to_string();
    let err = |inputs: Vec<String>, field: &str| -> String {
        let mut o = opts(inputs, "byte", &out, 50);
        o.text_field = field.into();
        smelt_corpus::prepare(&o, &smelt_corpus::NoProgress).unwrap_err().to_string()
    };
    let e = err(vec![fixture("docs.snappy.parquet")], "body");
    assert!(e.contains("docs.snappy.parquet") && e.contains("no column \"body\" (columns: id, text, url)"), "{e}");
    let e = err(vec![fixture("docs.snappy.parquet")], "id");
    assert!(e.contains("column \"id\" does not hold strings"), "{e}");
    let e = err(vec![fixture("binary.parquet")], "text");
    assert!(e.contains("binary.parquet") && e.contains("does not hold strings"), "{e}");
    // a truncated file (its footer gone)
    let bytes = std::fs::read(fixture("docs.snappy.parquet")).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = err(vec![cut.display().to_string()], "text");
    assert!(e.contains("cut.parquet") && e.contains("not a readable parquet file"), "{e}");
    // a damaged page (bytes flipped in the middle of the data)
    let mut bad = bytes.clone();
    for b in &mut bad[200..260] {
        *b ^= 0x5a;
    }
    let flipped = dir.path().join("flipped.parquet");
    std::fs::write(&flipped, &bad).unwrap();
    let e = err(vec![flipped.display().to_string()], "text");
    assert!(e.contains("flipped.parquet"), "{e}");
}

#[test]
fn parquet_from_an_object_store_and_an_interrupted_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let want = {
        run(&opts(vec![fixture("docs.snappy.parquet")], "gpt2", &out("local"), 20));
        stream(&out("local"))
    };
    // the same file named by a file:// URI goes through the object-store reader
    run(&opts(vec![format!("file://{}", fixture("docs.snappy.parquet"))], "gpt2", &out("object"), 20));
    assert_eq!(stream(&out("object")), want);

    // stopped after two shards, then run again: the stream of an uninterrupted run
    let mut o = opts(vec![fixture("docs.snappy.parquet"), fixture("docs.zstd.parquet")], "gpt2", &out("resumed"), 20);
    o.stop_after_shards = Some(2);
    let first = run(&o);
    assert!(first.manifest.is_none(), "stopped before the manifest");
    o.stop_after_shards = None;
    run(&o);
    let whole = {
        run(&opts(vec![fixture("docs.snappy.parquet"), fixture("docs.zstd.parquet")], "gpt2", &out("whole"), 20));
        stream(&out("whole"))
    };
    assert_eq!(stream(&out("resumed")), whole);
    assert_eq!(whole.len(), 2 * want.len());
}
