//! A real coordinator (127.0.0.1:0, SQLite in a tempdir) driven by gRPC clients playing workers.

mod common;

use std::time::Duration;

use common::*;
use smelt_coordinator::CoordinatorConfig;
use smelt_proto::v1::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gang_waits_for_enough_workers_then_assigns_every_rank() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("pair", 2, 0, 0)).await;
    assert_eq!(job.id, "job-000001");
    assert_eq!(state(&job), JobState::Queued);

    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9001").await;
    // Several heartbeats later the lone worker still has nothing and the job still waits.
    tokio::time::sleep(HEARTBEAT * 4).await;
    assert_eq!(state(&get(&mut jobs, &job.id).await), JobState::Queued);
    let ws = workers(&mut jobs).await;
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].state, WorkerState::Idle as i32);

    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9002").await;
    let a1 = w1.assignment().await;
    let a2 = w2.assignment().await;
    assert_eq!(a1.job_id, job.id);
    assert_eq!(a2.job_id, job.id);
    assert_eq!((a1.attempt, a2.attempt), (1, 1));
    assert_eq!((a1.world_size, a2.world_size), (2, 2));
    let mut ranks = [a1.rank, a2.rank];
    ranks.sort();
    assert_eq!(ranks, [0, 1]);
    // The data plan: the spec (its seed) and the step to start at are in the assignment.
    assert!(a1.spec_toml.contains("seed = 7"));
    assert_eq!((a1.start_step, a1.resume_from.as_str()), (0, ""));

    let j = wait_state(&mut jobs, &job.id, JobState::Running).await; // both report busy
    assert_eq!(j.worker_ids.len(), 2);
    assert_eq!(j.worker_ids[a1.rank as usize], w1.id);
    assert!(workers(&mut jobs).await.iter().all(|w| w.state == WorkerState::Busy as i32 && w.job_id == job.id));
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gangs_go_by_priority_then_age() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let low_old = submit(&mut jobs, &spec("low-old", 1, 0, 0)).await;
    let high_old = submit(&mut jobs, &spec("high-old", 1, 5, 0)).await;
    let high_new = submit(&mut jobs, &spec("high-new", 1, 5, 0)).await;
    let low_new = submit(&mut jobs, &spec("low-new", 1, 0, 0)).await;

    let mut order = Vec::new();
    let mut held = Vec::new();
    for i in 0..4 {
        let mut w = Worker::join(&coord.url, &format!("127.0.0.1:{}", 9100 + i)).await;
        order.push(w.assignment().await.job_id);
        held.push(w);
    }
    assert_eq!(order, [high_old.id, high_new.id, low_old.id, low_new.id]);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_job_at_the_head_is_not_starved_by_small_ones() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    // two workers, one busy: the big job fits the cluster but not the idle workers
    let runner = submit(&mut jobs, &spec("runner", 1, 9, 0)).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9201").await;
    let r = w1.assignment().await;
    assert_eq!(r.job_id, runner.id);
    w1.set_busy(&r);
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9202").await;
    let big = submit(&mut jobs, &spec("big", 2, 5, 0)).await;
    let small = submit(&mut jobs, &spec("small", 1, 0, 0)).await;
    // past a lease: the big job is not one too big for the cluster (which holds no place)
    tokio::time::sleep(LEASE * 2).await;
    // One idle worker would fit the small job, but the big one is ahead of it.
    assert_eq!(state(&get(&mut jobs, &small.id).await), JobState::Queued);
    w1.set_idle();
    w1.done(&r, true, "", 10).await;
    assert_eq!(w1.assignment().await.job_id, big.id);
    assert_eq!(w2.assignment().await.job_id, big.id);
    let mut w3 = Worker::join(&coord.url, "127.0.0.1:9203").await;
    assert_eq!(w3.assignment().await.job_id, small.id);
    coord.stop().await;
}

/// A rank that finished while its peers still run gives its worker back at once: rank 0 may
/// spend minutes uploading its last checkpoints, and the worker was held, idle, meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_ranks_worker_takes_other_work_while_its_peers_end() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let pair = submit(&mut jobs, &spec("pair", 2, 5, 0)).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9211").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9212").await;
    let (a1, a2) = (w1.assignment().await, w2.assignment().await);
    w1.set_busy(&a1);
    w2.set_busy(&a2);
    wait_state(&mut jobs, &pair.id, JobState::Running).await;
    let next = submit(&mut jobs, &spec("next", 1, 0, 0)).await;
    let (mut rank1_worker, rank1) = if a1.rank == 1 { (w1, a1) } else { (w2, a2) };
    rank1_worker.set_idle();
    rank1_worker.done(&rank1, true, "", 10).await;
    let n = within("the next job on the finished rank's worker", rank1_worker.assignment()).await;
    assert_eq!(n.job_id, next.id);
    // the pair still runs: its rank 0 has not finished
    assert_eq!(state(&get(&mut jobs, &pair.id).await), JobState::Running);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_metrics_watch_and_success() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("ok", 2, 0, 0)).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9301").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9302").await;
    let a1 = w1.assignment().await;
    let a2 = w2.assignment().await;
    let mut watch = jobs.watch_job(WatchJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();

    // Rendezvous: both ranks get the ring's addresses in rank order.
    let (r1, r2) = tokio::join!(w1.rendezvous(&a1, &[]), w2.rendezvous(&a2, &[]));
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    let mut by_rank = vec![String::new(); 2];
    by_rank[a1.rank as usize] = w1.data_addr.clone();
    by_rank[a2.rank as usize] = w2.data_addr.clone();
    assert_eq!(r1.peer_addrs, by_rank);
    assert_eq!(r2.peer_addrs, by_rank);
    assert_eq!(state(&get(&mut jobs, &job.id).await), JobState::Running);

    let (r0w, r0a, r1w, r1a) = if a1.rank == 0 { (&w1, &a1, &w2, &a2) } else { (&w2, &a2, &w1, &a1) };
    r1w.metrics(r1a, 1, 9.0).await; // rank 1 does not speak for the job
    r0w.metrics(r0a, 1, 4.5).await;
    r0w.metrics(r0a, 2, 4.0).await;
    let j = wait_job(&mut jobs, &job.id, |j| j.last_step == 2).await;
    assert_eq!(j.last_loss, 4.0);

    // The watcher saw the replayed history, then the live metrics of rank 0 only.
    let mut steps = Vec::new();
    let mut states = Vec::new();
    while steps.len() < 2 {
        let ev = within("watch event", watch.message()).await.unwrap().expect("stream open");
        match ev.body.unwrap() {
            job_event::Body::Metrics(m) => {
                assert_eq!(m.rank, 0);
                steps.push((m.step, m.loss));
            }
            job_event::Body::State(s) => states.push(JobState::try_from(s.to).unwrap()),
            job_event::Body::Message(_) => {}
        }
    }
    assert_eq!(steps, [(1, 4.5), (2, 4.0)]);
    assert_eq!(states, [JobState::Queued, JobState::Scheduled, JobState::Running]);

    r1w.done(r1a, true, "", 100).await;
    r0w.done(r0a, true, "", 100).await;
    let j = wait_state(&mut jobs, &job.id, JobState::Succeeded).await;
    assert_eq!(j.last_step, 100);
    assert!(j.error.is_empty());
    // The watch stream ends with the terminal state change.
    let mut last = None;
    while let Some(ev) = within("watch end", watch.message()).await.unwrap() {
        last = Some(ev);
    }
    match last.and_then(|e| e.body) {
        Some(job_event::Body::State(s)) => assert_eq!(s.to, JobState::Succeeded as i32),
        other => panic!("last event {other:?}"),
    }
    let ws = workers(&mut jobs).await;
    assert!(ws.iter().all(|w| w.state == WorkerState::Idle as i32 && w.job_id.is_empty()), "{ws:?}");
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_rendezvous_relays_rank0_nccl_id() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec_on("gpu", 2, 0, 0, "cuda")).await;
    assert_eq!(job.device_class, DeviceClass::Cuda as i32);
    // A CPU worker does not fit a CUDA job.
    let _cpu = Worker::join(&coord.url, "127.0.0.1:9401").await;
    let cuda = |i| WorkerOpts { device_class: DeviceClass::Cuda, device_index: i, ..Default::default() };
    let mut g0 = Worker::join_with(&coord.url, "", cuda(0)).await;
    let mut g1 = Worker::join_with(&coord.url, "", cuda(1)).await;
    let a0 = g0.assignment().await;
    let a1 = g1.assignment().await;
    assert_eq!((a0.rank, a1.rank), (0, 1), "ranks follow device_index on one host");
    let id = b"nccl-unique-id-128-bytes".to_vec();
    // Rank 1 asks first and waits for rank 0's id.
    let g1c = &g1;
    let (r1, r0) = tokio::join!(g1c.rendezvous(&a1, &[]), async {
        tokio::time::sleep(HEARTBEAT).await;
        g0.rendezvous(&a0, &id).await
    });
    assert_eq!(r1.unwrap().nccl_unique_id, id);
    assert_eq!(r0.unwrap().nccl_unique_id, id);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_restarts_from_the_latest_checkpoint() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("flaky", 2, 0, 1)).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9501").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9502").await;
    let a1 = w1.assignment().await;
    let a2 = w2.assignment().await;
    let (r1, r2) = tokio::join!(w1.rendezvous(&a1, &[]), w2.rendezvous(&a2, &[]));
    r1.unwrap();
    r2.unwrap();
    let (rank0, a0) = if a1.rank == 0 { (&w1, &a1) } else { (&w2, &a2) };
    let uri = format!("file:///tmp/ckpt/jobs/{}/ckpt/40/", job.id);
    rank0
        .client
        .clone()
        .report_checkpoint(CheckpointReport {
            job_id: job.id.clone(),
            attempt: a0.attempt,
            step: 40,
            uri: uri.clone(),
            manifest_sha256: "ab".repeat(32),
        })
        .await
        .unwrap();

    let lost = w2.id.clone();
    w2.drop_stream();
    let abort = w1.abort().await;
    assert_eq!((abort.job_id.as_str(), abort.attempt), (job.id.as_str(), 1));
    assert!(abort.reason.contains(&lost), "{}", abort.reason);

    let j = wait_state(&mut jobs, &job.id, JobState::Restarting).await;
    assert_eq!((j.attempt, j.restarts), (2, 1));
    let texts = event_texts(&mut jobs, &job.id).await;
    let want = format!("worker {lost} lost (heartbeat stream");
    let ev = texts.iter().find(|t| t.contains(&want)).unwrap_or_else(|| panic!("{want:?} not in {texts:#?}"));
    assert!(ev.contains("restarting attempt 2 from step 40"), "{ev}");
    let ws = workers(&mut jobs).await;
    assert_eq!(ws.iter().find(|w| w.id == lost).unwrap().state, WorkerState::Lost as i32);

    // A stale attempt's messages change nothing.
    w1.metrics(&a1, 99, 1.0).await;
    // A new worker completes the gang for attempt 2, which resumes from the checkpoint.
    let mut w3 = Worker::join(&coord.url, "127.0.0.1:9503").await;
    let b1 = w1.assignment().await;
    let b3 = w3.assignment().await;
    for b in [&b1, &b3] {
        assert_eq!((b.attempt, b.start_step, b.resume_from.as_str()), (2, 40, uri.as_str()));
    }
    // The old attempt's rendezvous is refused.
    let e = w1.rendezvous(&a1, &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let j = get(&mut jobs, &job.id).await;
    assert_eq!(j.last_step, 40, "progress rolls back to the checkpoint, and the stale metrics changed nothing");
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_rendezvous_is_aborted_when_a_peer_is_lost() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("rv", 2, 0, 0)).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9601").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9602").await;
    let a1 = w1.assignment().await;
    let _ = w2.assignment().await;
    let waiting = {
        let c = w1.client.clone();
        let req = RendezvousRequest {
            job_id: a1.job_id.clone(),
            attempt: a1.attempt,
            rank: a1.rank,
            worker_id: w1.id.clone(),
            nccl_unique_id: vec![],
        };
        tokio::spawn(async move { c.clone().rendezvous(req).await })
    };
    tokio::time::sleep(HEARTBEAT).await;
    w2.drop_stream();
    let e = within("rendezvous answer", waiting).await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    assert!(e.message().contains("aborted"), "{}", e.message());
    // No restarts allowed: the job failed, naming the lost worker.
    let j = wait_state(&mut jobs, &job.id, JobState::Failed).await;
    assert!(j.error.contains(&format!("worker {} lost", w2.id)), "{}", j.error);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_worker_loses_its_lease_and_fails_the_job() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("quiet", 1, 0, 0)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9701").await;
    let a = w.assignment().await;
    w.metrics(&a, 3, 2.0).await;
    wait_state(&mut jobs, &job.id, JobState::Running).await;
    let mut watch = jobs.watch_job(WatchJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    w.go_silent(); // the stream stays open, nothing is sent
    let j = wait_state(&mut jobs, &job.id, JobState::Failed).await;
    assert!(j.error.contains(&format!("worker {} lost (no heartbeat", w.id)), "{}", j.error);
    assert!(j.error.contains("no restarts"), "{}", j.error);
    // The watch stream ends with the failure.
    let mut last = None;
    while let Some(ev) = within("watch end", watch.message()).await.unwrap() {
        last = Some(ev);
    }
    match last.and_then(|e| e.body) {
        Some(job_event::Body::State(s)) => assert_eq!(s.to, JobState::Failed as i32),
        other => panic!("last event {other:?}"),
    }
    // The coordinator closed the silent worker's stream.
    let r = within("stream end", async {
        loop {
            match w.rx_message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(r.is_err() || r.unwrap().is_none());
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rank_restarts_with_its_error_then_fails() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("nan", 1, 0, 1)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9801").await;
    let a = w.assignment().await;
    w.done(&a, false, "non-finite loss at step 5", 5).await;
    let b = w.assignment().await; // the same worker is idle again and takes attempt 2
    assert_eq!(b.attempt, 2);
    let texts = event_texts(&mut jobs, &job.id).await;
    assert!(
        texts.iter().any(|t| t.contains(&format!("rank 0 on worker {} failed: non-finite loss at step 5", w.id))
            && t.contains("restarting attempt 2 from step 0")),
        "{texts:#?}"
    );
    w.done(&b, false, "non-finite loss again", 5).await;
    let j = wait_state(&mut jobs, &job.id, JobState::Failed).await;
    assert!(j.error.contains("non-finite loss again"), "{}", j.error);
    assert!(j.error.contains("all 1 restarts used"), "{}", j.error);
    coord.stop().await;
}

/// A store outage says the same words at the same step on every attempt, but passes: a failure
/// the worker reports as transient is restarted after a back-off that doubles (5 s, then 10 s),
/// not ended as one that would always repeat, and spends no restart within the outage grace
/// (15 min by default); while it waits, its workers serve other jobs; its queue entry says what
/// it waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_restarted_after_a_back_off_even_when_it_repeats() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("outage", 1, 0, 3)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9812").await;
    let error = "opening data.corpus s3://b/c: Generic S3 error: error sending request: connection refused";
    let a = w.assignment().await;
    // it trained (a store it never reached at all spends restarts: more often a wrong endpoint)
    w.metrics(&a, 4, 2.0).await;
    w.done_transient(&a, error, 4).await;
    let b = w.assignment().await; // after the 5 s back-off
    assert_eq!((b.job_id.as_str(), b.attempt), (job.id.as_str(), 2));
    w.done_transient(&b, error, 0).await;
    let waiting = wait_job(&mut jobs, &job.id, |j| j.waiting_for.contains("back-off")).await;
    assert!(waiting.waiting_for.contains("the back-off after a transient failure") && waiting.waiting_for.contains(" s left"), "{waiting:?}");
    let texts = event_texts(&mut jobs, &job.id).await;
    for (next, wait) in [(2, 5), (3, 10)] {
        let want = format!("restarting attempt {next} in {wait} s (the failure looks transient: a store or network error; no restart spent for the first 15 min of an outage)");
        assert!(texts.iter().any(|t| t.contains(error) && t.contains(&want)), "{want}:\n{texts:#?}");
    }
    // the idle worker is not held for it: another job runs meanwhile
    let other = submit(&mut jobs, &spec("other", 1, 0, 0)).await;
    let o = w.assignment().await;
    assert_eq!(o.job_id, other.id, "the job backing off kept the worker idle");
    w.done(&o, true, "", 100).await;
    wait_state(&mut jobs, &other.id, JobState::Succeeded).await;
    let j = get(&mut jobs, &job.id).await;
    assert_eq!((state(&j), j.restarts), (JobState::Restarting, 0), "{j:?}");
    jobs.cancel_job(CancelJobRequest { job_id: job.id.clone() }).await.unwrap();
    coord.stop().await;
}

/// An outage that outlasts the grace spends restarts as any failure: with a grace of 3 s and no
/// restarts allowed, the first transient failure is restarted free, the second (after the 5 s
/// back-off, so past the grace) fails the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_grace_spends_restarts() {
    let (_d, db) = tmp();
    let mut cfg = CoordinatorConfig::new("127.0.0.1:0".parse().unwrap(), &db);
    cfg.heartbeat_interval = HEARTBEAT;
    cfg.lease_timeout = LEASE;
    cfg.outage_grace = Duration::from_secs(3);
    let coord = start_config(cfg).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("long-outage", 1, 0, 0)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9813").await;
    let error = "opening data.corpus s3://b/c: Generic S3 error: error sending request: connection refused";
    let a = w.assignment().await;
    w.metrics(&a, 4, 2.0).await;
    w.done_transient(&a, error, 4).await;
    let b = w.assignment().await;
    assert_eq!((b.job_id.as_str(), b.attempt), (job.id.as_str(), 2));
    assert_eq!(get(&mut jobs, &job.id).await.restarts, 0);
    w.done_transient(&b, error, 0).await;
    let j = wait_state(&mut jobs, &job.id, JobState::Failed).await;
    assert!(j.error.contains(error) && j.error.contains("the job allows no restarts"), "{}", j.error);
    let texts = event_texts(&mut jobs, &job.id).await;
    assert!(
        texts.iter().any(|t| t.contains("restarting attempt 2 in 5 s") && t.contains("no restart spent for the first 3 s of an outage")),
        "{texts:#?}"
    );
    coord.stop().await;
}

/// A failure that repeats does not spend the restarts left: the same error again with no step
/// gained ends the job; the same error after progress is restarted as any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_that_repeats_is_not_restarted_again() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("repeats", 1, 0, 3)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9811").await;
    let error = "cannot read data.text corpus.txt: No such file or directory";
    let a = w.assignment().await;
    w.metrics(&a, 4, 2.0).await;
    w.done(&a, false, error, 4).await;
    // the same error, but further on (step 6): restarted
    let b = w.assignment().await;
    assert_eq!(b.attempt, 2);
    w.metrics(&b, 6, 2.0).await;
    w.done(&b, false, error, 6).await;
    let c = w.assignment().await;
    assert_eq!(c.attempt, 3);
    // the same error, no further than step 6: not restarted, one restart left unused
    w.metrics(&c, 6, 2.0).await;
    w.done(&c, false, error, 6).await;
    let j = wait_state(&mut jobs, &job.id, JobState::Failed).await;
    assert!(j.error.contains(error), "{}", j.error);
    assert!(
        j.error.contains("not restarted: attempt 2 failed the same way at the same step (6), so it would repeat (1 restart left unused)"),
        "{}",
        j.error
    );
    assert_eq!((j.attempt, j.restarts), (3, 2));

    // a store's error that says how long its request took: the same failure all the same
    let timed = submit(&mut jobs, &spec("timed", 1, 0, 3)).await;
    let a = w.assignment().await;
    assert_eq!(a.job_id, timed.id);
    w.done(&a, false, "checkpoint store: error sending request in 804.763µs: bucket not found", 0).await;
    let b = w.assignment().await;
    assert_eq!(b.attempt, 2);
    w.done(&b, false, "checkpoint store: error sending request in 631.426µs: bucket not found", 0).await;
    let j = wait_state(&mut jobs, &timed.id, JobState::Failed).await;
    assert!(j.error.contains("not restarted: attempt 1 failed the same way at the same step (0)"), "{}", j.error);

    // a run stopped from outside (a drain) says the same words every time: never a repeat
    let drained = submit(&mut jobs, &spec("drained", 1, 0, 3)).await;
    for attempt in 1..=3 {
        let a = w.assignment().await;
        assert_eq!((a.job_id.as_str(), a.attempt), (drained.id.as_str(), attempt));
        w.done(&a, false, "stopped: worker received SIGTERM (draining)", 0).await;
    }
    let a = w.assignment().await;
    assert_eq!(a.attempt, 4, "three drains in a row restart the job each time");
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_aborts_the_workers() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("doomed", 2, 0, 3)).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9901").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9902").await;
    w1.assignment().await;
    w2.assignment().await;
    let j = jobs.cancel_job(CancelJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!(state(&j), JobState::Cancelled);
    for w in [&mut w1, &mut w2] {
        let a = w.abort().await;
        assert_eq!(a.job_id, job.id);
        assert!(a.reason.contains("cancelled"), "{}", a.reason);
    }
    let ws = workers(&mut jobs).await;
    assert!(ws.iter().all(|w| w.state == WorkerState::Idle as i32), "{ws:?}");
    // Cancelling again names the state.
    let e = jobs.cancel_job(CancelJobRequest { job_id: job.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("has already ended (cancelled)"), "{}", e.message());
    // A queued job can be cancelled too, and the freed workers take the next job.
    let queued = submit(&mut jobs, &spec("later", 3, 0, 0)).await;
    let next = submit(&mut jobs, &spec("next", 1, -1, 0)).await;
    jobs.cancel_job(CancelJobRequest { job_id: queued.id.clone() }).await.unwrap();
    let a = w1.assignment().await;
    assert_eq!(a.job_id, next.id);
    coord.stop().await;
}

/// A job whose `init_from` names an unfinished job would start from whatever checkpoint that
/// one had reached; one naming the id it is about to get would be its own parent. Both are
/// refused at submit, naming the field; a finished (here: cancelled) parent is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_job_must_have_finished() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let child = |name: &str| spec(name, 1, 0, 0).replace("preset = \"tiny\"", "init_from = \"job-000001\"");
    let e = jobs.submit(SubmitRequest { spec_toml: child("own-parent"), resume_from: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("model.init_from: job-000001 is the id this job would get"), "{}", e.message());
    let parent = submit(&mut jobs, &spec("parent", 1, 0, 0)).await; // no worker: it stays queued
    assert_eq!(parent.id, "job-000001");
    let e = jobs.submit(SubmitRequest { spec_toml: child("early"), resume_from: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().starts_with("model.init_from: job job-000001 is queued (step 0 of 100)"), "{}", e.message());
    let ft = "name = \"ft\"\nkind = \"finetune\"\n[finetune]\ninit_from = \"job-000001\"\nhead = \"sft\"\ndata = \"x.jsonl\"\n\
              [train]\nsteps = 5\nglobal_batch = 2\nmicro_batch = 2\nseq_len = 16\nlr = 1e-4\n";
    let e = jobs.submit(SubmitRequest { spec_toml: ft.into(), resume_from: String::new() }).await.unwrap_err();
    assert!(e.message().starts_with("finetune.init_from: job job-000001 is queued"), "{}", e.message());
    jobs.cancel_job(CancelJobRequest { job_id: parent.id.clone() }).await.unwrap();
    let later = submit(&mut jobs, &child("later")).await;
    assert_eq!(later.id, "job-000002");
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let bad = spec("bad", 2, 0, 0).replace("global_batch = 4", "global_batch = 3");
    let e = jobs.submit(SubmitRequest { spec_toml: bad, resume_from: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("train.global_batch"), "{}", e.message());
    let typo = spec("typo", 1, 0, 0).replace("lr = 1e-3", "lr = 1e-3\nlearnin_rate = 2");
    let e = jobs.submit(SubmitRequest { spec_toml: typo, resume_from: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("learnin_rate"), "{}", e.message());
    let e = jobs.submit(SubmitRequest { spec_toml: "name = ".into(), resume_from: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let e = jobs.get_job(GetJobRequest { job_id: "job-424242".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "job job-424242 not found");
    let e = jobs.cancel_job(CancelJobRequest { job_id: "nope".into() }).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, "job nope not found"));
    let e = jobs.watch_job(WatchJobRequest { job_id: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = jobs
        .submit(SubmitRequest { spec_toml: spec("r", 1, 0, 0), resume_from: "job-000077".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("job-000077"), "{}", e.message());
    // Nothing was stored by the refused requests.
    assert!(jobs.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs.is_empty());

    // Workers: a heartbeat from an unknown id, a registration without a device class.
    let mut wc = smelt_proto::v1::worker_service_client::WorkerServiceClient::connect(coord.url.clone()).await.unwrap();
    let e = wc
        .register(RegisterRequest { hostname: "h".into(), data_addr: "127.0.0.1:1".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("device_class"), "{}", e.message());
    let first = WorkerMessage { worker_id: "w-999999".into(), body: None };
    let mut s = wc.heartbeat(tokio_stream::iter(vec![first])).await.unwrap().into_inner();
    let e = within("heartbeat refusal", s.message()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("w-999999"), "{}", e.message());
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_a_job_uses_its_latest_checkpoint() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let first = submit(&mut jobs, &spec("first", 1, 0, 0)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9951").await;
    let a = w.assignment().await;
    for step in [10, 20] {
        w.client
            .clone()
            .report_checkpoint(CheckpointReport {
                job_id: first.id.clone(),
                attempt: a.attempt,
                step,
                uri: format!("memory://jobs/{}/ckpt/{step}/", first.id),
                manifest_sha256: String::new(),
            })
            .await
            .unwrap();
    }
    w.done(&a, true, "", 20).await;
    wait_state(&mut jobs, &first.id, JobState::Succeeded).await;
    let second = jobs
        .submit(SubmitRequest { spec_toml: spec("second", 1, 0, 0), resume_from: first.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let b = w.assignment().await;
    assert_eq!(b.job_id, second.id);
    assert_eq!((b.start_step, b.resume_from.clone()), (20, format!("memory://jobs/{}/ckpt/20/", first.id)));
    // A stale checkpoint report is refused.
    let e = w
        .client
        .clone()
        .report_checkpoint(CheckpointReport {
            job_id: second.id.clone(),
            attempt: 7,
            step: 1,
            uri: "x".into(),
            manifest_sha256: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // a checkpoint past the new spec's end is refused, naming both steps
    let short = spec("second", 1, 0, 0).replace("steps = 100", "steps = 15");
    assert!(short.contains("steps = 15"), "{short}");
    let e = jobs.submit(SubmitRequest { spec_toml: short, resume_from: first.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at step 20, past this spec's train.steps = 15"), "{}", e.message());
    let _ = Duration::ZERO;
    coord.stop().await;
}

/// Rank 0 that resumed from another checkpoint than assigned (the assigned one did not verify)
/// says so: the job shows where its attempt really started, and the next restart starts there
/// too, not again from the checkpoint that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_fell_back_is_recorded_where_it_started() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("fell-back", 1, 0, 3)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9971").await;
    let a = w.assignment().await;
    let uri = |step: u64| format!("/runs/w1/jobs/{}/ckpt/{step:08}", job.id);
    for step in [20, 40] {
        let r = CheckpointReport { job_id: job.id.clone(), attempt: a.attempt, step, uri: uri(step), manifest_sha256: String::new() };
        w.client.clone().report_checkpoint(r).await.unwrap();
    }
    w.metrics(&a, 45, 2.0).await;
    w.done(&a, false, "a store outage", 45).await;
    let b = w.assignment().await;
    assert_eq!((b.attempt, b.start_step, b.resume_from.clone()), (2, 40, uri(40)));
    // the step-40 checkpoint does not verify: rank 0 went back to step 20
    w.send(worker_message::Body::Note(JobNote {
        job_id: job.id.clone(),
        attempt: 2,
        text: format!("checkpoint {} skipped: corrupt; resuming from {} instead", uri(40), uri(20)),
        resumed_from: uri(20),
        resumed_step: 20,
    }))
    .await;
    let j = wait_job(&mut jobs, &job.id, |j| j.resume_from == uri(20)).await;
    assert_eq!((j.last_step, j.last_checkpoint_step, j.last_checkpoint_uri.clone()), (20, 20, uri(20)));
    // a note from a rank that is not rank 0 of the current attempt changes nothing
    let stale = JobNote { job_id: job.id.clone(), attempt: 1, text: "late".into(), resumed_from: uri(40), resumed_step: 40 };
    w.send(worker_message::Body::Note(stale)).await;
    w.metrics(&b, 25, 2.0).await;
    w.done(&b, false, "another outage", 25).await;
    let c = w.assignment().await;
    assert_eq!((c.attempt, c.start_step, c.resume_from.clone()), (3, 20, uri(20)));
    coord.stop().await;
}

/// A job whose init_from names another job is told where that job's model is: the store of its
/// newest checkpoint and the directory its rank 0 saved the final weights under (workers started
/// by hand each have their own output directory, and look in theirs otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_from_a_job_is_sent_where_that_jobs_model_is() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let parent = submit(&mut jobs, &spec("parent", 1, 0, 0)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9961").await;
    let a = w.assignment().await;
    w.client
        .clone()
        .report_checkpoint(CheckpointReport {
            job_id: parent.id.clone(),
            attempt: a.attempt,
            step: 20,
            uri: format!("/runs/w1/jobs/{}/ckpt/00000020", parent.id),
            manifest_sha256: String::new(),
        })
        .await
        .unwrap();
    w.done_saved(&a, 100, "/runs/w2").await;
    let done = wait_state(&mut jobs, &parent.id, JobState::Succeeded).await;
    assert_eq!(done.model_uri, format!("/runs/w2/jobs/{}/model.safetensors", parent.id));

    let child_spec = spec("child", 1, 0, 0).replace("preset = \"tiny\"", &format!("init_from = \"{}\"", parent.id));
    assert!(child_spec.contains("init_from"), "{child_spec}");
    let child = submit(&mut jobs, &child_spec).await;
    let b = w.assignment().await;
    assert_eq!(b.job_id, child.id);
    assert_eq!((b.parent_checkpoint_store.as_str(), b.parent_final_models.as_str()), ("/runs/w1", "/runs/w2"));
    // a job that names no other job is told nothing
    w.done(&b, false, "stop here", 0).await;
    let plain = submit(&mut jobs, &spec("plain", 1, 0, 0)).await;
    let c = w.assignment().await;
    assert_eq!((c.job_id.as_str(), c.parent_checkpoint_store.as_str(), c.parent_final_models.as_str()), (plain.id.as_str(), "", ""));
    // a restarted coordinator still knows where the parent's weights are (the SQLite file)
    coord.stop().await;
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let got = jobs.get_job(GetJobRequest { job_id: parent.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.model_uri, format!("/runs/w2/jobs/{}/model.safetensors", parent.id));
    coord.stop().await;
}

/// A worker shut down (SIGTERM) in the middle of a run reports the run drained: the job, which
/// allows no restarts, is not failed but resumes on another worker with its restarts untouched,
/// and the draining worker, whose status still said Busy, is given nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_run_spends_no_restart_and_the_job_resumes_elsewhere() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("drained-once", 1, 0, 0)).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9971").await;
    let a = w1.assignment().await;
    w1.metrics(&a, 5, 2.0).await;
    w1.drained(&a, 5).await;
    let j = wait_job(&mut jobs, &job.id, |j| j.attempt == 2).await;
    assert_ne!(state(&j), JobState::Failed, "{}", j.error);
    assert_eq!(j.restarts, 0, "a drain spends no restart");
    assert!(tokio::time::timeout(Duration::from_millis(1500), w1.assignment()).await.is_err(), "the draining worker was given the job again");
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9972").await;
    let b = w2.assignment().await;
    assert_eq!((b.job_id.as_str(), b.attempt), (job.id.as_str(), 2));
    let texts = event_texts(&mut jobs, &job.id).await;
    assert!(texts.iter().any(|t| t.contains("is shutting down") && t.contains("no restart spent")), "{texts:?}");
    w2.done(&b, true, "", 100).await;
    let j = wait_state(&mut jobs, &job.id, JobState::Succeeded).await;
    assert_eq!(j.restarts, 0);
    coord.stop().await;
}

/// Rank 0's worker shut down (SIGTERM): its status says draining first, then rank 1 reports the
/// failure that rank 0's stop caused (its ring closed) before rank 0's own drained report. The
/// job, which allows no restarts, is requeued with its restarts untouched; its next attempt waits
/// for rank 0 to save and report its rescue checkpoint, starts from it, and goes to the other
/// workers, never to the draining one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_failing_beside_a_draining_rank_spends_no_restart() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let checkpointing = format!("{}\n[checkpoint]\nevery = 1000\nfinal_wait_s = 30\n", spec("drain-rank0", 2, 0, 0));
    let job = submit(&mut jobs, &checkpointing).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9975").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9976").await;
    let (a1, a2) = (w1.assignment().await, w2.assignment().await);
    let (rank0, mut rank0_w, rank1, mut rank1_w) = if a1.rank == 0 { (a1, w1, a2, w2) } else { (a2, w2, a1, w1) };
    rank0_w.set_busy_draining(&rank0);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !workers(&mut jobs).await.iter().any(|w| w.state == WorkerState::Busy as i32 && w.draining) {
        assert!(tokio::time::Instant::now() < deadline, "rank 0's worker never shown draining");
        tokio::time::sleep(HEARTBEAT).await;
    }
    rank1_w.done(&rank1, false, "collective: rank 0 closed the connection", 0).await;
    let j = wait_job(&mut jobs, &job.id, |j| j.attempt == 2).await;
    assert_ne!(state(&j), JobState::Failed, "{}", j.error);
    assert_eq!(j.restarts, 0, "a failure caused by a drain spends no restart");
    // rank 1's run is aborted (its worker then idle); a new worker joins: nothing is placed
    // while rank 0 is still saving its rescue checkpoint
    assert_eq!(rank1_w.abort().await.attempt, 1);
    rank1_w.set_idle();
    let mut w3 = Worker::join(&coord.url, "127.0.0.1:9977").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&mut jobs, &job.id).await.attempt, 2);
    assert!(workers(&mut jobs).await.iter().all(|w| w.job_id.is_empty() || w.id == rank0_w.id), "attempt 2 placed before rank 0's rescue");
    let uri = format!("file:///tmp/ckpt/jobs/{}/ckpt/37/", job.id);
    rank0_w
        .client
        .clone()
        .report_checkpoint(CheckpointReport { job_id: job.id.clone(), attempt: 1, step: 37, uri: uri.clone(), manifest_sha256: "cd".repeat(32) })
        .await
        .unwrap();
    rank0_w.drained(&rank0, 37).await;
    let texts = event_texts(&mut jobs, &job.id).await;
    assert!(texts.iter().any(|t| t.contains("is shutting down") && t.contains("no restart spent")), "{texts:?}");
    // the next attempt: rank 1's worker and the new one, from the rescue checkpoint
    let (b1, b3) = (rank1_w.assignment().await, w3.assignment().await);
    assert_eq!((b1.attempt, b3.attempt), (2, 2));
    assert_eq!((b1.start_step, b1.resume_from.as_str()), (37, uri.as_str()));
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(m) = tokio::time::timeout_at(until, rank0_w.next()).await {
        assert!(!matches!(m, coordinator_message::Body::Assign(_)), "the draining worker was given the job again: {m:?}");
    }
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_worker_takes_no_new_work() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let w1 = Worker::join(&coord.url, "127.0.0.1:9961").await;
    w1.set_draining();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while workers(&mut jobs).await[0].state != WorkerState::Draining as i32 {
        assert!(tokio::time::Instant::now() < deadline, "worker never shown draining");
        tokio::time::sleep(HEARTBEAT).await;
    }
    let job = submit(&mut jobs, &spec("after-drain", 1, 0, 0)).await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9962").await;
    assert_eq!(w2.assignment().await.job_id, job.id);
    coord.stop().await;
}

/// A checkpointing GPT job whose rank 1 is lost: the restart waits for rank 0 to end the attempt
/// (it may save a rescue checkpoint), holds rank 0's worker and the job's place in the queue
/// meanwhile (a later job does not take the free workers), takes rank 0's late checkpoint
/// report and starts from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_waits_for_rank0_to_end_the_attempt_and_resumes_from_its_rescue_checkpoint() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let checkpointing = format!("{}\n[checkpoint]\nevery = 1000\nfinal_wait_s = 30\n", spec("rescued", 2, 5, 1));
    let job = submit(&mut jobs, &checkpointing).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9601").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9602").await;
    let a1 = w1.assignment().await;
    let a2 = w2.assignment().await;
    let (r1, r2) = tokio::join!(w1.rendezvous(&a1, &[]), w2.rendezvous(&a2, &[]));
    r1.unwrap();
    r2.unwrap();
    let (mut rank0, a0, mut rank1) = if a1.rank == 0 { (w1, a1, w2) } else { (w2, a2, w1) };
    rank0.set_busy(&a0);

    // rank 1's stream drops; rank 0 is told to abort
    rank1.drop_stream();
    let abort = rank0.abort().await;
    assert_eq!(abort.attempt, 1);
    let j = wait_state(&mut jobs, &job.id, JobState::Restarting).await;
    assert_eq!(j.attempt, 2);
    let texts = event_texts(&mut jobs, &job.id).await.join("\n");
    assert!(texts.contains("once rank 0 ends it"), "{texts}");

    // two fresh workers and a lower-priority job that would fit them: neither job is placed
    // while rank 0 is still ending the attempt
    let mut w3 = Worker::join(&coord.url, "127.0.0.1:9603").await;
    let mut w4 = Worker::join(&coord.url, "127.0.0.1:9604").await;
    let later = submit(&mut jobs, &spec("later", 2, 0, 0)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(state(&get(&mut jobs, &later.id).await), JobState::Queued, "a later job took the restarting job's place");
    assert_eq!(state(&get(&mut jobs, &job.id).await), JobState::Restarting);
    let ws = workers(&mut jobs).await;
    assert_eq!(ws.iter().find(|w| w.id == rank0.id).unwrap().state, WorkerState::Busy as i32, "rank 0's worker was handed out while ending its attempt");

    // rank 0 reports the checkpoint it saved as it ended (attempt 1's), then the attempt done
    let uri = format!("file:///tmp/ckpt/jobs/{}/ckpt/37/", job.id);
    rank0
        .client
        .clone()
        .report_checkpoint(CheckpointReport { job_id: job.id.clone(), attempt: 1, step: 37, uri: uri.clone(), manifest_sha256: "cd".repeat(32) })
        .await
        .unwrap();
    // while it still waits, the job shows where it will resume: the rescue checkpoint
    let waiting = get(&mut jobs, &job.id).await;
    assert_eq!((state(&waiting), waiting.last_step, waiting.resume_from.as_str()), (JobState::Restarting, 37, uri.as_str()));
    rank0.set_idle();
    rank0.done(&a0, false, "aborted by the coordinator", 37).await;
    // attempt 2 starts from it, on two of the three free workers; then the later job
    let mut got = Vec::new();
    for w in [&mut rank0, &mut w3, &mut w4] {
        if let Ok(Ok(b)) = tokio::time::timeout(Duration::from_secs(3), w.assignment()).await.map(Ok::<_, ()>) {
            got.push(b);
        }
    }
    let restarted: Vec<&Assignment> = got.iter().filter(|b| b.job_id == job.id).collect();
    assert_eq!(restarted.len(), 2, "{got:?}");
    for b in restarted {
        assert_eq!((b.attempt, b.start_step, b.resume_from.as_str()), (2, 37, uri.as_str()));
    }
    coord.stop().await;
}

/// The same fault in a job with no restarts left: nothing waits, and rank 0's worker takes the
/// next job as soon as it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_does_not_hold_its_rank0_worker() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &format!("{}\n[checkpoint]\nevery = 1000\n", spec("last-try", 2, 0, 0))).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9611").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9612").await;
    let a1 = w1.assignment().await;
    let a2 = w2.assignment().await;
    let (mut rank0, a0, mut rank1) = if a1.rank == 0 { (w1, a1, w2) } else { (w2, a2, w1) };
    rank0.set_busy(&a0);
    rank1.drop_stream();
    rank0.abort().await;
    wait_state(&mut jobs, &job.id, JobState::Failed).await;
    rank0.set_idle();
    let next = submit(&mut jobs, &spec("next", 1, 0, 0)).await;
    let b = within("rank 0's worker taking the next job", rank0.assignment()).await;
    assert_eq!(b.job_id, next.id);
    coord.stop().await;
}

/// `JobLogs.settled`: false while a job runs, and after it has ended while a rank winds down
/// (rank 0 saving a rescue checkpoint); true once no worker holds one of its ranks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_logs_are_settled_once_no_rank_is_still_out() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    // a job that fails on rank 1 while rank 0 holds its step: rank 0 winds down
    let job = submit(&mut jobs, &format!("{}\n[checkpoint]\nevery = 1000\nfinal_wait_s = 30\n", spec("pair", 2, 0, 0))).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9851").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9852").await;
    let (a1, a2) = (within("a rank", w1.assignment()).await, within("a rank", w2.assignment()).await);
    w1.set_busy(&a1);
    w2.set_busy(&a2);
    wait_state(&mut jobs, &job.id, JobState::Running).await;
    assert!(!settled(&mut jobs, &job.id).await, "a running job's logs are not settled");
    let ((r0, w_r0), (r1, w_r1)) = if a1.rank == 0 { ((&a1, &w1), (&a2, &w2)) } else { ((&a2, &w2), (&a1, &w1)) };
    w_r1.done(r1, false, "rank 1 died", 3).await;
    w_r1.set_idle();
    wait_state(&mut jobs, &job.id, JobState::Failed).await;
    assert!(!settled(&mut jobs, &job.id).await, "rank 0 is still winding down");
    w_r0.done(r0, false, "aborted by the coordinator", 3).await;
    w_r0.set_idle();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !settled(&mut jobs, &job.id).await {
        assert!(tokio::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(HEARTBEAT).await;
    }
    coord.stop().await;
}

async fn settled(jobs: &mut job_service_client::JobServiceClient<tonic::transport::Channel>, id: &str) -> bool {
    let r = JobLogsRequest { job_id: id.to_string(), ..Default::default() };
    jobs.job_logs(r).await.unwrap().into_inner().settled
}
