//! `GET /metrics`: the coordinator's state in Prometheus' text format (version 0.0.4), for a
//! scrape job (`authorization: { credentials_file: /etc/smelt/token }` when the coordinator has
//! a token). Workers and jobs are counted by state; each job that has not ended gets its own
//! series (step, loss, throughput, ..., a mixture's loss per source), so a finished job's series
//! stop rather than pile up. A job's series are labelled `job` and `name` only: its state is
//! `smelt_job_state` (1 for the state it is in), so a restart does not start new series (a
//! counter's `increase()` would not see it).

use std::collections::BTreeMap;
use std::fmt::Write;

use smelt_proto::v1::{DeviceClass, JobState, WorkerState};

use crate::state::{device_class_name, is_terminal, job_state_name, worker_state_name, State};

/// A label value with `\`, `"` and newlines escaped, as the format asks.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One metric family: its HELP and TYPE lines, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", label(v))).collect();
            let _ = write!(self.out, "{{{}}}", inner.join(","));
        }
        let v = if value.is_nan() {
            "NaN".to_string()
        } else if value.is_infinite() {
            if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
        } else {
            format!("{value}")
        };
        let _ = writeln!(self.out, " {v}");
    }
}

const JOB_STATES: [JobState; 7] = [
    JobState::Queued,
    JobState::Scheduled,
    JobState::Running,
    JobState::Restarting,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];
const WORKER_STATES: [WorkerState; 4] = [WorkerState::Idle, WorkerState::Busy, WorkerState::Draining, WorkerState::Lost];
/// The `state` label of a worker that drained and went (its row says lost).
const EXITED: &str = "exited";

/// The exposition of the whole state (taken under the coordinator's lock: counting is cheap).
pub fn render(st: &State) -> String {
    let mut out = String::new();
    let mut workers: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for dev in [DeviceClass::Cpu, DeviceClass::Cuda] {
        for s in WORKER_STATES.map(worker_state_name).into_iter().chain([EXITED]) {
            workers.insert((device_class_name(dev), s), 0);
        }
    }
    for w in st.workers.values() {
        // a worker shut down (SIGTERM) that has gone is not a failure: an alert on `lost` must
        // not fire on every rolling restart
        let state = if w.row.state == WorkerState::Lost && w.draining { EXITED } else { worker_state_name(w.row.state) };
        *workers.entry((device_class_name(w.row.device_class), state)).or_default() += 1;
    }
    let mut f = Family::new(&mut out, "smelt_workers", "gauge", "Registered workers by device class and state (exited: drained and gone; lost: vanished).");
    for ((device, state), n) in &workers {
        f.sample("smelt_workers", &[("device", device), ("state", state)], *n as f64);
    }

    let mut jobs: BTreeMap<&str, u64> = JOB_STATES.iter().map(|s| (job_state_name(*s), 0)).collect();
    for j in st.jobs.values() {
        *jobs.entry(job_state_name(j.row.state)).or_default() += 1;
    }
    let mut f = Family::new(&mut out, "smelt_jobs", "gauge", "Jobs by state.");
    for (state, n) in &jobs {
        f.sample("smelt_jobs", &[("state", state)], *n as f64);
    }

    let mut live: Vec<_> = st.jobs.values().filter(|j| !is_terminal(j.row.state)).collect();
    live.sort_by_key(|j| j.seq);
    type Pick = fn(&crate::state::JobRec) -> Option<f64>;
    let per_job: [(&str, &str, &str, Pick); 9] = [
        ("smelt_job_step", "gauge", "Steps completed (rank 0's last report).", |j| Some(j.row.last_step as f64)),
        ("smelt_job_total_steps", "gauge", "Steps the job trains for.", |j| Some(j.row.total_steps as f64)),
        ("smelt_job_loss", "gauge", "Training loss at the last reported step.", |j| (j.row.last_step > 0).then_some(j.row.last_loss as f64)),
        ("smelt_job_val_loss", "gauge", "Validation loss at the last evaluation.", |j| j.row.last_val_loss.map(f64::from)),
        ("smelt_job_val_accuracy", "gauge", "Validation accuracy at the last evaluation (classification fine-tuning).", |j| {
            j.row.last_val_accuracy.map(f64::from)
        }),
        ("smelt_job_tokens_per_second", "gauge", "Training throughput of the job, all ranks (rank 0's last report).", |j| {
            j.last_metrics.as_ref().map(|m| m.tokens_per_s)
        }),
        ("smelt_job_mfu", "gauge", "Model FLOPs utilization of GPU ranks, 0 to 1 (rank 0's last report).", |j| {
            j.last_metrics.as_ref().and_then(|m| m.mfu).map(f64::from)
        }),
        ("smelt_job_attempt", "gauge", "The job's current attempt (1 + restarts).", |j| Some(j.row.attempt as f64)),
        ("smelt_job_restarts_total", "counter", "Restarts after a lost or failed rank.", |j| Some(j.row.restarts as f64)),
    ];
    let name = "smelt_job_state";
    let mut f = Family::new(&mut out, name, "gauge", "1 for the state the job is in, 0 for the others it may be in before it ends.");
    for j in &live {
        for state in JOB_STATES.into_iter().filter(|s| !is_terminal(*s)) {
            let v = if state == j.row.state { 1.0 } else { 0.0 };
            f.sample(name, &[("job", &j.row.id), ("name", &j.row.name), ("state", job_state_name(state))], v);
        }
    }
    for (name, kind, help, pick) in per_job {
        let mut f = Family::new(&mut out, name, kind, help);
        for j in &live {
            if let Some(v) = pick(j) {
                f.sample(name, &[("job", &j.row.id), ("name", &j.row.name)], v);
            }
        }
    }
    // A mixture's sources, one series each (a job without sources has none).
    let name = "smelt_job_source_val_loss";
    let help = "Validation loss of one source of a data mixture at the last evaluation (source: its corpus URI).";
    let mut f = Family::new(&mut out, name, "gauge", help);
    for j in &live {
        for s in &j.row.last_val_sources {
            let labels = [("job", j.row.id.as_str()), ("name", &j.row.name), ("source", &s.name)];
            f.sample(name, &labels, f64::from(s.loss));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#.to_string().as_str()), r#"a\"b\\c"#);
        assert_eq!(label("x\ny"), "x\\ny");
    }
}
