//! `smelt jobs logs ID`: the lines a job's workers logged (info and above, every rank, every
//! attempt), as the coordinator keeps them; `--follow` polls for new lines until the job ends
//! (and a few seconds more, for its ranks' last words).

use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::Result;
use clap::Args;
use smelt_proto::v1::{GetJobRequest, JobLogLine, JobLogsRequest};

use crate::client::{connect, job_state, status, CoordinatorUrl};

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub id: String,
    #[command(flatten)]
    pub coordinator: CoordinatorUrl,
    /// Keep printing new lines until the job ends.
    #[arg(long, short)]
    pub follow: bool,
    /// Only this attempt's lines (1 is the first run; a restart is the next).
    #[arg(long)]
    pub attempt: Option<u32>,
    /// Only this rank's lines.
    #[arg(long)]
    pub rank: Option<u32>,
    /// Start with the last N lines instead of every line (0: none; with --follow, only new lines).
    #[arg(long)]
    pub tail: Option<u32>,
    /// Only lines at this level or above: info (every line), warn or error.
    #[arg(long, default_value = "info", value_parser = ["info", "warn", "error"])]
    pub level: String,
    /// One JSON object per line (seq, attempt, rank, worker_id, at_ms, level, target, text).
    #[arg(long)]
    pub json: bool,
}

/// How often `--follow` asks for new lines.
const POLL: Duration = Duration::from_millis(500);

/// How long `--follow` reads on at most after the job has ended, waiting for the coordinator to
/// say its ranks' last lines are all in (`settled`): a rank saving a rescue checkpoint ends late.
const SETTLE_AT_MOST: Duration = Duration::from_secs(120);

pub async fn run(a: LogsArgs) -> Result<()> {
    if a.attempt == Some(0) {
        anyhow::bail!("--attempt 0: attempts count from 1 (the first run; each restart is the next)");
    }
    let mut client = connect(&a.coordinator.url).await?;
    // a rank or attempt the job never had prints nothing: said instead
    if a.rank.is_some() || a.attempt.is_some() {
        let job = client.get_job(GetJobRequest { job_id: a.id.clone() }).await.map_err(status)?.into_inner();
        if let Some(r) = a.rank.filter(|&r| r >= job.world_size) {
            anyhow::bail!("--rank {r}: job {} has ranks 0 to {}", a.id, job.world_size.saturating_sub(1));
        }
        if let Some(n) = a.attempt.filter(|&n| n > job.attempt.max(1)) {
            anyhow::bail!("--attempt {n}: job {} has had {} attempt{} so far", a.id, job.attempt, if job.attempt == 1 { "" } else { "s" });
        }
    }
    let request =
        |after: u64, tail: u32| JobLogsRequest { job_id: a.id.clone(), after, limit: 0, attempt: a.attempt, rank: a.rank, tail, min_level: a.level.clone() };
    let mut after = 0;
    if let Some(n) = a.tail {
        // the coordinator reads tail 0 as "no tail": for --tail 0 the last line is asked for
        // only to learn where the log ends (and that the job is there), and not printed
        let page = client.job_logs(request(0, n.max(1))).await.map_err(status)?.into_inner();
        if n > 0 {
            print_lines(&page.lines, a.json)?;
        }
        after = page.next;
        if !a.follow {
            return Ok(());
        }
    }
    // once the job has ended, its other ranks' last lines (their abort, their failure, a
    // rescue) may still be on their way: a follower reads on until the coordinator says they
    // are all in, or SETTLE_AT_MOST has passed (their lines are stored either way, and a later
    // read shows them)
    let mut ended_at: Option<Instant> = None;
    // a follower outlives a coordinator restart, as `jobs follow` does: it reads on from where
    // it was once the coordinator is back (within RECONNECT_FOR)
    let mut lost_at: Option<Instant> = None;
    loop {
        // the job's state before the read: lines sent before its end are in that read
        if a.follow && ended_at.is_none() {
            let job = match client.get_job(GetJobRequest { job_id: a.id.clone() }).await {
                Ok(j) => j.into_inner(),
                Err(e) => {
                    retry(a.follow, &mut lost_at, e)?;
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            if crate::cmd_submit::is_terminal(job_state(&job)) {
                ended_at = Some(Instant::now());
            }
        }
        let page = match client.job_logs(request(after, 0)).await {
            Ok(p) => p.into_inner(),
            Err(e) => {
                retry(a.follow, &mut lost_at, e)?;
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        lost_at = None;
        print_lines(&page.lines, a.json)?;
        after = page.next;
        if page.more {
            continue;
        }
        // settled is read before the page: the page holds every line sent before it was true
        if !a.follow || (ended_at.is_some() && page.settled) || ended_at.is_some_and(|t| t.elapsed() >= SETTLE_AT_MOST) {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Ok (read again) when a follower lost the coordinator, said once, until RECONNECT_FOR has
/// passed since; the error otherwise.
fn retry(follow: bool, lost_at: &mut Option<Instant>, e: tonic::Status) -> Result<()> {
    use crate::cmd_submit::{gone, RECONNECT_FOR};
    if !(follow && gone(e.code())) || lost_at.is_some_and(|t| t.elapsed() >= RECONNECT_FOR) {
        return Err(status(e));
    }
    if lost_at.is_none() {
        eprintln!("{}; reconnecting (for up to {} s)", status(e), RECONNECT_FOR.as_secs());
        *lost_at = Some(Instant::now());
    }
    Ok(())
}

fn print_lines(lines: &[JobLogLine], json: bool) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for l in lines {
        if json {
            let v = serde_json::json!({
                "seq": l.seq, "attempt": l.attempt, "rank": l.rank, "worker_id": l.worker_id,
                "at_ms": l.at_ms, "level": l.level, "target": l.target, "text": l.text,
            });
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", format_line(l))?;
        }
    }
    Ok(())
}

/// `2026-11-28T07:31:43.532Z a1 r0 w-000001  INFO smelt_worker::runner: training started ...`
pub fn format_line(l: &JobLogLine) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(l.at_ms.max(0) as u64);
    format!(
        "{} a{} r{} {} {:>5} {}: {}",
        humantime::format_rfc3339_millis(at),
        l.attempt,
        l.rank,
        l.worker_id,
        l.level,
        l.target,
        l.text
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_as_the_worker_logged_it_with_its_rank() {
        let l = JobLogLine {
            seq: 9,
            attempt: 2,
            rank: 1,
            worker_id: "w-000003".into(),
            at_ms: 1_795_851_103_532,
            level: "WARN".into(),
            target: "smelt_worker::agent".into(),
            text: "assignment failed error=peer lost".into(),
        };
        // 1_795_851_103_532 ms after the epoch, independently: 20,785 days and 27,103.532 s
        // (2026-11-28 is day 20,785 since 1970-01-01; 27,103 s is 07:31:43)
        assert_eq!(format_line(&l), "2026-11-28T07:31:43.532Z a2 r1 w-000003  WARN smelt_worker::agent: assignment failed error=peer lost");
    }
}
