//! `smelt up`: a whole local cluster in one command — a coordinator and N workers as child
//! processes with all state under one data directory, optionally running one job to the end.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tracing::info;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Number of CPU workers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
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
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
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
    // Share the cores: each worker's CPU backend gets cores / workers threads.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / a.workers).max(1).to_string();
    for i in 0..a.workers {
        let name = format!("worker-{i}");
        // One output directory for all: rank 0 of each job writes `jobs/<id>/model.safetensors`.
        let out = a.data_dir.clone();
        let w = spawn(&name, &["--threads".into(), threads.clone(), "worker".into(), "--coordinator".into(), url.clone(), "--out-dir".into(), out.display().to_string()])?;
        cluster.children.push((name, w));
    }
    info!(coordinator = %url, workers = a.workers, data_dir = %a.data_dir.display(), "local cluster up; logs in {}", logs.display());

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
