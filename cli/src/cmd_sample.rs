//! `smelt sample`: generate text from a trained model (temperature, top-k).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use smelt_engine::model::Gpt;
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

use smelt_worker::model_file;

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// A model.safetensors written by `smelt train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Text to continue (must use the model's tokenizer's characters).
    #[arg(long, default_value = "\n")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Softmax temperature; 0 picks the most likely token.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Picks a token id from logits with temperature and top-k.
pub fn pick(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let k = if top_k == 0 { logits.len() } else { top_k.min(logits.len()) };
    let kept = &order[..k];
    let max = logits[kept[0]];
    let weights: Vec<f64> = kept.iter().map(|&i| (((logits[i] - max) / temperature) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.next_f64() * total;
    for (&i, w) in kept.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    kept[k - 1] as u32
}

fn argmax(x: &[f32]) -> u32 {
    x.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0)
}

pub fn run(a: SampleArgs) -> Result<()> {
    if !(a.temperature >= 0.0) {
        bail!("--temperature must be >= 0");
    }
    let saved = model_file::load(&a.model)?;
    let block = saved.config.block_size;
    let mut ids = saved.tokenizer.encode(&a.prompt)?;
    if ids.is_empty() {
        bail!("--prompt must not be empty");
    }
    let known = saved.tokenizer.corpus_vocab_size().min(saved.config.vocab_size);
    let mut model = Gpt::from_params(CpuBackend::new(), saved.config, &saved.params)?;
    let mut rng = Rng::new(a.seed);
    let mut out = std::io::stdout().lock();
    write!(out, "{}", a.prompt)?;
    for _ in 0..a.tokens {
        let ctx = &ids[ids.len().saturating_sub(block)..];
        model.forward(ctx, None, 1, ctx.len())?;
        let logits = model.logits_at(0, ctx.len() - 1);
        // Ids past the tokenizer's (and end-of-text) are vocabulary padding: never picked.
        let next = pick(&logits[..known], a.temperature, a.top_k, &mut rng);
        ids.push(next);
        // A model trained on a prepared corpus also knows the end-of-text id: a document break.
        if next == saved.tokenizer.eot_token() && next as usize >= saved.tokenizer.vocab_size() {
            write!(out, "\n\n")?;
        } else {
            write!(out, "{}", saved.tokenizer.decode(&[next])?)?;
        }
        out.flush()?;
    }
    writeln!(out)?;
    Ok(())
}
