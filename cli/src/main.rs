//! `smelt`: one binary for every part of smelt.

mod cmd_bench;
mod cmd_sample;
mod cmd_train;
mod cmd_up;
mod cmd_worker;
mod signals;


use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "smelt", version, about = "Pretrain and fine-tune transformer language models")]
struct Cli {
    /// Worker threads for the CPU backend (default: every core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a GPT on a text file in this process.
    Train(cmd_train::TrainArgs),
    /// Generate text from a trained model.
    Sample(cmd_sample::SampleArgs),
    /// Run a worker: registers with the coordinator and trains what it is assigned.
    Worker(cmd_worker::WorkerArgs),
    /// A whole local cluster: a coordinator and N workers as child processes.
    Up(cmd_up::UpArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(cmd_bench::BenchCommand),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    match cli.command {
        Command::Train(a) => cmd_train::run(a),
        Command::Sample(a) => cmd_sample::run(a),
        Command::Bench(b) => cmd_bench::run(b),
        Command::Worker(a) => cmd_worker::run(a),
        Command::Up(a) => cmd_up::run(a),
    }
}
