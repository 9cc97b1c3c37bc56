//! Which checkpoints to keep: the newest `keep_last`, and every one whose step is a multiple of
//! `keep_every`. Runs after a commit, so what it deletes is always older than a checkpoint that
//! has just landed; the newest committed one is never deleted. A deletion removes the manifest
//! first: from that moment the checkpoint no longer exists, and a crash halfway leaves only
//! invisible files, which the next pass sweeps.

use smelt_corpus::StoreDir;
use tracing::{info, warn};

use crate::error::Result;
use crate::layout::{step_dir_name, MANIFEST};
use crate::read::list_steps;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Newest committed checkpoints kept (at least 1).
    pub keep_last: u32,
    /// Also keep every checkpoint whose step is a multiple of this (0: none).
    pub keep_every: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { keep_last: 3, keep_every: 0 }
    }
}

/// The steps to delete, given every step directory under a root (`true`: committed). Committed
/// ones beyond the policy, and uncommitted ones older than the newest commit (an upload that
/// died); nothing at all when no checkpoint is committed.
pub fn plan_deletions(steps: &[(u64, bool)], policy: Retention) -> Vec<u64> {
    let mut committed: Vec<u64> = steps.iter().filter(|(_, c)| *c).map(|(s, _)| *s).collect();
    committed.sort_unstable();
    let Some(&newest) = committed.last() else { return Vec::new() };
    let keep_last = policy.keep_last.max(1) as usize;
    let recent = &committed[committed.len().saturating_sub(keep_last)..];
    let mut out: Vec<u64> = steps
        .iter()
        .filter(|(s, c)| {
            if !*c {
                return *s < newest;
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
    let steps: Vec<(u64, bool)> = list_steps(root)?.into_iter().collect();
    let plan = plan_deletions(&steps, policy);
    let mut deleted = Vec::new();
    for step in plan {
        let dir = root.join(&step_dir_name(step));
        let files = dir.list("")?;
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
            info!(uri = %dir.uri(), step, "retention: checkpoint deleted");
            deleted.push(step);
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(steps: &[u64]) -> Vec<(u64, bool)> {
        steps.iter().map(|&s| (s, true)).collect()
    }

    #[test]
    fn keeps_last_n_and_every_mth() {
        let steps = committed(&[10, 20, 30, 40, 50, 60]);
        let p = Retention { keep_last: 2, keep_every: 0 };
        assert_eq!(plan_deletions(&steps, p), [10, 20, 30, 40]);
        let p = Retention { keep_last: 2, keep_every: 20 };
        assert_eq!(plan_deletions(&steps, p), [10, 30]);
    }

    #[test]
    fn never_deletes_the_newest_or_anything_without_a_commit() {
        assert_eq!(plan_deletions(&committed(&[10]), Retention { keep_last: 0, keep_every: 0 }), Vec::<u64>::new());
        // Nothing committed: partial uploads stay (one may be in progress).
        assert!(plan_deletions(&[(10, false), (20, false)], Retention::default()).is_empty());
        // A partial newer than the newest commit may be the upload in progress: kept.
        let steps = [(10, true), (20, false), (30, true), (40, false)];
        assert_eq!(plan_deletions(&steps, Retention { keep_last: 5, keep_every: 0 }), [20]);
    }
}
