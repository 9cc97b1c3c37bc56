//! The name of a small file written and removed again to learn whether a place can be written
//! before any work depends on it (a worker's output directory, a job's checkpoint store).

use std::sync::atomic::{AtomicU64, Ordering};

/// Unique per call: workers in one process (tests, an embedding) may share a directory, and two
/// jobs' rank 0 in one process may share a store.
pub fn probe_name() -> String {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    format!(".write-probe-{}-{}", std::process::id(), PROBES.fetch_add(1, Ordering::Relaxed))
}
