//! The shared handle: the state behind one lock, the store's queue and the shutdown signal.
//! Restoring from the store happens here.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smelt_proto::v1::{JobState, WorkerState};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::attempt::Fault;
use crate::error::Result;
use crate::state::{is_placed, JobRec, State, WorkerRec};
use crate::store::{Loaded, StoreHandle};

#[derive(Clone)]
pub struct Coordinator {
    state: Arc<Mutex<State>>,
    store: StoreHandle,
    stop: Arc<watch::Sender<bool>>,
}

fn id_number(id: &str) -> Option<u64> {
    id.rsplit('-').next()?.parse().ok()
}

impl Coordinator {
    /// Rebuilds the state from what the store holds. Jobs keep their states; workers get a fresh
    /// lease each (they have `lease_timeout`, and the longest a worker waits between reconnect
    /// attempts, to re-attach before they and their jobs are lost).
    pub fn restore(loaded: Loaded, store: StoreHandle, heartbeat_interval: Duration, lease_timeout: Duration, outage_grace: Duration) -> Self {
        let now = Instant::now();
        let mut jobs = HashMap::new();
        let mut next_job = 1;
        for (i, row) in loaded.jobs.into_iter().enumerate() {
            let seq = id_number(&row.id).unwrap_or(i as u64);
            next_job = next_job.max(seq + 1);
            jobs.insert(row.id.clone(), JobRec::new(row, seq));
        }
        for ev in loaded.events {
            if let (Some(job), Some(e)) = (jobs.get_mut(&ev.job_id), ev.to_event()) {
                job.events.push(e);
            }
        }
        for c in loaded.checkpoints {
            if let Some(job) = jobs.get_mut(&c.job_id) {
                if job.latest_checkpoint.as_ref().is_none_or(|(s, _)| c.step >= *s) {
                    job.latest_checkpoint = Some((c.step, c.uri));
                }
            }
        }
        for a in &loaded.assignments {
            let Some(job) = jobs.get_mut(&a.job_id) else { continue };
            if !is_placed(job.row.state) || a.attempt != job.row.attempt {
                continue;
            }
            let r = a.rank as usize;
            if job.ranks.len() <= r {
                job.ranks.resize(r + 1, String::new());
                job.done.resize(r + 1, false);
                job.started.resize(r + 1, false);
            }
            job.ranks[r] = a.worker_id.clone();
            job.done[r] = a.state == "done";
            job.started[r] = job.row.state == JobState::Running;
        }
        let mut workers = BTreeMap::new();
        let mut next_worker = 1;
        for row in loaded.workers {
            next_worker = next_worker.max(id_number(&row.id).unwrap_or(0) + 1);
            // a worker backing off (up to MAX_RECONNECT_BACKOFF) while the coordinator was down
            // gets that long on top of its lease to come back
            let mut rec = WorkerRec::new(row, now + smelt_proto::MAX_RECONNECT_BACKOFF);
            rec.logs_received = loaded.logs_received.get(&rec.row.id).copied().unwrap_or(0);
            rec.logs_committed = rec.logs_received;
            workers.insert(rec.row.id.clone(), rec);
        }
        let restored_workers = workers.len();
        let mut st = State {
            store: store.clone(),
            jobs,
            workers,
            rendezvous: HashMap::new(),
            next_job,
            next_worker,
            next_gen: 1,
            heartbeat_interval,
            lease_timeout,
            outage_grace,
            worker_flag: String::new(),
            shutting_down: false,
            // a file with workers: they are on their way back
            preempt_after: if restored_workers > 0 { now + lease_timeout } else { now },
        };
        st.reconcile_after_restore();
        let running = st.jobs.values().filter(|j| is_placed(j.row.state)).count();
        info!(jobs = st.jobs.len(), placed_jobs = running, workers = st.workers.len(), "state restored");
        let (stop, _) = watch::channel(false);
        Coordinator { state: Arc::new(Mutex::new(st)), store, stop: Arc::new(stop) }
    }

    /// Runs `f` under the lock. Never hold it across an await: `f` is synchronous.
    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// Waits until every change made so far is committed to the store.
    pub async fn flush(&self) -> Result<()> {
        self.store.flush().await
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Stops acting on the cluster: from here on closing streams change nothing, so the
    /// workers and jobs stay as they are for the next coordinator on the same file.
    pub fn begin_shutdown(&self) {
        self.with(|st| {
            st.shutting_down = true;
            for w in st.workers.values_mut() {
                if let Some(c) = w.conn.take() {
                    let _ = c.tx.send(Err(tonic::Status::unavailable("coordinator shutting down")));
                }
            }
            st.abort_all_rendezvous("coordinator shutting down");
        });
        let _ = self.stop.send(true);
    }
}

impl State {
    /// Makes the restored rows agree: a worker is busy exactly when it holds a rank of a placed
    /// attempt, and every placed attempt has all of its ranks.
    fn reconcile_after_restore(&mut self) {
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        for id in ids {
            let w = &self.workers[&id];
            if w.row.state == WorkerState::Busy && self.holds_rank(&w.row.job_id.clone(), w.row.attempt, &id).is_none()
            {
                warn!(worker_id = %id, job_id = %w.row.job_id, "restored worker's assignment is stale; idle");
                self.release_worker(&id, WorkerState::Idle);
            }
        }
        let broken: Vec<String> = self
            .jobs
            .values()
            .filter(|j| is_placed(j.row.state))
            .filter(|j| {
                j.ranks.len() != j.row.world_size as usize
                    || j.ranks.iter().any(|w| w.is_empty() || !self.workers.contains_key(w))
            })
            .map(|j| j.row.id.clone())
            .collect();
        for id in broken {
            self.fail_attempt(
                &id,
                Fault::Failed {
                    worker: "(unknown)",
                    error: "the attempt's assignments were incomplete in the store".into(),
                    transient: false,
                },
            );
        }
    }
}
