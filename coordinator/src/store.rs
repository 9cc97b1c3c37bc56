//! All SQLite access. One connection, owned by a dedicated thread: the async side never blocks on
//! SQLite. Writes are queued in order (`StoreHandle::write`, which never blocks) and the thread
//! applies whatever has queued up in one transaction, so a burst of metrics costs one commit.
//! `flush` waits until everything queued before it is committed (used before answering a client
//! whose request must be durable: submit, cancel, register).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use serde_json::{json, Value};
use smelt_proto::v1::{job_event, DeviceClass, JobEvent, JobState, StateChange, WorkerState};
use tokio::sync::oneshot;
use tracing::error;

use crate::error::{CoordError, Result};
use crate::state::{
    job_state_name, parse_device_class, parse_job_state, parse_worker_state,
};

pub use crate::schema::{migrate, SCHEMA_VERSION};

#[derive(Clone, Debug, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub name: String,
    pub spec_toml: String,
    pub state: JobState,
    pub priority: i32,
    pub world_size: u32,
    pub device_class: DeviceClass,
    pub attempt: u32,
    pub restarts: u32,
    pub max_restarts: u32,
    pub total_steps: u64,
    pub last_step: u64,
    pub last_loss: f32,
    pub last_val_loss: Option<f32>,
    /// Classification fine-tuning: the last validation accuracy reported.
    pub last_val_accuracy: Option<f32>,
    /// A data mixture: each source's validation loss at the last evaluation (else empty).
    pub last_val_sources: Vec<SourceLossRow>,
    pub error: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// First step of the current attempt, and the checkpoint it resumes from ("" for none).
    pub start_step: u64,
    pub resume_from: String,
    /// The current attempt was placed out of queue order, behind a head that could not start
    /// (`crate::backfill`): it gives its workers back to any job ahead of it that can then start.
    pub backfilled: bool,
    /// A job that ended ok: the root its rank 0 saved the final weights under (`<root>/jobs/<job>/
    /// model.safetensors`); empty otherwise.
    pub final_models: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRow {
    pub id: String,
    pub hostname: String,
    pub device_class: DeviceClass,
    pub device_index: u32,
    pub data_addr: String,
    pub state: WorkerState,
    /// Current assignment ("" when none).
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
    pub last_seen_ms: i64,
    /// It was draining (shut down with SIGTERM) when it went: exited, not lost.
    pub drained: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AssignmentRow {
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
    pub worker_id: String,
    /// assigned, done, failed, lost, aborted
    pub state: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    pub job_id: String,
    pub at_ms: i64,
    /// `state` or `message`
    pub kind: String,
    pub json: String,
}

/// One step of rank 0 as reported; also what the dashboard's history serves (without the id).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MetricRow {
    #[serde(skip)]
    pub job_id: String,
    pub attempt: u32,
    pub step: u64,
    pub loss: f32,
    pub val_loss: Option<f32>,
    pub val_accuracy: Option<f32>,
    pub grad_norm: f32,
    pub lr: f32,
    pub tokens_per_s: f64,
    /// Model FLOPs utilization (GPU ranks only).
    pub mfu: Option<f32>,
    pub at_ms: i64,
    /// Evaluation steps of a data mixture: each source's validation loss (else empty).
    pub val_sources: Vec<SourceLossRow>,
}

/// One source of a data mixture and its validation loss (a NaN serializes as null).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SourceLossRow {
    /// The source as the job spec names it (its corpus URI).
    pub name: String,
    pub loss: f32,
}

impl SourceLossRow {
    pub fn from_proto(s: &smelt_proto::v1::SourceLoss) -> Self {
        SourceLossRow { name: s.name.clone(), loss: s.loss }
    }

    pub fn to_proto(&self) -> smelt_proto::v1::SourceLoss {
        smelt_proto::v1::SourceLoss { name: self.name.clone(), loss: self.loss }
    }
}

/// The jobs table's `last_val_sources`: a JSON array of `{"name", "loss"}`.
pub(crate) fn sources_to_json(sources: &[SourceLossRow]) -> String {
    serde_json::to_string(sources).unwrap_or_else(|_| "[]".into())
}

/// Reads `sources_to_json`'s text back; a null loss (a NaN written) reads as NaN.
fn sources_from_json(text: &str) -> Vec<SourceLossRow> {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    v.as_array()
        .map(|items| {
            items
                .iter()
                .map(|s| SourceLossRow {
                    name: s["name"].as_str().unwrap_or_default().to_string(),
                    loss: s["loss"].as_f64().map_or(f32::NAN, |l| l as f32),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointRow {
    pub job_id: String,
    pub step: u64,
    pub uri: String,
    pub manifest_sha256: String,
    pub at_ms: i64,
}

impl EventRow {
    pub fn from_event(ev: &JobEvent) -> Option<EventRow> {
        let (kind, v) = match ev.body.as_ref()? {
            job_event::Body::State(s) => (
                "state",
                json!({
                    "from": job_state_name(JobState::try_from(s.from).unwrap_or_default()),
                    "to": job_state_name(JobState::try_from(s.to).unwrap_or_default()),
                    "reason": s.reason,
                }),
            ),
            job_event::Body::Message(m) => ("message", json!({ "message": m })),
            job_event::Body::Metrics(_) => return None,
        };
        Some(EventRow { job_id: ev.job_id.clone(), at_ms: ev.at_ms, kind: kind.into(), json: v.to_string() })
    }

    pub fn to_event(&self) -> Option<JobEvent> {
        let v: Value = serde_json::from_str(&self.json).ok()?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        let body = match self.kind.as_str() {
            "state" => job_event::Body::State(StateChange {
                from: parse_job_state(&s("from")).unwrap_or_default() as i32,
                to: parse_job_state(&s("to")).unwrap_or_default() as i32,
                reason: s("reason"),
            }),
            "message" => job_event::Body::Message(s("message")),
            _ => return None,
        };
        Some(JobEvent { job_id: self.job_id.clone(), at_ms: self.at_ms, body: Some(body) })
    }
}

pub enum Op {
    Job(JobRow),
    Worker(WorkerRow),
    Assignment(AssignmentRow),
    Event(EventRow),
    Metric(MetricRow),
    Checkpoint(CheckpointRow),
    /// One worker's batch of a job's log lines (`seq`: the batch's number, 0 when unnumbered;
    /// `rows` may be empty, for a batch of a job this coordinator does not keep).
    Logs { worker_id: String, seq: u64, rows: Vec<crate::job_logs::LogRow> },
}

pub(crate) enum Cmd {
    Op(Op),
    Flush(oneshot::Sender<std::result::Result<(), String>>),
    /// Apply what came before, then stop the thread.
    Stop,
}

/// Everything the store holds, read once at open.
#[derive(Default, Debug)]
pub struct Loaded {
    pub jobs: Vec<JobRow>,
    pub workers: Vec<WorkerRow>,
    pub assignments: Vec<AssignmentRow>,
    pub events: Vec<EventRow>,
    pub checkpoints: Vec<CheckpointRow>,
    /// Each worker's highest log batch number stored.
    pub logs_received: std::collections::HashMap<String, u64>,
}

/// The write queue; cheap to clone, never blocks.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Cmd>,
    /// Workers a batch of whose log lines failed to be stored since it was last asked
    /// (`take_log_failure`): a flush's result alone cannot say, as the failure may have been in
    /// an earlier transaction, reported to another flush.
    log_failures: Arc<Mutex<HashSet<String>>>,
}

impl StoreHandle {
    pub fn write(&self, op: Op) {
        if self.tx.send(Cmd::Op(op)).is_err() {
            error!("store is closed; a write was dropped");
        }
    }

    /// Whether a batch of `worker_id`'s log lines failed to be stored since the last call.
    pub fn take_log_failure(&self, worker_id: &str) -> bool {
        self.log_failures.lock().unwrap_or_else(|p| p.into_inner()).remove(worker_id)
    }

    /// Waits until every write queued before this call is committed.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Flush(tx)).map_err(|_| CoordError::Unavailable("store is closed".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CoordError::Internal(format!("store: {e}"))),
            Err(_) => Err(CoordError::Unavailable("store is closed".into())),
        }
    }
}

/// The store's thread; `close` drains the queue and joins it.
pub struct Store {
    handle: StoreHandle,
    thread: JoinHandle<()>,
    path: PathBuf,
    /// The database file, held with an exclusive advisory lock (`flock`) for as long as this
    /// store is open, so that a second coordinator on the same file refuses to start: two would
    /// each hand out the same job ids from memory, and one's rows would overwrite the other's.
    /// (SQLite's own locks are per transaction; they do not stop that.)
    _lock: std::fs::File,
}

impl Store {
    /// Opens (creating or migrating) the database and reads it whole. Blocking: call it from
    /// `spawn_blocking`.
    pub fn open(path: &Path) -> anyhow::Result<(Store, Loaded)> {
        let mut conn = open_connection(path)?;
        let lock = lock_database(path)?;
        migrate(&mut conn).map_err(|e| damaged(path, e))?;
        let loaded = load(&conn).map_err(|e| damaged(path, e))?;
        let (tx, rx) = mpsc::channel();
        let log_failures = Arc::new(Mutex::new(HashSet::new()));
        let failures = log_failures.clone();
        let thread = std::thread::Builder::new().name("smelt-store".into()).spawn(move || crate::store_writer::writer_loop(conn, rx, failures))?;
        Ok((Store { handle: StoreHandle { tx, log_failures }, thread, path: path.to_path_buf(), _lock: lock }, loaded))
    }

    pub fn handle(&self) -> StoreHandle {
        self.handle.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies everything queued, then stops the thread. Blocking. Writes sent through other
    /// handles after this are dropped (and logged).
    pub fn close(self) {
        // the lock goes with `self`, after the thread has applied the last writes
        let Store { handle, thread, _lock, .. } = self;
        // Other handles may still be alive (state held by tasks that outlive the server): tell
        // the thread to stop once the queue so far is applied.
        let _ = handle.tx.send(Cmd::Stop);
        let _ = thread.join();
    }
}

/// The database file locked for this coordinator alone (see `Store::_lock`).
fn lock_database(path: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().read(true).open(path).map_err(|e| anyhow::anyhow!("cannot open database {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "--db {} is in use by another coordinator (two on one database would hand out the same job ids); stop that one \
             first, or give this one another --db",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => anyhow::bail!("cannot lock database {}: {e}", path.display()),
    }
}

/// An error reading the database, naming it and what can be done.
fn damaged(path: &Path, e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::anyhow!(
        "--db {}: {:#} (not a smelt coordinator database, or a damaged one: restore it from a backup, or start with another \
         --db; the jobs' checkpoints in the object store stay usable with `smelt submit --resume-from`)",
        path.display(),
        e.into()
    )
}

fn open_connection(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create the database's folder {}: {e}", dir.display()))?;
    }
    let conn = Connection::open(path).map_err(|e| anyhow::anyhow!("cannot open database {}: {e}", path.display()))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(|e| damaged(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!("database {}: journal_mode is {mode}, WAL is required", path.display());
    }
    conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;")?;
    Ok(conn)
}

fn bad(col: usize, what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, format!("unknown {what} {v:?}").into())
}

fn load(conn: &Connection) -> anyhow::Result<Loaded> {
    let mut out = Loaded::default();
    let mut st = conn.prepare(
        "SELECT id, name, spec_toml, state, priority, world_size, device_class, attempt, restarts, max_restarts,
                total_steps, last_step, last_loss, last_val_loss, error, created_at_ms, updated_at_ms, start_step, resume_from,
                last_val_accuracy, last_val_sources, backfilled, final_models
         FROM jobs ORDER BY created_at_ms, id",
    )?;
    let rows = st.query_map([], |r| {
        let state: String = r.get(3)?;
        let class: String = r.get(6)?;
        Ok(JobRow {
            id: r.get(0)?,
            name: r.get(1)?,
            spec_toml: r.get(2)?,
            state: parse_job_state(&state).ok_or_else(|| bad(3, "job state", &state))?,
            priority: r.get(4)?,
            world_size: r.get(5)?,
            device_class: parse_device_class(&class).ok_or_else(|| bad(6, "device class", &class))?,
            attempt: r.get(7)?,
            restarts: r.get(8)?,
            max_restarts: r.get(9)?,
            total_steps: r.get::<_, i64>(10)? as u64,
            last_step: r.get::<_, i64>(11)? as u64,
            last_loss: r.get::<_, f64>(12)? as f32,
            last_val_loss: r.get::<_, Option<f64>>(13)?.map(|v| v as f32),
            error: r.get(14)?,
            created_at_ms: r.get(15)?,
            updated_at_ms: r.get(16)?,
            start_step: r.get::<_, i64>(17)? as u64,
            resume_from: r.get(18)?,
            last_val_accuracy: r.get::<_, Option<f64>>(19)?.map(|v| v as f32),
            last_val_sources: sources_from_json(&r.get::<_, String>(20)?),
            backfilled: r.get(21)?,
            final_models: r.get(22)?,
        })
    })?;
    for r in rows {
        out.jobs.push(r?);
    }
    let mut st = conn.prepare(
        "SELECT id, hostname, device_class, device_index, data_addr, state, job_id, attempt, rank, last_seen_ms, drained
         FROM workers ORDER BY id",
    )?;
    let rows = st.query_map([], |r| {
        let class: String = r.get(2)?;
        let state: String = r.get(5)?;
        Ok(WorkerRow {
            id: r.get(0)?,
            hostname: r.get(1)?,
            device_class: parse_device_class(&class).ok_or_else(|| bad(2, "device class", &class))?,
            device_index: r.get(3)?,
            data_addr: r.get(4)?,
            state: parse_worker_state(&state).ok_or_else(|| bad(5, "worker state", &state))?,
            job_id: r.get(6)?,
            attempt: r.get(7)?,
            rank: r.get(8)?,
            last_seen_ms: r.get(9)?,
            drained: r.get(10)?,
        })
    })?;
    for r in rows {
        out.workers.push(r?);
    }
    let mut st =
        conn.prepare("SELECT job_id, attempt, rank, worker_id, state FROM assignments ORDER BY job_id, attempt, rank")?;
    let rows = st.query_map([], |r| {
        Ok(AssignmentRow {
            job_id: r.get(0)?,
            attempt: r.get(1)?,
            rank: r.get(2)?,
            worker_id: r.get(3)?,
            state: r.get(4)?,
        })
    })?;
    for r in rows {
        out.assignments.push(r?);
    }
    let mut st = conn.prepare("SELECT job_id, at_ms, kind, json FROM events ORDER BY id")?;
    let rows =
        st.query_map([], |r| Ok(EventRow { job_id: r.get(0)?, at_ms: r.get(1)?, kind: r.get(2)?, json: r.get(3)? }))?;
    for r in rows {
        out.events.push(r?);
    }
    let mut st =
        conn.prepare("SELECT job_id, step, uri, manifest_sha256, at_ms FROM checkpoints ORDER BY job_id, step")?;
    let rows = st.query_map([], |r| {
        Ok(CheckpointRow {
            job_id: r.get(0)?,
            step: r.get::<_, i64>(1)? as u64,
            uri: r.get(2)?,
            manifest_sha256: r.get(3)?,
            at_ms: r.get(4)?,
        })
    })?;
    for r in rows {
        out.checkpoints.push(r?);
    }
    out.logs_received = crate::job_logs::received(conn)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, loss: f32) -> SourceLossRow {
        SourceLossRow { name: name.into(), loss }
    }

    fn job(id: &str, state: JobState) -> JobRow {
        JobRow {
            id: id.into(),
            name: "n".into(),
            spec_toml: "name = \"n\"".into(),
            state,
            priority: -2,
            world_size: 2,
            device_class: DeviceClass::Cuda,
            attempt: 3,
            restarts: 2,
            max_restarts: 4,
            total_steps: u64::from(u32::MAX) + 7,
            last_step: 12,
            last_loss: 2.5,
            last_val_loss: Some(2.75),
            last_val_accuracy: Some(0.625),
            last_val_sources: vec![src("s3://b/web", 2.5), src("file:///data/co\"de", f32::NAN)],
            error: String::new(),
            created_at_ms: 1,
            updated_at_ms: 2,
            start_step: 10,
            resume_from: "memory://c/10".into(),
            backfilled: true,
            final_models: "/runs/w1".into(),
        }
    }

    #[test]
    fn a_database_open_in_one_store_is_refused_to_another_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smelt.db");
        let (first, _) = Store::open(&path).unwrap();
        let e = Store::open(&path).err().expect("a second store on an open database");
        assert!(e.to_string().contains("is in use by another coordinator") && e.to_string().contains("smelt.db"), "{e}");
        first.close();
        let (again, _) = Store::open(&path).expect("the lock goes with the closed store");
        again.close();
    }

    #[test]
    fn a_file_that_is_no_database_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("random.db");
        std::fs::write(&path, (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<u8>>()).unwrap();
        let e = Store::open(&path).err().expect("random bytes are no database");
        let msg = format!("{e:#}");
        assert!(msg.contains("random.db") && msg.contains("not a smelt coordinator database"), "{msg}");
    }

    #[tokio::test]
    async fn writes_survive_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/smelt.db");
        let (store, loaded) = Store::open(&path).unwrap();
        assert!(loaded.jobs.is_empty());
        let h = store.handle();
        h.write(Op::Job(job("job-000001", JobState::Queued)));
        h.write(Op::Job(job("job-000001", JobState::Running))); // an update replaces the row
        h.write(Op::Worker(WorkerRow {
            id: "w-000001".into(),
            hostname: "h".into(),
            device_class: DeviceClass::Cpu,
            device_index: 0,
            data_addr: "127.0.0.1:1".into(),
            state: WorkerState::Busy,
            job_id: "job-000001".into(),
            attempt: 3,
            rank: 1,
            last_seen_ms: 5,
            drained: true,
        }));
        h.write(Op::Assignment(AssignmentRow {
            job_id: "job-000001".into(),
            attempt: 3,
            rank: 1,
            worker_id: "w-000001".into(),
            state: "assigned".into(),
        }));
        let ev = JobEvent {
            job_id: "job-000001".into(),
            at_ms: 9,
            body: Some(job_event::Body::State(StateChange {
                from: JobState::Queued as i32,
                to: JobState::Scheduled as i32,
                reason: "why".into(),
            })),
        };
        h.write(Op::Event(EventRow::from_event(&ev).unwrap()));
        for step in 0..1000 {
            h.write(Op::Metric(MetricRow {
                job_id: "job-000001".into(),
                attempt: 3,
                step,
                loss: 1.0,
                val_loss: None,
                val_accuracy: (step == 999).then_some(0.75),
                grad_norm: 0.5,
                lr: 1e-3,
                tokens_per_s: 10.0,
                mfu: (step == 999).then_some(0.375),
                at_ms: 3,
                val_sources: if step % 500 == 499 { vec![src("s3://b/web", 2.0), src("s3://b/code", step as f32)] } else { Vec::new() },
            }));
        }
        h.write(Op::Checkpoint(CheckpointRow {
            job_id: "job-000001".into(),
            step: 10,
            uri: "memory://c/10".into(),
            manifest_sha256: "00".into(),
            at_ms: 4,
        }));
        h.flush().await.unwrap();
        store.close();
        assert!(h.flush().await.is_err(), "a closed store refuses flushes");

        let (store, loaded) = Store::open(&path).unwrap();
        // (NaN is not equal to itself: the NaN source is compared on its own)
        let mut want = job("job-000001", JobState::Running);
        let nan = want.last_val_sources.pop().unwrap();
        let mut got = loaded.jobs.clone();
        let got_nan = got[0].last_val_sources.pop().unwrap();
        assert_eq!(got, vec![want]);
        assert_eq!(got_nan.name, nan.name);
        assert!(got_nan.loss.is_nan(), "{got_nan:?}");
        assert_eq!(loaded.workers[0].state, WorkerState::Busy);
        assert_eq!(loaded.assignments.len(), 1);
        assert_eq!(loaded.events[0].to_event().unwrap(), ev);
        assert_eq!(loaded.checkpoints[0].step, 10);
        store.close();
        let conn = Connection::open(&path).unwrap();
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM metrics", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 1000);
        let acc: f64 = conn.query_row("SELECT val_accuracy FROM metrics WHERE step = 999", [], |r| r.get(0)).unwrap();
        assert_eq!(acc, 0.75);
        let mfu: f64 = conn.query_row("SELECT mfu FROM metrics WHERE step = 999", [], |r| r.get(0)).unwrap();
        assert_eq!(mfu, 0.375);
        let sources: Vec<(i64, String, f64)> = conn
            .prepare("SELECT step, source, loss FROM metric_sources WHERE job_id = 'job-000001' AND attempt = 3 ORDER BY rowid")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let web = "s3://b/web".to_string();
        let code = "s3://b/code".to_string();
        assert_eq!(sources, [(499, web.clone(), 2.0), (499, code.clone(), 499.0), (999, web, 2.0), (999, code, 999.0)]);
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let v: i64 = conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }
}
