//! A fine-tuning job through the cluster for real: a coordinator process and two worker
//! processes on loopback. A pretraining job makes the parent; a two-rank classification job
//! fine-tunes it, streams its validation accuracy, and saves a model that names its parent; a
//! job with a bad init_from fails with an error naming the field.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::{job_event, GetJobRequest, Job, JobState, StepMetrics, SubmitRequest, WatchJobRequest};

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    addr: String,
    _procs: Vec<Proc>,
    rt: tokio::runtime::Runtime,
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

impl Cluster {
    fn new(workers: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let db = dir.path().join("coordinator.db");
        let mut procs = vec![spawn(
            dir.path(),
            "coordinator",
            &["coordinator", "--listen", &addr, "--db", db.to_str().unwrap(), "--heartbeat-ms", "100", "--lease-timeout-ms", "1500"],
        )];
        let url = format!("http://{addr}");
        for i in 0..workers {
            let out = dir.path().join(format!("worker-{i}"));
            procs.push(spawn(dir.path(), &format!("worker-{i}"), &["--threads", "1", "worker", "--device", "cpu", "--coordinator", &url, "--out-dir", out.to_str().unwrap()]));
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Cluster { dir, addr, _procs: procs, rt }
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                s += &format!("--- {}\n{}\n", e.path().display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        s
    }

    fn client(&self) -> JobServiceClient<tonic::transport::Channel> {
        let url = format!("http://{}", self.addr);
        self.rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match JobServiceClient::connect(url.clone()).await {
                    Ok(c) => return c,
                    Err(e) if Instant::now() > deadline => panic!("cannot reach the coordinator: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    }

    fn submit(&self, spec: &str) -> Job {
        let mut c = self.client();
        self.rt.block_on(c.submit(SubmitRequest { spec_toml: spec.to_string(), resume_from: String::new() })).unwrap().into_inner().job.unwrap()
    }

    fn job(&self, id: &str) -> Job {
        let mut c = self.client();
        self.rt.block_on(c.get_job(GetJobRequest { job_id: id.to_string() })).unwrap().into_inner()
    }

    /// Follows a job's events until it ends: (final state, every metrics event seen).
    fn follow(&self, id: &str) -> (JobState, Vec<StepMetrics>) {
        let mut c = self.client();
        let deadline = Instant::now() + Duration::from_secs(180);
        self.rt.block_on(async {
            let mut stream = c.watch_job(WatchJobRequest { job_id: id.to_string() }).await.unwrap().into_inner();
            let mut metrics = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let ev = match tokio::time::timeout(left, stream.message()).await {
                    Ok(Ok(Some(ev))) => ev,
                    _ => break,
                };
                match ev.body {
                    Some(job_event::Body::Metrics(m)) => metrics.push(m),
                    Some(job_event::Body::State(s)) => {
                        let to = JobState::try_from(s.to).unwrap_or_default();
                        if matches!(to, JobState::Succeeded | JobState::Failed | JobState::Cancelled) {
                            return (to, metrics);
                        }
                    }
                    _ => {}
                }
            }
            (JobState::try_from(self.job(id).state).unwrap_or_default(), metrics)
        })
    }

    fn model_of(&self, job: &str) -> PathBuf {
        (0..2)
            .map(|i| self.dir.path().join(format!("worker-{i}/jobs/{job}/model.safetensors")))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no worker saved {job}\n{}", self.logs()))
    }
}

const LINE: &str = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";

#[test]
fn finetune_job_runs_on_two_workers_and_records_its_parent() {
    let c = Cluster::new(2);
    let text = c.dir.path().join("text.txt");
    std::fs::write(&text, LINE.repeat(40)).unwrap();
    let pre = c.submit(&format!(
        "name = \"parent\"\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\n[train]\nsteps = 10\nglobal_batch = 8\nmicro_batch = 8\nseq_len = 16\nlr = 3e-3\n",
        text.to_str().unwrap()
    ));
    let (state, _) = c.follow(&pre.id);
    assert_eq!(state, JobState::Succeeded, "pretraining failed\n{}", c.logs());
    let parent = c.model_of(&pre.id);

    // Words of the text; label: does the word hold an 'o'?
    let words: Vec<&str> = LINE.split(|ch: char| !ch.is_alphabetic()).filter(|w| !w.is_empty()).collect();
    let data = c.dir.path().join("labels.jsonl");
    let lines: String = (0..96)
        .map(|i| {
            let w = words[i % words.len()];
            serde_json::json!({"text": w, "label": w.contains('o') as u32}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let ft = |name: &str, init: &str| {
        format!(
            "name = {name:?}\nkind = \"finetune\"\n[finetune]\ninit_from = {init:?}\nhead = \"classification\"\nnum_labels = 2\ndata = {:?}\nval_fraction = 0.25\n\
             [train]\nsteps = 8\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\nlr = 3e-3\neval_interval = 4\n[cluster]\nworld_size = 2\n",
            data.to_str().unwrap()
        )
    };
    let job = c.submit(&ft("classify", parent.to_str().unwrap()));
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "fine-tuning failed: {}\n{}", c.job(&job.id).error, c.logs());
    let evals: Vec<(u64, f32)> = metrics.iter().filter_map(|m| m.val_accuracy.map(|a| (m.step, a))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![4, 8], "accuracy at each evaluation: {metrics:?}");
    assert!(evals.iter().all(|e| (0.0..=1.0).contains(&e.1)));
    assert_eq!(c.job(&job.id).last_step, 8);

    let bytes = std::fs::read(c.model_of(&job.id)).unwrap();
    let meta = smelt_engine::weights::metadata(&bytes, "fine-tuned").unwrap();
    assert_eq!(meta["smelt.parent"], parent.to_str().unwrap());
    assert_eq!(meta["smelt.parent_job"], pre.id);
    assert_eq!(meta["smelt.kind"], "finetune");

    let bad = c.submit(&ft("bad-init", "/nowhere/model.safetensors"));
    let (state, _) = c.follow(&bad.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&bad.id).error;
    assert!(error.contains("finetune.init_from") && error.contains("/nowhere/model.safetensors"), "{error}");
}
