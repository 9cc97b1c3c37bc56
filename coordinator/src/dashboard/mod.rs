//! The dashboard: a web page served on the coordinator's own port (HTTP/1.1 beside the gRPC
//! services, so a cluster has one address) with the workers, the jobs, each job's loss curves,
//! events, checkpoints and log lines (the last ones, then followed; by rank); and the JSON API
//! the page reads, which scripts can use too.
//!
//! - `GET /`: the page (`page.html`, embedded; it holds no data, so it is served to anyone).
//! - `GET /api/overview`: every job (without its spec) and every worker.
//! - `GET /api/jobs/{id}`: one job with its spec, events and recorded checkpoints.
//! - `GET /api/jobs/{id}/metrics?max_points=N`: rank 0's step metrics from the SQLite file.
//! - `GET /api/jobs/{id}/logs?after=SEQ&limit=N&attempt=A&rank=R&tail=N&level=warn`: the log lines its
//!   workers sent (`crate::job_logs`), oldest first, and `next`, the seq to read on from.
//! - `POST /api/jobs/{id}/cancel`: cancels a job, as `smelt jobs cancel` does; the one request
//!   that changes anything.
//! - `GET /metrics`: the same state for Prometheus (`prometheus.rs`).
//!
//! With a coordinator token, every `/api` and `/metrics` request must carry `authorization:
//! Bearer <token>` (the page asks for the token once and keeps it for the browser tab: no
//! cookie). A POST must also carry `x-smelt-request: 1`, a header another site's page cannot
//! add without the coordinator's consent (no CORS is answered), so a page elsewhere cannot
//! cancel jobs through a browser on a coordinator without a token (`smelt up` on a laptop).

mod api;
pub(crate) mod history;
mod prometheus;

use std::path::PathBuf;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use smelt_proto::auth::RequireToken;

use crate::coordinator::Coordinator;

/// What the handlers share.
#[derive(Clone)]
struct Dashboard {
    coord: Coordinator,
    /// The coordinator's SQLite file, opened read-only per request for the history (WAL lets
    /// readers run beside the store's writer thread).
    db_path: PathBuf,
}

const PAGE: &str = include_str!("page.html");

/// The dashboard's routes, to be merged with the gRPC services' router.
pub fn router(coord: Coordinator, db_path: PathBuf, auth: RequireToken) -> Router {
    let api = Router::new()
        .route("/api/overview", get(api::overview))
        .route("/api/jobs/{id}", get(api::job))
        .route("/api/jobs/{id}/metrics", get(api::metrics))
        .route("/api/jobs/{id}/logs", get(api::logs))
        .route("/api/jobs/{id}/cancel", post(api::cancel).fallback(takes_post))
        .route("/metrics", get(api::prometheus))
        .layer(middleware::from_fn(require_request_header))
        .layer(middleware::from_fn_with_state(auth, require_token))
        .with_state(Dashboard { coord, db_path });
    Router::new().route("/", get(page)).merge(api)
}

/// Answers a path nobody serves: gRPC's "unimplemented" to a gRPC client (what tonic's own
/// fallback says), a 404 naming the path to anyone else (a browser, curl).
pub fn fallback(req: Request) -> impl std::future::Future<Output = Response> {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = req.uri().path().to_string();
    async move {
        if grpc {
            let (parts, ()) = tonic::Status::unimplemented(format!("no such method: {path}")).into_http::<()>().into_parts();
            Response::from_parts(parts, axum::body::Body::empty())
        } else {
            error(StatusCode::NOT_FOUND, format!("nothing at {path}: the dashboard is at /, its API under /api"))
        }
    }
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(PAGE))
}

/// An API error: its HTTP status and a message that says what is wrong.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// Another method than POST on a path that takes POST: a JSON error as every other (axum's own
/// 405 had an empty body).
async fn takes_post(req: Request) -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, format!("{} {}: this path takes POST", req.method(), req.uri().path()))
}

/// The header a state-changing request must carry (see the module's doc: cross-site requests).
pub(crate) const REQUEST_HEADER: &str = "x-smelt-request";

async fn require_request_header(req: Request, next: Next) -> Response {
    // GET and HEAD read (a health probe's HEAD was refused as a write)
    let reads = matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    if !reads && req.headers().get(REQUEST_HEADER).is_none_or(|v| v != "1") {
        return error(
            StatusCode::FORBIDDEN,
            format!("{} {} changes the coordinator: send the header `{REQUEST_HEADER}: 1` with it", req.method(), req.uri().path()),
        );
    }
    next.run(req).await
}

async fn require_token(State(auth): State<RequireToken>, req: Request, next: Next) -> Response {
    match auth.admits(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes())) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            let mut r = error(StatusCode::UNAUTHORIZED, why);
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            r
        }
    }
}
