//! [`BackgroundRing`]: a [`TcpRing`] on a thread of its own, so that gradient buckets are
//! averaged while the backward pass computes the next ones (overlap for CPU workers; NCCL
//! overlaps on a second CUDA stream instead, see `cuda/nccl.rs`).
//!
//! The training thread hands over a bucket as a raw pointer and length
//! ([`Collective::start_all_reduce_mean`]'s safety contract keeps the memory untouched and
//! alive until [`Collective::wait_all`]); the ring thread reduces buckets in the order given,
//! which every rank shares, and reports each result back. The ring's [`AbortHandle`] (taken
//! before wrapping) still stops a blocked reduction from any thread.
//!
//! [`AbortHandle`]: crate::collective::AbortHandle

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::collective::{Collective, CollectiveError, TcpRing};
use crate::cpu::CpuBackend;

/// A bucket handed to the ring thread.
struct Job {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the pointer is only dereferenced by the ring thread while the training thread keeps
// its promise (start_all_reduce_mean's contract) not to touch that memory.
unsafe impl Send for Job {}

pub struct BackgroundRing {
    rank: usize,
    world: usize,
    jobs: Option<mpsc::Sender<Job>>,
    results: mpsc::Receiver<Result<(), CollectiveError>>,
    /// Buckets started and not yet waited for.
    pending: usize,
    /// Reductions started so far (buckets and whole buffers), for tests and logs.
    started: u64,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundRing {
    /// Moves `ring` onto its own thread.
    pub fn new(mut ring: TcpRing) -> BackgroundRing {
        let (rank, world) = (Collective::<CpuBackend>::rank(&ring), Collective::<CpuBackend>::world_size(&ring));
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (result_tx, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("ring-{rank}"))
            .spawn(move || {
                for job in job_rx {
                    // SAFETY: see `Job`: the memory is the caller's, untouched until it waits.
                    let buf = unsafe { std::slice::from_raw_parts_mut(job.ptr, job.len) };
                    if result_tx.send(ring.reduce(buf)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the ring thread");
        BackgroundRing { rank, world, jobs: Some(jobs), results, pending: 0, started: 0, thread: Some(thread) }
    }

    /// Reductions started so far (every bucket and every whole-buffer all-reduce).
    pub fn reductions_started(&self) -> u64 {
        self.started
    }
}

impl Collective<CpuBackend> for BackgroundRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_mean(&mut self, be: &CpuBackend, buf: &mut [f32]) -> Result<(), CollectiveError> {
        // SAFETY: waited for before `buf`'s borrow ends.
        let started = unsafe { self.start_all_reduce_mean(be, buf) };
        let waited = self.wait_all(be);
        started.and(waited)
    }
    fn overlaps_backward(&self) -> bool {
        self.world > 1
    }
    unsafe fn start_all_reduce_mean(&mut self, _be: &CpuBackend, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let job = Job { ptr: buf.as_mut_ptr(), len: buf.len() };
        let sent = self.jobs.as_ref().map(|j| j.send(job).is_ok()).unwrap_or(false);
        if !sent {
            return Err(CollectiveError::Broken("the ring thread has stopped".into()));
        }
        self.pending += 1;
        self.started += 1;
        Ok(())
    }
    fn wait_all(&mut self, _be: &CpuBackend) -> Result<(), CollectiveError> {
        let mut first = Ok(());
        while self.pending > 0 {
            let r = self
                .results
                .recv()
                .unwrap_or_else(|_| Err(CollectiveError::Broken("the ring thread has stopped".into())));
            self.pending -= 1;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for BackgroundRing {
    fn drop(&mut self) {
        // Closing the job channel ends the thread after the buckets already handed over; join
        // it so that none outlives the memory it works on.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
