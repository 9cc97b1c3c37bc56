//! Worker operations behind the worker service: register (and re-attach after a coordinator
//! restart), the heartbeat stream's messages, and its end.

use std::time::Instant;

use smelt_proto::v1::{
    coordinator_message, job_event, worker_message, Abort, AssignmentDone, CoordinatorMessage, DeviceClass, HeartbeatAck,
    JobState, LogBatch, LogsAck, RegisterRequest,
    RegisterResponse, StepMetrics, WorkerMessage, WorkerState, WorkerStatus,
};
use tracing::{debug, info, warn};

use crate::attempt::Fault;
use crate::error::{CoordError, Result};
use crate::state::{job_state_name, now_ms, Conn, Outbox, State, WorkerRec};
use crate::store::{MetricRow, Op, SourceLossRow, WorkerRow};

impl State {
    pub fn register(&mut self, req: RegisterRequest) -> Result<RegisterResponse> {
        let class = DeviceClass::try_from(req.device_class).unwrap_or(DeviceClass::Unspecified);
        if class == DeviceClass::Unspecified {
            return Err(CoordError::InvalidArgument("device_class: must be cpu or cuda".into()));
        }
        if class == DeviceClass::Cpu && req.data_addr.trim().is_empty() {
            return Err(CoordError::InvalidArgument(
                "data_addr: a CPU worker must give the host:port where its peers reach it".into(),
            ));
        }
        let known = !req.worker_id.is_empty() && self.workers.contains_key(&req.worker_id);
        let id = if known {
            req.worker_id.clone()
        } else {
            if !req.worker_id.is_empty() {
                warn!(worker_id = %req.worker_id, "unknown worker id re-registering; giving it a new id");
            }
            let id = format!("w-{:06}", self.next_worker);
            self.next_worker += 1;
            let row = WorkerRow {
                id: id.clone(),
                hostname: String::new(),
                device_class: class,
                device_index: 0,
                data_addr: String::new(),
                state: WorkerState::Idle,
                job_id: String::new(),
                attempt: 0,
                rank: 0,
                last_seen_ms: 0,
                drained: false,
            };
            self.workers.insert(id.clone(), WorkerRec::new(row, Instant::now()));
            id
        };
        // What the coordinator thinks this worker holds, before this registration.
        let (held_job, held_attempt) = {
            let w = &self.workers[&id];
            (w.row.job_id.clone(), w.row.attempt)
        };
        let held = (!held_job.is_empty()).then(|| self.holds_rank(&held_job, held_attempt, &id)).flatten();
        {
            let w = self.workers.get_mut(&id).expect("inserted or known");
            w.row.hostname = req.hostname.clone();
            w.row.device_class = class;
            w.row.device_index = req.device_index;
            w.row.data_addr = req.data_addr.clone();
            w.row.last_seen_ms = now_ms();
            w.last_seen = Instant::now();
            w.pending.clear();
            w.draining = false;
            w.row.drained = false;
            w.orphan_statuses = None;
            // The next heartbeat stream replaces any old one; the old one's end changes nothing.
            w.conn = None;
        }
        let running = req.running.as_ref().filter(|a| !a.job_id.is_empty());
        let reattach = known
            && running.is_some_and(|a| {
                held.is_some_and(|rank| held_job == a.job_id && held_attempt == a.attempt && rank == a.rank)
            });
        if reattach {
            let a = running.expect("checked");
            let w = self.workers.get_mut(&id).expect("known");
            w.row.state = WorkerState::Busy;
            info!(worker_id = %id, job_id = %a.job_id, attempt = a.attempt, rank = a.rank, "worker re-attached");
            self.persist_worker(&id);
            self.message(&a.job_id, format!("worker {id} re-attached as rank {} of attempt {}", a.rank, a.attempt));
            return Ok(self.register_response(id));
        }
        if held.is_some() {
            if running.is_none() {
                // It may have finished while the coordinator was away, its Done not yet
                // delivered: keep the rank until its first messages on the new stream tell.
                info!(worker_id = %id, job_id = %held_job, attempt = held_attempt, "worker re-registered without its assignment; waiting for its report");
                if let Some(w) = self.workers.get_mut(&id) {
                    w.orphan_statuses = Some(0);
                }
                self.persist_worker(&id);
                return Ok(self.register_response(id));
            }
            // It runs something else: the coordinator's attempt has lost this rank.
            self.fail_attempt(
                &held_job,
                Fault::Failed {
                    worker: &id,
                    error: format!("worker re-registered running another assignment (attempt {held_attempt} expected)"),
                    transient: false,
                },
            );
        }
        if let Some(a) = running {
            // A stale assignment: tell the worker to stop it as soon as its stream opens.
            let why = match self.jobs.get(&a.job_id) {
                Some(j) => format!(
                    "assignment is stale: job {} is {} at attempt {}",
                    a.job_id,
                    job_state_name(j.row.state),
                    j.row.attempt
                ),
                None => format!("assignment is stale: job {} is unknown here", a.job_id),
            };
            info!(worker_id = %id, job_id = %a.job_id, attempt = a.attempt, why = %why, "stale assignment will be aborted");
            let abort = Abort { job_id: a.job_id.clone(), attempt: a.attempt, reason: why };
            if let Some(w) = self.workers.get_mut(&id) {
                w.pending
                    .push(smelt_proto::v1::CoordinatorMessage { body: Some(coordinator_message::Body::Abort(abort)) });
            }
        }
        self.release_worker(&id, WorkerState::Idle);
        info!(
            worker_id = %id,
            hostname = %req.hostname,
            device_class = crate::state::device_class_name(class),
            data_addr = %req.data_addr,
            new = !known,
            "worker registered"
        );
        Ok(self.register_response(id))
    }

    fn register_response(&self, worker_id: String) -> RegisterResponse {
        RegisterResponse {
            worker_id,
            heartbeat_interval_ms: self.heartbeat_interval.as_millis().min(u32::MAX as u128) as u32,
            lease_timeout_ms: self.lease_timeout.as_millis().min(u32::MAX as u128) as u32,
            acks_logs: true,
        }
    }

    /// A heartbeat stream opened for `worker_id`: it becomes the worker's lease and its way to
    /// receive assignments. Returns the stream's generation.
    pub fn attach_stream(&mut self, worker_id: &str, tx: Outbox) -> Result<u64> {
        if self.shutting_down {
            return Err(CoordError::Unavailable("coordinator shutting down".into()));
        }
        if worker_id.is_empty() {
            return Err(CoordError::InvalidArgument(
                "worker_id: the first heartbeat message must carry the id Register returned".into(),
            ));
        }
        let gen = self.next_gen;
        let w = self.workers.get_mut(worker_id).ok_or_else(|| CoordError::worker_not_found(worker_id))?;
        if w.row.state == WorkerState::Lost {
            return Err(CoordError::FailedPrecondition(format!(
                "worker {worker_id} was declared lost; register again"
            )));
        }
        self.next_gen += 1;
        if let Some(old) = w.conn.take() {
            let _ = old.tx.send(Err(tonic::Status::aborted("superseded by a newer heartbeat stream")));
        }
        for m in w.pending.drain(..) {
            let _ = tx.send(Ok(m));
        }
        w.conn = Some(Conn { gen, tx });
        w.last_seen = Instant::now();
        w.row.last_seen_ms = now_ms();
        debug!(worker_id = %worker_id, gen, "heartbeat stream attached");
        self.schedule();
        Ok(gen)
    }

    fn current_stream(&self, worker_id: &str, gen: u64) -> bool {
        !self.shutting_down && self.workers.get(worker_id).and_then(|w| w.conn.as_ref()).is_some_and(|c| c.gen == gen)
    }

    /// A message on stream `gen`; false when that stream is no longer the worker's lease (the
    /// reader stops).
    pub fn on_message(&mut self, worker_id: &str, gen: u64, msg: WorkerMessage) -> bool {
        if !self.current_stream(worker_id, gen) {
            return false;
        }
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.last_seen = Instant::now();
            w.row.last_seen_ms = now_ms();
        }
        if let Some(worker_message::Body::Status(s)) = &msg.body {
            self.ack(worker_id, s.seq);
        }
        match msg.body {
            Some(worker_message::Body::Status(s)) => self.on_status(worker_id, s),
            Some(worker_message::Body::Metrics(m)) => self.on_metrics(worker_id, m),
            Some(worker_message::Body::Done(d)) => self.on_done(worker_id, d),
            Some(worker_message::Body::Note(n)) => {
                let winding_down = self.jobs.get(&n.job_id).is_some_and(|j| j.winding_down.iter().any(|(w, a)| w == worker_id && *a == n.attempt));
                let rank = self.holds_rank(&n.job_id, n.attempt, worker_id);
                if rank == Some(0) && !n.resumed_from.is_empty() {
                    self.on_resumed_elsewhere(&n.job_id, &n.resumed_from, n.resumed_step);
                }
                if winding_down || rank.is_some() {
                    self.message(&n.job_id, n.text);
                }
            }
            Some(worker_message::Body::Logs(b)) => self.on_logs(worker_id, b),
            None => {}
        }
        true
    }

    /// Rank 0 of the job's current attempt resumed from `uri` (step `step`) rather than the
    /// checkpoint it was assigned (which did not verify, or was older than the job's own newest):
    /// the job says where it really started, and the next restart starts from there too (not
    /// again from a checkpoint that does not verify).
    fn on_resumed_elsewhere(&mut self, job_id: &str, uri: &str, step: u64) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        info!(job_id = %job_id, assigned = %job.row.resume_from, resumed_from = %uri, step, "rank 0 resumed from another checkpoint than assigned");
        let assigned = std::mem::replace(&mut job.row.resume_from, uri.to_string());
        if job.row.last_step == job.row.start_step {
            job.row.last_step = step; // no step trained yet in this attempt
        }
        job.row.start_step = step;
        // the recorded newest, if it is the one assigned, was passed over: this one replaces it
        if job.latest_checkpoint.as_ref().is_some_and(|(_, u)| *u == assigned) {
            job.latest_checkpoint = Some((step, uri.to_string()));
        }
        self.persist_job(job_id);
    }

    /// A worker's log lines: kept for any job this coordinator knows, from whichever worker ran a
    /// rank of it (a failed rank's last lines come after the gang is released); a numbered batch
    /// at most the worker's highest received is one sent again, and dropped here.
    fn on_logs(&mut self, worker_id: &str, b: LogBatch) {
        let Some(w) = self.workers.get_mut(worker_id) else { return };
        let seq = b.seq;
        if seq > 0 {
            if seq <= w.logs_received {
                debug!(worker_id = %worker_id, seq, "log batch received before; not stored again");
                return;
            }
            w.logs_received = seq;
        }
        if b.rank == 0 && self.jobs.contains_key(&b.job_id) {
            self.job_warnings(&b);
        }
        let rows = if self.jobs.contains_key(&b.job_id) { crate::job_logs::rows_of(worker_id, b, now_ms()) } else { Vec::new() };
        if seq > 0 || !rows.is_empty() {
            self.store.write(Op::Logs { worker_id: worker_id.to_string(), seq, rows });
        }
    }

    /// Rank 0's warnings about the job itself, recorded as its events too (once each: every
    /// attempt loads its data again and would say them again).
    fn job_warnings(&mut self, b: &LogBatch) {
        for l in b.lines.iter().filter(|l| l.level == "WARN" && l.target == smelt_proto::JOB_WARNING_TARGET) {
            let text = format!("warning: {}", l.text);
            let said = self.jobs.get(&b.job_id).is_some_and(|j| j.events.iter().any(|e| matches!(&e.body, Some(job_event::Body::Message(m)) if *m == text)));
            if !said {
                self.message(&b.job_id, text);
            }
        }
    }

    /// The worker's highest log batch number received so far: what a store flush started now
    /// commits.
    pub fn logs_received(&self, worker_id: &str) -> u64 {
        self.workers.get(worker_id).map_or(0, |w| w.logs_received)
    }

    /// After a store flush that began when `upto` was the worker's highest received: on
    /// success, tells it (on stream `gen`, if still its own) every batch it numbered up to `upto`
    /// is committed, so it can let them go; on failure (a batch of its lines not stored, in this
    /// flush's transaction or an earlier one), forgets what was not committed and asks it to
    /// send every batch after the last committed again (some may then be stored twice, rather
    /// than none lost).
    pub fn logs_flushed(&mut self, worker_id: &str, gen: u64, upto: u64, committed: bool) {
        let Some(w) = self.workers.get_mut(worker_id) else { return };
        if committed {
            w.logs_committed = w.logs_committed.max(upto);
        } else {
            w.logs_received = w.logs_committed;
        }
        if !self.current_stream(worker_id, gen) {
            return;
        }
        let w = &self.workers[worker_id];
        if let Some(conn) = &w.conn {
            let ack = LogsAck { seq: w.logs_committed, resend: !committed };
            let _ = conn.tx.send(Ok(CoordinatorMessage { body: Some(coordinator_message::Body::LogsAck(ack)) }));
        }
    }

    /// Echoes a status's sequence number down the worker's stream.
    fn ack(&self, worker_id: &str, seq: u64) {
        if let Some(conn) = self.workers.get(worker_id).and_then(|w| w.conn.as_ref()) {
            let ack = CoordinatorMessage { body: Some(coordinator_message::Body::Ack(HeartbeatAck { seq })) };
            let _ = conn.tx.send(Ok(ack));
        }
    }

    /// The stream `gen` ended (closed by the worker or broken).
    pub fn on_stream_end(&mut self, worker_id: &str, gen: u64, why: &str) {
        if self.current_stream(worker_id, gen) {
            self.worker_lost(worker_id, why);
        }
    }

    fn on_status(&mut self, worker_id: &str, s: WorkerStatus) {
        let state = WorkerState::try_from(s.state).unwrap_or_default();
        let Some(w) = self.workers.get_mut(worker_id) else { return };
        w.reported_job = if state == WorkerState::Busy { s.job_id.clone() } else { String::new() };
        if (state == WorkerState::Draining || s.draining) && !w.draining {
            w.draining = true;
            info!(worker_id = %worker_id, "worker draining; it takes no new assignment");
            if w.row.state == WorkerState::Idle {
                w.row.state = WorkerState::Draining;
                self.persist_worker(worker_id);
            }
        }
        let w = self.workers.get_mut(worker_id).expect("checked");
        if let Some(n) = w.orphan_statuses.as_mut() {
            let claims = state == WorkerState::Busy && s.job_id == w.row.job_id && s.attempt == w.row.attempt;
            if claims {
                w.orphan_statuses = None;
            } else {
                *n += 1;
                if *n >= 2 {
                    let (job_id, attempt) = (w.row.job_id.clone(), w.row.attempt);
                    self.fail_attempt(
                        &job_id,
                        Fault::Failed {
                            worker: worker_id,
                            error: format!(
                                "worker re-registered without its assignment (attempt {attempt}) and did not report it"
                            ),
                            transient: false,
                        },
                    );
                    return;
                }
            }
        }
        if state != WorkerState::Busy || s.job_id.is_empty() {
            return;
        }
        let Some(rank) = self.holds_rank(&s.job_id, s.attempt, worker_id) else {
            debug!(worker_id = %worker_id, job_id = %s.job_id, attempt = s.attempt, "status for an attempt not held; ignored");
            return;
        };
        let job = self.jobs.get_mut(&s.job_id).expect("held");
        if let Some(x) = job.started.get_mut(rank as usize) {
            *x = true;
        }
        if job.row.state == JobState::Scheduled && job.started.iter().all(|x| *x) {
            let n = job.started.len();
            self.transition_or_log(&s.job_id, JobState::Running, format!("all {n} ranks running"));
        }
    }

    fn on_metrics(&mut self, worker_id: &str, m: StepMetrics) {
        let Some(rank) = self.holds_rank(&m.job_id, m.attempt, worker_id) else {
            debug!(worker_id = %worker_id, job_id = %m.job_id, attempt = m.attempt, "metrics for an attempt not held; ignored");
            return;
        };
        if self.jobs[&m.job_id].row.state == JobState::Scheduled {
            self.transition_or_log(&m.job_id, JobState::Running, format!("rank {rank} reported step {}", m.step));
        }
        if rank != 0 {
            return; // rank 0 speaks for the job
        }
        let job = self.jobs.get_mut(&m.job_id).expect("held");
        job.row.last_step = m.step;
        job.progressed = true;
        job.row.last_loss = m.loss;
        if m.val_loss.is_some() {
            job.row.last_val_loss = m.val_loss;
        }
        if m.val_accuracy.is_some() {
            job.row.last_val_accuracy = m.val_accuracy;
        }
        if !m.val_sources.is_empty() {
            job.row.last_val_sources = m.val_sources.iter().map(SourceLossRow::from_proto).collect();
        }
        job.last_metrics = Some(m.clone());
        let now = now_ms();
        job.row.updated_at_ms = now;
        let ev = smelt_proto::v1::JobEvent {
            job_id: m.job_id.clone(),
            at_ms: now,
            body: Some(job_event::Body::Metrics(StepMetrics { rank, ..m.clone() })),
        };
        let _ = job.watch.send(ev);
        self.persist_job(&m.job_id);
        self.store.write(Op::Metric(MetricRow {
            job_id: m.job_id.clone(),
            attempt: m.attempt,
            step: m.step,
            loss: m.loss,
            val_loss: m.val_loss,
            val_accuracy: m.val_accuracy,
            grad_norm: m.grad_norm,
            lr: m.lr,
            tokens_per_s: m.tokens_per_s,
            mfu: m.mfu,
            at_ms: now,
            val_sources: m.val_sources.iter().map(SourceLossRow::from_proto).collect(),
        }));
    }

    /// Another worker of `job_id`'s gang that said it is draining, if any.
    fn draining_peer(&self, job_id: &str, worker_id: &str) -> Option<String> {
        let job = self.jobs.get(job_id)?;
        job.ranks.iter().find(|w| w.as_str() != worker_id && self.workers.get(w.as_str()).is_some_and(|r| r.draining)).cloned()
    }

    fn on_done(&mut self, worker_id: &str, d: AssignmentDone) {
        if self.wound_down(&d.job_id, worker_id, d.attempt) {
            info!(job_id = %d.job_id, attempt = d.attempt, worker_id = %worker_id, ok = d.ok, "a failed attempt's rank finished");
            return;
        }
        let Some(rank) = self.holds_rank(&d.job_id, d.attempt, worker_id) else {
            debug!(worker_id = %worker_id, job_id = %d.job_id, attempt = d.attempt, "done for an attempt not held; ignored");
            return;
        };
        if !d.ok && d.draining {
            // the worker is shutting down: it takes no new work (its status says Busy until its
            // run ends, so this is the first the coordinator hears of the drain), and the job
            // resumes elsewhere or later without spending a restart
            if let Some(w) = self.workers.get_mut(worker_id) {
                if !w.draining {
                    w.draining = true;
                    info!(worker_id = %worker_id, "worker draining; it takes no new assignment");
                }
            }
            self.fail_attempt(&d.job_id, Fault::Drained { worker: worker_id, reported_by: worker_id });
            return;
        }
        if !d.ok {
            // A rank whose peer's worker is draining failed because that peer stopped its run
            // (rank 0 closing the ring reaches rank 1 before rank 0's own report): the drain's
            // doing, so it spends no restart either, whichever report comes first.
            if let Some(peer) = self.draining_peer(&d.job_id, worker_id) {
                info!(job_id = %d.job_id, attempt = d.attempt, worker_id = %worker_id, draining = %peer, error = %d.error, "a rank failed beside a draining peer; counted as the drain");
                self.fail_attempt(&d.job_id, Fault::Drained { worker: &peer, reported_by: worker_id });
                return;
            }
            let error = if d.error.is_empty() { "no reason given".to_string() } else { d.error.clone() };
            self.fail_attempt(&d.job_id, Fault::Failed { worker: worker_id, error, transient: d.transient });
            return;
        }
        info!(job_id = %d.job_id, attempt = d.attempt, rank, worker_id = %worker_id, final_step = d.final_step, "rank finished");
        // a worker that re-registered without this assignment has now reported it: its idle
        // statuses while its peers still run are no longer a rank it forgot
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.orphan_statuses = None;
        }
        let job = self.jobs.get_mut(&d.job_id).expect("held");
        if let Some(x) = job.done.get_mut(rank as usize) {
            *x = true;
        }
        if rank == 0 {
            job.row.last_step = d.final_step;
            job.row.final_models = d.final_models.clone();
        }
        let all = job.done.iter().all(|x| *x);
        self.persist_assignment(&d.job_id, d.attempt, rank, worker_id, "done");
        if all {
            self.succeed(&d.job_id);
        } else if self.workers.get(worker_id).is_some_and(|w| w.row.job_id == d.job_id && w.row.state == WorkerState::Busy) {
            // a finished rank's worker takes other work while its peers end (rank 0 may upload
            // its last checkpoints for minutes through a store outage): it was held until the
            // last rank, idle but shown busy
            self.release_worker(worker_id, WorkerState::Idle);
            self.schedule();
        }
    }
}
