//! Models to start from, on a local store: a checkpoint named explicitly is verified and refused
//! when corrupt (the error names the file); a job id falls back past a corrupt checkpoint to the
//! final model file or an earlier checkpoint; an unfinished upload is never read; a
//! classification head's tensors round-trip; `verify` checks every file.

mod common;

use common::*;
use smelt_checkpoint::layout::{MANIFEST, MODEL, OPTIMIZER};
use smelt_checkpoint::{commit, load_verified, resolve_model, verify, CheckpointError, HeadConfig, JobLocations, UploadOptions};
use smelt_corpus::StoreDir;

fn flip_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

/// Two committed checkpoints (steps 10, 20) of job-000001 under `dir`.
fn two_checkpoints(dir: &std::path::Path) -> StoreDir {
    let root = StoreDir::open(&format!("file://{}/jobs/job-000001/ckpt", dir.display())).unwrap();
    let cfg = config(64, 16);
    for step in [10, 20] {
        commit(&root, &snapshot(&cfg, step), &UploadOptions::default()).unwrap();
    }
    root
}

fn ckpt(dir: &std::path::Path, step: u64) -> std::path::PathBuf {
    dir.join(format!("jobs/job-000001/ckpt/{step:08}"))
}

#[test]
fn an_explicit_checkpoint_is_verified_and_refused_when_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    two_checkpoints(dir.path());
    let jobs = JobLocations::default();
    let uri = format!("file://{}", ckpt(dir.path(), 20).display());
    let got = resolve_model(&uri, &jobs).unwrap();
    assert_eq!(got.checkpoint.as_deref(), Some(uri.as_str()));
    assert_eq!(got.job.as_deref(), Some("job-000001"));
    assert_eq!(&got.bytes[..], std::fs::read(ckpt(dir.path(), 20).join(MODEL)).unwrap());
    // A local path works the same, as does naming the model file itself.
    let as_path = ckpt(dir.path(), 20).join(MODEL);
    assert!(resolve_model(as_path.to_str().unwrap(), &jobs).unwrap().checkpoint.is_some());

    flip_byte(&ckpt(dir.path(), 20).join(MODEL));
    for source in [uri.clone(), as_path.display().to_string()] {
        let e = resolve_model(&source, &jobs).unwrap_err();
        assert!(matches!(e, CheckpointError::HashMismatch { .. }), "{e}");
        assert!(e.to_string().contains("00000020/model.safetensors") && e.to_string().contains("corrupt"), "{e}");
    }
}

#[test]
fn a_job_id_skips_a_corrupt_checkpoint_for_the_final_model_or_an_earlier_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    two_checkpoints(dir.path());
    let store = dir.path().display().to_string();
    let jobs = JobLocations { checkpoint_store: store.clone(), final_models: Some(store.clone()) };
    let newest = resolve_model("job-000001", &jobs).unwrap();
    assert!(newest.checkpoint.unwrap().ends_with("/00000020"));
    assert!(newest.skipped.is_empty());

    flip_byte(&ckpt(dir.path(), 20).join(MODEL));
    // No final model: the previous checkpoint.
    let got = resolve_model("job-000001", &jobs).unwrap();
    assert!(got.checkpoint.as_deref().unwrap().ends_with("/00000010"), "{:?}", got.checkpoint);
    assert_eq!(got.skipped.len(), 1);
    assert!(got.skipped[0].uri.ends_with("/00000020") && got.skipped[0].reason.contains("sha256"), "{:?}", got.skipped);

    // With the job's final model file: that, rather than an earlier point of the training.
    let final_model = dir.path().join("jobs/job-000001/model.safetensors");
    std::fs::write(&final_model, b"final weights").unwrap();
    let got = resolve_model("job-000001", &jobs).unwrap();
    assert_eq!((got.checkpoint, &got.bytes[..]), (None, &b"final weights"[..]));
    assert_eq!(got.skipped.len(), 1);

    // Nothing good at all: the error lists what was skipped and where the final model was looked for.
    std::fs::remove_file(&final_model).unwrap();
    flip_byte(&ckpt(dir.path(), 10).join(MODEL));
    let e = resolve_model("job-000001", &jobs).unwrap_err().to_string();
    assert!(e.contains("00000010") && e.contains("00000020") && e.contains("no final weights of job job-000001 at"), "{e}");
    let e = resolve_model("job-000002", &jobs).unwrap_err().to_string();
    assert!(e.contains("job-000002: no committed checkpoint under"), "{e}");
}

#[test]
fn an_unfinished_upload_is_never_read() {
    let dir = tempfile::tempdir().unwrap();
    two_checkpoints(dir.path());
    std::fs::remove_file(ckpt(dir.path(), 20).join("MANIFEST.json")).unwrap();
    let e = resolve_model(ckpt(dir.path(), 20).to_str().unwrap(), &JobLocations::default()).unwrap_err();
    assert!(matches!(e, CheckpointError::NotCommitted { .. }), "{e}");
    // nor under another name (a step directory renamed or copied without its manifest)
    let renamed = dir.path().join("jobs/job-000001/ckpt/b");
    std::fs::rename(ckpt(dir.path(), 20), &renamed).unwrap();
    let e = resolve_model(renamed.to_str().unwrap(), &JobLocations::default()).unwrap_err();
    assert!(matches!(e, CheckpointError::NotCommitted { .. }), "{e}");
    let e = resolve_model(dir.path().join("nothing-here").to_str().unwrap(), &JobLocations::default()).unwrap_err();
    assert!(e.to_string().contains("nothing-here") && e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn a_classification_head_round_trips_and_verify_checks_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = StoreDir::open(&format!("file://{}/jobs/job-000001/ckpt", dir.path().display())).unwrap();
    let cfg = config(64, 16);
    let mut s = snapshot(&cfg, 5);
    s.trainer.head = Some(HeadConfig { num_labels: 3 });
    // score.weight (3, 16) after the GPT's parameters, in the moments too.
    let extra: Vec<f32> = (0..48).map(|i| i as f32 * 0.5).collect();
    s.params.extend(&extra);
    s.m.extend(extra.iter().map(|x| x * 0.1));
    s.v.extend(extra.iter().map(|x| x * 0.01));
    let c = commit(&root, &s, &UploadOptions::default()).unwrap();
    let back = load_verified(&c.uri).unwrap();
    assert_eq!((back.params == s.params, back.m == s.m, back.v == s.v), (true, true, true));
    assert_eq!(back.trainer.head, Some(HeadConfig { num_labels: 3 }));
    let model = std::fs::read(ckpt(dir.path(), 5).join(MODEL)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&model).unwrap();
    assert_eq!(st.tensor("score.weight").unwrap().shape(), [3, 16]);

    let step = root.join("00000005");
    assert_eq!(verify(&step).unwrap().step, 5);
    // a manifest whose step disagrees with trainer.json is refused, as every loader refuses it
    let manifest_path = ckpt(dir.path(), 5).join(MANIFEST);
    let original = std::fs::read_to_string(&manifest_path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
    m["step"] = serde_json::json!(9999);
    std::fs::write(&manifest_path, serde_json::to_string(&m).unwrap()).unwrap();
    let e = verify(&step).unwrap_err().to_string();
    assert!(e.contains("trainer.json") && e.contains("step 5 but the manifest says 9999"), "{e}");
    assert_eq!(load_verified(&c.uri).unwrap_err().to_string(), e, "verify and the loader disagree");
    std::fs::write(&manifest_path, original).unwrap();
    // the whole checkpoint copied under another step's name: refused, naming both steps
    let copy = ckpt(dir.path(), 7);
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(ckpt(dir.path(), 5)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
    }
    let e = verify(&root.join("00000007")).unwrap_err().to_string();
    assert!(e.contains("step 5 but its directory is named for step 7"), "{e}");
    flip_byte(&ckpt(dir.path(), 5).join(OPTIMIZER));
    let e = verify(&step).unwrap_err().to_string();
    assert!(e.contains("optimizer.safetensors") && e.contains("sha256"), "{e}");
}

#[test]
fn a_model_file_under_another_name_is_read_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = StoreDir::open(&format!("file://{}/jobs/job-000001/ckpt", dir.path().display())).unwrap();
    let cfg = config(64, 16);
    commit(&root, &snapshot(&cfg, 5), &UploadOptions::default()).unwrap();
    let model = std::fs::read(ckpt(dir.path(), 5).join(MODEL)).unwrap();
    for name in ["weights.bin", "weights"] {
        let copy = dir.path().join(name);
        std::fs::write(&copy, &model).unwrap();
        let m = resolve_model(copy.to_str().unwrap(), &JobLocations::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&m.bytes[..], &model[..], "{name}");
        assert!(m.file.ends_with(name), "{}", m.file);
    }
}

/// A job whose final weights are newer than its newest checkpoint (checkpoints stopped landing:
/// a full disk) resolves to the final weights, read by the step in their header; final weights
/// of the newest checkpoint's step leave the (verified) checkpoint first.
#[test]
fn a_job_id_takes_final_weights_newer_than_its_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    two_checkpoints(dir.path());
    let store = dir.path().display().to_string();
    let jobs = JobLocations { checkpoint_store: store.clone(), final_models: Some(store.clone()) };
    let final_model = dir.path().join("jobs/job-000001/model.safetensors");
    let write_final = |step: u64| {
        let data = [0u8; 4];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
        let meta = std::collections::HashMap::from([("smelt.step".to_string(), step.to_string())]);
        std::fs::write(&final_model, safetensors::serialize([("w", view)], Some(meta)).unwrap()).unwrap();
    };
    write_final(200);
    let got = resolve_model("job-000001", &jobs).unwrap();
    assert_eq!((got.checkpoint.as_deref(), got.file.ends_with("jobs/job-000001/model.safetensors")), (None, true), "{}", got.file);
    write_final(20);
    let got = resolve_model("job-000001", &jobs).unwrap();
    assert!(got.checkpoint.as_deref().is_some_and(|c| c.ends_with("/00000020")), "{:?}", got.checkpoint);
}
