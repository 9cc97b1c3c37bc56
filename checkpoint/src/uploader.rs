//! The background uploader: rank 0 hands it a snapshot (already in host memory) and goes on
//! training while a thread of its own serializes, hashes, uploads and commits it, then applies
//! retention.
//!
//! At most one upload is in flight. When the next checkpoint step comes while one still is, that
//! checkpoint is SKIPPED, not waited for: the training loop must never stall on storage (a slow
//! or unreachable store would otherwise stop training), and a skipped checkpoint costs only the
//! steps until the next one. The caller checks [`AsyncCheckpointer::busy`] before taking a
//! snapshot, so a skipped one costs no copy either. At the end of a run the caller waits (for a
//! bounded time) for the last upload with [`AsyncCheckpointer::finish`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smelt_corpus::StoreDir;
use tracing::warn;

use crate::retention::{self, Retention};
use crate::upload::UploadOptions;
use crate::write::{commit, Committed, Snapshot};

/// How an upload ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Committed(Committed),
    Failed { step: u64, error: String },
}

/// What `submit` did with a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    Started,
    /// Dropped: the upload of `in_flight` is still running.
    Busy { in_flight: u64 },
}

pub struct AsyncCheckpointer {
    root: StoreDir,
    tx: Option<mpsc::Sender<Snapshot>>,
    outcomes: mpsc::Receiver<Outcome>,
    busy: Arc<AtomicBool>,
    in_flight: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl AsyncCheckpointer {
    /// An uploader committing under `root` (a job's `ckpt/` directory).
    pub fn new(root: StoreDir, retention: Retention, opts: UploadOptions) -> Self {
        let (tx, rx) = mpsc::channel::<Snapshot>();
        let (out_tx, outcomes) = mpsc::channel();
        let busy = Arc::new(AtomicBool::new(false));
        let dir = root.clone();
        let flag = busy.clone();
        let thread = std::thread::Builder::new()
            .name("ckpt-upload".into())
            .spawn(move || {
                for snapshot in rx {
                    let step = snapshot.step();
                    let outcome = match commit(&dir, &snapshot, &opts) {
                        Ok(c) => {
                            drop(snapshot);
                            if let Err(e) = retention::apply(&dir, retention) {
                                warn!(uri = %dir.uri(), error = %e, "retention pass failed; retried after the next checkpoint");
                            }
                            Outcome::Committed(c)
                        }
                        Err(e) => {
                            warn!(uri = %dir.uri(), step, error = %e, "checkpoint upload failed; the run's next checkpoint, if it makes one, tries again");
                            Outcome::Failed { step, error: e.to_string() }
                        }
                    };
                    let _ = out_tx.send(outcome);
                    flag.store(false, Ordering::SeqCst);
                }
            })
            .expect("spawn the checkpoint upload thread");
        AsyncCheckpointer { root, tx: Some(tx), outcomes, busy, in_flight: Arc::new(AtomicU64::new(0)), thread: Some(thread) }
    }

    pub fn root(&self) -> &StoreDir {
        &self.root
    }

    /// An upload is in flight (a snapshot now would be skipped).
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// The step whose upload is in flight, if one is.
    pub fn in_flight(&self) -> Option<u64> {
        self.busy().then(|| self.in_flight.load(Ordering::SeqCst))
    }

    /// Hands `snapshot` to the upload thread, unless an upload is in flight.
    pub fn submit(&self, snapshot: Snapshot) -> Submitted {
        if self.busy() {
            return Submitted::Busy { in_flight: self.in_flight.load(Ordering::SeqCst) };
        }
        self.busy.store(true, Ordering::SeqCst);
        self.in_flight.store(snapshot.step(), Ordering::SeqCst);
        self.tx.as_ref().expect("open until finish").send(snapshot).expect("the upload thread outlives its sender");
        Submitted::Started
    }

    /// Outcomes of uploads that ended since the last call (never blocks).
    pub fn poll(&self) -> Vec<Outcome> {
        self.outcomes.try_iter().collect()
    }

    /// Waits up to `timeout` for the upload in flight; returns the outcomes not yet polled and
    /// whether the uploader is idle.
    pub fn wait(&self, timeout: Duration) -> (Vec<Outcome>, bool) {
        let deadline = Instant::now() + timeout;
        let mut out = self.poll();
        while self.busy() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (out, false);
            }
            if let Ok(o) = self.outcomes.recv_timeout(left.min(Duration::from_millis(50))) {
                out.push(o);
            }
        }
        out.extend(self.poll());
        (out, true)
    }

    /// Waits up to `timeout` for the last upload, then stops the thread. An upload still running
    /// then is abandoned (its thread is left to end on its own; the checkpoint either commits or
    /// stays invisible).
    pub fn finish(mut self, timeout: Duration) -> Vec<Outcome> {
        let (out, idle) = self.wait(timeout);
        self.tx = None;
        if idle {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        } else {
            warn!(uri = %self.root.uri(), step = self.in_flight.load(Ordering::SeqCst), waited_s = timeout.as_secs(), "checkpoint upload still running at the end of the run; abandoned");
        }
        out
    }
}
