//! `smelt submit job.toml [--follow]`: submit a job; print its id; optionally follow it to the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::{job_event, GetJobRequest, Job, JobLogsRequest, JobState, SourceLoss, SubmitRequest, WatchJobRequest};
use tonic::Code;

use crate::client::{connect, exit_on_error, job_state, runtime, state_name, status, CoordinatorUrl};

/// How quiet a followed job's event stream is when the replay of its past events is taken to be
/// over (what a waiting job waits for is said then).
const WAITS_AFTER_QUIET: Duration = Duration::from_millis(300);
/// How often a followed job that waits is asked again what it waits for.
const WAITS_RECHECK: Duration = Duration::from_secs(3);

/// How long --follow keeps trying to reach a coordinator that went away (a restart).
pub(crate) const RECONNECT_FOR: Duration = Duration::from_secs(120);

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The job spec (TOML); `-` reads it from standard input.
    pub spec: PathBuf,
    #[command(flatten)]
    pub coordinator: CoordinatorUrl,
    /// Start from a checkpoint URI, or from the latest checkpoint of a job id.
    #[arg(long)]
    pub resume_from: Option<String>,
    /// Stream the job's progress until it ends; exit 0 if it succeeds, 3 if it failed, 4 if it
    /// was cancelled, 5 if the coordinator cannot be reached (1: a bad spec or other error).
    #[arg(long)]
    pub follow: bool,
}

pub fn run(a: SubmitArgs) -> Result<()> {
    exit_on_error(runtime().and_then(|rt| rt.block_on(run_async(a))))
}

async fn run_async(a: SubmitArgs) -> Result<()> {
    let size = std::fs::metadata(&a.spec).map(|m| m.len()).unwrap_or(0);
    if size > MAX_SPEC_BYTES {
        // (read whole, it would reach the coordinator as gRPC's "decoded message length too large")
        bail!("job spec {}: {size} bytes, more than a spec takes ({MAX_SPEC_BYTES}): is it the right file?", a.spec.display());
    }
    let spec_toml = if a.spec.as_os_str() == "-" {
        // `-`: the spec from standard input (a script's here-document, a template's output)
        use std::io::Read;
        let mut text = String::new();
        std::io::stdin().take(MAX_SPEC_BYTES + 1).read_to_string(&mut text).context("cannot read the job spec from standard input")?;
        if text.len() as u64 > MAX_SPEC_BYTES {
            bail!("job spec on standard input: more than a spec takes ({MAX_SPEC_BYTES} bytes)");
        }
        text
    } else {
        std::fs::read_to_string(&a.spec).with_context(|| format!("cannot read job spec {}", a.spec.display()))?
    };
    if let Some(from) = a.resume_from.clone().filter(|f| !smelt_checkpoint::looks_like_job_id(f.trim())) {
        // store access blocks: off the runtime
        tokio::task::spawn_blocking(move || check_resume_from(&from, None)).await??;
    }
    let mut client = connect(&a.coordinator.url).await?;
    if let Some(id) = a.resume_from.clone().filter(|f| smelt_checkpoint::looks_like_job_id(f.trim())) {
        // a job id resumes from that job's latest checkpoint: checked here as a URI is (an
        // unknown job is the coordinator's to refuse, below)
        let id = id.trim().to_string();
        if let Ok(job) = client.get_job(GetJobRequest { job_id: id.clone() }).await.map(|r| r.into_inner()) {
            if !job.last_checkpoint_uri.is_empty() {
                let uri = job.last_checkpoint_uri.clone();
                tokio::task::spawn_blocking(move || check_resume_from(&uri, Some(&id))).await??;
            }
        }
    }
    let job = client
        .submit(SubmitRequest { spec_toml, resume_from: a.resume_from.unwrap_or_default() })
        .await
        .map_err(status)?
        .into_inner()
        .job
        .context("the coordinator answered without the job")?;
    println!("{}", job.id);
    if !job.waiting_for.is_empty() && !a.follow {
        // stderr: stdout is the id alone, for scripts (following says it too)
        eprintln!("queued: waits for {}", job.waiting_for);
    }
    if a.follow {
        tokio::select! {
            r = follow(&mut client, &job, false) => r?,
            _ = tokio::signal::ctrl_c() => {
                // only the following stops: say so, so that nobody takes the job for cancelled
                let id = &job.id;
                eprintln!("\nstopped following; {id} keeps running (smelt jobs follow {id}, smelt jobs cancel {id})");
                std::process::exit(130);
            }
        }
    }
    Ok(())
}

/// A checkpoint to resume from that is not there, or does not verify, is refused before the job
/// is submitted: the workers would only find out after taking it, and would then resume from an
/// earlier checkpoint than the one asked for (or fail, restart after restart). One larger than
/// [`VERIFY_AT_SUBMIT_MAX`] is only checked for its manifest here (the workers verify it); one
/// the store will not show this machine (its credentials are the workers') is left to the
/// workers, with a warning.
fn check_resume_from(uri: &str, job: Option<&str>) -> Result<()> {
    use smelt_checkpoint::CheckpointError;
    // what the messages call it: the URI given, or the job given and its latest checkpoint
    let named = match job {
        Some(id) => format!("{id}'s latest checkpoint {uri}"),
        None => uri.to_string(),
    };
    let dir = smelt_corpus::StoreDir::open(uri.trim()).map_err(|e| anyhow::anyhow!("--resume-from {named}: {e}"))?;
    match smelt_checkpoint::read::read_manifest(&dir) {
        Ok(m) => {
            let bytes: u64 = m.files.iter().map(|f| f.size).sum();
            if bytes > VERIFY_AT_SUBMIT_MAX {
                eprintln!("note: --resume-from {named}: {:.1} GB, not verified here; the workers verify it", bytes as f64 / 1e9);
                return Ok(());
            }
            match smelt_checkpoint::read::verify(&dir) {
                Ok(_) => Ok(()),
                // the store failing to answer says nothing about the checkpoint
                Err(e @ CheckpointError::Store(_)) => {
                    eprintln!("warning: cannot verify --resume-from {named} from here ({e}); the workers will");
                    Ok(())
                }
                Err(e) => {
                    let listing = smelt_checkpoint::layout::parent_uri(uri.trim())
                        .map(|p| format!("; `smelt checkpoints list {p}` shows which verify"))
                        .unwrap_or_default();
                    anyhow::bail!("--resume-from {named}: the checkpoint does not verify: {e}{listing}")
                }
            }
        }
        Err(CheckpointError::NotCommitted { .. }) => {
            let listing = smelt_checkpoint::layout::parent_uri(uri.trim())
                .map(|p| format!("`smelt checkpoints list {p}` shows the committed ones there"))
                .unwrap_or_else(|| "`smelt checkpoints list JOB_ID` shows a job's committed ones".to_string());
            anyhow::bail!(
                "--resume-from {named}: no MANIFEST.json there, so no committed checkpoint (a wrong path, a checkpoint \
                 retention removed, or an upload that never finished); {listing}"
            )
        }
        // the store failing to answer: the workers may reach what this machine cannot
        Err(e @ CheckpointError::Store(_)) => {
            eprintln!("warning: cannot check --resume-from {named} from here ({e}); the workers will");
            Ok(())
        }
        // a manifest that does not parse is a checkpoint that does not verify (the workers
        // would fail on it, a restart spent)
        Err(e) => anyhow::bail!("--resume-from {named}: the checkpoint does not verify: {e}"),
    }
}

/// The largest checkpoint `smelt submit --resume-from` reads whole to verify it (a laptop
/// submitting to a cloud cluster should not download a large model to do so).
const VERIFY_AT_SUBMIT_MAX: u64 = 4 << 30;

/// The largest job spec file submitted (a spec is a few hundred bytes; the coordinator's messages
/// are at most 4 MiB).
const MAX_SPEC_BYTES: u64 = 1 << 20;

pub(crate) fn is_terminal(s: JobState) -> bool {
    matches!(s, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
}

/// Says that the coordinator went away and the follow tries to reach it again (a
/// `{"kind": "reconnecting"}` event too under `--json`): a script saw nothing for two minutes.
fn lost_coordinator(json: bool) {
    let url = crate::client::connected_to().unwrap_or_else(|| "its address".into());
    eprintln!("lost the coordinator at {url}; reconnecting (for up to {} s)", RECONNECT_FOR.as_secs());
    if json {
        println!("{}", serde_json::json!({ "at_ms": crate::client::now_ms(), "kind": "reconnecting", "coordinator": url }));
    }
}

pub(crate) fn gone(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal)
}

/// Streams the job's events with a progress bar; Ok once it succeeded, Err with the reason
/// when it failed or was cancelled. Survives a coordinator restart (reconnects, skips replayed
/// events).
/// "42s", "3m07s", "2h05m".
pub(crate) fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// With `json`, every event is one JSON object on stdout instead (`kind`: "state", "message",
/// "waiting", "metrics", and last "end" with the job), for scripts; the exit status is the same.
pub(crate) async fn follow(client: &mut JobServiceClient<smelt_proto::auth::AuthChannel>, job: &Job, json: bool) -> Result<()> {
    let bar = if json { ProgressBar::hidden() } else { ProgressBar::new(job.total_steps) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")?);
    bar.set_position(job.last_step);
    let say = |line: String| {
        if json {
            println!("{}", serde_json::json!({ "at_ms": crate::client::now_ms(), "kind": "waiting", "text": line }));
        } else if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    // What a waiting job waits for is said after the events replayed so far ("submitted" first),
    // once the stream has been quiet a moment, and only if the job is still in the state it was
    // in then (a job that has started since no longer waits).
    let mut waits = (!job.waiting_for.is_empty()).then(|| format!("{}: waits for {}", state_name(job_state(job)), job.waiting_for));
    let mut shown_state: Option<JobState> = None;
    // the last "waits for" line said, while the job still waits
    let mut said_wait: Option<String> = None;
    let every = (job.total_steps / 10).max(1);
    let mut seen = 0usize; // stored events already shown (a re-watch replays them)
    let mut last_val: Option<f32> = None;
    let mut last_acc: Option<f32> = None;
    let mut last_sources: Vec<SourceLoss> = Vec::new(); // a mixture's, at the last evaluation
    let mut reached = Instant::now();
    // the attempt the bar's estimate is of: a restart's wait for workers and its jump back to
    // the checkpoint's step are not training speed
    let mut estimating: Option<u32> = None;
    let end = 'watch: loop {
        let mut stream = match client.watch_job(WatchJobRequest { job_id: job.id.clone() }).await {
            Ok(s) => s.into_inner(),
            Err(e) if gone(e.code()) && reached.elapsed() < RECONNECT_FOR => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(status(e)),
        };
        reached = Instant::now();
        let mut index = 0usize;
        loop {
            // while the job waits, what it waits for is looked at again every few seconds and
            // said when it changed (workers connecting, a queue moving)
            let quiet = match (&waits, &said_wait) {
                (Some(_), _) => Some(WAITS_AFTER_QUIET),
                (None, Some(_)) => Some(WAITS_RECHECK),
                (None, None) => None,
            };
            let next = match quiet {
                // (`Streaming::message` is cancel-safe: a timeout loses no event)
                Some(after) => match tokio::time::timeout(after, stream.message()).await {
                    Ok(next) => next,
                    Err(_quiet) => {
                        let first = waits.take();
                        if shown_state.is_some_and(|s| s != job_state(job)) && first.is_some() {
                            continue; // it has moved on since the submission
                        }
                        match client.get_job(GetJobRequest { job_id: job.id.clone() }).await.map(|r| r.into_inner()) {
                            Ok(now) if matches!(job_state(&now), JobState::Queued | JobState::Restarting) && !now.waiting_for.is_empty() => {
                                let line = format!("{}: waits for {}", state_name(job_state(&now)), now.waiting_for);
                                if said_wait.as_deref() != Some(line.as_str()) {
                                    say(line.clone());
                                }
                                said_wait = Some(line);
                            }
                            Ok(_) => said_wait = None,
                            Err(_) => {
                                // the coordinator did not answer: the submission's words, once
                                if let Some(line) = first {
                                    say(line.clone());
                                    said_wait = Some(line);
                                }
                            }
                        }
                        continue;
                    }
                },
                None => stream.message().await,
            };
            let ev = match next {
                Ok(Some(ev)) => ev,
                // ended without a final state, or broken: the coordinator went away
                Ok(None) => {
                    lost_coordinator(json);
                    break;
                }
                Err(e) if gone(e.code()) => {
                    lost_coordinator(json);
                    break;
                }
                Err(e) => return Err(status(e)),
            };
            match ev.body {
                Some(job_event::Body::State(s)) => {
                    index += 1;
                    if index <= seen {
                        continue;
                    }
                    seen = index;
                    let to = JobState::try_from(s.to).unwrap_or_default();
                    if json {
                        let from = JobState::try_from(s.from).unwrap_or_default();
                        println!("{}", serde_json::json!({ "at_ms": ev.at_ms, "kind": "state", "from": state_name(from), "to": state_name(to), "text": s.reason }));
                    } else {
                        say(format!("{}: {}", state_name(to), s.reason));
                    }
                    shown_state = Some(to);
                    if !matches!(to, JobState::Queued | JobState::Restarting) {
                        said_wait = None;
                    }
                    if is_terminal(to) {
                        break 'watch to;
                    }
                }
                Some(job_event::Body::Message(m)) => {
                    index += 1;
                    if index <= seen {
                        continue;
                    }
                    seen = index;
                    if json {
                        println!("{}", serde_json::json!({ "at_ms": ev.at_ms, "kind": "message", "text": m }));
                    } else {
                        say(m);
                    }
                }
                Some(job_event::Body::Metrics(m)) => {
                    if estimating.is_some_and(|a| a != m.attempt) {
                        // a new attempt shows its own evaluations only (the last one's was of
                        // a step it may not have reached yet)
                        (last_val, last_acc, last_sources) = (None, None, Vec::new());
                    }
                    if m.val_loss.is_some() {
                        last_val = m.val_loss;
                    }
                    if m.val_accuracy.is_some() {
                        last_acc = m.val_accuracy;
                    }
                    if !m.val_sources.is_empty() {
                        last_sources = m.val_sources.clone();
                    }
                    if estimating != Some(m.attempt) {
                        estimating = Some(m.attempt);
                        bar.set_position(m.step);
                        bar.reset_eta();
                    }
                    bar.set_position(m.step);
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "at_ms": ev.at_ms, "kind": "metrics", "attempt": m.attempt, "step": m.step, "loss": m.loss,
                                "val_loss": m.val_loss, "val_accuracy": m.val_accuracy, "tokens_per_s": m.tokens_per_s, "mfu": m.mfu, "lr": m.lr,
                            })
                        );
                        continue;
                    }
                    let acc = last_acc.map(|a| format!(" acc {a:.4}")).unwrap_or_default();
                    let sources = crate::source_losses::bracketed(&last_sources);
                    let val = last_val.map(|v| format!(" | val {v:.4}{sources}{acc}")).unwrap_or_default();
                    let mfu = m.mfu.map(|u| format!(" | mfu {:.1}%", 100.0 * u)).unwrap_or_default();
                    bar.set_message(format!("loss {:.4}{val} | {:.0} tok/s{mfu}", m.loss, m.tokens_per_s));
                    if bar.is_hidden() && (m.step % every == 0 || m.val_loss.is_some()) {
                        // the bar's estimate, kept while hidden: plain lines (a log file, CI) say it too
                        let eta = (m.step < job.total_steps && !bar.eta().is_zero()).then(|| format!(" | eta {}", short_duration(bar.eta()))).unwrap_or_default();
                        eprintln!(
                            "step {}/{}: loss {:.4}{val} | {:.0} tok/s{mfu}{eta}",
                            m.step, job.total_steps, m.loss, m.tokens_per_s
                        );
                    }
                }
                None => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    let j = client.get_job(GetJobRequest { job_id: job.id.clone() }).await.map_err(status)?.into_inner();
    if json {
        println!("{}", serde_json::json!({ "kind": "end", "at_ms": crate::client::now_ms(), "job": crate::client::job_json(&j) }));
    }
    match end {
        JobState::Succeeded => {
            let acc = j.last_val_accuracy.map(|a| format!(", val accuracy {a:.4}")).unwrap_or_default();
            let loss = crate::client::reported_loss(&j).map_or(String::from("no step trained"), |l| format!("loss {l:.4}"));
            eprintln!("job {} succeeded at step {} ({loss}{acc})", j.id, j.last_step);
            Ok(())
        }
        s => {
            if s == JobState::Failed {
                last_log_lines(client, &j).await;
            }
            let why = if j.error.is_empty() { "no reason recorded".to_string() } else { j.error.clone() };
            let ended = if is_terminal(job_state(&j)) { job_state(&j) } else { s };
            let status = if ended == JobState::Cancelled { crate::client::JOB_CANCELLED } else { crate::client::JOB_FAILED };
            Err(crate::client::failure(status, format!("job {} {}: {why}", j.id, state_name(ended))))
        }
    }
}

/// Lines of the failed attempt's log shown when a followed job fails.
const FAILED_TAIL: u32 = 12;

/// The last lines its workers logged in the attempt that failed (nothing when there are none,
/// or the coordinator cannot say).
async fn last_log_lines(client: &mut JobServiceClient<smelt_proto::auth::AuthChannel>, j: &Job) {
    let req = JobLogsRequest { job_id: j.id.clone(), after: 0, limit: 0, attempt: Some(j.attempt), rank: None, tail: FAILED_TAIL, min_level: String::new() };
    let Ok(page) = client.job_logs(req).await else { return };
    let lines = page.into_inner().lines;
    if lines.is_empty() {
        return;
    }
    eprintln!("last lines its workers logged in attempt {} (all of them: smelt jobs logs {}):", j.attempt, j.id);
    for l in &lines {
        eprintln!("  {}", crate::cmd_job_logs::format_line(l));
    }
}

#[cfg(test)]
mod tests {
    use super::short_duration;
    use std::time::Duration;

    #[test]
    fn durations_are_short() {
        let d = |s| short_duration(Duration::from_secs(s));
        assert_eq!((d(0), d(42), d(187), d(7500)), ("0s".to_string(), "42s".to_string(), "3m07s".to_string(), "2h05m".to_string()));
    }
}
