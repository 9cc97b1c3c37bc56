//! `smelt checkpoints list <job id | store URI>`: the committed checkpoints (those with a
//! MANIFEST.json) with step, size, age, and whether every file still matches its manifest's
//! size and sha256.
//!
//! A job id is asked of the coordinator: its recorded checkpoints' directory, else
//! `checkpoint.store` of its spec; with `--store` (or SMELT_STORE, as `sample`, `eval` and
//! `export` take it) it is looked up there instead, no coordinator needed. A URI is a
//! `…/jobs/<job>/ckpt` directory, a job's own directory (its `ckpt/`), or a store root whose
//! `jobs/*/ckpt` directories are all listed. A URI with nothing to list (missing, empty,
//! one checkpoint's own directory) is an error naming it.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use smelt_checkpoint::layout::{parent_uri, MANIFEST};
use smelt_checkpoint::read::{list_steps, read_manifest};
use smelt_checkpoint::{checkpoints_root, list_committed, looks_like_job_id, step_dir_name, verify, Manifest};
use smelt_corpus::store::has_scheme;
use smelt_corpus::StoreDir;
use smelt_jobspec::JobSpec;
use smelt_proto::v1::GetJobRequest;

use crate::client::{age, connect, exit_on_error, runtime, status, table, CoordinatorUrl};

/// `smelt checkpoints [list] TARGET`: `list` may be left out.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CheckpointsCli {
    #[command(subcommand)]
    pub command: Option<CheckpointsCommand>,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Subcommand, Debug)]
pub enum CheckpointsCommand {
    /// Committed checkpoints of a job (by id) or under a store URI, verified.
    List(ListArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// A job id (asks the coordinator where its checkpoints are, unless --store), a
    /// `…/jobs/<job>/ckpt` URI (or the job's directory), or a store root.
    // (optional to clap only: `smelt checkpoints TARGET` and `... list TARGET` share these
    // arguments, and the missing target is reported by `run`)
    pub target: Option<String>,
    #[command(flatten)]
    pub coordinator: CoordinatorUrl,
    /// For a job id: the store root holding its `jobs/<job>/ckpt`, read without asking the
    /// coordinator (as `sample`, `eval` and `export` resolve job ids).
    #[arg(long, env = "SMELT_STORE")]
    pub store: Option<String>,
    /// Only read the manifests: do not hash every file.
    #[arg(long)]
    pub no_verify: bool,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: CheckpointsCli) -> Result<()> {
    let a = match c.command {
        Some(CheckpointsCommand::List(a)) => a,
        None => c.list,
    };
    if a.target.is_none() {
        anyhow::bail!("smelt checkpoints: name a job id, a job's ckpt/ URI or a store root to list (see --help)");
    }
    exit_on_error(list(&a))
}

/// One committed checkpoint as listed.
struct Row {
    job: String,
    step: u64,
    uri: String,
    manifest: Option<Manifest>,
    /// "ok", "unchecked", or why it fails verification.
    status: String,
}

fn list(a: &ListArgs) -> Result<()> {
    let roots = roots_of(a)?;
    let mut rows = Vec::new();
    for (job, root) in &roots {
        for (step, uri) in list_committed(root).with_context(|| format!("listing {}", root.uri()))? {
            let dir = root.join(&step_dir_name(step));
            let (manifest, status) = if a.no_verify {
                match read_manifest(&dir) {
                    Ok(m) => (Some(m), "unchecked".to_string()),
                    Err(e) => (None, format!("bad: {e}")),
                }
            } else {
                match verify(&dir) {
                    Ok(m) => (Some(m), "ok".to_string()),
                    Err(e) => (read_manifest(&dir).ok(), format!("corrupt: {e}")),
                }
            };
            rows.push(Row { job: job.clone(), step, uri, manifest, status });
        }
    }
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "job_id": r.job,
                    "step": r.step,
                    "uri": r.uri,
                    "bytes": r.manifest.as_ref().map(size_of),
                    "created_at_ms": r.manifest.as_ref().map(|m| m.created_at_ms),
                    "verified": r.status == "ok",
                    "status": r.status,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if rows.is_empty() {
        let where_: Vec<&str> = roots.iter().map(|(_, r)| r.uri()).collect();
        println!("no committed checkpoints under {}", where_.join(", "));
    } else {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.job.clone(),
                    r.step.to_string(),
                    r.manifest.as_ref().map_or("-".into(), |m| human_bytes(size_of(m))),
                    r.manifest.as_ref().map_or("-".into(), |m| format!("{} ago", age(m.created_at_ms))),
                    // the word; the why goes under the table (a sha256 pair would make the
                    // column some 250 characters wide)
                    r.status.split(':').next().unwrap_or_default().to_string(),
                    r.uri.clone(),
                ]
            })
            .collect();
        println!("{}", table(&["JOB", "STEP", "SIZE", "CREATED", "STATUS", "URI"], &cells));
        for r in rows.iter().filter(|r| r.status.contains(':')) {
            println!("{} step {}: {}", r.job, r.step, r.status);
        }
    }
    // as a checker does (`sha256sum -c`): everything listed, then a non-zero exit when any
    // checkpoint does not verify, so a script need not parse the table
    let bad = rows.iter().filter(|r| r.status.contains(':')).count();
    if bad > 0 {
        anyhow::bail!("{bad} of {} checkpoints do not verify (listed above)", rows.len());
    }
    Ok(())
}

fn size_of(m: &Manifest) -> u64 {
    m.files.iter().map(|f| f.size).sum()
}

fn human_bytes(n: u64) -> String {
    match n {
        0..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// The `ckpt/` directories to list, with the job each belongs to.
fn roots_of(a: &ListArgs) -> Result<Vec<(String, StoreDir)>> {
    let t = a.target.as_deref().unwrap_or_default().trim();
    if looks_like_job_id(t) && !std::path::Path::new(t).exists() {
        if let Some(store) = &a.store {
            return Ok(vec![(t.to_string(), checkpoints_root(&StoreDir::open(store)?, t))]);
        }
        let job = runtime()?
            .block_on(async {
                let mut client = connect(&a.coordinator.url).await?;
                client.get_job(GetJobRequest { job_id: t.to_string() }).await.map_err(status).map(|r| r.into_inner())
            })
            // the hint added, the exit status kept (5: the coordinator unreachable)
            .map_err(|e| {
                crate::client::failure(
                    crate::client::exit_status(&e),
                    format!("{e:#}\n(to list a job's checkpoints without the coordinator: --store <store root>, or SMELT_STORE)"),
                )
            })?;
        if let Some(root) = parent_uri(&job.last_checkpoint_uri).filter(|_| !job.last_checkpoint_uri.is_empty()) {
            return Ok(vec![(job.id, StoreDir::open(&root)?)]);
        }
        let spec = JobSpec::parse(&job.spec_toml).with_context(|| format!("job {t}: its spec"))?;
        if spec.checkpoint.every == 0 {
            let weights = if job.model_uri.is_empty() { String::new() } else { format!("; its final weights are {}", job.model_uri) };
            bail!("job {t} does not checkpoint (its spec's [checkpoint] every is 0, or not given){weights}");
        }
        let Some(store) = spec.checkpoint.store else {
            bail!(
                "job {t} has no checkpoint recorded and its spec names no checkpoint.store (its checkpoints, if any, are in \
                 the output directory of its rank 0 worker): pass that store's URI instead"
            );
        };
        return Ok(vec![(job.id, checkpoints_root(&StoreDir::open(&store)?, t))]);
    }
    let dir = StoreDir::open(t)?;
    let trimmed = t.trim_end_matches('/');
    let has_steps = !list_steps(&dir)?.is_empty();
    // a job's checkpoints directory with none yet (a job that has not checkpointed) lists empty;
    // one that is not there is an error
    if trimmed.ends_with("/ckpt") && !has_steps && missing_locally(t) {
        return Err(nothing_to_list(t, &dir));
    }
    if has_steps || trimmed.ends_with("/ckpt") {
        let job = trimmed.trim_end_matches("/ckpt").rsplit('/').next().unwrap_or_default().to_string();
        return Ok(vec![(job, dir)]);
    }
    // a job's own directory (…/jobs/<job>): its ckpt/
    if parent_uri(trimmed).is_some_and(|p| p.trim_end_matches('/').ends_with("jobs")) {
        let ckpt = dir.join("ckpt");
        if !list_steps(&ckpt)?.is_empty() {
            let job = trimmed.rsplit('/').next().unwrap_or_default().to_string();
            return Ok(vec![(job, ckpt)]);
        }
    }
    // A store root: every jobs/<job>/ckpt under it.
    let mut jobs: Vec<String> = dir
        .list("jobs/")
        .with_context(|| format!("listing {}", dir.uri_of("jobs/")))?
        .into_iter()
        .filter_map(|(name, _)| {
            let mut parts = name.split('/');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("jobs"), Some(job), Some("ckpt")) => Some(job.to_string()),
                _ => None,
            }
        })
        .collect();
    jobs.dedup();
    if jobs.is_empty() {
        return Err(nothing_to_list(t, &dir));
    }
    Ok(jobs.into_iter().map(|j| (j.clone(), checkpoints_root(&dir, &j))).collect())
}

/// Why `target`, a location named on the command line, has nothing to list: missing, one
/// checkpoint rather than their directory, or something else.
fn nothing_to_list(target: &str, dir: &StoreDir) -> anyhow::Error {
    let uri = dir.uri();
    if missing_locally(target) {
        return anyhow!("{uri} does not exist: expected {EXPECTED}");
    }
    if dir.size(MANIFEST).ok().flatten().is_some() {
        if let Some(parent) = parent_uri(uri) {
            return anyhow!("{uri} is one checkpoint, not a directory of them: list its parent, {parent}");
        }
    }
    anyhow!("no checkpoints under {uri}: expected {EXPECTED}")
}

/// Whether `target` is a local path (or file:// URI) that does not exist. Only a local path can
/// be told missing cheaply; a store has no directories to look for.
fn missing_locally(target: &str) -> bool {
    let local = if has_scheme(target) { target.strip_prefix("file://") } else { Some(target) };
    local.is_some_and(|p| !std::path::Path::new(p).exists())
}

const EXPECTED: &str =
    "a job id, a checkpoints directory (…/jobs/<job>/ckpt, the parent of each step's directory), or a store root holding jobs/<job>/ckpt";
