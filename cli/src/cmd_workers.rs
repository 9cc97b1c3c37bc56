//! `smelt workers`: the workers the coordinator knows.

use anyhow::Result;
use clap::Args;
use smelt_proto::v1::{ListWorkersRequest, WorkerState};

use crate::client::{
    age, connect, device_name, exit_on_error, runtime, status, table, worker_json, worker_state_name, CoordinatorUrl,
};

#[derive(Args, Debug)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorUrl,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also the workers lost more than an hour ago (the coordinator keeps every worker it has
    /// known, since jobs' histories name them).
    #[arg(long)]
    pub all: bool,
}

/// A worker lost longer ago than this is left out of the list unless `--all`.
const LOST_SHOWN_FOR_MS: i64 = 3600 * 1000;

pub fn run(a: WorkersArgs) -> Result<()> {
    exit_on_error(runtime().and_then(|rt| rt.block_on(run_async(a))))
}

async fn run_async(a: WorkersArgs) -> Result<()> {
    let mut client = connect(&a.coordinator.url).await?;
    let mut workers = client.list_workers(ListWorkersRequest {}).await.map_err(status)?.into_inner().workers;
    let known = workers.len();
    if !a.all {
        let now = crate::client::now_ms();
        workers.retain(|w| w.state != WorkerState::Lost as i32 || now - w.last_seen_ms <= LOST_SHOWN_FOR_MS);
    }
    let hidden = known - workers.len();
    let hidden_note = || {
        if hidden > 0 {
            println!("({hidden} worker{} lost more than an hour ago not shown; --all lists them)", if hidden == 1 { "" } else { "s" });
        }
    };
    if a.json {
        let v: Vec<_> = workers.iter().map(worker_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if workers.is_empty() {
        println!("no workers");
        hidden_note();
        return Ok(());
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.hostname.clone(),
                format!("{}:{}", device_name(w.device_class), w.device_index),
                // a busy worker shutting down finishes its run's step first
                match WorkerState::try_from(w.state) {
                    Ok(WorkerState::Busy) if w.draining => "busy (draining)".to_string(),
                    // it was shut down (SIGTERM) and went: not a failure
                    Ok(WorkerState::Lost) if w.draining => "exited (drained)".to_string(),
                    _ => worker_state_name(w.state).to_string(),
                },
                if w.job_id.is_empty() { "-".into() } else { w.job_id.clone() },
                if w.data_addr.is_empty() { "-".into() } else { w.data_addr.clone() },
                if w.last_seen_ms > 0 { format!("{} ago", age(w.last_seen_ms)) } else { "-".into() },
            ]
        })
        .collect();
    println!("{}", table(&["ID", "HOST", "DEVICE", "STATE", "JOB", "DATA ADDR", "LAST SEEN"], &rows));
    hidden_note();
    Ok(())
}
