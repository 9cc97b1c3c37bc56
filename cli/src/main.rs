//! `smelt`: one binary for every part of smelt.

mod bench_checkpoint;
mod bench_coordinator;
mod bench_corpus;
mod bench_family;
mod cmd_checkpoints;
mod client;
mod cmd_attention;
mod cmd_bench;
mod cmd_corpus;
mod cmd_eval;
mod eval_choices;
mod local_device;
mod cmd_export;
mod cmd_import;
mod cmd_coordinator;
mod cmd_job_logs;
mod cmd_job_metrics;
mod cmd_jobs;
mod job_model;
mod cmd_sample;
mod cmd_submit;
mod cmd_train;
mod cmd_up;
mod cmd_worker;
mod cmd_workers;
mod signals;
mod threads;
mod source_losses;


use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "smelt", version, about = "Pretrain and fine-tune transformer language models")]
struct Cli {
    /// Threads for the CPU backend (default: every core); the computing commands take it too.
    #[arg(long, hide = true)]
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
    /// Draw a model's attention weights for a text: PNG heat maps per layer and head, plus JSON.
    Attention(cmd_attention::AttentionArgs),
    /// Run the coordinator (control plane): jobs, workers, scheduling, over a SQLite file.
    Coordinator(cmd_coordinator::CoordinatorArgs),
    /// Submit a job spec (TOML) to the coordinator; prints the job id.
    Submit(cmd_submit::SubmitArgs),
    /// List, inspect or cancel jobs (alone: list them).
    Jobs(cmd_jobs::JobsCli),
    /// List the workers the coordinator knows.
    Workers(cmd_workers::WorkersArgs),
    /// Run a worker: registers with the coordinator and trains what it is assigned.
    Worker(cmd_worker::WorkerArgs),
    /// A whole local cluster: a coordinator and N workers as child processes.
    Up(cmd_up::UpArgs),
    /// Prepare and check tokenized corpora in object storage.
    #[command(subcommand)]
    Corpus(cmd_corpus::CorpusCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(cmd_bench::BenchCommand),
    /// Committed checkpoints of a job or a store, with their verified status.
    Checkpoints(cmd_checkpoints::CheckpointsCli),
    /// Export a model: `hf` (Hugging Face transformers: GPT-2, GPT-NeoX for rotary GPTs, BERT), `logits` (.npy).
    #[command(subcommand)]
    Export(cmd_export::ExportCommand),
    /// A GPT's loss, perplexity and bits per byte on a text file or a prepared corpus split.
    Eval(cmd_eval::EvalArgs),
    /// Import a model: `hf` (a Hugging Face transformers GPT-2 or GPT-NeoX directory, e.g. the Hub's gpt2, or one `smelt export hf` wrote).
    #[command(subcommand)]
    Import(cmd_import::ImportCommand),
}

impl Command {
    /// `--threads` given after a command that computes.
    fn threads(&self) -> Option<usize> {
        match self {
            Command::Train(a) => a.threads.threads,
            Command::Sample(a) => a.threads.threads,
            Command::Attention(a) => a.threads.threads,
            Command::Eval(a) => a.threads.threads,
            Command::Worker(a) => a.threads.threads,
            Command::Bench(cmd_bench::BenchCommand::Step(a)) => a.threads.threads,
            Command::Bench(cmd_bench::BenchCommand::Tokenize(a)) => a.threads.threads,
            Command::Bench(cmd_bench::BenchCommand::Loader(a)) => a.threads.threads,
            Command::Bench(cmd_bench::BenchCommand::Checkpoint(a)) => a.threads.threads,
            Command::Corpus(cmd_corpus::CorpusCommand::Prepare(a)) => a.threads.threads,
            Command::Export(cmd_export::ExportCommand::Logits(a)) => a.threads.threads,
            _ => None,
        }
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // one line, each context before its cause ("--model job-1: job-1: no committed
            // checkpoint ..."), rather than anyhow's paragraph per cause
            eprintln!("Error: {e:#}");
            std::process::ExitCode::from(client::exit_status(&e))
        }
    }
}

fn run() -> Result<()> {
    use tracing_subscriber::prelude::*;
    let cli = Cli::parse();
    // A command whose output is piped into `head` or `less` ends quietly when the reader goes,
    // as Unix tools do, rather than panicking on the broken pipe (see the function: sockets
    // still get EPIPE). The long-running processes keep ignoring SIGPIPE: their log going
    // nowhere must not stop a cluster.
    if !matches!(cli.command, Command::Coordinator(_) | Command::Worker(_) | Command::Up(_)) {
        signals::end_quietly_when_stdout_closes();
    }
    let console = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // colours only on a terminal, and not when NO_COLOR is set (no-color.org): logs
        // redirected to a file stay plain text
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
        .with_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_log_level(&cli.command).into()));
    // a worker also keeps what it logs during a run for the coordinator (`smelt jobs logs`),
    // at info and above whatever RUST_LOG says for the console
    let capture = matches!(cli.command, Command::Worker(_)).then(smelt_worker::LogCapture::new);
    // (the level filter also spares the layer every debug and trace callsite of the process)
    let capture_layer = capture.clone().map(|c| c.with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    tracing_subscriber::registry().with(console).with(capture_layer).init();
    if let Some(n) = cli.threads.or(cli.command.threads()) {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        // more threads than cores only take turns on them (a pool of 1000 ran 470x slower)
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        if n > cores {
            tracing::warn!(threads = n, cores, "--threads {n} is more than this machine's {cores} cores: they take turns, and each step waits for the slowest");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    match cli.command {
        Command::Train(a) => cmd_train::run(a),
        Command::Sample(a) => cmd_sample::run(a),
        Command::Attention(a) => cmd_attention::run(a),
        Command::Bench(b) => cmd_bench::run(b),
        Command::Export(c) => cmd_export::run(c),
        Command::Import(c) => cmd_import::run(c),
        Command::Eval(a) => cmd_eval::run(a),
        Command::Checkpoints(c) => cmd_checkpoints::run(c),
        Command::Corpus(c) => cmd_corpus::run(c),
        Command::Coordinator(a) => cmd_coordinator::run(a),
        Command::Submit(a) => cmd_submit::run(a),
        Command::Jobs(c) => cmd_jobs::run(c),
        Command::Workers(a) => cmd_workers::run(a),
        Command::Worker(a) => cmd_worker::run(a, capture.unwrap_or_default()),
        Command::Up(a) => cmd_up::run(a),
    }
}

/// The console's level unless RUST_LOG says otherwise: the commands that answer with their
/// own output (text, a loss, files written) keep to warnings, so that their info lines (the
/// device probed, the model file read) do not bury the answer; the rest report progress at info.
fn default_log_level(command: &Command) -> &'static str {
    match command {
        Command::Sample(_) | Command::Eval(_) | Command::Export(_) | Command::Attention(_) | Command::Import(_) => "warn",
        _ => "info",
    }
}
