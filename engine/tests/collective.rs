//! The TCP ring all-reduce: means equal the host's f64 means, every rank ends bitwise equal,
//! and failures (a vanished peer, an abort, a length mismatch, a stray connection) produce
//! errors instead of hangs.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use smelt_engine::collective::{Collective, CollectiveError, Join, Local, TcpRing};
use smelt_engine::CpuBackend;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// `world` listeners on 127.0.0.1 port 0 and the addresses they got.
fn listeners(world: usize) -> (Vec<TcpListener>, Vec<String>) {
    let ls: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    (ls, addrs)
}

/// Runs `f(rank, ring)` on one thread per rank, the ring already connected; results by rank.
fn run_ring<T: Send + 'static>(world: usize, f: impl Fn(usize, TcpRing) -> T + Send + Sync + Clone + 'static) -> Vec<T> {
    let (ls, addrs) = listeners(world);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, f) = (addrs.clone(), f.clone());
            thread::spawn(move || {
                let ring = TcpRing::connect(rank, &addrs, l, CONNECT_TIMEOUT).expect("connect");
                assert_eq!(Collective::<CpuBackend>::rank(&ring), rank);
                assert_eq!(Collective::<CpuBackend>::world_size(&ring), world);
                f(rank, ring)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
}

/// Deterministic values of mixed sign and magnitude, different on each rank.
fn rank_values(rank: usize, len: usize, round: usize) -> Vec<f32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ ((rank as u64 + 1) * 1_000_003) ^ ((round as u64) << 40);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            ((u * 2.0 - 1.0) * 10f64.powi((x % 5) as i32 - 2)) as f32
        })
        .collect()
}

#[test]
fn ring_mean_matches_host_f64_and_is_bitwise_equal_on_every_rank() {
    let be = CpuBackend;
    for world in 1..=4usize {
        for len in [0usize, 1, 2, 7, 10007] {
            // Two calls on the same ring: the ring is reusable and the buffers independent.
            let rounds = 2;
            let results = run_ring(world, move |rank, mut ring| {
                (0..rounds)
                    .map(|round| {
                        let mut buf = rank_values(rank, len, round);
                        ring.all_reduce_mean(&be, &mut buf).expect("all-reduce");
                        buf
                    })
                    .collect::<Vec<_>>()
            });
            for round in 0..rounds {
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| rank_values(r, len, round)).collect();
                for i in 0..len {
                    let exact = inputs.iter().map(|v| v[i] as f64).sum::<f64>() / world as f64;
                    let scale = inputs.iter().map(|v| (v[i] as f64).abs()).sum::<f64>() / world as f64;
                    let got = results[0][round][i] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-6 * scale.max(f64::MIN_POSITIVE),
                        "world {world} len {len} round {round} [{i}]: {got} vs exact {exact}"
                    );
                }
                for (r, res) in results.iter().enumerate() {
                    let same = res[round].iter().zip(&results[0][round]).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "world {world} len {len} round {round}: rank {r} differs from rank 0");
                }
            }
            if world == 1 {
                assert_eq!(results[0][0], rank_values(0, len, 0), "world 1 leaves the buffer alone");
            }
        }
    }
}

#[test]
fn world_larger_than_the_buffer() {
    let be = CpuBackend;
    let results = run_ring(3, move |rank, mut ring| {
        let mut buf = vec![rank as f32, 10.0 * rank as f32];
        ring.all_reduce_mean(&be, &mut buf).unwrap();
        buf
    });
    for r in &results {
        assert_eq!(r, &vec![1.0, 10.0]);
    }
}

#[test]
fn local_is_a_no_op() {
    let be = CpuBackend;
    let mut local = Local;
    let mut buf = vec![1.0f32, -2.0, 3.5];
    Collective::<CpuBackend>::all_reduce_mean(&mut local, &be, &mut buf).unwrap();
    assert_eq!(buf, [1.0, -2.0, 3.5]);
    assert_eq!(Collective::<CpuBackend>::world_size(&local), 1);
    // TcpRing of one rank: no socket, no change.
    let (mut ls, addrs) = listeners(1);
    let mut ring = TcpRing::connect(0, &addrs, ls.pop().unwrap(), CONNECT_TIMEOUT).unwrap();
    ring.all_reduce_mean(&be, &mut buf).unwrap();
    assert_eq!(buf, [1.0, -2.0, 3.5]);
}

#[test]
fn a_vanished_peer_makes_the_others_fail_not_hang() {
    let be = CpuBackend;
    for world in [2usize, 3, 4] {
        let quitter = world - 1;
        let results = run_ring(world, move |rank, mut ring| {
            // A generous I/O timeout: the error must come from the closed connection.
            ring.set_io_timeout(Duration::from_secs(120)).unwrap();
            let mut buf = vec![1.0f32; 1000];
            ring.all_reduce_mean(&be, &mut buf).expect("first all-reduce");
            if rank == quitter {
                drop(ring); // the peer goes away between steps
                return None;
            }
            let err = ring.all_reduce_mean(&be, &mut buf).expect_err("a peer is gone");
            // Later calls fail at once.
            let again = ring.all_reduce_mean(&be, &mut buf).expect_err("the ring is broken");
            assert!(matches!(again, CollectiveError::Broken(_)), "{again}");
            Some(err)
        });
        for (rank, r) in results.iter().enumerate() {
            if rank == quitter {
                continue;
            }
            let err = r.as_ref().unwrap();
            println!("world {world} rank {rank}: {err}");
            assert!(
                matches!(err, CollectiveError::PeerClosed { .. } | CollectiveError::Io { .. }),
                "world {world} rank {rank}: {err:?}"
            );
        }
    }
}

#[test]
fn io_timeout_names_the_silent_peer() {
    let be = CpuBackend;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = std::sync::Arc::new(std::sync::Mutex::new(done_rx));
    let results = run_ring(2, move |rank, mut ring| {
        if rank == 1 {
            // Connected but silent until rank 0 has given up.
            let _ = done_rx.lock().unwrap().recv();
            return None;
        }
        ring.set_io_timeout(Duration::from_millis(200)).unwrap();
        let mut buf = vec![0.0f32; 10];
        let err = ring.all_reduce_mean(&be, &mut buf).expect_err("peer is silent");
        done_tx.send(()).unwrap();
        Some(err)
    });
    let err = results[0].as_ref().unwrap();
    assert!(matches!(err, CollectiveError::Timeout { peer: 1, .. }), "{err:?}");
}

#[test]
fn abort_unblocks_a_rank_waiting_on_a_silent_peer() {
    let be = CpuBackend;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = std::sync::Arc::new(std::sync::Mutex::new(done_rx));
    let results = run_ring(2, move |rank, mut ring| {
        if rank == 1 {
            let _ = done_rx.lock().unwrap().recv();
            return None;
        }
        // Without the abort this would wait 10 minutes and fail with Timeout, not Aborted.
        ring.set_io_timeout(Duration::from_secs(600)).unwrap();
        let handle = ring.abort_handle();
        let aborter = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            handle.abort();
        });
        let mut buf = vec![0.0f32; 10];
        let err = ring.all_reduce_mean(&be, &mut buf).expect_err("aborted");
        aborter.join().unwrap();
        // Aborted stays aborted.
        let again = ring.all_reduce_mean(&be, &mut buf).expect_err("aborted");
        done_tx.send(()).unwrap();
        Some((err, again))
    });
    let (err, again) = results[0].as_ref().unwrap();
    assert!(matches!(err, CollectiveError::Aborted), "{err:?}");
    assert!(matches!(again, CollectiveError::Aborted), "{again:?}");
}

#[test]
fn length_mismatch_is_an_error_on_every_rank() {
    let be = CpuBackend;
    let results = run_ring(3, move |rank, mut ring| {
        let mut buf = vec![1.0f32; if rank == 1 { 11 } else { 10 }];
        ring.all_reduce_mean(&be, &mut buf).expect_err("lengths differ")
    });
    for (rank, e) in results.iter().enumerate() {
        println!("rank {rank}: {e}");
    }
    assert!(
        results.iter().any(|e| matches!(e, CollectiveError::LengthMismatch { .. })),
        "some rank names the mismatch: {results:?}"
    );
}

/// Ranks 0 and 1 join the ring of `session` on `ls` and average their rank: both get 0.5.
fn two_ranks_average(ls: Vec<TcpListener>, addrs: &[String], session: u64) {
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.to_vec();
            thread::spawn(move || {
                let mut ring = TcpRing::join(rank, &addrs, l, CONNECT_TIMEOUT, Join { session, cancelled: &|| false }).expect("join");
                let mut buf = vec![rank as f32; 5];
                ring.all_reduce_mean(&CpuBackend, &mut buf).unwrap();
                buf
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), vec![0.5f32; 5]);
    }
}

#[test]
fn stray_connections_are_rejected() {
    let (ls, addrs) = listeners(2);
    // Before the ranks start, a stranger connects to rank 0's listener and speaks nonsense.
    let mut stray = TcpStream::connect(&addrs[0]).unwrap();
    stray.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    two_ranks_average(ls, &addrs, 0);
    drop(stray);
}

/// A rank of an earlier run that is still joining (stuck: its own peer never came) has its hello
/// in rank 1's listener backlog. The next run's ranks join under another session: rank 1 refuses
/// the stale connection and takes its real peer. The stuck join ends when cancelled.
#[test]
fn a_connection_left_by_an_earlier_run_is_refused_and_a_cancelled_join_ends() {
    let (ls, addrs) = listeners(2);
    let stale_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stale_addrs = vec![stale_listener.local_addr().unwrap().to_string(), addrs[1].clone()];
    let cancel = Arc::new(AtomicBool::new(false));
    let stale = {
        let cancel = cancel.clone();
        thread::spawn(move || {
            let cancelled = move || cancel.load(Ordering::SeqCst);
            TcpRing::join(0, &stale_addrs, stale_listener, Duration::from_secs(600), Join { session: 1, cancelled: &cancelled }).map(|_| ())
        })
    };
    // (on loopback its hello is in rank 1's backlog long before this)
    thread::sleep(Duration::from_millis(300));
    two_ranks_average(ls, &addrs, 2);
    cancel.store(true, Ordering::SeqCst);
    match stale.join().unwrap() {
        Err(CollectiveError::Aborted) => {}
        other => panic!("the cancelled join ended with {other:?}"),
    }
}

#[test]
fn ranks_may_start_late_and_a_missing_peer_times_out() {
    // Rank 1 binds its listener late: rank 0 retries until it can connect.
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
    let port1 = l1.local_addr().unwrap();
    drop(l1);
    let a0 = addrs.clone();
    let r0 = thread::spawn(move || {
        let mut ring = TcpRing::connect(0, &a0, l0, CONNECT_TIMEOUT).expect("rank 0 connects");
        let mut buf = vec![2.0f32];
        ring.all_reduce_mean(&CpuBackend, &mut buf).unwrap();
        buf
    });
    thread::sleep(Duration::from_millis(150));
    let l1 = TcpListener::bind(port1).expect("rebind rank 1's port");
    let mut ring = TcpRing::connect(1, &addrs, l1, CONNECT_TIMEOUT).expect("rank 1 connects");
    let mut buf = vec![4.0f32];
    ring.all_reduce_mean(&CpuBackend, &mut buf).unwrap();
    assert_eq!(buf, [3.0]);
    assert_eq!(r0.join().unwrap(), [3.0]);

    // Nobody at rank 1's address: a connect error after the timeout, naming rank 1.
    let (mut ls, addrs) = listeners(2);
    let _l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let err = match TcpRing::connect(0, &addrs, l0, Duration::from_millis(300)) {
        Err(e) => e,
        Ok(_) => panic!("rank 1 never started"),
    };
    // Rank 1's listener exists but nobody runs it: the connection succeeds, the handshake is
    // never answered and rank 0 never gets an incoming connection.
    assert!(matches!(err, CollectiveError::Accept { peer: 1, .. } | CollectiveError::Handshake { peer: 1, .. }), "{err:?}");
    println!("{err}");
}
