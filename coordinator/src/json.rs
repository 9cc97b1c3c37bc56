//! Jobs, workers and events as JSON, from the coordinator's protobuf messages, with states and
//! devices named as the CLI prints them (`running`, `cuda:0`): one shape for the dashboard's
//! API and for `smelt jobs --json` / `smelt workers --json`.

use serde_json::{json, Value};
use smelt_proto::v1::{job_event, DeviceClass, Job, JobEvent, JobState, WorkerInfo, WorkerState};

use crate::state::{device_class_name, job_state_name, worker_state_name};

fn job_state(s: i32) -> &'static str {
    job_state_name(JobState::try_from(s).unwrap_or_default())
}

/// A job without its spec (the dashboard's overview lists every job).
pub fn job_summary(j: &Job) -> Value {
    json!({
        "id": j.id,
        "name": j.name,
        "state": job_state(j.state),
        "priority": j.priority,
        "world_size": j.world_size,
        "device": device_class_name(DeviceClass::try_from(j.device_class).unwrap_or_default()),
        "attempt": j.attempt,
        "restarts": j.restarts,
        "max_restarts": j.max_restarts,
        "total_steps": j.total_steps,
        "last_step": j.last_step,
        // null before any step is reported (as last_val_loss before any evaluation), not 0
        "last_loss": (j.last_step > 0).then_some(j.last_loss),
        "last_val_loss": j.last_val_loss,
        "last_val_accuracy": j.last_val_accuracy,
        "last_val_sources": j.last_val_sources.iter().map(|s| json!({ "name": s.name, "loss": s.loss })).collect::<Vec<_>>(),
        "error": j.error,
        "worker_ids": j.worker_ids,
        "created_at_ms": j.created_at_ms,
        "updated_at_ms": j.updated_at_ms,
        "last_checkpoint_step": (!j.last_checkpoint_uri.is_empty()).then_some(j.last_checkpoint_step),
        "last_checkpoint_uri": j.last_checkpoint_uri,
        "resume_from": j.resume_from,
        "backfilled": j.backfilled,
        "waiting_for": j.waiting_for,
        "model_uri": j.model_uri,
    })
}

/// A job with its spec.
pub fn job(j: &Job) -> Value {
    let mut v = job_summary(j);
    v["spec_toml"] = json!(j.spec_toml);
    v
}

/// A stored event: a state change or a message (metrics come from `/metrics`).
pub fn event(e: &JobEvent) -> Option<Value> {
    Some(match e.body.as_ref()? {
        job_event::Body::State(s) => json!({
            "at_ms": e.at_ms,
            "kind": "state",
            "from": job_state(s.from),
            "to": job_state(s.to),
            "text": s.reason,
        }),
        job_event::Body::Message(m) => json!({ "at_ms": e.at_ms, "kind": "message", "text": m }),
        job_event::Body::Metrics(_) => return None,
    })
}

pub fn worker(w: &WorkerInfo) -> Value {
    let class = device_class_name(DeviceClass::try_from(w.device_class).unwrap_or_default());
    let device = if class == "cuda" { format!("cuda:{}", w.device_index) } else { class.to_string() };
    json!({
        "id": w.id,
        "hostname": w.hostname,
        "device": device,
        "device_index": w.device_index,
        "state": worker_state_name(WorkerState::try_from(w.state).unwrap_or_default()),
        "job_id": w.job_id,
        "last_seen_ms": w.last_seen_ms,
        "data_addr": w.data_addr,
    })
}
