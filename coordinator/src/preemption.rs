//! Priority preemption: when the job at the head of the CPU queue does not fit, running CPU jobs
//! with a strictly lower priority give their workers back, if that makes it fit (GPU jobs are
//! not preempted yet: see `preempt_for_heads`). Only jobs that checkpoint (and whose spec does not say `[cluster] preemptible = false`)
//! are preempted: their rank 0 saves its last completed step as
//! the attempt ends (a rescue checkpoint), and the job waits in its queue to resume from it,
//! losing the step in flight. A preemption is not a failure: it uses none of `max_restarts`.
//!
//! A job backfilled behind a head (`backfill.rs`) also gives way to any job ahead of it in the
//! queue, whatever their priorities.
//!
//! Victims are the lowest priority first, the youngest first among equals (the least work
//! redone if a checkpoint were missing), and only as many as the head needs. Workers already on
//! their way back (a preempted or failed attempt's rank 0 saving its checkpoint, the workers of
//! a job some of whose ranks have finished it) count as free, so a head waiting for them
//! preempts nothing more, and preempts what else it needs while they come back. A job that is
//! ending is never a victim. A head that nothing can make fit lets
//! jobs behind it backfill the idle workers.

use std::cmp::Reverse;
use std::time::Instant;

use smelt_proto::v1::{DeviceClass, WorkerState};
use tracing::info;

use crate::state::{device_class_name, is_placed, is_waiting, JobRec, QueueKey, State};

/// A placed job that would give way to the head (`gives_way`), as preemption sees it.
#[derive(Debug, Clone)]
pub struct Placed<'a> {
    pub id: &'a str,
    pub priority: i32,
    pub created_at_ms: i64,
    pub seq: u64,
    /// Workers it would give back.
    pub workers: usize,
    /// It was backfilled behind a job ahead of it: it gives its workers back first.
    pub backfilled: bool,
}

/// Whether running `job` gives its workers to a waiting `head` (queue key and priority): it
/// yields (it checkpoints, else preempting it would lose its work, and its spec allows it), and
/// it has a lower priority or was backfilled behind a job ahead of it in the queue.
pub fn gives_way(head: (QueueKey, i32), job: (QueueKey, i32), yields: bool, backfilled: bool) -> bool {
    yields && (job.1 < head.1 || (backfilled && head.0 < job.0))
}

/// The jobs to preempt so that a head needing `needed` workers fits, `available` being free
/// already (idle or on their way back), from the jobs that give way to it; none when no choice of
/// them makes it fit.
pub fn victims<'a>(needed: usize, available: usize, placed: &[Placed<'a>]) -> Vec<&'a str> {
    if needed <= available {
        return Vec::new();
    }
    // a job that would free no worker (its hosts draining or gone) is never worth stopping
    let mut candidates: Vec<&Placed> = placed.iter().filter(|p| p.workers > 0).collect();
    // backfilled jobs first: they hold workers the head could have had (so a backfill never
    // costs a job placed in order its workers), then the lowest priority, the youngest
    candidates.sort_by_key(|p| (!p.backfilled, p.priority, Reverse(p.created_at_ms), Reverse(p.seq)));
    let mut freed = available;
    let mut out: Vec<&Placed> = Vec::new();
    for p in candidates {
        if freed >= needed {
            break;
        }
        freed += p.workers;
        out.push(p);
    }
    if freed < needed {
        return Vec::new();
    }
    // a victim taken early may be spare once bigger ones were added: spare the last-chosen
    // (least preferred) first
    for i in (0..out.len()).rev() {
        if freed - out[i].workers >= needed {
            freed -= out[i].workers;
            out.remove(i);
        }
    }
    out.into_iter().map(|p| p.id).collect()
}

impl State {
    /// After a scheduling pass: for each device class whose queue head did not fit, preempts
    /// what makes it fit, or, when nothing can, backfills behind it. Returns whether anything
    /// was preempted.
    pub(crate) fn preempt_for_heads(&mut self) -> bool {
        let now = Instant::now();
        if now < self.preempt_after {
            return false;
        }
        let mut chosen: Vec<(String, String, i32)> = Vec::new();
        let mut stuck: Vec<String> = Vec::new();
        let serving = self.workers_by_class();
        // CPU jobs only: a GPU rank stopped by an abort is nearly always mid-step, its NCCL
        // communicator aborted, and whether its weights can then be copied off the device for a
        // rescue checkpoint has not been checked on a card (worker/src/checkpointing.rs,
        // `failed_before_update`), so preempting it could cost every step since its last
        // periodic checkpoint
        for class in [DeviceClass::Cpu] {
            let head = self
                .jobs
                .values()
                .filter(|j| is_waiting(j.row.state) && j.row.device_class == class && !j.backing_off_at(now) && !self.outsized(j, &serving, now))
                .min_by_key(|j| (Reverse(j.row.priority), j.row.created_at_ms, j.seq));
            // a head waiting for its own failed attempt's rank 0 waits for that, not for workers
            let Some(head) = head.filter(|h| !h.winding_down_at(now)) else { continue };
            // a worker that will take work again: connected, not draining, not lost
            let will_serve = |w: &str| self.workers.get(w).is_some_and(|r| r.conn.is_some() && !r.draining && r.row.state != WorkerState::Lost);
            let idle = self.idle_workers().filter(|w| w.device_class == class).count();
            let returning = self
                .jobs
                .values()
                .flat_map(|j| j.winding_down.iter())
                .filter(|(w, _)| {
                    will_serve(w) && self.workers.get(w).is_some_and(|r| r.row.device_class == class && r.row.state == WorkerState::Busy && r.row.job_id.is_empty())
                })
                .count();
            // a job some of whose ranks have finished it is ending: the workers of its ranks
            // still running are on their way back (a gang's ranks report one by one; without
            // this a head could preempt a job in the moment between two of them). A finished
            // rank's worker is idle at once, counted above, or already runs another job.
            let ending = |j: &JobRec| is_placed(j.row.state) && j.done.iter().any(|d| *d);
            let finishing = self
                .jobs
                .values()
                .filter(|j| j.row.device_class == class && ending(j))
                .flat_map(|j| j.ranks.iter().map(move |w| (j.row.id.as_str(), w)))
                .filter(|(job, w)| will_serve(w) && self.workers.get(w.as_str()).is_some_and(|r| !r.schedulable() && r.row.job_id == *job))
                .count();
            let (needed, available) = (head.row.world_size as usize, idle + returning + finishing);
            if needed <= available {
                continue; // it fits once those are back (this runs at every lease check)
            }
            let head_is = (head.queue_key(), head.row.priority);
            let placed: Vec<Placed> = self
                .jobs
                .values()
                .filter(|j| is_placed(j.row.state) && j.row.device_class == class && !ending(j))
                .filter(|j: &&JobRec| gives_way(head_is, (j.queue_key(), j.row.priority), j.yields, j.row.backfilled))
                .map(|j| Placed {
                    id: &j.row.id,
                    priority: j.row.priority,
                    created_at_ms: j.row.created_at_ms,
                    seq: j.seq,
                    // only the workers that will take work again (not draining, lost or gone)
                    workers: j.ranks.iter().filter(|w| will_serve(w)).count(),
                    backfilled: j.row.backfilled,
                })
                .collect();
            let chose = victims(needed, available, &placed);
            if chose.is_empty() {
                stuck.push(head.row.id.clone());
            }
            for v in chose {
                chosen.push((v.to_string(), head.row.id.clone(), head.row.priority));
            }
        }
        for (victim, by, priority) in &chosen {
            self.preempt(victim, by, *priority);
        }
        for head in &stuck {
            self.backfill_behind(head);
        }
        !chosen.is_empty()
    }

    /// Ends `job_id`'s attempt for `by` and puts it back in its queue, to resume from its newest
    /// checkpoint (rank 0's rescue checkpoint of this attempt, which the next attempt waits for).
    fn preempt(&mut self, job_id: &str, by: &str, by_priority: i32) {
        let Some(job) = self.jobs.get(job_id) else { return };
        let (attempt, priority, class) = (job.row.attempt, job.row.priority, job.row.device_class);
        let cause = if by_priority > priority {
            format!("preempted by {by} (priority {by_priority} > {priority})")
        } else {
            format!("preempted by {by}, which is ahead of it in the queue (it was backfilled)")
        };
        info!(job_id = %job_id, attempt, by = %by, class = device_class_name(class), "preempting");
        let rank0 = self.rescuing_rank0(job_id, None);
        self.release_gang(job_id, &format!("attempt {attempt} {cause}"), None, "preempted");
        self.requeue(job_id, rank0, attempt, &cause, "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;

    fn placed(id: &str, priority: i32, created: i64, workers: usize) -> Placed<'_> {
        Placed { id, priority, created_at_ms: created, seq: created as u64, workers, backfilled: false }
    }

    fn backfilled(id: &str, priority: i32, created: i64, workers: usize) -> Placed<'_> {
        Placed { backfilled: true, ..placed(id, priority, created, workers) }
    }

    #[test]
    fn backfilled_jobs_give_way_first_and_no_victim_is_spare() {
        // a head of priority 5 needs 3 with 2 free: the job backfilled behind it (priority 5)
        // goes, not the priority-0 job placed in order (which would not have been touched had
        // nothing been backfilled: the head would have had the backfilled job's worker)
        let running = [placed("low", 0, 1, 1), backfilled("filler", 5, 9, 1)];
        assert_eq!(victims(3, 2, &running), ["filler"]);
        // greedy overshoot: the 1-worker low job first, then the 2-worker one; the first is spare
        let running = [placed("small", 0, 9, 1), placed("big", 1, 1, 2)];
        assert_eq!(victims(4, 2, &running), ["big"]);
        // both needed: both kept
        assert_eq!(victims(5, 2, &running), ["small", "big"]);
    }

    #[test]
    fn the_lowest_priority_and_youngest_go_first_and_only_as_many_as_needed() {
        let running = [placed("old-low", 0, 1, 2), placed("young-low", 0, 5, 2), placed("mid", 3, 2, 4)];
        // 4 needed, 1 free: the two priority-0 jobs, the youngest first
        assert_eq!(victims(4, 1, &running), ["young-low", "old-low"]);
        // 2 needed, 1 free: the youngest low one suffices
        assert_eq!(victims(2, 1, &running), ["young-low"]);
        // enough free already: nothing
        assert!(victims(3, 3, &running).is_empty());
        // 9 needed: all of them (2 + 2 + 4 = 8) and 1 free make it
        assert_eq!(victims(9, 1, &running), ["young-low", "old-low", "mid"]);
        // 10 needed: not even all of them make it fit, so none is disturbed
        assert!(victims(10, 1, &running).is_empty());
        // a job whose workers would not come back (draining, gone) frees nothing: skipped
        let draining = [placed("young-draining", 0, 9, 0), placed("old", 0, 1, 2)];
        assert_eq!(victims(2, 0, &draining), ["old"]);
    }

    fn key(priority: i32, created: i64) -> (QueueKey, i32) {
        ((Reverse(priority), created, created as u64), priority)
    }

    #[test]
    fn a_lower_priority_or_a_backfilled_job_behind_the_head_gives_way_if_it_yields() {
        let head = key(5, 10);
        // lower priority: gives way when it yields, backfilled or not
        assert!(gives_way(head, key(1, 1), true, false));
        assert!(!gives_way(head, key(1, 1), false, false), "a job without checkpoints or not preemptible never gives way");
        // equal or higher priority, placed in queue order: never
        assert!(!gives_way(head, key(5, 20), true, false));
        assert!(!gives_way(head, key(9, 20), true, false));
        // backfilled behind the head (equal priority, younger): gives way, if it yields
        assert!(gives_way(head, key(5, 20), true, true));
        assert!(!gives_way(head, key(5, 20), false, true));
        // backfilled, but ahead of this head in the queue (older, or higher priority): keeps them
        assert!(!gives_way(head, key(5, 3), true, true));
        assert!(!gives_way(head, key(9, 20), true, true));
    }
}
