//! Verified reads: the manifest first, then every file checked against its size and sha256
//! before anything is decoded. A checkpoint that fails is skipped for the previous committed
//! one, with a warning naming which and why.

use std::collections::BTreeMap;

use smelt_corpus::format::sha256_hex;
use smelt_corpus::StoreDir;
use tracing::warn;

use crate::error::{CheckpointError, Result};
use crate::layout::{parent_uri, step_dir_name, step_of_uri, DATA_FILES, MANIFEST, MODEL, OPTIMIZER, TRAINER};
use crate::manifest::{Manifest, TrainerJson, FORMAT};
use crate::tensors;

/// A loaded, verified checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub uri: String,
    pub manifest: Manifest,
    pub trainer: TrainerJson,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Checkpoint {
    pub fn step(&self) -> u64 {
        self.trainer.step
    }
}

/// A checkpoint passed over, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub uri: String,
    pub reason: String,
    /// It failed by being damaged ([`CheckpointError::is_corruption`]), not by the store.
    pub corrupt: bool,
}

fn bad(uri: String, message: impl Into<String>) -> CheckpointError {
    CheckpointError::BadMetadata { uri, message: message.into() }
}

/// Reads and checks the manifest of the checkpoint at `dir`.
pub fn read_manifest(dir: &StoreDir) -> Result<Manifest> {
    let uri = dir.uri_of(MANIFEST);
    let text = match dir.get(MANIFEST) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Err(CheckpointError::NotCommitted { uri: dir.uri().to_string() }),
        Err(e) => return Err(e.into()),
    };
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| bad(uri.clone(), format!("not a valid manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(uri, format!("checkpoint format {:?}, this smelt reads {FORMAT:?}", m.format)));
    }
    for f in DATA_FILES {
        if !m.files.iter().any(|e| e.name == f) {
            return Err(bad(uri, format!("the manifest lists no {f}")));
        }
    }
    Ok(m)
}

/// One file of a checkpoint, checked against the manifest's size and sha256.
fn read_checked(dir: &StoreDir, m: &Manifest, name: &str) -> Result<bytes::Bytes> {
    let entry = m.files.iter().find(|e| e.name == name).expect("read_manifest checked the list");
    let uri = dir.uri_of(name);
    let data = dir.get(name)?;
    if data.len() as u64 != entry.size {
        return Err(CheckpointError::SizeMismatch { uri, expected: entry.size, actual: data.len() as u64 });
    }
    let actual = sha256_hex(&data);
    if actual != entry.sha256 {
        return Err(CheckpointError::HashMismatch { uri, expected: entry.sha256.clone(), actual });
    }
    Ok(data)
}

/// Loads the checkpoint at `uri` (its directory), verifying every byte.
pub fn load_verified(uri: &str) -> Result<Checkpoint> {
    load_verified_dir(&StoreDir::open(uri)?)
}

/// Loads the checkpoint in `dir` (a store opened by hand), verifying every byte.
pub fn load_verified_dir(dir: &StoreDir) -> Result<Checkpoint> {
    let dir = dir.clone();
    let manifest = read_manifest(&dir)?;
    let trainer = trainer_of(&dir, &manifest, &read_checked(&dir, &manifest, TRAINER)?)?;
    let table = tensors::table_of(&trainer);
    let params = tensors::read_model(&table, &read_checked(&dir, &manifest, MODEL)?, &dir.uri_of(MODEL))?;
    let (m, v) = tensors::read_optimizer(&table, &read_checked(&dir, &manifest, OPTIMIZER)?, &dir.uri_of(OPTIMIZER))?;
    Ok(Checkpoint { uri: dir.uri().to_string(), manifest, trainer, params, m, v })
}

/// Checks every file of the checkpoint in `dir` against its manifest (sizes and sha256), and its
/// trainer.json as every loader does (its step the manifest's, its model config valid), without
/// decoding the tensors; returns the manifest. So a checkpoint this passes is one the loaders
/// take (`smelt checkpoints list` says "ok", `submit --resume-from` accepts it).
pub fn verify(dir: &StoreDir) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    for f in &manifest.files {
        let data = read_checked(dir, &manifest, &f.name)?;
        if f.name == TRAINER {
            trainer_of(dir, &manifest, &data)?;
        }
    }
    // a checkpoint copied or renamed under another step's directory: listings and
    // `--resume-from` go by the name, the worker by the manifest
    if let Some(named) = step_of_uri(dir.uri()).filter(|&s| s != manifest.step) {
        return Err(bad(
            dir.uri_of(MANIFEST),
            format!("step {} but its directory is named for step {named} (a checkpoint copied or renamed under another step)", manifest.step),
        ));
    }
    Ok(manifest)
}

/// trainer.json's contents, checked as the loaders check them: valid JSON of a trainer state
/// whose step is the manifest's and whose model config is valid.
fn trainer_of(dir: &StoreDir, manifest: &Manifest, data: &[u8]) -> Result<TrainerJson> {
    let trainer_uri = dir.uri_of(TRAINER);
    let trainer: TrainerJson = serde_json::from_slice(data).map_err(|e| bad(trainer_uri.clone(), format!("not a valid trainer.json: {e}")))?;
    if trainer.step != manifest.step {
        return Err(bad(trainer_uri, format!("step {} but the manifest says {}", trainer.step, manifest.step)));
    }
    trainer.model.validate().map_err(|e| bad(trainer_uri, format!("bad {} model config: {e}", trainer.model.arch())))?;
    Ok(trainer)
}

/// A checkpoint's weights alone, verified: what a fine-tuning job or an export starts from.
#[derive(Clone, Debug)]
pub struct VerifiedModel {
    /// The checkpoint's directory.
    pub uri: String,
    pub manifest: Manifest,
    pub trainer: TrainerJson,
    /// model.safetensors, checked against the manifest (a smelt model file).
    pub model: bytes::Bytes,
}

/// Reads the manifest, trainer.json and model.safetensors of the checkpoint in `dir`, checking
/// both files' sizes and hashes (the optimizer's moments, not needed to start from the weights,
/// are not read).
pub fn load_model_verified(dir: &StoreDir) -> Result<VerifiedModel> {
    let manifest = read_manifest(dir)?;
    let trainer = trainer_of(dir, &manifest, &read_checked(dir, &manifest, TRAINER)?)?;
    let model = read_checked(dir, &manifest, MODEL)?;
    Ok(VerifiedModel { uri: dir.uri().to_string(), manifest, trainer, model })
}

/// A step directory under a `ckpt/` root, as one listing shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepDir {
    /// It has a manifest.
    pub committed: bool,
    /// When its newest object was written (the store's clock, ms since the Unix epoch): how long
    /// an upload without a manifest has been silent.
    pub newest_ms: i64,
}

/// What lies under a `ckpt/` root: each step directory, whether it has a manifest and when it
/// was last written to.
pub fn list_step_dirs(root: &StoreDir) -> Result<BTreeMap<u64, StepDir>> {
    let mut steps: BTreeMap<u64, StepDir> = BTreeMap::new();
    for (name, info) in root.list_info("")? {
        let Some((dir, file)) = name.split_once('/') else { continue };
        let Ok(step) = dir.parse::<u64>() else { continue };
        if dir != step_dir_name(step) {
            continue;
        }
        let d = steps.entry(step).or_insert(StepDir { committed: false, newest_ms: i64::MIN });
        d.committed |= file == MANIFEST;
        d.newest_ms = d.newest_ms.max(info.modified_ms);
    }
    Ok(steps)
}

/// What lies under a `ckpt/` root: for each step directory, whether it has a manifest.
pub fn list_steps(root: &StoreDir) -> Result<BTreeMap<u64, bool>> {
    Ok(list_step_dirs(root)?.into_iter().map(|(s, d)| (s, d.committed)).collect())
}

/// Steps with a manifest under `root` (committed, not yet verified), oldest first, with URIs.
pub fn list_committed(root: &StoreDir) -> Result<Vec<(u64, String)>> {
    Ok(list_steps(root)?
        .into_iter()
        .filter(|(_, committed)| *committed)
        .map(|(s, _)| (s, root.join(&step_dir_name(s)).uri().to_string()))
        .collect())
}

/// The newest committed checkpoint under `root` (at most step `at_most`) that verifies; the
/// ones that fail are skipped, each with a warning, and listed in the result.
pub fn load_latest_good(root: &StoreDir, at_most: Option<u64>) -> Result<(Checkpoint, Vec<Skipped>)> {
    let mut skipped = Vec::new();
    for (step, uri) in list_committed(root)?.into_iter().rev() {
        if at_most.is_some_and(|max| step > max) {
            continue;
        }
        match load_verified(&uri) {
            Ok(c) => return Ok((c, skipped)),
            Err(e) => {
                warn!(uri = %uri, step, error = %e, "checkpoint failed verification; trying the previous one");
                skipped.push(Skipped { uri, reason: e.to_string(), corrupt: e.is_corruption() });
            }
        }
    }
    Err(CheckpointError::NoGoodCheckpoint {
        root: root.uri().to_string(),
        skipped: skipped.into_iter().map(|s| format!("{}: {}", s.uri, s.reason)).collect(),
    })
}

/// A checkpoint to resume from, and those passed over to reach it.
#[derive(Clone, Debug)]
pub struct Resumed {
    pub checkpoint: Checkpoint,
    pub skipped: Vec<Skipped>,
}

/// Loads the checkpoint at `uri`; if it does not verify, the newest good one before it in the
/// same `ckpt/` directory (never a newer one: the caller asked for this point in training).
pub fn load_or_fall_back(uri: &str) -> Result<Resumed> {
    match load_verified(uri) {
        Ok(checkpoint) => Ok(Resumed { checkpoint, skipped: Vec::new() }),
        Err(e) => {
            warn!(uri = %uri, error = %e, "checkpoint failed verification; falling back to the previous good one");
            let first = Skipped { uri: uri.to_string(), reason: e.to_string(), corrupt: e.is_corruption() };
            let (Some(step), Some(parent)) = (step_of_uri(uri), parent_uri(uri)) else { return Err(e) };
            let root = StoreDir::open(&parent)?;
            let below = step.checked_sub(1).ok_or(e)?;
            match load_latest_good(&root, Some(below)) {
                Ok((checkpoint, mut skipped)) => {
                    skipped.insert(0, first);
                    Ok(Resumed { checkpoint, skipped })
                }
                Err(CheckpointError::NoGoodCheckpoint { root, mut skipped }) => {
                    skipped.insert(0, format!("{}: {}", first.uri, first.reason));
                    Err(CheckpointError::NoGoodCheckpoint { root, skipped })
                }
                Err(e) => Err(e),
            }
        }
    }
}
