#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use smelt_corpus::{prepare, NoProgress, PrepareOptions, PrepareReport, Tokenizer, ValSplit};

/// Ten documents of varied text (some long enough to span several small shards).
pub fn documents() -> Vec<String> {
    let mut docs: Vec<String> = vec![
        "The quick brown fox jumps over the lazy dog.".into(),
        "I'm sure they'll say we've done it — naïve café, 日本語.".into(),
        "Numbers 3.14159 and 1,000,000 and   spaces\n\nand newlines.".into(),
        "short".into(),
    ];
    for i in 0..6 {
        docs.push((0..(10 + 7 * i)).map(|j| format!("word{} and {} more ", j * i, j)).collect());
    }
    docs
}

pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

pub fn write_gz(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut e = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::default());
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap();
}

pub fn jsonl(docs: &[String], field: &str) -> String {
    docs.iter().map(|d| format!("{}\n", serde_json::json!({ "id": 1, field: d }))).collect()
}

/// One .txt file per document, named so that sorting keeps their order.
pub fn txt_dir(dir: &Path, docs: &[String]) {
    for (i, d) in docs.iter().enumerate() {
        write(&dir.join(format!("doc{i:02}.txt")), d);
    }
}

/// The token stream a corpus of `docs` must hold: each document's ids, then end-of-text.
pub fn expected_stream(tok: &Tokenizer, docs: &[&String]) -> Vec<u32> {
    let mut s = Vec::new();
    for d in docs {
        s.extend(tok.encode(d).unwrap());
        s.push(tok.eot_token());
    }
    s
}

pub fn opts(inputs: Vec<String>, tokenizer: &str, out: &str, shard_tokens: u64) -> PrepareOptions {
    PrepareOptions {
        inputs,
        tokenizer: tokenizer.into(),
        out: out.into(),
        shard_tokens,
        val: ValSplit::None,
        ..PrepareOptions::default()
    }
}

pub fn run(o: &PrepareOptions) -> PrepareReport {
    prepare(o, &NoProgress).unwrap_or_else(|e| panic!("prepare failed: {e}"))
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}
