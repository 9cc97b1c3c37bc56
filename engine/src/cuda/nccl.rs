//! `NcclCollective`: gradient averaging across GPUs through NCCL (`ncclAvg` all-reduce on the
//! backend's stream), abortable from another thread so that a dead peer never hangs a worker.
//!
//! The communicator is held raw (not cudarc's `Comm`, whose `Drop` aborts unconditionally and
//! would abort twice after an `abort()`). Waiting for an all-reduce polls the stream and
//! `ncclCommGetAsyncError` instead of blocking in `cuStreamSynchronize`, so a peer's failure
//! or an `abort()` turns into an error.
//!
//! Joining: the communicator is created non-blocking (`ncclCommInitRankConfig` with
//! `blocking = 0`, `CudaTuning::nccl_nonblocking`) and its state polled, so a join whose peers
//! never come ends when the caller's cancel flag is set (the communicator aborted) instead of
//! leaving a thread blocked in `ncclCommInitRank` for good. On such a communicator any NCCL call
//! may answer "in progress" before its work is on the stream: it is polled until enqueued
//! (`settle`) before anything waits on the stream, and a completed run's communicator is
//! finalized (polled) before it is destroyed. Where NCCL refuses the config, the blocking join
//! is used, as with `SMELT_NCCL_NONBLOCKING=0`.
//!
//! Overlap with the backward pass (`Collective::start_all_reduce_mean`): each gradient bucket
//! is averaged on a second stream that first waits for the compute stream's work so far (the
//! bucket's gradients), so the backward kernels of the next blocks run while NCCL moves this
//! one; `wait_all` polls that stream as above. Off unless `SMELT_NCCL_OVERLAP=1` (or
//! `set_overlap`) until it has been measured on several GPUs; without it the trainer averages
//! the whole buffer after the backward pass on the compute stream.

use std::ffi::{c_char, c_int, c_uint};
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

/// NCCL's `ncclConfig_t` as far as NCCL 2.17's fields go, in its order. NCCL reads a caller's
/// config by the `size` it states and resets every field newer than the `version` it states
/// (init.cc, `parseCommConfig`), so every release since 2.17 reads this prefix alike, whichever
/// release cudarc's bindings were generated from (the unit test checks the prefix against them).
#[repr(C)]
struct ConfigV2_17 {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

impl ConfigV2_17 {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other field left to NCCL.
    fn nonblocking() -> Self {
        const UNDEF_INT: c_int = c_int::MIN; // NCCL_CONFIG_UNDEF_INT
        ConfigV2_17 {
            // the defined fields only, not the struct's tail padding (NCCL would copy those
            // bytes into the next release's first field)
            size: std::mem::offset_of!(ConfigV2_17, split_share) + std::mem::size_of::<c_int>(),
            magic: 0xcafe_beef,
            version: NONBLOCKING_SINCE as c_uint,
            blocking: 0,
            cga_cluster_size: UNDEF_INT,
            min_ctas: UNDEF_INT,
            max_ctas: UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: UNDEF_INT,
        }
    }
}

/// The first NCCL release whose `ncclConfig_t` has every field [`ConfigV2_17`] sets
/// (`NCCL_VERSION(2, 17, 0)`); older ones join and tear down the blocking way.
const NONBLOCKING_SINCE: i32 = 2 * 10_000 + 17 * 100;

/// The loaded NCCL's version (`NCCL_VERSION_CODE`), 0 if it does not say: a release without
/// `ncclCommInitRankConfig` must not be asked for it (the symbol would be missing).
fn nccl_version() -> i32 {
    let mut v = 0;
    // SAFETY: writes one int.
    let r = unsafe { sys::ncclGetVersion(&mut v) };
    if r == sys::ncclResult_t::ncclSuccess {
        v
    } else {
        0
    }
}

/// How a non-blocking join ended without a communicator.
enum JoinFailure {
    /// NCCL did not take the config (an argument error before any work started): worth a
    /// blocking join instead.
    ConfigRefused(sys::ncclResult_t),
    Failed(CollectiveError),
}

/// Polls a non-blocking communicator's state until it leaves "in progress"; `cancel` (checked
/// between polls) ends the wait with `Aborted`, the communicator untouched.
fn poll_state(comm: sys::ncclComm_t, poll: Duration, cancel: &dyn Fn() -> bool) -> Result<sys::ncclResult_t, CollectiveError> {
    loop {
        let mut state = sys::ncclResult_t::ncclInProgress;
        // SAFETY: a live communicator, owned by the caller.
        let r = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        // the query itself can fail after writing success (completing a group's work)
        if r != sys::ncclResult_t::ncclSuccess {
            return Ok(r);
        }
        if state != sys::ncclResult_t::ncclInProgress {
            return Ok(state);
        }
        if cancel() {
            return Err(CollectiveError::Aborted);
        }
        std::thread::sleep(poll);
    }
}

/// Joins as `rank` of `world` with a non-blocking communicator, polling until every rank has
/// joined or `cancel` is set (then the half-made communicator is aborted).
fn join_nonblocking(uid: sys::ncclUniqueId, rank: usize, world: usize, cancel: &AtomicBool, poll: Duration) -> Result<sys::ncclComm_t, JoinFailure> {
    let mut config = ConfigV2_17::nonblocking();
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: config is a valid prefix of ncclConfig_t (its size says how much NCCL may read);
    // comm is written by NCCL; the caller made the device's context current.
    let r = unsafe { sys::ncclCommInitRankConfig(&mut comm, world as i32, uid, rank as i32, (&mut config as *mut ConfigV2_17).cast()) };
    let abort = |comm: sys::ncclComm_t| {
        if !comm.is_null() {
            // SAFETY: a communicator NCCL handed back and nothing else holds.
            unsafe { sys::ncclCommAbort(comm) };
        }
    };
    match r {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress if !comm.is_null() => {}
        // refused before any work started (no communicator): a blocking join may still work
        sys::ncclResult_t::ncclInvalidArgument | sys::ncclResult_t::ncclInvalidUsage if comm.is_null() && !cancel.load(Ordering::SeqCst) => {
            return Err(JoinFailure::ConfigRefused(r));
        }
        other => {
            abort(comm);
            return Err(JoinFailure::Failed(CollectiveError::Config(format!("ncclCommInitRankConfig (rank {rank} of {world}, non-blocking): {other:?}"))));
        }
    }
    match poll_state(comm, poll, &|| cancel.load(Ordering::SeqCst)) {
        Ok(sys::ncclResult_t::ncclSuccess) => Ok(comm),
        Ok(state) => {
            abort(comm);
            Err(JoinFailure::Failed(CollectiveError::Config(format!("joining the communicator as rank {rank} of {world}: {state:?}"))))
        }
        Err(e) => {
            abort(comm);
            Err(JoinFailure::Failed(e))
        }
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
                    // finalized (a non-blocking one answers "in progress": polled, this thread
                    // may wait, an abort meanwhile ends it) before it is destroyed; one whose
                    // finalizing fails or is aborted is aborted instead
                    Teardown::Destroy if nccl_version() < NONBLOCKING_SINCE => sys::ncclCommDestroy(comm),
                    Teardown::Destroy => {
                        let r = sys::ncclCommFinalize(comm);
                        let state = match r {
                            sys::ncclResult_t::ncclInProgress => {
                                poll_state(comm, Duration::from_millis(1), &|| self.aborted.load(Ordering::SeqCst)).unwrap_or(sys::ncclResult_t::ncclInProgress)
                            }
                            other => other,
                        };
                        match state {
                            sys::ncclResult_t::ncclSuccess => sys::ncclCommDestroy(comm),
                            _ => sys::ncclCommAbort(comm),
                        }
                    }
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
    /// Joins the communicator `id` as `rank` of `world` on `be`'s GPU; returns once every rank
    /// has joined.
    pub fn new(be: &CudaBackend, id: &[u8; UNIQUE_ID_BYTES], rank: usize, world: usize) -> Result<Self, CollectiveError> {
        Self::join(be, id, rank, world, &AtomicBool::new(false))
    }

    /// [`NcclCollective::new`], ended with `Aborted` once `cancel` is set while the other ranks
    /// are still awaited (the half-made communicator aborted, nothing left running); with a
    /// blocking join (`SMELT_NCCL_NONBLOCKING=0`, or a config NCCL refused) `cancel` is not
    /// seen until the join returns.
    pub fn join(be: &CudaBackend, id: &[u8; UNIQUE_ID_BYTES], rank: usize, world: usize, cancel: &AtomicBool) -> Result<Self, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(CollectiveError::Config(format!("rank {rank} outside a world of {world}")));
        }
        check_nccl_present()?;
        be.context()
            .bind_to_thread()
            .map_err(|e| CollectiveError::Config(format!("binding cuda:{}: {e:?}", be.ordinal())))?;
        let uid = sys::ncclUniqueId { internal: id.map(|b| b as ::core::ffi::c_char) };
        let poll = Duration::from_micros(50);
        let mut joined = None;
        if be.tuning().nccl_nonblocking && nccl_version() >= NONBLOCKING_SINCE {
            match join_nonblocking(uid, rank, world, cancel, Duration::from_millis(1)) {
                Ok(comm) => joined = Some(comm),
                Err(JoinFailure::ConfigRefused(r)) => {
                    tracing::warn!(result = ?r, rank, world, "nccl refused a non-blocking communicator; joining blocking (an abort cannot interrupt the join)")
                }
                Err(JoinFailure::Failed(e)) => return Err(e),
            }
        }
        let comm = match joined {
            Some(comm) => comm,
            None => {
                let mut comm: sys::ncclComm_t = std::ptr::null_mut();
                // SAFETY: comm is written by NCCL on success; the device's context is current.
                let r = unsafe { sys::ncclCommInitRank(&mut comm, world as i32, uid, rank as i32) };
                // NCCL_COMM_BLOCKING=0 in the environment makes even this join non-blocking
                let r = match r {
                    sys::ncclResult_t::ncclInProgress if !comm.is_null() => poll_state(comm, Duration::from_millis(1), &|| false)?,
                    other => other,
                };
                if r != sys::ncclResult_t::ncclSuccess {
                    if !comm.is_null() {
                        // SAFETY: the failed join's communicator, reachable from nowhere else.
                        unsafe { sys::ncclCommAbort(comm) };
                    }
                    return Err(CollectiveError::Config(format!("ncclCommInitRank(rank {rank} of {world}): {r:?}")));
                }
                comm
            }
        };
        let shared = Arc::new(Shared { comm: Mutex::new(comm), aborted: AtomicBool::new(false), _context: Some(be.context().clone()) });
        let comm_stream = be
            .context()
            .new_stream()
            .map_err(|e| CollectiveError::Config(format!("creating the all-reduce stream on cuda:{}: {e:?}", be.ordinal())))?;
        let overlap = be.tuning().nccl_overlap;
        Ok(NcclCollective { shared, rank, world, poll, comm_stream, overlap })
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
        // A non-blocking communicator may answer before the all-reduce is on the stream:
        // nothing may wait on the stream (or call NCCL again) until it is.
        let r = match r {
            sys::ncclResult_t::ncclInProgress => poll_state(*comm, self.poll, &|| self.shared.aborted.load(Ordering::SeqCst))?,
            other => other,
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

    #[test]
    fn the_config_is_ncclconfig_ts_prefix() {
        // the field offsets against cudarc's bindings (generated from nccl.h): NCCL reads the
        // prefix our size states, so every field must sit where its own struct has it
        use std::mem::offset_of;
        type Nccl = sys::ncclConfig_t;
        assert_eq!(offset_of!(ConfigV2_17, size), offset_of!(Nccl, size));
        assert_eq!(offset_of!(ConfigV2_17, magic), offset_of!(Nccl, magic));
        assert_eq!(offset_of!(ConfigV2_17, version), offset_of!(Nccl, version));
        assert_eq!(offset_of!(ConfigV2_17, blocking), offset_of!(Nccl, blocking));
        assert_eq!(offset_of!(ConfigV2_17, cga_cluster_size), offset_of!(Nccl, cgaClusterSize));
        assert_eq!(offset_of!(ConfigV2_17, min_ctas), offset_of!(Nccl, minCTAs));
        assert_eq!(offset_of!(ConfigV2_17, max_ctas), offset_of!(Nccl, maxCTAs));
        assert_eq!(offset_of!(ConfigV2_17, net_name), offset_of!(Nccl, netName));
        assert_eq!(offset_of!(ConfigV2_17, split_share), offset_of!(Nccl, splitShare));
        assert!(std::mem::size_of::<ConfigV2_17>() <= std::mem::size_of::<Nccl>());
        let c = ConfigV2_17::nonblocking();
        assert_eq!((c.size, c.magic, c.version, c.blocking), (44, 0xcafe_beef, 21_700, 0), "size: up to splitShare's end, no padding");
        assert_eq!(c.version as i32, NONBLOCKING_SINCE);
    }
}
