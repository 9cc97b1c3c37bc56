//! The worker's control loop on the async runtime: register, heartbeat, take assignments, report.
//! Reconnects with backoff while the coordinator is away, keeps training meanwhile, and re-attaches
//! its running assignment when it gets back.

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use smelt_proto::v1::coordinator_message::Body as Down;
use smelt_proto::v1::worker_message::Body as Up;
use smelt_proto::v1::worker_service_client::WorkerServiceClient;
use smelt_proto::v1::{
    Assignment, AssignmentDone, CheckpointReport, CoordinatorMessage, RegisterRequest, RendezvousRequest, RendezvousResponse,
    WorkerMessage, WorkerState, WorkerStatus,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use smelt_proto::auth::{AuthChannel, BearerToken};
use tracing::{info, warn};

use crate::device::Device;
use crate::log_capture::LogCapture;
use crate::ring_addr;
use crate::runner::{creates_nccl_id, run_assignment, RunControl, RunEvent, RunRequest};

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Coordinator URL, e.g. http://127.0.0.1:7070.
    pub coordinator: String,
    /// Address to bind the ring listener on (port 0: any free port); none: the IP toward the
    /// coordinator (`ring_addr`).
    pub data_bind: Option<String>,
    /// Directory for this worker's outputs (final weights of jobs where it is rank 0).
    pub out_dir: PathBuf,
    pub hostname: String,
    /// Where this worker trains (decided at startup: `device::resolve`); registered as its
    /// device class and index, which the coordinator schedules by.
    pub device: Device,
    /// The coordinator's token, when it requires one (`smelt_proto::auth`).
    pub token: Option<String>,
    /// The lines this process logs during a run, sent to the coordinator (empty unless the
    /// capture is installed as a `tracing` layer, as `smelt worker` does).
    pub logs: LogCapture,
}

/// How long a draining worker waits, its last run reported, for the coordinator to acknowledge
/// its last log lines before it exits.
const LAST_LOGS_WAIT: Duration = Duration::from_secs(5);

/// How long a draining worker waits to report how its last run ended while the coordinator
/// cannot be reached (a coordinator restart takes seconds).
const UNREPORTED_WAIT: Duration = Duration::from_secs(30);

/// The assignment in progress and how to stop it.
struct Running {
    assignment: Assignment,
    control: RunControl,
}

/// Runs the worker until `shutdown` resolves (SIGTERM): then it drains — stops taking work, stops
/// a running assignment at its next step boundary, reports it, and returns.
/// Fails, naming the directory, when the worker's output directory cannot be written: a worker
/// that registered anyway would take jobs, train them to the end and fail at the final save
/// (and hold their default checkpoints there too). A small file written and removed again.
pub fn out_dir_writable(dir: &std::path::Path) -> Result<()> {
    let probe = dir.join(crate::write_probe::probe_name());
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b"smelt"))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            anyhow!(
                "--out-dir {}: cannot be written ({e}); a worker keeps its jobs' final weights and default checkpoints \
                 there: give a writable directory",
                dir.display()
            )
        })
}

pub async fn run(cfg: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    // a bad URL or TLS setup (an unreadable SMELT_TLS_CA, no trusted roots) will not mend by
    // retrying: say so and exit, where an unreachable coordinator is waited for below
    smelt_proto::tls::endpoint(&cfg.coordinator).map_err(|e| anyhow!("{e}"))?;
    out_dir_writable(&cfg.out_dir)?;
    let ring = ring_addr::bind(cfg.data_bind.as_deref(), &cfg.coordinator)?;
    let (listener, data_addr) = (ring.listener, ring.advertised.to_string());
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<RunEvent>();
    let mut worker_id = String::new();
    let mut running: Option<Running> = None;
    // what a coordinator that was away has not heard yet, sent once one answers
    let mut held = Held::default();
    let mut draining = false;
    // An assignment that arrived while an earlier run was still stopping; started when it ends.
    let mut queued: Option<Assignment> = None;
    // checkpoint reports in flight (RPCs of their own): a run's Done goes up only after them,
    // so the coordinator knows a run's last checkpoint (a rescue checkpoint) before it places
    // the job's next attempt
    let mut reports: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut backoff = Duration::from_millis(100);
    // a draining worker whose last run is reported waits for the acknowledgement of its last log
    // lines before it exits: until this, set when it first has nothing else left to do (kept
    // across reconnects, which send the unacknowledged lines again)
    let mut leave_by: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    // Waits out the backoff while no coordinator answers: a SIGTERM starts the drain, and the
    // run goes on meanwhile, its events handled as they come (its end kept to report once a
    // coordinator answers) without cutting the wait short: a run sends an event every step, and
    // ending the wait on each made a connection attempt and a warning per step.
    macro_rules! wait_offline {
        () => {
            let until = tokio::time::Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = &mut shutdown, if !draining => {
                        draining = begin_drain(&running, "worker received SIGTERM");
                        break;
                    }
                    Some(ev) = event_rx.recv() => {
                        let ended = matches!(ev, RunEvent::Done(_));
                        while_unreachable(ev, &mut running, &mut queued, &mut held, &cfg.logs);
                        // a draining worker's run just ended: it need not wait out the backoff
                        if ended && draining {
                            break;
                        }
                    }
                }
            }
            backoff = (backoff * 2).min(smelt_proto::MAX_RECONNECT_BACKOFF);
        };
    }

    loop {
        // A draining worker whose last run's result cannot be reported (the coordinator is away)
        // waits a while for it, then goes without: its checkpoints are committed, and the job's
        // restart resumes from the newest (`checkpointing::load_resume`).
        if draining && running.is_none() {
            if let Some(done) = &held.done {
                let by = *leave_by.get_or_insert_with(|| tokio::time::Instant::now() + UNREPORTED_WAIT);
                if tokio::time::Instant::now() >= by {
                    tracing::error!(
                        coordinator = %cfg.coordinator,
                        job_id = %done.job_id,
                        attempt = done.attempt,
                        ok = done.ok,
                        "exiting with the run's end unreported: the coordinator cannot be reached (the job's restart resumes from its newest checkpoint)"
                    );
                    return Ok(());
                }
            }
        }
        if draining && running.is_none() && held.done.is_none() {
            let by = *leave_by.get_or_insert_with(|| tokio::time::Instant::now() + LAST_LOGS_WAIT);
            if cfg.logs.unacked_count() == 0 || tokio::time::Instant::now() >= by {
                if worker_id.is_empty() {
                    info!("drained (never registered); exiting");
                } else {
                    info!(worker_id = %worker_id, "drained; exiting");
                }
                return Ok(());
            }
        }
        // ---- connect and register -----------------------------------------------------------
        let mut client = match connect(&cfg.coordinator, cfg.token.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                // a plain coordinator reached by https:// will not start speaking TLS: an idle
                // worker that never registered exits, as for the other wrong URLs
                if worker_id.is_empty() && running.is_none() && not_tls(&e.to_string()) {
                    return Err(e);
                }
                warn!(coordinator = %cfg.coordinator, error = %e, retry_in_ms = backoff.as_millis() as u64, "coordinator unreachable");
                wait_offline!();
                continue;
            }
        };
        let reg = client
            .register(RegisterRequest {
                worker_id: worker_id.clone(),
                hostname: cfg.hostname.clone(),
                device_class: cfg.device.class() as i32,
                device_index: cfg.device.index(),
                data_addr: data_addr.clone(),
                running: running.as_ref().map(|r| r.assignment.clone()),
            })
            .await;
        let reg = match reg {
            Ok(r) => r.into_inner(),
            // A token the coordinator refuses will not start working by retrying: an idle
            // worker exits. One with a run keeps it (a coordinator restarted with another token
            // may be restarted again with the right one; the run's checkpoints and its end,
            // reported once it is admitted, are not thrown away) and says why it cannot report.
            Err(e) if e.code() == tonic::Code::Unauthenticated => {
                if running.is_none() {
                    bail!("the coordinator at {} refused this worker: {}", cfg.coordinator, e.message());
                }
                tracing::error!(coordinator = %cfg.coordinator, reason = %e.message(), "the coordinator refuses this worker's token; its run goes on, retrying");
                wait_offline!();
                continue;
            }
            Err(e) => {
                // nor a client certificate it refuses (mutual TLS): the probe reads its reason.
                // An idle worker exits; one with a run keeps it (a certificate may be renewed
                // meanwhile) and says why it cannot report.
                if let Some(why) = smelt_proto::tls::refusal(&cfg.coordinator).await {
                    if running.is_none() {
                        bail!("the coordinator at {} refused this worker's TLS connection: {why}", cfg.coordinator);
                    }
                    tracing::error!(coordinator = %cfg.coordinator, reason = %why, "the coordinator refuses this worker's TLS certificate; retrying");
                }
                // nor a server that is not a smelt coordinator (a web server on the port, TLS
                // reached by http://): an idle worker that never registered exits saying what
                // answers there; one that did keeps trying (its coordinator may come back there)
                if smelt_proto::wrong_server::maybe_wrong_server(&e) {
                    if let Some(why) = smelt_proto::wrong_server::wrong_server(&cfg.coordinator, &e).await {
                        if worker_id.is_empty() && running.is_none() {
                            bail!("{why}");
                        }
                        tracing::error!(coordinator = %cfg.coordinator, reason = %why, "not a smelt coordinator; retrying");
                    }
                }
                // nor a plain coordinator reached by https:// (it will not start speaking TLS): an
                // idle worker that never registered exits, as for the other wrong URLs
                if worker_id.is_empty() && running.is_none() && not_tls(e.message()) {
                    bail!("cannot register with the coordinator at {}: {}", cfg.coordinator, e.message());
                }
                warn!(error = %e.message(), "register refused; retrying");
                wait_offline!();
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if worker_id != reg.worker_id {
            info!(worker_id = %reg.worker_id, data_addr = %data_addr, device = %cfg.device, "registered");
        } else {
            info!(worker_id = %reg.worker_id, "re-registered");
        }
        worker_id = reg.worker_id.clone();
        let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(10) as u64);

        // ---- heartbeat stream -------------------------------------------------------------------
        let (up_tx, up_rx) = mpsc::channel::<WorkerMessage>(256);
        let msg = |body: Up| WorkerMessage { worker_id: worker_id.clone(), body: Some(body) };
        let status = |running: &Option<Running>, draining: bool| {
            let (state, job_id, attempt) = match running {
                Some(r) => (WorkerState::Busy, r.assignment.job_id.clone(), r.assignment.attempt),
                None if draining => (WorkerState::Draining, String::new(), 0),
                None => (WorkerState::Idle, String::new(), 0),
            };
            Up::Status(WorkerStatus { state: state as i32, job_id, attempt, seq: 0, draining })
        };
        let _ = up_tx.send(msg(status(&running, draining))).await;
        // a coordinator that does not acknowledge log batches (an older one) has them as sent
        cfg.logs.keep_until_acked(reg.acks_logs);
        let mut down = match client.heartbeat(ReceiverStream::new(up_rx)).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                warn!(error = %e.message(), "heartbeat stream refused; reconnecting");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        // now that the stream is read: log batches the last stream may have lost (none
        // acknowledged them), then a Done held back, in that order
        let mut resent = true;
        for b in cfg.logs.unacked() {
            resent &= up_tx.send(msg(Up::Logs(b))).await.is_ok();
        }
        let missed = held.checkpoint.lock().unwrap().take();
        if let Some(r) = missed {
            // a call of its own, beside the stream (awaited here, it held up the heartbeats
            // while the coordinator stored the lines sent again, and the worker was declared
            // lost); the coordinator takes an ended attempt's checkpoint as any other
            info!(job_id = %r.job_id, step = r.step, "reporting the checkpoint committed while the coordinator was away");
            reports.retain(|h| !h.is_finished());
            reports.push(tokio::spawn(report_checkpoint(client.clone(), r, held.checkpoint.clone())));
        }
        if !held.metrics.is_empty() {
            info!(steps = held.metrics.len(), "sending the metrics of the steps trained while the coordinator was away");
        }
        // each let go once sent: a stream that breaks again keeps the rest for the next one
        while let Some(m) = held.metrics.front() {
            if up_tx.send(msg(Up::Metrics(m.clone()))).await.is_err() {
                resent = false;
                break;
            }
            held.metrics.pop_front();
        }
        if let Some(mut done) = held.done.take() {
            mark_drained(&mut done, draining);
            // the run's lines logged while the coordinator was away go before its Done
            if !resent || !send_logs(&cfg.logs, &up_tx, &msg).await || up_tx.send(msg(Up::Done(done.clone()))).await.is_err() {
                held.done = Some(done);
            } else if draining {
                // reported: the wait for the last lines' acknowledgement starts now
                leave_by = None;
            }
        }
        let mut ticker = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    // lines logged since the last tick go up before a draining worker decides
                    // whether every line is acknowledged
                    if !send_logs(&cfg.logs, &up_tx, &msg).await { break; }
                    if draining && running.is_none() && held.done.is_none() {
                        let by = *leave_by.get_or_insert_with(|| tokio::time::Instant::now() + LAST_LOGS_WAIT);
                        if cfg.logs.unacked_count() == 0 || tokio::time::Instant::now() >= by { break; }
                    }
                    if up_tx.send(msg(status(&running, draining))).await.is_err() { break; }
                }
                m = down.next() => match m {
                    Some(Ok(CoordinatorMessage { body: Some(Down::Assign(a)) })) => {
                        if draining {
                            warn!(job_id = %a.job_id, "assignment while draining; ignored");
                            continue;
                        }
                        if let Some(r) = &running {
                            // The coordinator has moved on (the old attempt was aborted while its
                            // thread was still winding down): stop it and start this one after.
                            info!(job_id = %a.job_id, attempt = a.attempt, "assignment while finishing an earlier one; queued");
                            r.control.stop("superseded by a new assignment");
                            queued = Some(a);
                            continue;
                        }
                        running = Some(start(client.clone(), a, worker_id.clone(), &listener, &cfg, event_tx.clone()));
                    }
                    Some(Ok(CoordinatorMessage { body: Some(Down::Abort(ab)) })) => {
                        if let Some(r) = &running {
                            if r.assignment.job_id == ab.job_id && r.assignment.attempt == ab.attempt {
                                info!(job_id = %ab.job_id, attempt = ab.attempt, reason = %ab.reason, "abort received");
                                r.control.stop(&format!("aborted by the coordinator: {}", ab.reason));
                            }
                        }
                    }
                    Some(Ok(CoordinatorMessage { body: Some(Down::LogsAck(ack)) })) => {
                        cfg.logs.acked(ack.seq);
                        // the coordinator failed to store some: all not acknowledged, again
                        if ack.resend {
                            let mut sent = true;
                            for b in cfg.logs.unacked() {
                                sent &= up_tx.send(msg(Up::Logs(b))).await.is_ok();
                            }
                            if !sent { break; }
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => { warn!(error = %e.message(), "heartbeat stream broke; reconnecting"); break; }
                    None => { warn!("coordinator closed the heartbeat stream; reconnecting"); break; }
                },
                ev = event_rx.recv() => match ev {
                    Some(RunEvent::Metrics(m)) => { let _ = up_tx.try_send(msg(Up::Metrics(m))); }
                    Some(RunEvent::Note(n)) => { let _ = up_tx.try_send(msg(Up::Note(n))); }
                    Some(RunEvent::Checkpoint(r)) => {
                        reports.retain(|h| !h.is_finished());
                        reports.push(tokio::spawn(report_checkpoint(client.clone(), r, held.checkpoint.clone())));
                    }
                    Some(RunEvent::Done(mut d)) => {
                        mark_drained(&mut d, draining);
                        for h in reports.drain(..) {
                            // report_checkpoint gives up after its retries (~6 s)
                            let _ = tokio::time::timeout(Duration::from_secs(15), h).await;
                        }
                        if d.ok {
                            info!(job_id = %d.job_id, attempt = d.attempt, "assignment finished");
                        } else if let Some(why) = d.error.strip_prefix("stopped: ") {
                            // stopped from outside (a cancel, a preemption, a drain): not a failure of the run
                            info!(job_id = %d.job_id, attempt = d.attempt, reason = %why, "assignment stopped");
                        } else {
                            // an error: the run's end (`jobs logs --level error` shows why it failed)
                            tracing::error!(job_id = %d.job_id, attempt = d.attempt, error = %d.error, "assignment failed");
                        }
                        // the run's lines, to its last, before its Done
                        cfg.logs.end();
                        if !send_logs(&cfg.logs, &up_tx, &msg).await { held.done = Some(d); running = None; break; }
                        running = None;
                        if up_tx.send(msg(Up::Done(d.clone()))).await.is_err() { held.done = Some(d); break; }
                        if let Some(a) = queued.take() {
                            running = Some(start(client.clone(), a, worker_id.clone(), &listener, &cfg, event_tx.clone()));
                        }
                        let _ = up_tx.send(msg(status(&running, draining))).await;
                    }
                    None => unreachable!("the agent holds a sender"),
                },
                _ = &mut shutdown, if !draining => {
                    // the coordinator hears of the drain before the run stops: a peer's failure
                    // that the stop causes (this rank closing the ring) is then the drain's, and
                    // spends no restart
                    let _ = up_tx.send(msg(status(&running, true))).await;
                    draining = begin_drain(&running, "worker received SIGTERM (draining)");
                }
            }
        }
        // Give the last messages a moment to flush before the stream is dropped.
        drop(up_tx);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !(draining && running.is_none() && held.done.is_none()) {
            tokio::time::sleep(backoff).await;
        }
    }
}

/// A SIGTERM: the worker drains (takes no more work; a run in progress stops at its next step
/// boundary, `reason` its report). Returns `true`, the new `draining`.
/// A failed run's Done says so when this worker is draining: the run was stopped for the
/// shutdown, which the coordinator does not count against the job's restarts.
fn mark_drained(d: &mut AssignmentDone, draining: bool) {
    d.draining = draining && !d.ok;
}

fn begin_drain(running: &Option<Running>, reason: &str) -> bool {
    info!(busy = running.is_some(), "sigterm: draining");
    if let Some(r) = running {
        r.control.stop(reason);
    }
    true
}

/// A run's event while no coordinator answers. Its end is kept to report once one does (the run
/// is over: a draining worker may then leave); an assignment queued behind it is let go (the
/// coordinator, once back, learns this worker is idle and places that attempt anew); every
/// step's metrics are kept to send (the newest `HELD_METRICS`), notes let go; a checkpoint is kept (the newest) to report
/// once one answers (it is committed in the store either way, where a restart of the job finds
/// it: `checkpointing::load_resume`).
fn while_unreachable(
    ev: RunEvent,
    running: &mut Option<Running>,
    queued: &mut Option<Assignment>,
    held: &mut Held,
    logs: &LogCapture,
) {
    match ev {
        RunEvent::Done(d) => {
            if let Some(q) = queued.take() {
                warn!(job_id = %q.job_id, attempt = q.attempt, "assignment queued behind the run let go: the coordinator is away");
            }
            if d.ok {
                info!(job_id = %d.job_id, attempt = d.attempt, "assignment finished (the coordinator is away: reported once it is back)");
            } else {
                tracing::error!(job_id = %d.job_id, attempt = d.attempt, error = %d.error, "assignment failed (the coordinator is away: reported once it is back)");
            }
            logs.end();
            *running = None;
            held.done = Some(d);
        }
        RunEvent::Checkpoint(r) => {
            warn!(job_id = %r.job_id, step = r.step, uri = %r.uri, "checkpoint committed but not reported: the coordinator is away (reported once it is back)");
            keep_unreported(&held.checkpoint, r);
        }
        // every step's metrics are kept for the coordinator (its record of the run's last loss,
        // and the loss curve without a gap), the oldest let go past HELD_METRICS
        RunEvent::Metrics(m) => {
            if held.metrics.len() == HELD_METRICS {
                held.metrics.pop_front();
            }
            held.metrics.push_back(m);
        }
        RunEvent::Note(_) => {}
    }
}

/// Sends the lines logged since the last call (a message per run, at most a megabyte each);
/// false when the stream is gone. Either way the batches wait, in the capture, for the
/// coordinator's acknowledgement, and the next stream sends again those it did not get.
async fn send_logs(logs: &LogCapture, up: &mpsc::Sender<WorkerMessage>, msg: &impl Fn(Up) -> WorkerMessage) -> bool {
    for batch in logs.drain() {
        if up.send(msg(Up::Logs(batch))).await.is_err() {
            return false;
        }
    }
    true
}

/// The newest checkpoint report no coordinator has taken yet.
type Unreported = std::sync::Arc<std::sync::Mutex<Option<CheckpointReport>>>;

/// What the worker holds for a coordinator that was away, each sent once one answers (after the
/// log lines it did not acknowledge; the Done last, so that the coordinator knows the run's last
/// checkpoint and loss before its end).
#[derive(Default)]
struct Held {
    /// A run's end that could not be delivered: resent after re-registering.
    done: Option<AssignmentDone>,
    /// The newest checkpoint committed while no coordinator heard of it (it was away, or its
    /// report gave up retrying), so that the job's record (`--resume-from JOB`, the next
    /// attempt) does not point at one retention removed. Shared with the report tasks.
    checkpoint: Unreported,
    /// A run's metrics of the steps trained while no coordinator answered, oldest first (its
    /// last loss, and the history's points of that time), at most `HELD_METRICS`.
    metrics: std::collections::VecDeque<smelt_proto::v1::StepMetrics>,
}

/// Steps of metrics held for an absent coordinator: hours of small steps, a few MB.
const HELD_METRICS: usize = 20_000;

/// Keeps `r` to report later unless a newer checkpoint of the same job is already kept (only
/// the newest matters: the job's record points at its newest).
/// Whether a connection error says the coordinator does not serve TLS (an https:// URL for a
/// plain one: `smelt_proto::tls::innermost`'s hint).
fn not_tls(error: &str) -> bool {
    error.contains("does not serve TLS")
}

fn keep_unreported(unreported: &Unreported, r: CheckpointReport) {
    let mut kept = unreported.lock().unwrap();
    if kept.as_ref().is_none_or(|k| k.job_id != r.job_id || k.step <= r.step) {
        *kept = Some(r);
    }
}

/// Tells the coordinator a checkpoint's manifest has landed; retried while it is unreachable,
/// then kept in `unreported` for the next connection (the checkpoint is safe in the store either
/// way: a restart that misses it resumes from the job's own newest, `checkpointing::load_resume`).
async fn report_checkpoint(mut client: WorkerServiceClient<AuthChannel>, r: CheckpointReport, unreported: Unreported) {
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=5 {
        match client.report_checkpoint(r.clone()).await {
            Ok(_) => {
                info!(job_id = %r.job_id, step = r.step, uri = %r.uri, "checkpoint reported");
                return;
            }
            Err(e) if matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal) && attempt < 5 => {
                warn!(job_id = %r.job_id, step = r.step, error = %e.message(), retry_in_ms = backoff.as_millis() as u64, "checkpoint report failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(e) if matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal) => {
                warn!(job_id = %r.job_id, step = r.step, uri = %r.uri, error = %e.message(), "checkpoint report failed; kept to report once the coordinator answers");
                keep_unreported(&unreported, r);
                return;
            }
            Err(e) => {
                warn!(job_id = %r.job_id, step = r.step, uri = %r.uri, error = %e.message(), "checkpoint not recorded by the coordinator");
                return;
            }
        }
    }
}

async fn connect(url: &str, token: Option<&str>) -> Result<WorkerServiceClient<AuthChannel>> {
    let channel = smelt_proto::tls::endpoint(url)
        .map_err(|e| anyhow!("{e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach the coordinator at {url}: {}", smelt_proto::tls::innermost(&e)))?;
    let token = BearerToken::new(token).map_err(|e| anyhow!("worker token: {e}"))?;
    Ok(WorkerServiceClient::with_interceptor(channel, token))
}

/// Joins the attempt's rendezvous: sends this rank's NCCL unique id (rank 0 of a multi-GPU job;
/// empty otherwise) and gets every rank's ring address and rank 0's id, which the coordinator
/// relays as opaque bytes.
pub async fn rendezvous(
    client: &mut WorkerServiceClient<AuthChannel>,
    a: &Assignment,
    worker_id: &str,
    nccl_unique_id: Vec<u8>,
) -> Result<RendezvousResponse, tonic::Status> {
    let req = RendezvousRequest {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        worker_id: worker_id.to_string(),
        nccl_unique_id,
    };
    Ok(client.rendezvous(req).await?.into_inner())
}

/// Takes up assignment `a` (its log lines from here on are the run's): rendezvous on the
/// runtime (rank 0 of a multi-GPU job first creates the NCCL id), then the training thread.
fn start(
    mut client: WorkerServiceClient<AuthChannel>,
    a: Assignment,
    worker_id: String,
    listener: &TcpListener,
    cfg: &WorkerConfig,
    events: mpsc::UnboundedSender<RunEvent>,
) -> Running {
    cfg.logs.begin(&a);
    info!(job_id = %a.job_id, attempt = a.attempt, rank = a.rank, world = a.world_size, "assignment received");
    let control = RunControl::default();
    let running = Running { assignment: a.clone(), control: control.clone() };
    let listener = listener.try_clone().expect("clone the ring listener");
    let (out_dir, device) = (cfg.out_dir.clone(), cfg.device);
    tokio::spawn(async move {
        let failed = |error: String| {
            RunEvent::Done(AssignmentDone { job_id: a.job_id.clone(), attempt: a.attempt, ok: false, error, final_step: 0, draining: false, final_models: String::new(), transient: false })
        };
        let mut my_id = Vec::new();
        if creates_nccl_id(&a, device) {
            // ncclGetUniqueId opens NCCL's bootstrap socket: off the async runtime.
            let made = tokio::task::spawn_blocking(crate::device::nccl_unique_id).await.unwrap_or_else(|e| Err(e.to_string()));
            match made {
                Ok(id) => my_id = id,
                Err(e) => {
                    let _ = events.send(failed(format!("creating the nccl unique id on {device}: {e}")));
                    return;
                }
            }
        }
        let (peer_addrs, nccl_unique_id) = match rendezvous(&mut client, &a, &worker_id, my_id).await {
            Ok(r) => (r.peer_addrs, r.nccl_unique_id),
            Err(e) => {
                let _ = events.send(failed(format!("rendezvous failed: {}", e.message())));
                return;
            }
        };
        let thread_name = format!("train-{}-{}", a.job_id, a.rank);
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let req = RunRequest { assignment: a, peer_addrs, listener, out_dir, device, nccl_unique_id };
                run_assignment(req, control, &|ev| {
                    let _ = events.send(ev);
                });
            })
            .expect("spawn the training thread");
    });
    running
}
