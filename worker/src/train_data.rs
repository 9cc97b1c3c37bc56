//! The training data of a GPT pretraining job and the order it is drawn in: a text file every
//! worker tokenizes the same way, a prepared corpus read by ranged GETs, or a mixture of
//! corpora in fixed proportions (`[[data.mix]]`). Either way sample `k` of the job's stream is
//! a pure function of the spec, so a resume from a step is exact with any world size.

use anyhow::{anyhow, bail, Context, Result};
use smelt_corpus::mixture::MixtureOrder;
use smelt_corpus::sample_order::{SampleOrder, Sequences};
use smelt_corpus::{CorpusReader, ReaderOptions, Split, Tokenizer};
use smelt_jobspec::JobSpec;

use crate::init_from::{self, Parent};

/// Validation tokens kept in memory, at most this many from a corpus's validation split (a
/// mixture's sources share this between them).
const MAX_VAL_TOKENS: u64 = 1 << 20;

/// Sequence i is tokens [i*T, i*T + T + 1) of the text or of the corpus's stream; a mixture's
/// samples are ids naming the source and its sequence (`MixtureOrder::encode`).
pub(crate) enum TrainData {
    Text { tokens: Vec<u32> },
    Corpus { reader: CorpusReader },
    Mix { readers: Vec<CorpusReader> },
}

/// Held-out tokens of one source, evaluated on their own.
pub(crate) struct ValSet {
    /// The source as the spec names it (`data.text`, a corpus URI).
    pub name: String,
    /// Its weight in the job's validation loss (a mixture's: the source's weight).
    pub weight: f64,
    pub tokens: Vec<u32>,
}

/// The job's validation loss: each source's held-out tokens evaluated on their own (at least
/// one window of `seq` predictions each; a source with fewer is left out), combined by the
/// sources' weights, so a mixture's validation loss weighs its sources as training does.
/// Returns the combined loss and each evaluated source's, or None when no source has a window.
pub(crate) fn evaluate_sets(
    sets: &[ValSet],
    seq: usize,
    mut evaluate: impl FnMut(&[u32]) -> Result<f32>,
) -> Result<Option<(f32, Vec<(&str, f32)>)>> {
    let (mut sum, mut weights, mut each) = (0.0f64, 0.0f64, Vec::new());
    for s in sets.iter().filter(|s| s.tokens.len() > seq) {
        let loss = evaluate(&s.tokens)?;
        sum += s.weight * loss as f64;
        weights += s.weight;
        each.push((s.name.as_str(), loss));
    }
    Ok((weights > 0.0).then(|| ((sum / weights) as f32, each)))
}

/// Which sequence each sample of the job's stream is.
pub(crate) enum Order {
    Single(SampleOrder),
    Mix(MixtureOrder),
}

impl Order {
    /// Sample `k`'s sequence (a mixture: its id).
    pub(crate) fn sequence_at(&self, k: u64) -> u64 {
        match self {
            Order::Single(o) => o.sequence_at(k),
            Order::Mix(m) => m.sequence_at(k),
        }
    }
}

impl TrainData {
    /// The sample order under the spec's seed (`global_batch` fixes a mixture's steps).
    pub(crate) fn order(&self, spec: &JobSpec, seq: usize) -> Result<Order> {
        let count = |n: u64| -> Result<u64> {
            if n == 0 {
                bail!("the job's training data holds no sequence of {} tokens", seq + 1);
            }
            Ok(n)
        };
        Ok(match self {
            TrainData::Text { tokens } => Order::Single(SampleOrder::new(count(Sequences::new(tokens, seq).count())?, spec.seed)),
            TrainData::Corpus { reader } => Order::Single(SampleOrder::new(count(reader.n_sequences(seq))?, spec.seed)),
            TrainData::Mix { readers } => {
                let mut n = Vec::with_capacity(readers.len());
                for (i, r) in readers.iter().enumerate() {
                    n.push(count(r.n_sequences(seq)).with_context(|| format!("data.mix[{i}].corpus {}", r.uri()))?);
                }
                let weights: Vec<f64> = spec.data.mix.iter().map(|m| m.weight).collect();
                Order::Mix(MixtureOrder::new(&n, &weights, spec.seed, spec.train.global_batch as u64).map_err(|e| anyhow!("data.mix: {e}"))?)
            }
        })
    }

    /// (inputs, targets) of the given sequences, back to back.
    pub(crate) fn batch(&self, seq: usize, indices: &[u64]) -> Result<(Vec<u32>, Vec<u32>)> {
        match self {
            TrainData::Text { tokens } => Ok(Sequences::new(tokens, seq).batch(indices.iter().copied())),
            TrainData::Corpus { reader } => Ok(reader.batch(seq, indices)?),
            TrainData::Mix { readers } => {
                // every source's sequences asked for at once (the reader fetches them
                // concurrently), then laid out in the order given
                let mut by_source: Vec<Vec<u64>> = vec![Vec::new(); readers.len()];
                let place: Vec<(usize, usize)> = indices
                    .iter()
                    .map(|&id| {
                        let (j, local) = MixtureOrder::decode(id);
                        by_source[j].push(local);
                        (j, by_source[j].len() - 1)
                    })
                    .collect();
                let mut fetched = Vec::with_capacity(readers.len());
                for (j, locals) in by_source.iter().enumerate() {
                    fetched.push(if locals.is_empty() { (Vec::new(), Vec::new()) } else { readers[j].batch(seq, locals)? });
                }
                let (mut inputs, mut targets) = (Vec::with_capacity(indices.len() * seq), Vec::with_capacity(indices.len() * seq));
                for (j, i) in place {
                    inputs.extend_from_slice(&fetched[j].0[i * seq..(i + 1) * seq]);
                    targets.extend_from_slice(&fetched[j].1[i * seq..(i + 1) * seq]);
                }
                Ok((inputs, targets))
            }
        }
    }

    /// Starts fetching the sequences of a coming step (a no-op for in-memory text).
    pub(crate) fn prefetch(&self, seq: usize, indices: &[u64]) {
        match self {
            TrainData::Text { .. } => {}
            TrainData::Corpus { reader } => reader.prefetch(seq, indices.iter().copied()),
            TrainData::Mix { readers } => {
                for (j, r) in readers.iter().enumerate() {
                    r.prefetch(seq, indices.iter().map(|&id| MixtureOrder::decode(id)).filter(|(s, _)| *s == j).map(|(_, l)| l));
                }
            }
        }
    }

    /// The corpus readers, for their loading statistics.
    pub(crate) fn readers(&self) -> Vec<&CorpusReader> {
        match self {
            TrainData::Text { .. } => Vec::new(),
            TrainData::Corpus { reader } => vec![reader],
            TrainData::Mix { readers } => readers.iter().collect(),
        }
    }
}

/// Opens the job's data: (tokenizer, model vocabulary, training data, validation sets).
/// With a `parent` (`model.init_from`), the data is checked against its tokenizer and a text
/// is encoded with it.
///
/// A corpus on a remote store too large to hold in memory is read through the shard cache
/// `<out_dir>/cache/corpora` (see [`ReaderOptions::disk_cache`]).
pub(crate) fn load_data(spec: &JobSpec, out_dir: &std::path::Path, parent: Option<&Parent>) -> Result<(Tokenizer, usize, TrainData, Vec<ValSet>)> {
    let open = |uri: &str, field: &str, val_budget: u64| -> Result<(CorpusReader, Vec<u32>)> {
        let o = ReaderOptions { disk_cache: Some(out_dir.join("cache").join("corpora")), ..Default::default() };
        let reader = CorpusReader::open_with(uri, o).with_context(|| format!("opening {field} {uri}"))?;
        let m = reader.manifest();
        if let Some(p) = parent {
            init_from::check_corpus(field, uri, &m.tokenizer, m.vocab_size as usize, p)?;
        }
        let val = if m.val.tokens > 0 {
            let v = CorpusReader::open_with(uri, ReaderOptions { split: Split::Val, ..Default::default() })?;
            v.tokens(0..v.n_tokens().min(val_budget))?
        } else {
            Vec::new()
        };
        Ok((reader, val))
    };
    if let Some(uri) = &spec.data.corpus {
        let (reader, val) = open(uri, "data.corpus", MAX_VAL_TOKENS)?;
        if val.is_empty() && spec.train.eval_interval > 0 {
            tracing::warn!(
                target: smelt_proto::JOB_WARNING_TARGET,
                corpus = %uri,
                "data.corpus has no validation split, so train.eval_interval = {} measures nothing: prepare it with --val-fraction or --val-docs",
                spec.train.eval_interval
            );
        }
        let m = reader.manifest().clone();
        let val = vec![ValSet { name: uri.clone(), weight: 1.0, tokens: val }];
        return Ok((m.tokenizer.clone(), m.vocab_size as usize, TrainData::Corpus { reader }, val));
    }
    if !spec.data.mix.is_empty() {
        // Every source's validation tokens, each its share of the budget, evaluated on its own.
        let budget = MAX_VAL_TOKENS / spec.data.mix.len() as u64;
        let (mut readers, mut val) = (Vec::new(), Vec::new());
        for (i, src) in spec.data.mix.iter().enumerate() {
            let (reader, v) = open(&src.corpus, &format!("data.mix[{i}].corpus"), budget)?;
            if let Some(first) = readers.first().map(|r: &CorpusReader| r.manifest()) {
                let m = reader.manifest();
                if m.tokenizer != first.tokenizer {
                    if let Some(how) = m.tokenizer.char_difference("this corpus", &first.tokenizer, "the first") {
                        bail!(
                            "data.mix[{i}].corpus {}: tokenized with another character vocabulary than data.mix[0].corpus {} ({how}): \
                             a mixture's sources must share one tokenizer",
                            src.corpus,
                            spec.data.mix[0].corpus,
                        );
                    }
                    bail!(
                        "data.mix[{i}].corpus {}: tokenized with {}, data.mix[0].corpus {} with {}: a mixture's sources must share one tokenizer",
                        src.corpus,
                        m.tokenizer.kind(),
                        spec.data.mix[0].corpus,
                        first.tokenizer.kind(),
                    );
                }
            }
            if v.is_empty() {
                tracing::warn!(target: smelt_proto::JOB_WARNING_TARGET, corpus = %src.corpus, "data.mix[{i}]: the corpus has no validation split; the validation loss leaves it out");
            }
            val.push(ValSet { name: src.corpus.clone(), weight: src.weight, tokens: v });
            readers.push(reader);
        }
        let tokenizer = readers[0].manifest().tokenizer.clone();
        let vocab = readers.iter().map(|r| r.manifest().vocab_size as usize).max().unwrap_or(0);
        return Ok((tokenizer, vocab, TrainData::Mix { readers }, val));
    }
    let path = spec.data.text.as_deref().unwrap_or_default();
    let text = smelt_corpus::input::read_text_file(path).with_context(|| crate::train_data::text_read_context(path))?;
    let tokenizer = match parent {
        Some(p) => {
            init_from::check_text_tokenizer(spec, p)?;
            p.tokenizer.clone()
        }
        None => Tokenizer::fit(&spec.data.tokenizer, &text)?,
    };
    let mut ids = tokenizer.encode(&text).with_context(|| format!("tokenizing data.text {path}"))?;
    let split = ((ids.len() as f64) * (1.0 - spec.data.val_fraction)) as usize;
    let val = ids.split_off(split);
    // evaluation reads whole windows of seq_len + 1 tokens: a shorter tail gives none
    if spec.train.eval_interval > 0 && val.len() <= spec.train.seq_len {
        tracing::warn!(
            target: smelt_proto::JOB_WARNING_TARGET,
            "data.text {path}: its validation tail (data.val_fraction = {}) is {} tokens, shorter than one window of train.seq_len + 1 = {}, so train.eval_interval = {} measures nothing: raise data.val_fraction or lower train.seq_len",
            spec.data.val_fraction,
            val.len(),
            spec.train.seq_len + 1,
            spec.train.eval_interval
        );
    }
    let vocab = tokenizer.vocab_size();
    Ok((tokenizer, vocab, TrainData::Text { tokens: ids }, vec![ValSet { name: path.to_string(), weight: 1.0, tokens: val }]))
}

/// What a failed read of `data.text` says: a relative path is the worker's, on the worker's
/// machine (not the spec file's, nor the submitting machine's).
pub(crate) fn text_read_context(path: &str) -> String {
    crate::finetune_data::local_read_context(&format!("data.text {path}"), path, "prepare a corpus in an object store")
}
