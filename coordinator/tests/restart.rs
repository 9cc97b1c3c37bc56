//! The coordinator restarted on the same SQLite file mid-job: jobs survive, workers re-attach.

mod common;

use common::*;
use smelt_proto::v1::*;

async fn running_pair(
    url: &str,
    jobs: &mut smelt_proto::v1::job_service_client::JobServiceClient<tonic::transport::Channel>,
    max_restarts: u32,
) -> (Job, Worker, Assignment, Worker, Assignment) {
    let job = submit(jobs, &spec("long", 2, 0, max_restarts)).await;
    let mut w1 = Worker::join(url, "127.0.0.1:9001").await;
    let mut w2 = Worker::join(url, "127.0.0.1:9002").await;
    let a1 = w1.assignment().await;
    let a2 = w2.assignment().await;
    let (r1, r2) = tokio::join!(w1.rendezvous(&a1, &[]), w2.rendezvous(&a2, &[]));
    r1.unwrap();
    r2.unwrap();
    let (r0, a0) = if a1.rank == 0 { (&w1, &a1) } else { (&w2, &a2) };
    r0.metrics(a0, 5, 3.25).await;
    wait_job(jobs, &job.id, |j| j.last_step == 5).await;
    (job, w1, a1, w2, a2)
}

/// A worker process that outlives its coordinator: it registers again with its old id and the
/// assignment it still runs.
async fn rejoin(url: &str, old: &Worker, a: &Assignment) -> Worker {
    Worker::join_with(url, &old.data_addr, WorkerOpts { id: &old.id, running: Some(a.clone()), ..Default::default() })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_coordinator_keeps_the_job_and_reattaches_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("smelt.db");
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let (job, w1, a1, w2, a2) = running_pair(&coord.url, &mut jobs, 0).await;
    coord.stop().await;

    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let listed = jobs.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(listed.len(), 1);
    let j = &listed[0];
    assert_eq!((j.id.as_str(), state(j)), (job.id.as_str(), JobState::Running));
    assert_eq!((j.attempt, j.last_step, j.last_loss), (1, 5, 3.25));
    assert_eq!(j.worker_ids.len(), 2);

    let n1 = rejoin(&coord.url, &w1, &a1).await;
    let n2 = rejoin(&coord.url, &w2, &a2).await;
    assert_eq!((n1.id.as_str(), n2.id.as_str()), (w1.id.as_str(), w2.id.as_str()), "ids are kept");
    drop((w1, w2));
    // Several leases later the job is still running its first attempt: nobody was lost.
    tokio::time::sleep(LEASE * 2).await;
    let j = get(&mut jobs, &job.id).await;
    assert_eq!((state(&j), j.attempt, j.restarts), (JobState::Running, 1, 0));
    let ws = workers(&mut jobs).await;
    assert!(ws.iter().all(|w| w.state == WorkerState::Busy as i32 && w.job_id == job.id), "{ws:?}");
    let texts = event_texts(&mut jobs, &job.id).await;
    assert!(texts.iter().any(|t| t.contains(&format!("worker {} re-attached", n1.id))), "{texts:#?}");

    // The re-attached ranks carry on and finish.
    let (r0, b0, r1, b1) = if a1.rank == 0 { (&n1, &a1, &n2, &a2) } else { (&n2, &a2, &n1, &a1) };
    r0.metrics(b0, 6, 3.0).await;
    wait_job(&mut jobs, &job.id, |j| j.last_step == 6).await;
    r1.done(b1, true, "", 100).await;
    r0.done(b0, true, "", 100).await;
    let j = wait_state(&mut jobs, &job.id, JobState::Succeeded).await;
    assert_eq!((j.attempt, j.restarts), (1, 0));
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_that_does_not_come_back_is_lost_after_one_lease() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("smelt.db");
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let (job, w1, a1, w2, a2) = running_pair(&coord.url, &mut jobs, 1).await;
    coord.stop().await;

    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let mut n1 = rejoin(&coord.url, &w1, &a1).await;
    // w2 stays away: after its lease the attempt is aborted and the job restarts.
    let abort = n1.abort().await;
    assert_eq!((abort.job_id.as_str(), abort.attempt), (job.id.as_str(), 1));
    let j = wait_state(&mut jobs, &job.id, JobState::Restarting).await;
    assert_eq!(j.attempt, 2);
    let texts = event_texts(&mut jobs, &job.id).await;
    assert!(
        texts
            .iter()
            .any(|t| t.contains(&format!("worker {} lost (no heartbeat", w2.id)) && t.contains("restarting attempt 2")),
        "{texts:#?}"
    );
    // w2 comes back late, still running attempt 1: it is told to stop that, then joins attempt 2.
    let mut n2 = rejoin(&coord.url, &w2, &a2).await;
    assert_eq!(n2.id, w2.id);
    let stale = n2.abort().await;
    assert_eq!(stale.attempt, 1);
    assert!(stale.reason.contains("stale"), "{}", stale.reason);
    let b1 = n1.assignment().await;
    let b2 = n2.assignment().await;
    assert_eq!((b1.attempt, b2.attempt), (2, 2));
    drop((w1, w2));
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_and_history_continue_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("smelt.db");
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let first = submit(&mut jobs, &spec("a", 1, 0, 0)).await;
    jobs.cancel_job(CancelJobRequest { job_id: first.id.clone() }).await.unwrap();
    coord.stop().await;

    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let second = submit(&mut jobs, &spec("b", 1, 0, 0)).await;
    assert_eq!((first.id.as_str(), second.id.as_str()), ("job-000001", "job-000002"));
    let j = get(&mut jobs, &first.id).await;
    assert_eq!(state(&j), JobState::Cancelled);
    // The finished job's stored events replay, and the stream ends.
    let texts = event_texts(&mut jobs, &first.id).await;
    assert_eq!(texts, ["submitted", "cancelled by request"]);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_that_finished_while_the_coordinator_was_away_reports_after_rejoining() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("smelt.db");
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let (job, w1, a1, w2, a2) = running_pair(&coord.url, &mut jobs, 0).await;
    coord.stop().await;

    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let n1 = rejoin(&coord.url, &w1, &a1).await;
    // w2 finished meanwhile: it registers with no running assignment, then sends its Done.
    let done = worker_message::Body::Done(AssignmentDone {
        job_id: a2.job_id.clone(),
        attempt: a2.attempt,
        ok: true,
        error: String::new(),
        final_step: 100,
        draining: false,
        final_models: String::new(),
        transient: false,
    });
    let n2 =
        Worker::join_with(&coord.url, &w2.data_addr, WorkerOpts { id: &w2.id, then: vec![done], ..Default::default() })
            .await;
    assert_eq!(n2.id, w2.id);
    // its idle heartbeats after the report, while its peer still runs, do not fail the attempt
    // (they did: the report did not end the wait for one)
    tokio::time::sleep(HEARTBEAT * 8).await;
    let j = get(&mut jobs, &job.id).await;
    assert_eq!(state(&j), JobState::Running, "{j:?}");
    n1.done(&a1, true, "", 100).await;
    let j = wait_state(&mut jobs, &job.id, JobState::Succeeded).await;
    assert_eq!((j.attempt, j.restarts), (1, 0));
    drop((w1, w2));
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_that_rejoins_without_its_assignment_fails_the_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("smelt.db");
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let (job, w1, a1, w2, _a2) = running_pair(&coord.url, &mut jobs, 0).await;
    coord.stop().await;

    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let mut n1 = rejoin(&coord.url, &w1, &a1).await;
    // w2's process restarted and forgot its assignment: it says idle, twice.
    let _n2 = Worker::join_with(&coord.url, &w2.data_addr, WorkerOpts { id: &w2.id, ..Default::default() }).await;
    n1.abort().await;
    let j = wait_state(&mut jobs, &job.id, JobState::Failed).await;
    assert!(
        j.error.contains(&format!("worker {} failed: worker re-registered without its assignment", w2.id)),
        "{}",
        j.error
    );
    drop((w1, w2));
    coord.stop().await;
}
