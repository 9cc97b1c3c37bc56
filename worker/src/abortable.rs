//! Waiting on a blocking call that has no timeout of its own (NCCL's communicator init blocks
//! until every rank has joined) without letting a stopped run hang on it: the call runs on a
//! thread of its own and the training thread polls it and the run's stop flag.

use std::time::Duration;

/// Runs `f` on a new thread named `name` and waits for its result, checking `stopped` every
/// `poll`. When the run is stopped first, returns `Err(reason)` at once and leaves the thread
/// behind, detached: it keeps what `f` owns until its call returns (if ever), but the worker is
/// free to report the stop and take its next assignment. A panic in `f` is resumed here.
pub fn run_unless_stopped<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
    stopped: &dyn Fn() -> Option<String>,
    poll: Duration,
) -> Result<T, String> {
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| format!("spawning thread {name}: {e}"))?;
    loop {
        if handle.is_finished() {
            return match handle.join() {
                Ok(v) => Ok(v),
                Err(panic) => std::panic::resume_unwind(panic),
            };
        }
        if let Some(reason) = stopped() {
            return Err(reason);
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::sync::Arc;

    use super::*;

    const POLL: Duration = Duration::from_millis(1);

    #[test]
    fn returns_the_value_of_a_call_that_ends() {
        let never = || None;
        assert_eq!(run_unless_stopped("t", || 6 * 7, &never, POLL), Ok(42));
    }

    #[test]
    fn a_stop_frees_the_caller_from_a_call_that_never_returns_by_itself() {
        let (release, blocked) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = {
            let stop = stop.clone();
            // Stops the run only once the call is known to be blocked.
            std::thread::spawn(move || {
                started.recv().unwrap();
                stop.store(true, Ordering::SeqCst);
            })
        };
        let stopped = || stop.load(Ordering::SeqCst).then(|| "aborted by the coordinator".to_string());
        let r = run_unless_stopped(
            "blocked",
            move || {
                started_tx.send(()).unwrap();
                blocked.recv().ok(); // stands for ncclCommInitRank waiting on a dead peer
                1
            },
            &stopped,
            POLL,
        );
        assert_eq!(r, Err("aborted by the coordinator".to_string()));
        stopper.join().unwrap();
        let _ = release.send(()); // lets the detached thread end
    }

    #[test]
    #[should_panic(expected = "init exploded")]
    fn a_panic_in_the_call_reaches_the_caller() {
        let never = || None;
        let _ = run_unless_stopped("p", || -> u8 { panic!("init exploded") }, &never, POLL);
    }
}
