//! `smelt train`: a single-process trainer over one text file.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use smelt_corpus::Tokenizer;
use smelt_engine::data::TokenWindows;
use smelt_engine::model::{Gpt, GptConfig, LayerNormPlacement};
use smelt_engine::optim::{AdamWConfig, LrDecay, LrSchedule};
use smelt_engine::train::{TrainConfig, Trainer};
use smelt_engine::CpuBackend;
use tracing::{info, warn};

use smelt_worker::model_file;

/// `--warmup` when not given (a shorter run warms up over all its steps).
const DEFAULT_WARMUP: u64 = 50;

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// UTF-8 text to train on.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokenizer: char (the text's own characters; the default), byte or gpt2 (with
    /// --init-from: the model's, which this must name if given).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Start from this model's weights (a model.safetensors, e.g. from `smelt import hf`, a
    /// checkpoint directory, or a job id under --store): its sizes and tokenizer are kept.
    #[arg(long, conflicts_with_all = ["preset", "n_layer", "n_head", "n_embd", "block_size", "post_ln", "rotary"])]
    pub init_from: Option<String>,
    /// Where --init-from's job ids are (`jobs/<job>/`).
    #[arg(long, env = "SMELT_STORE", default_value = ".smelt")]
    pub store: String,
    /// Model preset (gpt2-124m, gpt2-350m, char-small, tiny, test ...); the sizes below override it.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Transformer blocks (overrides the preset's).
    #[arg(long)]
    pub n_layer: Option<usize>,
    /// Attention heads per block; must divide --n-embd.
    #[arg(long)]
    pub n_head: Option<usize>,
    /// Width of the residual stream (embedding size).
    #[arg(long)]
    pub n_embd: Option<usize>,
    /// Positions the model takes (its context length; --seq is at most this).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// LayerNorm after each residual add (the original Transformer) instead of before.
    #[arg(long)]
    pub post_ln: bool,
    /// Rotary position embeddings (RoPE) in every attention layer instead of a learned table.
    #[arg(long)]
    pub rotary: bool,
    /// Optimizer steps.
    #[arg(long, default_value_t = 500)]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Sequence length (default: the model's block size).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Micro-batches accumulated per step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// The learning rate the decay falls to, reached just after the last step (default: lr / 10).
    #[arg(long)]
    pub min_lr: Option<f32>,
    /// Warm-up steps (default: 50, or every step of a shorter run).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// The learning rate after warm-up: cosine, linear, constant or wsd (warmup-stable-decay).
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// wsd: steps of the final linear decay (default: a fifth of --steps).
    #[arg(long)]
    pub cooldown: Option<u64>,
    /// AdamW's decoupled weight decay (on the matrices; see --decay-embeddings).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Also decay the embeddings (nanoGPT decays every 2-D tensor).
    #[arg(long)]
    pub decay_embeddings: bool,
    /// AdamW's first-moment decay.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f32,
    /// AdamW's second-moment decay.
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f32,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f32,
    /// Share of the text held out for validation (its end).
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub val_fraction: f64,
    /// Evaluate on the held-out text every this many steps (and at the last; 0: only the last).
    #[arg(long, default_value_t = 100)]
    pub eval_interval: u64,
    /// Batches of the held-out text each evaluation averages over: this times --batch windows of
    /// --seq tokens (so another --batch scores another sample of the text; --grad-accum does not).
    #[arg(long, default_value_t = 20)]
    pub eval_batches: usize,
    /// At each evaluation also score multiple choice: JSON lines in HellaSwag's fields (`ctx`,
    /// `endings`, `label`), as `smelt eval --choices`; acc and acc_norm go to metrics.jsonl.
    #[arg(long)]
    pub choices: Option<String>,
    /// With --choices: the first this many examples (0: all).
    #[arg(long, default_value_t = 0, requires = "choices")]
    pub choices_max: usize,
    /// Seeds the initial weights and the order of the training windows.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Directory for model.safetensors and metrics.jsonl.
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
}

/// `--init-from`'s GPT (a model file, checkpoint or job id; a BERT or T5 is refused).
fn read_parent(model: &str, store: &str) -> Result<model_file::SavedModel> {
    let (saved, file) = crate::cmd_export::read_gpt(model, store, "--init-from", "smelt train trains a GPT")?;
    info!(model, file, "starting from the model's weights");
    Ok(saved)
}

fn model_config(a: &TrainArgs, vocab_size: usize) -> Result<GptConfig> {
    let mut cfg = GptConfig::preset(&a.preset)?;
    cfg.vocab_size = vocab_size;
    if let Some(v) = a.n_layer {
        cfg.n_layer = v;
    }
    if let Some(v) = a.n_head {
        cfg.n_head = v;
    }
    if let Some(v) = a.n_embd {
        cfg.n_embd = v;
    }
    if let Some(v) = a.block_size {
        cfg.block_size = v;
    }
    if a.post_ln {
        cfg.ln_placement = LayerNormPlacement::Post;
    }
    if a.rotary {
        cfg.positions = smelt_engine::model::GptPositions::Rotary;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(a: TrainArgs) -> Result<()> {
    if !(0.0..1.0).contains(&a.val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {}", a.val_fraction);
    }
    if a.cooldown.is_some() && a.schedule != "wsd" {
        bail!("--cooldown is for --schedule wsd (this run's schedule is {})", a.schedule);
    }
    // as a job spec's train.grad_clip and train.eval_batches are checked (these ran with
    // clipping silently off, and one batch)
    if !(a.grad_clip >= 0.0 && a.grad_clip.is_finite()) {
        bail!("--grad-clip {}: a gradient norm to clip at, or 0 for no clipping", a.grad_clip);
    }
    if a.eval_batches == 0 {
        bail!("--eval-batches must be at least 1");
    }
    let text = smelt_corpus::input::read_text_file(&a.text).with_context(|| format!("reading --text {}", a.text.display()))?;
    let parent = a.init_from.as_deref().map(|m| read_parent(m, &a.store)).transpose()?;
    let tokenizer = match &parent {
        Some(p) => {
            if let Some(t) = a.tokenizer.as_deref().filter(|t| *t != p.tokenizer.kind()) {
                bail!("--tokenizer {t}: the model in --init-from uses the {} tokenizer; leave --tokenizer out", p.tokenizer.kind());
            }
            p.tokenizer.clone()
        }
        None => Tokenizer::fit(a.tokenizer.as_deref().unwrap_or("char"), &text)?,
    };
    let tokens = tokenizer.encode(&text).with_context(|| format!("tokenizing --text {}", a.text.display()))?;
    let cfg = match &parent {
        Some(p) => p.config.clone(),
        None => model_config(&a, tokenizer.vocab_size())?,
    };
    let seq = a.seq.unwrap_or(cfg.block_size);
    // before the token counts: a --seq the model cannot take is the problem however long the text
    if seq == 0 {
        bail!("--seq must be at least 1");
    }
    if seq > cfg.block_size {
        let fix = if parent.is_some() { "lower --seq (the model in --init-from keeps its own)" } else { "lower --seq or raise --block-size" };
        bail!("--seq {seq} is more than the model's block size ({}, the most positions it takes): {fix}", cfg.block_size);
    }
    let split = ((tokens.len() as f64) * (1.0 - a.val_fraction)) as usize;
    let (train_ids, val_ids) = tokens.split_at(split);
    if train_ids.len() <= seq {
        bail!("{}: {} training tokens cannot fill one sequence of {seq}", a.text.display(), train_ids.len());
    }
    if a.val_fraction > 0.0 && val_ids.len() <= seq {
        bail!("{}: {} validation tokens cannot fill one sequence of {seq}; lower --seq or raise --val-fraction", a.text.display(), val_ids.len());
    }
    let warmup = a.warmup.unwrap_or(DEFAULT_WARMUP.min(a.steps));
    let asked_for_a_schedule = a.warmup.is_some() || a.min_lr.is_some() || a.schedule != "cosine";
    if a.steps > 0 && warmup >= a.steps && asked_for_a_schedule {
        // Said out loud because the run then never reaches --lr's plateau nor its decay: a
        // user comparing schedules on a short run would otherwise see identical losses. (A run
        // on the defaults is short by choice, and its help says it warms up throughout.)
        warn!(
            steps = a.steps,
            warmup,
            "every step is warm-up: the learning rate only rises toward --lr and --schedule {} never applies; \
             raise --steps above {warmup} or lower --warmup",
            a.schedule
        );
    }
    let tc = TrainConfig {
        batch_size: a.batch,
        seq_len: seq,
        grad_accum: a.grad_accum,
        steps: a.steps,
        schedule: LrSchedule {
            max_lr: a.lr,
            min_lr: a.min_lr.unwrap_or(a.lr / 10.0),
            warmup_steps: warmup,
            decay_steps: a.steps,
            decay: LrDecay::parse(&a.schedule).ok_or_else(|| anyhow::anyhow!("--schedule {:?}: one of {}", a.schedule, LrDecay::NAMES))?,
            cooldown_steps: a.cooldown.unwrap_or((a.steps / 5).min(a.steps.saturating_sub(warmup))),
        },
        optim: AdamWConfig {
            beta1: a.beta1,
            beta2: a.beta2,
            eps: 1e-8,
            weight_decay: a.weight_decay,
            decay_embeddings: a.decay_embeddings,
            grad_clip: (a.grad_clip > 0.0).then_some(a.grad_clip),
        },
        eval_interval: a.eval_interval,
        eval_batches: a.eval_batches,
        seed: a.seed,
    };
    let logits = a.batch as u128 * seq as u128 * cfg.vocab_size as u128;
    smelt_worker::memory_check::ensure_fits_cpu(cfg.num_params(), logits, &format!("the model ({} parameters; --batch {} x --seq {seq})", cfg.num_params(), a.batch))?;
    // a big model takes a while to draw and allocate before its first step: said, not silent
    if cfg.num_params() >= 100_000_000 {
        eprintln!("building the model: {:.2} B parameters (weights, gradients and AdamW moments: {:.1} GB) ...", cfg.num_params() as f64 / 1e9, cfg.num_params() as f64 * 16.0 / 1e9);
    }
    let model = match &parent {
        Some(p) => Gpt::from_params(CpuBackend::new(), cfg.clone(), &p.params)?,
        None => Gpt::new(CpuBackend::new(), cfg.clone(), a.seed)?,
    };
    info!(
        params = cfg.num_params(),
        vocab = cfg.vocab_size,
        layers = cfg.n_layer,
        width = cfg.n_embd,
        train_tokens = train_ids.len(),
        val_tokens = val_ids.len(),
        threads = rayon::current_num_threads(),
        "training gpt on cpu"
    );
    // scored as training runs: rows of at most --seq inputs, --batch rows a pass
    let choices = a.choices.as_deref().map(|path| smelt_worker::choices::load("--choices", path, a.choices_max, &tokenizer, seq)).transpose()?;
    let mut trainer = Trainer::new(model, tc)?;
    let (train, val) = (TokenWindows::new(train_ids), TokenWindows::new(val_ids));
    if a.val_fraction > 0.0 {
        // as a job warns: more batches would only evaluate the same tokens again
        let n = smelt_engine::train::eval_batches_over(a.eval_batches, val.starts(seq), a.batch, seq);
        if val.starts(seq) > 0 && n < a.eval_batches {
            let batches = if n == 1 { "batch" } else { "batches" };
            warn!("--eval-batches {} is more than the validation tokens fill ({} tokens: {n} {batches} of {} sequences of {seq}): each evaluation takes those {n}", a.eval_batches, val_ids.len(), a.batch);
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let model_path = a.out.join("model.safetensors");
    let mut metrics = std::fs::File::create(a.out.join("metrics.jsonl"))?;

    let bar = ProgressBar::new(a.steps);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")?);
    let started = Instant::now();
    let every = (a.steps / 10).max(1);
    let mut tokens_seen = 0usize;
    let mut last_val: Option<f32> = None;
    let save = |trainer: &Trainer<CpuBackend>, val: Option<f32>| -> Result<()> {
        let mut extra = vec![("step", trainer.step().to_string())];
        if let Some(v) = val {
            extra.push(("val_loss", v.to_string()));
        }
        model_file::save(&model_path, &cfg, &tokenizer, &trainer.model.params_host(), &extra)
    };
    for step in 0..a.steps {
        let s = trainer.train_step(&train)?;
        tokens_seen += s.tokens;
        let tok_s = tokens_seen as f64 / started.elapsed().as_secs_f64();
        let is_last = step + 1 == a.steps;
        let mut record = serde_json::json!({
            "step": step + 1, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "tokens_per_s": tok_s,
        });
        let eval_step = is_last || (a.eval_interval > 0 && (step + 1) % a.eval_interval == 0);
        if a.val_fraction > 0.0 && eval_step {
            let v = trainer.evaluate(&val)?;
            last_val = Some(v);
            record["val_loss"] = v.into();
            bar.suspend(|| info!(step = step + 1, train_loss = %format!("{:.4}", s.loss), val_loss = %format!("{v:.4}"), tokens_per_s = tok_s as u64, "eval"));
            save(&trainer, last_val)?;
        }
        if let (Some((examples, shown)), true) = (&choices, eval_step) {
            let t = smelt_worker::choices::tally(&mut trainer.model, examples, a.batch, shown)?;
            record["acc"] = t.acc().into();
            record["acc_norm"] = t.acc_norm().into();
            bar.suspend(|| info!(step = step + 1, acc = t.acc(), acc_norm = t.acc_norm(), examples = t.examples, "multiple choice"));
        }
        writeln!(metrics, "{record}")?;
        let progress = format!("loss {:.4}{} | {:.0} tok/s", s.loss, last_val.map(|v| format!(" | val {v:.4}")).unwrap_or_default(), tok_s);
        if bar.is_hidden() && ((step + 1) % every == 0 || is_last) {
            // no terminal (a log file, CI): plain lines, a tenth of the run apart, with the bar's
            // estimate of the time left
            let left = started.elapsed().mul_f64((a.steps - step - 1) as f64 / (step + 1) as f64);
            let eta = if is_last { String::new() } else { format!(" | eta {}", crate::cmd_submit::short_duration(left)) };
            eprintln!("step {}/{}: {progress}{eta}", step + 1, a.steps);
        }
        bar.set_message(progress);
        bar.inc(1);
    }
    // (cleared: the lines after it would otherwise start on the bar's line)
    bar.finish_and_clear();
    save(&trainer, last_val)?;
    info!(path = %model_path.display(), val_loss = %last_val.map_or("none".to_string(), |v| format!("{v:.4}")), seconds = %format!("{:.1}", started.elapsed().as_secs_f64()), "saved model");
    Ok(())
}
