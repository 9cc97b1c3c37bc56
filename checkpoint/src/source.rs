//! A model to start from (`finetune.init_from`, `smelt export`): a checkpoint, verified against
//! its manifest before a byte is used; a model file; or a job id, resolved to that job's newest
//! committed checkpoint if it verifies, else its final model file (the end of the same
//! training, newer than any checkpoint), else its earlier checkpoints, newest first. A final
//! model file whose step (its `smelt.step`) is past the newest checkpoint's comes first: the
//! job trained on after checkpoints stopped landing (a full disk, a store that went away).
//!
//! A checkpoint named explicitly is never swapped for another: if it does not verify, the error
//! names the file at fault. A job id names no particular step, so there a corrupt checkpoint is
//! skipped (and reported) for the job's final model file or an earlier checkpoint.

use bytes::Bytes;
use smelt_corpus::StoreDir;
use tracing::warn;

use crate::error::{CheckpointError, Result};
use crate::manifest::HeadConfig;
use crate::layout::{checkpoints_root, parent_uri, step_dir_name, step_of_uri, MANIFEST, MODEL, OPTIMIZER};
use crate::read::{list_committed, load_model_verified, Skipped, VerifiedModel};

/// Where a job id's models are: its checkpoints under `<checkpoint_store>/jobs/<job>/ckpt/`, its
/// final model file at `<final_models>/jobs/<job>/model.safetensors`.
#[derive(Clone, Debug, Default)]
pub struct JobLocations {
    pub checkpoint_store: String,
    pub final_models: Option<String>,
}

/// The bytes of a smelt model file (model.safetensors), and where they came from.
#[derive(Clone, Debug)]
pub struct ModelSource {
    pub bytes: Bytes,
    /// The file read.
    pub file: String,
    /// The checkpoint directory, when the file was verified against a manifest.
    pub checkpoint: Option<String>,
    /// The job that wrote it, when known (a checkpoint's trainer.json, or the job id given).
    pub job: Option<String>,
    /// Checkpoints passed over (job ids only), and why.
    pub skipped: Vec<Skipped>,
    /// A GPT fine-tuning checkpoint's classification head (its trainer.json says so; the model
    /// file then also holds `score.weight`). None for other files: a fine-tuning job's final
    /// model file says it in its own metadata (`smelt.head`, `smelt.num_labels`).
    pub head: Option<HeadConfig>,
}

impl ModelSource {
    fn verified(v: VerifiedModel, skipped: Vec<Skipped>) -> Self {
        let head = v.trainer.head;
        ModelSource { file: format!("{}/{MODEL}", v.uri), checkpoint: Some(v.uri), job: Some(v.trainer.job_id), bytes: v.model, skipped, head }
    }
}

/// A job id as the coordinator makes them (`job-000003`).
pub fn looks_like_job_id(s: &str) -> bool {
    s.strip_prefix("job-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn no_model(source: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::NoModel { name: source.to_string(), message: message.into() }
}

/// Resolves `source`: a checkpoint directory (URI or path; verified), a `.safetensors` file
/// (verified when it is a checkpoint's model.safetensors) or a file of any other name, a
/// directory holding a model file,
/// or a job id (see the module docs).
pub fn resolve_model(source: &str, jobs: &JobLocations) -> Result<ModelSource> {
    let s = source.trim();
    if looks_like_job_id(s) && !std::path::Path::new(s).exists() {
        return from_job(s, jobs);
    }
    if s.ends_with(".safetensors") {
        let (dir, name) = s.rsplit_once('/').unwrap_or((".", s));
        let dir = StoreDir::open(if dir.is_empty() { "/" } else { dir })?;
        if name == MODEL && dir.size(MANIFEST)?.is_some() {
            return Ok(ModelSource::verified(load_model_verified(&dir)?, Vec::new()));
        }
        return Ok(ModelSource { bytes: dir.get(name)?, file: dir.uri_of(name), checkpoint: None, job: None, skipped: Vec::new(), head: None });
    }
    // A file under another name (`model.bin`, a copy without the extension) is a model file
    // too: read as one (what it holds is checked when it is parsed), not taken for a directory.
    if let Some((parent, name)) = Some(s.rsplit_once('/').unwrap_or((".", s))).filter(|(_, n)| !n.is_empty()) {
        if let Ok(parent) = StoreDir::open(if parent.is_empty() { "/" } else { parent }) {
            if matches!(parent.size(name), Ok(Some(_))) {
                return Ok(ModelSource { bytes: parent.get(name)?, file: parent.uri_of(name), checkpoint: None, job: None, skipped: Vec::new(), head: None });
            }
        }
    }
    let dir = StoreDir::open(s)?;
    if dir.size(MANIFEST)?.is_some() {
        return Ok(ModelSource::verified(load_model_verified(&dir)?, Vec::new()));
    }
    // A step directory under `ckpt/` without a manifest is an upload that never finished: its
    // model.safetensors may be partial, so it is not read.
    if step_of_uri(s).is_some() && parent_uri(s).is_some_and(|p| p.ends_with("/ckpt")) {
        return Err(CheckpointError::NotCommitted { uri: dir.uri().to_string() });
    }
    // likewise a directory of another name holding a checkpoint's optimizer state beside the
    // model (a step directory renamed or copied without its manifest)
    if dir.size(OPTIMIZER)?.is_some() {
        return Err(CheckpointError::NotCommitted { uri: dir.uri().to_string() });
    }
    match dir.get(MODEL) {
        Ok(bytes) => Ok(ModelSource { bytes, file: dir.uri_of(MODEL), checkpoint: None, job: None, skipped: Vec::new(), head: None }),
        Err(e) if e.is_not_found() => Err(no_model(s, format!("no {MODEL} here, and no {MANIFEST} (not a checkpoint)"))),
        Err(e) => Err(e.into()),
    }
}

/// The step a model file in `dir` says it was saved at (`smelt.step` in its safetensors header),
/// read from the header alone; None when there is no such file or it does not say.
fn model_step(dir: &StoreDir) -> Option<u64> {
    dir.size(MODEL).ok()??;
    let len = u64::from_le_bytes(dir.get_range(MODEL, 0..8).ok()?.as_ref().try_into().ok()?);
    // (a header of a few kilobytes; a wild length is no model file of ours)
    if len > 1 << 24 {
        return None;
    }
    let header: serde_json::Value = serde_json::from_slice(&dir.get_range(MODEL, 8..8 + len).ok()?).ok()?;
    header.get("__metadata__")?.get("smelt.step")?.as_str()?.parse().ok()
}

/// A job's newest committed checkpoint that verifies; if the newest does not, the job's final
/// model file (the end of the same training), then earlier checkpoints.
fn from_job(job: &str, jobs: &JobLocations) -> Result<ModelSource> {
    let root = checkpoints_root(&StoreDir::open(&jobs.checkpoint_store)?, job);
    let committed = match list_committed(&root) {
        Ok(c) => c,
        Err(CheckpointError::Store(e)) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut skipped = Vec::new();
    let try_step = |step: u64, skipped: &mut Vec<Skipped>| {
        let dir = root.join(&step_dir_name(step));
        match load_model_verified(&dir) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(job, uri = %dir.uri(), error = %e, "checkpoint failed verification; looking for another model of the job");
                skipped.push(Skipped { uri: dir.uri().to_string(), reason: e.to_string(), corrupt: e.is_corruption() });
                None
            }
        }
    };
    let final_dir = jobs.final_models.as_deref().map(|f| StoreDir::open(f).map(|d| d.join(&format!("jobs/{job}")))).transpose()?;
    let newest_step = committed.last().map(|(s, _)| *s);
    if let (Some(dir), Some(newest)) = (&final_dir, newest_step) {
        if let Some(step) = model_step(dir).filter(|s| *s > newest) {
            warn!(job, step, newest_checkpoint = newest, "the job's final weights are newer than its newest checkpoint: reading them");
            return Ok(ModelSource { bytes: dir.get(MODEL)?, file: dir.uri_of(MODEL), checkpoint: None, job: Some(job.to_string()), skipped, head: None });
        }
    }
    let mut newest_first = committed.iter().rev().map(|(s, _)| *s);
    if let Some(v) = newest_first.next().and_then(|s| try_step(s, &mut skipped)) {
        return Ok(ModelSource::verified(v, skipped));
    }
    let final_file = match final_dir {
        Some(dir) => {
            match dir.get(MODEL) {
                Ok(bytes) => {
                    return Ok(ModelSource { bytes, file: dir.uri_of(MODEL), checkpoint: None, job: Some(job.to_string()), skipped, head: None });
                }
                Err(e) if e.is_not_found() => Some(dir.uri_of(MODEL)),
                Err(e) => return Err(e.into()),
            }
        }
        None => None,
    };
    for step in newest_first {
        if let Some(v) = try_step(step, &mut skipped) {
            return Ok(ModelSource::verified(v, skipped));
        }
    }
    let mut why = if committed.is_empty() {
        format!("no committed checkpoint under {}", root.uri())
    } else {
        let s: Vec<String> = skipped.iter().map(|s| format!("{}: {}", s.uri, s.reason)).collect();
        format!("no checkpoint under {} verifies ({})", root.uri(), s.join("; "))
    };
    if let Some(f) = final_file {
        why += &format!("; no final weights of job {job} at {f}");
    }
    Err(no_model(job, why))
}
