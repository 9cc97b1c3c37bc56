//! Where a job's checkpoints live: `<store>/jobs/<job>/ckpt/<step:08>/`. Zero-padded steps list
//! in step order on every store.

use smelt_corpus::StoreDir;

pub const MODEL: &str = "model.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TRAINER: &str = "trainer.json";
pub const MANIFEST: &str = "MANIFEST.json";

/// The data files, in upload order (the manifest goes after all of them).
pub const DATA_FILES: [&str; 3] = [MODEL, OPTIMIZER, TRAINER];

/// `jobs/<job>/ckpt` under `store`.
pub fn checkpoints_root(store: &StoreDir, job_id: &str) -> StoreDir {
    store.join(&format!("jobs/{job_id}/ckpt"))
}

/// `00000420` for step 420.
pub fn step_dir_name(step: u64) -> String {
    format!("{step:08}")
}

/// The step a checkpoint URI names: its last path segment, when numeric.
pub fn step_of_uri(uri: &str) -> Option<u64> {
    uri.trim_end_matches('/').rsplit('/').next()?.parse().ok()
}

/// The directory holding a checkpoint (its `ckpt/` root), from the checkpoint's URI.
pub fn parent_uri(uri: &str) -> Option<String> {
    let t = uri.trim_end_matches('/');
    let (parent, last) = t.rsplit_once('/')?;
    (!last.is_empty() && !parent.is_empty() && !parent.ends_with(':') && !parent.ends_with(":/")).then(|| parent.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(step_dir_name(42), "00000042");
        assert_eq!(step_of_uri("s3://b/jobs/j/ckpt/00000042/"), Some(42));
        assert_eq!(step_of_uri("memory://x"), None);
        assert_eq!(parent_uri("file:///t/jobs/j/ckpt/00000042").as_deref(), Some("file:///t/jobs/j/ckpt"));
        assert_eq!(parent_uri("/t/ckpt/00000001/").as_deref(), Some("/t/ckpt"));
        assert_eq!(parent_uri("s3://b"), None);
    }
}
