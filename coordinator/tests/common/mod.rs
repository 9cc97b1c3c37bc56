//! A real coordinator on 127.0.0.1:0 over a real SQLite file, and workers played by the
//! generated gRPC clients.

#![allow(dead_code)]

pub mod browser;
pub mod certs;
pub mod http;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smelt_coordinator::{bind, CoordinatorConfig, TlsFiles};
use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::worker_service_client::WorkerServiceClient;
use smelt_proto::v1::*;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

pub const HEARTBEAT: Duration = Duration::from_millis(50);
pub const LEASE: Duration = Duration::from_millis(400);
/// Hang guard for waits (not a performance threshold).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A fresh directory and the coordinator database path in it.
pub fn tmp() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("smelt.db");
    (d, p)
}

pub struct Coord {
    pub addr: SocketAddr,
    pub url: String,
    pub db: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn start(db: &Path) -> Coord {
    start_with_token(db, None).await
}

/// A coordinator that requires `token` on every call (none: open).
pub async fn start_with_token(db: &Path, token: Option<&str>) -> Coord {
    start_with(db, token, None).await
}

/// A coordinator requiring `token` and serving TLS with `tls`'s certificate (its URL https://).
pub async fn start_with(db: &Path, token: Option<&str>, tls: Option<TlsFiles>) -> Coord {
    let mut cfg = CoordinatorConfig::new("127.0.0.1:0".parse().unwrap(), db);
    cfg.heartbeat_interval = HEARTBEAT;
    cfg.lease_timeout = LEASE;
    cfg.token = token.map(str::to_string);
    cfg.tls = tls;
    start_config(cfg).await
}

/// A coordinator with `cfg` (its listen address and database as given).
pub async fn start_config(cfg: CoordinatorConfig) -> Coord {
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let db = cfg.db_path.clone();
    let bound = bind(cfg).await.expect("bind");
    let addr = bound.local_addr();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(bound.serve(async move {
        let _ = rx.await;
    }));
    Coord { addr, url: format!("{scheme}://{addr}"), db, stop: Some(stop), task: Some(task) }
}

impl Coord {
    pub async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::connect(self.url.clone()).await.expect("connect jobs client")
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let r = tokio::time::timeout(PATIENCE, self.task.take().unwrap()).await.expect("coordinator stops");
        r.expect("serve task").expect("serve result");
    }
}

pub fn spec(name: &str, world_size: u32, priority: i32, max_restarts: u32) -> String {
    spec_on(name, world_size, priority, max_restarts, "cpu")
}

pub fn spec_on(name: &str, world_size: u32, priority: i32, max_restarts: u32, device: &str) -> String {
    format!(
        r#"
name = "{name}"
priority = {priority}
max_restarts = {max_restarts}
seed = 7

[model]
preset = "tiny"

[data]
text = "data/tinyshakespeare.txt"

[train]
steps = 100
global_batch = {gb}
micro_batch = 2
seq_len = 32
lr = 1e-3

[cluster]
world_size = {world_size}
device = "{device}"
"#,
        gb = 2 * world_size
    )
}

pub async fn submit(c: &mut JobServiceClient<Channel>, toml: &str) -> Job {
    c.submit(SubmitRequest { spec_toml: toml.into(), resume_from: String::new() })
        .await
        .expect("submit")
        .into_inner()
        .job
        .unwrap()
}

pub async fn get(c: &mut JobServiceClient<Channel>, id: &str) -> Job {
    c.get_job(GetJobRequest { job_id: id.into() }).await.expect("get job").into_inner()
}

pub fn state(j: &Job) -> JobState {
    JobState::try_from(j.state).unwrap()
}

/// Polls the job until `pred` holds (or panics after PATIENCE, showing the job).
pub async fn wait_job(c: &mut JobServiceClient<Channel>, id: &str, pred: impl Fn(&Job) -> bool) -> Job {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let j = get(c, id).await;
        if pred(&j) {
            return j;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("job never reached the expected condition: {j:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_state(c: &mut JobServiceClient<Channel>, id: &str, s: JobState) -> Job {
    wait_job(c, id, |j| state(j) == s).await
}

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Every state-change reason and message of the job, in order.
pub async fn event_texts(c: &mut JobServiceClient<Channel>, id: &str) -> Vec<String> {
    // A finished job's watch stream replays and ends; for a live one, read what is stored by
    // taking what arrives before a short quiet period.
    let mut s = c.watch_job(WatchJobRequest { job_id: id.into() }).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(ev))) = tokio::time::timeout(Duration::from_millis(200), s.message()).await {
        match ev.body {
            Some(job_event::Body::State(st)) => out.push(st.reason),
            Some(job_event::Body::Message(m)) => out.push(m),
            _ => {}
        }
    }
    out
}

/// A worker played by the generated client: it registers, holds its lease by sending its status
/// every HEARTBEAT, and reads what the coordinator sends down the stream.
pub struct Worker {
    pub id: String,
    pub data_addr: String,
    pub client: WorkerServiceClient<Channel>,
    tx: Option<mpsc::Sender<WorkerMessage>>,
    rx: Option<Streaming<CoordinatorMessage>>,
    status: Arc<Mutex<WorkerStatus>>,
    ticker: Option<JoinHandle<()>>,
}

pub struct WorkerOpts<'a> {
    pub id: &'a str,
    pub device_class: DeviceClass,
    pub device_index: u32,
    pub running: Option<Assignment>,
    /// Sent right after the first status on the heartbeat stream (a Done held back while the
    /// coordinator was away).
    pub then: Vec<worker_message::Body>,
}

impl Default for WorkerOpts<'_> {
    fn default() -> Self {
        WorkerOpts { id: "", device_class: DeviceClass::Cpu, device_index: 0, running: None, then: Vec::new() }
    }
}

impl Worker {
    pub async fn join(url: &str, data_addr: &str) -> Worker {
        Worker::join_with(url, data_addr, WorkerOpts::default()).await
    }

    pub async fn join_with(url: &str, data_addr: &str, o: WorkerOpts<'_>) -> Worker {
        let mut client = WorkerServiceClient::connect(url.to_string()).await.expect("connect worker client");
        let resp = client
            .register(RegisterRequest {
                worker_id: o.id.into(),
                hostname: "testhost".into(),
                device_class: o.device_class as i32,
                device_index: o.device_index,
                data_addr: data_addr.into(),
                running: o.running.clone(),
            })
            .await
            .expect("register")
            .into_inner();
        assert_eq!(resp.heartbeat_interval_ms, HEARTBEAT.as_millis() as u32);
        let status = match &o.running {
            Some(a) => WorkerStatus { state: WorkerState::Busy as i32, job_id: a.job_id.clone(), attempt: a.attempt, seq: 0, draining: false },
            None => WorkerStatus { state: WorkerState::Idle as i32, job_id: String::new(), attempt: 0, seq: 0, draining: false },
        };
        let mut w = Worker {
            id: resp.worker_id,
            data_addr: data_addr.into(),
            client,
            tx: None,
            rx: None,
            status: Arc::new(Mutex::new(status)),
            ticker: None,
        };
        w.open_stream(o.then).await;
        w
    }

    async fn open_stream(&mut self, then: Vec<worker_message::Body>) {
        let (tx, rx) = mpsc::channel(64);
        tx.send(self.status_msg()).await.unwrap();
        for body in then {
            tx.send(WorkerMessage { worker_id: self.id.clone(), body: Some(body) }).await.unwrap();
        }
        let inbound = self.client.heartbeat(ReceiverStream::new(rx)).await.expect("heartbeat").into_inner();
        let (id, status, t) = (self.id.clone(), self.status.clone(), tx.clone());
        self.ticker = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
            loop {
                tick.tick().await;
                let s = status.lock().unwrap().clone();
                if t.send(WorkerMessage { worker_id: id.clone(), body: Some(worker_message::Body::Status(s)) })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
        self.tx = Some(tx);
        self.rx = Some(inbound);
    }

    fn status_msg(&self) -> WorkerMessage {
        let s = self.status.lock().unwrap().clone();
        WorkerMessage { worker_id: self.id.clone(), body: Some(worker_message::Body::Status(s)) }
    }

    pub fn set_busy(&self, a: &Assignment) {
        *self.status.lock().unwrap() =
            WorkerStatus { state: WorkerState::Busy as i32, job_id: a.job_id.clone(), attempt: a.attempt, seq: 0, draining: false };
    }

    /// Busy with `a`'s run, and shutting down (the status a worker sends on SIGTERM before it
    /// stops its run).
    pub fn set_busy_draining(&self, a: &Assignment) {
        *self.status.lock().unwrap() =
            WorkerStatus { state: WorkerState::Busy as i32, job_id: a.job_id.clone(), attempt: a.attempt, seq: 0, draining: true };
    }

    pub fn set_draining(&self) {
        *self.status.lock().unwrap() =
            WorkerStatus { state: WorkerState::Draining as i32, job_id: String::new(), attempt: 0, seq: 0, draining: false };
    }

    pub fn set_idle(&self) {
        *self.status.lock().unwrap() =
            WorkerStatus { state: WorkerState::Idle as i32, job_id: String::new(), attempt: 0, seq: 0, draining: false };
    }

    pub async fn next(&mut self) -> coordinator_message::Body {
        let rx = self.rx.as_mut().expect("stream open");
        loop {
            let m = within("a coordinator message", rx.message()).await.expect("stream ok").expect("stream not ended");
            match m.body.expect("message has a body") {
                // Heartbeat acks come with every status, log acks with every numbered log
                // batch; the tests look at what else arrives.
                coordinator_message::Body::Ack(_) | coordinator_message::Body::LogsAck(_) => continue,
                other => return other,
            }
        }
    }

    /// The next log acknowledgement (other messages are skipped).
    pub async fn next_logs_ack(&mut self) -> LogsAck {
        let rx = self.rx.as_mut().expect("stream open");
        loop {
            let m = within("a log acknowledgement", rx.message()).await.expect("stream ok").expect("stream not ended");
            if let Some(coordinator_message::Body::LogsAck(a)) = m.body {
                return a;
            }
        }
    }

    /// Waits for a log acknowledgement of at least `seq` (other messages are skipped).
    pub async fn logs_acked(&mut self, seq: u64) {
        let rx = self.rx.as_mut().expect("stream open");
        let mut seen = Vec::new();
        let wait = async {
            loop {
                let m = rx.message().await.expect("stream ok").expect("stream not ended");
                if let Some(coordinator_message::Body::LogsAck(a)) = m.body {
                    if a.seq >= seq {
                        return;
                    }
                    seen.push(a);
                }
            }
        };
        if tokio::time::timeout(PATIENCE, wait).await.is_err() {
            panic!("no acknowledgement of log batch {seq} within {PATIENCE:?}; saw {seen:?}");
        }
    }

    /// The next message, which must be an assignment; the worker reports itself busy with it.
    pub async fn assignment(&mut self) -> Assignment {
        match self.next().await {
            coordinator_message::Body::Assign(a) => {
                self.set_busy(&a);
                a
            }
            other => panic!("worker {} expected an assignment, got {other:?}", self.id),
        }
    }

    pub async fn abort(&mut self) -> Abort {
        match self.next().await {
            coordinator_message::Body::Abort(a) => {
                self.set_idle();
                a
            }
            other => panic!("worker {} expected an abort, got {other:?}", self.id),
        }
    }

    pub async fn send(&self, body: worker_message::Body) {
        self.tx
            .as_ref()
            .expect("stream open")
            .send(WorkerMessage { worker_id: self.id.clone(), body: Some(body) })
            .await
            .expect("send");
    }

    pub async fn metrics(&self, a: &Assignment, step: u64, loss: f32) {
        self.send(worker_message::Body::Metrics(StepMetrics {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
            step,
            loss,
            grad_norm: 1.0,
            lr: 1e-3,
            tokens_per_s: 1000.0,
            val_loss: None,
            val_accuracy: None,
            mfu: None,
            val_sources: Vec::new(),
        }))
        .await;
    }

    pub async fn done(&self, a: &Assignment, ok: bool, error: &str, final_step: u64) {
        self.send(worker_message::Body::Done(AssignmentDone {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            ok,
            error: error.into(),
            final_step,
            draining: false,
            final_models: String::new(),
            transient: false,
        }))
        .await;
    }

    /// A failed run's Done that the worker took for the infrastructure's (a store outage).
    pub async fn done_transient(&self, a: &Assignment, error: &str, final_step: u64) {
        self.send(worker_message::Body::Done(AssignmentDone {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            ok: false,
            error: error.into(),
            final_step,
            draining: false,
            final_models: String::new(),
            transient: true,
        }))
        .await;
    }

    /// Rank 0's Done of a run that ended ok, its final weights saved under `final_models`.
    pub async fn done_saved(&self, a: &Assignment, final_step: u64, final_models: &str) {
        self.send(worker_message::Body::Done(AssignmentDone {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            ok: true,
            error: String::new(),
            final_step,
            draining: false,
            final_models: final_models.into(),
            transient: false,
        }))
        .await;
    }

    /// A Done for a run this worker stopped because it is shutting down (SIGTERM).
    pub async fn drained(&self, a: &Assignment, final_step: u64) {
        self.send(worker_message::Body::Done(AssignmentDone {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            ok: false,
            error: "stopped: worker received SIGTERM (draining)".into(),
            final_step,
            draining: true,
            final_models: String::new(),
            transient: false,
        }))
        .await;
    }

    pub async fn rendezvous(&self, a: &Assignment, nccl: &[u8]) -> Result<RendezvousResponse, tonic::Status> {
        let mut c = self.client.clone();
        c.rendezvous(RendezvousRequest {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
            worker_id: self.id.clone(),
            nccl_unique_id: nccl.to_vec(),
        })
        .await
        .map(|r| r.into_inner())
    }

    /// Stops heartbeating but keeps the stream open: the worker goes silent.
    pub fn go_silent(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }

    /// Drops the heartbeat stream (both directions), as a crashed worker would.
    pub fn drop_stream(&mut self) {
        self.go_silent();
        self.tx = None;
        self.rx = None;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }
}

pub async fn workers(c: &mut JobServiceClient<Channel>) -> Vec<WorkerInfo> {
    c.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers
}

impl Worker {
    /// The raw next item of the coordinator's stream.
    pub async fn rx_message(&mut self) -> Result<Option<CoordinatorMessage>, tonic::Status> {
        self.rx.as_mut().expect("stream open").message().await
    }
}
