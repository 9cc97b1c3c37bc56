//! A worker told to shut down (the SIGTERM path of `smelt worker`) in the middle of a run tells
//! the coordinator it is draining before it stops that run: the coordinator shows it busy and
//! draining while the run still ends (its step, its rescue checkpoint), not only once the run's
//! end arrives. That order is what lets a peer's failure caused by the stop count as the drain
//! (coordinator/tests/cluster.rs). The real agent and a real coordinator in process, over a real
//! SQLite file.

use std::time::Duration;

use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::{GetJobRequest, JobState, ListWorkersRequest, SubmitRequest, WorkerState};
use smelt_worker::{Device, WorkerConfig};
use tokio::sync::oneshot;

mod common;

/// Hang guard for waits (not a performance threshold).
const PATIENCE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_says_so_before_its_run_ends() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n".repeat(200)).unwrap();
    let coord = common::Coordinator::start(dir.path(), Duration::from_millis(5000)).await;
    let url = coord.url.clone();
    let mut jobs = JobServiceClient::connect(url.clone()).await.unwrap();
    // a long run that checkpoints (so its end saves a rescue checkpoint) with steps of some length
    let spec = format!(
        "name = \"drain\"\nmax_restarts = 0\nseed = 1\n[model]\npreset = \"tiny\"\n[data]\ntext = {:?}\ntokenizer = \"char\"\n\
         [train]\nsteps = 100000\nglobal_batch = 16\nmicro_batch = 16\nseq_len = 128\nlr = 1e-3\n[checkpoint]\nevery = 100000\n\
         [cluster]\nworld_size = 1\n",
        text.to_str().unwrap()
    );
    let job = jobs.submit(SubmitRequest { spec_toml: spec, resume_from: String::new() }).await.unwrap().into_inner().job.unwrap();
    let worker_cfg = WorkerConfig {
        coordinator: url.clone(),
        data_bind: Some("127.0.0.1:0".into()),
        out_dir: dir.path().join("worker"),
        hostname: "host".into(),
        device: Device::Cpu,
        token: None,
        logs: Default::default(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(smelt_worker::run(worker_cfg, async move {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let j = jobs.get_job(GetJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
        if j.state == JobState::Running as i32 && j.last_step >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job never ran: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let _ = stop.send(());
    // the coordinator shows it busy and draining before the run's end makes it draining and idle
    let seen = loop {
        let ws = jobs.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers;
        let w = ws.first().expect("the worker is listed");
        if w.state == WorkerState::Busy as i32 && w.draining {
            break true;
        }
        if w.state != WorkerState::Busy as i32 {
            break false; // its run ended first
        }
        assert!(tokio::time::Instant::now() < deadline, "the worker never ended its run: {w:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert!(seen, "the coordinator heard of the drain only from the run's end");
    // and the job waits to resume, no restart spent
    loop {
        let j = jobs.get_job(GetJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
        if j.attempt == 2 {
            assert_eq!((j.restarts, j.state == JobState::Failed as i32), (0, false), "{j:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job was not requeued: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(PATIENCE, agent).await;
    coord.stop(PATIENCE).await;
}
