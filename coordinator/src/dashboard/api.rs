//! The JSON handlers. State comes from the coordinator's memory (one short lock), history from
//! the SQLite file on a blocking thread.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error, history, prometheus, Dashboard};
use crate::job_logs::{self, LogQuery};
use crate::json;
use crate::error::CoordError;
use crate::state::now_ms;

/// Points a metrics request returns by default, and at most.
const DEFAULT_POINTS: u64 = 2_000;
const MAX_POINTS: u64 = 20_000;

/// A coordinator error as HTTP: its gRPC status (error.rs, the one classification of the
/// coordinator's errors) turned into the matching HTTP status, the same message.
fn coord_error(e: CoordError) -> Response {
    let s = tonic::Status::from(e);
    let status = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, s.message())
}

/// A query string that does not parse (`?max_points=abc`) as this API's other errors: JSON.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, Response> {
    q.map(|Query(v)| v).map_err(|r| error(StatusCode::BAD_REQUEST, r.body_text()))
}

/// Runs a history read off the async runtime; a failure names the database.
async fn read_history<T: Send + 'static>(
    d: &Dashboard,
    what: &'static str,
    f: impl FnOnce(&std::path::Path) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let db = d.db_path.clone();
    match tokio::task::spawn_blocking(move || f(&db).map_err(|e| format!("reading {what} from {}: {e}", db.display())))
        .await
    {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(why)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, why)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, format!("reading {what}: {e}"))),
    }
}

pub(super) async fn overview(State(d): State<Dashboard>) -> Json<Value> {
    let (jobs, workers) = d.coord.with(|st| (st.list_jobs(), st.list_workers()));
    Json(json!({
        "now_ms": now_ms(),
        "jobs": jobs.iter().map(json::job_summary).collect::<Vec<_>>(),
        "workers": workers.iter().map(json::worker).collect::<Vec<_>>(),
    }))
}

pub(super) async fn job(State(d): State<Dashboard>, Path(id): Path<String>) -> Response {
    let found = d.coord.with(|st| st.job(&id).map(|j| (st.job_proto(j), j.events.iter().filter_map(json::event).collect::<Vec<_>>())));
    let (job, events) = match found {
        Ok(x) => x,
        Err(e) => return coord_error(e),
    };
    let checkpoints = match read_history(&d, "checkpoints", move |db| history::checkpoints(db, &id)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut body = json::job(&job);
    body["events"] = json!(events);
    body["checkpoints"] = json!(checkpoints);
    Json(body).into_response()
}

/// Unknown parameters are refused, not ignored: `?maxpoints=10` silently meaning the default
/// misleads a script's author.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MetricsQuery {
    max_points: Option<u64>,
}

pub(super) async fn metrics(State(d): State<Dashboard>, Path(id): Path<String>, q: Result<Query<MetricsQuery>, QueryRejection>) -> Response {
    let q = match query(q) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let max_points = q.max_points.unwrap_or(DEFAULT_POINTS);
    if max_points == 0 || max_points > MAX_POINTS {
        return error(StatusCode::BAD_REQUEST, format!("max_points must be between 1 and {MAX_POINTS}, not {max_points}"));
    }
    if let Err(e) = d.coord.with(|st| st.job(&id).map(|_| ())) {
        return coord_error(e);
    }
    match read_history(&d, "metrics", move |db| history::metrics(db, &id, max_points)).await {
        Ok(series) => Json(series).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogsQuery {
    after: Option<u64>,
    limit: Option<u32>,
    attempt: Option<u32>,
    rank: Option<u32>,
    tail: Option<u32>,
    level: Option<String>,
}

/// A job's log lines (`job_logs::read`): `{"lines": [...], "next": seq}`.
pub(super) async fn logs(State(d): State<Dashboard>, Path(id): Path<String>, q: Result<Query<LogsQuery>, QueryRejection>) -> Response {
    let q = match query(q) {
        Ok(q) => q,
        Err(r) => return r,
    };
    if let Err(e) = d.coord.with(|st| st.job(&id).map(|_| ())) {
        return coord_error(e);
    }
    if let Err(e) = d.coord.flush().await {
        return coord_error(e);
    }
    let min_level = match q.level.as_deref().unwrap_or("").parse() {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("level: {e}")),
    };
    // `tail=0` means no lines, as `smelt jobs logs --tail 0` does (the store reads tail 0 as
    // "no tail"): the last line is read only for where the log ends (`next`, to follow from)
    let no_lines = q.tail == Some(0);
    let tail = if no_lines { 1 } else { q.tail.unwrap_or(0) };
    let q = LogQuery { after: q.after.unwrap_or(0), limit: q.limit.unwrap_or(0), attempt: q.attempt, rank: q.rank, tail, min_level };
    match read_history(&d, "logs", move |db| job_logs::read(db, &id, &q)).await {
        Ok(mut page) => {
            if no_lines {
                page.lines.clear();
                page.more = false;
            }
            Json(page).into_response()
        }
        Err(r) => r,
    }
}

pub(super) async fn prometheus(State(d): State<Dashboard>) -> Response {
    let text = d.coord.with(|st| prometheus::render(st));
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Cancels a job (its workers are aborted), durably before answering, as the gRPC CancelJob.
pub(super) async fn cancel(State(d): State<Dashboard>, Path(id): Path<String>) -> Response {
    let job = match d.coord.with(|st| st.cancel(&id)) {
        Ok(job) => job,
        Err(e) => return coord_error(e),
    };
    if let Err(e) = d.coord.flush().await {
        return coord_error(e);
    }
    Json(json::job_summary(&job)).into_response()
}
