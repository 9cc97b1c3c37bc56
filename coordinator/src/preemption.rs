//! Priority preemption: when the job at the head of the CPU queue does not fit, running CPU jobs
//! with a strictly lower priority give their workers back, if that makes it fit (GPU jobs are
//! not preempted yet: see `preempt_for_heads`). Only jobs that checkpoint (and whose spec does not say `[cluster] preemptible = false`)
//! are preempted: their rank 0 saves its last completed step as
//! the attempt ends (a rescue checkpoint), and the job waits in its queue to resume from it,
//! losing the step in flight. A preemption is not a failure: it uses none of `max_restarts`.
//!
//! Victims are the lowest priority first, the youngest first among equals (the least work
//! redone if a checkpoint were missing), and only as many as the head needs. Workers already on
//! their way back (a preempted or failed attempt's rank 0 saving its checkpoint) count as free,
//! so a head waiting for them preempts nothing more.

use std::cmp::Reverse;
use std::time::Instant;

use smelt_proto::v1::{DeviceClass, JobState, WorkerState};
use tracing::info;

use crate::state::{device_class_name, is_placed, is_waiting, State};

/// A placed job, as preemption sees it.
#[derive(Debug, Clone)]
pub struct Placed<'a> {
    pub id: &'a str,
    pub priority: i32,
    pub created_at_ms: i64,
    pub seq: u64,
    /// Workers it would give back.
    pub workers: usize,
    /// It checkpoints (else preempting it would lose its work) and its spec allows it
    /// (`[cluster] preemptible`, true by default); never chosen otherwise.
    pub preemptible: bool,
}

/// The jobs to preempt so that a head of `priority` needing `needed` workers fits, `available`
/// being free already (idle or on their way back); none when no choice of them makes it fit.
pub fn victims<'a>(priority: i32, needed: usize, available: usize, placed: &[Placed<'a>]) -> Vec<&'a str> {
    if needed <= available {
        return Vec::new();
    }
    // a job that would free no worker (its hosts draining or gone) is never worth stopping
    let mut candidates: Vec<&Placed> = placed.iter().filter(|p| p.preemptible && p.priority < priority && p.workers > 0).collect();
    candidates.sort_by_key(|p| (p.priority, Reverse(p.created_at_ms), Reverse(p.seq)));
    let mut freed = available;
    let mut out = Vec::new();
    for p in candidates {
        if freed >= needed {
            break;
        }
        freed += p.workers;
        out.push(p.id);
    }
    if freed >= needed {
        out
    } else {
        Vec::new()
    }
}

impl State {
    /// After a scheduling pass: for each device class whose queue head did not fit, preempts
    /// what makes it fit. Returns whether anything was preempted.
    pub(crate) fn preempt_for_heads(&mut self) -> bool {
        let now = Instant::now();
        if now < self.preempt_after {
            return false;
        }
        let mut chosen: Vec<(String, String, i32)> = Vec::new();
        // CPU jobs only: a GPU rank stopped by an abort is nearly always mid-step, its NCCL
        // communicator aborted, and whether its weights can then be copied off the device for a
        // rescue checkpoint has not been checked on a card (worker/src/checkpointing.rs,
        // `failed_before_update`), so preempting it could cost every step since its last
        // periodic checkpoint
        for class in [DeviceClass::Cpu] {
            let head = self
                .jobs
                .values()
                .filter(|j| is_waiting(j.row.state) && j.row.device_class == class)
                .min_by_key(|j| (Reverse(j.row.priority), j.row.created_at_ms, j.seq));
            // a head waiting for its own failed attempt's rank 0 waits for that, not for workers
            let Some(head) = head.filter(|h| !h.winding_down_at(now)) else { continue };
            // a worker that will take work again: connected, not draining, not lost
            let will_serve = |w: &str| self.workers.get(w).is_some_and(|r| r.conn.is_some() && !r.draining && r.row.state != WorkerState::Lost);
            let idle = self.workers.values().filter(|w| w.row.device_class == class && w.schedulable()).count();
            let returning = self
                .jobs
                .values()
                .flat_map(|j| j.winding_down.iter())
                .filter(|(w, _)| {
                    will_serve(w) && self.workers.get(w).is_some_and(|r| r.row.device_class == class && r.row.state == WorkerState::Busy && r.row.job_id.is_empty())
                })
                .count();
            let (needed, available) = (head.row.world_size as usize, idle + returning);
            if needed <= available {
                continue; // it fits once those are back (this runs at every lease check)
            }
            let placed: Vec<Placed> = self
                .jobs
                .values()
                // lower priority only: each is a spec to read
                .filter(|j| is_placed(j.row.state) && j.row.device_class == class && j.row.priority < head.row.priority)
                .map(|j| Placed {
                    id: &j.row.id,
                    priority: j.row.priority,
                    created_at_ms: j.row.created_at_ms,
                    seq: j.seq,
                    // only the workers that will take work again (not draining, lost or gone)
                    workers: j.ranks.iter().filter(|w| will_serve(w)).count(),
                    preemptible: smelt_jobspec::JobSpec::parse(&j.row.spec_toml).is_ok_and(|s| s.checkpoint.every > 0 && s.cluster.preemptible),
                })
                .collect();
            for v in victims(head.row.priority, needed, available, &placed) {
                chosen.push((v.to_string(), head.row.id.clone(), head.row.priority));
            }
        }
        for (victim, by, priority) in &chosen {
            self.preempt(victim, by, *priority);
        }
        !chosen.is_empty()
    }

    /// Ends `job_id`'s attempt for `by` and puts it back in its queue, to resume from its newest
    /// checkpoint (rank 0's rescue checkpoint of this attempt, which the next attempt waits for).
    fn preempt(&mut self, job_id: &str, by: &str, by_priority: i32) {
        let Some(job) = self.jobs.get(job_id) else { return };
        let (attempt, priority, class) = (job.row.attempt, job.row.priority, job.row.device_class);
        let cause = format!("preempted by {by} (priority {by_priority} > {priority})");
        info!(job_id = %job_id, attempt, by = %by, class = device_class_name(class), "preempting");
        let rank0 = self.rescuing_rank0(job_id, None);
        self.release_gang(job_id, &format!("attempt {attempt} {cause}"), None, "preempted");
        let (next, from, waits) = self.next_attempt(job_id, rank0, attempt, false);
        let reason = if waits {
            format!("{cause}; attempt {next} resumes from rank 0's rescue checkpoint (or step {from}) when workers are free")
        } else {
            format!("{cause}; attempt {next} resumes from step {from} when workers are free")
        };
        self.transition_or_log(job_id, JobState::Restarting, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(id: &str, priority: i32, created: i64, workers: usize, preemptible: bool) -> Placed<'_> {
        Placed { id, priority, created_at_ms: created, seq: created as u64, workers, preemptible }
    }

    #[test]
    fn the_lowest_priority_and_youngest_go_first_and_only_as_many_as_needed() {
        let running = [
            placed("old-low", 0, 1, 2, true),
            placed("young-low", 0, 5, 2, true),
            placed("mid", 3, 2, 4, true),
            placed("same", 7, 0, 8, true),
            placed("higher", 9, 0, 8, true),
        ];
        // priority 7 needs 4, 1 free: the two priority-0 jobs, the youngest first
        assert_eq!(victims(7, 4, 1, &running), ["young-low", "old-low"]);
        // 2 needed, 1 free: the youngest low one suffices
        assert_eq!(victims(7, 2, 1, &running), ["young-low"]);
        // enough free already: nothing
        assert!(victims(7, 3, 3, &running).is_empty());
        // 9 needed: every lower-priority job (2 + 2 + 4 = 8) and 1 free make it
        assert_eq!(victims(7, 9, 1, &running), ["young-low", "old-low", "mid"]);
        // 10 needed: not even all of them make it fit, so none is disturbed
        assert!(victims(7, 10, 1, &running).is_empty());
        // equal and higher priorities are never preempted
        assert!(victims(0, 2, 0, &running).is_empty());
        // a job whose workers would not come back (draining, gone) frees nothing: skipped
        let draining = [placed("young-draining", 0, 9, 0, true), placed("old", 0, 1, 2, true)];
        assert_eq!(victims(7, 2, 0, &draining), ["old"]);
    }

    #[test]
    fn a_job_that_is_not_preemptible_is_never_chosen() {
        let running = [placed("no-ckpt", 0, 9, 2, false), placed("ckpt", 1, 1, 2, true)];
        assert_eq!(victims(5, 2, 0, &running), ["ckpt"]);
        assert!(victims(5, 4, 0, &running).is_empty());
    }
}
