//! Job operations behind the jobs service: submit, cancel, list, watch, checkpoints.

use smelt_jobspec::{Device, JobKind, JobSpec};
use smelt_proto::v1::{CheckpointReport, DeviceClass, Job, JobEvent, JobState, WorkerInfo};
use tokio::sync::broadcast;
use tracing::info;

use crate::error::{CoordError, Result};
use crate::state::{is_terminal, is_waiting, job_state_name, now_ms, JobRec, State};
use crate::store::{CheckpointRow, JobRow, Op};

/// The step a checkpoint URI names, by the layout `.../ckpt/<step>/`: its last numeric segment.
pub fn step_of_uri(uri: &str) -> Option<u64> {
    uri.trim_end_matches('/').rsplit('/').next()?.parse().ok()
}

pub(crate) fn looks_like_job_id(s: &str) -> bool {
    s.strip_prefix("job-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl State {
    /// A parent job (`init_from = "job-…"`) must have finished: its workers would start from
    /// whatever checkpoint it had reached (step 126 of 400, silently), and the job about to be
    /// made (`this`) cannot be its own. A job id this coordinator does not know is left to the
    /// workers: its weights may have been put under their directories by hand.
    fn check_parent(&self, spec: &JobSpec, this: &str) -> Result<()> {
        let (field, init) = match (&spec.model.init_from, &spec.finetune) {
            (Some(m), _) => ("model.init_from", m.trim()),
            (None, Some(f)) => ("finetune.init_from", f.init_from.trim()),
            (None, None) => return Ok(()),
        };
        if init == this {
            return Err(CoordError::InvalidArgument(format!(
                "{field}: {init} is the id this job would get (no job {init} exists yet): name a finished job, a model file or a checkpoint"
            )));
        }
        let Some(parent) = self.jobs.get(init).filter(|_| looks_like_job_id(init)) else { return Ok(()) };
        let state = parent.row.state;
        if !is_terminal(state) {
            return Err(CoordError::FailedPrecondition(format!(
                "{field}: job {init} is {} (step {} of {}): a job starts from its parent's final weights; submit this once {init} has finished, \
                 or name one of its checkpoints (`smelt checkpoints {init}`) to start from that one now",
                job_state_name(state),
                parent.row.last_step,
                parent.row.total_steps
            )));
        }
        Ok(())
    }

    pub fn submit(&mut self, spec_toml: String, resume_from: String) -> Result<Job> {
        let spec = JobSpec::parse(&spec_toml)?;
        match spec.kind {
            // A fine-tuning job's init_from is resolved and read by its workers.
            JobKind::Pretrain | JobKind::Finetune => {}
        }
        let device_class = match spec.cluster.device {
            Device::Cpu => DeviceClass::Cpu,
            Device::Cuda => DeviceClass::Cuda,
        };
        // A job id resumes from that job's latest checkpoint; anything else is a checkpoint URI.
        let resume_from = resume_from.trim().to_string();
        // another job's id: this job follows that job's newest checkpoint until placed
        let resume_of = self.jobs.contains_key(&resume_from).then(|| resume_from.clone());
        let (start_step, resume_uri) = if resume_from.is_empty() {
            (0, String::new())
        } else if let Some(src) = self.jobs.get(&resume_from) {
            match &src.latest_checkpoint {
                Some((step, uri)) => (*step, uri.clone()),
                None => {
                    return Err(CoordError::FailedPrecondition(format!(
                        "resume_from: job {resume_from} has no checkpoint to resume from"
                    )))
                }
            }
        } else if looks_like_job_id(&resume_from) {
            return Err(CoordError::NotFound(format!("resume_from: job {resume_from} not found")));
        } else {
            let known = self
                .jobs
                .values()
                .filter_map(|j| j.latest_checkpoint.as_ref())
                .find(|(_, u)| *u == resume_from)
                .map(|(s, _)| *s);
            (known.or_else(|| step_of_uri(&resume_from)).unwrap_or(0), resume_from)
        };
        // a checkpoint past the run's end would be "resumed" to no step and its weights stamped
        // with an earlier step than they hold
        if start_step > spec.train.steps {
            return Err(CoordError::InvalidArgument(format!(
                "resume_from: {resume_uri} is at step {start_step}, past this spec's train.steps = {}: raise train.steps to train on from it",
                spec.train.steps
            )));
        }
        self.check_parent(&spec, &format!("job-{:06}", self.next_job))?;
        let seq = self.next_job;
        self.next_job += 1;
        let id = format!("job-{seq:06}");
        let now = now_ms();
        let row = JobRow {
            id: id.clone(),
            name: spec.name.clone(),
            spec_toml,
            state: JobState::Unspecified,
            priority: spec.priority,
            world_size: spec.cluster.world_size,
            device_class,
            attempt: 1,
            restarts: 0,
            max_restarts: spec.max_restarts,
            total_steps: spec.train.steps,
            last_step: start_step,
            last_loss: 0.0,
            last_val_loss: None,
            last_val_accuracy: None,
            last_val_sources: Vec::new(),
            error: String::new(),
            created_at_ms: now,
            updated_at_ms: now,
            start_step,
            resume_from: resume_uri.clone(),
            backfilled: false,
            final_models: String::new(),
        };
        let mut rec = JobRec::new(row, seq);
        rec.resume_of = resume_of;
        self.jobs.insert(id.clone(), rec);
        info!(
            job_id = %id,
            name = %spec.name,
            world_size = spec.cluster.world_size,
            priority = spec.priority,
            resume_from = %resume_uri,
            "job submitted"
        );
        let reason = if resume_uri.is_empty() {
            "submitted".to_string()
        } else {
            format!("submitted, resuming from {resume_uri} at step {start_step}")
        };
        self.transition(&id, JobState::Queued, reason)?;
        self.schedule();
        Ok(self.job_proto(self.job(&id)?))
    }

    /// Whether `id` has ended and no connected worker still holds, runs or winds down one of its
    /// ranks, by the coordinator's books or by its own last status (its ranks' lines are all
    /// in: each sends its last before its Done, and its status says idle after that).
    pub fn logs_settled(&self, id: &str) -> Result<bool> {
        let job = self.job(id)?;
        let now = std::time::Instant::now();
        let ranks_out = self.workers.values().any(|w| w.conn.is_some() && (w.row.job_id == id || w.reported_job == id));
        Ok(is_terminal(job.row.state) && !job.winding_down_at(now) && !ranks_out)
    }

    pub fn get_job(&self, id: &str) -> Result<Job> {
        Ok(self.job_proto(self.job(id)?))
    }

    /// Every job, oldest first.
    pub fn list_jobs(&self) -> Vec<Job> {
        let mut jobs: Vec<&JobRec> = self.jobs.values().collect();
        jobs.sort_by_key(|j| (j.row.created_at_ms, j.seq));
        self.jobs_proto(jobs)
    }

    pub fn list_workers(&self) -> Vec<WorkerInfo> {
        self.workers.values().map(|w| w.to_proto()).collect()
    }

    pub fn cancel(&mut self, id: &str) -> Result<Job> {
        let state = self.job(id)?.row.state;
        if is_terminal(state) {
            return Err(CoordError::FailedPrecondition(format!(
                "job {id} has already ended ({}); only queued, scheduled, running or restarting jobs can be cancelled",
                job_state_name(state)
            )));
        }
        self.cancel_job(id, "cancelled by request");
        self.get_job(id)
    }

    /// The job's stored events, and a receiver of what comes next (none once it has finished).
    pub fn watch(&self, id: &str) -> Result<(Vec<JobEvent>, Option<broadcast::Receiver<JobEvent>>)> {
        let job = self.job(id)?;
        let live = (!is_terminal(job.row.state)).then(|| job.watch.subscribe());
        Ok((job.events.clone(), live))
    }

    pub fn report_checkpoint(&mut self, r: CheckpointReport) -> Result<()> {
        if r.uri.trim().is_empty() {
            return Err(CoordError::InvalidArgument("uri: must name the checkpoint".into()));
        }
        let job = self.job_mut(&r.job_id)?;
        // an earlier attempt's checkpoint (a rescue checkpoint written as it ended) is as good
        // a place to resume as any: committed and verified like the others
        if r.attempt > job.row.attempt {
            return Err(CoordError::FailedPrecondition(format!(
                "attempt {} of job {} has not started (current attempt is {})",
                r.attempt, r.job_id, job.row.attempt
            )));
        }
        if job.latest_checkpoint.as_ref().is_none_or(|(s, _)| r.step >= *s) {
            job.latest_checkpoint = Some((r.step, r.uri.clone()));
        }
        // A restart still waiting for workers resumes from the newest checkpoint when placed
        // (`place`): a rescue checkpoint of the failed attempt that lands meanwhile is where it
        // will start, so that is what the job shows (not the older one it would have rolled
        // back to)
        let newer = r.step > job.row.start_step;
        if newer && job.row.attempt > 1 && is_waiting(job.row.state) {
            job.row.start_step = r.step;
            job.row.resume_from = r.uri.clone();
            job.row.last_step = r.step;
            self.persist_job(&r.job_id);
        }
        self.store.write(Op::Checkpoint(CheckpointRow {
            job_id: r.job_id.clone(),
            step: r.step,
            uri: r.uri.clone(),
            manifest_sha256: r.manifest_sha256.clone(),
            at_ms: now_ms(),
        }));
        self.message(&r.job_id, format!("checkpoint at step {}: {}", r.step, r.uri));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_steps() {
        assert_eq!(step_of_uri("file:///x/jobs/job-000001/ckpt/400/"), Some(400));
        assert_eq!(step_of_uri("s3://b/jobs/j/ckpt/12"), Some(12));
        assert_eq!(step_of_uri("memory://whatever"), None);
        assert!(looks_like_job_id("job-000123"));
        assert!(!looks_like_job_id("job-"));
        assert!(!looks_like_job_id("file:///job-1"));
    }
}
