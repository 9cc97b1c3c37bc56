//! GPU workers on a machine where no GPU can train (this build or this machine): the real agent
//! registers its device class and GPU index, the coordinator gangs a CUDA job onto it, and the
//! job fails with an error that says why (no `cuda` feature, no libnccl, no device) instead of
//! hanging. A real coordinator in process over a real SQLite file.

use std::path::Path;
use std::time::Duration;

use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::{DeviceClass, GetJobRequest, JobState, ListWorkersRequest, SubmitRequest};
use smelt_worker::{Device, WorkerConfig};
use tokio::sync::oneshot;

mod common;

/// Hang guard for waits (not a performance threshold).
const PATIENCE: Duration = Duration::from_secs(60);

fn gpu_spec() -> String {
    include_str!("../../examples/shakespeare-char.toml")
        .replace("max_restarts = 1", "max_restarts = 0")
        .replace("device = \"cpu\"", "device = \"cuda\"")
}

async fn worker(url: &str, out: &Path, device: Device) -> oneshot::Sender<()> {
    let cfg = WorkerConfig {
        coordinator: url.to_string(),
        data_bind: Some("127.0.0.1:0".into()),
        out_dir: out.to_path_buf(),
        hostname: "gpu-host".into(),
        device,
        token: None,
        logs: Default::default(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(smelt_worker::run(cfg, async move {
        let _ = stopped.await;
    }));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cuda_job_on_gpu_workers_without_a_usable_gpu_fails_saying_why() {
    if smelt_worker::device::probe_cuda(0).is_ok() {
        eprintln!("skipped: this machine trains on cuda:0 (the gpu path is tested by the device scripts)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let coord = common::Coordinator::start(dir.path(), Duration::from_millis(2000)).await;
    let url = coord.url.clone();
    let mut jobs = JobServiceClient::connect(url.clone()).await.unwrap();
    let job = jobs
        .submit(SubmitRequest { spec_toml: gpu_spec(), resume_from: String::new() })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let workers = [worker(&url, dir.path(), Device::Cuda(1)).await, worker(&url, dir.path(), Device::Cuda(0)).await];

    let deadline = tokio::time::Instant::now() + PATIENCE;
    let failed = loop {
        let j = jobs.get_job(GetJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
        if j.state == JobState::Failed as i32 {
            break j;
        }
        assert!(tokio::time::Instant::now() < deadline, "job did not fail: {j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Both were ganged as CUDA workers, ranks by GPU index.
    assert_eq!(failed.worker_ids.len(), 2, "{failed:?}");
    let ws = jobs.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers;
    let mut classes: Vec<(i32, u32)> = ws.iter().map(|w| (w.device_class, w.device_index)).collect();
    classes.sort();
    assert_eq!(classes, [(DeviceClass::Cuda as i32, 0), (DeviceClass::Cuda as i32, 1)]);
    let e = &failed.error;
    assert!(e.contains("cuda:0") || e.contains("cuda:1"), "the error names the device: {e}");
    if !cfg!(feature = "cuda") {
        // Rank 0 (cuda:0) fails creating the NCCL id, before its rendezvous.
        assert!(e.contains("creating the nccl unique id on cuda:0") && e.contains("without the `cuda` feature"), "{e}");
    }
    for w in workers {
        let _ = w.send(());
    }
    coord.stop(PATIENCE).await;
}
