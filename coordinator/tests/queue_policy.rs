//! The scheduler's queue policy on a real coordinator (127.0.0.1:0, SQLite in a tempdir) with
//! gRPC clients playing workers: priority preemption, backfill behind a head that cannot start,
//! and what a waiting job says it waits for.

mod common;

use common::*;
use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::*;

/// Preemption with scripted workers: a job of equal priority never preempts; a priority-5 job
/// of 3 ranks that does not fit preempts both priority-0 jobs (2 ranks each: one alone would not
/// free enough) and leaves a priority-1 job running; neither uses a restart; the high job is placed only once
/// enough of their workers are back (rank 0s are held while they save their step); the
/// preempted jobs then wait behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_job_preempts_only_lower_ones_and_waits_for_their_workers() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let ckpt = "\n[checkpoint]\nevery = 1000\nfinal_wait_s = 30\n";
    let old = submit(&mut jobs, &format!("{}{ckpt}", spec("low-old", 2, 0, 0))).await;
    let young = submit(&mut jobs, &format!("{}{ckpt}", spec("low-young", 2, 0, 0))).await;
    // priority 1: lower than the high job, but taking the two priority-0 jobs is enough
    let tiny = submit(&mut jobs, &format!("{}{ckpt}", spec("tiny", 1, 1, 0))).await;
    let mut ws = Vec::new();
    for i in 0..5 {
        ws.push(Worker::join(&coord.url, &format!("127.0.0.1:{}", 9700 + i)).await);
    }
    let mut assigned = Vec::new();
    for w in ws.iter_mut() {
        let a = within("an assignment", w.assignment()).await;
        w.set_busy(&a);
        assigned.push(a);
    }
    // an equal priority waits, preempting nothing
    let same = submit(&mut jobs, &spec("same", 1, 0, 0)).await;
    tokio::time::sleep(HEARTBEAT * 6).await;
    assert_eq!(state(&get(&mut jobs, &same.id).await), JobState::Queued);
    for j in [&old, &young] {
        let j = get(&mut jobs, &j.id).await;
        assert!(matches!(state(&j), JobState::Scheduled | JobState::Running) && j.attempt == 1, "{j:?}");
    }

    let high = submit(&mut jobs, &spec("high", 3, 5, 0)).await;
    for j in [&old, &young] {
        let j = wait_state(&mut jobs, &j.id, JobState::Restarting).await;
        assert_eq!((j.attempt, j.restarts), (2, 0), "{j:?}");
        let texts = event_texts(&mut jobs, &j.id).await.join("\n");
        assert!(texts.contains(&format!("preempted by {} (priority 5 > 0)", high.id)), "{texts}");
    }
    // every rank is told; the rank 1s end at once, the rank 0s are saving their step
    for (w, a) in ws.iter_mut().zip(&assigned) {
        if a.job_id == tiny.id {
            continue;
        }
        let abort = within("an abort", w.abort()).await;
        assert!(abort.reason.contains("preempted by"), "{abort:?}");
        if a.rank != 0 {
            w.set_idle();
            w.done(a, false, "aborted by the coordinator", 20).await;
        }
    }
    tokio::time::sleep(HEARTBEAT * 6).await;
    assert_eq!(state(&get(&mut jobs, &high.id).await), JobState::Queued, "placed on the two free workers while it needs three");
    // one rank 0 done: three workers, the high job is placed
    let i0 = (0..5).find(|&i| assigned[i].rank == 0 && assigned[i].job_id != tiny.id).unwrap();
    ws[i0].set_idle();
    ws[i0].done(&assigned[i0], false, "aborted by the coordinator", 20).await;
    wait_state(&mut jobs, &high.id, JobState::Scheduled).await;
    // the preempted jobs (and the equal one) wait: one worker is left
    for j in [&old, &young] {
        assert_eq!(state(&get(&mut jobs, &j.id).await), JobState::Restarting);
    }
    // the priority-1 job was never needed
    let t = get(&mut jobs, &tiny.id).await;
    assert!(matches!(state(&t), JobState::Scheduled | JobState::Running) && t.attempt == 1, "{t:?}");
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_behind_a_stuck_head_backfill_idle_workers_and_give_them_back_when_it_can_start() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let ckpt = "\n[checkpoint]\nevery = 1000\nfinal_wait_s = 30\n";
    // a running job that never gives way (no checkpoints) holds two of three workers
    let runner = submit(&mut jobs, &spec("runner", 2, 0, 0)).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9801").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9802").await;
    let r1 = within("runner's rank", w1.assignment()).await;
    let r2 = within("runner's rank", w2.assignment()).await;
    assert_eq!((r1.job_id.as_str(), r2.job_id.as_str()), (runner.id.as_str(), runner.id.as_str()));
    w1.set_busy(&r1);
    w2.set_busy(&r2);
    wait_state(&mut jobs, &runner.id, JobState::Running).await;

    // the head needs all three: it can neither start nor preempt anything
    let head = submit(&mut jobs, &spec("head", 3, 0, 0)).await;
    // behind it: one that could not give the worker back, one that could
    let plain = submit(&mut jobs, &spec("plain", 1, 0, 0)).await;
    let filler = submit(&mut jobs, &format!("{}{ckpt}", spec("filler", 1, 0, 0))).await;
    let mut w3 = Worker::join(&coord.url, "127.0.0.1:9803").await;
    let f = within("the backfilled job", w3.assignment()).await;
    assert_eq!(f.job_id, filler.id, "the idle worker goes to the job behind the head that yields");
    w3.set_busy(&f);
    let j = wait_state(&mut jobs, &filler.id, JobState::Running).await;
    assert!(j.backfilled, "{j:?}");
    let texts = event_texts(&mut jobs, &filler.id).await.join("\n");
    assert!(texts.contains(&format!("backfilled behind {}", head.id)), "{texts}");
    tokio::time::sleep(HEARTBEAT * 4).await;
    assert_eq!(state(&get(&mut jobs, &head.id).await), JobState::Queued);
    assert_eq!(state(&get(&mut jobs, &plain.id).await), JobState::Queued, "a job that cannot give way is not backfilled");
    assert!(!get(&mut jobs, &runner.id).await.backfilled);

    // the runner ends: with the backfilled job's worker the head fits, so that job gives way
    for (w, a) in [(&w1, &r1), (&w2, &r2)] {
        w.set_idle();
        w.done(a, true, "", 10).await;
    }
    wait_state(&mut jobs, &runner.id, JobState::Succeeded).await;
    let j = wait_state(&mut jobs, &filler.id, JobState::Restarting).await;
    assert_eq!((j.attempt, j.restarts), (2, 0), "a preemption uses none of max_restarts: {j:?}");
    let texts = event_texts(&mut jobs, &filler.id).await.join("\n");
    assert!(texts.contains(&format!("preempted by {}, which is ahead of it in the queue (it was backfilled)", head.id)), "{texts}");
    let abort = within("the abort", w3.abort()).await;
    assert!(abort.reason.contains("preempted by"), "{abort:?}");
    // its rank 0 saves its step and ends the attempt; then the head has its three workers
    w3.set_idle();
    w3.done(&f, false, "aborted by the coordinator", 20).await;
    let h = wait_state(&mut jobs, &head.id, JobState::Scheduled).await;
    assert_eq!(h.worker_ids.len(), 3);
    assert!(!h.backfilled, "the head was placed in queue order: {h:?}");
    for w in [&mut w1, &mut w2, &mut w3] {
        assert_eq!(within("the head's rank", w.assignment()).await.job_id, head.id);
    }
    // nothing is left for the jobs behind it
    assert_eq!(state(&get(&mut jobs, &filler.id).await), JobState::Restarting);
    assert_eq!(state(&get(&mut jobs, &plain.id).await), JobState::Queued);
    coord.stop().await;
}

/// A lower-priority job placed in order keeps its worker when a backfilled one suffices: the
/// head (priority 5) would have had the backfilled job's worker, had nothing been backfilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfilled_job_gives_way_before_a_lower_priority_job_placed_in_order() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let ckpt = "\n[checkpoint]\nevery = 1000\nfinal_wait_s = 30\n";
    // a 2-rank job that never gives way, and a priority-0 job that would
    let RunnerAndLow { low, w1, w2, w3, r1, r2, .. } = runner_and_low(&coord, &mut jobs, 9811).await;
    // the head needs 3: 1 idle + low's 1 is not enough, so it is stuck and a job behind it backfills
    let head = submit(&mut jobs, &spec("head", 3, 5, 0)).await;
    let filler = submit(&mut jobs, &format!("{}{ckpt}", spec("filler", 1, 5, 0))).await;
    let mut w4 = Worker::join(&coord.url, "127.0.0.1:9814").await;
    let f = within("the backfilled job", w4.assignment()).await;
    assert_eq!(f.job_id, filler.id);
    w4.set_busy(&f);
    assert!(wait_state(&mut jobs, &filler.id, JobState::Running).await.backfilled);
    // the runner ends: 2 idle + the filler's worker make 3; the low job is left alone
    for (w, a) in [(&w1, &r1), (&w2, &r2)] {
        w.set_idle();
        w.done(a, true, "", 10).await;
    }
    wait_state(&mut jobs, &filler.id, JobState::Restarting).await;
    within("the filler's abort", w4.abort()).await;
    w4.set_idle();
    w4.done(&f, false, "aborted by the coordinator", 20).await;
    let h = wait_state(&mut jobs, &head.id, JobState::Scheduled).await;
    assert!(h.worker_ids.contains(&w4.id) && !h.worker_ids.contains(&w3.id), "{h:?}");
    // the head did not take the low job's worker (the filler, priority 5, may later: that is
    // plain priority preemption)
    let texts = event_texts(&mut jobs, &low.id).await.join("\n");
    assert!(!texts.contains(&format!("preempted by {}", head.id)), "the head preempted the job placed in order: {texts}");
    coord.stop().await;
}

/// GPU jobs are not backfilled (nor preempted) until a card shows a GPU rank's rescue is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_jobs_are_not_backfilled() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let ckpt = "\n[checkpoint]\nevery = 1000\nfinal_wait_s = 30\n";
    let head = submit(&mut jobs, &spec_on("head", 2, 0, 0, "cuda")).await;
    let filler = submit(&mut jobs, &format!("{}{ckpt}", spec_on("filler", 1, 0, 0, "cuda"))).await;
    let _g = Worker::join_with(&coord.url, "", WorkerOpts { device_class: DeviceClass::Cuda, ..Default::default() }).await;
    tokio::time::sleep(HEARTBEAT * 6).await;
    for j in [&head, &filler] {
        assert_eq!(state(&get(&mut jobs, &j.id).await), JobState::Queued, "{}", j.name);
    }
    coord.stop().await;
}

/// A waiting job says what it waits for: workers to connect, then its place in the queue; a job
/// that runs says nothing. A job bigger than the connected workers holds no place once it has
/// waited a lease: the workers there run the jobs behind it (they sat idle behind it); once
/// enough have joined it is the head again, ahead of jobs submitted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_job_says_what_it_waits_for() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let big = submit(&mut jobs, &spec("big", 2, 5, 0)).await;
    assert!(big.waiting_for.starts_with("2 cpu workers: 0 connected"), "{}", big.waiting_for);
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9831").await;
    let j = wait_job(&mut jobs, &big.id, |j| j.waiting_for.contains("1 connected") && j.waiting_for.contains("until then the jobs behind it start")).await;
    assert_eq!(state(&j), JobState::Queued);
    // a job behind it runs on the connected worker
    let small = submit(&mut jobs, &spec("small", 1, 0, 0)).await;
    let a = within("small's rank", w1.assignment()).await;
    assert_eq!(a.job_id, small.id, "the worker sat idle behind a job it cannot serve");
    w1.set_busy(&a);
    // with a second worker the big job can start: it is the head again, and a job submitted
    // now waits behind it
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9832").await;
    let j = wait_job(&mut jobs, &big.id, |j| j.waiting_for.starts_with("2 idle cpu workers (head of the cpu queue")).await;
    assert_eq!(j.waiting_for, "2 idle cpu workers (head of the cpu queue; 1 idle now, the others run jobs)");
    let later = submit(&mut jobs, &spec("later", 1, 0, 0)).await;
    assert_eq!(
        later.waiting_for,
        format!("1 job ahead in the cpu queue (the first, {}, priority 5, needs 2 workers; 1 idle now)", big.id),
    );
    w1.set_idle();
    w1.done(&a, true, "", 10).await;
    for w in [&mut w1, &mut w2] {
        let a = within("big's rank", w.assignment()).await;
        assert_eq!(a.job_id, big.id);
        w.set_busy(&a);
    }
    let j = wait_state(&mut jobs, &big.id, JobState::Running).await;
    assert_eq!(j.waiting_for, "", "a running job waits for nothing");
    // later is now the head; both workers are busy
    let s = get(&mut jobs, &later.id).await;
    assert_eq!(s.waiting_for, "1 idle cpu worker (head of the cpu queue; 0 idle now, the others run jobs)");
    // a job behind it that checkpoints is told it may backfill
    let filler = submit(&mut jobs, &format!("{}\n[checkpoint]\nevery = 1000\n", spec("filler", 1, 0, 0))).await;
    assert!(
        filler.waiting_for.starts_with(&format!("1 job ahead in the cpu queue (the first, {}, priority 0, needs 1 worker; 0 idle now); it may start on idle workers", later.id)),
        "{}",
        filler.waiting_for
    );
    coord.stop().await;
}

/// A job whose ranks report their Done one by one is ending: its workers count as on their way
/// back, so a head that needs them and one more preempts that one while the job's last rank
/// ends (its rescue overlaps the wait), not only once the job is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_counts_an_ending_jobs_workers_as_on_their_way_back() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let RunnerAndLow { runner, low, w1, w2, mut w3, r1, r2, l } = runner_and_low(&coord, &mut jobs, 9841).await;
    // a priority-5 job of 3 ranks: the low job alone cannot make it fit, so nothing is preempted
    let head = submit(&mut jobs, &spec("head", 3, 5, 0)).await;
    tokio::time::sleep(HEARTBEAT * 6).await;
    assert_eq!(get(&mut jobs, &low.id).await.attempt, 1);
    // the runner's rank 1 ends (Done before the idle status, as a worker sends them): the
    // runner's two workers are on their way back, and with the low job's the head fits
    let (rank1, w_rank1, rank0, w_rank0) = if r1.rank == 1 { (&r1, &w1, &r2, &w2) } else { (&r2, &w2, &r1, &w1) };
    w_rank1.done(rank1, true, "", 10).await;
    w_rank1.set_idle();
    let lj = wait_state(&mut jobs, &low.id, JobState::Restarting).await;
    assert_eq!((lj.attempt, lj.restarts), (2, 0));
    assert_eq!(state(&get(&mut jobs, &runner.id).await), JobState::Running, "the runner's rank 0 has not ended yet");
    within("the low job's abort", w3.abort()).await;
    w3.done(&l, false, "aborted by the coordinator", 5).await;
    w3.set_idle();
    w_rank0.done(rank0, true, "", 10).await;
    w_rank0.set_idle();
    let h = wait_state(&mut jobs, &head.id, JobState::Scheduled).await;
    assert_eq!(h.worker_ids.len(), 3);
    coord.stop().await;
}

/// A 2-rank job that never gives way (no checkpoints) on two workers, and a priority-0 job that
/// would (it checkpoints) on a third; workers on 127.0.0.1 ports `port`, +1, +2.
struct RunnerAndLow {
    runner: Job,
    low: Job,
    w1: Worker,
    w2: Worker,
    w3: Worker,
    r1: Assignment,
    r2: Assignment,
    l: Assignment,
}

async fn runner_and_low(coord: &Coord, jobs: &mut JobServiceClient<tonic::transport::Channel>, port: u16) -> RunnerAndLow {
    let runner = submit(jobs, &spec("runner", 2, 0, 0)).await;
    let mut w1 = Worker::join(&coord.url, &format!("127.0.0.1:{port}")).await;
    let mut w2 = Worker::join(&coord.url, &format!("127.0.0.1:{}", port + 1)).await;
    let (r1, r2) = (within("runner", w1.assignment()).await, within("runner", w2.assignment()).await);
    assert_eq!((r1.job_id.as_str(), r2.job_id.as_str()), (runner.id.as_str(), runner.id.as_str()));
    w1.set_busy(&r1);
    w2.set_busy(&r2);
    let low = submit(jobs, &format!("{}\n[checkpoint]\nevery = 1000\nfinal_wait_s = 30\n", spec("low", 1, 0, 0))).await;
    let mut w3 = Worker::join(&coord.url, &format!("127.0.0.1:{}", port + 2)).await;
    let l = within("low", w3.assignment()).await;
    assert_eq!(l.job_id, low.id);
    w3.set_busy(&l);
    wait_state(jobs, &low.id, JobState::Running).await;
    RunnerAndLow { runner, low, w1, w2, w3, r1, r2, l }
}
