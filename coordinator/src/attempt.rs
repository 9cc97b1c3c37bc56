//! The end of an attempt: success, failure (restart or fail), cancellation. Each one releases the
//! gang, closes the attempt's rendezvous and records why.

use std::time::{Duration, Instant};

use smelt_proto::v1::{coordinator_message, Abort, JobState, WorkerState};
use tracing::warn;

use crate::state::{is_placed, FailedAttempt, State};

/// How a worker's report of a run it was told to stop begins (`worker::runner::run_assignment`).
const STOPPED_PREFIX: &str = "stopped: ";

/// Why an attempt is ending, for the worker at fault.
pub enum Fault<'a> {
    /// The worker's lease ended (it has already been marked lost).
    Lost { worker: &'a str, why: &'a str },
    /// A rank reported failure, or the worker came back without its assignment. `transient`:
    /// the rank took it for the infrastructure's (a store outage), not the job's.
    Failed { worker: &'a str, error: String, transient: bool },
    /// A rank's worker stopped the run because it is shutting down (SIGTERM): no fault of the
    /// job, so the next attempt spends no restart (as a preemption). `reported_by`: the worker
    /// whose report of its run's end this is, the draining one itself or a peer whose run the
    /// drain broke (the draining one still stopping: as rank 0 it is waited for, as it saves
    /// its rescue checkpoint).
    Drained { worker: &'a str, reported_by: &'a str },
}

/// The wait before the next attempt after `n` transient failures in a row: 5 s, doubling, at
/// most a minute.
pub(crate) const TRANSIENT_BACKOFF_FIRST: std::time::Duration = std::time::Duration::from_secs(5);
const TRANSIENT_BACKOFF_MOST: std::time::Duration = std::time::Duration::from_secs(60);

fn transient_backoff(n: u32) -> std::time::Duration {
    TRANSIENT_BACKOFF_FIRST.saturating_mul(1 << n.saturating_sub(1).min(8)).min(TRANSIENT_BACKOFF_MOST)
}

/// `d` in the largest unit that says it whole: "15 min", "90 s", "1 h".
fn spoken_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

impl State {
    /// Sends Abort to every rank of the job's current attempt except `skip`, frees all of its
    /// workers (a lost one stays lost) and aborts its rendezvous.
    pub(crate) fn release_gang(&mut self, job_id: &str, reason: &str, skip: Option<&str>, assignment_state: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        let attempt = job.row.attempt;
        let ranks = job.ranks.clone();
        let done = std::mem::take(&mut job.done);
        job.started.clear();
        for (rank, wid) in ranks.iter().enumerate() {
            let still_ours = self.workers.get(wid).is_some_and(|w| w.row.job_id == job_id && w.row.attempt == attempt);
            if Some(wid.as_str()) != skip {
                self.send_to_worker(
                    wid,
                    coordinator_message::Body::Abort(Abort {
                        job_id: job_id.to_string(),
                        attempt,
                        reason: reason.to_string(),
                    }),
                );
                let state = if done.get(rank).copied().unwrap_or(false) { "done" } else { assignment_state };
                self.persist_assignment(job_id, attempt, rank as u32, wid, state);
            }
            if still_ours && self.workers.get(wid).is_some_and(|w| w.row.state == WorkerState::Busy) {
                self.release_worker(wid, WorkerState::Idle);
            }
        }
        self.abort_rendezvous(job_id, attempt, reason);
    }

    /// All ranks finished: the job succeeded.
    pub fn succeed(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get(job_id) else { return };
        let (attempt, step, n) = (job.row.attempt, job.row.last_step, job.ranks.len());
        let ranks = job.ranks.clone();
        for (rank, wid) in ranks.iter().enumerate() {
            self.persist_assignment(job_id, attempt, rank as u32, wid, "done");
            if self.workers.get(wid).is_some_and(|w| w.row.job_id == job_id && w.row.attempt == attempt) {
                self.release_worker(wid, WorkerState::Idle);
            }
        }
        self.abort_rendezvous(job_id, attempt, "the attempt finished");
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.row.error.clear();
        }
        self.transition_or_log(job_id, JobState::Succeeded, format!("all {n} ranks finished at step {step}"));
        // its workers are free: a job queued behind it starts now
        self.schedule();
    }

    /// The current attempt failed: abort the other ranks, then restart from the latest
    /// checkpoint while restarts remain, or fail the job.
    pub fn fail_attempt(&mut self, job_id: &str, fault: Fault<'_>) {
        let Some(job) = self.jobs.get(job_id) else { return };
        if !is_placed(job.row.state) {
            return;
        }
        let (attempt, reached) = (job.row.attempt, job.row.last_step);
        let (culprit, cause, culprit_state) = match &fault {
            Fault::Lost { worker, why } => (*worker, format!("worker {worker} lost ({why})"), "lost"),
            Fault::Failed { worker, error, .. } => {
                let rank = job.ranks.iter().position(|w| w == worker).unwrap_or(0);
                (*worker, format!("rank {rank} on worker {worker} failed: {error}"), "failed")
            }
            Fault::Drained { worker, .. } => {
                let rank = job.ranks.iter().position(|w| w == worker).unwrap_or(0);
                (*worker, format!("rank {rank}'s worker {worker} is shutting down"), "drained")
            }
        };
        if let Some(rank) = job.ranks.iter().position(|w| w == culprit) {
            self.persist_assignment(job_id, attempt, rank as u32, culprit, culprit_state);
        }
        warn!(job_id = %job_id, attempt, worker_id = %culprit, cause = %cause, "attempt failed");
        // the worker whose run has ended is not waited for; a rank 0 still stopping for its
        // drain saves a rescue checkpoint like any surviving rank 0
        let ended = match &fault {
            Fault::Drained { reported_by, .. } => *reported_by,
            _ => culprit,
        };
        let rank0 = self.rescuing_rank0(job_id, Some(ended));
        self.release_gang(job_id, &format!("attempt {attempt} aborted: {cause}"), Some(culprit), "aborted");
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        // A failure that repeats (a missing file, a model that does not fit its data, a loss that
        // diverges at the same step: training resumes exactly) would spend every restart left on
        // the same error. The second time in a row, with no step gained, ends the job.
        let error = match &fault {
            // a run stopped from outside (a drain, an abort) says the same words every time; a
            // store that refuses connections says them until it is back
            Fault::Failed { error, transient: false, .. } if !error.starts_with(STOPPED_PREFIX) => Some(error.clone()),
            Fault::Failed { .. } => None,
            Fault::Lost { .. } | Fault::Drained { .. } => None, // the machine's doing, not the job's
        };
        // a transient failure's next attempt waits, longer each time in a row: attempts are not
        // started seconds apart on an outage that lasts a minute; and for the outage's first
        // `outage_grace` a job that has trained spends no restart, so an outage does not fail a
        // job that has restarts for its own faults
        let grace = self.outage_grace;
        let backoff = if matches!(fault, Fault::Failed { transient: true, .. }) {
            // an attempt that trained on since the last one starts the waits afresh
            if reached > job.transient_reached {
                job.transient_failures = 0;
            }
            let now = Instant::now();
            if job.transient_failures == 0 {
                job.transient_since = Some(now);
            }
            job.transient_reached = reached;
            job.transient_failures += 1;
            let wait = transient_backoff(job.transient_failures);
            job.retry_after = Some(now + wait);
            // a store this job has never worked with (no step, no checkpoint) is more often a
            // wrong endpoint than an outage: its failures spend restarts as before, and the
            // job fails as soon as they are spent
            let worked = job.progressed || job.latest_checkpoint.is_some() || reached > 0 || job.row.start_step > 0;
            let free = worked && job.transient_since.is_some_and(|since| now.duration_since(since) < grace);
            Some((wait, free))
        } else {
            job.transient_failures = 0;
            job.transient_since = None;
            job.retry_after = None;
            None
        };
        let free = backoff.is_some_and(|(_, free)| free);
        // the same words at the same step: a transient error (a store outage) that comes back
        // elsewhere in the run, or before a resumed attempt has caught up, is restarted as ever
        let repeated = match (&job.last_failure, &error) {
            (Some(before), Some(now)) if same_words(&before.error, now) && reached == before.reached && job.row.restarts < job.row.max_restarts => {
                Some(before.clone())
            }
            _ => None,
        };
        job.last_failure = error.map(|error| FailedAttempt { attempt, error, reached });
        if let Some(before) = repeated {
            let left = job.row.max_restarts.saturating_sub(job.row.restarts);
            job.row.error = format!(
                "{cause}; not restarted: attempt {} failed the same way at the same step ({}), so it would repeat ({left} restart{} left unused)",
                before.attempt,
                before.reached,
                if left == 1 { "" } else { "s" }
            );
            let reason = job.row.error.clone();
            self.transition_or_log(job_id, JobState::Failed, reason);
            self.schedule();
            return;
        }
        if matches!(fault, Fault::Drained { .. }) {
            // as a preemption: the job waits for workers and resumes, its restarts untouched
            self.requeue(job_id, rank0, attempt, &cause, " (no restart spent)");
            self.schedule();
            return;
        }
        if free || job.row.restarts < job.row.max_restarts {
            // only a job that restarts waits (a failed one has no next attempt to resume)
            let (next, from, waits) = self.next_attempt(job_id, rank0, attempt, !free);
            let after = match backoff {
                Some((wait, true)) => format!(
                    " in {} s (the failure looks transient: a store or network error; no restart spent for the first {} of an outage)",
                    wait.as_secs(),
                    spoken_duration(grace)
                ),
                Some((wait, false)) => format!(
                    " in {} s (the failure looks transient: a store or network error, but the outage has lasted over {}, so it spends a restart)",
                    wait.as_secs(),
                    spoken_duration(grace)
                ),
                None => String::new(),
            };
            let reason = if waits {
                format!("{cause}; restarting attempt {next}{after} once rank 0 ends it (from step {from}, or rank 0's rescue checkpoint)")
            } else {
                format!("{cause}; restarting attempt {next}{after} from step {from}")
            };
            self.transition_or_log(job_id, JobState::Restarting, reason);
            self.schedule();
        } else {
            let Some(job) = self.jobs.get_mut(job_id) else { return };
            let used = job.row.restarts;
            job.row.error = if job.row.max_restarts == 0 {
                format!("{cause}; the job allows no restarts")
            } else {
                format!("{cause}; all {used} restarts used")
            };
            let reason = job.row.error.clone();
            self.transition_or_log(job_id, JobState::Failed, reason);
            self.schedule();
        }
    }

    /// Sets up `job_id`'s next attempt without spending a restart (its gang released: a
    /// preemption, a drain) and moves it to Restarting: `cause`, where the next attempt resumes,
    /// then `note`.
    pub(crate) fn requeue(&mut self, job_id: &str, rank0: Option<(String, Duration)>, attempt: u32, cause: &str, note: &str) {
        let (next, from, waits) = self.next_attempt(job_id, rank0, attempt, false);
        let reason = if waits {
            format!("{cause}; attempt {next} resumes from rank 0's rescue checkpoint (or step {from}) when workers are free{note}")
        } else {
            format!("{cause}; attempt {next} resumes from step {from} when workers are free{note}")
        };
        self.transition_or_log(job_id, JobState::Restarting, reason);
    }

    /// Rank 0's worker of `job_id`'s current attempt when it will save a rescue checkpoint as
    /// the attempt ends: the job checkpoints (any model, pretraining or fine-tuning), and the
    /// worker is connected, is not `culprit` and had not finished. With the longest the next
    /// attempt waits for it: twice checkpoint.final_wait_s (its upload waits) and two leases.
    pub(crate) fn rescuing_rank0(&self, job_id: &str, culprit: Option<&str>) -> Option<(String, Duration)> {
        let job = self.jobs.get(job_id)?;
        let final_wait = smelt_jobspec::JobSpec::parse(&job.row.spec_toml)
            .ok()
            .filter(|s| s.checkpoint.every > 0)
            .map(|s| Duration::from_secs(s.checkpoint.final_wait_s))?;
        let w = job.ranks.first()?;
        let alive = self.workers.get(w).is_some_and(|r| r.conn.is_some() && r.row.state != WorkerState::Lost);
        (Some(w.as_str()) != culprit && !job.done.first().copied().unwrap_or(false) && alive)
            .then(|| (w.clone(), final_wait * 2 + self.lease_timeout * 2))
    }

    /// Sets up `job_id`'s next attempt after `attempt` ended (its gang released): from its
    /// newest checkpoint, progress rolled back there, and, when `rank0` is rescuing, waiting for
    /// it (its worker held Busy, not schedulable, until it reports the attempt done, is lost,
    /// or the wait runs out). `restart`: counts against max_restarts (a failure; a preemption
    /// does not). Returns (the next attempt, the step it starts from, whether it waits).
    pub(crate) fn next_attempt(&mut self, job_id: &str, rank0: Option<(String, Duration)>, attempt: u32, restart: bool) -> (u32, u64, bool) {
        if let Some((w, _)) = &rank0 {
            if let Some(r) = self.workers.get_mut(w) {
                if r.row.state == WorkerState::Idle {
                    r.row.state = WorkerState::Busy;
                }
            }
        }
        let Some(job) = self.jobs.get_mut(job_id) else { return (0, 0, false) };
        let waits = rank0.is_some();
        job.wind_down_until = rank0.as_ref().map(|(_, wait)| Instant::now() + *wait);
        job.winding_down = rank0.into_iter().map(|(w, _)| (w, attempt)).collect();
        if restart {
            job.row.restarts += 1;
        }
        job.row.attempt += 1;
        job.last_metrics = None;
        if let Some((step, uri)) = &job.latest_checkpoint {
            job.row.start_step = *step;
            job.row.resume_from = uri.clone();
        }
        // Progress rolls back to where the next attempt starts.
        job.row.last_step = job.row.start_step;
        job.ranks.clear();
        (job.row.attempt, job.row.start_step, waits)
    }

    /// A failed attempt's rank `worker` finished it (or was lost): the job stops waiting for it,
    /// and is placed again once none is left. Returns whether `worker` was one it waited for.
    pub fn wound_down(&mut self, job_id: &str, worker: &str, attempt: u32) -> bool {
        let Some(job) = self.jobs.get_mut(job_id) else { return false };
        let before = job.winding_down.len();
        job.winding_down.retain(|(w, a)| !(w == worker && *a == attempt));
        let was = job.winding_down.len() < before;
        if was {
            self.free_wound_down(worker);
            if self.jobs.get(job_id).is_some_and(|j| j.winding_down.is_empty()) {
                self.schedule();
            }
        }
        was
    }

    /// A worker held back while it ended a failed attempt is schedulable again (unless it took
    /// other work or was lost meanwhile).
    fn free_wound_down(&mut self, worker: &str) {
        if self.workers.get(worker).is_some_and(|w| w.row.state == WorkerState::Busy && w.row.job_id.is_empty()) {
            self.release_worker(worker, WorkerState::Idle);
        }
    }

    /// Jobs whose failed attempt's ranks did not all finish in time: placed without them.
    pub fn end_overdue_wind_downs(&mut self, now: Instant) {
        let mut freed = Vec::new();
        for job in self.jobs.values_mut() {
            if !job.winding_down.is_empty() && !job.winding_down_at(now) {
                warn!(job_id = %job.row.id, waiting_for = ?job.winding_down, "the failed attempt's ranks did not finish in time; placing the next attempt without them");
                freed.extend(job.winding_down.drain(..).map(|(w, _)| w));
            }
        }
        if !freed.is_empty() {
            for w in &freed {
                self.free_wound_down(w);
            }
            self.schedule();
        }
    }

    /// Cancels a job that has not finished: aborts its workers if placed.
    pub fn cancel_job(&mut self, job_id: &str, reason: &str) {
        let Some(job) = self.jobs.get(job_id) else { return };
        if is_placed(job.row.state) {
            self.release_gang(job_id, reason, None, "aborted");
        }
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.row.error = reason.to_string();
        }
        self.transition_or_log(job_id, JobState::Cancelled, reason.to_string());
        self.schedule();
    }
}

/// Whether two attempts' errors say the same thing, their durations aside: a store's client
/// reports how long its request took ("... in 804.763µs"), which differs every attempt even
/// though the cause (a bucket that does not exist) does not.
fn same_words(a: &str, b: &str) -> bool {
    without_durations(a) == without_durations(b)
}

/// `s` with every number followed by a time unit (ns, µs, us, ms, s, m, h, min, then not a
/// letter) replaced by `#`. Other numbers (steps, ranks, ports) stay: they can tell causes apart.
fn without_durations(s: &str) -> String {
    const UNITS: [&str; 8] = ["min", "ns", "µs", "us", "ms", "s", "m", "h"];
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        let prev_is_word = out.chars().next_back().is_some_and(|p: char| p.is_alphanumeric() || p == '_');
        if c.is_ascii_digit() && !prev_is_word {
            let len = rest.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(rest.len());
            let after = &rest[len..];
            let unit = UNITS.iter().find(|u| after.strip_prefix(**u).is_some_and(|t| !t.starts_with(char::is_alphabetic)));
            if let Some(u) = unit {
                out.push('#');
                out.push_str(u);
                rest = &after[u.len()..];
            } else {
                out.push_str(&rest[..len]);
                rest = after;
            }
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_not_what_makes_errors_differ() {
        let a = "checkpoint store: Generic S3 error: error sending request in 804.763µs: connection refused";
        let b = "checkpoint store: Generic S3 error: error sending request in 631.426µs: connection refused";
        assert!(same_words(a, b));
        assert!(same_words("timed out after 5s (12ms idle)", "timed out after 30s (7ms idle)"));
        // numbers that are not durations still tell errors apart
        assert!(!same_words("rank 1 did not answer", "rank 2 did not answer"));
        assert!(!same_words("loss is not finite at step 40", "loss is not finite at step 41"));
        assert!(!same_words("127.0.0.1:7301 refused", "127.0.0.1:7302 refused"));
        // a number inside a word, or a unit that is the start of a word, is not a duration
        assert!(!same_words("job-000001 failed", "job-000002 failed"));
        assert!(!same_words("10 steps", "11 steps"));
        assert_eq!(without_durations("in 3.5ms, 2 min and 4h; sha256 e3b0c44"), "in #ms, 2 min and #h; sha256 e3b0c44");
    }
}
