//! `smelt worker`: one per GPU or CPU; takes assignments from the coordinator.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use smelt_worker::WorkerConfig;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Coordinator URL (or env SMELT_COORDINATOR).
    #[arg(long, env = "SMELT_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    /// Address for the gradient ring's listener (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub data_addr: String,
    /// Where this worker writes outputs (final weights of jobs where it is rank 0).
    #[arg(long, default_value = ".smelt/worker")]
    pub out_dir: PathBuf,
    /// Device: cpu (cuda needs a binary built with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: WorkerArgs) -> Result<()> {
    match a.device.as_str() {
        "cpu" | "auto" => {}
        d if d.starts_with("cuda") => anyhow::bail!("--device {d}: this smelt binary was built without the `cuda` feature"),
        d => anyhow::bail!("--device {d:?}: expected auto, cpu or cuda:N"),
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    let cfg = WorkerConfig { coordinator: a.coordinator, data_bind: a.data_addr, out_dir: a.out_dir, hostname };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(smelt_worker::run(cfg, crate::signals::terminated()))
}
