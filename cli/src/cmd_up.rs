//! `smelt up`: a whole local cluster in one command — a coordinator and N workers as child
//! processes with all state under one data directory, optionally running one job to the end.
//! On a machine with usable GPUs (a binary built with `--features cuda`), one worker per GPU,
//! each started with `--device cuda:i`; otherwise CPU workers sharing the cores.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use smelt_worker::device;
use tracing::info;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Number of workers (default: one per GPU when GPUs are used, else 2 CPU workers).
    #[arg(long)]
    pub workers: Option<usize>,
    /// auto: one worker per GPU when this machine has usable GPUs, else CPU workers (with
    /// --submit: the class the job's `[cluster] device` asks for); cpu: CPU workers; cuda: GPU
    /// workers, an error when no GPU is usable.
    #[arg(long, value_enum, default_value_t = UpDevice::Auto)]
    pub device: UpDevice,
    /// Directory for the coordinator's SQLite file, worker outputs and logs.
    #[arg(long, default_value = ".smelt")]
    pub data_dir: PathBuf,
    /// Coordinator listen address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Submit this job spec, follow it, and shut the cluster down when it ends.
    #[arg(long)]
    pub submit: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UpDevice {
    Auto,
    Cpu,
    Cuda,
}

/// With `--submit`, the job's `[cluster] device` says what `auto` means: workers of the other
/// class would never take it.
fn device_for_job(flag: UpDevice, job: Option<smelt_jobspec::Device>) -> Result<UpDevice> {
    use smelt_jobspec::Device as Job;
    Ok(match (flag, job) {
        (f, None) => f,
        (UpDevice::Auto | UpDevice::Cpu, Some(Job::Cpu)) => UpDevice::Cpu,
        (UpDevice::Auto | UpDevice::Cuda, Some(Job::Cuda)) => UpDevice::Cuda,
        (UpDevice::Cpu, Some(Job::Cuda)) => bail!("--device cpu: the job asks for GPU workers ([cluster] device = \"cuda\")"),
        (UpDevice::Cuda, Some(Job::Cpu)) => bail!("--device cuda: the job asks for CPU workers ([cluster] device = \"cpu\")"),
    })
}

/// CPU workers when none are asked for.
const DEFAULT_CPU_WORKERS: usize = 2;

/// The `--device` of each worker to start, given how many GPUs are usable here (`Err(why)`
/// when none can be: no `cuda` feature, no driver, GPU 0 does not come up).
fn plan_workers(device: UpDevice, workers: Option<usize>, gpus: Result<usize, String>) -> Result<Vec<String>> {
    if workers == Some(0) {
        bail!("--workers must be at least 1");
    }
    let cpu = |n: Option<usize>| vec!["cpu".to_string(); n.unwrap_or(DEFAULT_CPU_WORKERS)];
    let g = match (device, gpus) {
        (UpDevice::Cpu, _) => return Ok(cpu(workers)),
        (UpDevice::Auto, Ok(0)) => {
            info!("no gpu found; starting cpu workers");
            return Ok(cpu(workers));
        }
        (UpDevice::Auto, Err(why)) => {
            info!(reason = %why, "no usable gpu; starting cpu workers");
            return Ok(cpu(workers));
        }
        (UpDevice::Cuda, Ok(0)) => bail!("--device cuda: this machine has no GPU"),
        (UpDevice::Cuda, Err(why)) => bail!("--device cuda: no usable GPU: {why}"),
        (UpDevice::Auto | UpDevice::Cuda, Ok(g)) => g,
    };
    let n = workers.unwrap_or(g);
    if n > g {
        bail!("--workers {n}: this machine has {g} usable GPU(s), one worker each (--device cpu starts CPU workers)");
    }
    Ok((0..n).map(|i| format!("cuda:{i}")).collect())
}

/// How many GPUs workers can use here: those the driver counts, provided GPU 0 comes up (so a
/// machine whose driver loads but whose NVRTC or cuBLAS does not falls back to the CPU).
fn usable_gpus() -> Result<usize, String> {
    let g = device::gpu_count()?;
    if g > 0 {
        device::probe_cuda(0)?;
    }
    Ok(g)
}

/// How long the workers get to drain (stop at a step boundary, save a rescue checkpoint, report
/// to the coordinator) before they are killed.
const WORKER_DRAIN: Duration = Duration::from_secs(90);

/// Children are stopped with SIGTERM, then killed if they linger: the workers first, while the
/// coordinator is still there to take their last reports (a busy worker drains: it stops at a
/// step boundary, saves its job's rescue checkpoint and reports it), then the coordinator.
struct Cluster {
    /// The coordinator first, then the workers.
    children: Vec<Member>,
}

/// One process of the cluster, and how to start it again.
struct Member {
    name: String,
    args: Vec<String>,
    child: Child,
    started: Instant,
    /// Exits in a row within [`SHORT_LIVED`] of a start.
    quick_exits: u32,
}

/// A process that exits this soon after it started, [`CRASH_LOOP`] times in a row, is not
/// started again: something about it is wrong (its log says what), not a passing failure.
const SHORT_LIVED: Duration = Duration::from_secs(10);
const CRASH_LOOP: u32 = 3;

impl Cluster {
    /// Starts again each process that exited on its own (killed by the OOM killer, a crash): a
    /// local cluster keeps its coordinator and workers up as a supervisor would, so its job goes
    /// on (a worker lost is a restart from the last checkpoint; a coordinator restarted takes its
    /// jobs back from the database). Fails on a process that keeps exiting soon after it starts.
    fn keep_up(&mut self, spawn: &dyn Fn(&str, &[String]) -> Result<Child>, logs: &std::path::Path) -> Result<()> {
        for m in self.children.iter_mut() {
            let Ok(Some(status)) = m.child.try_wait() else { continue };
            let log = logs.join(format!("{}.log", m.name));
            m.quick_exits = if m.started.elapsed() < SHORT_LIVED { m.quick_exits + 1 } else { 0 };
            if m.quick_exits >= CRASH_LOOP {
                bail!("the {} exited ({status}) {CRASH_LOOP} times within {SHORT_LIVED:?} of starting; its log: {}", m.name, log.display());
            }
            tracing::warn!(process = %m.name, %status, log = %log.display(), "exited unexpectedly; starting it again");
            let seen = listening_lines(&log);
            m.child = spawn(&m.name, &m.args)?;
            m.started = Instant::now();
            if m.name == "coordinator" {
                wait_until_listening(&mut m.child, &log, seen, Duration::from_secs(30))?;
            }
        }
        Ok(())
    }

    fn stop(children: &mut [Member], patience: Duration) {
        for m in children.iter() {
            unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + patience;
        for Member { name, child: c, .. } in children.iter_mut() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = c.try_wait() {
                tracing::warn!(process = %name, "did not stop after SIGTERM; killing");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let n = 1.min(self.children.len());
        let (coordinator, workers) = self.children.split_at_mut(n);
        Cluster::stop(workers, WORKER_DRAIN);
        Cluster::stop(coordinator, Duration::from_secs(10));
    }
}

pub fn run(a: UpArgs) -> Result<()> {
    // The spec is read before anything starts: one that does not parse, or that needs more
    // workers than this cluster will have, would otherwise wait or fail behind a running cluster.
    let spec = match &a.submit {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("--submit {}", p.display()))?;
            Some(smelt_jobspec::JobSpec::parse(&text).with_context(|| format!("--submit {}", p.display()))?)
        }
        None => None,
    };
    let device = device_for_job(a.device, spec.as_ref().map(|s| s.cluster.device))?;
    let gpus = match device {
        UpDevice::Cpu => Ok(0),
        UpDevice::Auto | UpDevice::Cuda => {
            // an invalid GPU switch is a mistake to name, not a reason for `auto` to start CPU
            // workers without a word
            if let Some(why) = device::switch_error() {
                bail!("{why}; fix it, or use --device cpu");
            }
            usable_gpus()
        }
    };
    let devices = plan_workers(device, a.workers, gpus).map_err(|e| {
        if a.device == UpDevice::Auto && device == UpDevice::Cuda {
            // the job asked for GPUs, not a flag the user never gave
            anyhow::anyhow!("the job asks for GPU workers ([cluster] device = \"cuda\"): {}", e.to_string().trim_start_matches("--device cuda: "))
        } else {
            e
        }
    })?;
    if let (Some(spec), Some(path)) = (&spec, &a.submit) {
        // the workers started here read the spec's local files from this directory: one that
        // is not there is said now, not after the cluster has started and the job failed
        for l in spec.locations() {
            let Some(file) = l.local_input(smelt_checkpoint::looks_like_job_id) else { continue };
            if !std::path::Path::new(file).exists() {
                let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
                bail!("--submit {}: {} {file}: no such file (the workers smelt up starts read it from {cwd})", path.display(), l.field);
            }
        }
    }
    if let (Some(spec), Some(path)) = (&spec, &a.submit) {
        let need = spec.cluster.world_size as usize;
        if need > devices.len() {
            bail!(
                "--submit {}: the job needs {need} workers (cluster.world_size = {need}), but this cluster starts {}: pass --workers {need}",
                path.display(),
                devices.len()
            );
        }
    }
    let exe = std::env::current_exe()?;
    let logs = a.data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let url = format!("http://{}", a.listen);
    // logs are appended to: a process started again keeps its earlier lines (why it exited)
    let spawn = |name: &str, args: &[String]| -> Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&exe);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: the hook only makes async-signal-safe calls
            unsafe { cmd.pre_exec(crate::signals::exit_with_parent()) };
        }
        if name == "coordinator" {
            // the line `smelt up` waits for is logged whatever RUST_LOG the user quiets the
            // cluster with (`RUST_LOG=warn` hid it: "did not start listening within 30s")
            if let Some(filter) = std::env::var("RUST_LOG").ok().filter(|f| !f.trim().is_empty()) {
                cmd.env("RUST_LOG", format!("{filter},{}=info", smelt_proto::READY_TARGET));
            }
            // out of the terminal's process group: a Ctrl-C reaches the workers (they drain)
            // but not the coordinator, which `smelt up` stops once they have reported to it
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))
    };
    let mut cluster = Cluster { children: Vec::new() };
    let db = a.data_dir.join("coordinator.db");
    let coord_args = vec!["coordinator".into(), "--listen".into(), a.listen.clone(), "--db".into(), db.display().to_string()];
    let coord_log = logs.join("coordinator.log");
    let seen = listening_lines(&coord_log);
    let coord = spawn("coordinator", &coord_args)?;
    cluster.children.push(Member { name: "coordinator".into(), args: coord_args, child: coord, started: Instant::now(), quick_exits: 0 });
    // our coordinator's own word that it listens: another process already on the port (another
    // `smelt up`) must not be taken for it
    wait_until_listening(&mut cluster.children[0].child, &coord_log, seen, Duration::from_secs(30))?;
    // Share the cores: each worker's CPU backend (or a GPU worker's host-side work) gets
    // cores / workers threads.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / devices.len()).max(1).to_string();
    for (i, dev) in devices.iter().enumerate() {
        let name = format!("worker-{i}");
        // One output directory for all: rank 0 of each job writes `jobs/<id>/model.safetensors`.
        let out = a.data_dir.clone();
        let args = ["--threads", &threads, "worker", "--coordinator", &url, "--out-dir", &out.display().to_string(), "--device", dev].map(String::from).to_vec();
        let w = spawn(&name, &args)?;
        cluster.children.push(Member { name, args, child: w, started: Instant::now(), quick_exits: 0 });
    }
    info!(coordinator = %url, workers = devices.len(), devices = %devices.join(","), data_dir = %a.data_dir.display(), "local cluster up; logs in {}", logs.display());
    info!("dashboard: {url}/ (workers, jobs, loss curves, checkpoints)");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match &a.submit {
        Some(spec) => {
            // The same spec's job still unfinished in this data dir (an earlier `smelt up`
            // interrupted): it resumes now, so follow it rather than submit a second copy.
            let text = std::fs::read_to_string(spec).with_context(|| format!("--submit {}", spec.display()))?;
            let mut submit = tokio::process::Command::new(&exe);
            // its own process group: a terminal's Ctrl-C reaches `up` (which stops the cluster
            // and says so), not the follower, whose "keeps running" would say otherwise (and be
            // cut off mid-line when `up` kills it)
            submit.process_group(0);
            #[cfg(target_os = "linux")]
            // SAFETY: the hook only makes async-signal-safe calls
            unsafe {
                submit.pre_exec(crate::signals::exit_with_parent());
            }
            match rt.block_on(unfinished_job_of(&url, &text)) {
                Some(id) => {
                    info!(job_id = %id, "this spec's job from an earlier run is not finished: following it (it resumes from its last checkpoint) rather than submitting another; `smelt submit` the spec for a second copy");
                    // stdout carries the job's id, as a first `smelt up --submit` prints it
                    println!("{id}");
                    submit.args(["jobs", "follow", &id, "--coordinator", &url]).kill_on_drop(true);
                }
                None => {
                    submit.args(["submit", &spec.display().to_string(), "--follow", "--coordinator", &url]).kill_on_drop(true);
                }
            }
            // SIGTERM or SIGINT stops the whole cluster, not `smelt up` alone; meanwhile a
            // process of the cluster that exits is started again
            let status = rt.block_on(async {
                let mut child = submit.spawn().context("running smelt submit")?;
                let term = crate::signals::terminated();
                tokio::pin!(term);
                let mut check = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        // (`Child::wait` is cancel-safe)
                        s = child.wait() => return Ok::<_, anyhow::Error>(Some(s?)),
                        _ = &mut term => {
                            let _ = child.start_kill();
                            return Ok(None);
                        }
                        _ = check.tick() => cluster.keep_up(&spawn, &logs)?,
                    }
                }
            })?;
            let newest = rt.block_on(newest_job(&url));
            // this process's own connections to the coordinator closed before it is stopped: on a
            // runtime nobody drives they never saw its goodbye, and it waited out its 5 s grace
            drop(rt);
            drop(cluster);
            let Some(status) = status else {
                // as `smelt submit --follow` on Ctrl-C: said plainly, exit status 130 (128 + SIGINT)
                eprintln!(
                    "interrupted: the cluster is stopped (a job that checkpoints resumes from its last checkpoint at the next `smelt up` \
                     on this data dir; the same --submit follows it rather than submitting it again)"
                );
                std::process::exit(130);
            };
            if !status.success() {
                // the follow said why (`error: job ... failed: ...`); one more "Error:" line
                // would only say it again
                eprintln!("(the cluster is stopped; its logs are in {})", logs.display());
                std::process::exit(status.code().filter(|c| *c != 0).unwrap_or(1));
            }
            match newest {
                Some(id) => info!(job_id = %id, "job finished; final weights in {}", a.data_dir.join("jobs").join(&id).join("model.safetensors").display()),
                None => info!("job finished; final weights under {}/jobs/", a.data_dir.display()),
            }
            Ok(())
        }
        None => {
            rt.block_on(async {
                let term = crate::signals::terminated();
                tokio::pin!(term);
                let mut check = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = &mut term => return Ok::<_, anyhow::Error>(()),
                        _ = check.tick() => cluster.keep_up(&spawn, &logs)?,
                    }
                }
            })?;
            drop(rt);
            drop(cluster);
            Ok(())
        }
    }
}

/// The newest job on the coordinator at `url` that has not finished and was submitted with
/// exactly `spec_toml`, if any.
async fn unfinished_job_of(url: &str, spec_toml: &str) -> Option<String> {
    let mut client = crate::client::connect(url).await.ok()?;
    let jobs = client.list_jobs(smelt_proto::v1::ListJobsRequest {}).await.ok()?.into_inner().jobs;
    jobs.into_iter()
        .filter(|j| j.spec_toml == spec_toml && !crate::cmd_submit::is_terminal(smelt_proto::v1::JobState::try_from(j.state).unwrap_or_default()))
        .max_by_key(|j| j.created_at_ms)
        .map(|j| j.id)
}

/// The id of the newest job on the coordinator at `url` (the one this `smelt up` submitted).
async fn newest_job(url: &str) -> Option<String> {
    let mut client = crate::client::connect(url).await.ok()?;
    let jobs = client.list_jobs(smelt_proto::v1::ListJobsRequest {}).await.ok()?.into_inner().jobs;
    jobs.into_iter().max_by_key(|j| j.created_at_ms).map(|j| j.id)
}

/// How many times the coordinators logged in `log` said they listen (the log is appended to).
fn listening_lines(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches("coordinator listening").count()
}

/// Waits for the coordinator `child` to log that it listens (its log file is its own, and held
/// `seen` such lines before it started); an error with the log's last lines if it exits first
/// (its port taken, a bad database) or does not get there in `timeout`.
fn wait_until_listening(child: &mut Child, log: &std::path::Path, seen: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    // the error it ended with (without a backtrace RUST_BACKTRACE may add), else its last lines
    let tail = || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        match lines.iter().rposition(|l| l.starts_with("Error: ")) {
            Some(at) => lines[at..].iter().take_while(|l| !l.trim().is_empty() && !l.starts_with("Stack backtrace")).copied().collect::<Vec<_>>().join("\n"),
            None => lines[lines.len().saturating_sub(5)..].join("\n"),
        }
    };
    loop {
        if listening_lines(log) > seen {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let why = tail();
            if why.contains("is in use by another coordinator") {
                // its --db is this command's --data-dir: say it in the words given here
                bail!("the data dir's database is in use by another coordinator (another smelt up on this --data-dir?): stop that one first, or give this one another --data-dir");
            }
            // (the coordinator's own "Error: " is kept once)
            bail!("the coordinator exited ({status}) before it listened: {}", why.trim_start_matches("Error: "));
        }
        if Instant::now() >= deadline {
            bail!("the coordinator did not start listening within {timeout:?}; its log ({}) ends:\n{}", log.display(), tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(device: UpDevice, workers: Option<usize>, gpus: Result<usize, String>) -> Result<Vec<String>, String> {
        plan_workers(device, workers, gpus).map_err(|e| e.to_string())
    }

    #[test]
    fn one_worker_per_gpu_when_gpus_are_usable() {
        assert_eq!(plan(UpDevice::Auto, None, Ok(4)).unwrap(), ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]);
        assert_eq!(plan(UpDevice::Cuda, None, Ok(2)).unwrap(), ["cuda:0", "cuda:1"]);
        assert_eq!(plan(UpDevice::Auto, Some(2), Ok(4)).unwrap(), ["cuda:0", "cuda:1"]);
        let e = plan(UpDevice::Auto, Some(3), Ok(2)).unwrap_err();
        assert!(e.contains("--workers 3") && e.contains("2 usable GPU"), "{e}");
    }

    #[test]
    fn cpu_workers_without_a_usable_gpu_or_when_asked() {
        let two_cpu = ["cpu", "cpu"];
        assert_eq!(plan(UpDevice::Auto, None, Ok(0)).unwrap(), two_cpu);
        assert_eq!(plan(UpDevice::Auto, None, Err(device::BUILT_WITHOUT_CUDA.into())).unwrap(), two_cpu);
        assert_eq!(plan(UpDevice::Cpu, None, Ok(8)).unwrap(), two_cpu);
        assert_eq!(plan(UpDevice::Cpu, Some(3), Ok(8)).unwrap(), ["cpu", "cpu", "cpu"]);
        assert_eq!(plan(UpDevice::Auto, Some(5), Err("no driver".into())).unwrap().len(), 5);
    }

    #[test]
    fn a_submitted_job_decides_what_auto_starts() {
        use smelt_jobspec::Device as Job;
        assert_eq!(device_for_job(UpDevice::Auto, Some(Job::Cpu)).unwrap(), UpDevice::Cpu);
        assert_eq!(device_for_job(UpDevice::Auto, Some(Job::Cuda)).unwrap(), UpDevice::Cuda);
        assert_eq!(device_for_job(UpDevice::Auto, None).unwrap(), UpDevice::Auto);
        assert_eq!(device_for_job(UpDevice::Cuda, Some(Job::Cuda)).unwrap(), UpDevice::Cuda);
        let e = device_for_job(UpDevice::Cpu, Some(Job::Cuda)).unwrap_err().to_string();
        assert!(e.contains("--device cpu") && e.contains("device = \"cuda\""), "{e}");
        assert!(device_for_job(UpDevice::Cuda, Some(Job::Cpu)).is_err());
    }

    #[test]
    fn asking_for_gpus_where_none_is_usable_names_why() {
        let e = plan(UpDevice::Cuda, None, Err("libcuda (the NVIDIA driver) could not be loaded".into())).unwrap_err();
        assert!(e.contains("--device cuda") && e.contains("libcuda"), "{e}");
        assert!(plan(UpDevice::Cuda, None, Ok(0)).unwrap_err().contains("no GPU"));
        assert!(plan(UpDevice::Auto, Some(0), Ok(2)).unwrap_err().contains("at least 1"));
    }
}
