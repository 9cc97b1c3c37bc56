//! Leases: a worker holds one while its heartbeat stream is open and it sends something at least
//! every `lease_timeout`. A worker whose stream breaks or goes silent is lost, and so is the
//! attempt it was running (see `attempt.rs`). After a coordinator restart every known worker's
//! lease starts afresh, so running jobs wait up to one lease for their workers to re-attach.

use std::time::{Duration, Instant};

use smelt_proto::v1::WorkerState;
use tracing::{info, warn};

use crate::attempt::Fault;
use crate::coordinator::Coordinator;
use crate::state::State;

impl State {
    /// Marks a worker lost and fails the attempt it was running.
    pub fn worker_lost(&mut self, worker_id: &str, why: &str) {
        let Some(w) = self.workers.get(worker_id) else { return };
        if w.row.state == WorkerState::Lost {
            return;
        }
        let (job_id, attempt) = (w.row.job_id.clone(), w.row.attempt);
        let held = (!job_id.is_empty()).then(|| self.holds_rank(&job_id, attempt, worker_id)).flatten().is_some();
        if w.draining && !held {
            // shut down on purpose (SIGTERM) and gone: not a failure
            info!(worker_id = %worker_id, why = %why, "worker exited (drained)");
        } else {
            warn!(worker_id = %worker_id, why = %why, job_id = %job_id, "worker lost");
        }
        self.release_worker(worker_id, WorkerState::Lost);
        // a failed attempt's rank that is lost too will not finish it: no job waits for it
        let waited: Vec<(String, u32)> = self
            .jobs
            .values()
            .flat_map(|j| j.winding_down.iter().filter(|(w, _)| w == worker_id).map(|(_, a)| (j.row.id.clone(), *a)))
            .collect();
        for (job, a) in waited {
            self.wound_down(&job, worker_id, a);
        }
        if held {
            self.fail_attempt(&job_id, Fault::Lost { worker: worker_id, why });
        }
        self.schedule();
    }

    /// Workers silent for longer than the lease timeout.
    pub fn expired(&self, now: Instant) -> Vec<(String, Duration)> {
        self.workers
            .values()
            .filter(|w| w.row.state != WorkerState::Lost)
            .filter_map(|w| {
                let quiet = now.saturating_duration_since(w.last_seen);
                (quiet > self.lease_timeout).then(|| (w.row.id.clone(), quiet))
            })
            .collect()
    }

    /// The coordinator itself was stalled for `gap` (its process stopped, its VM paused, its
    /// host starved it of CPU): the heartbeats of that time wait unread in its sockets, so the
    /// workers' silence is its own, not theirs. Every lease starts afresh, as after a restart,
    /// rather than healthy workers being declared lost and their jobs restarted or failed.
    pub fn coordinator_stalled(&mut self, now: Instant, gap: Duration) {
        warn!(
            stalled_ms = gap.as_millis() as u64,
            lease_timeout_ms = self.lease_timeout.as_millis() as u64,
            "the coordinator did not run for longer than half a lease (stopped, paused or starved of CPU): every worker's lease starts afresh"
        );
        for w in self.workers.values_mut() {
            w.last_seen = w.last_seen.max(now);
        }
    }

    pub fn expire_leases(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        for (id, quiet) in self.expired(now) {
            let why = format!(
                "no heartbeat for {} ms, lease timeout {} ms",
                quiet.as_millis(),
                self.lease_timeout.as_millis()
            );
            self.worker_lost(&id, &why);
        }
    }
}

/// Checks leases until shutdown, a few times per lease timeout.
pub async fn run_lease_checker(coord: Coordinator) {
    let (hb, lease) = coord.with(|st| (st.heartbeat_interval, st.lease_timeout));
    let period = (lease / 4).min(hb).max(Duration::from_millis(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = coord.shutdown_signal();
    let mut last_check = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => coord.with(|st| {
                // ticks come every `period` (at most a quarter lease): a gap of half a lease is
                // the coordinator's own stall, which must not be taken for the workers'
                let now = Instant::now();
                let gap = now.saturating_duration_since(last_check);
                last_check = now;
                if gap > lease / 2 {
                    st.coordinator_stalled(now, gap);
                }
                st.expire_leases(now);
                st.end_overdue_wind_downs(Instant::now());
                // every event that frees workers schedules; this also places what waited on a
                // time (a restored coordinator's hold on preemption running out)
                st.schedule();
            }),
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}
