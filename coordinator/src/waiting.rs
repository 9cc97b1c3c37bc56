//! Why a queued or restarting job is not running yet, in words (`Job.waiting_for`, shown by
//! `smelt jobs get`, `smelt submit` and the dashboard): the first thing a user asks of a job that
//! does not start. Worked out at read time from the scheduler's own view (each class's queue
//! order, its connected and idle workers), never stored; one view serves a whole listing, so
//! listing n jobs costs O(n log n), not O(n²).

use std::collections::HashMap;
use std::time::Instant;

use smelt_proto::v1::{DeviceClass, Job};

use crate::state::{device_class_name, is_waiting, JobRec, QueueKey, State};

/// One device class as the scheduler sees it.
#[derive(Default)]
struct ClassView<'a> {
    /// Waiting jobs in queue order: (key, id, priority, world size, waiting for its failed
    /// attempt's rank 0).
    queue: Vec<(QueueKey, &'a str, i32, u32, bool)>,
    /// Connected workers that take work (not draining), and those draining.
    serving: usize,
    draining: usize,
    idle: usize,
}

pub struct QueueView<'a> {
    classes: HashMap<DeviceClass, ClassView<'a>>,
    /// `State::worker_flag`.
    worker_flag: &'a str,
    /// Jobs bigger than their class's connected workers, which hold no place (`State::outsized`).
    outsized: std::collections::HashSet<&'a str>,
    now: Instant,
}

fn workers(n: usize) -> &'static str {
    if n == 1 {
        "worker"
    } else {
        "workers"
    }
}

impl State {
    fn queue_view(&self) -> QueueView<'_> {
        let now = Instant::now();
        let mut classes: HashMap<DeviceClass, ClassView> = HashMap::new();
        let serving = self.workers_by_class();
        let mut outsized = std::collections::HashSet::new();
        for j in self.jobs.values().filter(|j| is_waiting(j.row.state)) {
            // a job bigger than its class's connected workers holds no place
            if self.outsized(j, &serving, now) {
                outsized.insert(j.row.id.as_str());
                continue;
            }
            let entry = (j.queue_key(), j.row.id.as_str(), j.row.priority, j.row.world_size, j.winding_down_at(now));
            classes.entry(j.row.device_class).or_default().queue.push(entry);
        }
        for c in classes.values_mut() {
            c.queue.sort_by_key(|q| q.0);
        }
        for w in self.workers.values() {
            let c = classes.entry(w.row.device_class).or_default();
            c.serving += usize::from(w.conn.is_some() && !w.draining);
            c.draining += usize::from(w.conn.is_some() && w.draining);
            c.idle += usize::from(w.schedulable());
        }
        QueueView { classes, worker_flag: &self.worker_flag, outsized, now }
    }

    /// The job as the API shows it: its record, and what it waits for.
    pub fn job_proto(&self, job: &JobRec) -> Job {
        if !is_waiting(job.row.state) {
            return job.to_proto(); // no view of the queues needed
        }
        self.jobs_proto([job]).pop().expect("one job")
    }

    /// Jobs as the API shows them, from one view of the queues.
    pub fn jobs_proto<'a>(&self, jobs: impl IntoIterator<Item = &'a JobRec>) -> Vec<Job> {
        let view = self.queue_view();
        jobs.into_iter().map(|j| Job { waiting_for: waiting_for(&view, j), ..j.to_proto() }).collect()
    }
}

/// What a waiting job waits for; empty for a job that is not waiting.
fn waiting_for(view: &QueueView, job: &JobRec) -> String {
    if !is_waiting(job.row.state) {
        return String::new();
    }
    if job.winding_down_at(view.now) {
        return format!("its attempt {}'s rank 0 to end it (it may be saving its last completed step)", job.row.attempt.saturating_sub(1));
    }
    if let Some(t) = job.retry_after.filter(|t| view.now < *t) {
        let left = t.saturating_duration_since(view.now).as_secs_f64().ceil() as u64;
        return format!("the back-off after a transient failure (a store or network error): {left} s left");
    }
    let class = job.row.device_class;
    let name = device_class_name(class);
    let empty = ClassView::default();
    let c = view.classes.get(&class).unwrap_or(&empty);
    let need = job.row.world_size as usize;
    if c.serving < need {
        let flag = view.worker_flag;
        let start = if class == DeviceClass::Cuda { format!("`smelt worker{flag} --device cuda:N`, one per GPU") } else { format!("`smelt worker{flag} --device cpu`") };
        let draining = if c.draining > 0 { format!(", {} more draining", c.draining) } else { String::new() };
        let meanwhile = if view.outsized.contains(job.row.id.as_str()) { "; until then the jobs behind it start on the workers there" } else { "" };
        return format!("{need} {name} {}: {} connected{draining} (start more with {start}){meanwhile}", workers(need), c.serving);
    }
    let key = job.queue_key();
    let ahead = c.queue.partition_point(|q| q.0 < key);
    if ahead == 0 {
        return format!("{need} idle {name} {} (head of the {name} queue; {} idle now, the others run jobs)", workers(need), c.idle);
    }
    let (_, head, priority, head_needs, head_winding_down) = c.queue[0];
    // nothing is backfilled behind a head that waits for its own rank 0 (it starts soon)
    let may_backfill = if job.yields && class == DeviceClass::Cpu && !head_winding_down {
        "; it may start on idle workers meanwhile, giving them back when the jobs ahead can start"
    } else {
        ""
    };
    format!(
        "{ahead} {} ahead in the {name} queue (the first, {head}, priority {priority}, needs {head_needs} {}; {} idle now){may_backfill}",
        if ahead == 1 { "job" } else { "jobs" },
        workers(head_needs as usize),
        c.idle,
    )
}
