//! `smelt bench`: speed measurements. A benchmark reports, it never asserts.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use smelt_engine::backend::{Backend, MatmulShape, WeightLayout};
use smelt_engine::data::TokenWindows;
use smelt_engine::model::{Gpt, GptConfig};
use smelt_engine::optim::{AdamWConfig, LrSchedule};
use smelt_engine::profile::Profiled;
use smelt_engine::rng::Rng;
use smelt_engine::train::{TrainConfig, Trainer};
use smelt_engine::CpuBackend;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time full training steps (forward, backward, AdamW) of a GPT, BERT (masked LM) or T5.
    Step(StepArgs),
    /// GPT-2 BPE speed on a text file, beside Python tiktoken on the same file.
    Tokenize(crate::bench_corpus::TokenizeArgs),
    /// Tokens/s reading a prepared corpus in sample order (and from memory:// as a bound).
    Loader(crate::bench_corpus::LoaderArgs),
    /// Simulated workers heartbeating against a real coordinator: latency, CPU, gang assignment.
    Coordinator(crate::bench_coordinator::CoordinatorBenchArgs),
    /// Checkpoint write/read GB/s (file:// and S3 on loopback) and the training stall per checkpoint.
    Checkpoint(crate::bench_checkpoint::CheckpointArgs),
}

/// The model family a step bench trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    /// GPT, next-token prediction.
    Gpt,
    /// BERT, masked LM on 15% of the positions, no next-sentence head (HF BertForMaskedLM).
    Bert,
    /// T5-style encoder-decoder, random inputs and labels (a span-denoising shape).
    T5,
}

impl Arch {
    /// The name `--arch` takes.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt => "gpt",
            Arch::Bert => "bert",
            Arch::T5 => "t5",
        }
    }
}

#[derive(Args, Debug)]
pub struct StepArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// cpu, or cuda (GPU 0; needs a binary built with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    #[arg(long, value_enum, default_value = "gpt")]
    pub arch: Arch,
    /// Model preset of the family (default: gpt2-124m, bert-base, t5-small).
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Sequence length (T5: the encoder's). Tokens/s counts B * seq input tokens.
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// T5 only: decoder (target) length (default: seq / 4, rounded up, about span corruption's
    /// ratio; T5's own 512 -> 114 is 0.22).
    #[arg(long)]
    pub dec_seq: Option<usize>,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Override the preset's vocabulary size (e.g. 50304, GPT-2's 50257 padded to a multiple
    /// of 64 as llm.c and the PyTorch peer do; 30528 for BERT's 30522), to measure what an odd
    /// vocabulary costs.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// BERT only: hidden dropout probability in the timed training steps (the preset has 0;
    /// Hugging Face's BERT trains with 0.1, which its peer run uses).
    #[arg(long)]
    pub dropout: Option<f32>,
    /// BERT and T5 only: the attention score, dot (the presets'), general or additive (the
    /// additive width is the head dim), to time the learned scores beside the dot one (MFU
    /// still counts the dot score's FLOPs).
    #[arg(long, value_parser = ["dot", "general", "additive"])]
    pub scores: Option<String>,
    /// GPT only: rotary positions (RoPE) instead of the learned table, to time them beside it.
    #[arg(long)]
    pub rotary: bool,
    /// Time every backend op (each bracketed by a device sync) and print where a step's time
    /// goes; the step time itself is then slower than a real one.
    #[arg(long)]
    pub profile: bool,
    /// Like --profile, but each op timed by marks on the GPU's timeline (CUDA events) instead of
    /// syncs: the step runs as it does unprofiled, and the table adds the GPU's idle time between
    /// ops (waiting for the host). On the CPU, the same as --profile.
    #[arg(long, conflicts_with = "profile")]
    pub timeline: bool,
    /// Matmul precision on CUDA: bf16 (tensor cores, fp32 accumulation), tf32 or f32.
    #[arg(long, default_value = "bf16")]
    pub matmul: String,
    /// Dense bf16 peak of the GPU in TFLOP/s, for MFU (H100/H200 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
}

impl StepArgs {
    pub fn preset(&self) -> String {
        let default = match self.arch {
            Arch::Gpt => "gpt2-124m",
            Arch::Bert => "bert-base",
            Arch::T5 => "t5-small",
        };
        self.preset.clone().unwrap_or_else(|| default.to_string())
    }
    pub fn dec_seq(&self) -> usize {
        self.dec_seq.unwrap_or(self.seq.div_ceil(4))
    }
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Step(a) => step(a),
        BenchCommand::Tokenize(a) => crate::bench_corpus::tokenize(a),
        BenchCommand::Loader(a) => crate::bench_corpus::loader(a),
        BenchCommand::Coordinator(a) => crate::bench_coordinator::run(a),
        BenchCommand::Checkpoint(a) => crate::bench_checkpoint::run(a),
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
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.dec_seq.is_some() && a.arch != Arch::T5 {
        bail!("--dec-seq is for --arch t5 (the decoder's length); --arch {} has one sequence length, --seq", a.arch.name());
    }
    match a.backend.as_str() {
        "cpu" => {
            let be = CpuBackend::new();
            let timed = if a.profile || a.timeline { time_profiled(be, &a)? } else { time_steps(be, &a)? };
            let peak = sgemm_gflops(&be);
            report(&a, &timed, json!({
                "backend": "cpu",
                "threads": rayon::current_num_threads(),
                "sgemm_gflops_per_s": peak,
                "fraction_of_sgemm": timed.gflops() / peak,
            }), format!(
                "{:.0}% of this machine's SGEMM ({peak:.1} GFLOP/s) on {} threads",
                100.0 * timed.gflops() / peak,
                rayon::current_num_threads()
            ));
            Ok(())
        }
        "cuda" => step_cuda(&a),
        other => bail!("--backend {other:?}: expected cpu or cuda"),
    }
}

#[cfg(not(feature = "cuda"))]
fn step_cuda(_: &StepArgs) -> Result<()> {
    bail!("--backend cuda: this smelt binary was built without the `cuda` feature (cargo build --release -p smelt --features cuda)")
}

#[cfg(feature = "cuda")]
fn step_cuda(a: &StepArgs) -> Result<()> {
    use smelt_engine::cuda::{CudaBackend, CudaOptions, MatmulPrecision};
    let matmul: MatmulPrecision = a.matmul.parse().map_err(|e| anyhow::anyhow!("--matmul: {e}"))?;
    let be = CudaBackend::new_with(0, CudaOptions { matmul, ..Default::default() })?;
    let device = be.device_name().to_string();
    // every switch as the SMELT_* variable and value that select it: the figure says which
    // variant it measured, and `env` with these reproduces it
    let tuning: serde_json::Map<String, serde_json::Value> =
        be.tuning().settings().into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    // which cuBLASLt training epilogues the timed steps took (SMELT_GELU_EPILOGUE=1,
    // SMELT_BGRAD_EPILOGUE=1), counted over the whole run: so a variant's timing says whether
    // its fused path really ran
    let mut epilogues = smelt_engine::cuda::EpilogueStats::default();
    // GEMM autotuning (SMELT_LT_AUTOTUNE=1): what it saved over the timed steps, as timed when
    // tuning (the tuning itself happens in the warmup steps)
    let mut tuned_warm = smelt_engine::cuda::AutotuneStats::default();
    let mut tuned_end = tuned_warm;
    let timed = if a.profile || a.timeline {
        time_profiled(be, a)?
    } else {
        run_steps(be, a, |be| tuned_warm = be.lt_autotune_stats(), |be| {
            epilogues = be.epilogue_stats();
            tuned_end = be.lt_autotune_stats();
        })?
    };
    // MFU against the dense bf16 peak of the card (H100/H200 SXM: 989 TFLOP/s), the same
    // yardstick as ../shared/anchors/torch_gpt2.py's --peak default, so the two are comparable.
    let peak_tflops = a.peak_tflops;
    let mfu = timed.gflops() / 1e3 / peak_tflops;
    report(a, &timed, json!({
        "backend": "cuda",
        "device": device,
        "peak_tflops": peak_tflops,
        "mfu": mfu,
        "tuning": tuning,
        "epilogue_calls": {
            "gelu_forward": epilogues.gelu_forward,
            "dgelu_backward": epilogues.dgelu_backward,
            "bgrad": epilogues.bgrad,
        },
        "gemm_autotune": {
            "shapes": tuned_end.shapes,
            "changed": tuned_end.changed,
            "saved_ms_per_step": (tuned_end.saved_us - tuned_warm.saved_us) / 1e3 / a.steps.max(1) as f64,
        },
    }), format!("MFU {:.1}% of {peak_tflops} TFLOP/s on {device}", 100.0 * mfu));
    Ok(())
}

/// Step times of a model trained on random tokens.
pub(crate) struct Timed {
    pub params: usize,
    /// The model's vocabulary, and the rows its LM head runs over (the vocabulary rounded up:
    /// engine/src/model/padded_head.rs).
    pub vocab_size: usize,
    pub head_rows: usize,
    /// Training FLOPs per counted (input) token.
    pub flops_per_token: f64,
    /// Input tokens per step (GPT, BERT: B * T; T5: B * Te).
    pub tokens_per_step: f64,
    /// Seconds per step, sorted.
    pub secs: Vec<f64>,
}

impl Timed {
    fn median(&self) -> f64 {
        self.secs[self.secs.len() / 2]
    }
    fn tokens_per_s(&self) -> f64 {
        self.tokens_per_step / self.median()
    }
    fn gflops(&self) -> f64 {
        self.flops_per_token * self.tokens_per_s() / 1e9
    }
}

/// `time_steps` through `Profiled` (synchronised, or on the device's timeline with
/// `--timeline`), printing the per-op table of the timed steps.
fn time_profiled<B: Backend>(be: B, a: &StepArgs) -> Result<Timed> {
    let mut table = Vec::new();
    let marks = a.timeline && be.timeline_mark().is_some();
    let profiled = if a.timeline { Profiled::timeline(be) } else { Profiled::new(be) };
    let timed = run_steps(profiled, a, |be| be.reset(), |be| table = be.report())?;
    let total: f64 = table.iter().map(|(_, t)| t.secs).sum();
    let how = if marks { "timed on the device's timeline, not synchronised" } else { "each op synchronised" };
    eprintln!("{:>9} {:>6} {:>7}  op (per timed step; {how})", "ms/step", "calls", "share");
    for (op, t) in &table {
        eprintln!("{:>9.3} {:>6} {:>6.1}%  {op}", t.secs * 1e3 / a.steps as f64, t.calls / a.steps, 100.0 * t.secs / total);
    }
    let all = if marks { "all ops and the idle time between them" } else { "all ops" };
    eprintln!("{:>9.3} {:>6} {:>6}  {all}", total * 1e3 / a.steps as f64, "", "");
    Ok(timed)
}

fn time_steps<B: Backend>(be: B, a: &StepArgs) -> Result<Timed> {
    run_steps(be, a, |_| {}, |_| {})
}

/// The untimed warm-up steps, `after_warmup`, the timed steps, `after`: sorted seconds per
/// timed step. Each step must end by reading something back from the device (the loss), so
/// host clocks time whole steps on every backend.
pub(crate) fn time_loop<M, B>(
    m: &mut M,
    backend: fn(&M) -> &B,
    warmup: u64,
    steps: u64,
    after_warmup: impl FnOnce(&B),
    after: impl FnOnce(&B),
    mut step: impl FnMut(&mut M) -> Result<()>,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        step(m)?;
    }
    after_warmup(backend(m));
    let mut secs = Vec::with_capacity(steps as usize);
    for _ in 0..steps {
        let t = Instant::now();
        step(m)?;
        secs.push(t.elapsed().as_secs_f64());
    }
    after(backend(m));
    secs.sort_by(f64::total_cmp);
    Ok(secs)
}

fn run_steps<B: Backend>(be: B, a: &StepArgs, after_warmup: impl FnOnce(&B), after: impl FnOnce(&B)) -> Result<Timed> {
    if a.dropout.is_some() && !matches!(a.arch, Arch::Bert) {
        bail!("--dropout is for --arch bert (the GPT and T5 models here have no dropout)");
    }
    if a.rotary && !matches!(a.arch, Arch::Gpt) {
        bail!("--rotary is for --arch gpt (BERT and T5 take learned or sinusoidal positions)");
    }
    if a.scores.is_some() && matches!(a.arch, Arch::Gpt) {
        bail!("--scores is for --arch bert or t5 (the GPT here has dot-product attention only)");
    }
    match a.arch {
        Arch::Gpt => run_gpt(be, a, after_warmup, after),
        Arch::Bert => crate::bench_family::run_bert(be, a, after_warmup, after),
        Arch::T5 => crate::bench_family::run_t5(be, a, after_warmup, after),
    }
}

fn run_gpt<B: Backend>(be: B, a: &StepArgs, after_warmup: impl FnOnce(&B), after: impl FnOnce(&B)) -> Result<Timed> {
    let mut cfg = GptConfig::preset(&a.preset())?;
    if let Some(v) = a.vocab {
        cfg.vocab_size = v;
    }
    if a.rotary {
        cfg.positions = smelt_engine::model::GptPositions::Rotary;
    }
    cfg.validate()?;
    if a.seq > cfg.block_size {
        bail!("--seq {} exceeds the preset's block size {}", a.seq, cfg.block_size);
    }
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
    // Each step ends by reading its loss back, which waits for the device.
    let secs = time_loop(&mut trainer, |t| t.model().backend(), a.warmup, a.steps, after_warmup, after, |t| {
        t.train_step(&windows)?;
        Ok(())
    })?;
    Ok(Timed {
        params: cfg.num_params(),
        vocab_size: cfg.vocab_size,
        head_rows: cfg.head_rows(),
        flops_per_token: cfg.flops_per_token(a.seq),
        tokens_per_step: (a.batch * a.seq) as f64,
        secs,
    })
}

fn report(a: &StepArgs, t: &Timed, extra: serde_json::Value, extra_text: String) {
    let mut report = json!({
        "bench": "step",
        "arch": a.arch.name(),
        "preset": a.preset(),
        "vocab": a.vocab,
        "vocab_size": t.vocab_size,
        "head_rows": t.head_rows,
        "dropout": a.dropout.map(|p| (p as f64 * 1e6).round() / 1e6),
        "scores": a.scores.as_deref().unwrap_or("dot"),
        "positions": matches!(a.arch, Arch::Gpt).then_some(if a.rotary { "rotary" } else { "learned" }),
        "params": t.params,
        "batch": a.batch,
        "seq": a.seq,
        "warmup_steps": a.warmup,
        "steps": a.steps,
        "ms_per_step": t.median() * 1e3,
        "ms_per_step_min": t.secs[0] * 1e3,
        "ms_per_step_max": t.secs[t.secs.len() - 1] * 1e3,
        "tokens_per_step": t.tokens_per_step,
        "tokens_per_s": t.tokens_per_s(),
        "flops_per_token": t.flops_per_token,
        "gflops_per_s": t.gflops(),
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (report.as_object_mut(), extra) {
        obj.extend(more);
    }
    if a.arch == Arch::T5 {
        if let Some(obj) = report.as_object_mut() {
            obj.insert("dec_seq".into(), json!(a.dec_seq()));
        }
    }
    if a.json {
        println!("{report}");
    } else {
        println!(
            "{}: {:.1} ms/step (median of {}), {:.0} tokens/s, {:.1} GFLOP/s, {extra_text}",
            a.preset(),
            t.median() * 1e3,
            a.steps,
            t.tokens_per_s(),
            t.gflops(),
        );
    }
}
