//! `smelt worker`: one per GPU or CPU; takes assignments from the coordinator.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use smelt_worker::{device, DeviceRequest, WorkerConfig};
use tracing::info;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// Coordinator URL (or env SMELT_COORDINATOR).
    #[arg(long, env = "SMELT_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    /// Address for the gradient ring's listener, IP:PORT (port 0: any free port). Default: the
    /// IP this machine uses to reach the coordinator, which is what peers on other machines can
    /// connect to; with 0.0.0.0 it listens on every interface and registers that same IP.
    #[arg(long)]
    pub data_addr: Option<String>,
    /// Where this worker writes outputs (final weights of jobs where it is rank 0).
    #[arg(long, default_value = ".smelt/worker")]
    pub out_dir: PathBuf,
    /// Device: auto (GPU 0 when usable, else the CPU), cpu, or cuda:N (GPU N; needs a binary
    /// built with --features cuda, and fails at startup when GPU N is not usable).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceRequest,
    /// File holding the coordinator's token (else env SMELT_TOKEN; none: an open coordinator).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    s.parse().map_err(|e: device::DeviceError| e.to_string())
}

/// `logs`: the capture layer `main` installed, whose lines go to the coordinator.
pub fn run(a: WorkerArgs, logs: smelt_worker::LogCapture) -> Result<()> {
    // Before registering: a worker that cannot use the GPU it was given must not take jobs.
    let device = device::resolve(a.device)?;
    info!(device = %device, "worker device");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    let token = crate::client::token(a.token_file.as_deref())?;
    let cfg = WorkerConfig { coordinator: a.coordinator, data_bind: a.data_addr, out_dir: a.out_dir, hostname, device, token, logs };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(smelt_worker::run(cfg, crate::signals::terminated()))
}
