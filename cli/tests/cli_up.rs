//! `smelt up` as a user runs it: it refuses a port another coordinator holds (rather than run the
//! job on that cluster), and a SIGTERM stops its whole cluster (workers first, then the
//! coordinator), leaving no process behind.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{one_rank_spec, start_coordinator, Proc};

fn smelt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smelt"))
}

/// A job spec in `dir` on a small text, `steps` long, checkpointing every 5 steps.
fn spec(dir: &Path, steps: u64) -> std::path::PathBuf {
    one_rank_spec(dir, "up", steps, 2, "[checkpoint]\nevery = 5\n")
}

/// Processes whose command line mentions `needle`.
fn processes_naming(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("cli_up-") {
                out.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
            }
        }
    }
    out
}

/// A `smelt up --submit` running, its output in `dir`/up.log.
struct Up {
    up: Proc,
    /// Its coordinator's address.
    addr: String,
    /// Its `--data-dir`.
    state: PathBuf,
}

/// Starts `smelt up` with one CPU worker on a free port, submitting `spec`, and waits until its
/// job has committed a checkpoint (`rust_log`: the RUST_LOG `smelt up` is run under).
fn up_until_a_checkpoint(dir: &Path, spec: &Path, rust_log: Option<&str>) -> Up {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let state = dir.join("state");
    let up = spawn_up(&addr, &state, spec, &dir.join("up.log"), rust_log);
    let deadline = Instant::now() + Duration::from_secs(120);
    let ckpt = state.join("jobs/job-000001/ckpt");
    while !std::fs::read_dir(&ckpt).map(|d| d.flatten().any(|e| e.path().join("MANIFEST.json").exists())).unwrap_or(false) {
        assert!(Instant::now() < deadline, "no checkpoint: {}", std::fs::read_to_string(dir.join("up.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    Up { up, addr, state }
}

/// `smelt up` with one CPU worker listening on `addr`, its data in `state`, submitting `spec`,
/// its output in `log`, under `rust_log` when given.
fn spawn_up(addr: &str, state: &Path, spec: &Path, log: &Path, rust_log: Option<&str>) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let mut up = smelt();
    if let Some(filter) = rust_log {
        up.env("RUST_LOG", filter);
    }
    Proc(
        up
            .args(["up", "--workers", "1", "--device", "cpu", "--listen", addr, "--data-dir"])
            .arg(state)
            .arg("--submit")
            .arg(spec)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// `up`'s exit status, waiting at most `patience` (its log, in `dir`, says why it did not end).
fn wait_exit(up: &mut Proc, patience: Duration, dir: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(s) = up.0.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "smelt up did not end: {}", std::fs::read_to_string(dir.join("up.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn smelt_up_refuses_a_port_another_coordinator_holds() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (_other, addr) = start_coordinator(&other, &[]);
    let spec = spec(dir.path(), 10);
    let o = smelt()
        .args(["up", "--workers", "1", "--device", "cpu", "--listen", &addr, "--data-dir"])
        .arg(dir.path().join("state"))
        .arg("--submit")
        .arg(&spec)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "smelt up went on: {err}");
    assert!(err.contains("the coordinator exited") && err.contains("before it listened") && err.contains("cannot listen on"), "{err}");
    // nothing went to the other cluster
    let listed = smelt().args(["jobs", "list", "--coordinator", &format!("http://{addr}")]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("no jobs"), "{}", String::from_utf8_lossy(&listed.stdout));
    assert!(processes_naming(&dir.path().join("state").display().to_string()).is_empty());
}

/// `smelt up` killed outright (SIGKILL, as the OOM killer does): its coordinator, worker and
/// follower get SIGTERM from the kernel and stop, rather than run on orphaned (they did).
#[test]
fn sigkill_to_smelt_up_leaves_no_process_of_its_cluster_running() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 1_000_000);
    let Up { mut up, addr: _, state } = up_until_a_checkpoint(dir.path(), &spec, None);
    unsafe { libc::kill(up.0.id() as i32, libc::SIGKILL) };
    wait_exit(&mut up, Duration::from_secs(10), dir.path());
    // (a worker that cannot report its run's end waits for the coordinator half a minute)
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = processes_naming(&state.display().to_string());
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running after smelt up was killed: {left:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sigterm_to_smelt_up_stops_its_whole_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 1_000_000);
    let Up { mut up, addr, state } = up_until_a_checkpoint(dir.path(), &spec, None);
    // a second `smelt up` on the same data dir is refused in its own words (it said "--db")
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let o = smelt().args(["up", "--workers", "1", "--device", "cpu", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"]).arg(&state).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("in use by another coordinator (another smelt up on this --data-dir?)") && !err.contains("--db"), "{err}");
    unsafe { libc::kill(up.0.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut up, Duration::from_secs(150), dir.path());
    let out = std::fs::read_to_string(dir.path().join("up.log")).unwrap();
    assert!(!status.success() && out.contains("interrupted: the cluster is stopped"), "{status:?}\n{out}");
    let left = processes_naming(&state.display().to_string());
    assert!(left.is_empty(), "still running after smelt up stopped: {left:#?}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the coordinator still listens");
    // the workers drained with the coordinator still there: the worker said so and exited
    let worker_log = std::fs::read_to_string(state.join("logs/worker-0.log")).unwrap();
    assert!(worker_log.contains("drained; exiting"), "{worker_log}");

    // `smelt up` again with the same --submit on the same data dir follows the unfinished job
    // (it resumes) rather than submitting a second copy
    let mut again = spawn_up(&addr, &state, &spec, &dir.path().join("up2.log"), None);
    let deadline = Instant::now() + Duration::from_secs(120);
    let log2 = || std::fs::read_to_string(dir.path().join("up2.log")).unwrap_or_default();
    while !log2().contains("following it") {
        assert!(Instant::now() < deadline, "the second smelt up did not follow the unfinished job: {}", log2());
        std::thread::sleep(Duration::from_millis(100));
    }
    // its id on a line of its own (stdout), as a first `smelt up --submit` prints it for scripts
    assert!(log2().lines().any(|l| l == "job-000001"), "{}", log2());
    let listed = smelt().args(["jobs", "list", "--coordinator", &format!("http://{addr}")]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("job-000001") && !listed.contains("job-000002"), "{listed}");
    unsafe { libc::kill(again.0.id() as i32, libc::SIGTERM) };
    wait_exit(&mut again, Duration::from_secs(150), dir.path());
}

/// A worker of `smelt up` that dies (SIGKILL: the OOM killer, a crash) is started again, so its
/// job restarts from its last checkpoint and ends, rather than wait for a worker forever.
#[test]
fn smelt_up_starts_a_worker_that_died_again_and_its_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), 300);
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, format!("max_restarts = 2\n{text}")).unwrap();
    // under a RUST_LOG that quiets everything but `up`'s own lines: its coordinator still says
    // when it listens (it waited 30 s and gave up), and a worker started again is still seen
    let Up { mut up, state, .. } = up_until_a_checkpoint(dir.path(), &spec, Some("warn,smelt::cmd_up=info"));
    let workers: Vec<String> = processes_naming(&state.display().to_string()).into_iter().filter(|p| p.contains(" worker ")).collect();
    assert_eq!(workers.len(), 1, "{workers:#?}");
    let pid: i32 = workers[0].split(':').next().unwrap().parse().unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = wait_exit(&mut up, Duration::from_secs(300), dir.path());
    let out = std::fs::read_to_string(dir.path().join("up.log")).unwrap();
    assert!(status.success(), "{status:?}\n{out}");
    assert!(out.contains("exited unexpectedly; starting it again") && out.contains("process=worker-0"), "{out}");
    assert!(out.contains("job finished; final weights in"), "{out}");
    assert!(processes_naming(&state.display().to_string()).is_empty());
}

/// `smelt up --submit` reads the spec before it starts anything: one that asks for more workers
/// than the cluster will have (which would wait forever), or that does not parse, is refused at
/// once, naming the fix or the field, and no cluster is started (no data directory made).
#[test]
fn smelt_up_refuses_a_job_it_could_never_run_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let two = one_rank_spec(dir.path(), "two", 10, 2, "").display().to_string();
    let text = std::fs::read_to_string(&two).unwrap().replace("world_size = 1", "world_size = 2");
    assert!(text.contains("world_size = 2"), "{text}");
    std::fs::write(&two, text).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"bad\"\n[model]\npreset = 3\n").unwrap();
    // a fine-tuning job whose examples are not where its workers would read them
    let missing = dir.path().join("finetune.toml");
    std::fs::write(&missing, "name = \"ft\"\nkind = \"finetune\"\n[finetune]\ninit_from = \"job-000001\"\nhead = \"classification\"\nnum_labels = 2\ndata = \"no-such/labels.jsonl\"\n[train]\nsteps = 5\nglobal_batch = 4\nmicro_batch = 4\nseq_len = 16\nlr = 1e-4\n").unwrap();
    // a mixture whose first corpus is a path that is not there (the second, a URI, is the
    // store's to find)
    let mix = dir.path().join("mix.toml");
    std::fs::write(&mix, "name = \"mix\"\n[model]\npreset = \"tiny\"\n[[data.mix]]\ncorpus = \"no-such/web\"\nweight = 1.0\n[[data.mix]]\ncorpus = \"s3://bucket/code\"\nweight = 1.0\n[train]\nsteps = 5\nglobal_batch = 4\nmicro_batch = 4\nseq_len = 16\nlr = 1e-4\n").unwrap();
    let state = dir.path().join("state");
    for (spec, want) in [
        (mix, "data.mix[0].corpus no-such/web: no such file"),
        (PathBuf::from(&two), "needs 2 workers (cluster.world_size = 2), but this cluster starts 1: pass --workers 2"),
        (bad, "`model.preset`"),
        (missing, "finetune.data no-such/labels.jsonl: no such file (the workers smelt up starts read it from "),
    ] {
        let o = smelt()
            .args(["up", "--workers", "1", "--device", "cpu", "--listen", "127.0.0.1:1", "--data-dir"])
            .arg(&state)
            .arg("--submit")
            .arg(&spec)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{}: {err}", spec.display());
        assert!(!state.exists(), "a cluster was started for {}", spec.display());
    }
}
