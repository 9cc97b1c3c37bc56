//! Checkpoints and exact resume with real processes: a coordinator and workers as `smelt`
//! processes on loopback, SIGKILL mid-job, a resumed job on another world size. Workers record
//! the sample indices of every step (`SMELT_SAMPLE_LOG`), so "the same data" is checked index
//! by index.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::{job_event, CancelJobRequest, GetJobRequest, Job, JobState, ListWorkersRequest, SubmitRequest, WatchJobRequest, WorkerState};
use tonic::transport::Channel;

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
    _coordinator: Proc,
    workers: Vec<Option<Proc>>,
    rt: tokio::runtime::Runtime,
}

const LONG: Duration = Duration::from_secs(240);

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
        let db = dir.path().join("coordinator.db");
        let log = log_file(dir.path(), "coordinator");
        let child = Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(["coordinator", "--listen", &addr, "--db", db.to_str().unwrap(), "--heartbeat-ms", "100", "--lease-timeout-ms", "1500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "coordinator did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Cluster { dir, addr, _coordinator: Proc(child), workers: Vec::new(), rt }
    }

    fn start_worker(&mut self) -> usize {
        let i = self.workers.len();
        let out = self.dir.path().join(format!("worker-{i}"));
        let log = log_file(self.dir.path(), &format!("worker-{i}"));
        let child = Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(["--threads", "1", "worker", "--device", "cpu", "--coordinator", &format!("http://{}", self.addr), "--out-dir", out.to_str().unwrap()])
            .env("SMELT_SAMPLE_LOG", self.samples_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.workers.push(Some(Proc(child)));
        i
    }

    fn samples_dir(&self) -> PathBuf {
        self.dir.path().join("samples")
    }

    fn logs(&self) -> String {
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

    fn client(&self) -> JobServiceClient<Channel> {
        self.rt.block_on(JobServiceClient::connect(format!("http://{}", self.addr))).unwrap()
    }

    fn submit(&self, spec: &str, resume_from: &str) -> Job {
        let mut c = self.client();
        let r = self.rt.block_on(c.submit(SubmitRequest { spec_toml: spec.to_string(), resume_from: resume_from.to_string() }));
        r.unwrap().into_inner().job.unwrap()
    }

    fn job(&self, id: &str) -> Job {
        let mut c = self.client();
        self.rt.block_on(c.get_job(GetJobRequest { job_id: id.to_string() })).unwrap().into_inner()
    }

    fn wait_job(&self, id: &str, what: &str, pred: impl Fn(&Job) -> bool) -> Job {
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

    fn wait_succeeded(&self, id: &str) -> Job {
        self.wait_job(id, "success", |j| j.state == JobState::Succeeded as i32)
    }

    fn events(&self, id: &str) -> Vec<String> {
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

    fn workers_idle(&self) {
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

    fn spec(&self, name: &str, world: u32, micro: usize, max_restarts: u32) -> String {
        let text = self.dir.path().join("corpus.txt");
        if !text.exists() {
            let line = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";
            std::fs::write(&text, line.repeat(40)).unwrap();
        }
        format!(
            r#"
name = "{name}"
max_restarts = {max_restarts}
seed = 7

[model]
preset = "test"

[data]
text = "{text}"

[train]
steps = {STEPS}
global_batch = 8
micro_batch = {micro}
seq_len = 16
lr = 3e-3
warmup_steps = 2

[cluster]
world_size = {world}

[checkpoint]
every = {EVERY}
keep_last = 2
"#,
            text = text.display()
        )
    }

    fn model_of(&self, job: &str) -> Vec<f32> {
        for i in 0..self.workers.len() {
            let p = self.dir.path().join(format!("worker-{i}/jobs/{job}/model.safetensors"));
            if p.exists() {
                return smelt_worker::model_file::load(&p).unwrap().params;
            }
        }
        panic!("no final weights for {job}\n{}", self.logs())
    }

    /// step -> the sample indices of the step over all ranks (rank order), from the last
    /// attempt that ran it.
    fn samples(&self, job: &str, world: u32) -> BTreeMap<u64, Vec<u64>> {
        let mut per_rank: Vec<BTreeMap<u64, (u32, Vec<u64>)>> = Vec::new();
        for r in 0..world {
            let text = std::fs::read_to_string(self.samples_dir().join(format!("{job}.rank{r}.log"))).unwrap();
            let mut m = BTreeMap::new();
            for line in text.lines() {
                let v: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
                let (attempt, step) = (v[0] as u32, v[1]);
                if m.get(&step).is_none_or(|(a, _)| *a <= attempt) {
                    m.insert(step, (attempt, v[2..].to_vec()));
                }
            }
            per_rank.push(m);
        }
        let mut out = BTreeMap::new();
        for (step, _) in per_rank[0].iter() {
            out.insert(*step, per_rank.iter().flat_map(|m| m[step].1.clone()).collect());
        }
        out
    }
}

const STEPS: u64 = 300;
const EVERY: u64 = 10;

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log"))).unwrap()
}

#[test]
fn a_job_killed_with_sigkill_resumes_from_its_checkpoint_and_ends_bitwise_identical() {
    let mut c = Cluster::new();
    c.start_worker();
    let killed = c.submit(&c.spec("killed", 1, 8, 1), "");
    c.wait_job(&killed.id, "a checkpoint at step 20", |j| j.last_checkpoint_step >= 20);
    c.workers[0] = None; // SIGKILL
    let at_kill = c.job(&killed.id);
    assert!(at_kill.last_step < STEPS, "the job finished before the kill: {at_kill:?}");
    c.start_worker();
    let done = c.wait_succeeded(&killed.id);
    assert_eq!(done.restarts, 1, "{done:?}");
    assert!(done.resume_from.contains(&format!("jobs/{}/ckpt/", killed.id)), "the restart did not resume from a checkpoint: {done:?}");
    let from = smelt_checkpoint::step_of_uri(&done.resume_from).unwrap();
    assert!(from >= 20 && from < STEPS, "resumed from step {from}");
    let events = c.events(&killed.id).join("\n");
    assert!(events.contains(&format!("from step {from}")), "no restart event names the step:\n{events}");

    let whole = c.submit(&c.spec("uninterrupted", 1, 8, 0), "");
    c.wait_succeeded(&whole.id);
    let (a, b) = (c.model_of(&killed.id), c.model_of(&whole.id));
    assert_eq!(a.len(), b.len());
    let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} weights differ after a kill at step ~{} and a resume from step {from}", a.len(), at_kill.last_step);
}

#[test]
fn a_job_resumed_on_another_world_size_sees_exactly_the_same_samples() {
    let mut c = Cluster::new();
    c.start_worker();
    c.start_worker();
    // Two ranks of micro-batch 4; cancelled after a checkpoint or two.
    let first = c.submit(&c.spec("two-ranks", 2, 4, 0), "");
    c.wait_job(&first.id, "a checkpoint at step 20", |j| j.last_checkpoint_step >= 20);
    let mut client = c.client();
    c.rt.block_on(client.cancel_job(CancelJobRequest { job_id: first.id.clone() })).unwrap();
    c.workers_idle();
    // One rank, micro-batch 4 with 2 accumulation steps, from that job's latest checkpoint.
    let second = c.submit(&c.spec("one-rank-resumed", 1, 4, 0), &first.id);
    let start = smelt_checkpoint::step_of_uri(&second.resume_from).expect("the resumed job names its checkpoint");
    assert!(second.resume_from.contains(&format!("jobs/{}/ckpt/", first.id)), "{second:?}");
    assert!(start >= 20 && start < STEPS, "resumed at step {start}");
    c.wait_succeeded(&second.id);
    // The reference: one rank, micro-batch 8, never interrupted.
    let whole = c.submit(&c.spec("reference", 1, 8, 0), "");
    c.wait_succeeded(&whole.id);

    let (a, b, r) = (c.samples(&first.id, 2), c.samples(&second.id, 1), c.samples(&whole.id, 1));
    assert_eq!(*b.keys().next().unwrap(), start, "the resumed job's first step");
    let mut seen = BTreeMap::new();
    for s in 0..start {
        seen.insert(s, a.get(&s).unwrap_or_else(|| panic!("the first job never ran step {s}")).clone());
    }
    seen.extend(b);
    assert_eq!(seen.len() as u64, STEPS);
    for (s, want) in &r {
        assert_eq!(&seen[s], want, "step {s}: the interrupted and resumed pair saw other samples than the reference");
    }
    assert_eq!(r.len() as u64, STEPS);
}
