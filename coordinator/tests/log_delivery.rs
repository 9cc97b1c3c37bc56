//! Log lines are stored once each, whatever the stream loses: a worker numbers its batches and
//! keeps them until the coordinator acknowledges them (after its store committed them), and
//! sends again those not acknowledged when it reconnects; the coordinator stores each number
//! once, also across its own restart (the numbers are in the SQLite file with the lines).

mod common;

use common::*;
use smelt_proto::v1::*;

fn batch(a: &Assignment, seq: u64, texts: &[&str]) -> worker_message::Body {
    let lines = texts
        .iter()
        .map(|t| LogLine { at_ms: 1_700_000_000_000, level: "INFO".into(), target: "smelt_worker::runner".into(), text: t.to_string() })
        .collect();
    worker_message::Body::Logs(LogBatch { job_id: a.job_id.clone(), attempt: a.attempt, rank: a.rank, lines, dropped: 0, seq })
}

async fn texts(jobs: &mut job_service_client::JobServiceClient<tonic::transport::Channel>, id: &str) -> Vec<String> {
    let r = JobLogsRequest { job_id: id.to_string(), ..Default::default() };
    jobs.job_logs(r).await.unwrap().into_inner().lines.into_iter().map(|l| l.text).collect()
}

/// A coordinator on a fresh file, a one-rank job, and the scripted worker running it.
struct Placed {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    coord: Coord,
    jobs: job_service_client::JobServiceClient<tonic::transport::Channel>,
    job: Job,
    w: Worker,
    a: Assignment,
}

async fn placed(data_addr: &str) -> Placed {
    let (dir, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("logged", 1, 0, 0)).await;
    let mut w = Worker::join(&coord.url, data_addr).await;
    let a = within("an assignment", w.assignment()).await;
    Placed { _dir: dir, db, coord, jobs, job, w, a }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_is_stored_once_across_reconnects_and_a_coordinator_restart() {
    let Placed { _dir: _d, db, coord, mut jobs, job, mut w, a } = placed("127.0.0.1:9861").await;

    w.send(batch(&a, 1, &["a", "b"])).await;
    w.logs_acked(1).await;
    assert_eq!(texts(&mut jobs, &job.id).await, ["a", "b"], "acknowledged only once committed: readable now");

    // the acknowledgement of 2 was lost with the stream: the worker sends 2 again on its next
    // stream, then 3
    w.send(batch(&a, 2, &["c"])).await;
    w.logs_acked(2).await;
    w.drop_stream();
    let mut w = Worker::join_with(
        &coord.url,
        &w.data_addr.clone(),
        WorkerOpts { id: &w.id.clone(), running: Some(a.clone()), then: vec![batch(&a, 2, &["c"]), batch(&a, 3, &["d"])], ..Default::default() },
    )
    .await;
    w.logs_acked(3).await;
    assert_eq!(texts(&mut jobs, &job.id).await, ["a", "b", "c", "d"]);

    // a coordinator restart on the same file remembers what it stored
    coord.stop().await;
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let (id, addr) = (w.id.clone(), w.data_addr.clone());
    drop(w);
    let mut w = Worker::join_with(
        &coord.url,
        &addr,
        WorkerOpts { id: &id, running: Some(a.clone()), then: vec![batch(&a, 3, &["d"]), batch(&a, 4, &["e"])], ..Default::default() },
    )
    .await;
    assert_eq!(w.id, id, "re-attached as itself");
    w.logs_acked(4).await;
    assert_eq!(texts(&mut jobs, &job.id).await, ["a", "b", "c", "d", "e"]);

    // an unnumbered batch (a worker of an older version) is stored as it comes
    w.send(batch(&a, 0, &["old"])).await;
    w.send(batch(&a, 5, &["f"])).await;
    w.logs_acked(5).await;
    assert_eq!(texts(&mut jobs, &job.id).await, ["a", "b", "c", "d", "e", "old", "f"]);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_store_failed_to_keep_is_asked_for_again_and_kept_once() {
    let Placed { _dir: _d, db, coord, mut jobs, job, mut w, a } = placed("127.0.0.1:9862").await;
    w.send(batch(&a, 1, &["a"])).await;
    w.logs_acked(1).await;

    // the store cannot write log lines (their table is away): batch 2 is not acknowledged, and
    // the worker is asked to send what follows batch 1 again
    let other = rusqlite::Connection::open(&db).unwrap();
    other.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    other.execute_batch("ALTER TABLE job_logs RENAME TO job_logs_away").unwrap();
    w.send(batch(&a, 2, &["b"])).await;
    let ack = w.next_logs_ack().await;
    assert_eq!((ack.seq, ack.resend), (1, true), "{ack:?}");

    // the store mends; the batch sent again is kept, once
    other.execute_batch("ALTER TABLE job_logs_away RENAME TO job_logs").unwrap();
    w.send(batch(&a, 2, &["b"])).await;
    w.logs_acked(2).await;
    w.send(batch(&a, 3, &["c"])).await;
    w.logs_acked(3).await;
    assert_eq!(texts(&mut jobs, &job.id).await, ["a", "b", "c"]);
    coord.stop().await;
}
