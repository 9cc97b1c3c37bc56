//! A model named by job id (`smelt sample|eval|export|train --init-from job-...`): the job's
//! newest verified checkpoint or its final weights under `--store`; where the store holds
//! neither (the job's workers wrote elsewhere: a `smelt worker`'s `--out-dir` is `.smelt/worker`
//! unless given, `smelt up`'s is `.smelt`), the coordinator is asked where the job's last
//! checkpoint went, as `smelt checkpoints list` does, and that checkpoint is read (verified).

use std::time::Duration;

use anyhow::{anyhow, Result};
use smelt_checkpoint::{looks_like_job_id, resolve_model, CheckpointError, JobLocations, ModelSource};
use smelt_proto::v1::GetJobRequest;

use crate::client::{connect, runtime};

/// How long the coordinator gets to answer: a CLI that falls back on it must not hang.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// `model` resolved under `store` (see `smelt_checkpoint::resolve_model`), or for a job id not
/// found there, the checkpoint the coordinator at `SMELT_COORDINATOR` (default
/// http://127.0.0.1:7070) recorded last; errors say where it looked.
pub(crate) fn resolve(model: &str, store: &str) -> Result<ModelSource> {
    let jobs = JobLocations { checkpoint_store: store.to_string(), final_models: Some(store.to_string()) };
    let here = match resolve_model(model, &jobs) {
        Err(e @ CheckpointError::NoModel { .. }) if looks_like_job_id(model.trim()) => e,
        other => return Ok(other?),
    };
    let job = model.trim();
    let url = crate::client::CoordinatorUrl::from_env();
    match recorded_checkpoint(&url, job) {
        Ok(Some(uri)) => {
            tracing::info!(job, checkpoint = %uri, "not under --store; reading the checkpoint the coordinator recorded");
            let jobs = JobLocations { checkpoint_store: store.to_string(), final_models: None };
            let mut src = resolve_model(&uri, &jobs).map_err(|e| anyhow!("{e} (job {job}'s last checkpoint, as the coordinator at {url} recorded it)"))?;
            src.job.get_or_insert_with(|| job.to_string());
            Ok(src)
        }
        Ok(None) => Err(anyhow!("{here}; the coordinator at {url} has no checkpoint recorded for {job}")),
        Err(why) => Err(anyhow!(
            "{here}; {why}. Pass --store (or SMELT_STORE) with the directory its workers wrote to: a worker's --out-dir \
             (.smelt/worker unless given; smelt up's is .smelt)"
        )),
    }
}

/// The job's last recorded checkpoint URI, None when it has none; Err says why the coordinator
/// could not be asked (unreachable, no such job).
fn recorded_checkpoint(url: &str, job: &str) -> Result<Option<String>, String> {
    let rt = runtime().map_err(|e| e.to_string())?;
    let asked = rt.block_on(async {
        tokio::time::timeout(ASK_TIMEOUT, async {
            let mut client = connect(url).await.map_err(|e| format!("{e:#}"))?;
            client.get_job(GetJobRequest { job_id: job.to_string() }).await.map(|r| r.into_inner()).map_err(|s| match s.code() {
                tonic::Code::NotFound => format!("the coordinator at {url} knows no job {job}"),
                _ => format!("the coordinator at {url} did not say where {job}'s checkpoints are ({})", s.message()),
            })
        })
        .await
        .unwrap_or_else(|_| Err(format!("the coordinator at {url} did not answer within {} s", ASK_TIMEOUT.as_secs())))
    })?;
    Ok(Some(asked.last_checkpoint_uri).filter(|u| !u.is_empty()))
}
