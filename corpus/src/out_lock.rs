//! One `smelt corpus prepare` at a time per output: `<out>/prepare.lock`, put create-only (the
//! store settles a race, as for a checkpoint's manifest) and deleted when the run ends. Two runs
//! writing one `--out` at once both reported success, the manifest was one of theirs and the
//! other's shards lay beside it, `verify` saying ok. A lock left by a run that died (SIGKILL, a
//! lost machine) is taken over when it names this machine and a process no longer running;
//! otherwise the error names its holder and what to delete. A store that cannot put
//! create-only (an S3-compatible server without conditional writes, some network filesystems)
//! or that this run cannot write is warned of and prepared without a lock, as before.

use serde_json::json;

use crate::error::CorpusError;
use crate::store::StoreDir;

pub const LOCK: &str = "prepare.lock";

/// Held while a run writes its output; dropping it deletes the lock (if one was taken).
pub struct OutLock {
    out: Option<StoreDir>,
}

impl Drop for OutLock {
    fn drop(&mut self) {
        let Some(out) = &self.out else { return };
        if let Err(e) = out.delete(LOCK) {
            tracing::warn!(uri = %out.uri_of(LOCK), error = %e, "could not delete the prepare lock; the next run on this machine takes it over");
        }
    }
}

/// This machine's name, where the system tells it (Linux); empty elsewhere.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// Whether process `pid` of this machine is running; `None` where that cannot be told.
fn running(pid: u64) -> Option<bool> {
    std::path::Path::new("/proc/self").exists().then(|| std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// A lock naming this machine and a process that is not running: its run is over. (Our own pid
/// is not a holder either: this process holds no lock yet. In a container a restarted run often
/// gets the same pid as the one that died.)
fn is_stale(held: &serde_json::Value) -> bool {
    let (their_host, pid) = (held["host"].as_str().unwrap_or(""), held["pid"].as_u64().unwrap_or(0));
    let me = host();
    !me.is_empty() && their_host == me && pid != 0 && (pid == u64::from(std::process::id()) || running(pid) == Some(false))
}

/// Takes `<out>/prepare.lock` for this process.
pub fn lock(out: &StoreDir) -> Result<OutLock, CorpusError> {
    let started_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let me = serde_json::to_vec(&json!({"host": host(), "pid": std::process::id(), "started_ms": started_ms})).expect("json");
    let mut took_over = false;
    for _ in 0..3 {
        match out.put_create(LOCK, me.clone()) {
            Ok(true) => return Ok(OutLock { out: Some(out.clone()) }),
            Ok(false) => {}
            // nothing can be written there: failing now, not once the whole input is tokenized
            Err(e) if e.is_no_bucket() => return Err(e.into()),
            Err(e) => {
                tracing::warn!(uri = %out.uri_of(LOCK), error = %e, "cannot lock the output (the store has no create-only put, or this run cannot write there); preparing without a lock: run one prepare at a time on it");
                return Ok(OutLock { out: None });
            }
        }
        let held = match out.get(LOCK) {
            Ok(b) => serde_json::from_slice::<serde_json::Value>(&b).unwrap_or_default(),
            Err(e) if e.is_not_found() => continue, // its run ended meanwhile: try again
            Err(e) => return Err(e.into()),
        };
        if !took_over && is_stale(&held) {
            // deleted, then created again create-only: of two runs taking over at once, one wins
            tracing::info!(uri = %out.uri_of(LOCK), pid = held["pid"].as_u64().unwrap_or(0), "taking over the prepare lock of a run that is no longer running");
            out.delete(LOCK)?;
            took_over = true;
            continue;
        }
        return Err(CorpusError::Invalid(format!(
            "{}: another `smelt corpus prepare` is writing here (process {} on {}); wait for it to end, or, if no run is \
             writing this output, delete {}",
            out.uri(),
            held["pid"].as_u64().map_or("?".to_string(), |p| p.to_string()),
            held["host"].as_str().filter(|h| !h.is_empty()).unwrap_or("an unknown machine"),
            out.uri_of(LOCK)
        )));
    }
    Err(CorpusError::Invalid(format!("{}: could not take {} (other runs kept taking it)", out.uri(), out.uri_of(LOCK))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_one_runs_and_a_dead_runs_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let out = StoreDir::open(&dir.path().display().to_string()).unwrap();
        let held = lock(&out).unwrap();
        assert!(dir.path().join(LOCK).exists());
        // held by this process: a second lock is refused... (this pid would be taken for a dead
        // run's, so the holder is written as another live process: pid 1)
        let live = json!({"host": host(), "pid": 1});
        std::fs::write(dir.path().join(LOCK), live.to_string()).unwrap();
        let e = lock(&out).err().expect("a live holder refuses").to_string();
        assert!(e.contains("another `smelt corpus prepare` is writing here (process 1 on "), "{e}");
        // ...another machine's is never taken over; nor an unreadable one
        std::fs::write(dir.path().join(LOCK), json!({"host": "elsewhere", "pid": 1234567}).to_string()).unwrap();
        assert!(lock(&out).is_err());
        std::fs::write(dir.path().join(LOCK), "{ not json").unwrap();
        assert!(lock(&out).err().unwrap().to_string().contains("an unknown machine"));
        // a process of this machine that is gone, or this very pid (a container's restarted run)
        for pid in [u64::from(std::process::id()), 4_000_000_000] {
            std::fs::write(dir.path().join(LOCK), json!({"host": host(), "pid": pid}).to_string()).unwrap();
            let again = lock(&out).unwrap();
            let now: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(LOCK)).unwrap()).unwrap();
            assert_eq!(now["pid"].as_u64(), Some(u64::from(std::process::id())));
            drop(again);
            assert!(!dir.path().join(LOCK).exists(), "dropped, the lock is gone");
        }
        drop(held); // (its lock file was replaced above; deleting a missing one only warns)
    }
}
