//! Which checkpoints to keep: the newest `keep_last`, and every one whose step is a multiple of
//! `keep_every`. Runs after a commit, so what it deletes is always older than a checkpoint that
//! has just landed; the newest committed one is never deleted. A deletion removes the manifest
//! first: from that moment the checkpoint no longer exists, and a crash halfway leaves only
//! invisible files, which the next pass sweeps.
//!
//! A directory without a manifest is swept only once it is older than the newest commit *and*
//! nothing in it has been written for [`Retention::sweep_after_s`]. Two writers can share a
//! root (a rank 0 still saving its rescue checkpoint while the job's next attempt, placed after a
//! coordinator restart or a wait that ran out, commits newer steps): without the grace period one
//! writer's retention would delete the files of the other's upload in progress, and that upload
//! would then commit a manifest over missing files. The writer also checks its files are all
//! there just before it commits (`write::commit`).

use smelt_corpus::StoreDir;
use tracing::{info, warn};

use crate::error::Result;
use crate::layout::{step_dir_name, MANIFEST};
use crate::manifest::now_ms;
use crate::read::{list_step_dirs, StepDir};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Newest committed checkpoints kept (at least 1).
    pub keep_last: u32,
    /// Also keep every checkpoint whose step is a multiple of this (0: none).
    pub keep_every: u64,
    /// An uncommitted directory is a dead upload, to sweep, once nothing in it was written for
    /// this long. A file appears when its upload completes (a multipart one's parts are
    /// invisible, and S3 stamps it with the time its upload began), so this must exceed the
    /// longest upload of one file; one that takes longer may see its directory swept, and its
    /// commit then fails (`Vanished`) rather than commit over missing files.
    pub sweep_after_s: u64,
}

/// [`Retention::sweep_after_s`]'s default: an hour.
pub const SWEEP_AFTER_S: u64 = 3600;

impl Default for Retention {
    fn default() -> Self {
        Retention { keep_last: 3, keep_every: 0, sweep_after_s: SWEEP_AFTER_S }
    }
}

/// The steps to delete, given every step directory under a root and the time now (ms, the
/// store's clock as near as the caller knows it). Committed ones beyond the policy, and
/// uncommitted ones older than the newest commit and silent for `sweep_after_s` (an upload that
/// died); nothing at all when no checkpoint is committed.
pub fn plan_deletions(steps: &[(u64, StepDir)], policy: Retention, now_ms: i64) -> Vec<u64> {
    let mut committed: Vec<u64> = steps.iter().filter(|(_, d)| d.committed).map(|(s, _)| *s).collect();
    committed.sort_unstable();
    let Some(&newest) = committed.last() else { return Vec::new() };
    let keep_last = policy.keep_last.max(1) as usize;
    let recent = &committed[committed.len().saturating_sub(keep_last)..];
    let silent_ms = i64::try_from(policy.sweep_after_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut out: Vec<u64> = steps
        .iter()
        .filter(|(s, d)| {
            if !d.committed {
                return *s < newest && now_ms.saturating_sub(d.newest_ms) >= silent_ms;
            }
            let kept = recent.contains(s) || (policy.keep_every > 0 && s % policy.keep_every == 0);
            !kept
        })
        .map(|(s, _)| *s)
        .collect();
    out.sort_unstable();
    out
}

/// Applies the policy under `root`; returns the steps deleted. A failed delete is logged and
/// left for the next pass.
pub fn apply(root: &StoreDir, policy: Retention) -> Result<Vec<u64>> {
    let steps: Vec<(u64, StepDir)> = list_step_dirs(root)?.into_iter().collect();
    // "now" by the store's clock, which stamped the objects: the newest object under the root
    // (the commit that runs this pass has just written one), or the local clock if that is
    // earlier; a local clock running ahead of the store's would make live uploads look silent.
    // Either lagging only makes fewer uploads look dead.
    let store_now = steps.iter().map(|(_, d)| d.newest_ms).max().unwrap_or(i64::MIN);
    let plan = plan_deletions(&steps, policy, store_now.min(now_ms()));
    let mut deleted = Vec::new();
    for step in plan {
        let dir = root.join(&step_dir_name(step));
        let files = dir.list_info("")?;
        // an upload planned as dead that has since committed, or been written to: alive
        let was = steps.iter().find(|(s, _)| *s == step).map(|(_, d)| *d);
        if was.is_some_and(|d| !d.committed)
            && files.iter().any(|(n, o)| n == MANIFEST || was.is_some_and(|d| o.modified_ms > d.newest_ms))
        {
            info!(uri = %dir.uri(), step, "retention: an upload taken for dead is alive; kept");
            continue;
        }
        // The manifest first: the checkpoint stops existing before any of its data goes.
        let ordered = files.iter().filter(|(n, _)| n == MANIFEST).chain(files.iter().filter(|(n, _)| n != MANIFEST));
        let mut ok = true;
        for (name, _) in ordered {
            if let Err(e) = dir.delete(name) {
                warn!(uri = %dir.uri_of(name), error = %e, "retention: delete failed; left for the next pass");
                ok = false;
                break;
            }
        }
        if ok {
            // a local store keeps directories: the step's, now empty, goes too (left, it reads
            // as a checkpoint whose upload never finished); remove_dir takes only an empty one
            if let Some(path) = dir.local_dir() {
                let _ = std::fs::remove_dir(path);
            }
            info!(uri = %dir.uri(), step, "retention: checkpoint deleted");
            deleted.push(step);
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const HOUR_MS: i64 = 3_600_000;

    /// Committed steps, each written an hour before [`NOW`].
    fn committed(steps: &[u64]) -> Vec<(u64, StepDir)> {
        steps.iter().map(|&s| (s, StepDir { committed: true, newest_ms: NOW - HOUR_MS })).collect()
    }

    fn dir(committed: bool, age_ms: i64) -> StepDir {
        StepDir { committed, newest_ms: NOW - age_ms }
    }

    fn policy(keep_last: u32, keep_every: u64) -> Retention {
        Retention { keep_last, keep_every, ..Retention::default() }
    }

    #[test]
    fn keeps_last_n_and_every_mth() {
        let steps = committed(&[10, 20, 30, 40, 50, 60]);
        assert_eq!(plan_deletions(&steps, policy(2, 0), NOW), [10, 20, 30, 40]);
        assert_eq!(plan_deletions(&steps, policy(2, 20), NOW), [10, 30]);
    }

    #[test]
    fn never_deletes_the_newest_or_anything_without_a_commit() {
        assert_eq!(plan_deletions(&committed(&[10]), policy(0, 0), NOW), Vec::<u64>::new());
        // Nothing committed: partial uploads stay (one may be in progress).
        let partial = [(10, dir(false, 2 * HOUR_MS)), (20, dir(false, 2 * HOUR_MS))];
        assert!(plan_deletions(&partial, Retention::default(), NOW).is_empty());
        // A partial newer than the newest commit may be the upload in progress: kept.
        let steps = [(10, dir(true, 3 * HOUR_MS)), (20, dir(false, 2 * HOUR_MS)), (30, dir(true, HOUR_MS)), (40, dir(false, 2 * HOUR_MS))];
        assert_eq!(plan_deletions(&steps, policy(5, 0), NOW), [20]);
    }

    #[test]
    fn an_upload_written_to_within_the_grace_period_is_not_swept() {
        // step 20 is older than the newest commit, but another writer (a rank 0 still saving
        // its rescue checkpoint) wrote to it a minute ago: it may yet commit
        let steps = [(10, dir(true, 3 * HOUR_MS)), (20, dir(false, 60_000)), (30, dir(true, 0))];
        assert!(plan_deletions(&steps, policy(5, 0), NOW).is_empty());
        // silent for exactly the grace period: dead
        let steps = [(10, dir(true, 3 * HOUR_MS)), (20, dir(false, HOUR_MS)), (30, dir(true, 0))];
        assert_eq!(plan_deletions(&steps, policy(5, 0), NOW), [20]);
        // a shorter grace period sweeps it sooner
        let steps = [(20, dir(false, 60_000)), (30, dir(true, 0))];
        assert_eq!(plan_deletions(&steps, Retention { sweep_after_s: 60, ..policy(5, 0) }, NOW), [20]);
        assert!(plan_deletions(&steps, Retention { sweep_after_s: 61, ..policy(5, 0) }, NOW).is_empty());
    }
}
