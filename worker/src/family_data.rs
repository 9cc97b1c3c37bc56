//! Data of a BERT or T5 job: the text windows (a text file or a prepared corpus, read as GPT
//! jobs read them) and what each objective makes of a window. Every random choice of a sample
//! (masking, next-sentence partner, spans) comes from a generator seeded by (job seed, step,
//! the sample's global index in the step stream), so a batch is the same on any world size and
//! in any rerun. A BERT training batch also carries the seed of its dropout masks, drawn from
//! (job seed, step, the micro-batch's first global index); evaluation batches (`EVAL_STEP`) run
//! without dropout.

use anyhow::{anyhow, Context, Result};
use smelt_corpus::sample_order::Sequences;
use smelt_corpus::{CorpusReader, ReaderOptions, Split, Tokenizer};
use smelt_engine::model::objectives::{corrupt_spans, mask_tokens, MaskingConfig, SpanCorruptionConfig};
use smelt_engine::model::{BertBatch, T5Batch};
use smelt_engine::rng::Rng;
use smelt_jobspec::{BertObjective, BertSpecials, ContrastiveViews, FamilyConfig, JobSpec};

/// Validation tokens kept in memory, at most this many from a corpus's validation split.
const MAX_VAL_TOKENS: u64 = 1 << 20;

/// Where windows come from: window i of length L is tokens [i*L, i*L + L) of the stream.
pub enum Source {
    Text(Vec<u32>),
    Corpus(CorpusReader),
}

impl Source {
    pub fn n_windows(&self, len: usize) -> u64 {
        match self {
            Source::Text(tokens) => Sequences::new(tokens, len).count(),
            Source::Corpus(r) => r.n_sequences(len),
        }
    }

    /// The windows of the given indices. (A sequence of the shared reader has L + 1 tokens,
    /// inputs and shifted targets; a window is its inputs.)
    pub fn windows(&self, len: usize, indices: &[u64]) -> Result<Vec<Vec<u32>>> {
        let inputs = match self {
            Source::Text(tokens) => Sequences::new(tokens, len).batch(indices.iter().copied()).0,
            Source::Corpus(r) => r.batch(len, indices)?.0,
        };
        Ok(inputs.chunks(len).map(<[u32]>::to_vec).collect())
    }

    pub fn prefetch(&self, len: usize, indices: &[u64]) {
        if let Source::Corpus(r) = self {
            r.prefetch(len, indices.iter().copied());
        }
    }
}

/// A job's data: tokenizer, its vocabulary (the corpus's, with end-of-text, for a corpus),
/// training windows and validation tokens.
pub struct FamilyData {
    pub tokenizer: Tokenizer,
    pub base_vocab: usize,
    pub train: Source,
    pub val: Source,
}

/// A large remote corpus is read through the shard cache `<out_dir>/cache/corpora`.
pub fn open(spec: &JobSpec, out_dir: &std::path::Path) -> Result<FamilyData> {
    if let Some(uri) = &spec.data.corpus {
        let o = ReaderOptions { disk_cache: Some(out_dir.join("cache").join("corpora")), ..Default::default() };
        let reader = CorpusReader::open_with(uri, o).with_context(|| format!("opening data.corpus {uri}"))?;
        let m = reader.manifest().clone();
        let val = if m.val.tokens > 0 {
            let v = CorpusReader::open_with(uri, ReaderOptions { split: Split::Val, ..Default::default() })?;
            v.tokens(0..v.n_tokens().min(MAX_VAL_TOKENS))?
        } else {
            Vec::new()
        };
        return Ok(FamilyData { tokenizer: m.tokenizer.clone(), base_vocab: m.vocab_size as usize, train: Source::Corpus(reader), val: Source::Text(val) });
    }
    let path = spec.data.text.as_deref().unwrap_or_default();
    let text = smelt_corpus::input::read_text_file(path).with_context(|| crate::train_data::text_read_context(path))?;
    let tokenizer = Tokenizer::fit(&spec.data.tokenizer, &text)?;
    let mut ids = tokenizer.encode(&text)?;
    let val = ids.split_off(((ids.len() as f64) * (1.0 - spec.data.val_fraction)) as usize);
    let base_vocab = tokenizer.vocab_size();
    Ok(FamilyData { tokenizer, base_vocab, train: Source::Text(ids), val: Source::Text(val) })
}

/// The step of evaluation batches: `read_batch` builds them as evaluation passes (no dropout).
pub const EVAL_STEP: u64 = u64::MAX;

/// The generator of one sample: (job seed, step, global sample index).
pub fn sample_rng(seed: u64, step: u64, k: u64) -> Rng {
    Rng::derive(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k.rotate_left(32), "family-sample")
}

/// The seed of a micro-batch's dropout masks: (job seed, step, global index of its first
/// sample), so it is the same whatever the world size and in any rerun.
pub fn dropout_seed(seed: u64, step: u64, first: u64) -> u64 {
    Rng::derive(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ first.rotate_left(32), "family-dropout").next_u64()
}

/// What an objective makes of windows.
#[derive(Clone, Debug)]
pub enum Objective {
    Bert { objective: BertObjective, masking: MaskingConfig, specials: BertSpecials, seq_len: usize, views: ContrastiveViews },
    T5 { span: SpanCorruptionConfig, pad: u32, seq_len: usize },
}

/// One micro-batch for either model, and the tokens it holds (for throughput).
pub enum FamilyBatch {
    Bert(BertBatch),
    T5(T5Batch),
}

/// A sample's draws made before its window is read: a next-sentence partner (the window whose
/// second half replaces its own; None: the true continuation).
pub struct Plan {
    pub rng: Rng,
    pub partner: Option<u64>,
}

impl Objective {
    pub fn new(fam: &FamilyConfig, seq_len: usize) -> Self {
        match fam {
            FamilyConfig::Bert { config, objective, mask_prob, specials, views } => {
                let s = *specials;
                let mut masking = MaskingConfig::bert(config.vocab_size as u32, s.mask, vec![s.pad, s.cls, s.sep]);
                masking.mask_prob = *mask_prob;
                Objective::Bert { objective: *objective, masking, specials: s, seq_len, views: *views }
            }
            FamilyConfig::T5 { span, specials, .. } => Objective::T5 { span: span.clone(), pad: specials.pad, seq_len },
        }
    }

    /// Text tokens a sample reads: the sequence length less the special tokens around them.
    pub fn window_len(&self) -> usize {
        match self {
            Objective::Bert { objective: BertObjective::MlmNsp, seq_len, .. } => seq_len - 3,
            Objective::Bert { seq_len, .. } => seq_len - 2,
            Objective::T5 { seq_len, .. } => *seq_len,
        }
    }

    /// The fewest windows a batch may hold: in-batch negatives need a second pair.
    pub fn min_batch(&self) -> usize {
        match self {
            Objective::Bert { objective: BertObjective::Contrastive, .. } => 2,
            _ => 1,
        }
    }

    /// Draws what a sample needs before reading (`n_windows`: the windows partners come from).
    pub fn plan(&self, mut rng: Rng, own: u64, n_windows: u64) -> Plan {
        let partner = match self {
            Objective::Bert { objective: BertObjective::MlmNsp, .. } if n_windows > 1 && rng.below(2) == 1 => {
                // any other window: its second half does not continue this one's first half
                let p = rng.below(n_windows - 1);
                Some(if p >= own { p + 1 } else { p })
            }
            _ => None,
        };
        Plan { rng, partner }
    }

    /// The batch of `windows` (each `window_len` tokens), with the partners' windows of the
    /// plans that have one, in order.
    pub fn batch(&self, windows: &[Vec<u32>], plans: Vec<Plan>, partners: &[Vec<u32>]) -> Result<FamilyBatch> {
        let b = windows.len();
        let mut partners = partners.iter();
        match self {
            Objective::Bert { objective, masking, specials: s, seq_len, views } => {
                let t = *seq_len;
                let mut x = BertBatch { batch: b, seq_len: t, ..Default::default() };
                let (mut mlm, mut nsp, mut seg) = (Vec::new(), Vec::new(), Vec::new());
                let mut views_b = Vec::new();
                for (w, mut plan) in windows.iter().zip(plans) {
                    let mut seq = vec![s.cls];
                    match objective {
                        BertObjective::MlmNsp => {
                            // [CLS] a [SEP] b [SEP]: b is the window's second half, or a partner's
                            let half = w.len() / 2;
                            seq.extend(&w[..half]);
                            seq.push(s.sep);
                            let second = match plan.partner {
                                Some(_) => &partners.next().ok_or_else(|| anyhow!("a next-sentence partner window is missing"))?[half..],
                                None => &w[half..],
                            };
                            seq.extend(second);
                            seq.push(s.sep);
                            seg.extend((0..t).map(|i| (i > half + 1) as u32));
                            nsp.push(plan.partner.is_some() as u32);
                        }
                        _ => {
                            seq.extend(w);
                            seq.push(s.sep);
                        }
                    }
                    debug_assert_eq!(seq.len(), t);
                    match (objective, views) {
                        (BertObjective::Contrastive, ContrastiveViews::Dropout) => {
                            // the window twice, unmasked: the model's dropout makes the views
                            x.tokens.extend(&seq);
                            views_b.extend(seq);
                        }
                        (BertObjective::Contrastive, ContrastiveViews::Mask) => {
                            // two independently masked views of the same window
                            x.tokens.extend(mask_tokens(&seq, masking, &mut plan.rng).inputs);
                            views_b.extend(mask_tokens(&seq, masking, &mut plan.rng).inputs);
                        }
                        _ => {
                            let m = mask_tokens(&seq, masking, &mut plan.rng);
                            x.tokens.extend(m.inputs);
                            mlm.extend(m.targets);
                        }
                    }
                }
                match objective {
                    BertObjective::Contrastive => {
                        // rows i and i + B are the two views of window i
                        x.tokens.extend(views_b);
                        x.batch = 2 * b;
                        x.paired = true;
                    }
                    BertObjective::MlmNsp => {
                        x.mlm_targets = Some(mlm);
                        x.nsp_labels = Some(nsp);
                        x.segments = Some(seg);
                    }
                    BertObjective::Mlm => x.mlm_targets = Some(mlm),
                }
                Ok(FamilyBatch::Bert(x))
            }
            Objective::T5 { span, pad, .. } => {
                let mut pairs = Vec::with_capacity(b);
                for (w, mut plan) in windows.iter().zip(plans) {
                    let c = corrupt_spans(w, span, &mut plan.rng).map_err(|e| anyhow!("span corruption: {}: {}", e.field, e.message))?;
                    pairs.push((c.inputs, c.targets));
                }
                // T5 starts the decoder with the pad id.
                Ok(FamilyBatch::T5(T5Batch::from_pairs(&pairs, *pad, *pad)))
            }
        }
    }

    /// The micro-batch of windows `indices` of `source` whose samples have global indices `ks`
    /// in step `step`: plans, reads (own windows, then partners), builds. A BERT batch of a
    /// training step is a training pass (dropout on, seeded by `dropout_seed`); one of
    /// `EVAL_STEP` is an evaluation pass.
    pub fn read_batch(&self, source: &Source, seed: u64, step: u64, indices: &[u64], ks: &[u64], n_windows: u64) -> Result<FamilyBatch> {
        let len = self.window_len();
        let plans: Vec<Plan> = indices.iter().zip(ks).map(|(&i, &k)| self.plan(sample_rng(seed, step, k), i, n_windows)).collect();
        let partner_ids: Vec<u64> = plans.iter().filter_map(|p| p.partner).collect();
        let windows = source.windows(len, indices)?;
        let partners = if partner_ids.is_empty() { Vec::new() } else { source.windows(len, &partner_ids)? };
        let mut batch = self.batch(&windows, plans, &partners)?;
        if let FamilyBatch::Bert(x) = &mut batch {
            x.train = step != EVAL_STEP;
            x.dropout_seed = dropout_seed(seed, step, ks.first().copied().unwrap_or(0));
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_engine::backend::IGNORE_INDEX;

    fn bert(objective: BertObjective) -> Objective {
        let s = BertSpecials::new(20);
        let mut masking = MaskingConfig::bert(24, s.mask, vec![s.pad, s.cls, s.sep]);
        masking.mask_prob = 0.5;
        Objective::Bert { objective, masking, specials: s, seq_len: 11, views: ContrastiveViews::Mask }
    }

    #[test]
    fn next_sentence_pairs_are_laid_out_and_labeled() {
        let o = bert(BertObjective::MlmNsp);
        assert_eq!(o.window_len(), 8);
        // random text, so that no two half-windows coincide
        let mut rng = Rng::new(1);
        let tokens: Vec<u32> = (0..200).map(|_| rng.below(20) as u32).collect();
        let src = Source::Text(tokens);
        let n = src.n_windows(8);
        let idx: Vec<u64> = (0..16).collect();
        let FamilyBatch::Bert(x) = o.read_batch(&src, 7, 3, &idx, &idx, n).unwrap() else { panic!() };
        let (nsp, seg, mlm) = (x.nsp_labels.unwrap(), x.segments.unwrap(), x.mlm_targets.unwrap());
        assert!(nsp.contains(&0) && nsp.contains(&1), "{nsp:?}");
        for i in 0..16 {
            let row = &x.tokens[i * 11..(i + 1) * 11];
            assert_eq!((row[0], row[5], row[10]), (21, 22, 22), "[CLS] a [SEP] b [SEP]: {row:?}");
            assert_eq!(&seg[i * 11..(i + 1) * 11], &[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
            // the original sequence, from inputs where unmasked and targets where masked
            let orig: Vec<u32> = (0..11).map(|j| if mlm[i * 11 + j] == IGNORE_INDEX { row[j] } else { mlm[i * 11 + j] }).collect();
            let w = &src.windows(8, &[i as u64]).unwrap()[0];
            assert_eq!(&orig[1..5], &w[..4]);
            assert_eq!(orig[6..10] == w[4..], nsp[i] == 0, "label {} for {orig:?} vs {w:?}", nsp[i]);
        }
        // Same seed, step and indices: the same batch.
        let FamilyBatch::Bert(y) = o.read_batch(&src, 7, 3, &idx, &idx, n).unwrap() else { panic!() };
        assert_eq!(y.tokens, x.tokens);
        let FamilyBatch::Bert(z) = o.read_batch(&src, 7, 4, &idx, &idx, n).unwrap() else { panic!() };
        assert_ne!(z.tokens, x.tokens);
    }

    #[test]
    fn contrastive_views_pair_rows_i_and_i_plus_b() {
        let o = bert(BertObjective::Contrastive);
        let src = Source::Text((0..100).map(|i| (i % 20) as u32).collect());
        let idx = [0u64, 1, 2];
        let FamilyBatch::Bert(x) = o.read_batch(&src, 1, 0, &idx, &idx, src.n_windows(9)).unwrap() else { panic!() };
        assert!(x.paired && x.mlm_targets.is_none());
        assert_eq!((x.batch, x.tokens.len()), (6, 66));
        assert_ne!(&x.tokens[..33], &x.tokens[33..], "the two views are masked independently");
    }

    #[test]
    fn dropout_views_repeat_the_unmasked_window() {
        let Objective::Bert { masking, specials, .. } = bert(BertObjective::Contrastive) else { unreachable!() };
        let o = Objective::Bert { objective: BertObjective::Contrastive, masking, specials, seq_len: 11, views: ContrastiveViews::Dropout };
        let src = Source::Text((0..100).map(|i| (i % 20) as u32).collect());
        let idx = [0u64, 1, 2];
        let FamilyBatch::Bert(x) = o.read_batch(&src, 1, 0, &idx, &idx, src.n_windows(9)).unwrap() else { panic!() };
        assert!(x.paired && x.mlm_targets.is_none());
        assert_eq!((x.batch, x.tokens.len()), (6, 66));
        assert_eq!(&x.tokens[..33], &x.tokens[33..], "rows i and i + B are the same tokens");
        for (i, w) in src.windows(9, &idx).unwrap().iter().enumerate() {
            let row = &x.tokens[i * 11..(i + 1) * 11];
            assert_eq!((row[0], &row[1..10], row[10]), (specials.cls, &w[..], specials.sep), "[CLS] window [SEP], unmasked");
        }
        assert!(x.train, "a training step's batch is a training pass");
    }

    #[test]
    fn dropout_seeds_follow_the_step_and_first_sample_and_evaluation_is_off() {
        let o = bert(BertObjective::Mlm);
        let src = Source::Text((0..200).map(|i| (i % 20) as u32).collect());
        let n = src.n_windows(9);
        let read = |step: u64, ks: &[u64]| {
            let FamilyBatch::Bert(x) = o.read_batch(&src, 7, step, ks, ks, n).unwrap() else { panic!() };
            x
        };
        let a = read(3, &[4, 5]);
        assert!(a.train);
        assert_eq!(a.dropout_seed, read(3, &[4, 5]).dropout_seed, "a rerun draws the same masks");
        // the seed depends on the first sample only, not on how many samples a rank holds
        assert_eq!(a.dropout_seed, read(3, &[4]).dropout_seed);
        assert_ne!(a.dropout_seed, read(4, &[4, 5]).dropout_seed, "another step");
        assert_ne!(a.dropout_seed, read(3, &[6, 7]).dropout_seed, "another micro-batch");
        assert!(!read(EVAL_STEP, &[0, 1]).train, "evaluation batches run without dropout");
    }

    #[test]
    fn t5_pairs_reconstruct_their_window() {
        let span = SpanCorruptionConfig { vocab_size: 40, noise_density: 0.2, mean_span: 2.0, sentinels: 10 };
        let o = Objective::T5 { span: span.clone(), pad: 30, seq_len: 12 };
        let src = Source::Text((0..100).map(|i| (i * 7 % 30) as u32).collect());
        let idx = [4u64, 5];
        let FamilyBatch::T5(x) = o.read_batch(&src, 1, 0, &idx, &idx, src.n_windows(12)).unwrap() else { panic!() };
        let lens = x.enc_lens.clone().unwrap();
        let targets = x.targets.clone().unwrap();
        for (i, w) in src.windows(12, &idx).unwrap().iter().enumerate() {
            let inp = &x.enc_tokens[i * x.enc_len..i * x.enc_len + lens[i] as usize];
            let tgt: Vec<u32> = targets[i * x.dec_len..(i + 1) * x.dec_len].iter().copied().filter(|&t| t != IGNORE_INDEX).collect();
            assert_eq!(smelt_engine::model::objectives::reconstruct(inp, &tgt, &span).unwrap(), *w);
            assert_eq!(x.dec_tokens[i * x.dec_len], 30, "the decoder starts with the pad id");
        }
    }
}
