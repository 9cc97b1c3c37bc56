//! Checkpoints on a local store (`file://`): commit, verified read, faults, retention, the
//! uploader.

mod common;

use std::time::Duration;

use common::*;
use smelt_checkpoint::layout::{MANIFEST, MODEL, OPTIMIZER, TRAINER};
use smelt_checkpoint::read::list_steps;
use smelt_checkpoint::{
    commit, list_committed, load_latest_good, load_or_fall_back, load_verified, AsyncCheckpointer, CheckpointError,
    Outcome, Retention, Submitted, UploadOptions,
};
use smelt_corpus::StoreDir;

fn root(dir: &tempfile::TempDir) -> StoreDir {
    StoreDir::open(&format!("file://{}/jobs/job-000001/ckpt", dir.path().display())).unwrap()
}

fn opts() -> UploadOptions {
    UploadOptions::default()
}

#[test]
fn commit_then_load_is_bitwise_and_the_manifest_describes_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let cfg = config(64, 16);
    let s = snapshot(&cfg, 10);
    let c = commit(&root, &s, &opts()).unwrap();
    assert_eq!(c.step, 10);
    assert!(c.uri.ends_with("/jobs/job-000001/ckpt/00000010"), "{}", c.uri);
    assert_eq!(list_committed(&root).unwrap(), [(10, c.uri.clone())]);

    let back = load_verified(&c.uri).unwrap();
    assert_eq!(back.step(), 10);
    assert_eq!(back.params, s.params);
    assert_eq!(back.m, s.m);
    assert_eq!(back.v, s.v);
    assert_eq!(back.trainer, s.trainer);
    let names: Vec<&str> = back.manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, [MODEL, OPTIMIZER, TRAINER]);
    let on_disk = dir.path().join("jobs/job-000001/ckpt/00000010");
    for f in &back.manifest.files {
        let bytes = std::fs::read(on_disk.join(&f.name)).unwrap();
        assert_eq!(bytes.len() as u64, f.size, "{}", f.name);
        assert_eq!(smelt_corpus::format::sha256_hex(&bytes), f.sha256, "{}", f.name);
    }
    // model.safetensors is a smelt model file too: HF names, f32, config in the metadata.
    let bytes = std::fs::read(on_disk.join(MODEL)).unwrap();
    let meta = smelt_engine::weights::metadata(&bytes, "model").unwrap();
    assert_eq!(meta["smelt.format"], "gpt/1");
    assert!(meta["smelt.config"].contains("\"n_embd\":16"), "{meta:?}");
}

#[test]
fn a_second_writer_of_a_committed_step_fails_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let cfg = config(64, 16);
    let first = commit(&root, &snapshot(&cfg, 10), &opts()).unwrap();
    let model = dir.path().join("jobs/job-000001/ckpt/00000010").join(MODEL);
    let before = std::fs::read(&model).unwrap();
    let mut other = snapshot(&cfg, 10);
    other.params.iter_mut().for_each(|x| *x += 1.0);
    let e = commit(&root, &other, &opts()).unwrap_err();
    assert!(matches!(e, CheckpointError::AlreadyCommitted { step: 10, .. }), "{e}");
    assert!(e.to_string().contains("00000010") && e.to_string().contains("never overwritten"), "{e}");
    assert_eq!(std::fs::read(&model).unwrap(), before, "a committed file was overwritten");
    assert_eq!(load_verified(&first.uri).unwrap().params, snapshot(&cfg, 10).params);
}

#[test]
fn an_upload_that_died_before_its_manifest_leaves_no_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let cfg = config(64, 16);
    commit(&root, &snapshot(&cfg, 10), &opts()).unwrap();
    // Step 20's upload died after two of its files (the second one cut short): no manifest.
    let files = smelt_checkpoint::write::encode(&snapshot(&cfg, 20)).unwrap();
    let d20 = root.join("00000020");
    d20.put(files[0].0, files[0].1.clone()).unwrap();
    d20.put(files[1].0, files[1].1.slice(0..100)).unwrap();

    assert_eq!(list_committed(&root).unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), [10]);
    let e = load_verified(d20.uri()).unwrap_err();
    assert!(matches!(e, CheckpointError::NotCommitted { .. }), "{e}");
    assert!(e.to_string().contains("no MANIFEST.json"), "{e}");
    let (latest, skipped) = load_latest_good(&root, None).unwrap();
    assert_eq!((latest.step(), skipped.len()), (10, 0));
    // Resuming from the dead one by URI falls back to step 10 and says why.
    let r = load_or_fall_back(d20.uri()).unwrap();
    assert_eq!(r.checkpoint.step(), 10);
    assert!(r.skipped[0].reason.contains("no MANIFEST.json"), "{:?}", r.skipped);
    // A newer commit does not sweep it while it was written to within the grace period (it
    // may be another writer's upload in progress: a rank 0 still saving a rescue checkpoint).
    commit(&root, &snapshot(&cfg, 30), &opts()).unwrap();
    let policy = Retention { keep_last: 5, ..Retention::default() };
    let d20_path = dir.path().join("jobs/job-000001/ckpt/00000020");
    assert!(smelt_checkpoint::retention::apply(&root, policy).unwrap().is_empty());
    assert!(d20_path.join(MODEL).exists());
    // Once it has been silent for the grace period, the next pass sweeps it.
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    for name in [MODEL, OPTIMIZER] {
        std::fs::File::options().write(true).open(d20_path.join(name)).unwrap().set_modified(two_hours_ago).unwrap();
    }
    let deleted = smelt_checkpoint::retention::apply(&root, policy).unwrap();
    assert_eq!(deleted, [20]);
    assert!(!d20_path.join(MODEL).exists());
    assert!(!d20_path.exists(), "the deleted checkpoint's empty directory was left");
    assert!(dir.path().join("jobs/job-000001/ckpt/00000030").join(MODEL).exists());
}

#[test]
fn a_flipped_byte_or_a_short_file_is_detected_and_the_previous_checkpoint_used() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let cfg = config(64, 16);
    for step in [10, 20, 30] {
        commit(&root, &snapshot(&cfg, step), &opts()).unwrap();
    }
    let ckpt = |s: &str| dir.path().join("jobs/job-000001/ckpt").join(s);
    // Step 30: one byte of the optimizer flipped. Step 20: the model file one byte short.
    let p = ckpt("00000030").join(OPTIMIZER);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&p, bytes).unwrap();
    let p = ckpt("00000020").join(MODEL);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();

    let uri30 = root.join("00000030").uri().to_string();
    let e = load_verified(&uri30).unwrap_err();
    assert!(matches!(e, CheckpointError::HashMismatch { .. }), "{e}");
    assert!(e.to_string().contains("00000030/optimizer.safetensors") && e.to_string().contains("corrupt"), "{e}");

    let r = load_or_fall_back(&uri30).unwrap();
    assert_eq!(r.checkpoint.step(), 10);
    assert_eq!(r.checkpoint.params, snapshot(&cfg, 10).params);
    assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped);
    assert!(r.skipped[0].uri.ends_with("00000030") && r.skipped[0].reason.contains("sha256"), "{:?}", r.skipped);
    assert!(r.skipped[1].uri.ends_with("00000020") && r.skipped[1].reason.contains("size"), "{:?}", r.skipped);
    assert!(r.skipped.iter().all(|s| s.corrupt), "damaged files, not a store failing: {:?}", r.skipped);

    // Set aside, step 30 is no longer committed (retention does not count it), its manifest is
    // kept beside its files, and the step can be written again.
    smelt_checkpoint::set_aside(&uri30, &opts()).unwrap();
    assert_eq!(list_committed(&root).unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), vec![10, 20]);
    assert!(ckpt("00000030").join(smelt_checkpoint::SET_ASIDE_MANIFEST).exists());
    commit(&root, &snapshot(&cfg, 30), &opts()).unwrap();
    assert_eq!(load_verified(&uri30).unwrap().params, snapshot(&cfg, 30).params);
    commit(&root, &snapshot(&cfg, 30), &opts()).unwrap_err(); // committed again: never overwritten
    let p = ckpt("00000030").join(OPTIMIZER);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[mid] ^= 0x01;
    std::fs::write(&p, bytes).unwrap();

    // With nothing good left, the error lists every checkpoint skipped and why.
    let p = ckpt("00000010").join(MANIFEST);
    std::fs::write(&p, b"{ not json").unwrap();
    let e = load_or_fall_back(&uri30).unwrap_err().to_string();
    assert!(e.contains("no good checkpoint") && e.contains("00000010") && e.contains("not a valid manifest"), "{e}");
}

#[test]
fn the_uploader_commits_in_the_background_and_applies_retention() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(&dir);
    let cfg = config(64, 16);
    let up = AsyncCheckpointer::new(root.clone(), Retention { keep_last: 2, keep_every: 30, ..Retention::default() }, opts());
    let mut committed = Vec::new();
    for step in [10, 20, 30, 40, 50, 60] {
        // A checkpoint step: like the training loop, snapshot only when the uploader is free;
        // here the test waits for it, so that every step is committed.
        let (out, idle) = up.wait(Duration::from_secs(60));
        assert!(idle);
        committed.extend(out);
        assert_eq!(up.submit(snapshot(&cfg, step)), Submitted::Started);
    }
    committed.extend(up.finish(Duration::from_secs(60)));
    let steps: Vec<u64> = committed
        .iter()
        .map(|o| match o {
            Outcome::Committed(c) => c.step,
            Outcome::Failed { step, error } => panic!("step {step} failed: {error}"),
        })
        .collect();
    assert_eq!(steps, [10, 20, 30, 40, 50, 60]);
    // keep the last 2 (50, 60) and every multiple of 30 (30, 60)
    let left: Vec<u64> = list_steps(&root).unwrap().into_keys().collect();
    assert_eq!(left, [30, 50, 60]);
    for (step, uri) in list_committed(&root).unwrap() {
        assert_eq!(load_verified(&uri).unwrap().params, snapshot(&cfg, step).params);
    }
}
