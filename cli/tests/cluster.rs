//! The cluster for real: a coordinator process, worker processes, loopback sockets, a SQLite file,
//! SIGKILL. Queries go through the gRPC jobs service, as any client's would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::{job_event, GetJobRequest, Job, JobLogsRequest, JobState, ListWorkersRequest, SubmitRequest, WatchJobRequest, WorkerState};
use tonic::transport::Channel;

mod harness;

/// A child process killed (SIGKILL) when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn sigterm(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    addr: String,
    coordinator: Option<Proc>,
    workers: Vec<Proc>,
    rt: tokio::runtime::Runtime,
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log"))).unwrap()
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // empty until the coordinator's first start logs the port it bound
        let addr = String::new();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut c = Cluster { dir, addr, coordinator: None, workers: Vec::new(), rt };
        c.start_coordinator();
        c
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn start_coordinator(&mut self) {
        let db = self.dir.path().join("coordinator.db");
        let log = log_file(self.dir.path(), "coordinator");
        // The first start binds a free port of its own choosing (harness::listening_addr says
        // why); a restart takes the same address back, which the workers keep calling.
        let listen = if self.addr.is_empty() { "127.0.0.1:0".to_string() } else { self.addr.clone() };
        let log_path = self.dir.path().join("coordinator.log");
        let seen = harness::listening_lines(&log_path);
        let mut child = Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(["coordinator", "--listen", &listen, "--db", db.to_str().unwrap(), "--heartbeat-ms", "100", "--lease-timeout-ms", "1500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.addr = harness::listening_addr(&log_path, &mut child, seen);
        self.coordinator = Some(Proc { child });
    }

    fn start_worker(&mut self) -> usize {
        let i = self.workers.len();
        let out = self.dir.path().join(format!("worker-{i}"));
        let log = log_file(self.dir.path(), &format!("worker-{i}"));
        let child = Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(["--threads", "1", "worker", "--device", "cpu", "--coordinator", &self.url(), "--out-dir", out.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.workers.push(Proc { child });
        i
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect();
            paths.sort();
            for p in paths {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                s += &format!("--- {} (last lines)\n{}\n", p.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        s
    }

    fn client(&self) -> JobServiceClient<Channel> {
        let url = self.url();
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

    fn submit(&self, spec: &str) -> Result<Job, tonic::Status> {
        let mut c = self.client();
        self.rt
            .block_on(c.submit(SubmitRequest { spec_toml: spec.to_string(), resume_from: String::new() }))
            .map(|r| r.into_inner().job.expect("submit returns the job"))
    }

    fn job(&self, id: &str) -> Job {
        let mut c = self.client();
        self.rt.block_on(c.get_job(GetJobRequest { job_id: id.to_string() })).unwrap().into_inner()
    }

    fn wait_job(&self, id: &str, what: &str, timeout: Duration, pred: impl Fn(&Job) -> bool) -> Job {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.job(id);
            if pred(&j) {
                return j;
            }
            if Instant::now() > deadline {
                panic!("job {id}: waited {timeout:?} for {what}; job is {j:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_state(&self, id: &str, state: JobState, timeout: Duration) -> Job {
        self.wait_job(id, &format!("{state:?}"), timeout, |j| j.state == state as i32)
    }

    /// Every message event of a finished job.
    fn event_messages(&self, id: &str) -> Vec<String> {
        let mut c = self.client();
        self.rt.block_on(async {
            let mut stream = c.watch_job(WatchJobRequest { job_id: id.to_string() }).await.unwrap().into_inner();
            let mut out = Vec::new();
            while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap_or(Ok(None)) {
                match ev.body {
                    Some(job_event::Body::Message(m)) => out.push(m),
                    Some(job_event::Body::State(s)) => out.push(format!("state {:?} -> {:?}: {}", s.from, s.to, s.reason)),
                    _ => {}
                }
            }
            out
        })
    }

    /// Every stored log line of `id`, as (rank, text), oldest first.
    fn log_texts(&self, id: &str) -> Vec<(u32, String)> {
        let mut c = self.client();
        let (mut out, mut after) = (Vec::new(), 0);
        loop {
            let r = JobLogsRequest { job_id: id.to_string(), after, ..Default::default() };
            let page = self.rt.block_on(c.job_logs(r)).unwrap().into_inner();
            out.extend(page.lines.iter().map(|l| (l.rank, l.text.clone())));
            after = page.next;
            if !page.more {
                return out;
            }
        }
    }

    /// A 2000-step job checkpointing every 5 steps (keeping 2) on one worker, the coordinator
    /// SIGKILLed once it has recorded a checkpoint, and the worker left to train to the end
    /// unheard (its final weights written). Returns the job, its spec and the step recorded.
    fn train_to_the_end_while_the_coordinator_is_down(&mut self, max_restarts: u32) -> (Job, String, u64) {
        let spec = format!("{}\n[checkpoint]\nevery = 5\nkeep_last = 2\n", self.spec("unheard", 1, 8, 2000, max_restarts));
        let job = self.submit(&spec).unwrap();
        let recorded = self.wait_job(&job.id, "a recorded checkpoint", LONG, |j| j.last_checkpoint_step >= 5).last_checkpoint_step;
        self.coordinator.as_mut().unwrap().kill9();
        let weights = self.dir.path().join(format!("worker-0/jobs/{}/model.safetensors", job.id));
        let deadline = Instant::now() + LONG;
        while !weights.exists() {
            assert!(Instant::now() < deadline, "no final weights while the coordinator was down\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
        (job, spec, recorded)
    }

    fn worker_states(&self) -> Vec<i32> {
        let mut c = self.client();
        self.rt.block_on(c.list_workers(ListWorkersRequest {})).unwrap().into_inner().workers.iter().map(|w| w.state).collect()
    }

    fn text_path(&self) -> PathBuf {
        let path = self.dir.path().join("corpus.txt");
        if !path.exists() {
            let line = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";
            std::fs::write(&path, line.repeat(40)).unwrap();
        }
        path
    }

    fn spec(&self, name: &str, world: u32, micro: usize, steps: u64, max_restarts: u32) -> String {
        format!(
            r#"
name = "{name}"
max_restarts = {max_restarts}
seed = 7

[model]
preset = "test"

[data]
text = "{text}"
tokenizer = "char"

[train]
steps = {steps}
global_batch = 8
micro_batch = {micro}
seq_len = 16
lr = 3e-3
warmup_steps = 2
eval_interval = 0
eval_batches = 2

[cluster]
world_size = {world}
"#,
            text = self.text_path().display()
        )
    }

    fn model_of(&self, job: &str) -> Vec<f32> {
        for i in 0..self.workers.len() {
            let p = self.dir.path().join(format!("worker-{i}")).join("jobs").join(job).join("model.safetensors");
            if p.exists() {
                return smelt_worker::model_file::load(&p).unwrap().params;
            }
        }
        panic!("no worker wrote final weights for {job}\n{}", self.logs())
    }
}

const LONG: Duration = Duration::from_secs(120);

#[test]
fn two_workers_match_one_worker_with_twice_the_micro_batch() {
    let mut c = Cluster::new();
    c.start_worker();
    c.start_worker();
    let two = c.submit(&c.spec("two-ranks", 2, 4, 12, 0)).unwrap();
    c.wait_state(&two.id, JobState::Succeeded, LONG);
    let one = c.submit(&c.spec("one-rank", 1, 8, 12, 0)).unwrap();
    c.wait_state(&one.id, JobState::Succeeded, LONG);
    let (a, b) = (c.model_of(&two.id), c.model_of(&one.id));
    let max_diff = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    println!("max |w(2 workers) - w(1 worker)| after 12 steps: {max_diff:e}");
    assert!(max_diff < 1e-4, "2 workers vs 1 worker differ by {max_diff}");
    assert!(!a.is_empty() && a.len() == b.len() && a.iter().all(|x| x.is_finite()));
    // Gradient buckets averaged during the backward pass (the ring on its own thread; 0.01 MiB
    // is a few thousand values, several buckets for this model): the same weights, bit for bit.
    let spec = c.spec("two-ranks-buckets", 2, 4, 12, 0).replace("[cluster]\n", "[cluster]\ngrad_bucket_mb = 0.01\n");
    let buckets = c.submit(&spec).unwrap();
    c.wait_state(&buckets.id, JobState::Succeeded, LONG);
    let w = c.model_of(&buckets.id);
    assert!(w.iter().zip(&a).all(|(x, y)| x.to_bits() == y.to_bits()), "bucketed averaging changed the weights");
}

#[test]
fn job_waits_queued_until_enough_workers_exist() {
    let mut c = Cluster::new();
    c.start_worker();
    let job = c.submit(&c.spec("needs-two", 2, 4, 5, 0)).unwrap();
    // One worker registers and heartbeats; the job must stay queued.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.job(&job.id).state, JobState::Queued as i32, "{}", c.logs());
    c.start_worker();
    c.wait_state(&job.id, JobState::Succeeded, LONG);
}

/// A coordinator stopped (SIGSTOP: a VM paused, a host starved of CPU) for twice its lease and
/// then continued has read no heartbeat meanwhile; the silence was its own. Its workers, training
/// all along, are not declared lost: the job goes on in its first attempt (it allows no restart,
/// so a lease expired would have failed it).
#[test]
fn a_coordinator_stalled_past_the_lease_loses_no_worker() {
    let mut c = Cluster::new();
    c.start_worker();
    let job = c.submit(&c.spec("stalled", 1, 4, 1_000_000, 0)).unwrap();
    c.wait_job(&job.id, "a few steps", LONG, |j| j.last_step >= 3);
    let pid = c.coordinator.as_ref().unwrap().child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(3000)); // the lease is 1.5 s
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let step = c.job(&job.id).last_step;
    // longer than a lease after the stall: a lease taken from before it would have run out
    c.wait_job(&job.id, "steps after the stall", LONG, |j| j.last_step > step + 3);
    std::thread::sleep(Duration::from_millis(2000));
    let j = c.job(&job.id);
    assert!(j.state == JobState::Running as i32 && j.attempt == 1 && j.restarts == 0, "{j:?}\n{}", c.logs());
    assert!(c.worker_states().iter().all(|&s| s == WorkerState::Busy as i32), "{:?}\n{}", c.worker_states(), c.logs());
    let coordinator_log = std::fs::read_to_string(c.dir.path().join("coordinator.log")).unwrap();
    assert!(coordinator_log.contains("every worker's lease starts afresh"), "{coordinator_log}");
}

#[test]
fn cancel_stops_the_workers() {
    let mut c = Cluster::new();
    c.start_worker();
    c.start_worker();
    let job = c.submit(&c.spec("endless", 2, 4, 1_000_000, 0)).unwrap();
    c.wait_job(&job.id, "a few steps", LONG, |j| j.last_step >= 3);
    let mut client = c.client();
    let cancelled = c.rt.block_on(client.cancel_job(smelt_proto::v1::CancelJobRequest { job_id: job.id.clone() })).unwrap().into_inner();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    let deadline = Instant::now() + LONG;
    while !c.worker_states().iter().all(|&s| s == WorkerState::Idle as i32) {
        assert!(Instant::now() < deadline, "workers still busy after cancel: {:?}\n{}", c.worker_states(), c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let step = c.job(&job.id).last_step;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.job(&job.id).last_step, step, "a cancelled job made progress");
}

#[test]
fn killed_worker_restarts_the_job_when_restarts_remain() {
    let mut c = Cluster::new();
    c.start_worker();
    c.start_worker();
    let job = c.submit(&c.spec("survivor", 2, 4, 400, 1)).unwrap();
    c.wait_job(&job.id, "a few steps", LONG, |j| j.last_step >= 3);
    c.workers[1].kill9();
    c.start_worker();
    let done = c.wait_state(&job.id, JobState::Succeeded, Duration::from_secs(240));
    assert_eq!(done.restarts, 1, "{done:?}");
    assert!(done.attempt >= 2, "{done:?}");
    let events = c.event_messages(&job.id).join("\n");
    assert!(events.contains("lost"), "no event says a worker was lost:\n{events}");
}

#[test]
fn killed_worker_fails_the_job_without_restarts() {
    let mut c = Cluster::new();
    c.start_worker();
    c.start_worker();
    let job = c.submit(&c.spec("fragile", 2, 4, 1_000_000, 0)).unwrap();
    c.wait_job(&job.id, "a few steps", LONG, |j| j.last_step >= 3);
    c.workers[0].kill9();
    let failed = c.wait_state(&job.id, JobState::Failed, LONG);
    assert!(failed.error.contains("lost") || failed.error.contains("worker"), "failure reason does not name the lost worker: {:?}", failed.error);
}

/// The coordinator is killed; the worker trains to the end meanwhile (checkpoints the coordinator
/// never hears of, retention deleting the one it recorded) and is stopped (SIGTERM) before it
/// can report: it leaves after a while rather than wait for the coordinator forever. With the coordinator back and a new worker, the job's restart resumes from its newest
/// committed checkpoint, the last step: it succeeds, with nothing trained again.
#[test]
fn a_job_that_ended_while_the_coordinator_was_down_resumes_from_its_newest_checkpoint() {
    let mut c = Cluster::new();
    c.start_worker();
    // long enough that the kill lands early in the run (its first checkpoints are at step 5)
    let steps = 2000;
    let (job, _, recorded) = c.train_to_the_end_while_the_coordinator_is_down(2);
    // a SIGTERM: the worker cannot report the run's end, waits for the coordinator a while,
    // then exits saying so
    c.workers[0].sigterm();
    let status = c.workers[0].wait_exit(Duration::from_secs(120)).unwrap_or_else(|| panic!("the worker did not exit after SIGTERM\n{}", c.logs()));
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(c.dir.path().join("worker-0.log")).unwrap();
    assert!(log.contains("exiting with the run's end unreported"), "{log}");
    let recorded_dir = c.dir.path().join(format!("worker-0/jobs/{}/ckpt/{}", job.id, smelt_checkpoint::step_dir_name(recorded)));
    assert!(!recorded_dir.join("MANIFEST.json").exists(), "retention kept {}", recorded_dir.display());
    c.start_coordinator();
    c.start_worker();
    let done = c.wait_state(&job.id, JobState::Succeeded, Duration::from_secs(240));
    assert_eq!((done.restarts, done.last_step), (1, steps), "{done:?}");
    let events = c.event_messages(&job.id).join("\n");
    let newest = c.dir.path().join(format!("worker-0/jobs/{}/ckpt/{}", job.id, smelt_checkpoint::step_dir_name(steps)));
    assert!(
        events.contains(&format!("resuming from {}, this job's newest committed checkpoint", newest.display())),
        "{events}\n{}",
        c.logs()
    );
}

/// The coordinator is killed while the worker trains on to the end (checkpoints it never hears
/// of; retention deletes the one it recorded): back, it learns the newest of them from the
/// worker before the run's end, so the job's record names a checkpoint that exists, the last
/// one (`--resume-from JOB` read the deleted one), and the job succeeds without a restart.
#[test]
fn checkpoints_committed_while_the_coordinator_was_down_are_reported_once_it_is_back() {
    let mut c = Cluster::new();
    c.start_worker();
    let steps = 2000;
    let (job, spec, _) = c.train_to_the_end_while_the_coordinator_is_down(0);
    c.start_coordinator();
    let done = c.wait_state(&job.id, JobState::Succeeded, Duration::from_secs(240));
    assert_eq!((done.restarts, done.last_step, done.last_checkpoint_step), (0, steps, steps), "{done:?}\n{}", c.logs());
    let newest = c.dir.path().join(format!("worker-0/jobs/{}/ckpt/{}", job.id, smelt_checkpoint::step_dir_name(steps)));
    assert_eq!(done.last_checkpoint_uri, newest.display().to_string(), "{done:?}");
    assert!(newest.join("MANIFEST.json").exists());
    // the loss curve has the steps trained while it was down: the worker held their metrics and
    // sent them once it was back (it sent the newest alone); only those in flight at the kill
    // may be missing
    // (the coordinator's store thread writes them behind its in-memory state: read until in)
    let db = rusqlite::Connection::open(c.dir.path().join("coordinator.db")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored: u64 = db
            .query_row("SELECT COUNT(DISTINCT step) FROM metrics WHERE job_id = ?1 AND attempt = 1", [&job.id], |r| r.get(0))
            .unwrap();
        if stored + 50 >= steps {
            break;
        }
        assert!(Instant::now() < deadline, "{stored} of {steps} steps' metrics stored\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    // its last loss is the last step's (it kept the one before the kill): the same job run
    // again, undisturbed, ends with the same
    let again = c.submit(&spec.replace("name = \"unheard\"", "name = \"again\"")).unwrap();
    let reference = c.wait_state(&again.id, JobState::Succeeded, Duration::from_secs(240));
    assert_eq!(done.last_loss.to_bits(), reference.last_loss.to_bits(), "{done:?}\n{reference:?}");
}

/// While the coordinator is down, a worker whose run goes on (and sends an event every step)
/// waits out its reconnect backoff (100 ms, doubling, at most 5 s) between attempts: each attempt
/// logs one "coordinator unreachable" warning, so over a wait of W seconds there are at most
/// about log2(10 W) + W / 5 + 1 of them (not one per training step, as there were).
#[test]
fn a_worker_training_through_a_coordinator_outage_keeps_its_backoff() {
    let mut c = Cluster::new();
    c.start_worker();
    let job = c.submit(&c.spec("outage", 1, 8, 1_000_000, 0)).unwrap();
    c.wait_job(&job.id, "a few steps", LONG, |j| j.last_step >= 3);
    c.coordinator.as_mut().unwrap().kill9();
    let waited = Instant::now();
    let unreachable = || std::fs::read_to_string(c.dir.path().join("worker-0.log")).unwrap().matches("coordinator unreachable").count();
    // the run keeps stepping meanwhile: its log shows no warning per step
    std::thread::sleep(Duration::from_secs(4));
    let (n, secs) = (unreachable(), waited.elapsed().as_secs_f64());
    let bound = ((10.0 * secs).log2() + secs / 5.0 + 2.0).ceil() as usize;
    assert!(n >= 1, "no reconnect attempt logged\n{}", c.logs());
    assert!(n <= bound, "{n} reconnect warnings in {secs:.1} s (the backoff allows {bound})\n{}", c.logs());
}

#[test]
fn coordinator_restart_keeps_jobs_and_workers_reattach() {
    let mut c = Cluster::new();
    c.start_worker();
    c.start_worker();
    let job = c.submit(&c.spec("resilient", 2, 4, 300, 0)).unwrap();
    c.wait_job(&job.id, "a few steps", LONG, |j| j.last_step >= 3);
    // a script following the job as JSON is told when the coordinator goes, and follows on
    let mut follower = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["jobs", "follow", &job.id, "--json", "--coordinator", &c.url()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // its first event read: it is watching
    let mut follower_out = std::io::BufReader::new(follower.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut follower_out, &mut first).unwrap();
    c.coordinator.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_millis(300));
    c.start_coordinator();
    let j = c.job(&job.id);
    assert_eq!(j.name, "resilient");
    assert!(j.state == JobState::Running as i32 || j.state == JobState::Succeeded as i32, "after restart: {j:?}");
    let done = c.wait_state(&job.id, JobState::Succeeded, Duration::from_secs(240));
    assert_eq!(done.restarts, 0, "re-attached workers must not restart the job: {done:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut follower_out, &mut rest).unwrap();
    let followed = follower.wait_with_output().unwrap();
    let (out, err) = (first + &rest, String::from_utf8_lossy(&followed.stderr).into_owned());
    assert!(followed.status.success(), "{err}");
    let kinds: Vec<String> = out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().to_string()).collect();
    assert!(kinds.iter().any(|k| k == "reconnecting") && kinds.last().map(String::as_str) == Some("end"), "{out}");
    // every event has its time, the end's too
    assert!(out.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["at_ms"].as_i64().is_some_and(|t| t > 0)), "{out}");
    assert!(err.contains(&format!("lost the coordinator at {}; reconnecting", c.url())), "{err}");
    // the job's log lines from before and after the restart, each stored once (batches the
    // killed coordinator never acknowledged are sent again, and stored once)
    let lines = c.log_texts(&job.id);
    for rank in [0, 1] {
        for what in ["training started", "assignment finished", "re-registered"] {
            let n = lines.iter().filter(|(r, t)| *r == rank && t.contains(what)).count();
            assert_eq!(n, 1, "rank {rank}: {what:?} {n} times in\n{lines:#?}");
        }
    }
}

#[test]
fn bad_specs_and_unknown_jobs_get_clear_grpc_errors() {
    let c = Cluster::new();
    let bad = c.spec("bad", 2, 4, 10, 0).replace("global_batch = 8", "global_batch = 6");
    let e = c.submit(&bad).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("train.global_batch"), "{}", e.message());
    let e = c.submit(&c.spec("typo", 1, 8, 10, 0).replace("lr = 3e-3", "lr = 3e-3\nlearnin_rate = 1")).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("learnin_rate"), "{}", e.message());
    let mut client = c.client();
    let e = c.rt.block_on(client.get_job(GetJobRequest { job_id: "job-does-not-exist".into() })).unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("job-does-not-exist"), "{}", e.message());
}

impl Cluster {
    /// A char-level corpus prepared by `smelt corpus prepare`, in small shards.
    fn prepared_corpus(&self) -> PathBuf {
        let out = self.dir.path().join("corpus");
        let o = Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(["corpus", "prepare", "--input", self.text_path().to_str().unwrap(), "--tokenizer", "char"])
            .args(["--txt-docs", "line", "--shard-tokens", "1000", "--val-docs", "4", "--out", out.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "corpus prepare failed: {}", String::from_utf8_lossy(&o.stderr));
        out
    }
}

#[test]
fn job_trains_on_a_prepared_corpus_and_fails_clearly_on_a_corrupt_shard() {
    let mut c = Cluster::new();
    c.start_worker();
    c.start_worker();
    let corpus = c.prepared_corpus();
    let spec = |name: &str| {
        c.spec(name, 2, 4, 6, 0).replace(&format!("text = \"{}\"\ntokenizer = \"char\"", c.text_path().display()), &format!("corpus = \"{}\"", corpus.display()))
    };
    let good = c.submit(&spec("from-corpus")).unwrap();
    c.wait_state(&good.id, JobState::Succeeded, LONG);
    let model = c.model_of(&good.id);
    assert!(model.iter().all(|x| x.is_finite()));

    // Flip the first shard's magic: the job must fail and say which object is bad.
    let shard = corpus.join("shard-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let bad = c.submit(&spec("corrupt-corpus")).unwrap();
    let failed = c.wait_state(&bad.id, JobState::Failed, LONG);
    assert!(failed.error.contains("shard-00000.bin"), "the failure does not name the bad shard: {:?}", failed.error);
}

#[test]
fn sigterm_drains_an_idle_worker() {
    let mut c = Cluster::new();
    let i = c.start_worker();
    let deadline = Instant::now() + LONG;
    while c.worker_states().is_empty() {
        assert!(Instant::now() < deadline, "worker never registered\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed = c.start_worker();
    while c.worker_states().len() < 2 {
        assert!(Instant::now() < deadline, "the second worker never registered\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    c.workers[i].sigterm();
    let status = c.workers[i].wait_exit(Duration::from_secs(30)).expect("worker exits after SIGTERM");
    assert!(status.success(), "drained worker exit status {status:?}\n{}", c.logs());
    c.workers[killed].kill9();
    // `smelt workers` tells the worker shut down from the one that died
    while c.worker_states().iter().filter(|s| **s == WorkerState::Lost as i32).count() < 2 {
        assert!(Instant::now() < deadline, "the workers were not both let go\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_smelt")).arg("workers").env("SMELT_COORDINATOR", c.url()).output().unwrap();
    let list = String::from_utf8_lossy(&o.stdout).into_owned();
    let state_of = |id: &str| list.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("{id} not listed:\n{list}")).to_string();
    assert!(state_of("w-000001").contains("exited (drained)"), "{list}");
    assert!(state_of("w-000002").contains(" lost ") && !state_of("w-000002").contains("drained"), "{list}");
    // the coordinator logged the drained one's going as an exit, not a loss
    let coord_log = std::fs::read_to_string(c.dir.path().join("coordinator.log")).unwrap();
    assert!(coord_log.lines().any(|l| l.contains("worker exited (drained)") && l.contains("w-000001")), "{coord_log}");
    assert!(!coord_log.lines().any(|l| l.contains("worker lost") && l.contains("w-000001")), "{coord_log}");
    // and a restarted coordinator (same database) still tells them apart
    c.coordinator = None; // SIGKILL
    c.start_coordinator();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_smelt")).args(["workers", "--all"]).env("SMELT_COORDINATOR", c.url()).output().unwrap();
    let list = String::from_utf8_lossy(&o.stdout).into_owned();
    let state_of = |id: &str| list.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("{id} not listed after a restart:\n{list}")).to_string();
    assert!(state_of("w-000001").contains("exited (drained)"), "{list}");
    assert!(state_of("w-000002").contains(" lost ") && !state_of("w-000002").contains("drained"), "{list}");
}

#[test]
fn sigterm_drains_a_busy_worker_whose_last_lines_reach_the_coordinator() {
    let mut c = Cluster::new();
    let i = c.start_worker();
    let job = c.submit(&c.spec("drained", 1, 8, 1_000_000, 0)).unwrap();
    c.wait_job(&job.id, "a few steps", LONG, |j| j.last_step >= 3);
    c.workers[i].sigterm();
    let status = c.workers[i].wait_exit(Duration::from_secs(60)).expect("worker exits after SIGTERM");
    assert!(status.success(), "drained worker exit status {status:?}\n{}", c.logs());
    // the lines it logged after the SIGTERM, to the run's last, are with the job
    let lines = c.log_texts(&job.id);
    for what in ["sigterm: draining", "assignment stopped"] {
        assert!(lines.iter().any(|(_, t)| t.contains(what)), "no {what:?} in\n{lines:#?}");
    }
    // the drain was the machine's doing: the job, which allows no restarts, waits to resume
    // (its worker's Done said drained), and the next worker takes it up
    let j = c.wait_job(&job.id, "the job to wait for a worker", LONG, |j| j.attempt == 2);
    assert_ne!(JobState::try_from(j.state).unwrap(), JobState::Failed, "{}\n{}", j.error, c.logs());
    assert_eq!(j.restarts, 0);
    let events = c.event_messages(&job.id);
    assert!(events.iter().any(|e| e.contains("is shutting down") && e.contains("no restart spent")), "{events:#?}");
    c.start_worker();
    c.wait_job(&job.id, "the second attempt to run", LONG, |j| j.attempt == 2 && JobState::try_from(j.state) == Ok(JobState::Running));
}

/// SIGTERM of the worker holding rank 0 of a two-rank job: its stop closes the ring, so rank 1
/// may report a failure before rank 0 reports its drained run. The worker says it is draining
/// before it stops, so either way the job, which allows no restarts, waits to resume with its
/// restarts untouched, and its next attempt runs on rank 1's worker and a new one.
#[test]
fn sigterm_of_rank0s_worker_spends_no_restart() {
    let mut c = Cluster::new();
    c.start_worker();
    c.start_worker();
    // checkpoints: rank 0 writes a rescue checkpoint as it stops and reports it before its own
    // drained Done, so rank 1's failure may arrive first (with a model this small, not always:
    // coordinator/tests/cluster.rs forces that order)
    let spec = format!("{}\n[checkpoint]\nevery = 50\nkeep_last = 2\n", c.spec("drain-rank0", 2, 4, 1_000_000, 0));
    let job = c.submit(&spec).unwrap();
    let j = c.wait_job(&job.id, "a checkpoint", LONG, |j| j.last_checkpoint_step >= 50);
    let rank0 = j.worker_ids[0].clone();
    let i = (0..2)
        .find(|i| std::fs::read_to_string(c.dir.path().join(format!("worker-{i}.log"))).unwrap_or_default().contains(&format!("worker_id={rank0}")))
        .unwrap_or_else(|| panic!("no worker log names {rank0}\n{}", c.logs()));
    c.workers[i].sigterm();
    let status = c.workers[i].wait_exit(Duration::from_secs(60)).expect("worker exits after SIGTERM");
    assert!(status.success(), "drained worker exit status {status:?}\n{}", c.logs());
    let j = c.wait_job(&job.id, "the job to wait for a worker", LONG, |j| j.attempt == 2);
    assert_ne!(JobState::try_from(j.state).unwrap(), JobState::Failed, "{}\n{}", j.error, c.logs());
    assert_eq!(j.restarts, 0, "{:#?}", c.event_messages(&job.id));
    c.start_worker();
    let j = c.wait_job(&job.id, "the second attempt to run", LONG, |j| j.attempt == 2 && JobState::try_from(j.state) == Ok(JobState::Running));
    assert!(!j.worker_ids.contains(&rank0), "the draining worker holds a rank of attempt 2: {:?}", j.worker_ids);
}

/// Ctrl-C on `smelt submit --follow` stops the following only, and says so: the job keeps
/// running, and the line names the commands that follow or cancel it.
#[test]
fn ctrl_c_on_submit_follow_leaves_the_job_running_and_says_so() {
    let mut c = Cluster::new();
    c.start_worker();
    let spec = c.dir.path().join("long.toml");
    std::fs::write(&spec, c.spec("followed", 1, 8, 1_000_000, 0)).unwrap();
    let mut follow = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["submit", spec.to_str().unwrap(), "--follow", "--coordinator", &c.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the job id is the first line of stdout
    let mut out = std::io::BufReader::new(follow.stdout.take().unwrap());
    let mut id = String::new();
    std::io::BufRead::read_line(&mut out, &mut id).unwrap();
    let id = id.trim().to_string();
    c.wait_job(&id, "a few steps", LONG, |j| j.last_step >= 2);
    unsafe { libc::kill(follow.id() as i32, libc::SIGINT) };
    let o = follow.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains(&format!("stopped following; {id} keeps running (smelt jobs follow {id}, smelt jobs cancel {id})")), "{err}");
    let j = c.job(&id);
    assert_eq!(JobState::try_from(j.state), Ok(JobState::Running), "{}", j.error);
}
