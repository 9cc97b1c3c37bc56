//! A coordinator and worker processes on loopback for the cluster tests (SIGKILL is dropping
//! a worker's `Proc`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::{job_event, GetJobRequest, Job, JobState, ListWorkersRequest, StepMetrics, SubmitRequest, WatchJobRequest, WorkerState};
use tonic::transport::Channel;

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addr: String,
    _coordinator: Proc,
    pub workers: Vec<Option<Proc>>,
    pub rt: tokio::runtime::Runtime,
}

pub const LONG: Duration = Duration::from_secs(240);

impl Cluster {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, addr) = start_coordinator(dir.path(), &[]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Cluster { dir, addr, _coordinator: coordinator, workers: Vec::new(), rt }
    }

    /// A coordinator and `workers` workers.
    pub fn with_workers(workers: usize) -> Self {
        let mut c = Cluster::new();
        for _ in 0..workers {
            c.start_worker();
        }
        c
    }

    pub fn start_worker(&mut self) -> usize {
        self.start_worker_with(&[])
    }

    /// A worker whose process gets `env` on top of this one's (a store's AWS_* variables).
    pub fn start_worker_with(&mut self, env: &[(&str, String)]) -> usize {
        let i = self.workers.len();
        let out = self.dir.path().join(format!("worker-{i}"));
        let log = log_file(self.dir.path(), &format!("worker-{i}"));
        let child = Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(["--threads", "1", "worker", "--device", "cpu", "--coordinator", &format!("http://{}", self.addr), "--out-dir", out.to_str().unwrap()])
            .env("SMELT_SAMPLE_LOG", self.samples_dir())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.workers.push(Some(Proc(child)));
        i
    }

    pub fn samples_dir(&self) -> PathBuf {
        self.dir.path().join("samples")
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            s += &format!("--- {} (last lines)\n{}\n", p.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        s
    }

    pub fn client(&self) -> JobServiceClient<Channel> {
        self.rt.block_on(JobServiceClient::connect(format!("http://{}", self.addr))).unwrap()
    }

    pub fn try_submit(&self, spec: &str, resume_from: &str) -> Result<Job, tonic::Status> {
        let mut c = self.client();
        let r = self.rt.block_on(c.submit(SubmitRequest { spec_toml: spec.to_string(), resume_from: resume_from.to_string() }));
        Ok(r?.into_inner().job.unwrap())
    }

    pub fn submit(&self, spec: &str, resume_from: &str) -> Job {
        self.try_submit(spec, resume_from).unwrap()
    }

    pub fn job(&self, id: &str) -> Job {
        let mut c = self.client();
        self.rt.block_on(c.get_job(GetJobRequest { job_id: id.to_string() })).unwrap().into_inner()
    }

    pub fn wait_job(&self, id: &str, what: &str, pred: impl Fn(&Job) -> bool) -> Job {
        let deadline = Instant::now() + LONG;
        loop {
            let j = self.job(id);
            if pred(&j) {
                return j;
            }
            assert!(Instant::now() < deadline, "job {id}: waited for {what}; job is {j:?}\n{}", self.logs());
            assert!(j.state != JobState::Failed as i32, "job {id} failed while waiting for {what}: {}\n{}", j.error, self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_succeeded(&self, id: &str) -> Job {
        self.wait_job(id, "success", |j| j.state == JobState::Succeeded as i32)
    }

    pub fn events(&self, id: &str) -> Vec<String> {
        let mut c = self.client();
        self.rt.block_on(async {
            let mut stream = c.watch_job(WatchJobRequest { job_id: id.to_string() }).await.unwrap().into_inner();
            let mut out = Vec::new();
            while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await.unwrap_or(Ok(None)) {
                match ev.body {
                    Some(job_event::Body::Message(m)) => out.push(m),
                    Some(job_event::Body::State(s)) => out.push(format!("state -> {:?}: {}", s.to, s.reason)),
                    _ => {}
                }
            }
            out
        })
    }

    /// The job's events once one starts with each of `wanted` (they come up the heartbeat
    /// stream, maybe after the job ended), or as they are after [`LONG`].
    pub fn events_with(&self, id: &str, wanted: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + LONG;
        let mut events = self.events(id);
        while !wanted.iter().all(|w| events.iter().any(|e| e.starts_with(w))) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            events = self.events(id);
        }
        events
    }

    /// Follows a job's events until it ends: (final state, every metrics event seen).
    pub fn follow(&self, id: &str) -> (JobState, Vec<StepMetrics>) {
        let mut c = self.client();
        let deadline = Instant::now() + Duration::from_secs(180);
        let (ended, metrics) = self.rt.block_on(async {
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
                            return (Some(to), metrics);
                        }
                    }
                    _ => {}
                }
            }
            (None, metrics)
        });
        // the stream ended or timed out: the job's state as it is now (outside the runtime)
        (ended.unwrap_or_else(|| JobState::try_from(self.job(id).state).unwrap_or_default()), metrics)
    }

    pub fn workers_idle(&self) {
        let deadline = Instant::now() + LONG;
        loop {
            let mut c = self.client();
            let ws = self.rt.block_on(c.list_workers(ListWorkersRequest {})).unwrap().into_inner().workers;
            if ws.iter().all(|w| w.state == WorkerState::Idle as i32) {
                return;
            }
            assert!(Instant::now() < deadline, "workers still busy\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `job`'s final model file, from whichever worker saved it.
    pub fn model_file(&self, job: &str) -> Option<PathBuf> {
        (0..self.workers.len()).map(|i| self.dir.path().join(format!("worker-{i}/jobs/{job}/model.safetensors"))).find(|p| p.exists())
    }

    /// `job`'s final model file; panics when no worker saved one.
    pub fn model_path(&self, job: &str) -> PathBuf {
        self.model_file(job).unwrap_or_else(|| panic!("no worker saved {job}\n{}", self.logs()))
    }

    /// The tensor data of `job`'s final weights (every tensor, head included, past the
    /// safetensors header, whose metadata names the job), from whichever worker saved them.
    pub fn weights_of(&self, job: &str) -> Vec<u8> {
        let p = self.model_file(job).unwrap_or_else(|| panic!("no final weights for {job}\n{}", self.logs()));
        let bytes = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + n..].to_vec()
    }

    /// `GET path` on the coordinator's port (its dashboard API, `/metrics`), as curl would:
    /// HTTP/1.1, one request per connection. (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.addr).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{head}"));
        let mut body = &raw[split + 4..];
        let mut out = Vec::new();
        if head.contains("transfer-encoding: chunked") {
            loop {
                let eol = body.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
                let size = usize::from_str_radix(std::str::from_utf8(&body[..eol]).unwrap().split(';').next().unwrap().trim(), 16).unwrap();
                if size == 0 {
                    break;
                }
                out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
                body = &body[eol + 2 + size + 2..];
            }
        } else {
            out = body.to_vec();
        }
        (status, String::from_utf8(out).expect("utf-8 body"))
    }

    /// The step a "rescue checkpoint at step N: ..." event of `job` names.
    pub fn rescued_step(&self, job: &str) -> u64 {
        let events = self.events(job).join("\n");
        events
            .lines()
            .find_map(|l| l.split("rescue checkpoint at step ").nth(1))
            .and_then(|rest| rest.split(':').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no rescue checkpoint event:\n{events}\n{}", self.logs()))
    }

    /// (attempt, step, at_ms) of every step rank 0 of `job` reported (the dashboard's API).
    pub fn reported_steps(&self, job: &str) -> Vec<(u64, u64, i64)> {
        let (status, body) = self.http_get(&format!("/api/jobs/{job}/metrics?max_points=20000"));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let points = v["points"].as_array().unwrap_or_else(|| panic!("metrics: {body}"));
        points.iter().map(|p| (p["attempt"].as_u64().unwrap(), p["step"].as_u64().unwrap(), p["at_ms"].as_i64().unwrap())).collect()
    }

    /// `smelt <args>` against this cluster's coordinator: (success, stdout + stderr).
    pub fn smelt(&self, args: &[&str]) -> (bool, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(args)
            .env("SMELT_COORDINATOR", format!("http://{}", self.addr))
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    }
}

/// A coordinator process on 127.0.0.1 with its database and log (`coordinator.log`) in `dir`,
/// leases short for tests, and `extra` arguments; and the address it bound. Port 0: the
/// coordinator binds a free port itself and logs it, so that tests running side by side cannot
/// race for a port picked here and released before it binds.
pub fn start_coordinator(dir: &Path, extra: &[&std::ffi::OsStr]) -> (Proc, String) {
    let log = log_file(dir, "coordinator");
    let mut child = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--heartbeat-ms", "100", "--lease-timeout-ms", "1500"])
        .arg("--db")
        .arg(dir.join("coordinator.db"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr = listening_addr(&dir.join("coordinator.log"), &mut child, 0);
    (Proc(child), addr)
}

/// How many times a coordinator has logged "coordinator listening" in `log` (a restarted
/// coordinator appends to the same log).
pub fn listening_lines(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains("coordinator listening")).count()
}

/// The address a coordinator started with `--listen 127.0.0.1:0` bound: the `addr=` of the first
/// "coordinator listening" line of `log` after the first `seen` ones (`listening_lines` before
/// the start), waiting up to 30 s. Port 0 lets the coordinator pick a free port itself: a port
/// picked by the test and released before the coordinator binds it can be taken meanwhile by a
/// test running beside it. Panics with the log if `child` exits first or no line comes.
pub fn listening_addr(log: &Path, child: &mut Child, seen: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text.lines().filter(|l| l.contains("coordinator listening")).nth(seen).and_then(|l| {
            let at = l.find("addr=")? + "addr=".len();
            l[at..].split_whitespace().next().map(str::to_string)
        });
        if let Some(addr) = found {
            return addr;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the coordinator exited ({status}) before listening; its log:\n{text}");
        }
        assert!(Instant::now() < deadline, "the coordinator did not log its address within 30 s; its log:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log"))).unwrap()
}

/// A one-rank job spec, `dir`/job.toml, on a small text in `dir`: `steps` long, micro-batches of
/// `micro_batch` (of a global batch of 4), `extra` TOML appended (`[checkpoint]` and such).
pub fn one_rank_spec(dir: &Path, name: &str, steps: u64, micro_batch: usize, extra: &str) -> PathBuf {
    let text = dir.join("corpus.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog.\n".repeat(40)).unwrap();
    let spec = dir.join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "name = {name:?}\nseed = 3\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\ntokenizer = \"char\"\n\
             [train]\nsteps = {steps}\nglobal_batch = 4\nmicro_batch = {micro_batch}\nseq_len = 16\nlr = 3e-3\nwarmup_steps = 2\neval_interval = 0\n\
             [cluster]\nworld_size = 1\n{extra}",
            text.to_str().unwrap()
        ),
    )
    .unwrap();
    spec
}

/// A checkpoint snapshot of a tiny GPT (byte vocabulary, one layer of 8) at `step` of `job_id`,
/// its weights drawn from `step`: what the checkpoint crate's `commit` writes as a real,
/// verifiable checkpoint for tests that need one without training.
pub fn tiny_snapshot(step: u64, job_id: &str) -> smelt_checkpoint::Snapshot {
    use smelt_checkpoint::manifest::{DataPosition, FORMAT};
    use smelt_checkpoint::{Lineage, Snapshot, TrainerJson};
    use smelt_engine::model::{Gpt, GptConfig, LayerNormPlacement};
    use smelt_engine::rng::Rng;
    use smelt_engine::train::TrainerState;
    let cfg = GptConfig { vocab_size: 256, block_size: 16, n_layer: 1, n_head: 2, n_embd: 8, ln_placement: LayerNormPlacement::Pre, positions: Default::default() };
    let n = Gpt::<smelt_engine::CpuBackend>::param_table(&cfg).total();
    let mut rng = Rng::new(step);
    let params: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
    Snapshot {
        m: vec![0.0; n],
        v: vec![0.0; n],
        params,
        trainer: TrainerJson {
            format: FORMAT.into(),
            step,
            job_id: job_id.into(),
            attempt: 1,
            data: DataPosition { samples_consumed: step * 4, global_batch: 4, seed: 1 },
            trainer: TrainerState { step, optimizer_steps: step, data_rng: Rng::new(1) },
            model: cfg.into(),
            head: None,
            tokenizer: smelt_corpus::Tokenizer::Byte,
            spec_toml: String::new(),
            lineage: Lineage::default(),
            smelt_version: "test".into(),
        },
    }
}
