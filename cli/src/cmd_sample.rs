//! `smelt sample`: generate text from a trained model (temperature, top-k): a GPT continues the
//! prompt; a T5 reads the prompt with its encoder and its decoder writes a response (what a
//! `head = "sft"` fine-tuning job teaches it), ending at the end-of-text id when the model has
//! one. A BERT does not generate: the error says so.

use std::io::Write;

use anyhow::{bail, Result};
use clap::Args;
use smelt_engine::backend::Backend;
use smelt_engine::model::{Decoder, Gpt, T5Batch, T5Config, T5};
use smelt_jobspec::T5Specials;
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

use smelt_worker::model_file::{self, AnyModel, FamilyModel, SavedFamilyModel, SavedModel};
use smelt_worker::DeviceRequest;

use crate::local_device::{self, OnBackend};
use smelt_corpus::Tokenizer;

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// The model: a model.safetensors (or a directory holding one), a checkpoint, or a job id
    /// (its newest checkpoint that verifies; if that one does not, its final weights, then its earlier checkpoints;
    /// under --store): a GPT (`smelt train`, a
    /// pretraining or fine-tuning job) or a T5.
    #[arg(long)]
    pub model: String,
    /// Where a job id's checkpoints and final weights are.
    #[arg(long, env = "SMELT_STORE", default_value = ".smelt")]
    pub store: String,
    #[command(flatten)]
    pub coordinator: crate::job_model::JobCoordinator,
    /// Text to continue (a GPT) or to respond to (a T5); it must use the model's tokenizer's
    /// characters.
    #[arg(long, default_value = "\n")]
    pub prompt: String,
    /// Tokens to generate (a T5 stops at its decoder's positions, `max_positions`: 128 for
    /// t5-tiny).
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Softmax temperature; 0 picks the most likely token.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling: among the fewest most likely tokens whose probabilities reach p (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Penalize tokens already in the text (CTRL: > 1 discourages repeats; 1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run the whole context through the model for every token instead of keeping its keys and
    /// values (a GPT; slower, for comparison). The two pick alike while the text fits the
    /// model's positions; past them the cache goes on from the text's last half block (read
    /// again every half block), where this reads the last whole block every token.
    #[arg(long)]
    pub no_kv_cache: bool,
    /// Where a GPT runs: auto (GPU 0 when usable, else the CPU), cpu, or cuda:N (a binary built
    /// with --features cuda). A T5 runs on the CPU.
    #[arg(long, default_value = "auto", value_parser = local_device::parse)]
    pub device: DeviceRequest,
}

/// What a GPT reads before each token it picks: with the key/value cache, only the tokens not
/// yet read (the prompt, then one token a step); when the cache holds the model's last position,
/// it starts over from the text's last half (read in one pass), so a text longer than the
/// model's positions goes on at one pass per half a block. Without the cache, the last
/// `block_size` tokens, all through the model, every step.
enum Context<'m, B: Backend> {
    /// `upto`: the ids already handed over (the cache holds the last `dec.len()` of them).
    Cached { dec: Decoder<'m, B>, upto: usize },
    Recomputed { model: &'m mut Gpt<B>, last_len: usize },
}

impl<B: Backend> Context<'_, B> {
    /// The logits of the token after `ids`: the ids handed over before and new ones after them.
    fn after(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        match self {
            Context::Cached { dec, upto } => {
                let (block, new) = (dec.capacity(), &ids[*upto..]);
                *upto = ids.len();
                if dec.len() + new.len() > block {
                    // a prompt longer than the positions: its last block; a full cache: the
                    // text's last half block, read again in one pass
                    let keep = if dec.is_empty() { block } else { (block / 2).max(1) };
                    dec.clear();
                    return Ok(dec.feed(&ids[ids.len() - keep.min(ids.len())..])?);
                }
                Ok(dec.feed(new)?)
            }
            Context::Recomputed { model, last_len } => {
                let ctx = &ids[ids.len().saturating_sub(model.config().block_size)..];
                *last_len = ctx.len();
                model.forward(ctx, None, 1, ctx.len())?;
                Ok(model.logits_at(0, ctx.len() - 1))
            }
        }
    }

    /// The tokens the model read for the last logits (the end of `ids`; with the cache, fewer
    /// than `block_size` after it started over).
    fn seen<'a>(&self, ids: &'a [u32]) -> &'a [u32] {
        &ids[ids.len() - self.read()..]
    }

    fn read(&self) -> usize {
        match self {
            Context::Cached { dec, .. } => dec.len(),
            Context::Recomputed { last_len, .. } => *last_len,
        }
    }
}


/// How the next token is drawn from the logits.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// 0: the most likely token.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the fewest most likely tokens whose probabilities reach p (1: all; nucleus sampling).
    pub top_p: f64,
}


/// Picks a token id from logits: temperature, then top-k, then top-p (both over the
/// temperature's distribution), then a draw.
pub fn pick(logits: &[f32], s: Sampling, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let k = if s.top_k == 0 { logits.len() } else { s.top_k.min(logits.len()) };
    let kept = &order[..k];
    let max = logits[kept[0]];
    let mut weights: Vec<f64> = kept.iter().map(|&i| (((logits[i] - max) / s.temperature) as f64).exp()).collect();
    if s.top_p < 1.0 {
        // the smallest prefix (most likely first) whose share of the kept mass reaches top_p
        let total: f64 = weights.iter().sum();
        let (mut acc, mut n) = (0.0, 0);
        while n < weights.len() && (n == 0 || acc < s.top_p * total) {
            acc += weights[n];
            n += 1;
        }
        weights.truncate(n);
    }
    let total: f64 = weights.iter().sum();
    let mut u = rng.next_f64() * total;
    for (&i, w) in kept.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    kept[weights.len() - 1] as u32
}

/// CTRL's repetition penalty: the logit of every id already in `context` divided by `penalty`
/// when positive, multiplied when negative (1: none).
pub fn penalize_repeats(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for &id in context {
        if let Some(l) = logits.get_mut(id as usize).filter(|_| seen.insert(id)) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// The text of generated token `id`, as it becomes whole: byte-level tokens (GPT-2's BPE, the
/// byte tokenizer) may end inside a UTF-8 character, whose bytes then wait in `out`.
fn piece(tok: &Tokenizer, id: u32, out: &mut Utf8Out) -> Result<String> {
    Ok(match tok {
        Tokenizer::Gpt2 => out.push(&smelt_corpus::gpt2::core().decode_bytes(&[id]).unwrap_or_default()),
        Tokenizer::Byte if id < 256 => out.push(&[id as u8]),
        other => other.decode(&[id])?,
    })
}

/// Text of generated ids as it becomes whole: a GPT-2 token may end inside a UTF-8 character
/// (byte-level BPE), so its bytes wait for the rest of the character.
struct Utf8Out {
    pending: Vec<u8>,
}

impl Utf8Out {
    /// The text that `bytes` completes (invalid sequences as U+FFFD).
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).expect("valid prefix"));
                    match e.error_len() {
                        // incomplete at the end: wait for the next token's bytes
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }
}

fn argmax(x: &[f32]) -> u32 {
    x.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0)
}

pub fn run(a: SampleArgs) -> Result<()> {
    a.coordinator.install();
    if !(a.temperature >= 0.0) {
        bail!("--temperature {} must be >= 0 (0 picks the most likely token)", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p {} must be in (0, 1] (1: off)", a.top_p);
    }
    if !(a.repetition_penalty > 0.0) {
        bail!("--repetition-penalty {} must be positive (1: off)", a.repetition_penalty);
    }
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    let src = crate::cmd_export::read_in(&a.model, &a.store, "--model")?;
    let saved = match model_file::any_from_bytes(&src.bytes, &src.file)? {
        AnyModel::Gpt(saved) => {
            crate::cmd_export::note_if_classifier(&src, &saved, "sampling");
            saved
        }
        AnyModel::Family(SavedFamilyModel { model: FamilyModel::T5 { config, specials }, tokenizer, params, .. }) => {
            if matches!(a.device, DeviceRequest::Cuda(_)) {
                bail!("--device {}: a T5 samples on the CPU (--device cpu or auto)", a.device);
            }
            if a.no_kv_cache {
                bail!("--no-kv-cache is for a GPT (its cached keys and values); a T5's decoder reads its whole response each step");
            }
            return respond_t5(&a, config, specials, &tokenizer, &params);
        }
        AnyModel::Family(_) => bail!(
            "{}: a BERT does not generate text (an encoder); `smelt export hf` gives its masked-LM or classifier to transformers",
            src.file
        ),
    };
    local_device::run(a.device, GptSampling { a: &a, sampling, saved })
}

/// A GPT continuing the prompt, on whichever backend `--device` gives.
struct GptSampling<'a> {
    a: &'a SampleArgs,
    sampling: Sampling,
    saved: SavedModel,
}

impl OnBackend for GptSampling<'_> {
    type Out = ();

    fn run<B: Backend>(self, be: B) -> Result<()> {
        let GptSampling { a, sampling, saved } = self;
        let block = saved.config.block_size;
        let mut ids = saved.tokenizer.encode(&a.prompt)?;
        if ids.is_empty() {
            bail!("--prompt must not be empty");
        }
        let known = saved.tokenizer.corpus_vocab_size().min(saved.config.vocab_size);
        let mut model = Gpt::from_params(be, saved.config, &saved.params)?;
        let mut rng = Rng::new(a.seed);
        let mut out = std::io::stdout().lock();
        write!(out, "{}", a.prompt)?;
        let mut text = Utf8Out { pending: Vec::new() };
        if a.tokens == 0 {
            writeln!(out)?;
            return Ok(());
        }
        let mut next_logits = match a.no_kv_cache {
            true => Context::Recomputed { model: &mut model, last_len: 0 },
            false => Context::Cached { dec: model.decoder(), upto: 0 },
        };
        let mut logits = next_logits.after(&ids)?;
        for i in 0..a.tokens {
            // the penalty looks at the last block of the text, whatever the cache holds
            penalize_repeats(&mut logits[..known], &ids[ids.len().saturating_sub(block)..], a.repetition_penalty);
            // Ids past the tokenizer's (and end-of-text) are vocabulary padding: never picked.
            let next = pick(&logits[..known], sampling, &mut rng);
            ids.push(next);
            // end-of-text (GPT-2's <|endoftext|>, or the id a prepared corpus adds after each
            // document): the model ended the text (an SFT model its answer)
            if next == saved.tokenizer.eot_token() {
                break;
            }
            write!(out, "{}", piece(&saved.tokenizer, next, &mut text)?)?;
            out.flush()?;
            if i + 1 < a.tokens {
                logits = next_logits.after(&ids)?;
            }
        }
        debug_assert!(next_logits.seen(&ids).len() <= block);
        write!(out, "{}", text.push(&[]))?;
        if !text.pending.is_empty() {
            write!(out, "\u{FFFD}")?;
        }
        writeln!(out)?;
        Ok(())
    }
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
    let mut pieces = Utf8Out { pending: Vec::new() };
    let mut out = std::io::stdout().lock();
    let mut written = 0;
    for _ in 0..a.tokens.min(max) {
        let x = T5Batch { batch: 1, enc_len: prompt.len(), dec_len: dec.len(), enc_tokens: prompt.clone(), dec_tokens: dec.clone(), ..Default::default() };
        model.forward(&x)?;
        let logits = model.logits();
        let v = logits.len() / dec.len();
        let mut last = logits[(dec.len() - 1) * v..][..text].to_vec();
        penalize_repeats(&mut last, &dec, a.repetition_penalty);
        let next = pick(&last, Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p }, &mut rng);
        if Some(next) == eot {
            break;
        }
        write!(out, "{}", piece(tok, next, &mut pieces)?)?;
        out.flush()?;
        dec.push(next);
        written += 1;
    }
    write!(out, "{}", pieces.push(&[]))?;
    if !pieces.pending.is_empty() {
        write!(out, "\u{FFFD}")?;
    }
    writeln!(out)?;
    // the decoder has no position past its last: fewer tokens than asked are no surprise then
    if a.tokens > max && written == max {
        eprintln!("note: stopped at {max} tokens, the most this T5's decoder writes (its max_positions); --tokens asked for {}", a.tokens);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache's bookkeeping over a text three blocks long: after every token the logits are
    /// a full forward pass's over exactly the tokens the context says it read (the end of the
    /// text, never more than a block, at least half a block once it started over), and it
    /// starts over when the block is full.
    #[test]
    fn the_cache_reads_the_end_of_the_text_and_starts_over_at_a_full_block() {
        use smelt_engine::CpuBackend;
        use smelt_engine::model::GptConfig;
        let cfg = GptConfig { vocab_size: 29, block_size: 16, ..GptConfig::preset("test").unwrap() };
        let model = Gpt::new(CpuBackend::new(), cfg.clone(), 3).unwrap();
        let mut full = Gpt::from_params(CpuBackend::new(), cfg, &model.params_host()).unwrap();
        let mut ctx = Context::Cached { dec: model.decoder(), upto: 0 };
        let mut rng = Rng::new(9);
        // a 5-token prompt, then one token at a time, as `smelt sample` hands them over
        let mut ids: Vec<u32> = (0..5).map(|_| rng.below(29) as u32).collect();
        let (mut restarts, mut last_read) = (0, 0);
        for _ in 0..48 {
            let got = ctx.after(&ids).unwrap();
            let seen = ctx.seen(&ids).to_vec();
            let read = seen.len();
            assert!(read <= 16 && (ids.len() < 16 || read >= 8), "read {read} of {} tokens", ids.len());
            restarts += usize::from(read < last_read);
            last_read = read;
            full.forward(&seen, None, 1, read).unwrap();
            let want = full.logits_at(0, read - 1);
            let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(d < 1e-5, "after {} tokens (the last {read} read) the logits differ by {d}", ids.len());
            ids.push(rng.below(29) as u32);
        }
        // up to 52 tokens through 16 positions: it starts over with the last 8 when the 17th,
        // 26th, 35th and 44th token come (8 kept, 8 more fill the block again)
        assert_eq!(restarts, 4);
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // probabilities 0.5, 0.3, 0.15, 0.05 (temperature 1)
        let logits: Vec<f32> = [0.5f64, 0.3, 0.15, 0.05].iter().map(|p| p.ln() as f32).collect();
        let draw = |top_p: f64| -> [usize; 4] {
            let mut rng = Rng::new(7);
            let mut n = [0usize; 4];
            for _ in 0..20_000 {
                n[pick(&logits, Sampling { temperature: 1.0, top_k: 0, top_p }, &mut rng) as usize] += 1;
            }
            n
        };
        // 0.8 is reached by the first two: the others never drawn, the two in proportion 5:3
        let n = draw(0.8);
        assert_eq!((n[2], n[3]), (0, 0), "{n:?}");
        let share = n[0] as f64 / (n[0] + n[1]) as f64;
        assert!((share - 0.625).abs() < 0.02, "{share}");
        // 0.81 needs the third
        let n = draw(0.81);
        assert!(n[2] > 0 && n[3] == 0, "{n:?}");
        // a tiny p keeps the most likely token alone; 1 keeps all
        assert_eq!(draw(1e-9), [20_000, 0, 0, 0]);
        assert!(draw(1.0).iter().all(|&c| c > 0));
    }

    #[test]
    fn repeats_are_penalized_once_each() {
        let mut l = vec![2.0f32, -1.0, 0.5, 3.0];
        penalize_repeats(&mut l, &[0, 1, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -2.0, 0.5, 3.0]);
        let mut same = vec![2.0f32, -1.0];
        penalize_repeats(&mut same, &[0, 1], 1.0);
        assert_eq!(same, vec![2.0, -1.0]);
    }

    #[test]
    fn gpt2_pieces_are_written_as_whole_characters() {
        let ids = smelt_corpus::gpt2::encode("Tokyo 東京 and ✓!");
        let bpe = smelt_corpus::gpt2::core();
        let mut out = Utf8Out { pending: Vec::new() };
        let mut text = String::new();
        let mut partial = false;
        for &id in &ids {
            let piece = out.push(&bpe.decode_bytes(&[id]).unwrap());
            partial |= !out.pending.is_empty();
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            text.push_str(&piece);
        }
        assert!(partial, "some token ends inside a character (else this test shows nothing)");
        assert_eq!(text, "Tokyo 東京 and ✓!");
        // the byte tokenizer's ids are bytes: a character spans several
        let mut out = Utf8Out { pending: Vec::new() };
        let bytes: String = "héllo 東".bytes().map(|b| piece(&Tokenizer::Byte, b as u32, &mut out).unwrap()).collect();
        assert_eq!(bytes, "héllo 東");
        // an invalid byte is shown as U+FFFD and does not stop the rest
        let mut out = Utf8Out { pending: Vec::new() };
        assert_eq!(out.push(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
    }
}
