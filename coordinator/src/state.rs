//! The in-memory mirror of the store: jobs, workers, live connections and watchers, and the job
//! state machine. Everything here runs under the coordinator's one lock, never across an await;
//! each change is written through to the store's queue (in order) as it is made.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use smelt_proto::v1::{
    coordinator_message, job_event, CoordinatorMessage, DeviceClass, Job, JobEvent, JobState, StateChange, StepMetrics, WorkerInfo,
    WorkerState,
};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;
use tracing::{info, warn};

use crate::error::{CoordError, Result};
use crate::rendezvous::Rendezvous;
use crate::store::{AssignmentRow, EventRow, JobRow, Op, StoreHandle, WorkerRow};

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

// ----- names (the store's text form and the CLI's) ---------------------------------------------

pub fn job_state_name(s: JobState) -> &'static str {
    match s {
        JobState::Unspecified => "unspecified",
        JobState::Queued => "queued",
        JobState::Scheduled => "scheduled",
        JobState::Running => "running",
        JobState::Restarting => "restarting",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

pub fn parse_job_state(s: &str) -> Option<JobState> {
    JobState::from_str_name(&format!("JOB_STATE_{}", s.to_ascii_uppercase()))
}

pub fn worker_state_name(s: WorkerState) -> &'static str {
    match s {
        WorkerState::Unspecified => "unspecified",
        WorkerState::Idle => "idle",
        WorkerState::Busy => "busy",
        WorkerState::Draining => "draining",
        WorkerState::Lost => "lost",
    }
}

pub fn parse_worker_state(s: &str) -> Option<WorkerState> {
    WorkerState::from_str_name(&format!("WORKER_STATE_{}", s.to_ascii_uppercase()))
}

pub fn device_class_name(d: DeviceClass) -> &'static str {
    match d {
        DeviceClass::Unspecified => "unspecified",
        DeviceClass::Cpu => "cpu",
        DeviceClass::Cuda => "cuda",
    }
}

pub fn parse_device_class(s: &str) -> Option<DeviceClass> {
    DeviceClass::from_str_name(&format!("DEVICE_CLASS_{}", s.to_ascii_uppercase()))
}

// ----- the job state machine -------------------------------------------------------------------

pub fn is_terminal(s: JobState) -> bool {
    matches!(s, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
}

/// A job holding workers: its current attempt is placed.
pub fn is_placed(s: JobState) -> bool {
    matches!(s, JobState::Scheduled | JobState::Running)
}

/// A job waiting for a gang.
pub fn is_waiting(s: JobState) -> bool {
    matches!(s, JobState::Queued | JobState::Restarting)
}

/// The legal transitions:
///
/// ```text
/// queued ──> scheduled ──> running ──> succeeded
///    ^           │  │         │  └───> failed / cancelled
///    │           │  └─────────┼──────> failed / cancelled
/// restarting <───┴────────────┘        (an attempt lost a worker or a rank failed)
/// queued, restarting ──> cancelled;   restarting ──> scheduled
/// ```
pub fn check_transition(from: JobState, to: JobState) -> Result<()> {
    use JobState::*;
    let ok = match (from, to) {
        (Unspecified, Queued) => true,
        (Queued, Scheduled) | (Queued, Cancelled) => true,
        (Scheduled, Running) | (Scheduled, Restarting) | (Scheduled, Failed) | (Scheduled, Cancelled) => true,
        (Scheduled, Succeeded) => true, // every rank finished before the running signal arrived
        (Running, Succeeded) | (Running, Failed) | (Running, Cancelled) | (Running, Restarting) => true,
        (Restarting, Scheduled) | (Restarting, Cancelled) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CoordError::Internal(format!(
            "illegal job state transition {} -> {}",
            job_state_name(from),
            job_state_name(to)
        )))
    }
}

// ----- records ---------------------------------------------------------------------------------

pub struct JobRec {
    /// What the store holds.
    pub row: JobRow,
    /// Creation order, the scheduler's last tie-break.
    pub seq: u64,
    /// Worker id by rank for the current attempt (empty while waiting).
    pub ranks: Vec<String>,
    /// Ranks of the current attempt that said they run it.
    pub started: Vec<bool>,
    /// Ranks of the current attempt that finished it successfully.
    pub done: Vec<bool>,
    /// Stored events (state changes and messages), replayed to new watchers.
    pub events: Vec<JobEvent>,
    /// Live events and metrics for watchers.
    pub watch: broadcast::Sender<JobEvent>,
    /// Latest recorded checkpoint: (step, uri).
    pub latest_checkpoint: Option<(u64, String)>,
    /// Rank 0's newest step report of the current attempt (throughput and MFU for `/metrics`;
    /// not stored: gone after a coordinator restart until the next step).
    pub last_metrics: Option<StepMetrics>,
    /// A failed attempt's surviving ranks, (worker, attempt), until each reports the attempt
    /// done: rank 0 may be writing a rescue checkpoint of its last completed step, which the
    /// next attempt should resume from, so the job is not placed again before they finish or
    /// `wind_down_until` passes (not stored: a restarted coordinator does not wait).
    pub winding_down: Vec<(String, u32)>,
    pub wind_down_until: Option<Instant>,
    /// It checkpoints and its spec allows preemption (`[cluster] preemptible`, true by
    /// default): it may give its workers to another job (preemption.rs) and may be backfilled
    /// (backfill.rs). Read from the spec once.
    pub yields: bool,
    /// The last failed attempt, the error its rank reported and the step the job had reached
    /// then: an attempt that fails with the same error and gets no further repeats it, and is
    /// not restarted again (not stored: a restarted coordinator restarts once more).
    pub last_failure: Option<FailedAttempt>,
    /// Submitted to resume from another job's latest checkpoint (`--resume-from job-N`): that
    /// job. Until its first placement this job waits while a worker still runs that job (a
    /// cancelled job's rank 0 saving its rescue checkpoint, whose retention may prune the one
    /// recorded at submission), and it starts from that job's newest checkpoint then (not
    /// stored: a restarted coordinator keeps the one recorded).
    pub resume_of: Option<String>,
    /// After a transient failure (a store outage): the next attempt is not placed before this,
    /// the transient failures in a row with no step gained, which double the wait, and the step
    /// the last of them reached (not stored: a restarted coordinator places at once).
    pub retry_after: Option<Instant>,
    pub transient_failures: u32,
    pub transient_reached: u64,
    /// When the first of those transient failures came (the outage's start, as the job saw
    /// it): restarts are free for `State::outage_grace` from then.
    pub transient_since: Option<Instant>,
    /// Some attempt of this job reported a step (not stored: after a restart, a recorded
    /// checkpoint or step says it): only such a job's store failures get the outage grace.
    pub progressed: bool,
}

/// An attempt that failed with an error its rank reported (see `JobRec::last_failure`).
#[derive(Clone, Debug, PartialEq)]
pub struct FailedAttempt {
    pub attempt: u32,
    pub error: String,
    /// The job's step when it failed.
    pub reached: u64,
}

/// A waiting job's place in its class's queue, smallest first: priority (higher first), then
/// age (older first), then submission order.
pub type QueueKey = (std::cmp::Reverse<i32>, i64, u64);

impl JobRec {
    pub fn queue_key(&self) -> QueueKey {
        (std::cmp::Reverse(self.row.priority), self.row.created_at_ms, self.seq)
    }

    /// Whether a failed attempt's ranks are still finishing (the job waits for them).
    pub fn winding_down_at(&self, now: Instant) -> bool {
        !self.winding_down.is_empty() && self.wind_down_until.is_some_and(|t| now < t)
    }

    /// Whether the job waits out a transient failure's back-off at `now`.
    pub fn backing_off_at(&self, now: Instant) -> bool {
        self.retry_after.is_some_and(|t| now < t)
    }
}

impl JobRec {
    pub fn new(row: JobRow, seq: u64) -> Self {
        let yields = smelt_jobspec::JobSpec::parse(&row.spec_toml).is_ok_and(|s| s.checkpoint.every > 0 && s.cluster.preemptible);
        JobRec {
            yields,
            row,
            seq,
            ranks: Vec::new(),
            started: Vec::new(),
            done: Vec::new(),
            events: Vec::new(),
            watch: broadcast::channel(1024).0,
            latest_checkpoint: None,
            last_metrics: None,
            winding_down: Vec::new(),
            wind_down_until: None,
            retry_after: None,
            transient_failures: 0,
            transient_reached: 0,
            transient_since: None,
            progressed: false,
            last_failure: None,
            resume_of: None,
        }
    }

    pub fn to_proto(&self) -> Job {
        let r = &self.row;
        Job {
            id: r.id.clone(),
            name: r.name.clone(),
            state: r.state as i32,
            priority: r.priority,
            world_size: r.world_size,
            device_class: r.device_class as i32,
            spec_toml: r.spec_toml.clone(),
            attempt: r.attempt,
            restarts: r.restarts,
            max_restarts: r.max_restarts,
            total_steps: r.total_steps,
            last_step: r.last_step,
            last_loss: r.last_loss,
            last_val_loss: r.last_val_loss,
            last_val_accuracy: r.last_val_accuracy,
            last_val_sources: r.last_val_sources.iter().map(|s| s.to_proto()).collect(),
            error: r.error.clone(),
            worker_ids: self.ranks.clone(),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            last_checkpoint_step: self.latest_checkpoint.as_ref().map_or(0, |c| c.0),
            last_checkpoint_uri: self.latest_checkpoint.as_ref().map(|c| c.1.clone()).unwrap_or_default(),
            resume_from: r.resume_from.clone(),
            backfilled: r.backfilled && is_placed(r.state),
            // needs the scheduler's view: State::job_proto fills it
            waiting_for: String::new(),
            model_uri: if r.final_models.is_empty() { String::new() } else { format!("{}/jobs/{}/model.safetensors", r.final_models.trim_end_matches('/'), r.id) },
        }
    }
}

pub type Outbox = mpsc::UnboundedSender<std::result::Result<CoordinatorMessage, Status>>;

/// A worker's open heartbeat stream: `gen` tells a stale stream's messages from the live one's.
pub struct Conn {
    pub gen: u64,
    pub tx: Outbox,
}

pub struct WorkerRec {
    pub row: WorkerRow,
    pub last_seen: Instant,
    pub conn: Option<Conn>,
    /// Messages to deliver when the next heartbeat stream opens (an abort of a stale assignment).
    pub pending: Vec<CoordinatorMessage>,
    /// The worker said it is draining: it takes no new assignment.
    pub draining: bool,
    /// Set when the worker re-registered without the assignment the coordinator has it on: the
    /// count of its status messages since that do not claim the assignment. Its report of the
    /// attempt (a Done it could not deliver earlier) may still follow; a second such status
    /// fails the attempt.
    pub orphan_statuses: Option<u32>,
    /// The job its last status said it runs, held or not (a rank aborted with its job still
    /// ends it, and sends its last log lines): what `logs_settled` waits for.
    pub reported_job: String,
    /// The highest `LogBatch.seq` of this worker received (its lines queued to the store): a
    /// batch numbered up to it is one sent again, and is not stored twice.
    pub logs_received: u64,
    /// The highest one the store has committed (kept there with the lines,
    /// `job_logs::log_streams`): what `LogsAck` says. A failed store write brings
    /// `logs_received` back to it, so the batches sent again are taken.
    pub logs_committed: u64,
}

impl WorkerRec {
    pub fn new(row: WorkerRow, last_seen: Instant) -> Self {
        let drained = row.drained;
        WorkerRec {
            row,
            last_seen,
            conn: None,
            pending: Vec::new(),
            // a worker that drained and went before a restart still reads as exited
            draining: drained,
            orphan_statuses: None,
            reported_job: String::new(),
            logs_received: 0,
            logs_committed: 0,
        }
    }
}

impl WorkerRec {
    pub fn to_proto(&self) -> WorkerInfo {
        let r = &self.row;
        WorkerInfo {
            id: r.id.clone(),
            hostname: r.hostname.clone(),
            device_class: r.device_class as i32,
            device_index: r.device_index,
            state: r.state as i32,
            job_id: r.job_id.clone(),
            last_seen_ms: r.last_seen_ms,
            data_addr: r.data_addr.clone(),
            draining: self.draining,
        }
    }

    /// Can take an assignment now: idle with a stream to send it down.
    pub fn schedulable(&self) -> bool {
        self.row.state == WorkerState::Idle && self.conn.is_some() && !self.draining
    }
}

pub struct State {
    pub store: StoreHandle,
    pub jobs: HashMap<String, JobRec>,
    pub workers: BTreeMap<String, WorkerRec>,
    pub rendezvous: HashMap<(String, u32), Rendezvous>,
    pub next_job: u64,
    pub next_worker: u64,
    pub next_gen: u64,
    pub heartbeat_interval: Duration,
    pub lease_timeout: Duration,
    /// See `CoordinatorConfig::outage_grace`.
    pub outage_grace: Duration,
    /// ` --coordinator URL` for the `smelt worker` command a waiting job's hint suggests, when
    /// this coordinator is not the default one (empty: it is).
    pub worker_flag: String,
    /// Set once shutdown starts: streams closing then are the coordinator's doing, not the
    /// workers', and change nothing (the workers re-attach to the next coordinator).
    pub shutting_down: bool,
    /// No preemption before this: a restored coordinator's workers come back one by one, and
    /// until their leases would have run out, one not yet back is not a worker missing.
    pub preempt_after: std::time::Instant,
}

impl State {
    pub fn job(&self, id: &str) -> Result<&JobRec> {
        self.jobs.get(id).ok_or_else(|| CoordError::job_not_found(id))
    }

    pub fn job_mut(&mut self, id: &str) -> Result<&mut JobRec> {
        self.jobs.get_mut(id).ok_or_else(|| CoordError::job_not_found(id))
    }

    pub fn persist_job(&self, id: &str) {
        if let Some(j) = self.jobs.get(id) {
            self.store.write(Op::Job(j.row.clone()));
        }
    }

    pub fn persist_worker(&self, id: &str) {
        if let Some(w) = self.workers.get(id) {
            self.store.write(Op::Worker(w.row.clone()));
        }
    }

    pub fn persist_assignment(&self, job_id: &str, attempt: u32, rank: u32, worker_id: &str, state: &str) {
        self.store.write(Op::Assignment(AssignmentRow {
            job_id: job_id.to_string(),
            attempt,
            rank,
            worker_id: worker_id.to_string(),
            state: state.to_string(),
        }));
    }

    /// Records and fans out an event of a job (state changes and messages; metrics go elsewhere).
    pub fn push_event(&mut self, job_id: &str, body: job_event::Body) {
        let ev = JobEvent { job_id: job_id.to_string(), at_ms: now_ms(), body: Some(body) };
        if let Some(row) = EventRow::from_event(&ev) {
            self.store.write(Op::Event(row));
        }
        if let Some(j) = self.jobs.get_mut(job_id) {
            j.events.push(ev.clone());
            let _ = j.watch.send(ev);
        }
    }

    pub fn message(&mut self, job_id: &str, text: String) {
        info!(job_id = %job_id, message = %text, "job event");
        self.push_event(job_id, job_event::Body::Message(text));
    }

    /// Moves a job to `to` if the state machine allows it, persists it and records the event.
    pub fn transition(&mut self, job_id: &str, to: JobState, reason: impl Into<String>) -> Result<()> {
        let reason = reason.into();
        let job = self.job_mut(job_id)?;
        let from = job.row.state;
        check_transition(from, to)?;
        job.row.state = to;
        job.row.updated_at_ms = now_ms();
        info!(
            job_id = %job_id,
            from = job_state_name(from),
            to = job_state_name(to),
            attempt = job.row.attempt,
            reason = %reason,
            "job state changed"
        );
        self.persist_job(job_id);
        self.push_event(job_id, job_event::Body::State(StateChange { from: from as i32, to: to as i32, reason }));
        Ok(())
    }

    /// Like `transition`, for callers whose checks already make the move legal: a refusal is a
    /// bug, logged rather than propagated into a worker's message handling.
    pub fn transition_or_log(&mut self, job_id: &str, to: JobState, reason: impl Into<String>) {
        if let Err(e) = self.transition(job_id, to, reason) {
            warn!(job_id = %job_id, error = %e, "job state change refused");
        }
    }

    /// Sends a message down a worker's stream (dropped if it has none: it re-registers and
    /// reconciles then).
    pub fn send_to_worker(&self, worker_id: &str, msg: coordinator_message::Body) -> bool {
        match self.workers.get(worker_id).and_then(|w| w.conn.as_ref()) {
            Some(c) => c.tx.send(Ok(CoordinatorMessage { body: Some(msg) })).is_ok(),
            None => false,
        }
    }

    /// Frees a worker of its assignment (it stays connected and becomes schedulable).
    pub fn release_worker(&mut self, worker_id: &str, to: WorkerState) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.row.state = if to == WorkerState::Idle && w.draining { WorkerState::Draining } else { to };
            w.orphan_statuses = None;
            w.row.job_id.clear();
            w.row.attempt = 0;
            w.row.rank = 0;
            w.row.drained = to == WorkerState::Lost && w.draining;
            if to == WorkerState::Lost {
                if let Some(c) = w.conn.take() {
                    let _ = c.tx.send(Err(Status::unavailable(format!(
                        "worker {worker_id} was declared lost; register again"
                    ))));
                }
            }
            self.persist_worker(worker_id);
        }
    }

    /// The worker assigned to `rank` of the job's current attempt, when `worker_id` is it.
    pub fn holds_rank(&self, job_id: &str, attempt: u32, worker_id: &str) -> Option<u32> {
        let job = self.jobs.get(job_id)?;
        if job.row.attempt != attempt || !is_placed(job.row.state) {
            return None;
        }
        let w = self.workers.get(worker_id)?;
        if w.row.state != WorkerState::Busy || w.row.job_id != job_id || w.row.attempt != attempt {
            return None;
        }
        (job.ranks.get(w.row.rank as usize).map(String::as_str) == Some(worker_id)).then_some(w.row.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [JobState::Queued, JobState::Restarting, JobState::Cancelled] {
            assert_eq!(parse_job_state(job_state_name(s)), Some(s));
        }
        for s in [WorkerState::Idle, WorkerState::Busy, WorkerState::Lost] {
            assert_eq!(parse_worker_state(worker_state_name(s)), Some(s));
        }
        assert_eq!(parse_device_class("cuda"), Some(DeviceClass::Cuda));
        assert_eq!(parse_device_class("tpu"), None);
    }

    #[test]
    fn transitions() {
        use JobState::*;
        assert!(check_transition(Queued, Scheduled).is_ok());
        assert!(check_transition(Running, Restarting).is_ok());
        assert!(check_transition(Restarting, Scheduled).is_ok());
        assert!(check_transition(Succeeded, Running).is_err());
        assert!(check_transition(Cancelled, Queued).is_err());
        assert!(check_transition(Queued, Running).is_err());
        assert!(check_transition(Failed, Cancelled).is_err());
    }
}
