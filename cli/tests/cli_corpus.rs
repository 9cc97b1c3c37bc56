//! `smelt corpus prepare / verify` and `smelt bench tokenize / loader`, as a user runs them.

use std::process::{Command, Output};

fn smelt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smelt")).args(args).env("RUST_LOG", "warn").output().expect("run smelt")
}

fn text_of(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json_of(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", text_of(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text_of(o)))
}

#[test]
fn prepare_resume_verify_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..12 {
        let doc: String = (0..40).map(|j| format!("Document {i} says {j} things, doesn't it?\n")).collect();
        std::fs::write(input.join(format!("d{i:02}.txt")), doc).unwrap();
    }
    let out = dir.path().join("corpus");
    let (inp, outp) = (input.to_str().unwrap(), out.to_str().unwrap());
    let prep = |extra: &[&str]| {
        let mut args = vec!["corpus", "prepare", "--input", inp, "--out", outp, "--shard-tokens", "1000", "--val-docs", "2", "--json"];
        args.extend_from_slice(extra);
        smelt(&args)
    };
    // interrupted, then resumed
    let first = json_of(&prep(&["--stop-after-shards", "2"]));
    assert_eq!(first["complete"], false);
    assert_eq!(first["shards_written"], 2);
    let second = json_of(&prep(&[]));
    assert_eq!(second["complete"], true);
    assert_eq!(second["shards_kept"], 2);
    assert_eq!(second["train_documents"], 10);
    assert_eq!(second["val_documents"], 2);
    assert!(out.join("val-00000.bin").exists() && out.join("manifest.json").exists());

    let v = json_of(&smelt(&["corpus", "verify", outp, "--json"]));
    assert_eq!(v["ok"], true);
    assert_eq!(v["tokens"], second["train_tokens"].as_u64().unwrap() + second["val_tokens"].as_u64().unwrap());

    let l = json_of(&smelt(&["bench", "loader", "--corpus", outp, "--seq-len", "64", "--batch", "4", "--steps", "5", "--json"]));
    assert_eq!(l["store"]["steps"], 5);
    assert_eq!(l["store"]["checksum"], l["memory"]["checksum"]);

    let t = json_of(&smelt(&["bench", "tokenize", "--input", input.join("d00.txt").to_str().unwrap(), "--repeat", "1", "--no-peer", "--json"]));
    assert!(t["smelt"]["tokens"].as_u64().unwrap() > 100);

    // bad input: a clear message naming the file and line, non-zero exit
    std::fs::write(dir.path().join("bad.jsonl"), "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n").unwrap();
    let o = smelt(&["corpus", "prepare", "--input", dir.path().join("bad.jsonl").to_str().unwrap(), "--out", dir.path().join("o2").to_str().unwrap()]);
    assert!(!o.status.success());
    let msg = text_of(&o);
    assert!(msg.contains("bad.jsonl:2") && msg.contains("no field \"text\""), "{msg}");
    // damage a shard: verify names it
    let shard = out.join("shard-00001.bin");
    let mut b = std::fs::read(&shard).unwrap();
    b[100] ^= 0x10;
    std::fs::write(&shard, b).unwrap();
    let o = smelt(&["corpus", "verify", outp]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains("shard-00001.bin"), "{}", text_of(&o));
}
