//! Gang scheduling: a waiting (queued or restarting) job gets exactly `world_size` idle workers of
//! its device class at once, or nothing.
//!
//! Order: priority (higher first), then age (older first), then submission order. The order is
//! strict within a device class: when the job at the head of a class's queue does not fit, the
//! jobs behind it wait too, so a big job is never starved by a stream of small ones. Device
//! classes are independent queues: a CUDA job waiting never holds up CPU jobs.
//! A head that does not fit may preempt running jobs of lower priority that checkpoint
//! (`preemption.rs`); a CPU head that cannot start even so lets the jobs behind it that would
//! give their workers back to it use the idle workers meanwhile (`backfill.rs`).
//! A queued job that needs more workers than its class has connected (`State::outsized`) holds
//! no place until enough have joined: it could not start however long the others waited, and
//! the workers there would sit idle behind it.
//!
//! Ranks follow (hostname, device_index, worker id), so ranks on one host are neighbours.

use std::cmp::Reverse;

use smelt_proto::v1::{coordinator_message, Assignment, DeviceClass, JobState, WorkerState};
use tracing::info;

use crate::state::{device_class_name, is_waiting, JobRec, State};

/// One gang to place: the job and its workers by rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job_id: String,
    pub workers: Vec<String>,
    /// Backfilled behind this queue head (`backfill.rs`), or placed in queue order.
    pub behind: Option<String>,
}

/// A job waiting for workers, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Waiting<'a> {
    pub id: &'a str,
    pub device_class: DeviceClass,
    pub priority: i32,
    pub created_at_ms: i64,
    pub seq: u64,
    pub world_size: u32,
}

/// An idle, connected worker.
#[derive(Debug, Clone)]
pub struct Idle<'a> {
    pub id: &'a str,
    pub device_class: DeviceClass,
    pub hostname: &'a str,
    pub device_index: u32,
}

/// Workers in rank order: by host, then device, then id, so ranks on one host are neighbours.
pub fn rank_order(idle: &mut [Idle<'_>]) {
    idle.sort_by(|a, b| (a.hostname, a.device_index, a.id).cmp(&(b.hostname, b.device_index, b.id)));
}

/// Decides which waiting jobs start now. Pure: the same inputs give the same placements.
pub fn plan(mut jobs: Vec<Waiting<'_>>, mut idle: Vec<Idle<'_>>) -> Vec<Placement> {
    jobs.sort_by_key(|j| (Reverse(j.priority), j.created_at_ms, j.seq));
    rank_order(&mut idle);
    let mut out = Vec::new();
    for class in [DeviceClass::Cpu, DeviceClass::Cuda] {
        let mut free: Vec<&Idle> = idle.iter().filter(|w| w.device_class == class).collect();
        for job in jobs.iter().filter(|j| j.device_class == class) {
            let n = job.world_size as usize;
            if n == 0 || n > free.len() {
                break; // strict order: nothing behind the head of the queue jumps it
            }
            let gang: Vec<String> = free.drain(..n).map(|w| w.id.to_string()).collect();
            out.push(Placement { job_id: job.id.to_string(), workers: gang, behind: None });
        }
    }
    out
}

impl State {
    /// Places every gang that can start now and sends their assignments.
    pub fn schedule(&mut self) {
        if self.shutting_down {
            return;
        }
        let now = std::time::Instant::now();
        let serving = self.workers_by_class();
        let jobs: Vec<Waiting> = self
            .jobs
            .values()
            // a job waiting out a transient failure's back-off is not placed yet, and holds no
            // place that would keep the workers of its class idle meanwhile; nor does one
            // bigger than its class's connected workers
            .filter(|j| is_waiting(j.row.state) && !j.backing_off_at(now) && !self.outsized(j, &serving, now))
            .map(|j| Waiting {
                id: &j.row.id,
                device_class: j.row.device_class,
                priority: j.row.priority,
                created_at_ms: j.row.created_at_ms,
                seq: j.seq,
                // a job waiting for its failed attempt's rank 0 to end it cannot be placed yet,
                // but keeps its place in its class's queue (no backfill behind it)
                world_size: if j.winding_down_at(now) || self.resume_source_settling(j) { u32::MAX } else { j.row.world_size },
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        let placements = plan(jobs, self.idle_workers().collect());
        for p in placements {
            self.place(p);
        }
        // a head that still does not fit may take lower-priority jobs' workers (preemption.rs);
        // those that come free at once are placed now, the rest as their ranks end
        if self.preempt_for_heads() {
            self.schedule();
        }
    }

    /// The workers each device class has, as far as a job too big for it is concerned: every
    /// one not lost (draining ones too: a rolling restart brings them back), and one lost less
    /// than a lease and the longest reconnect back-off ago (a broken stream marks a worker lost
    /// at once, and it re-registers within that). A blip does not make a job that needs every
    /// worker give up its place.
    pub(crate) fn workers_by_class(&self) -> std::collections::HashMap<DeviceClass, usize> {
        let now = std::time::Instant::now();
        let back_within = self.lease_timeout + smelt_proto::MAX_RECONNECT_BACKOFF;
        let mut n = std::collections::HashMap::new();
        for w in self.workers.values().filter(|w| w.row.state != WorkerState::Lost || now.saturating_duration_since(w.last_seen) < back_within) {
            *n.entry(w.row.device_class).or_insert(0) += 1;
        }
        n
    }

    /// Whether queued job `j` needs more workers than its class has (`serving`, from
    /// `workers_by_class`): it holds no place in its queue until they join. Only a job never
    /// placed, queued for longer than a lease (workers starting with it, `smelt up`'s, join
    /// within one, and the queue keeps its order meanwhile), and not while a restarted
    /// coordinator's workers are still coming back (`preempt_after`). A restarting job keeps
    /// its place: its gang existed, and a lost worker's replacement is on its way.
    pub(crate) fn outsized(&self, j: &JobRec, serving: &std::collections::HashMap<DeviceClass, usize>, now: std::time::Instant) -> bool {
        let waited_ms = crate::state::now_ms().saturating_sub(j.row.created_at_ms);
        now >= self.preempt_after
            && j.row.state == JobState::Queued
            && j.row.attempt <= 1
            && waited_ms > self.lease_timeout.as_millis() as i64
            && j.row.world_size as usize > serving.get(&j.row.device_class).copied().unwrap_or(0)
    }

    /// The workers that can take an assignment now, as the planners see them.
    pub(crate) fn idle_workers(&self) -> impl Iterator<Item = Idle<'_>> {
        self.workers.values().filter(|w| w.schedulable()).map(|w| Idle {
            id: &w.row.id,
            device_class: w.row.device_class,
            hostname: &w.row.hostname,
            device_index: w.row.device_index,
        })
    }

    /// Whether `j`, submitted to resume from another job, must wait for that job: a connected
    /// worker still runs or winds down one of its ranks (see `JobRec::resume_of`).
    fn resume_source_settling(&self, j: &JobRec) -> bool {
        let Some(src) = j.resume_of.as_deref().filter(|_| j.row.attempt == 1) else { return false };
        let now = std::time::Instant::now();
        self.jobs.get(src).is_some_and(|s| s.winding_down_at(now))
            || self.workers.values().any(|w| w.conn.is_some() && (w.row.job_id == src || w.reported_job == src))
    }

    pub(crate) fn place(&mut self, p: Placement) {
        let Some(job) = self.jobs.get_mut(&p.job_id) else { return };
        // a restart resumes from the newest checkpoint known now (a failed attempt's rescue
        // checkpoint may have come in after the failure)
        if job.row.attempt > 1 {
            if let Some((step, uri)) = job.latest_checkpoint.clone().filter(|(step, _)| *step > job.row.start_step) {
                job.row.start_step = step;
                job.row.resume_from = uri;
                job.row.last_step = step;
            }
        }
        // a first attempt resuming from another job's latest checkpoint: the newest recorded now
        let source = job.resume_of.clone().filter(|_| job.row.attempt == 1);
        let source_latest = source.and_then(|src| self.jobs.get(&src).and_then(|s| s.latest_checkpoint.clone()));
        let Some(job) = self.jobs.get_mut(&p.job_id) else { return };
        if let Some((step, uri)) = source_latest.filter(|(step, _)| *step > job.row.start_step) {
            info!(job_id = %job.row.id, from = %job.row.resume_from, to = %uri, step, "the job it resumes from checkpointed since: starting from its newest");
            job.row.start_step = step;
            job.row.resume_from = uri;
            job.row.last_step = step;
        }
        let (parent_checkpoint_store, parent_final_models) = self.parent_locations(&p.job_id);
        let Some(job) = self.jobs.get_mut(&p.job_id) else { return };
        let n = p.workers.len();
        job.row.backfilled = p.behind.is_some();
        job.ranks = p.workers.clone();
        job.started = vec![false; n];
        job.done = vec![false; n];
        let a = Assignment {
            job_id: job.row.id.clone(),
            attempt: job.row.attempt,
            rank: 0,
            world_size: job.row.world_size,
            spec_toml: job.row.spec_toml.clone(),
            start_step: job.row.start_step,
            resume_from: job.row.resume_from.clone(),
            job_created_at_ms: job.row.created_at_ms,
            parent_checkpoint_store,
            parent_final_models,
        };
        let class = job.row.device_class;
        for (rank, wid) in p.workers.iter().enumerate() {
            if let Some(w) = self.workers.get_mut(wid) {
                w.row.state = WorkerState::Busy;
                w.row.job_id = a.job_id.clone();
                w.row.attempt = a.attempt;
                w.row.rank = rank as u32;
            }
            self.persist_worker(wid);
            self.persist_assignment(&a.job_id, a.attempt, rank as u32, wid, "assigned");
            self.send_to_worker(wid, coordinator_message::Body::Assign(Assignment { rank: rank as u32, ..a.clone() }));
        }
        info!(
            job_id = %a.job_id,
            attempt = a.attempt,
            device_class = device_class_name(class),
            workers = %p.workers.join(","),
            start_step = a.start_step,
            backfilled_behind = p.behind.as_deref().unwrap_or(""),
            "job scheduled"
        );
        // the workers in rank order: "rank 0" for one, "ranks 0-3" for four
        let ranks = if n == 1 { "rank 0".to_string() } else { format!("ranks 0-{}, in that order", n - 1) };
        let reason = format!(
            "attempt {} placed on {} ({ranks}){}",
            a.attempt,
            p.workers.join(", "),
            if a.start_step > 0 { format!(", from step {}", a.start_step) } else { String::new() }
        );
        let reason = match &p.behind {
            Some(head) => format!("{reason}; backfilled behind {head}, which it gives its workers to when it can start"),
            None => reason,
        };
        self.transition_or_log(&a.job_id, JobState::Scheduled, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, priority: i32, created: i64, ws: u32) -> Waiting<'_> {
        Waiting {
            id,
            device_class: DeviceClass::Cpu,
            priority,
            created_at_ms: created,
            seq: created as u64,
            world_size: ws,
        }
    }

    fn idle(id: &str) -> Idle<'_> {
        Idle { id, device_class: DeviceClass::Cpu, hostname: "h", device_index: 0 }
    }

    #[test]
    fn priority_then_age() {
        let jobs = vec![job("low-old", 0, 1, 1), job("high-new", 5, 3, 1), job("high-old", 5, 2, 1)];
        let p = plan(jobs, vec![idle("w1"), idle("w2")]);
        let ids: Vec<_> = p.iter().map(|p| p.job_id.as_str()).collect();
        assert_eq!(ids, ["high-old", "high-new"]);
    }

    #[test]
    fn gangs_are_all_or_nothing_and_strict() {
        // The head needs 3, only 2 are idle: nothing starts, not even the small job behind it.
        let jobs = vec![job("big", 5, 1, 3), job("small", 0, 2, 1)];
        assert!(plan(jobs.clone(), vec![idle("w1"), idle("w2")]).is_empty());
        let p = plan(jobs, vec![idle("w3"), idle("w1"), idle("w2"), idle("w4")]);
        assert_eq!(p[0], Placement { job_id: "big".into(), workers: vec!["w1".into(), "w2".into(), "w3".into()], behind: None });
        assert_eq!(p[1], Placement { job_id: "small".into(), workers: vec!["w4".into()], behind: None });
    }

    #[test]
    fn device_classes_are_separate_queues() {
        let mut gpu = job("gpu", 9, 1, 2);
        gpu.device_class = DeviceClass::Cuda;
        let cpu = job("cpu", 0, 2, 1);
        let mut g0 = idle("g0");
        g0.device_class = DeviceClass::Cuda;
        let p = plan(vec![gpu, cpu], vec![g0, idle("c0")]);
        assert_eq!(p, vec![Placement { job_id: "cpu".into(), workers: vec!["c0".into()], behind: None }]);
    }
}
