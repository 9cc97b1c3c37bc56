//! Checkpoints over the S3 protocol against a real server on loopback (`s3s-fs`, in process):
//! `s3://` from the environment as in production, multipart uploads, the create-only manifest,
//! and a store that is down when a checkpoint is due and back for the next one. Own test
//! binary: it sets process-wide variables.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use object_store::aws::AmazonS3Builder;
use object_store::RetryConfig;
use smelt_checkpoint::layout::{MODEL, OPTIMIZER};
use smelt_checkpoint::{
    commit, list_committed, load_or_fall_back, load_verified, AsyncCheckpointer, CheckpointError, Outcome, Retention,
    RetryPolicy, Submitted, UploadOptions,
};
use smelt_corpus::StoreDir;

/// Small parts so that a small model's files go up in several parts (S3's minimum is 5 MiB).
fn multipart() -> UploadOptions {
    UploadOptions { multipart_threshold: 6 << 20, part_size: 5 << 20, ..Default::default() }
}

#[test]
fn s3_round_trip_multipart_create_only_and_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let root_fs = dir.path().join("s3");
    std::fs::create_dir_all(root_fs.join("bucket")).unwrap();
    let addr = serve_s3(&root_fs, std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
        ("AWS_ENDPOINT", format!("http://{addr}")),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ] {
        // SAFETY: set before any other thread of this test reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    let root = StoreDir::open("s3://bucket/jobs/job-000001/ckpt").unwrap();
    // ~0.95M parameters: the optimizer file (7.6 MB) goes up in two parts.
    let cfg = config(4096, 128);
    let s10 = snapshot(&cfg, 10);
    let c10 = commit(&root, &s10, &multipart()).unwrap();
    assert_eq!(c10.uri, "s3://bucket/jobs/job-000001/ckpt/00000010");
    let on_disk = root_fs.join("bucket/jobs/job-000001/ckpt/00000010");
    assert!(std::fs::metadata(on_disk.join(OPTIMIZER)).unwrap().len() > 6 << 20);
    let back = load_verified(&c10.uri).unwrap();
    assert_eq!((back.params == s10.params, back.m == s10.m, back.v == s10.v), (true, true, true));

    // The manifest is create-only on S3 too (If-None-Match): a second writer fails.
    let e = commit(&root, &snapshot(&cfg, 10), &multipart()).unwrap_err();
    assert!(matches!(e, CheckpointError::AlreadyCommitted { .. }), "{e}");

    // A flipped byte in step 20 on the server: detected, step 10 used instead.
    let c20 = commit(&root, &snapshot(&cfg, 20), &multipart()).unwrap();
    let p = root_fs.join("bucket/jobs/job-000001/ckpt/00000020").join(MODEL);
    let mut bytes = std::fs::read(&p).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x80;
    std::fs::write(&p, bytes).unwrap();
    let r = load_or_fall_back(&c20.uri).unwrap();
    assert_eq!(r.checkpoint.step(), 10);
    assert!(r.skipped[0].reason.contains("s3://bucket/jobs/job-000001/ckpt/00000020/model.safetensors"), "{:?}", r.skipped);
    assert_eq!(list_committed(&root).unwrap().len(), 2);

    // S3's LastModified reaches retention: both steps were written just now, by the server's
    // clock (the same machine's), so a dead upload among them would wait out its grace period.
    let now = smelt_checkpoint::manifest::now_ms();
    for (step, d) in smelt_checkpoint::read::list_step_dirs(&root).unwrap() {
        assert!(d.committed, "step {step}");
        assert!((now - d.newest_ms).abs() < 120_000, "step {step} written at {} ms, now is {now}", d.newest_ms);
    }
}

/// An S3 client with short retries of its own (the default retries a refused connection for
/// about a minute), so the test sees the uploader's own retries and outcome quickly.
fn s3_dir(endpoint: &str) -> StoreDir {
    let retry = RetryConfig { max_retries: 1, retry_timeout: Duration::from_secs(2), ..Default::default() };
    let s3 = AmazonS3Builder::new()
        .with_bucket_name("bucket")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id(KEY)
        .with_secret_access_key(SECRET)
        .with_retry(retry)
        .build()
        .unwrap();
    StoreDir::from_parts(Arc::new(s3), object_store::path::Path::from("ckpt"), "s3://bucket/ckpt")
}

#[test]
fn a_store_that_is_down_delays_checkpoints_and_the_next_one_lands_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let root_fs = dir.path().join("s3");
    std::fs::create_dir_all(root_fs.join("bucket")).unwrap();
    // A port nobody listens on yet: the store is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let root = s3_dir(&format!("http://127.0.0.1:{port}"));
    let cfg = config(64, 16);
    let retry = RetryPolicy { attempts: 3, first_backoff: Duration::from_millis(200), max_backoff: Duration::from_millis(400) };
    let up = AsyncCheckpointer::new(root.clone(), Retention::default(), UploadOptions { retry, ..Default::default() });

    assert_eq!(up.submit(snapshot(&cfg, 10)), Submitted::Started);
    // The next checkpoint step comes while step 10 is still retrying: skipped, not waited for.
    assert_eq!(up.submit(snapshot(&cfg, 20)), Submitted::Busy { in_flight: 10 });
    let (out, idle) = up.wait(Duration::from_secs(120));
    assert!(idle);
    match &out[..] {
        [Outcome::Failed { step: 10, error }] => assert!(error.contains("s3://bucket/ckpt/00000010"), "{error}"),
        other => panic!("expected step 10 to fail while the store is down: {other:?}"),
    }

    // The store comes back on the same address; the next checkpoint commits.
    serve_s3(&root_fs, std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    assert_eq!(up.submit(snapshot(&cfg, 30)), Submitted::Started);
    let out = up.finish(Duration::from_secs(120));
    match &out[..] {
        [Outcome::Committed(c)] => assert_eq!(c.step, 30),
        other => panic!("expected step 30 to commit once the store is back: {other:?}"),
    }
    assert_eq!(list_committed(&root).unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), [30]);
    assert_eq!(load_verified_dir(&root, 30), snapshot(&cfg, 30).params);
}

fn load_verified_dir(root: &StoreDir, step: u64) -> Vec<f32> {
    // `load_verified` opens URIs from the environment; this store was built by hand, so read it
    // through the same pieces: manifest, checked files.
    let dir = root.join(&smelt_checkpoint::step_dir_name(step));
    let m = smelt_checkpoint::read::read_manifest(&dir).unwrap();
    assert_eq!(m.step, step);
    let bytes = dir.get(MODEL).unwrap();
    let entry = m.files.iter().find(|f| f.name == MODEL).unwrap();
    assert_eq!(smelt_corpus::format::sha256_hex(&bytes), entry.sha256);
    smelt_checkpoint::tensors::read_model(&smelt_checkpoint::ModelConfig::Gpt(config(64, 16)).param_table(), &bytes, "model").unwrap()
}

/// A worker reports a store it could not reach as transient (the coordinator backs off and
/// restarts, rather than take the same words twice for a job that would always fail); a missing
/// object or refused credentials are not.
#[test]
fn a_store_that_cannot_be_reached_is_told_apart_from_a_missing_object_or_refused_credentials() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bucket")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let e = s3_dir(&endpoint).get("x").unwrap_err();
    assert!(e.is_transient(), "a refused connection: {e}");

    serve_s3(dir.path(), std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    let e = s3_dir(&endpoint).get("missing").unwrap_err();
    assert!(e.is_not_found() && !e.is_transient(), "{e}");
    let wrong = AmazonS3Builder::new()
        .with_bucket_name("bucket")
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id(KEY)
        .with_secret_access_key("not-the-secret")
        .with_retry(RetryConfig { max_retries: 1, retry_timeout: Duration::from_secs(2), ..Default::default() })
        .build()
        .unwrap();
    let wrong = StoreDir::from_parts(Arc::new(wrong), object_store::path::Path::from("ckpt"), "s3://bucket/ckpt");
    let e = wrong.get("missing").unwrap_err();
    assert!(!e.is_transient(), "refused credentials: {e}");
}
