//! `NcclCollective`: gradient averaging across GPUs through NCCL (`ncclAvg` all-reduce on the
//! backend's stream), abortable from another thread so that a dead peer never hangs a worker.
//!
//! The communicator is held raw (not cudarc's `Comm`, whose `Drop` aborts unconditionally and
//! would abort twice after an `abort()`). Waiting for an all-reduce polls the stream and
//! `ncclCommGetAsyncError` instead of blocking in `cuStreamSynchronize`, so a peer's failure
//! or an `abort()` turns into an error.
//!
//! Overlap with the backward pass (`Collective::start_all_reduce_mean`): each gradient bucket
//! is averaged on a second stream that first waits for the compute stream's work so far (the
//! bucket's gradients), so the backward kernels of the next blocks run while NCCL moves this
//! one; `wait_all` polls that stream as above. Off unless `SMELT_NCCL_OVERLAP=1` (or
//! `set_overlap`) until it has been measured on several GPUs; without it the trainer averages
//! the whole buffer after the backward pass on the compute stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::sys as drv_sys;
use cudarc::driver::CudaStream;
use cudarc::nccl::sys;

use super::view::CudaViewMut;
use super::CudaBackend;
use crate::collective::{Collective, CollectiveError};

/// Bytes of an NCCL unique id: rank 0 creates it, the coordinator relays it to the others.
pub const UNIQUE_ID_BYTES: usize = 128;

/// A new unique id for a communicator (call on rank 0 only).
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError> {
    check_nccl_present()?;
    let id = cudarc::nccl::result::get_uniqueid()
        .map_err(|e| CollectiveError::Config(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.map(|c| c as u8))
}

fn check_nccl_present() -> Result<(), CollectiveError> {
    // SAFETY: only tries to dlopen candidate library names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CollectiveError::Config(
            "libnccl could not be loaded (tried libnccl.so, libnccl.so.2; set LD_LIBRARY_PATH)".into(),
        ))
    }
}

/// The communicator, shared with abort handles.
struct Shared {
    comm: Mutex<sys::ncclComm_t>,
    aborted: AtomicBool,
    /// The device's context, held until the communicator's teardown has run (it may run on a
    /// thread of its own after everything else of the run is gone).
    _context: Option<Arc<cudarc::driver::CudaContext>>,
}

// SAFETY: an ncclComm_t may be used from any thread; every use goes through the mutex.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// How a communicator ends: destroyed after a run whose every operation completed, aborted
/// otherwise (operations may be pending with peers gone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Teardown {
    Destroy,
    Abort,
}

impl Shared {
    /// Marks the communicator aborted and aborts it (see [`Shared::release`]).
    fn abort(self: &Arc<Self>) {
        self.aborted.store(true, Ordering::SeqCst);
        self.release(Teardown::Abort);
    }

    /// Ends the communicator on a thread of its own, never on the caller's: NCCL's teardown may
    /// wait for the other ranks (destroying can block for good once a peer has gone, and even
    /// an abort may synchronise), and a call may hold the communicator meanwhile (an all-reduce
    /// blocked in NCCL's connection setup with a dead peer). Whoever ends a run (the training
    /// thread, about to report its assignment done; the worker's agent stopping it, on its
    /// async runtime) must not wait for either. The thread takes the communicator under the
    /// lock, once whatever call holds it lets go, and nulls it, so exactly one teardown runs
    /// and every later call fails `Aborted`; the thread's hold on `self` keeps the device's
    /// context until NCCL is done. At worst a peer that never answers leaves this one thread
    /// behind.
    fn release(self: &Arc<Self>, how: Teardown) {
        let shared = self.clone();
        let name = format!("nccl-{}", if how == Teardown::Abort { "abort" } else { "destroy" });
        if let Err(e) = std::thread::Builder::new().name(name).spawn(move || shared.end(how)) {
            tracing::warn!(error = %e, "cannot start a thread to end the nccl communicator; aborting it on this one");
            self.end(Teardown::Abort);
        }
    }

    /// Takes the communicator out under its lock (so no other thread can reach it any more)
    /// and ends it, once; nothing when it is already gone.
    fn end(&self, how: Teardown) {
        let comm = std::mem::replace(&mut *self.comm.lock().unwrap_or_else(|p| p.into_inner()), std::ptr::null_mut());
        if !comm.is_null() {
            // SAFETY: a live communicator no other thread can reach, ended once.
            unsafe {
                match how {
                    Teardown::Destroy => sys::ncclCommDestroy(comm),
                    Teardown::Abort => sys::ncclCommAbort(comm),
                }
            };
        }
    }
}

/// Aborts the communicator from any thread; pending and later all-reduces fail with `Aborted`.
#[derive(Clone)]
pub struct NcclAbortHandle(Arc<Shared>);

impl NcclAbortHandle {
    pub fn abort(&self) {
        self.0.abort()
    }
}

pub struct NcclCollective {
    shared: Arc<Shared>,
    rank: usize,
    world: usize,
    /// How often a pending all-reduce checks for completion, peer errors and aborts.
    poll: Duration,
    /// The stream overlapped all-reduces run on, and whether the trainer may use it.
    comm_stream: Arc<CudaStream>,
    overlap: bool,
}

impl NcclCollective {
    /// Joins the communicator `id` as `rank` of `world` on `be`'s GPU; blocks until every rank
    /// has joined.
    pub fn new(be: &CudaBackend, id: &[u8; UNIQUE_ID_BYTES], rank: usize, world: usize) -> Result<Self, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(CollectiveError::Config(format!("rank {rank} outside a world of {world}")));
        }
        check_nccl_present()?;
        be.context()
            .bind_to_thread()
            .map_err(|e| CollectiveError::Config(format!("binding cuda:{}: {e:?}", be.ordinal())))?;
        let uid = sys::ncclUniqueId { internal: id.map(|b| b as ::core::ffi::c_char) };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: comm is written by NCCL on success; the device's context is current.
        let r = unsafe { sys::ncclCommInitRank(&mut comm, world as i32, uid, rank as i32) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(CollectiveError::Config(format!("ncclCommInitRank(rank {rank} of {world}): {r:?}")));
        }
        let shared = Arc::new(Shared { comm: Mutex::new(comm), aborted: AtomicBool::new(false), _context: Some(be.context().clone()) });
        let comm_stream = be
            .context()
            .new_stream()
            .map_err(|e| CollectiveError::Config(format!("creating the all-reduce stream on cuda:{}: {e:?}", be.ordinal())))?;
        let overlap = be.tuning().nccl_overlap;
        Ok(NcclCollective { shared, rank, world, poll: Duration::from_micros(50), comm_stream, overlap })
    }

    pub fn abort_handle(&self) -> NcclAbortHandle {
        NcclAbortHandle(self.shared.clone())
    }

    pub fn abort(&self) {
        self.shared.abort()
    }

    /// Whether the trainer hands over gradient buckets during the backward pass (see the
    /// module docs; the default comes from `SMELT_NCCL_OVERLAP`).
    pub fn set_overlap(&mut self, on: bool) {
        self.overlap = on;
    }

    /// In-place `ncclAvg` of `buf`, enqueued on `stream` after `before` (when given) has done
    /// its work so far. False when there was nothing to enqueue (an empty buffer).
    fn enqueue(&self, be: &CudaBackend, buf: &CudaViewMut<'_>, stream: &CudaStream, before: Option<&CudaStream>) -> Result<bool, CollectiveError> {
        if self.shared.aborted.load(Ordering::SeqCst) {
            return Err(CollectiveError::Aborted);
        }
        if buf.len == 0 {
            return Ok(false);
        }
        be.context().bind_to_thread().map_err(|e| CollectiveError::Broken(format!("{e:?}")))?;
        if let Some(before) = before {
            stream
                .join(before)
                .map_err(|e| CollectiveError::Broken(format!("ordering the all-reduce stream after the backward pass: {e:?}")))?;
        }
        let (ptr, len) = (buf.ptr(), buf.len);
        let comm = self.shared.comm.lock().unwrap_or_else(|p| p.into_inner());
        if comm.is_null() {
            return Err(CollectiveError::Aborted);
        }
        let ptr = ptr as *mut ::core::ffi::c_void;
        // SAFETY: the caller passes a buffer of len floats on this communicator's device; in
        // place is allowed.
        let r = unsafe {
            sys::ncclAllReduce(ptr, ptr, len, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclAvg, *comm, stream.cu_stream() as sys::cudaStream_t)
        };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(CollectiveError::Broken(format!("ncclAllReduce of {len} floats: {r:?}")));
        }
        Ok(true)
    }

    /// Waits for the compute stream, failing early on an abort or an asynchronous NCCL error.
    fn wait(&self, be: &CudaBackend) -> Result<(), CollectiveError> {
        self.wait_stream(be.stream().cu_stream())
    }

    /// Waits for `stream` (polled), failing early on an abort or an asynchronous NCCL error.
    fn wait_stream(&self, stream: drv_sys::CUstream) -> Result<(), CollectiveError> {
        loop {
            // SAFETY: querying a live stream.
            match unsafe { drv_sys::cuStreamQuery(stream) } {
                drv_sys::CUresult::CUDA_SUCCESS => return Ok(()),
                drv_sys::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(CollectiveError::Broken(format!("cuda stream: {other:?}"))),
            }
            if self.shared.aborted.load(Ordering::SeqCst) {
                return Err(CollectiveError::Aborted);
            }
            {
                let comm = self.shared.comm.lock().unwrap_or_else(|p| p.into_inner());
                if comm.is_null() {
                    return Err(CollectiveError::Aborted);
                }
                let mut state = sys::ncclResult_t::ncclSuccess;
                // SAFETY: a live communicator (under the lock).
                unsafe { sys::ncclCommGetAsyncError(*comm, &mut state) };
                if state != sys::ncclResult_t::ncclSuccess && state != sys::ncclResult_t::ncclInProgress {
                    drop(comm);
                    self.shared.abort();
                    return Err(CollectiveError::Broken(format!("nccl asynchronous error: {state:?}")));
                }
            }
            std::thread::sleep(self.poll);
        }
    }
}

impl Drop for NcclCollective {
    /// Frees the communicator when the run is done with it, even while abort handles remain
    /// (they then find nothing to abort): before, a handle kept in the run's stop hook made
    /// every multi-GPU job leak its communicator (device buffers, proxy threads, sockets) for
    /// the worker's lifetime. Destroyed after a run that completed; aborted when it was aborted
    /// or when unwinding from a panic (operations may be left half-done with peers gone). On a
    /// thread of its own either way (`Shared::release`).
    fn drop(&mut self) {
        let how = if std::thread::panicking() || self.shared.aborted.load(Ordering::SeqCst) { Teardown::Abort } else { Teardown::Destroy };
        self.shared.release(how);
    }
}

impl Collective<CudaBackend> for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    /// In-place `ncclAvg` over f32 on the backend's stream, then a polled wait.
    fn all_reduce_mean(&mut self, be: &CudaBackend, buf: CudaViewMut<'_>) -> Result<(), CollectiveError> {
        if self.enqueue(be, &buf, be.stream(), None)? {
            self.wait(be)?;
        }
        Ok(())
    }

    fn overlaps_backward(&self) -> bool {
        self.overlap
    }

    /// The bucket on the all-reduce stream, after the compute stream's work so far.
    unsafe fn start_all_reduce_mean(&mut self, be: &CudaBackend, buf: CudaViewMut<'_>) -> Result<(), CollectiveError> {
        if !self.overlap {
            return self.all_reduce_mean(be, buf);
        }
        self.enqueue(be, &buf, &self.comm_stream, Some(be.stream())).map(|_| ())
    }

    /// Every started bucket done (the compute stream's later work is enqueued after this
    /// returns, so it sees the averaged values).
    fn wait_all(&mut self, _be: &CudaBackend) -> Result<(), CollectiveError> {
        self.wait_stream(self.comm_stream.cu_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_never_waits_for_a_call_holding_the_communicator() {
        // no NCCL here: a null communicator, whose abort is only the flag; what is tested is
        // that abort() returns while another thread holds the lock (a call blocked in NCCL)
        let shared = Arc::new(Shared { comm: Mutex::new(std::ptr::null_mut()), aborted: AtomicBool::new(false), _context: None });
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let _call = shared.comm.lock().unwrap();
                held_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
        };
        held_rx.recv().unwrap();
        let handle = NcclAbortHandle(shared.clone());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            handle.abort();
            done_tx.send(()).unwrap();
        });
        done_rx.recv_timeout(Duration::from_secs(30)).expect("abort() blocked on a held communicator");
        assert!(shared.aborted.load(Ordering::SeqCst), "the abort is marked at once, for calls that come later");
        release_tx.send(()).unwrap();
        holder.join().unwrap();
    }
}
