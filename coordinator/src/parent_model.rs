//! Where a job's `init_from` finds the job it names. The worker that runs a fine-tuning (or
//! continued-pretraining) job looks for `init_from = "job-000003"` under its own store and
//! output directory; but job 3's final weights were saved in *its* rank 0's output directory,
//! and on a cluster of hand-started workers (one output directory each) that is usually another
//! one. The coordinator knows both places: the newest checkpoint recorded, and the root rank 0
//! reported its final weights under. It sends them with the assignment.

use smelt_jobspec::JobSpec;

use crate::jobs::looks_like_job_id;
use crate::state::State;

impl State {
    /// `(checkpoint store root, final weights root)` of the job `job_id`'s spec names in
    /// `init_from`; each empty where unknown (no such job here, no checkpoint recorded, not
    /// finished), and both when `init_from` is no job id.
    pub(crate) fn parent_locations(&self, job_id: &str) -> (String, String) {
        let Some(spec) = self.jobs.get(job_id).and_then(|j| JobSpec::parse(&j.row.spec_toml).ok()) else {
            return Default::default();
        };
        let init = spec.model.init_from.as_deref().or(spec.finetune.as_ref().map(|f| f.init_from.as_str())).unwrap_or("").trim();
        let Some(parent) = self.jobs.get(init).filter(|_| looks_like_job_id(init)) else {
            return Default::default();
        };
        let store = parent.latest_checkpoint.as_ref().and_then(|(_, uri)| store_root_of(uri, init)).unwrap_or_default();
        (store, parent.row.final_models.clone())
    }
}

/// The store root of checkpoint `uri` (`<root>/jobs/<job>/ckpt/<step>`), when it has that shape.
fn store_root_of(uri: &str, job: &str) -> Option<String> {
    let (dir, step) = uri.trim_end_matches('/').rsplit_once('/')?;
    let suffix = format!("/jobs/{job}/ckpt");
    let root = dir.strip_suffix(&suffix)?;
    (!step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()) && !root.is_empty()).then(|| root.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoints_store_root_is_its_uri_less_the_jobs_own_path() {
        assert_eq!(store_root_of("/runs/w1/jobs/job-000003/ckpt/00000060", "job-000003").as_deref(), Some("/runs/w1"));
        assert_eq!(store_root_of("s3://bucket/runs/jobs/job-000003/ckpt/00000060/", "job-000003").as_deref(), Some("s3://bucket/runs"));
        // another job's checkpoint, or not a step directory: no root
        assert_eq!(store_root_of("/runs/w1/jobs/job-000004/ckpt/00000060", "job-000003"), None);
        assert_eq!(store_root_of("/runs/w1/jobs/job-000003/ckpt/latest", "job-000003"), None);
        assert_eq!(store_root_of("/jobs/job-000003/ckpt/00000060", "job-000003"), None);
    }
}
