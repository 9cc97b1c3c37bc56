//! `corpus prepare` -> manifest -> `CorpusReader`, on real `file://` and `memory://` stores.

mod common;

use common::*;
use smelt_corpus::format::{sha256_hex, HEADER_BYTES};
use smelt_corpus::{CorpusReader, Dtype, ReaderOptions, SampleOrder, Split, Tokenizer, TxtDocs, ValSplit};

#[test]
fn gpt2_round_trip_across_shard_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    txt_dir(&dir.path().join("in"), &docs);
    let out = dir.path().join("out");
    let report = run(&opts(vec![s(&dir.path().join("in"))], "gpt2", &s(&out), 50));
    assert!(report.complete);
    let m = report.manifest.unwrap();
    let all: Vec<&String> = docs.iter().collect();
    let want = expected_stream(&Tokenizer::Gpt2, &all);
    assert_eq!((m.vocab_size, m.eot_token, m.dtype), (50257, 50256, Dtype::U16));
    assert_eq!(m.train.tokens, want.len() as u64);
    assert_eq!(m.train.documents, docs.len() as u64);
    assert_eq!(m.train.shards.len() as u64, (want.len() as u64).div_ceil(50));
    assert!(m.val.shards.is_empty());
    // every shard as the manifest says: name, size, sha256, header
    for (i, sh) in m.train.shards.iter().enumerate() {
        assert_eq!(sh.name, format!("shard-{i:05}.bin"));
        let bytes = std::fs::read(out.join(&sh.name)).unwrap();
        assert_eq!(bytes.len() as u64, sh.bytes);
        assert_eq!(bytes.len() as u64, HEADER_BYTES + 2 * sh.tokens);
        assert_eq!(sha256_hex(&bytes), sh.sha256);
        assert_eq!(&bytes[..8], b"SMELTTOK");
    }
    assert!(out.join("manifest.json").exists());
    assert!(!out.join("progress.json").exists());

    let r = CorpusReader::open(&s(&out)).unwrap();
    assert_eq!(r.n_tokens(), want.len() as u64);
    assert_eq!(r.tokens(0..r.n_tokens()).unwrap(), want);
    let t = 7; // 50 is not a multiple: many sequences straddle two shards
    assert_eq!(r.n_sequences(t), (want.len() as u64 - 1) / 7);
    let mut straddling = 0;
    for i in 0..r.n_sequences(t) {
        let a = i as usize * t;
        assert_eq!(r.sequence(t, i).unwrap(), &want[a..a + t + 1], "sequence {i}");
        if a / 50 != (a + t) / 50 {
            straddling += 1;
        }
    }
    assert!(straddling > 3);
    // reading front to back checked the sha256 of every shard it covered whole
    assert!(r.stats().shards_verified >= m.train.shards.len() as u64 - 1, "{:?}", r.stats());
    // a batch in sample order, as a trainer reads it
    let order = r.sample_order(t, 3).unwrap();
    let idx: Vec<u64> = (0..5).map(|k| order.sequence_at(k)).collect();
    let (x, y) = r.batch(t, &idx).unwrap();
    for (b, &i) in idx.iter().enumerate() {
        let a = i as usize * t;
        assert_eq!(&x[b * t..(b + 1) * t], &want[a..a + t]);
        assert_eq!(&y[b * t..(b + 1) * t], &want[a + 1..a + t + 1]);
    }
    assert!(r.sequence(t, r.n_sequences(t)).unwrap_err().to_string().contains("outside"));
    let v = r.verify().unwrap();
    assert_eq!((v.shards, v.tokens), (m.train.shards.len() as u64, want.len() as u64));
}

#[test]
fn char_and_byte_tokenizers_with_a_validation_split() {
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<String> = documents().into_iter().take(6).collect();
    // paragraphs of one file are the documents (document 2 holds a blank line: two paragraphs)
    let text = docs.join("\n\n") + "\n";
    write(&dir.path().join("a.txt"), &text);
    let paras: Vec<String> = text.split("\n\n").map(|p| p.trim_end_matches('\n').to_string()).collect();
    assert_eq!(paras.len(), 7);
    for kind in ["char", "byte"] {
        let out = dir.path().join(kind);
        let mut o = opts(vec![s(&dir.path().join("a.txt"))], kind, &format!("file://{}", out.display()), 16);
        o.txt_docs = TxtDocs::Paragraph;
        o.val = ValSplit::Docs(2);
        let m = run(&o).manifest.unwrap();
        let tok = m.tokenizer.clone();
        if kind == "char" {
            let Tokenizer::Char { chars } = &tok else { panic!("{tok:?}") };
            assert!(chars.contains(&'日') && chars.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(m.eot_token as usize, chars.len());
        } else {
            assert_eq!(m.eot_token, 256);
        }
        assert_eq!(m.vocab_size, m.eot_token + 1);
        // 2 of n documents, evenly spread: with n = 7, documents 3 and 6
        let n = paras.len() as u64;
        let is_val = |i: u64| (i + 1) * 2 / n > i * 2 / n;
        let train: Vec<&String> = paras.iter().enumerate().filter(|(i, _)| !is_val(*i as u64)).map(|(_, p)| p).collect();
        let val: Vec<&String> = paras.iter().enumerate().filter(|(i, _)| is_val(*i as u64)).map(|(_, p)| p).collect();
        assert_eq!((m.train.documents, m.val.documents), (n - 2, 2));
        assert!(m.val.shards.iter().enumerate().all(|(i, s)| s.name == format!("val-{i:05}.bin")));
        assert!(out.join("val-00000.bin").exists());
        let r = CorpusReader::open(&format!("file://{}", out.display())).unwrap();
        assert_eq!(r.tokens(0..r.n_tokens()).unwrap(), expected_stream(&tok, &train));
        let rv = CorpusReader::open_with(&s(&out), ReaderOptions { split: Split::Val, ..Default::default() }).unwrap();
        assert_eq!(rv.tokens(0..rv.n_tokens()).unwrap(), expected_stream(&tok, &val));
        assert_eq!(tok.decode(&rv.tokens(0..5).unwrap()).unwrap(), val[0][..5]);
    }
}

#[test]
fn jsonl_gzip_globs_and_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    // first half as .jsonl.gz, second half as plain .jsonl, a .txt.gz, an unrelated file
    write_gz(&dir.path().join("d/a.jsonl.gz"), &jsonl(&docs[..5], "body"));
    write(&dir.path().join("d/b.jsonl"), &format!("\n{}\n", jsonl(&docs[5..], "body")));
    write_gz(&dir.path().join("t/c.txt.gz"), "plain text, gzipped.\n");
    write(&dir.path().join("d/README.md"), "ignored");
    let uri = "memory://prepare-read-test/corpora/x";
    let mut o = opts(vec![format!("{}/d/*.jsonl*", dir.path().display()), s(&dir.path().join("t"))], "gpt2", uri, 64);
    o.text_field = "body".into();
    let rep = run(&o);
    assert_eq!(rep.input_files, 3);
    let m = rep.manifest.unwrap();
    let mut all: Vec<&String> = docs.iter().collect();
    let extra = "plain text, gzipped.\n".to_string();
    all.push(&extra);
    let want = expected_stream(&Tokenizer::Gpt2, &all);
    assert_eq!(m.train.documents, 11);
    let r = CorpusReader::open_with(uri, ReaderOptions { cache_bytes: 1 << 20, concurrency: 3, ..Default::default() }).unwrap();
    assert_eq!(r.tokens(0..r.n_tokens()).unwrap(), want);

    // prefetch, then read in sample order: everything arrives, the counters add up
    let t = 16;
    let order = SampleOrder::new(r.n_sequences(t), 9);
    let idx: Vec<u64> = (0..r.n_sequences(t)).map(|k| order.sequence_at(k)).collect();
    r.prefetch(t, idx.iter().copied());
    for &i in &idx {
        let a = i as usize * t;
        assert_eq!(r.sequence(t, i).unwrap(), &want[a..a + t + 1]);
    }
    let st = r.stats();
    assert_eq!(st.sequences, 1 + idx.len() as u64);
    assert!(st.ready <= st.sequences && st.wait_seconds >= 0.0 && st.requests > 0);

    // a wrong text field names the file and line
    o.text_field = "text".into();
    o.out = "memory://prepare-read-test/other".into();
    let e = smelt_corpus::prepare(&o, &smelt_corpus::NoProgress).unwrap_err().to_string();
    assert!(e.contains("a.jsonl.gz:1") && e.contains("no field \"text\""), "{e}");
}

#[test]
fn large_documents_are_cut_safely_and_big_vocab_uses_u32() {
    let dir = tempfile::tempdir().unwrap();
    // one long document tokenized in many segments, plus characters beyond u16 for char
    let long: String = (0..4000).map(|i| format!("line {i}: it's {} — ok\n", i * 31)).collect();
    write(&dir.path().join("long.txt"), &long);
    let out = dir.path().join("o");
    let mut o = opts(vec![s(&dir.path().join("long.txt"))], "gpt2", &s(&out), 10_000);
    o.segment_bytes = 2000;
    o.batch_bytes = 9000;
    let m = run(&o).manifest.unwrap();
    let want = expected_stream(&Tokenizer::Gpt2, &[&long]);
    assert_eq!(m.train.tokens, want.len() as u64);
    assert_eq!(CorpusReader::open(&s(&out)).unwrap().tokens(0..want.len() as u64).unwrap(), want);

    // a char corpus whose vocabulary exceeds 65,536 ids is stored as u32
    let many: String = (0x4E00u32..0x4E00 + 70_000).filter_map(char::from_u32).collect();
    write(&dir.path().join("cjk.txt"), &many);
    let out = dir.path().join("c");
    let m = run(&opts(vec![s(&dir.path().join("cjk.txt"))], "char", &s(&out), 1 << 20)).manifest.unwrap();
    assert_eq!(m.dtype, Dtype::U32);
    let r = CorpusReader::open(&s(&out)).unwrap();
    let toks = r.tokens(0..r.n_tokens()).unwrap();
    assert_eq!(toks.len(), many.chars().count() + 1);
    assert_eq!(*toks.last().unwrap(), m.eot_token);
    assert!(m.eot_token > 65_536);
}
