//! `smelt eval`: a GPT's next-token loss, perplexity and bits per byte on a text file or a
//! prepared corpus split: how well an imported GPT-2, a job's result or one of its checkpoints
//! predicts data it did not train on.
//!
//! The tokens (the text encoded with the model's own tokenizer, or the corpus split's stream,
//! which must have been made with that tokenizer) are cut into non-overlapping windows of
//! `--seq` predictions: window i reads tokens [i T, i T + T + 1), so its last token starts the
//! next window, and a tail shorter than a window is left out. The loss is the mean over every
//! predicted token (all windows weigh alike); bits per byte divide its total by the UTF-8 bytes
//! the predicted tokens stand for, which compares models across tokenizers.
//!
//! A byte or char model trained on a `data.text` has no end-of-text id, while a corpus made with
//! its tokenizer ends each document with one (just past the tokenizer's ids): such a corpus's
//! split is evaluated as its documents joined without them, as the model was trained, read in
//! order.

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use smelt_corpus::{CorpusReader, ReaderOptions, Split, Tokenizer};
use smelt_engine::backend::Backend;
use smelt_engine::model::{Gpt, GptConfig};
use smelt_worker::DeviceRequest;
use tracing::info;

use crate::local_device::{self, OnBackend};

#[derive(Args, Debug)]
// one of the three sources is required: clap's error names all three
#[command(group(clap::ArgGroup::new("source").required(true).args(["text", "corpus", "choices"])))]
pub struct EvalArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// The GPT: a model.safetensors (or a directory holding one), a checkpoint, or a job id.
    #[arg(long)]
    pub model: String,
    /// A UTF-8 text file, encoded with the model's tokenizer.
    #[arg(long, conflicts_with_all = ["corpus", "choices"])]
    pub text: Option<String>,
    /// A corpus prepared by `smelt corpus prepare` (a path or an object-store URI).
    #[arg(long, conflicts_with = "choices")]
    pub corpus: Option<String>,
    /// Multiple-choice accuracy instead of the loss: JSON lines (a path or an object-store URI)
    /// in HellaSwag's fields (`ctx`, `endings`, `label`, e.g. hellaswag_val.jsonl); reports acc
    /// (lowest summed loss of an ending) and acc_norm (lowest mean loss per token: llm.c's
    /// figure, not lm-evaluation-harness's, which divides by characters).
    #[arg(long)]
    pub choices: Option<String>,
    /// With --choices: score at most this many examples from the start (0: all).
    #[arg(long, default_value_t = 0, requires = "choices")]
    pub max_examples: usize,
    /// With --choices: write each example's losses and picks here as JSON lines.
    #[arg(long, requires = "choices")]
    pub log_samples: Option<String>,
    /// The corpus split: val (held out, the default) or train.
    #[arg(long)]
    pub split: Option<String>,
    /// Predictions per window (default: the model's block size).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Windows per forward pass (--text, --corpus).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Evaluate at most this many tokens from the start (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where a job id's checkpoints and final weights are.
    #[arg(long, env = "SMELT_STORE", default_value = ".smelt")]
    pub store: String,
    #[command(flatten)]
    pub coordinator: crate::job_model::JobCoordinator,
    /// Where the model runs: auto (GPU 0 when usable, else the CPU), cpu, or cuda:N (a binary
    /// built with --features cuda; bf16 matmuls, so the figures differ from the CPU's in the
    /// last digits).
    #[arg(long, default_value = "auto", value_parser = local_device::parse)]
    pub device: DeviceRequest,
}

/// UTF-8 bytes token `id` stands for (0 for end-of-text and ids beyond the tokenizer's).
fn token_bytes(tokenizer: &Tokenizer, id: u32) -> u64 {
    if id as usize >= tokenizer.vocab_size() || (matches!(tokenizer, Tokenizer::Gpt2) && id == tokenizer.eot_token()) {
        return 0;
    }
    match tokenizer {
        Tokenizer::Byte => 1,
        Tokenizer::Char { chars } => chars[id as usize].len_utf8() as u64,
        Tokenizer::Gpt2 => smelt_corpus::gpt2::core().decode_bytes(&[id]).map(|b| b.len() as u64).unwrap_or(0),
    }
}

/// The evaluated tokens: a text's, encoded in memory, or a corpus split's first `n`, read by
/// ranges as the windows need them.
enum Tokens {
    Memory(Vec<u32>),
    Corpus { reader: CorpusReader, n: u64 },
    /// A byte or char corpus's split for a model trained on a `data.text`, whose vocabulary has
    /// no end-of-text id (the corpus's is one past the tokenizer's ids): its documents joined
    /// without them, as such a model was trained. `n` tokens remain; read in order.
    /// `read`: raw tokens read at a time ([`EOT_FREE_READ`]).
    CorpusWithoutEot { reader: CorpusReader, n: u64, eot: u32, read: u64, stream: std::sync::Mutex<EotFreeStream> },
}

/// Where [`Tokens::CorpusWithoutEot`] has read to: the end-of-text-free tokens from `first`
/// on, and the position in the split's raw stream the next read starts at.
#[derive(Default)]
struct EotFreeStream {
    first: u64,
    buffered: std::collections::VecDeque<u32>,
    raw_next: u64,
}

/// Raw tokens read at a time from a corpus whose end-of-text ids are left out.
const EOT_FREE_READ: u64 = 1 << 16;

impl Tokens {
    fn len(&self) -> u64 {
        match self {
            Tokens::Memory(v) => v.len() as u64,
            Tokens::Corpus { n, .. } | Tokens::CorpusWithoutEot { n, .. } => *n,
        }
    }

    /// (inputs, targets) of windows `windows` of `t` predictions: window i reads tokens
    /// [i t, i t + t + 1), which is a corpus's sequence i of length t, so a corpus serves them
    /// from its reader's cache (filled ahead by [`Tokens::prefetch`]).
    fn windows(&self, t: usize, windows: std::ops::Range<usize>) -> Result<(Vec<u32>, Vec<u32>)> {
        match self {
            Tokens::Memory(v) => {
                let (mut inputs, mut targets) = (Vec::with_capacity(windows.len() * t), Vec::with_capacity(windows.len() * t));
                for w in windows {
                    inputs.extend_from_slice(&v[w * t..w * t + t]);
                    targets.extend_from_slice(&v[w * t + 1..w * t + t + 1]);
                }
                Ok((inputs, targets))
            }
            Tokens::Corpus { reader, .. } => {
                let ids: Vec<u64> = windows.map(|w| w as u64).collect();
                Ok(reader.batch(t, &ids)?)
            }
            Tokens::CorpusWithoutEot { reader, eot, read, stream, .. } => {
                let mut s = stream.lock().expect("only the eval loop reads the stream");
                let (start, end) = ((windows.start * t) as u64, (windows.end * t + 1) as u64);
                if start < s.first {
                    bail!("windows are read in order here: window {} was asked for after the stream had passed it", windows.start);
                }
                // let go of what earlier windows used, then read on until these windows are in
                let drop = ((start - s.first) as usize).min(s.buffered.len());
                s.buffered.drain(..drop);
                s.first += drop as u64;
                while s.first + (s.buffered.len() as u64) < end {
                    let raw_n = reader.n_tokens();
                    if s.raw_next >= raw_n {
                        bail!("{}: the stream ended before window {} (its documents' end-of-text ids miscounted)", reader.uri(), windows.end - 1);
                    }
                    let to = (s.raw_next + read).min(raw_n);
                    let raw = reader.tokens(s.raw_next..to)?;
                    s.raw_next = to;
                    s.buffered.extend(raw.into_iter().filter(|id| id != eot));
                }
                let at = (start - s.first) as usize;
                let (mut inputs, mut targets) = (Vec::with_capacity(windows.len() * t), Vec::with_capacity(windows.len() * t));
                for w in 0..windows.len() {
                    inputs.extend(s.buffered.range(at + w * t..at + w * t + t));
                    targets.extend(s.buffered.range(at + w * t + 1..at + w * t + t + 1));
                }
                Ok((inputs, targets))
            }
        }
    }

    /// Starts fetching windows that come next (a no-op for a text in memory).
    fn prefetch(&self, t: usize, windows: std::ops::Range<usize>) {
        if let Tokens::Corpus { reader, .. } = self {
            reader.prefetch(t, windows.map(|w| w as u64));
        }
    }
}

pub fn run(a: EvalArgs) -> Result<()> {
    a.coordinator.install();
    if a.split.is_some() && a.corpus.is_none() {
        bail!("--split chooses a split of --corpus; a --text is evaluated whole, and --choices example by example");
    }
    if a.choices.is_none() && (a.log_samples.is_some() || a.max_examples != 0) {
        // Checked here as well as by clap's `requires`, which lets an explicit option through.
        bail!("--log-samples and --max-examples are for --choices (multiple-choice examples); a --text or --corpus is scored by windows (--seq, --max-tokens)");
    }
    let (saved, file) = crate::cmd_export::read_gpt(&a.model, &a.store, "reading the model", "smelt eval measures a GPT's next-token loss")?;
    let (cfg, tokenizer) = (saved.config.clone(), saved.tokenizer.clone());
    if let Some(path) = &a.choices {
        if a.seq.is_some() || a.max_tokens != 0 {
            bail!("--seq and --max-tokens cut a text or corpus into windows; --choices scores whole examples (--max-examples)");
        }
        let body = crate::eval_choices::ChoiceEval {
            cfg, params: &saved.params, tokenizer: &tokenizer, file: &file, path, max: a.max_examples, json: a.json, log: a.log_samples.as_deref(),
        };
        return local_device::run(a.device, body);
    }
    let t = a.seq.unwrap_or(cfg.block_size);
    if t == 0 || t > cfg.block_size {
        bail!("--seq {t}: must be in 1..={} (the model's block size)", cfg.block_size);
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }

    // Windows are read as they are evaluated: a corpus split is never held whole.
    let limit = match a.max_tokens {
        0 => u64::MAX,
        max => max.saturating_add(1),
    };
    let (source, data) = match (&a.text, &a.corpus) {
        (Some(path), _) => {
            let text = smelt_corpus::input::read_text_file(std::path::Path::new(path)).with_context(|| format!("reading --text {path}"))?;
            let mut ids = tokenizer.encode(&text).with_context(|| format!("--text {path}: not in the model's {} vocabulary", tokenizer.kind()))?;
            ids.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            (path.clone(), Tokens::Memory(ids))
        }
        (None, Some(uri)) => {
            let name = a.split.as_deref().unwrap_or("val");
            let split = match name {
                "val" => Split::Val,
                "train" => Split::Train,
                other => bail!("--split {other:?}: val or train"),
            };
            let by_default = if a.split.is_none() { " (its val split, the default; --split train reads the other)" } else { "" };
            let reader =
                CorpusReader::open_with(uri, ReaderOptions { split, ..Default::default() }).with_context(|| format!("opening --corpus {uri}{by_default}"))?;
            let m = reader.manifest();
            if m.tokenizer != tokenizer {
                if let Some(how) = m.tokenizer.char_difference("the corpus", &tokenizer, "the model") {
                    bail!("--corpus {uri}: tokenized with another character vocabulary than the model's: {how}");
                }
                bail!("--corpus {uri}: tokenized with {}, but the model uses {}", m.tokenizer.kind(), tokenizer.kind());
            }
            // A byte or char model trained on a `data.text` has no end-of-text id; such a corpus
            // has one, just past the tokenizer's ids. Its documents are evaluated joined without
            // it, as the model was trained.
            let lacks_eot = !matches!(tokenizer, Tokenizer::Gpt2)
                && cfg.vocab_size == tokenizer.vocab_size()
                && m.eot_token as usize == cfg.vocab_size
                && m.vocab_size as usize == cfg.vocab_size + 1;
            if m.vocab_size as usize > cfg.vocab_size && !lacks_eot {
                bail!("--corpus {uri}: {} token ids, more than the model's {}", m.vocab_size, cfg.vocab_size);
            }
            let source = format!("{uri} ({name})");
            if lacks_eot {
                let docs = match split {
                    Split::Val => m.val.documents,
                    Split::Train => m.train.documents,
                };
                let n = reader.n_tokens().saturating_sub(docs).min(limit);
                info!(
                    corpus = %uri,
                    end_of_text_ids = docs,
                    "the model has no end-of-text id (it was trained on a text): the split's documents are evaluated joined without theirs"
                );
                let eot = m.eot_token;
                (source, Tokens::CorpusWithoutEot { reader, n, eot, read: EOT_FREE_READ, stream: Default::default() })
            } else {
                let n = reader.n_tokens().min(limit);
                (source, Tokens::Corpus { reader, n })
            }
        }
        (None, None) => unreachable!("clap requires --text or --corpus"),
    };
    let windows = usize::try_from(data.len().saturating_sub(1) / t as u64).unwrap_or(usize::MAX);
    if a.max_tokens != 0 && a.max_tokens < t as u64 {
        bail!("--max-tokens {}: fewer predictions than one window of --seq {t}", a.max_tokens);
    }
    if windows == 0 {
        bail!("{source}: {} tokens, fewer than one window of --seq {t} predictions needs ({})", data.len(), t + 1);
    }

    let body = WindowEval { cfg, params: &saved.params, tokenizer: &tokenizer, file: &file, source: &source, data: &data, windows, t, batch: a.batch, json: a.json };
    local_device::run(a.device, body)
}

/// The loss over `windows` windows of `t` predictions of `data`, on whichever backend
/// `--device` gives.
struct WindowEval<'a> {
    cfg: GptConfig,
    params: &'a [f32],
    tokenizer: &'a Tokenizer,
    file: &'a str,
    source: &'a str,
    data: &'a Tokens,
    windows: usize,
    t: usize,
    batch: usize,
    json: bool,
}

impl OnBackend for WindowEval<'_> {
    type Out = ();

    fn run<B: Backend>(self, be: B) -> Result<()> {
        let WindowEval { cfg, params, tokenizer, file, source, data, windows, t, batch, json } = self;
        let mut model = Gpt::from_params(be, cfg, params)?;
        let started = Instant::now();
        let (mut nats, mut bytes, mut done) = (0f64, 0u64, 0usize);
        let mut next_report = windows / 10;
        while done < windows {
            let b = batch.min(windows - done);
            data.prefetch(t, done + b..(done + 2 * b).min(windows));
            let (inputs, targets) = data.windows(t, done..done + b)?;
            let loss = model.forward(&inputs, Some(&targets), b, t)?.ok_or_else(|| anyhow!("no loss: targets were given"))?;
            if !loss.is_finite() {
                bail!("{source}: the loss of windows {done}..{} is {loss}", done + b);
            }
            nats += loss as f64 * (b * t) as f64;
            bytes += targets.iter().map(|&id| token_bytes(tokenizer, id)).sum::<u64>();
            done += b;
            if done >= next_report && done < windows {
                let secs = started.elapsed().as_secs_f64();
                info!(windows = done, of = windows, loss = nats / (done * t) as f64, tokens_per_s = (done * t) as f64 / secs.max(1e-9), "evaluating");
                next_report = done + windows / 10;
            }
        }
        let n = (windows * t) as f64;
        let loss = nats / n;
        // the tail after the last whole window, which no window predicts (said, not dropped silently)
        let left_out = data.len().saturating_sub(1).saturating_sub((windows * t) as u64);
        let bits_per_byte = (bytes > 0).then(|| nats / std::f64::consts::LN_2 / bytes as f64);
        if json {
            let v = serde_json::json!({
                "model": file, "data": source, "tokenizer": tokenizer.kind(), "seq_len": t, "windows": windows,
                "tokens": windows * t, "left_out_tokens": left_out, "loss": loss, "perplexity": loss.exp(), "bits_per_byte": bits_per_byte,
            });
            println!("{v}");
        } else {
            let bpb = bits_per_byte.map(|b| format!(", {b:.4} bits per byte")).unwrap_or_default();
            let tail = if left_out > 0 { format!("; the last {left_out} token{}, less than a window, left out", if left_out == 1 { "" } else { "s" }) } else { String::new() };
            println!(
                "{}: loss {loss:.4}, perplexity {:.3}{bpb} over {} tokens of {source} ({windows} window{} of {t}{tail})",
                file,
                loss.exp(),
                windows * t,
                if windows == 1 { "" } else { "s" }
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use smelt_corpus::{prepare, CorpusReader, NoProgress, PrepareOptions, ReaderOptions, Split, TxtDocs, ValSplit};

    use super::Tokens;

    /// A char corpus of three documents in shards of 64 tokens, read 7 raw tokens at a time
    /// without its end-of-text ids, gives the windows of the documents' text joined, whichever
    /// batches the windows are asked for in.
    #[test]
    fn a_corpus_without_its_end_of_text_ids_is_its_documents_joined() {
        let dir = tempfile::tempdir().unwrap();
        let docs = ["the quick brown fox jumps over the lazy dog. ", "pack my box with five dozen liquor jugs!\n", "how vexingly quick daft zebras jump"];
        for (i, d) in docs.iter().enumerate() {
            std::fs::write(dir.path().join(format!("{i}.txt")), d.repeat(3)).unwrap();
        }
        let out = dir.path().join("corpus");
        let opts = PrepareOptions {
            inputs: vec![dir.path().display().to_string()],
            tokenizer: "char".into(),
            out: out.display().to_string(),
            txt_docs: TxtDocs::File,
            shard_tokens: 64,
            val: ValSplit::None,
            ..Default::default()
        };
        prepare(&opts, &NoProgress).unwrap();
        let reader = CorpusReader::open_with(out.to_str().unwrap(), ReaderOptions { split: Split::Train, ..Default::default() }).unwrap();
        let m = reader.manifest().clone();
        assert_eq!(m.train.documents, 3);
        let joined: String = docs.iter().map(|d| d.repeat(3)).collect();
        let expected = Tokens::Memory(m.tokenizer.encode(&joined).unwrap());
        let n = reader.n_tokens() - 3;
        assert_eq!(n, expected.len());
        let eot_free = Tokens::CorpusWithoutEot { reader, n, eot: m.eot_token, read: 7, stream: Default::default() };
        let t = 10;
        let windows = ((n - 1) / t as u64) as usize;
        let mut at = 0;
        for b in [1, 3, 2, 5, 1].into_iter().cycle() {
            if at == windows {
                break;
            }
            let b = b.min(windows - at);
            assert_eq!(eot_free.windows(t, at..at + b).unwrap(), expected.windows(t, at..at + b).unwrap(), "windows {at}..{}", at + b);
            at += b;
        }
        // read in order only
        assert!(eot_free.windows(t, 0..1).is_err());
    }
}
