//! `smelt jobs list | get <id> | follow <id> | cancel <id> | logs <id>` (logs: `cmd_job_logs`).

use anyhow::Result;
use clap::{Args, Subcommand};
use smelt_proto::v1::{CancelJobRequest, GetJobRequest, Job, ListJobsRequest};

use crate::client::{
    age, connect, exit_on_error, job_json, job_state, reported_loss, resumed_at, runtime, state_name, status, table,
    CoordinatorUrl,
};

/// `smelt jobs [COMMAND]`: without a command, `list`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct JobsCli {
    #[command(subcommand)]
    pub command: Option<JobsCommand>,
    #[command(flatten)]
    pub list: JobsArgs,
}

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Every job, oldest first.
    #[command(visible_alias = "ls")]
    List(JobsArgs),
    /// One job in detail.
    #[command(visible_alias = "show")]
    Get(JobIdArgs),
    /// Follow a job to its end (as `smelt submit --follow`): exits 0 once it succeeded, 3 when
    /// it failed, 4 when it was cancelled (the reason on stderr), 5 when the coordinator cannot
    /// be reached or stays lost; 1 for other errors. `--json`: one JSON object per event on
    /// stdout (kind state, message, waiting, metrics; last "end" with the job).
    Follow(JobIdArgs),
    /// Cancel a job (its workers are aborted).
    Cancel(JobIdArgs),
    /// The lines the job's workers logged (every rank and attempt; `--follow` until it ends).
    Logs(crate::cmd_job_logs::LogsArgs),
    /// The job's step metrics (loss, validation loss, learning rate, ...) from the coordinator's
    /// database file: no coordinator needs to run (a finished `smelt up` cluster's too).
    Metrics(crate::cmd_job_metrics::MetricsArgs),
}

#[derive(Args, Debug)]
pub struct JobsArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorUrl,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct JobIdArgs {
    pub id: String,
    #[command(flatten)]
    pub coordinator: CoordinatorUrl,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: JobsCli) -> Result<()> {
    let c = c.command.unwrap_or(JobsCommand::List(c.list));
    if let JobsCommand::Metrics(a) = c {
        return crate::cmd_job_metrics::run(a);
    }
    exit_on_error(runtime().and_then(|rt| rt.block_on(run_async(c))))
}

async fn run_async(c: JobsCommand) -> Result<()> {
    match c {
        JobsCommand::List(a) => {
            let mut client = connect(&a.coordinator.url).await?;
            let jobs = client.list_jobs(ListJobsRequest {}).await.map_err(status)?.into_inner().jobs;
            if a.json {
                let v: Vec<_> = jobs.iter().map(job_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if jobs.is_empty() {
                println!("no jobs");
            } else {
                println!("{}", jobs_table(&jobs));
            }
        }
        JobsCommand::Get(a) => {
            let mut client = connect(&a.coordinator.url).await?;
            let job = client.get_job(GetJobRequest { job_id: a.id }).await.map_err(status)?.into_inner();
            print_job(&job, a.json)?;
        }
        JobsCommand::Follow(a) => {
            let mut client = connect(&a.coordinator.url).await?;
            let job = client.get_job(GetJobRequest { job_id: a.id }).await.map_err(status)?.into_inner();
            crate::cmd_submit::follow(&mut client, &job, a.json).await?;
        }
        JobsCommand::Logs(a) => crate::cmd_job_logs::run(a).await?,
        JobsCommand::Metrics(_) => unreachable!("read from the file, without a runtime, above"),
        JobsCommand::Cancel(a) => {
            let mut client = connect(&a.coordinator.url).await?;
            let job = client.cancel_job(CancelJobRequest { job_id: a.id }).await.map_err(status)?.into_inner();
            if a.json {
                print_job(&job, true)?;
            } else {
                println!("{} {}", job.id, state_name(job_state(&job)));
            }
        }
    }
    Ok(())
}

pub fn jobs_table(jobs: &[Job]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.name.clone(),
                state_name(job_state(j)).to_string(),
                j.priority.to_string(),
                format!("{} x {}", j.world_size, crate::client::device_name(j.device_class)),
                j.attempt.to_string(),
                format!("{}/{}", j.last_step, j.total_steps),
                reported_loss(j).map_or("-".into(), |l| format!("{l:.4}")),
                age(j.created_at_ms),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATE", "PRIO", "WORKERS", "ATTEMPT", "STEP", "LOSS", "AGE"], &rows)
}

/// `12/100`; a resumed attempt with no step yet says that its progress is the checkpoint's (one
/// still waiting for workers, that it will resume from it).
fn step_line(j: &Job) -> String {
    let resumed = resumed_at(j);
    use smelt_proto::v1::JobState;
    let waiting = matches!(job_state(j), JobState::Queued | JobState::Restarting);
    // ended before its attempt trained (a checkpoint gone, cancelled while it waited): it
    // never resumed
    let ended = matches!(job_state(j), JobState::Failed | JobState::Cancelled);
    let note = if reported_loss(j).is_none() && resumed > 0 && j.last_step == resumed {
        if waiting {
            format!(" (resumes from the checkpoint at step {resumed} once placed)")
        } else if ended {
            format!(" (was to resume from the checkpoint at step {resumed}; ended before a step trained)")
        } else {
            format!(" (resumed from the checkpoint at step {resumed}; no step trained since)")
        }
    } else {
        String::new()
    };
    format!("{}/{}{note}", j.last_step, j.total_steps)
}

fn print_job(j: &Job, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&job_json(j))?);
        return Ok(());
    }
    let mut lines = vec![
        ("id", j.id.clone()),
        ("name", j.name.clone()),
        ("state", state_name(job_state(j)).to_string()),
        ("priority", j.priority.to_string()),
        ("workers", format!("{} x {}", j.world_size, crate::client::device_name(j.device_class))),
        ("attempt", format!("{} (restarts {}/{})", j.attempt, j.restarts, j.max_restarts)),
        ("step", step_line(j)),
    ];
    // where its weights come from: the model it started from, the checkpoint this attempt
    // resumed from, the newest checkpoint recorded
    // (read, not validated: a spec stored before a newer rule still names its parent)
    let spec = toml::from_str::<smelt_jobspec::JobSpec>(&j.spec_toml).ok();
    if let Some(parent) = spec.as_ref().and_then(|s| s.model.init_from.clone().or_else(|| s.finetune.as_ref().map(|f| f.init_from.clone()))) {
        lines.push(("parent", parent));
    }
    // (one still waiting for workers has not resumed yet: its step line says from where it will)
    let waiting = matches!(job_state(j), smelt_proto::v1::JobState::Queued | smelt_proto::v1::JobState::Restarting);
    if !j.resume_from.is_empty() && !waiting {
        lines.push(("resumed", j.resume_from.clone()));
    }
    if !j.last_checkpoint_uri.is_empty() {
        lines.push(("last ckpt", format!("step {}: {}", j.last_checkpoint_step, j.last_checkpoint_uri)));
    }
    if let Some(l) = reported_loss(j) {
        lines.push(("loss", format!("{l:.4}")));
    }
    if let Some(v) = j.last_val_loss {
        lines.push(("val loss", format!("{v:.4}{}", crate::source_losses::bracketed(&j.last_val_sources))));
    }
    if let Some(a) = j.last_val_accuracy {
        lines.push(("val acc", format!("{a:.4}")));
    }
    if !j.worker_ids.is_empty() {
        let backfilled = if j.backfilled { " (backfilled: gives way to the jobs ahead of it)" } else { "" };
        lines.push(("ranks", format!("{}{backfilled}", j.worker_ids.join(", "))));
    }
    if !j.waiting_for.is_empty() {
        lines.push(("waits for", j.waiting_for.clone()));
    }
    if !j.error.is_empty() {
        lines.push(("error", j.error.clone()));
    }
    if !j.model_uri.is_empty() {
        lines.push(("model", j.model_uri.clone()));
    }
    lines.push(("created", format!("{} ago", age(j.created_at_ms))));
    lines.push(("updated", format!("{} ago", age(j.updated_at_ms))));
    for (k, v) in lines {
        println!("{k:<9} {v}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::step_line;
    use smelt_proto::v1::{Job, JobState};

    #[test]
    fn a_job_waiting_to_resume_says_it_will_and_a_resumed_one_that_it_did() {
        let mut j = Job { last_step: 37, total_steps: 100, resume_from: "file:///s/jobs/job-000001/ckpt/00000037".into(), ..Default::default() };
        j.state = JobState::Restarting as i32;
        assert_eq!(step_line(&j), "37/100 (resumes from the checkpoint at step 37 once placed)");
        j.state = JobState::Running as i32;
        assert_eq!(step_line(&j), "37/100 (resumed from the checkpoint at step 37; no step trained since)");
        for ended in [JobState::Failed, JobState::Cancelled] {
            j.state = ended as i32;
            assert_eq!(step_line(&j), "37/100 (was to resume from the checkpoint at step 37; ended before a step trained)");
        }
        j.last_step = 40;
        assert_eq!(step_line(&j), "40/100");
    }
}
