//! `smelt export hf` and `smelt checkpoints list` on real stores: checkpoints committed by the
//! checkpoint crate on `file://` and on an S3-protocol server on loopback (in process; the
//! `smelt` child process reaches it through the standard AWS_* variables). A flipped byte makes
//! an explicitly named checkpoint refused (the error names the file) and a job id fall back.

use std::path::Path;
use std::process::{Command, Output};

mod harness;

use smelt_checkpoint::{commit, Snapshot, UploadOptions};
use smelt_corpus::loopback::S3Loopback;
use smelt_corpus::StoreDir;

fn smelt(args: &[&str], env: &[(&str, String)]) -> Output {
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

/// A byte-tokenizer GPT small enough to write in milliseconds; its weights depend on `step`.
fn snapshot(step: u64) -> Snapshot {
    harness::tiny_snapshot(step, "job-000007")
}

fn flip_last_bytes(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() - 4;
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// `transformer.wte.weight` of an export, read from the safetensors header by hand.
fn exported_wte(out: &Path) -> Vec<f32> {
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header["transformer.wte.weight"]["data_offsets"];
    let (a, b) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
    bytes[8 + n + a..8 + n + b].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn export_verifies_checkpoints_on_file_stores_and_a_job_id_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let root = StoreDir::open(store.join("jobs/job-000007/ckpt").to_str().unwrap()).unwrap();
    for step in [10, 20] {
        commit(&root, &snapshot(step), &UploadOptions::default()).unwrap();
    }
    let wte_len = 256 * 8;
    let step_dir = |s: u64| store.join(format!("jobs/job-000007/ckpt/{s:08}"));
    let uri20 = format!("file://{}", step_dir(20).display());

    let out = dir.path().join("hf20");
    let o = smelt(&["export", "hf", &uri20, out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text_of(&o));
    assert_eq!(exported_wte(&out), snapshot(20).params[..wte_len]);

    // Listing: both committed, both verify.
    let o = smelt(&["checkpoints", "list", store.to_str().unwrap()], &[]);
    let listing = text_of(&o);
    assert!(o.status.success(), "{listing}");
    let rows: Vec<&str> = listing.lines().filter(|l| l.starts_with("job-000007")).collect();
    assert_eq!(rows.len(), 2, "{listing}");
    assert!(rows.iter().all(|r| r.contains(" ok ")), "{listing}");
    // The same by job id from the store, no coordinator running (--store, or SMELT_STORE), and
    // by the job's own directory
    let store_env = vec![("SMELT_STORE", store.to_str().unwrap().to_string())];
    for (args, env) in [
        (vec!["checkpoints", "list", "job-000007", "--store", store.to_str().unwrap()], vec![]),
        (vec!["checkpoints", "list", "job-000007"], store_env),
        (vec!["checkpoints", "list", store.join("jobs/job-000007").to_str().unwrap()], vec![]),
        // `list` may be left out
        (vec!["checkpoints", "job-000007", "--store", store.to_str().unwrap()], vec![]),
    ] {
        let o = smelt(&args, &env);
        let l = text_of(&o);
        assert!(o.status.success(), "{args:?}: {l}");
        assert_eq!(l.lines().filter(|r| r.starts_with("job-000007") && r.contains(" ok ")).count(), 2, "{args:?}: {l}");
    }
    // Without a store, a job id asks the coordinator; none running: the error says how to do
    // without it
    let o = smelt(&["checkpoints", "list", "job-000007", "--coordinator", "http://127.0.0.1:9"], &[]);
    let e = text_of(&o);
    assert!(!o.status.success() && e.contains("--store"), "{e}");
    // Nothing to list fails, naming where it looked: a missing path, an empty directory, and one
    // checkpoint's own directory (pointed at its parent).
    let missing = dir.path().join("nope");
    let o = smelt(&["checkpoints", "list", missing.to_str().unwrap(), "--json"], &[]);
    let e = text_of(&o);
    assert!(!o.status.success() && e.contains("does not exist") && e.contains(missing.to_str().unwrap()), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = smelt(&["checkpoints", "list", empty.to_str().unwrap()], &[]);
    let e = text_of(&o);
    assert!(!o.status.success() && e.contains(empty.to_str().unwrap()) && e.contains("a job id"), "{e}");
    let o = smelt(&["checkpoints", "list", step_dir(10).to_str().unwrap()], &[]);
    let e = text_of(&o);
    assert!(!o.status.success() && e.contains("list its parent") && e.contains("job-000007/ckpt"), "{e}");

    flip_last_bytes(&step_dir(20).join("model.safetensors"));
    // Named explicitly: refused, naming the file.
    let o = smelt(&["export", "hf", &uri20, dir.path().join("bad").to_str().unwrap()], &[]);
    let e = text_of(&o);
    assert!(!o.status.success());
    assert!(e.contains("00000020/model.safetensors") && e.contains("sha256") && e.contains("corrupt"), "{e}");
    assert!(!dir.path().join("bad/model.safetensors").exists(), "a corrupt checkpoint was exported");
    // The listing says which one is corrupt.
    let o = smelt(&["checkpoints", "list", &format!("file://{}", store.join("jobs/job-000007/ckpt").display())], &[]);
    let listing = text_of(&o);
    assert!(!o.status.success() && listing.contains("error: 1 of 2 checkpoints do not verify (listed above)"), "{listing}");
    let row20 = listing.lines().find(|l| l.contains("00000020")).unwrap_or_else(|| panic!("{listing}"));
    let row10 = listing.lines().find(|l| l.contains("00000010")).unwrap_or_else(|| panic!("{listing}"));
    assert!(row20.contains(" corrupt "), "{listing}");
    // and why, under the table
    assert!(listing.lines().any(|l| l.starts_with("job-000007 step 20: corrupt: ") && l.contains("sha256")), "{listing}");
    assert!(row10.contains(" ok "), "{listing}");
    let o = smelt(&["checkpoints", "list", store.to_str().unwrap(), "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let verified: Vec<(u64, bool)> = v.as_array().unwrap().iter().map(|r| (r["step"].as_u64().unwrap(), r["verified"].as_bool().unwrap())).collect();
    assert_eq!(verified, [(10, true), (20, false)]);

    // A job id: the corrupt newest is skipped for the previous good one.
    let out = dir.path().join("hf-job");
    let o = smelt(&["export", "hf", "job-000007", out.to_str().unwrap(), "--store", store.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text_of(&o));
    // said once, by the checkpoint reader, with its error
    assert_eq!(text_of(&o).matches("checkpoint failed verification").count(), 1, "{}", text_of(&o));
    assert!(!text_of(&o).contains("checkpoint skipped"), "{}", text_of(&o));
    assert_eq!(exported_wte(&out), snapshot(10).params[..wte_len]);
}

#[test]
fn export_and_list_read_checkpoints_over_s3() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Loopback::start(&dir.path().join("s3")).unwrap();
    s3.create_bucket("ckpts").unwrap();
    let root = s3.dir("ckpts", "run/jobs/job-000007/ckpt").unwrap();
    for step in [10, 20] {
        commit(&root, &snapshot(step), &UploadOptions::default()).unwrap();
    }
    let env: Vec<(&str, String)> = s3.env();
    let out = dir.path().join("hf");
    let o = smelt(&["export", "hf", "s3://ckpts/run/jobs/job-000007/ckpt/00000020", out.to_str().unwrap()], &env);
    assert!(o.status.success(), "{}", text_of(&o));
    assert_eq!(exported_wte(&out), snapshot(20).params[..256 * 8]);
    let o = smelt(&["export", "hf", "job-000007", dir.path().join("hf-job").to_str().unwrap(), "--store", "s3://ckpts/run"], &env);
    assert!(o.status.success(), "{}", text_of(&o));
    assert_eq!(exported_wte(&dir.path().join("hf-job")), snapshot(20).params[..256 * 8]);

    flip_last_bytes(&dir.path().join("s3/ckpts/run/jobs/job-000007/ckpt/00000020/model.safetensors"));
    let o = smelt(&["export", "hf", "s3://ckpts/run/jobs/job-000007/ckpt/00000020", dir.path().join("bad").to_str().unwrap()], &env);
    let e = text_of(&o);
    assert!(!o.status.success() && e.contains("s3://ckpts/run/jobs/job-000007/ckpt/00000020/model.safetensors") && e.contains("sha256"), "{e}");
    let o = smelt(&["checkpoints", "list", "s3://ckpts/run"], &env);
    let listing = text_of(&o);
    assert!(!o.status.success(), "{listing}");
    assert!(listing.lines().any(|l| l.contains("00000020") && l.contains("corrupt")), "{listing}");
    assert!(listing.lines().any(|l| l.contains("00000010") && l.contains(" ok ")), "{listing}");
}

/// A GPT fine-tuning checkpoint with a classification head (its trainer.json says so, its
/// model file holds `score.weight` after the GPT's tensors) exports as
/// `GPT2ForSequenceClassification` with the head's values.
#[test]
fn a_classifier_checkpoint_exports_with_its_head() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let root = StoreDir::open(store.join("jobs/job-000007/ckpt").to_str().unwrap()).unwrap();
    let mut snap = snapshot(30);
    let head: Vec<f32> = (0..3 * 8).map(|i| i as f32 * 0.125 - 1.0).collect();
    snap.params.extend(&head);
    snap.m.extend(vec![0.0; head.len()]);
    snap.v.extend(vec![0.0; head.len()]);
    snap.trainer.head = Some(smelt_checkpoint::HeadConfig { num_labels: 3 });
    commit(&root, &snap, &UploadOptions::default()).unwrap();

    let out = dir.path().join("hf");
    let o = smelt(&["export", "hf", &format!("file://{}", store.join("jobs/job-000007/ckpt/00000030").display()), out.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text_of(&o));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], serde_json::json!(["GPT2ForSequenceClassification"]));
    assert_eq!(cfg["num_labels"], 3);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["score.weight"]["shape"], serde_json::json!([3, 8]));
    let off = &header["score.weight"]["data_offsets"];
    let (a, b) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
    let got: Vec<f32> = bytes[8 + n + a..8 + n + b].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got, head);
    assert_eq!(exported_wte(&out), snap.params[..256 * 8]);
}
