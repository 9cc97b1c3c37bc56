//! What the control-plane client commands share: the coordinator URL, connecting, errors printed
//! as `error: <message>`, and how jobs and workers read as text and JSON.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::Value;
use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::{DeviceClass, Job, JobState, WorkerInfo, WorkerState};
use smelt_proto::auth::{self, AuthChannel};

#[derive(Args, Debug, Clone)]
pub struct CoordinatorUrl {
    /// Coordinator URL (or env SMELT_COORDINATOR).
    #[arg(long = "coordinator", env = "SMELT_COORDINATOR", default_value = DEFAULT_COORDINATOR_URL)]
    pub url: String,
}

/// The coordinator's database unless told (`smelt coordinator --db`, `smelt up`'s under its
/// `--data-dir` .smelt, `smelt jobs metrics --db`).
pub const DEFAULT_DATABASE: &str = ".smelt/coordinator.db";

/// Where clients look for the coordinator unless told (`--coordinator`, `SMELT_COORDINATOR`).
pub const DEFAULT_COORDINATOR_URL: &str = "http://127.0.0.1:7070";

impl CoordinatorUrl {
    /// The URL a command without `--coordinator` uses: `SMELT_COORDINATOR`, else the default.
    pub fn from_env() -> String {
        std::env::var("SMELT_COORDINATOR").unwrap_or_else(|_| DEFAULT_COORDINATOR_URL.to_string())
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// The token: the file's contents (trimmed) when given, else `SMELT_TOKEN`, else none.
pub fn token(file: Option<&std::path::Path>) -> Result<Option<String>> {
    let Some(f) = file else { return Ok(auth::token_from_env()) };
    let t = std::fs::read_to_string(f).with_context(|| format!("reading the token file {}", f.display()))?;
    let t = t.trim().to_string();
    auth::check_token(&t).map_err(|e| anyhow::anyhow!("token file {}: {e}", f.display()))?;
    Ok(Some(t))
}

/// A jobs client; every call carries `SMELT_TOKEN` when it is set.
pub async fn connect(url: &str) -> Result<JobServiceClient<AuthChannel>> {
    let channel = smelt_proto::tls::endpoint(url)
        .map_err(anyhow::Error::msg)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        // the innermost cause says what happened ("Connection refused", "invalid peer certificate")
        .map_err(|e| failure(UNREACHABLE, format!("cannot reach the coordinator at {url}: {}{}", smelt_proto::tls::innermost(&e), history_hint(url))))?;
    let _ = CONNECTED_TO.set(url.to_string());
    let token = auth::BearerToken::new(auth::token_from_env().as_deref()).map_err(|e| anyhow::anyhow!("{}: {e}", auth::TOKEN_ENV))?;
    Ok(JobServiceClient::with_interceptor(channel, token))
}

/// Where the history of a cluster that has stopped is, when the default coordinator is not there
/// and a `smelt up` database is: `smelt up` stops its coordinator with its job.
fn history_hint(url: &str) -> String {
    let db = std::path::Path::new(DEFAULT_DATABASE);
    if url.trim_end_matches('/') != DEFAULT_COORDINATOR_URL || !db.is_file() {
        return String::new();
    }
    format!(
        " (a `smelt up` cluster stops with its job: `smelt jobs metrics ID` reads a job's metrics from {} as it is; for its jobs, logs and dashboard: smelt coordinator --db {})",
        db.display(),
        db.display()
    )
}

/// The coordinator URL this process connected to (for `status` to probe).
static CONNECTED_TO: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The coordinator URL this process connected to, once it has.
pub fn connected_to() -> Option<String> {
    CONNECTED_TO.get().cloned()
}

/// Why the coordinator this process connected to over https refuses its client certificate
/// (mutual TLS), if it does: a refused call often says only "connection closed", so a probe asks
/// (`smelt_proto::tls::refusal`), on a thread of its own, as `status` runs in any context.
fn certificate_refusal() -> Option<(String, String)> {
    let url = CONNECTED_TO.get()?.clone();
    if !url.starts_with("https://") {
        return None;
    }
    probe_aside(smelt_proto::tls::refusal(&url)).map(|why| (url.clone(), why))
}

/// Runs a probe of the coordinator to its end on a thread and runtime of its own: `status`
/// runs in any context, inside a runtime or not. `None` when the probe says nothing.
fn probe_aside<T: Send>(probe: impl std::future::Future<Output = Option<T>> + Send) -> Option<T> {
    std::thread::scope(|s| {
        s.spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?.block_on(probe))
            .join()
            .ok()
            .flatten()
    })
}

/// What answers at the coordinator URL this process connected to, when a call's error `e` says
/// it is not a smelt coordinator (`smelt_proto::wrong_server`), probed on a thread of its own.
fn wrong_server(e: &tonic::Status) -> Option<String> {
    if !smelt_proto::wrong_server::maybe_wrong_server(e) {
        return None;
    }
    let url = CONNECTED_TO.get()?.clone();
    probe_aside(smelt_proto::wrong_server::wrong_server(&url, e))
}

/// A gRPC error as the user should read it: the status message says what to fix.
pub fn status(e: tonic::Status) -> anyhow::Error {
    if let Some(why) = wrong_server(&e) {
        return anyhow::anyhow!("{why}");
    }
    let transport = matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal);
    if transport {
        if let Some((url, why)) = certificate_refusal() {
            return anyhow::anyhow!("the coordinator at {url} refused this client's TLS connection: {why}");
        }
    }
    if e.message().is_empty() {
        anyhow::anyhow!("{:?}", e.code())
    } else if e.code() == tonic::Code::Unavailable && e.message().contains("connect error") {
        // the coordinator went away after this command reached it (a restart, a crash)
        use std::error::Error;
        let url = CONNECTED_TO.get().map(String::as_str).unwrap_or("the coordinator's address");
        let cause = e.source().map(smelt_proto::tls::innermost).map(|c| format!(": {c}")).unwrap_or_default();
        failure(UNREACHABLE, format!("lost the coordinator at {url} ({}{cause})", e.message()))
    } else if e.message() == "transport error" || e.message().contains("h2 protocol error") {
        // the connection, not the coordinator, failed: its cause says why (plain text to a TLS
        // port ends in an h2 protocol error)
        use std::error::Error;
        let cause = e.source().map(smelt_proto::tls::innermost).map(|c| format!(": {c}")).unwrap_or_default();
        anyhow::anyhow!("{}{cause} (if the coordinator serves TLS, use an https:// URL)", e.message())
    } else {
        anyhow::anyhow!("{}", e.message())
    }
}

/// A client command's failure that a script may want to tell from the others by the exit
/// status: 3 the job failed, 4 it was cancelled, 5 the coordinator cannot be reached or was
/// lost; every other error is 1 (a bad spec, a job not found, ...), a usage error 2 (clap's).
#[derive(Debug)]
pub struct Failure {
    pub status: u8,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

pub const JOB_FAILED: u8 = 3;
pub const JOB_CANCELLED: u8 = 4;
pub const UNREACHABLE: u8 = 5;

pub fn failure(status: u8, message: String) -> anyhow::Error {
    anyhow::Error::new(Failure { status, message })
}

/// The exit status for `e`: a [`Failure`]'s anywhere in its chain, else 1.
pub fn exit_status(e: &anyhow::Error) -> u8 {
    e.chain().find_map(|c| c.downcast_ref::<Failure>()).map_or(1, |f| f.status)
}

/// Runs a client command: on error prints `error: <message>` and exits non-zero
/// ([`exit_status`]).
pub fn exit_on_error(r: Result<()>) -> Result<()> {
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(exit_status(&e).into());
    }
    Ok(())
}

pub fn job_state(j: &Job) -> JobState {
    JobState::try_from(j.state).unwrap_or_default()
}

/// The loss rank 0 last reported, `None` before the current attempt's first step: its progress
/// starts at the step it resumed from (0 from scratch), which comes with no loss, and a
/// restart keeps the previous attempt's stale one.
pub fn reported_loss(j: &Job) -> Option<f32> {
    (j.last_step > resumed_at(j)).then_some(j.last_loss)
}

/// The step the current attempt started from: its checkpoint's, 0 from scratch.
pub fn resumed_at(j: &Job) -> u64 {
    smelt_checkpoint::step_of_uri(&j.resume_from).unwrap_or(0)
}

pub fn state_name(s: JobState) -> &'static str {
    smelt_coordinator::state::job_state_name(s)
}

pub fn worker_state_name(s: i32) -> &'static str {
    smelt_coordinator::state::worker_state_name(WorkerState::try_from(s).unwrap_or_default())
}

pub fn device_name(d: i32) -> &'static str {
    smelt_coordinator::state::device_class_name(DeviceClass::try_from(d).unwrap_or_default())
}

pub fn now_ms() -> i64 {
    smelt_coordinator::state::now_ms()
}

/// "3s", "4m", "2h", "5d" ago.
pub fn age(at_ms: i64) -> String {
    let s = ((now_ms() - at_ms).max(0) / 1000) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// A job as JSON (`--json`): the dashboard API's shape, with the spec.
pub fn job_json(j: &Job) -> Value {
    smelt_coordinator::json::job(j)
}

pub fn worker_json(w: &WorkerInfo) -> Value {
    smelt_coordinator::json::worker(w)
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out
}
