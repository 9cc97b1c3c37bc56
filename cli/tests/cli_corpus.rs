//! `smelt corpus prepare / verify` and `smelt bench tokenize / loader`, as a user runs them.

use std::process::{Command, Output};

fn smelt(args: &[&str]) -> Output {
    smelt_env(args, &[])
}

fn smelt_env(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smelt"));
    c.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run smelt")
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
    // a file of another kind in the directory is left out, and said to be
    std::fs::write(input.join("README.md"), "not a document").unwrap();
    // interrupted, then resumed
    let o = prep(&["--stop-after-shards", "2"]);
    assert!(text_of(&o).contains("left out") && text_of(&o).contains("README.md"), "{}", text_of(&o));
    let first = json_of(&o);
    assert_eq!(first["complete"], false);
    assert_eq!(first["shards_written"], 2);
    assert!(!out.join("prepare.lock").exists(), "the lock goes with the run");
    // one run at a time per output: the lock of a running process (here: this test's) refuses
    // a second run; one a process left that no longer runs is taken over
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let lock = |pid: u32| std::fs::write(out.join("prepare.lock"), serde_json::json!({"host": host, "pid": pid}).to_string()).unwrap();
    lock(std::process::id());
    let o = prep(&[]);
    assert!(!o.status.success() && text_of(&o).contains("another `smelt corpus prepare` is writing here"), "{}", text_of(&o));
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    lock(dead);
    let second = json_of(&prep(&[]));
    assert!(!out.join("prepare.lock").exists());
    assert_eq!(second["complete"], true);
    assert_eq!(second["shards_kept"], 2);
    assert_eq!(second["resume_bytes_read"], 0, "kept on size and ETag, unread");
    assert_eq!(second["train_documents"], 10);
    assert_eq!(second["val_documents"], 2);
    assert!(out.join("val-00000.bin").exists() && out.join("manifest.json").exists());

    let v = json_of(&smelt(&["corpus", "verify", outp, "--json"]));
    assert_eq!(v["ok"], true);
    assert_eq!(v["tokens"], second["train_tokens"].as_u64().unwrap() + second["val_tokens"].as_u64().unwrap());

    // the loader from the local store, an S3 server on loopback and memory://, every mode
    let l = json_of(&smelt(&["bench", "loader", "--corpus", outp, "--seq-len", "64", "--batch", "4", "--steps", "5", "--json"]));
    let runs = l["runs"].as_array().unwrap();
    let got: Vec<String> = runs.iter().map(|r| format!("{} {}", r["store"].as_str().unwrap(), r["mode"].as_str().unwrap())).collect();
    let mut want = Vec::new();
    for st in ["store", "s3-loopback", "memory"] {
        for m in ["whole", "coalesced", "single"] {
            want.push(format!("{st} {m}"));
        }
    }
    assert_eq!(got, want);
    for r in runs {
        assert_eq!(r["steps"], 5);
        assert_eq!(r["checksum"], runs[0]["checksum"]);
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(r["whole_shards"], r["mode"] == "whole");
    }
    assert!(runs[1]["requests"].as_u64() < runs[2]["requests"].as_u64(), "coalesced sends fewer GETs than single");
    assert!(runs[3]["uri"].as_str().unwrap().starts_with("s3://bench/"));

    let t = json_of(&smelt(&["bench", "tokenize", "--input", input.join("d00.txt").to_str().unwrap(), "--repeat", "1", "--no-peer", "--json"]));
    assert!(t["smelt"]["tokens"].as_u64().unwrap() > 100);

    // one file is one document: a validation fraction of it rounds to none, which is said
    let single = smelt(&["corpus", "prepare", "--input", input.join("d00.txt").to_str().unwrap(), "--out", dir.path().join("one").to_str().unwrap(), "--val-fraction", "0.1"]);
    assert!(single.status.success(), "{}", text_of(&single));
    assert!(text_of(&single).contains("the validation split rounds to no document: 1 document(s) in all"), "{}", text_of(&single));

    // bad input: a clear message naming the file and line, non-zero exit
    std::fs::write(dir.path().join("bad.jsonl"), "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n").unwrap();
    let o = smelt(&["corpus", "prepare", "--input", dir.path().join("bad.jsonl").to_str().unwrap(), "--out", dir.path().join("o2").to_str().unwrap()]);
    assert!(!o.status.success());
    let msg = text_of(&o);
    assert!(msg.contains("bad.jsonl:2") && msg.contains("no field \"text\""), "{msg}");
    // a memory store would be gone with the command
    let o = smelt(&["corpus", "prepare", "--input", input.to_str().unwrap(), "--out", "memory://scratch/c"]);
    assert!(!o.status.success() && text_of(&o).contains("lives only inside one process"), "{}", text_of(&o));
    // its manifest named rather than its directory: the directory to give
    let manifest = out.join("manifest.json");
    let o = smelt(&["corpus", "verify", manifest.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains(&format!("a corpus is named by its directory, not its manifest: give {outp}")), "{}", text_of(&o));
    // damage a shard: verify names it
    let shard = out.join("shard-00001.bin");
    let mut b = std::fs::read(&shard).unwrap();
    b[100] ^= 0x10;
    std::fs::write(&shard, b).unwrap();
    let o = smelt(&["corpus", "verify", outp]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains("shard-00001.bin"), "{}", text_of(&o));
    // two damaged shards (one cut, one gone): one run names both, and the good ones pass
    let cut = out.join("shard-00003.bin");
    let b = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &b[..b.len() - 3]).unwrap();
    std::fs::remove_file(out.join("val-00000.bin")).unwrap();
    let o = smelt(&["corpus", "verify", outp]);
    let msg = text_of(&o);
    assert!(!o.status.success());
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let shards = manifest["train"]["shards"].as_array().unwrap().len() + manifest["val"]["shards"].as_array().unwrap().len();
    assert!(msg.contains(&format!("3 of {shards} shards failed verification")), "{msg}");
    for (name, why) in [("shard-00001.bin", "sha256"), ("shard-00003.bin", "truncated"), ("val-00000.bin", "not found")] {
        assert!(msg.lines().any(|l| l.contains(name) && l.contains(why)), "{name}: {why}?\n{msg}");
    }
    let o = smelt(&["corpus", "verify", outp, "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text_of(&o)));
    assert_eq!((v["ok"].as_bool(), v["bad"].as_array().map(|b| b.len())), (Some(false), Some(3)), "{v}");
}

#[test]
fn prepare_from_s3_inputs_and_verify_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = smelt_corpus::loopback::S3Loopback::start(&dir.path().join("s3")).unwrap();
    server.create_bucket("raw").unwrap();
    let up = server.dir("raw", "web").unwrap();
    for i in 0..6 {
        let doc: String = (0..30).map(|j| format!("{{\"text\": \"Page {i} line {j}: it's here.\"}}\n")).collect();
        up.put(&format!("crawl-{i}.jsonl"), doc.into_bytes()).unwrap();
    }
    up.put("README.txt", b"not matched by the glob".to_vec()).unwrap();
    // an http:// endpoint is reached in plain text without AWS_ALLOW_HTTP (MinIO's setup)
    let env: Vec<_> = server.env().into_iter().filter(|(k, _)| *k != "AWS_ALLOW_HTTP").collect();
    let out = dir.path().join("corpus");
    let outp = out.to_str().unwrap();
    let prep = |extra: &[&str]| {
        let mut args = vec!["corpus", "prepare", "--input", "s3://raw/web/crawl-*.jsonl", "--out", outp, "--shard-tokens", "500", "--json"];
        args.extend_from_slice(extra);
        smelt_env(&args, &env)
    };
    let first = json_of(&prep(&["--stop-after-shards", "3"]));
    assert_eq!((first["input_files"].as_u64(), first["shards_written"].as_u64()), (Some(6), Some(3)));
    let shard_bytes: u64 = (0..3).map(|i| std::fs::metadata(out.join(format!("shard-{i:05}.bin"))).unwrap().len()).sum();
    // --verify re-reads the 3 kept shards whole
    let second = json_of(&prep(&["--verify"]));
    assert_eq!(second["complete"], true);
    assert_eq!(second["shards_kept"], 3);
    assert_eq!(second["resume_bytes_read"].as_u64(), Some(shard_bytes));
    assert_eq!(second["train_documents"], 6 * 30);
    let v = json_of(&smelt(&["corpus", "verify", outp, "--json"]));
    assert_eq!(v["tokens"], second["train_tokens"]);
    // without the server's address, the s3:// input cannot be reached: the error names it
    let o = smelt(&["corpus", "prepare", "--input", "s3://raw/web/nothing-*.jsonl", "--out", dir.path().join("o2").to_str().unwrap()]);
    assert!(!o.status.success());
    let o = smelt_env(&["corpus", "prepare", "--input", "s3://raw/web/nothing-*.jsonl", "--out", dir.path().join("o2").to_str().unwrap()], &env);
    assert!(text_of(&o).contains("s3://raw/web/nothing-*.jsonl: glob pattern matches no objects"), "{}", text_of(&o));
}

/// An S3 endpoint written without its scheme, or not a URL, is an error naming the variable
/// (it passed the client's builder and panicked on the first request).
#[test]
fn a_malformed_s3_endpoint_names_the_variable() {
    for (endpoint, why) in [("localhost:9000", "whose scheme \"localhost\" is neither http nor https"), ("not a url", "not a URL")] {
        let o = Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(["corpus", "verify", "s3://b/c"])
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "y")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT", endpoint)
            .env("RUST_LOG", "error")
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains("AWS_ENDPOINT") && err.contains(why) && err.contains("e.g. http://localhost:9000"), "{endpoint}: {err}");
    }
}

/// An S3 corpus with no credentials anywhere (none in the environment, the metadata service
/// unreachable) fails in one line that says what to set, without the causes printed twice.
#[test]
fn missing_s3_credentials_say_what_to_set() {
    let o = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["corpus", "verify", "s3://no-such-bucket/corpus"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT")
        .env_remove("AWS_PROFILE")
        // a closed port stands for a metadata service that is not there (off the cloud)
        .env("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
        .env("RUST_LOG", "error")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("s3://no-such-bucket/corpus/manifest.json"), "{err}");
    assert!(err.contains("no S3 credentials") && err.contains("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), "{err}");
    assert!(!err.contains("Caused by"), "{err}");
}
