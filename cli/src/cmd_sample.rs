//! `smelt sample`: generate text from a trained model (temperature, top-k): a GPT continues the
//! prompt; a T5 reads the prompt with its encoder and its decoder writes a response (what a
//! `head = "sft"` fine-tuning job teaches it), ending at the end-of-text id when the model has
//! one. A BERT does not generate: the error says so.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use smelt_engine::model::{Gpt, T5Batch, T5Config, T5};
use smelt_jobspec::T5Specials;
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

use smelt_worker::model_file::{self, AnyModel, FamilyModel, SavedFamilyModel};
use smelt_corpus::Tokenizer;

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// A model.safetensors: a GPT (`smelt train`, a pretraining or fine-tuning job) or a T5.
    #[arg(long)]
    pub model: PathBuf,
    /// Text to continue (a GPT) or to respond to (a T5); it must use the model's tokenizer's
    /// characters.
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
    let saved = match model_file::load_any(&a.model)? {
        AnyModel::Gpt(saved) => saved,
        AnyModel::Family(SavedFamilyModel { model: FamilyModel::T5 { config, specials }, tokenizer, params, .. }) => {
            return respond_t5(&a, config, specials, &tokenizer, &params);
        }
        AnyModel::Family(_) => bail!(
            "{}: a BERT does not generate text (an encoder); `smelt export hf` gives its masked-LM or classifier to transformers",
            a.model.display()
        ),
    };
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

/// A T5's response to the prompt: the encoder reads the prompt once per step, the decoder starts
/// from the pad id (T5's start token) and each step appends a token picked from the logits of
/// its last position among the text ids (never the pad or a sentinel); the end-of-text id, when
/// the model has one, ends the response. At most `--tokens` tokens, and the decoder's positions.
fn respond_t5(a: &SampleArgs, config: T5Config, specials: T5Specials, tok: &Tokenizer, params: &[f32]) -> Result<()> {
    let prompt = tok.encode(&a.prompt)?;
    if prompt.is_empty() {
        bail!("--prompt must not be empty");
    }
    let max = config.max_positions;
    if prompt.len() > max {
        bail!("--prompt is {} tokens; the T5's encoder takes at most {max}", prompt.len());
    }
    let text = specials.base_vocab as usize; // ids below it are text (end-of-text included)
    let eot = Some(tok.eot_token()).filter(|&e| (e as usize) < text);
    let mut model = T5::from_params(CpuBackend::new(), config, params)?;
    let mut rng = Rng::new(a.seed);
    let mut dec = vec![specials.pad];
    let mut out = std::io::stdout().lock();
    for _ in 0..a.tokens.min(max) {
        let x = T5Batch { batch: 1, enc_len: prompt.len(), dec_len: dec.len(), enc_tokens: prompt.clone(), dec_tokens: dec.clone(), ..Default::default() };
        model.forward(&x)?;
        let logits = model.logits();
        let v = logits.len() / dec.len();
        let next = pick(&logits[(dec.len() - 1) * v..][..text], a.temperature, a.top_k, &mut rng);
        if Some(next) == eot {
            break;
        }
        write!(out, "{}", tok.decode(&[next])?)?;
        out.flush()?;
        dec.push(next);
    }
    writeln!(out)?;
    Ok(())
}
