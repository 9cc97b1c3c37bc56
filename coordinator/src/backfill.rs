//! Backfill: while the head of the CPU queue can start neither on the idle workers nor by
//! preempting jobs that give way to it (`preemption.rs`), jobs behind it use the idle workers,
//! in queue order, each that fits. Only jobs that would give their workers back are
//! backfilled: they checkpoint and their spec allows preemption (`[cluster] preemptible`). A
//! backfilled job gives way to any job ahead of it in the queue, before any other victim, so
//! the head starts as soon as the workers it needs exist (those idle, on their way back, or held
//! by jobs that give way), once a backfilled rank 0 has saved its last step. Workers are not left
//! idle behind a big job that is collecting its gang.
//!
//! Without run-time estimates a backfilled job may be preempted soon after it starts; it then
//! resumes from its rescue checkpoint like any preempted job, and none of its `max_restarts` is
//! used. GPU jobs are not backfilled, as they are not preempted yet.

use std::time::Instant;

use crate::scheduler::{rank_order, Idle, Placement};
use crate::state::{is_waiting, JobRec, State};

/// Which of `behind` (waiting jobs behind a stuck head, each with its world size) start on the
/// `idle` workers: each that fits, in queue order. Pure.
pub fn plan_backfill(head: &str, behind: &[(&str, u32)], mut idle: Vec<Idle<'_>>) -> Vec<Placement> {
    rank_order(&mut idle);
    let mut free = idle.into_iter().map(|w| w.id.to_string());
    let mut left = free.len();
    let mut out = Vec::new();
    for &(job, n) in behind {
        let n = n as usize;
        if n == 0 || n > left {
            continue; // a later, smaller job may still fit
        }
        left -= n;
        out.push(Placement { job_id: job.to_string(), workers: free.by_ref().take(n).collect(), behind: Some(head.to_string()) });
    }
    out
}

impl State {
    /// Backfills the idle workers of `head`'s class with the waiting jobs behind it that yield.
    pub(crate) fn backfill_behind(&mut self, head: &str) {
        let now = Instant::now();
        let Some(h) = self.jobs.get(head) else { return };
        let (class, key) = (h.row.device_class, h.queue_key());
        let mut behind: Vec<&JobRec> = self
            .jobs
            .values()
            .filter(|j| is_waiting(j.row.state) && j.row.device_class == class && j.queue_key() > key)
            // a job whose failed attempt's rank 0 is still saving waits for it
            .filter(|j| j.yields && !j.winding_down_at(now) && !j.backing_off_at(now))
            .collect();
        if behind.is_empty() {
            return;
        }
        behind.sort_by_key(|j| j.queue_key());
        let behind: Vec<(&str, u32)> = behind.iter().map(|j| (j.row.id.as_str(), j.row.world_size)).collect();
        let idle: Vec<Idle> = self.idle_workers().filter(|w| w.device_class == class).collect();
        let placements = plan_backfill(head, &behind, idle);
        for p in placements {
            self.place(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_proto::v1::DeviceClass;

    fn idle(id: &str) -> Idle<'_> {
        Idle { id, device_class: DeviceClass::Cpu, hostname: "h", device_index: 0 }
    }

    #[test]
    fn each_job_that_fits_starts_in_queue_order_on_workers_in_rank_order() {
        let behind = [("a", 2), ("too-big", 3), ("b", 1), ("c", 1)];
        let p = plan_backfill("head", &behind, vec![idle("w3"), idle("w1"), idle("w2")]);
        assert_eq!(
            p,
            vec![
                Placement { job_id: "a".into(), workers: vec!["w1".into(), "w2".into()], behind: Some("head".into()) },
                Placement { job_id: "b".into(), workers: vec!["w3".into()], behind: Some("head".into()) },
            ]
        );
        assert!(plan_backfill("head", &behind, vec![]).is_empty());
    }
}
