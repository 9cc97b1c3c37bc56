//! A snapshot in host memory to a committed checkpoint: the data files first (any order, any
//! number of retries), then MANIFEST.json with a create-only put. The manifest is the commit:
//! until it lands the checkpoint does not exist, and once it has, nothing replaces it.

use bytes::Bytes;
use smelt_corpus::format::sha256_hex;
use smelt_corpus::{ObjectInfo, StoreDir, Tokenizer};
use tracing::info;

use crate::error::{CheckpointError, Result};
use crate::layout::{step_dir_name, MANIFEST, MODEL, OPTIMIZER, TRAINER};
use crate::manifest::{now_ms, FileEntry, Manifest, TrainerJson, FORMAT};
use crate::model_config::ModelConfig;
use crate::tensors;
use crate::upload::{put_object, with_retry, UploadOptions};

/// Everything a checkpoint holds, copied off the training state at a step boundary.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub params: Vec<f32>,
    /// AdamW first and second moments, in the parameters' layout.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub trainer: TrainerJson,
}

impl Snapshot {
    pub fn step(&self) -> u64 {
        self.trainer.step
    }
    pub fn model(&self) -> &ModelConfig {
        &self.trainer.model
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.trainer.tokenizer
    }
}

/// A checkpoint whose manifest has landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub step: u64,
    /// The checkpoint's directory, `<root>/<step:08>`.
    pub uri: String,
    pub manifest_sha256: String,
    /// Bytes written, manifest included.
    pub bytes: u64,
}

/// The three data files of a snapshot, serialized (the CPU-heavy part of a commit).
pub fn encode(s: &Snapshot) -> Result<Vec<(&'static str, Bytes)>> {
    let table = tensors::table_of(&s.trainer);
    let model = tensors::model_bytes(&table, s.model(), s.tokenizer(), &s.params, s.step())?;
    let opt = tensors::optimizer_bytes(&table, &s.m, &s.v)?;
    let trainer = serde_json::to_vec_pretty(&s.trainer).expect("trainer.json serializes");
    Ok(vec![(MODEL, model.into()), (OPTIMIZER, opt.into()), (TRAINER, trainer.into())])
}

/// Every data file of `entries` is in `found` (a listing of `dir`) as written: its size, and
/// the ETag its put returned (`tags`, in `entries`' order) where the store gives both.
fn check_uploaded(dir: &StoreDir, found: &[(String, ObjectInfo)], entries: &[FileEntry], tags: &[Option<String>]) -> Result<()> {
    for (i, e) in entries.iter().enumerate() {
        let ours = tags.get(i).cloned().flatten();
        let problem = match found.iter().find(|(n, _)| *n == e.name) {
            None => "is gone".to_string(),
            Some((_, o)) if o.size != e.size => format!("has {} bytes, not {}", o.size, e.size),
            Some((_, o)) => match (&ours, &o.e_tag) {
                // another ETag than the put's may still be our bytes (a rewrite of the same
                // content; a store whose listing spells ETags unlike its put answers): the
                // content decides, read back only in this rare case
                (Some(ours), Some(now)) if bare_etag(ours) != bare_etag(now) => match dir.get(&e.name) {
                    Ok(bytes) if sha256_hex(&bytes) == e.sha256 => continue,
                    Ok(_) => format!("was written again (ETag {now}, not {ours}, and other bytes)"),
                    Err(err) => format!("cannot be read back ({err})"),
                },
                _ => continue,
            },
        };
        return Err(CheckpointError::Vanished { uri: dir.uri_of(&e.name), message: problem });
    }
    Ok(())
}

/// An ETag without the quotes and weak-validator prefix stores differ on (Azure's listing
/// spells it bare where its PUT answer quotes it).
fn bare_etag(tag: &str) -> &str {
    tag.trim().trim_start_matches("W/").trim_matches('"')
}

/// Writes `snapshot` as `<root>/<step:08>/` and commits it. Fails with `AlreadyCommitted` when
/// that step has a manifest already (checked first, so a second writer does not even upload;
/// and again by the create-only manifest put, which settles a race between two writers).
pub fn commit(root: &StoreDir, snapshot: &Snapshot, opts: &UploadOptions) -> Result<Committed> {
    let policy = &opts.retry;
    let step = snapshot.step();
    let dir = root.join(&step_dir_name(step));
    let already = |dir: &StoreDir| CheckpointError::AlreadyCommitted { uri: dir.uri().to_string(), step };
    if with_retry(policy, &dir.uri_of(MANIFEST), || dir.size(MANIFEST))?.is_some() {
        return Err(already(&dir));
    }
    let files = encode(snapshot)?;
    let mut entries = Vec::with_capacity(files.len());
    let mut tags = Vec::with_capacity(files.len());
    let mut bytes = 0u64;
    for (name, data) in files {
        entries.push(FileEntry { name: name.to_string(), size: data.len() as u64, sha256: sha256_hex(&data) });
        bytes += data.len() as u64;
        tags.push(put_object(&dir, name, data, opts)?);
    }
    // Another writer under the same root may have deleted a file of ours meanwhile (its
    // retention sweeping an upload it took for dead) or overwritten it (a writer of the same
    // step): a manifest over such files would commit a checkpoint that cannot load. Checked
    // before the manifest goes up, and again after, when the manifest is taken back.
    let check = |entries: &[FileEntry]| -> Result<()> {
        let listed = with_retry(policy, dir.uri(), || dir.list_info(""))?;
        check_uploaded(&dir, &listed, entries, &tags)
    };
    check(&entries)?;
    let manifest = Manifest {
        format: FORMAT.to_string(),
        step,
        job_id: snapshot.trainer.job_id.clone(),
        created_at_ms: now_ms(),
        files: entries,
    };
    let text = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    let manifest_sha256 = sha256_hex(&text);
    bytes += text.len() as u64;
    let created = with_retry(policy, &dir.uri_of(MANIFEST), || dir.put_create(MANIFEST, text.clone()))?;
    // A retried put whose first try landed finds its own manifest: that is a success.
    if !created && dir.get(MANIFEST).ok().as_deref() != Some(&text[..]) {
        return Err(already(&dir));
    }
    if let Err(e) = check(&manifest.files) {
        // ours, over files that changed as it went up: taken back (a reader in between fails
        // its verification and falls back, as for any corrupt checkpoint)
        let _ = with_retry(policy, &dir.uri_of(MANIFEST), || dir.delete(MANIFEST));
        return Err(e);
    }
    info!(uri = %dir.uri(), step, bytes, "checkpoint committed");
    Ok(Committed { step, uri: dir.uri().to_string(), manifest_sha256, bytes })
}

/// Where a set-aside checkpoint's manifest goes ([`set_aside`]).
pub const SET_ASIDE_MANIFEST: &str = "MANIFEST.json.corrupt";

/// Uncommits the damaged checkpoint at `uri`: its manifest is kept as `MANIFEST.json.corrupt`
/// and `MANIFEST.json` deleted. The directory is then an uncommitted one: its files stay until
/// the step is written again (over them) or retention sweeps it as it sweeps an upload that died. A committed step is
/// never overwritten, so a corrupt one kept its step from being written again when the job got
/// there after resuming from an earlier one, and retention counted it among the `keep_last`,
/// deleting the good checkpoint just resumed from.
pub fn set_aside(uri: &str, opts: &UploadOptions) -> Result<()> {
    let dir = StoreDir::open(uri)?;
    let policy = &opts.retry;
    let manifest = with_retry(policy, &dir.uri_of(MANIFEST), || dir.get(MANIFEST))?;
    with_retry(policy, &dir.uri_of(SET_ASIDE_MANIFEST), || dir.put(SET_ASIDE_MANIFEST, manifest.clone()))?;
    with_retry(policy, &dir.uri_of(MANIFEST), || dir.delete(MANIFEST))?;
    info!(uri = %uri, kept_as = SET_ASIDE_MANIFEST, "corrupt checkpoint set aside (uncommitted)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_gone_or_cut_before_the_commit_is_named() {
        let dir = StoreDir::open("memory://write-check/ckpt/00000010").unwrap();
        let entry = |name: &str, size: u64| FileEntry { name: name.into(), size, sha256: String::new() };
        let info = |size: u64, tag: &str| ObjectInfo { size, e_tag: Some(tag.into()), modified_ms: 0 };
        let entries = [entry(MODEL, 10), entry(OPTIMIZER, 20)];
        let tags = [Some("m1".to_string()), Some("o1".to_string())];
        let listed = vec![(MODEL.to_string(), info(10, "m1")), (OPTIMIZER.to_string(), info(20, "o1"))];
        check_uploaded(&dir, &listed, &entries, &tags).unwrap();
        // a store without ETags: sizes only
        check_uploaded(&dir, &listed, &entries, &[None, None]).unwrap();
        let e = check_uploaded(&dir, &listed[..1], &entries, &tags).unwrap_err();
        assert!(matches!(e, CheckpointError::Vanished { .. }), "{e}");
        assert!(e.to_string().contains("00000010/optimizer.safetensors: written for this checkpoint but is gone"), "{e}");
        let cut = vec![(MODEL.to_string(), info(10, "m1")), (OPTIMIZER.to_string(), info(7, "o1"))];
        let e = check_uploaded(&dir, &cut, &entries, &tags).unwrap_err();
        assert!(e.to_string().contains("has 7 bytes, not 20"), "{e}");
        // the same ETag spelled with quotes (Azure's PUT answer against its listing)
        let quoted = [Some("\"m1\"".to_string()), Some("W/\"o1\"".to_string())];
        check_uploaded(&dir, &listed, &entries, &quoted).unwrap();
        // another ETag: the bytes decide (here the file is someone else's)
        dir.put(MODEL, &b"0123456789"[..]).unwrap();
        let other = vec![(MODEL.to_string(), info(10, "m2")), (OPTIMIZER.to_string(), info(20, "o1"))];
        let e = check_uploaded(&dir, &other, &entries, &tags).unwrap_err();
        assert!(e.to_string().contains("model.safetensors: written for this checkpoint but was written again (ETag m2, not m1, and other bytes)"), "{e}");
        // ...or ours again (the same bytes rewritten): fine
        let ours = [FileEntry { name: MODEL.into(), size: 10, sha256: sha256_hex(b"0123456789") }];
        check_uploaded(&dir, &other[..1], &ours, &tags[..1]).unwrap();
    }
}
