//! `smelt bench`: speed measurements. A benchmark reports, it never asserts.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use smelt_engine::backend::{Backend, MatmulShape, WeightLayout};
use smelt_engine::data::TokenWindows;
use smelt_engine::model::{Gpt, GptConfig};
use smelt_engine::optim::{AdamWConfig, LrSchedule};
use smelt_engine::rng::Rng;
use smelt_engine::train::{TrainConfig, Trainer};
use smelt_engine::CpuBackend;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time full training steps (forward, backward, AdamW) of a GPT.
    Step(StepArgs),
    /// GPT-2 BPE speed on a text file, beside Python tiktoken on the same file.
    Tokenize(crate::bench_corpus::TokenizeArgs),
    /// Tokens/s reading a prepared corpus in sample order (and from memory:// as a bound).
    Loader(crate::bench_corpus::LoaderArgs),
    /// Simulated workers heartbeating against a real coordinator: latency, CPU, gang assignment.
    Coordinator(crate::bench_coordinator::CoordinatorBenchArgs),
}

#[derive(Args, Debug)]
pub struct StepArgs {
    /// cpu (cuda needs a binary built with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    #[arg(long, default_value = "gpt2-124m")]
    pub preset: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Step(a) => step(a),
        BenchCommand::Tokenize(a) => crate::bench_corpus::tokenize(a),
        BenchCommand::Loader(a) => crate::bench_corpus::loader(a),
        BenchCommand::Coordinator(a) => crate::bench_coordinator::run(a),
    }
}

/// The machine's single-precision GEMM rate through the CPU backend's own matmul (2048^3),
/// best of a few: the yardstick the step's GFLOP/s is compared with.
fn sgemm_gflops(be: &CpuBackend) -> f64 {
    let n = 2048;
    let a = be.upload(&vec![0.5; n * n]);
    let w = be.upload(&vec![0.25; n * n]);
    let mut out = be.zeros(n * n);
    let shape = MatmulShape { rows: n, in_features: n, out_features: n, layout: WeightLayout::InOut };
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t = Instant::now();
        be.matmul_forward(&mut out[..], &a[..], &w[..], None, shape);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

fn step(a: StepArgs) -> Result<()> {
    match a.backend.as_str() {
        "cpu" => {}
        "cuda" => bail!("--backend cuda: this smelt binary was built without the `cuda` feature (cargo build --release --features cuda)"),
        other => bail!("--backend {other:?}: expected cpu or cuda"),
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let cfg = GptConfig::preset(&a.preset)?;
    if a.seq > cfg.block_size {
        bail!("--seq {} exceeds the preset's block size {}", a.seq, cfg.block_size);
    }
    let be = CpuBackend::new();
    let mut rng = Rng::new(0);
    let stream: Vec<u32> = (0..a.batch * (a.seq + 1) * 8).map(|_| rng.below(cfg.vocab_size as u64) as u32).collect();
    let windows = TokenWindows::new(&stream);
    let tc = TrainConfig {
        batch_size: a.batch,
        seq_len: a.seq,
        grad_accum: 1,
        steps: a.warmup + a.steps,
        schedule: LrSchedule::constant(1e-4),
        optim: AdamWConfig::default(),
        eval_interval: 0,
        eval_batches: 1,
        seed: 0,
    };
    let model = Gpt::new(be, cfg.clone(), 0)?;
    let mut trainer = Trainer::new(model, tc)?;
    for _ in 0..a.warmup {
        trainer.train_step(&windows)?;
    }
    let t = Instant::now();
    for _ in 0..a.steps {
        trainer.train_step(&windows)?;
    }
    let secs = t.elapsed().as_secs_f64() / a.steps as f64;
    let tokens = (a.batch * a.seq) as f64;
    let flops_per_token = cfg.flops_per_token(a.seq);
    let gflops = flops_per_token * tokens / secs / 1e9;
    let peak = sgemm_gflops(&be);
    let report = json!({
        "bench": "step",
        "backend": "cpu",
        "preset": a.preset,
        "params": cfg.num_params(),
        "batch": a.batch,
        "seq": a.seq,
        "threads": rayon::current_num_threads(),
        "warmup_steps": a.warmup,
        "steps": a.steps,
        "ms_per_step": secs * 1e3,
        "tokens_per_s": tokens / secs,
        "flops_per_token": flops_per_token,
        "gflops_per_s": gflops,
        "sgemm_gflops_per_s": peak,
        "fraction_of_sgemm": gflops / peak,
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "{}: {:.0} ms/step, {:.0} tokens/s, {:.1} GFLOP/s = {:.0}% of this machine's SGEMM ({:.1} GFLOP/s) on {} threads",
            a.preset,
            secs * 1e3,
            tokens / secs,
            gflops,
            100.0 * gflops / peak,
            peak,
            rayon::current_num_threads()
        );
    }
    Ok(())
}
