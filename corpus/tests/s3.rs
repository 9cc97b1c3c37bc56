//! The corpus pipeline against a real S3-protocol server on loopback (`s3s-fs`, in process):
//! `s3://` URIs configured from the environment, as in production, ranged GETs, resume, and a
//! missing object named by its `s3://` URI. Own test binary: it sets process-wide variables.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use smelt_corpus::{CorpusReader, Tokenizer};

const KEY: &str = "smelt-test-key";
const SECRET: &str = "smelt-test-secret";

/// Serves `root` (a directory per bucket) on 127.0.0.1 from a background runtime.
fn start_server(root: &Path) -> SocketAddr {
    let fs = s3s_fs::FileSystem::new(root).unwrap();
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    b.set_auth(s3s::auth::SimpleAuth::from_single(KEY, SECRET));
    let service = b.build();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
    });
    addr
}

#[test]
fn prepare_and_read_through_s3() {
    let dir = tempfile::tempdir().unwrap();
    let root: PathBuf = dir.path().join("s3");
    std::fs::create_dir_all(root.join("bucket")).unwrap();
    let addr = start_server(&root);
    // SAFETY: set before any other thread of this test binary reads the environment.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
        ("AWS_ENDPOINT", format!("http://{addr}")),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ] {
        unsafe { std::env::set_var(k, v) };
    }

    let docs = documents();
    txt_dir(&dir.path().join("in"), &docs);
    let uri = "s3://bucket/corpora/docs";
    let mut o = opts(vec![s(&dir.path().join("in"))], "gpt2", uri, 40);
    o.stop_after_shards = Some(2);
    let first = run(&o);
    assert!(!first.complete && first.shards_written == 2);
    assert!(root.join("bucket/corpora/docs/progress.json").exists());
    o.stop_after_shards = None;
    let rep = run(&o);
    assert!(rep.complete);
    assert_eq!(rep.shards_kept, 2);
    let m = rep.manifest.unwrap();
    assert!(root.join("bucket/corpora/docs/manifest.json").exists());

    let all: Vec<&String> = docs.iter().collect();
    let want = expected_stream(&Tokenizer::Gpt2, &all);
    let r = CorpusReader::open(uri).unwrap();
    assert_eq!(r.n_tokens(), want.len() as u64);
    let t = 13;
    let order = r.sample_order(t, 1).unwrap();
    let idx: Vec<u64> = (0..r.n_sequences(t)).map(|k| order.sequence_at(k)).collect();
    r.prefetch(t, idx.iter().copied());
    for &i in &idx {
        let a = i as usize * t;
        assert_eq!(r.sequence(t, i).unwrap(), &want[a..a + t + 1]);
    }
    assert_eq!(r.verify().unwrap().shards, m.train.shards.len() as u64);

    // a missing object is named by its s3:// URI
    std::fs::remove_file(root.join("bucket/corpora/docs/shard-00001.bin")).unwrap();
    let r = CorpusReader::open(uri).unwrap();
    let e = r.tokens(0..r.n_tokens()).unwrap_err().to_string();
    assert!(e.contains("s3://bucket/corpora/docs/shard-00001.bin: not found"), "{e}");
    let e = CorpusReader::open("s3://bucket/nothing").unwrap_err().to_string();
    assert!(e.contains("s3://bucket/nothing: no corpus here"), "{e}");
}
