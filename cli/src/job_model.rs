//! A model named by job id (`smelt sample|eval|export|train --init-from job-...`): the job's
//! newest verified checkpoint or its final weights under `--store`; where the store holds
//! neither (the job's workers wrote elsewhere: a `smelt worker`'s `--out-dir` is `.smelt/worker`
//! unless given, `smelt up`'s is `.smelt`), the coordinator is asked where the job's last
//! checkpoint went and where its rank 0 saved the final weights, and those are searched in the
//! same order.

use std::time::Duration;

use anyhow::{anyhow, Result};
use smelt_checkpoint::{looks_like_job_id, resolve_model, CheckpointError, JobLocations, ModelSource};
use smelt_proto::v1::GetJobRequest;

use crate::client::{connect, runtime};

/// `--coordinator` of the commands that read a model (sample, eval, export, attention): asked
/// where a job id's model is when `--store` does not hold it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct JobCoordinator {
    /// The coordinator asked where a job id's model went when --store does not hold it (or env
    /// SMELT_COORDINATOR; default http://127.0.0.1:7070).
    #[arg(long = "coordinator", env = "SMELT_COORDINATOR")]
    pub coordinator: Option<String>,
}

/// The URL `--coordinator` gave, for `resolve` (one command per process).
static COORDINATOR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl JobCoordinator {
    /// Makes `--coordinator` the one `resolve` asks.
    pub fn install(&self) {
        if let Some(url) = &self.coordinator {
            let _ = COORDINATOR.set(url.clone());
        }
    }
}

/// How long the coordinator gets to answer: a CLI that falls back on it must not hang.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// `model` resolved under `store` (see `smelt_checkpoint::resolve_model`), or for a job id not
/// found there, the checkpoint the coordinator recorded last (`--coordinator`, else
/// `SMELT_COORDINATOR`, else http://127.0.0.1:7070); errors say where it looked, and an
/// unreachable coordinator ends the command with status 5.
pub(crate) fn resolve(model: &str, store: &str) -> Result<ModelSource> {
    let jobs = JobLocations { checkpoint_store: store.to_string(), final_models: Some(store.to_string()) };
    let here = match resolve_model(model, &jobs) {
        Err(e @ CheckpointError::NoModel { .. }) if looks_like_job_id(model.trim()) => e,
        other => return Ok(other?),
    };
    let job = model.trim();
    let url = COORDINATOR.get().cloned().unwrap_or_else(crate::client::CoordinatorUrl::from_env);
    match recorded(&url, job) {
        Ok(r) if r.checkpoint.is_empty() && r.model.is_empty() => {
            Err(anyhow!("{here}; the coordinator at {url} has no checkpoint or final weights recorded for {job}"))
        }
        Ok(r) => {
            // the roots the coordinator's records lie under, searched in the usual order (the
            // newest checkpoint that verifies, else the final weights, else older checkpoints)
            let checkpoint_store = root_of(&r.checkpoint, &format!("/jobs/{job}/ckpt/"), true);
            let final_models = root_of(&r.model, &format!("/jobs/{job}/model.safetensors"), false);
            tracing::info!(job, checkpoint = %r.checkpoint, model = %r.model, "not under --store; reading where the coordinator recorded the job's model");
            let jobs = JobLocations {
                checkpoint_store: checkpoint_store.unwrap_or_else(|| store.to_string()),
                final_models: Some(final_models.unwrap_or_else(|| store.to_string())),
            };
            let mut src = match resolve_model(job, &jobs) {
                Ok(src) => src,
                // a checkpoint recorded under another layout: read as it is
                Err(_) if !r.checkpoint.is_empty() && checkpoint_store_missing(&r.checkpoint, job) => resolve_model(&r.checkpoint, &jobs)?,
                Err(e) => return Err(anyhow!("{e} (where the coordinator at {url} recorded job {job}'s model)")),
            };
            src.job.get_or_insert_with(|| job.to_string());
            Ok(src)
        }
        Err((status, why)) => Err(crate::client::failure(
            status,
            format!(
                "{here}; {why}. Pass --store (or SMELT_STORE) with the directory its workers wrote to: a worker's --out-dir \
                 (.smelt/worker unless given; smelt up's is .smelt)"
            ),
        )),
    }
}

/// What the coordinator recorded of a job's model: its last checkpoint's URI and its final
/// weights' path, each empty when none.
struct Recorded {
    checkpoint: String,
    model: String,
}

/// The root `uri` lies under (`<root><own>...`), when it has that shape; `step` also wants a
/// step directory's number after `own`.
fn root_of(uri: &str, own: &str, step: bool) -> Option<String> {
    let t = uri.trim_end_matches('/');
    let at = t.rfind(own)?;
    let rest = &t[at + own.len()..];
    let shaped = if step { !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) } else { rest.is_empty() };
    (shaped && at > 0).then(|| t[..at].to_string())
}

fn checkpoint_store_missing(uri: &str, job: &str) -> bool {
    root_of(uri, &format!("/jobs/{job}/ckpt/"), true).is_none()
}

/// The job's recorded checkpoint and final weights; Err says why the coordinator could not be
/// asked (unreachable, no such job).
/// The error: the exit status it should end the command with (5: the coordinator unreachable,
/// as for every client command) and why.
fn recorded(url: &str, job: &str) -> Result<Recorded, (u8, String)> {
    use crate::client::UNREACHABLE;
    let rt = runtime().map_err(|e| (1, e.to_string()))?;
    let asked = rt.block_on(async {
        tokio::time::timeout(ASK_TIMEOUT, async {
            let mut client = connect(url).await.map_err(|e| (crate::client::exit_status(&e), format!("{e:#}")))?;
            client.get_job(GetJobRequest { job_id: job.to_string() }).await.map(|r| r.into_inner()).map_err(|s| match s.code() {
                tonic::Code::NotFound => (1, format!("the coordinator at {url} knows no job {job}")),
                _ => (1, format!("the coordinator at {url} did not say where {job}'s model is ({})", s.message())),
            })
        })
        .await
        .unwrap_or_else(|_| Err((UNREACHABLE, format!("the coordinator at {url} did not answer within {} s", ASK_TIMEOUT.as_secs()))))
    })?;
    Ok(Recorded { checkpoint: asked.last_checkpoint_uri, model: asked.model_uri })
}

#[cfg(test)]
mod tests {
    use super::root_of;

    #[test]
    fn roots_are_the_records_less_the_jobs_own_path() {
        assert_eq!(root_of("/runs/w1/jobs/job-000003/ckpt/00000060/", "/jobs/job-000003/ckpt/", true).as_deref(), Some("/runs/w1"));
        assert_eq!(root_of("s3://b/r/jobs/job-000003/model.safetensors", "/jobs/job-000003/model.safetensors", false).as_deref(), Some("s3://b/r"));
        assert_eq!(root_of("/runs/w1/jobs/job-000003/ckpt/latest", "/jobs/job-000003/ckpt/", true), None);
        assert_eq!(root_of("/runs/w1/jobs/job-000004/model.safetensors", "/jobs/job-000003/model.safetensors", false), None);
    }
}
