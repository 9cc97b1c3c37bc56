//! Why a queued or restarting job is not running yet, in words (`Job.waiting_for`, shown by
//! `smelt jobs get`, `smelt submit` and the dashboard's API): the first thing a user asks of a
//! job that does not start. Worked out at read time from the scheduler's own view (the class's
//! queue order, its connected and idle workers), never stored.

use std::time::Instant;

use smelt_proto::v1::{DeviceClass, Job};

use crate::state::{device_class_name, is_waiting, JobRec, State};

fn workers(n: usize) -> &'static str {
    if n == 1 {
        "worker"
    } else {
        "workers"
    }
}

impl State {
    /// The job as the API shows it: its record, and what it waits for.
    pub fn job_proto(&self, job: &JobRec) -> Job {
        Job { waiting_for: self.waiting_for(job), ..job.to_proto() }
    }

    /// What a waiting job waits for; empty for a job that is not waiting.
    pub fn waiting_for(&self, job: &JobRec) -> String {
        if !is_waiting(job.row.state) {
            return String::new();
        }
        if job.winding_down_at(Instant::now()) {
            return format!("its attempt {}'s rank 0 to end it (it may be saving its last completed step)", job.row.attempt.saturating_sub(1));
        }
        let class = job.row.device_class;
        let name = device_class_name(class);
        let need = job.row.world_size as usize;
        let of_class = || self.workers.values().filter(move |w| w.row.device_class == class);
        // connected and taking work (a draining worker takes none)
        let serving = of_class().filter(|w| w.conn.is_some() && !w.draining).count();
        let idle = of_class().filter(|w| w.schedulable()).count();
        if serving < need {
            let start = if class == DeviceClass::Cuda { "`smelt worker --device cuda:N`, one per GPU" } else { "`smelt worker`" };
            return format!("{need} {name} {}: {serving} connected (start more with {start})", workers(need));
        }
        let key = job.queue_key();
        let ahead: Vec<&JobRec> = self.jobs.values().filter(|j| is_waiting(j.row.state) && j.row.device_class == class && j.queue_key() < key).collect();
        match ahead.iter().min_by_key(|j| j.queue_key()) {
            None => format!("{need} idle {name} {} (head of the {name} queue; {idle} idle now, the others run jobs)", workers(need)),
            Some(head) => {
                let may_backfill = if job.yields && class == DeviceClass::Cpu {
                    "; it may start on idle workers meanwhile, giving them back when the jobs ahead can start"
                } else {
                    ""
                };
                format!(
                    "{} {} ahead in the {name} queue (the first, {}, priority {}, needs {} {}; {idle} idle now){may_backfill}",
                    ahead.len(),
                    if ahead.len() == 1 { "job" } else { "jobs" },
                    head.row.id,
                    head.row.priority,
                    head.row.world_size,
                    workers(head.row.world_size as usize),
                )
            }
        }
    }
}
