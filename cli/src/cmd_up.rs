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

/// Children are stopped with SIGTERM (workers drain), then killed if they linger.
struct Cluster {
    children: Vec<(String, Child)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut().rev() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, c) in self.children.iter_mut().rev() {
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

pub fn run(a: UpArgs) -> Result<()> {
    // A spec that does not parse is left to `smelt submit`, which names the problem.
    let job_device = a.submit.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).and_then(|t| smelt_jobspec::JobSpec::parse(&t).ok()).map(|s| s.cluster.device);
    let device = device_for_job(a.device, job_device)?;
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
    let devices = plan_workers(device, a.workers, gpus)?;
    let exe = std::env::current_exe()?;
    let logs = a.data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let url = format!("http://{}", a.listen);
    let spawn = |name: &str, args: &[String]| -> Result<Child> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        Command::new(&exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))
    };
    let mut cluster = Cluster { children: Vec::new() };
    let db = a.data_dir.join("coordinator.db");
    let coord = spawn("coordinator", &["coordinator".into(), "--listen".into(), a.listen.clone(), "--db".into(), db.display().to_string()])?;
    cluster.children.push(("coordinator".into(), coord));
    wait_for_port(&a.listen, Duration::from_secs(30))?;
    // Share the cores: each worker's CPU backend (or a GPU worker's host-side work) gets
    // cores / workers threads.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / devices.len()).max(1).to_string();
    for (i, dev) in devices.iter().enumerate() {
        let name = format!("worker-{i}");
        // One output directory for all: rank 0 of each job writes `jobs/<id>/model.safetensors`.
        let out = a.data_dir.clone();
        let args = ["--threads", &threads, "worker", "--coordinator", &url, "--out-dir", &out.display().to_string(), "--device", dev];
        let w = spawn(&name, &args.map(String::from))?;
        cluster.children.push((name, w));
    }
    info!(coordinator = %url, workers = devices.len(), devices = %devices.join(","), data_dir = %a.data_dir.display(), "local cluster up; logs in {}", logs.display());
    info!("dashboard: {url}/ (workers, jobs, loss curves, checkpoints)");

    match &a.submit {
        Some(spec) => {
            let status = Command::new(&exe)
                .args(["submit", &spec.display().to_string(), "--follow", "--coordinator", &url])
                .status()
                .context("running smelt submit")?;
            drop(cluster);
            if !status.success() {
                bail!("the job did not succeed (see {} for worker logs)", logs.display());
            }
            info!("job finished; final weights under {}/jobs/<job id>/model.safetensors", a.data_dir.display());
            Ok(())
        }
        None => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(crate::signals::terminated());
            drop(cluster);
            Ok(())
        }
    }
}

fn wait_for_port(addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the coordinator did not start listening on {addr} within {timeout:?}")
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
