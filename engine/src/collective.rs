//! Collectives for data-parallel training: average a buffer across ranks, in place.
//!
//! - [`Collective`]: the one operation the trainer needs, `all_reduce_mean`, and its
//!   overlapped form (`start_all_reduce_mean` + `wait_all`, see `grad_buckets.rs`);
//! - [`Local`]: world size 1, a no-op, for every backend;
//! - [`TcpRing`]: a ring all-reduce over plain blocking `std::net` TCP sockets for the CPU
//!   backend. It runs on the training thread (no async runtime): reduce-scatter then
//!   all-gather, `2 (W - 1)` steps over `W` chunks of the buffer, each step sending one chunk to
//!   rank `r + 1` (from a scoped thread) while receiving one from rank `r - 1`.
//!
//! Determinism: in the reduce-scatter, chunk `c` starts at rank `c` and travels the ring once,
//! each rank adding its own values to the partial sum it receives, so chunk `c` is always
//! summed in the order `x_c + x_{c+1} + ... + x_{c+W-1}` (ranks mod `W`) by the same rank
//! (`c - 1`), which then divides by `W`. The all-gather only copies finished chunks, so every
//! rank ends with bitwise identical values, and a run is reproducible for a given world size.
//!
//! Failure: a peer that disappears (closed connection), stops answering (`io_timeout`), sends a
//! buffer of another length, or an [`AbortHandle::abort`] makes `all_reduce_mean` return an
//! error instead of hanging. The ring is then broken: it shuts its sockets down, which makes its
//! neighbours fail too, so the error travels around the ring, and every later call fails.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::backend::Backend;
use crate::cpu::CpuBackend;

/// Averages buffers across the ranks of a data-parallel group.
pub trait Collective<B: Backend>: Send {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` by its elementwise mean over all ranks, in place. Every rank must call it
    /// with a buffer of the same length, in the same sequence of calls; every rank ends with
    /// bitwise identical values.
    fn all_reduce_mean(&mut self, be: &B, buf: B::ViewMut<'_>) -> Result<(), CollectiveError>;

    /// Whether [`start_all_reduce_mean`](Self::start_all_reduce_mean) returns before the
    /// reduction is done, so that the trainer can hand it gradient buckets while the backward
    /// pass is still computing the rest (false: the trainer reduces the whole buffer after it).
    fn overlaps_backward(&self) -> bool {
        false
    }

    /// Starts averaging `buf` like `all_reduce_mean`, possibly in the background; every
    /// started buffer is final once [`wait_all`](Self::wait_all) returns Ok. Ranks must start
    /// the same sequence of buffers. The default reduces before returning.
    ///
    /// # Safety
    /// Until `wait_all` returns, nothing may read or write the memory `buf` covers (a
    /// background reduction works on it after this call's borrow has ended), and that memory
    /// must stay allocated.
    unsafe fn start_all_reduce_mean(&mut self, be: &B, buf: B::ViewMut<'_>) -> Result<(), CollectiveError> {
        self.all_reduce_mean(be, buf)
    }

    /// Waits for every reduction started since the last call. After an error the collective
    /// is broken, as after a failed `all_reduce_mean`.
    fn wait_all(&mut self, _be: &B) -> Result<(), CollectiveError> {
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum CollectiveError {
    #[error("invalid ring configuration: {0}")]
    Config(String),
    #[error("could not connect to rank {peer} at {addr} within {waited:?}: {cause}")]
    Connect { peer: usize, addr: String, waited: Duration, cause: String },
    #[error("rank {peer} did not connect within {waited:?}{}", last_rejected.as_ref().map(|r| format!(" (last rejected connection: {r})")).unwrap_or_default())]
    Accept { peer: usize, waited: Duration, last_rejected: Option<String> },
    #[error("handshake with rank {peer} failed: {cause}")]
    Handshake { peer: usize, cause: String },
    #[error("rank {peer} closed the connection")]
    PeerClosed { peer: usize },
    #[error("rank {peer} did not answer within {after:?} ({op})")]
    Timeout { peer: usize, op: &'static str, after: Duration },
    /// `cause`, not `source`: the message already says it, and `{:#}` would say it twice.
    #[error("i/o with rank {peer} ({op}): {cause}")]
    Io { peer: usize, op: &'static str, cause: io::Error },
    #[error("the collective was aborted")]
    Aborted,
    #[error("rank {peer} reduces a buffer of {theirs} values, this rank {ours}")]
    LengthMismatch { peer: usize, ours: usize, theirs: u64 },
    #[error("the ring is broken by an earlier error: {0}")]
    Broken(String),
}

/// World size 1: the mean of one buffer is itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl<B: Backend> Collective<B> for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _be: &B, _buf: B::ViewMut<'_>) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Default for [`TcpRing::set_io_timeout`].
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);

const MAGIC: [u8; 8] = *b"SMELTRNG";
/// 2: the hello carries the run's session.
const PROTOCOL_VERSION: u32 = 2;
/// magic, version, rank, world size, session
const HELLO_LEN: usize = 8 + 4 + 4 + 4 + 8;
/// Every chunk message starts with the sender's buffer length (u64 LE).
const HEADER_LEN: usize = 8;
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// How often a join waiting for a peer's answer checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(100);
/// How long an accepted connection may take to send its hello.
const HELLO_WAIT: Duration = Duration::from_secs(10);

fn hello(rank: usize, world: usize, session: u64) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(rank as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(world as u32).to_le_bytes());
    h[20..28].copy_from_slice(&session.to_le_bytes());
    h
}

/// Checks a hello: the right magic and version, the expected rank, world size and session.
fn check_hello(h: &[u8; HELLO_LEN], expect_rank: usize, world: usize, session: u64) -> Result<(), String> {
    if h[..8] != MAGIC {
        return Err("not a smelt ring peer (bad magic)".into());
    }
    let u = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    if u(8) != PROTOCOL_VERSION {
        return Err(format!("protocol version {} (this rank speaks {PROTOCOL_VERSION})", u(8)));
    }
    if u(16) as usize != world {
        return Err(format!("peer believes the world size is {} (this rank: {world})", u(16)));
    }
    if u(12) as usize != expect_rank {
        return Err(format!("peer says it is rank {}, expected rank {expect_rank}", u(12)));
    }
    let theirs = u64::from_le_bytes(h[20..28].try_into().unwrap());
    if theirs != session {
        return Err(format!("peer joins ring session {theirs:#018x}, this rank {session:#018x} (a connection left from another run)"));
    }
    Ok(())
}

/// How one ring join is told from another: `session`, a number every rank of one run derives
/// alike (a worker hashes the job and attempt), so that a connection left in a listener's
/// backlog by a run that gave up cannot be taken for a peer of the next run; `cancelled`, asked
/// while waiting for peers, ends the join early (a run stopped meanwhile).
pub struct Join<'a> {
    pub session: u64,
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl Join<'_> {
    /// Session 0, never cancelled: tests and single-process rings.
    pub const PLAIN: Join<'static> = Join { session: 0, cancelled: &|| false };
}

/// The two connections of one rank in a ring of size >= 2.
struct Links {
    /// To rank + 1 (we connected): we send on it.
    next: TcpStream,
    /// From rank - 1 (it connected): we receive on it.
    prev: TcpStream,
}

/// Ring all-reduce over TCP for [`CpuBackend`] buffers (little-endian f32 on the wire).
pub struct TcpRing {
    rank: usize,
    world: usize,
    links: Option<Links>,
    io_timeout: Duration,
    aborted: Arc<AtomicBool>,
    broken: Option<String>,
    send_bytes: Vec<u8>,
    recv_bytes: Vec<u8>,
}

/// Stops a ring from another thread: a blocked or future `all_reduce_mean` returns
/// [`CollectiveError::Aborted`].
#[derive(Clone, Debug)]
pub struct AbortHandle {
    aborted: Arc<AtomicBool>,
    streams: Arc<Vec<TcpStream>>,
}

impl AbortHandle {
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        for s in self.streams.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl TcpRing {
    /// Joins the ring: connects to rank + 1 at `peer_addrs[rank + 1]` (retrying until `timeout`,
    /// since peers start at different times) and accepts rank - 1 on `listener` (already bound
    /// to `peer_addrs[rank]`), both checked by a handshake (magic, rank, world size) so that a
    /// stray connection is refused. `peer_addrs` holds one `host:port` per rank, in rank order.
    /// With one address there is no socket at all.
    pub fn connect(rank: usize, peer_addrs: &[String], listener: TcpListener, timeout: Duration) -> Result<TcpRing, CollectiveError> {
        Self::join(rank, peer_addrs, listener, timeout, Join::PLAIN)
    }

    /// [`TcpRing::connect`] for one run's session, cancellable ([`Join`]): a cancelled join
    /// returns [`CollectiveError::Aborted`].
    pub fn join(rank: usize, peer_addrs: &[String], listener: TcpListener, timeout: Duration, join: Join<'_>) -> Result<TcpRing, CollectiveError> {
        let world = peer_addrs.len();
        if world == 0 {
            return Err(CollectiveError::Config("no peer addresses".into()));
        }
        if rank >= world {
            return Err(CollectiveError::Config(format!("rank {rank} outside a world of {world}")));
        }
        if world > u32::MAX as usize {
            return Err(CollectiveError::Config(format!("world size {world} is too large")));
        }
        let mut ring = TcpRing {
            rank,
            world,
            links: None,
            io_timeout: DEFAULT_IO_TIMEOUT,
            aborted: Arc::new(AtomicBool::new(false)),
            broken: None,
            send_bytes: Vec::new(),
            recv_bytes: Vec::new(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let start = Instant::now();
        let deadline = start + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;

        // 1. Connect to next and send our hello. The peer's listener is bound before it is
        //    handed to us, so the connection completes from its backlog even if the peer is
        //    itself still connecting; nobody waits for an answer yet, so there is no cycle.
        let addr = &peer_addrs[next_rank];
        let next = connect_retrying(next_rank, addr, start, deadline, join.cancelled)?;
        let io_err = |peer, op| move |e: io::Error| CollectiveError::Io { peer, op, cause: e };
        next.set_nodelay(true).map_err(io_err(next_rank, "set TCP_NODELAY"))?;
        (&next).write_all(&hello(rank, world, join.session)).map_err(io_err(next_rank, "send handshake"))?;

        // 2. Accept prev: read its hello, answer with ours.
        let prev = accept_checked(&listener, rank, prev_rank, world, join.session, start, deadline, join.cancelled)?;
        drop(listener);

        // 3. Read next's answer, a slice of the wait at a time so that a cancel is seen.
        let mut h = [0u8; HELLO_LEN];
        let mut got = 0;
        while got < HELLO_LEN {
            if (join.cancelled)() {
                return Err(CollectiveError::Aborted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CollectiveError::Handshake { peer: next_rank, cause: format!("no answer to our handshake within {timeout:?}") });
            }
            next.set_read_timeout(Some(left.min(CANCEL_POLL))).map_err(io_err(next_rank, "set timeout"))?;
            match (&next).read(&mut h[got..]) {
                Ok(0) => return Err(CollectiveError::Handshake { peer: next_rank, cause: "closed before answering our handshake".into() }),
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(CollectiveError::Handshake { peer: next_rank, cause: format!("no answer to our handshake: {e}") }),
            }
        }
        check_hello(&h, next_rank, world, join.session).map_err(|cause| CollectiveError::Handshake { peer: next_rank, cause: format!("{cause} (at {addr})") })?;

        ring.links = Some(Links { next, prev });
        ring.set_io_timeout(DEFAULT_IO_TIMEOUT)?;
        Ok(ring)
    }

    /// How long one send or receive may block before the peer is declared gone.
    pub fn set_io_timeout(&mut self, timeout: Duration) -> Result<(), CollectiveError> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.io_timeout = timeout;
        if let Some(l) = &self.links {
            let (n, p) = (self.next_rank(), self.prev_rank());
            let err = |peer| move |e| CollectiveError::Io { peer, op: "set timeout", cause: e };
            l.next.set_write_timeout(Some(timeout)).map_err(err(n))?;
            l.next.set_read_timeout(Some(timeout)).map_err(err(n))?;
            l.prev.set_read_timeout(Some(timeout)).map_err(err(p))?;
            l.prev.set_write_timeout(Some(timeout)).map_err(err(p))?;
        }
        Ok(())
    }

    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    /// A handle whose `abort()` shuts this ring's sockets down from any thread.
    pub fn abort_handle(&self) -> AbortHandle {
        let streams = match &self.links {
            Some(l) => [&l.next, &l.prev].into_iter().filter_map(|s| s.try_clone().ok()).collect(),
            None => Vec::new(),
        };
        AbortHandle { aborted: self.aborted.clone(), streams: Arc::new(streams) }
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }
    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// `[c * len / W, (c + 1) * len / W)`: W chunks covering the buffer, some empty when len < W.
    fn chunk(&self, c: usize, len: usize) -> std::ops::Range<usize> {
        let w = self.world as u128;
        let at = |i: usize| (i as u128 * len as u128 / w) as usize;
        at(c)..at(c + 1)
    }

    fn check_usable(&self) -> Result<(), CollectiveError> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CollectiveError::Aborted);
        }
        if let Some(cause) = &self.broken {
            return Err(CollectiveError::Broken(cause.clone()));
        }
        Ok(())
    }

    fn all_reduce_inner(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let w = self.world;
        let len = buf.len();
        let (r, next_rank, prev_rank) = (self.rank, self.next_rank(), self.prev_rank());
        let chunks: Vec<std::ops::Range<usize>> = (0..w).map(|c| self.chunk(c, len)).collect();
        let io_timeout = self.io_timeout;
        let TcpRing { links, send_bytes, recv_bytes, .. } = self;
        let links = links.as_ref().expect("world >= 2 has links");

        // Reduce-scatter: at step s rank r sends chunk r - s and adds the chunk r - s - 1 it
        // receives into its own; after W - 1 steps it holds the full sum of chunk r + 1.
        for s in 0..w - 1 {
            let send_c = (r + w - s) % w;
            let recv_c = (r + 2 * w - s - 1) % w;
            encode(send_bytes, len, &buf[chunks[send_c].clone()]);
            exchange(links, send_bytes, recv_bytes, len, chunks[recv_c].len(), next_rank, prev_rank, io_timeout)?;
            let dst = &mut buf[chunks[recv_c].clone()];
            for (d, b) in dst.iter_mut().zip(recv_bytes[HEADER_LEN..].chunks_exact(4)) {
                // The partial sum received (ranks recv_c ..= r - 1) plus this rank's values
                // (f32 addition commutes, so only the sequence of ranks fixes the rounding).
                *d += f32::from_le_bytes(b.try_into().unwrap());
            }
        }
        let owned = (r + 1) % w;
        let inv = w as f32;
        for x in &mut buf[chunks[owned].clone()] {
            *x /= inv;
        }
        // All-gather: at step s rank r forwards chunk r + 1 - s (finished) and receives chunk
        // r - s, copying it.
        for s in 0..w - 1 {
            let send_c = (r + 1 + w - s) % w;
            let recv_c = (r + w - s) % w;
            encode(send_bytes, len, &buf[chunks[send_c].clone()]);
            exchange(links, send_bytes, recv_bytes, len, chunks[recv_c].len(), next_rank, prev_rank, io_timeout)?;
            let dst = &mut buf[chunks[recv_c].clone()];
            for (d, b) in dst.iter_mut().zip(recv_bytes[HEADER_LEN..].chunks_exact(4)) {
                *d = f32::from_le_bytes(b.try_into().unwrap());
            }
        }
        Ok(())
    }

    /// After a failure: remember it and shut the sockets so the neighbours fail too.
    fn break_ring(&mut self, cause: &CollectiveError) {
        self.broken = Some(cause.to_string());
        if let Some(l) = &self.links {
            let _ = l.next.shutdown(Shutdown::Both);
            let _ = l.prev.shutdown(Shutdown::Both);
        }
    }
}

impl Collective<CpuBackend> for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_mean(&mut self, _be: &CpuBackend, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.reduce(buf)
    }
}

impl TcpRing {
    /// `all_reduce_mean` without a backend (it needs none): also what [`BackgroundRing`]'s
    /// thread runs.
    ///
    /// [`BackgroundRing`]: crate::background_ring::BackgroundRing
    pub fn reduce(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.check_usable()?;
        if self.world == 1 {
            return Ok(());
        }
        match self.all_reduce_inner(buf) {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = if self.aborted.load(Ordering::SeqCst) { CollectiveError::Aborted } else { e };
                self.break_ring(&e);
                Err(e)
            }
        }
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        if let Some(l) = &self.links {
            let _ = l.next.shutdown(Shutdown::Both);
            let _ = l.prev.shutdown(Shutdown::Both);
        }
    }
}

/// Header (the buffer's length) then the chunk, little-endian.
fn encode(out: &mut Vec<u8>, total_len: usize, chunk: &[f32]) {
    out.clear();
    out.reserve(HEADER_LEN + 4 * chunk.len());
    out.extend_from_slice(&(total_len as u64).to_le_bytes());
    for x in chunk {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Sends `send` to next (on a scoped thread) while receiving a header and `recv_len` values
/// from prev into `recv`. A failure on either side shuts the other side's socket down so that
/// neither waits for its timeout; the error reported is the first one (the cause, not the
/// consequence).
#[allow(clippy::too_many_arguments)]
fn exchange(
    links: &Links,
    send: &[u8],
    recv: &mut Vec<u8>,
    our_len: usize,
    recv_len: usize,
    next_rank: usize,
    prev_rank: usize,
    io_timeout: Duration,
) -> Result<(), CollectiveError> {
    const NONE: u8 = 0;
    const SEND: u8 = 1;
    const RECV: u8 = 2;
    recv.clear();
    recv.resize(HEADER_LEN + 4 * recv_len, 0);
    let first = AtomicU8::new(NONE);
    let (sent, received) = std::thread::scope(|sc| {
        let sender = sc.spawn(|| {
            let res = (&links.next).write_all(send).and_then(|_| (&links.next).flush());
            if res.is_err() {
                let _ = first.compare_exchange(NONE, SEND, Ordering::SeqCst, Ordering::SeqCst);
                let _ = links.prev.shutdown(Shutdown::Both);
            }
            res
        });
        let received = receive(&links.prev, recv, our_len);
        if received.is_err() {
            let _ = first.compare_exchange(NONE, RECV, Ordering::SeqCst, Ordering::SeqCst);
            let _ = links.next.shutdown(Shutdown::Both);
        }
        let sent = sender.join().unwrap_or_else(|_| Err(io::Error::other("sender thread panicked")));
        (sent, received)
    });
    let send_err = |e| io_error(e, next_rank, "send", io_timeout);
    let recv_err = |e| match e {
        RecvError::Io(e) => io_error(e, prev_rank, "receive", io_timeout),
        RecvError::Mismatch(theirs) => CollectiveError::LengthMismatch { peer: prev_rank, ours: our_len, theirs },
    };
    match (sent, received) {
        (Ok(()), Ok(())) => Ok(()),
        (Ok(()), Err(e)) => Err(recv_err(e)),
        (Err(e), Ok(())) => Err(send_err(e)),
        (Err(se), Err(re)) => Err(if first.load(Ordering::SeqCst) == SEND { send_err(se) } else { recv_err(re) }),
    }
}

enum RecvError {
    Io(io::Error),
    Mismatch(u64),
}

fn receive(prev: &TcpStream, recv: &mut [u8], our_len: usize) -> Result<(), RecvError> {
    let mut s = prev;
    s.read_exact(&mut recv[..HEADER_LEN]).map_err(RecvError::Io)?;
    let theirs = u64::from_le_bytes(recv[..HEADER_LEN].try_into().unwrap());
    if theirs != our_len as u64 {
        return Err(RecvError::Mismatch(theirs));
    }
    s.read_exact(&mut recv[HEADER_LEN..]).map_err(RecvError::Io)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::WriteZero
    )
}

fn io_error(e: io::Error, peer: usize, op: &'static str, after: Duration) -> CollectiveError {
    if is_timeout(&e) {
        CollectiveError::Timeout { peer, op, after }
    } else if is_closed(&e) {
        CollectiveError::PeerClosed { peer }
    } else {
        CollectiveError::Io { peer, op, cause: e }
    }
}

fn connect_retrying(peer: usize, addr: &str, start: Instant, deadline: Instant, cancelled: &dyn Fn() -> bool) -> Result<TcpStream, CollectiveError> {
    let fail = |cause: String| CollectiveError::Connect { peer, addr: addr.to_string(), waited: start.elapsed(), cause };
    loop {
        if cancelled() {
            return Err(CollectiveError::Aborted);
        }
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        let attempt = match addr.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                // bounded, so a cancel is seen even when SYNs go unanswered
                Some(a) => TcpStream::connect_timeout(&a, left.clamp(Duration::from_millis(1), Duration::from_secs(5))),
                None => return Err(fail("the address resolves to nothing".into())),
            },
            Err(e) => Err(e),
        };
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => {
                if Instant::now() + RETRY_PAUSE >= deadline {
                    return Err(fail(e.to_string()));
                }
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn accept_checked(
    listener: &TcpListener,
    rank: usize,
    prev_rank: usize,
    world: usize,
    session: u64,
    start: Instant,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<TcpStream, CollectiveError> {
    let io_err = |op| move |e| CollectiveError::Io { peer: prev_rank, op, cause: e };
    listener.set_nonblocking(true).map_err(io_err("listen"))?;
    let mut last_rejected = None;
    loop {
        match listener.accept() {
            Ok((stream, from)) => {
                let checked = (|| -> Result<TcpStream, String> {
                    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                    stream.set_nodelay(true).map_err(|e| e.to_string())?;
                    // A real peer sends its hello right after connecting; a silent stranger must
                    // not use up the whole connect timeout.
                    let left = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(1), HELLO_WAIT);
                    stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
                    let mut h = [0u8; HELLO_LEN];
                    // The magic first, so that a stranger sending something short is turned
                    // away at once.
                    (&stream).read_exact(&mut h[..MAGIC.len()]).map_err(|e| format!("no handshake: {e}"))?;
                    if h[..MAGIC.len()] != MAGIC {
                        return Err("not a smelt ring peer (bad magic)".into());
                    }
                    // the version before the rest: another version's hello may be shorter
                    (&stream).read_exact(&mut h[MAGIC.len()..MAGIC.len() + 4]).map_err(|e| format!("incomplete handshake: {e}"))?;
                    let version = u32::from_le_bytes(h[MAGIC.len()..MAGIC.len() + 4].try_into().unwrap());
                    if version != PROTOCOL_VERSION {
                        return Err(format!("protocol version {version} (this rank speaks {PROTOCOL_VERSION}): a smelt of another version"));
                    }
                    (&stream).read_exact(&mut h[MAGIC.len() + 4..]).map_err(|e| format!("incomplete handshake: {e}"))?;
                    check_hello(&h, prev_rank, world, session)?;
                    (&stream).write_all(&hello(rank, world, session)).map_err(|e| format!("answering: {e}"))?;
                    Ok(stream)
                })();
                match checked {
                    Ok(s) => return Ok(s),
                    Err(why) => last_rejected = Some(format!("{from}: {why}")),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("accept")(e)),
        }
        if Instant::now() >= deadline {
            return Err(CollectiveError::Accept { peer: prev_rank, waited: start.elapsed(), last_rejected });
        }
        if cancelled() {
            return Err(CollectiveError::Aborted);
        }
        std::thread::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())).max(Duration::from_millis(1)));
    }
}
