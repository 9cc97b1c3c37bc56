//! BERT (encoder-only), written once against `Backend`: the sum of token, position (learned or
//! sinusoidal) and segment embeddings, then LayerNorm; layers of bidirectional self-attention (dot, general
//! or additive scores; padded keys masked) and a GELU FFN, post-LN (BERT) or pre-LN (then a final
//! LayerNorm); heads: masked LM (dense + GELU + LayerNorm, decoder tied to the token table, own
//! bias), a tanh pooler over [CLS] with next-sentence prediction and sequence classification,
//! and in-batch InfoNCE over pooled embeddings of paired sequences.
//!
//! With sinusoidal positions the word-embedding lookup is multiplied by sqrt(C) before positions
//! and segments are added, and the word table starts N(0, C^-0.5) (Vaswani et al., fairseq; why:
//! see `blocks::token_scale`); the tied MLM decoder reads the table unscaled, and the segment
//! embeddings are not scaled. Learned positions: no factor, every table N(0, 0.02).
//!
//! Dropout (`BertConfig::dropout`, HF's `hidden_dropout_prob`) acts in training batches only
//! (`BertBatch::train`): after the embedding LayerNorm and on each sublayer's output before its
//! residual add, with masks drawn from `BertBatch::dropout_seed` (site 0 the embedding, then the
//! sublayers in order), so a batch replays identically on any rank and in any rerun. A paired
//! batch whose rows i and i + B/2 hold the same tokens thus sees two dropout views (SimCSE).
//!
//! Tensor names are Hugging Face `BertForPreTraining`'s (PyTorch `Linear` layout (out, in)), so a
//! post-LN, learned-position, dot-score model exports by copying; query, key and value sit back to
//! back in the flat buffer and act as one fused (3C, C) weight. Differences from HF: GELU is the
//! tanh approximation (original BERT's), LayerNorm eps is 1e-5, no attention-probability dropout.
//!
//! The loss is the sum of the objectives the batch carries, each a mean over its own items.

use std::ops::Range;

use crate::backend::{Backend, MatmulShape, OptionalOp, ScoreKind, WeightLayout, IGNORE_INDEX};
use crate::error::{ConfigError, EngineError};
use crate::model::bert_config::{BertConfig, Pooling, Positions};
use crate::model::blocks::{all, all_mut, saved_probs, sinusoidal_table, token_init_std, token_scale, zero, Ctx, Dims, DropoutPass, Grad, Inner, Lens, Linear, Norm, NormActs, ScoreParams, Stack, StackActs, Sublayer};
use crate::model::gpt_config::LayerNormPlacement;
use crate::grad_buckets::unreported;
use crate::model::gpt::ReadyFn;
use crate::model::objectives::info_nce;
use crate::model::padded_head;
use crate::params::{Init, ParamKind, ParamTable};

/// One batch for BERT: tokens and whichever objectives' targets it carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BertBatch {
    pub batch: usize,
    pub seq_len: usize,
    /// (B, T)
    pub tokens: Vec<u32>,
    /// (B, T) segment ids (sentence A = 0, B = 1); all 0 when absent.
    pub segments: Option<Vec<u32>>,
    /// (B) real lengths; tokens past them are padding, masked out of attention. All T when absent.
    pub lens: Option<Vec<u32>>,
    /// (B, T) masked-LM targets, `IGNORE_INDEX` where no prediction counts.
    pub mlm_targets: Option<Vec<u32>>,
    /// (B) next-sentence labels (HF: 0 = B follows A, 1 = B is random).
    pub nsp_labels: Option<Vec<u32>>,
    /// (B) sequence-classification labels.
    pub labels: Option<Vec<u32>>,
    /// Contrastive pairs: sequence i and sequence i + B/2 are two views of one item.
    pub paired: bool,
    /// A training pass: the config's dropout acts (evaluation leaves it false: no dropout).
    pub train: bool,
    /// Seed of this pass's dropout masks (read when `train`); derive it from the step and the
    /// batch's place in it, so that every rank and every rerun draws the same masks.
    pub dropout_seed: u64,
}

impl BertBatch {
    pub fn new(tokens: Vec<u32>, batch: usize, seq_len: usize) -> Self {
        BertBatch { batch, seq_len, tokens, ..Default::default() }
    }
}

/// Each objective's mean loss in the last forward pass (None: not in the batch).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BertLosses {
    pub mlm: Option<f32>,
    pub nsp: Option<f32>,
    pub classification: Option<f32>,
    pub contrastive: Option<f32>,
    /// Top-1 accuracy of the contrastive a -> b direction.
    pub contrastive_accuracy: Option<f32>,
}

impl BertLosses {
    pub fn total(&self) -> Option<f32> {
        let parts = [self.mlm, self.nsp, self.classification, self.contrastive];
        parts.iter().any(Option::is_some).then(|| parts.iter().flatten().sum())
    }
}

/// Parameter layout.
#[derive(Clone, Debug)]
struct Layout {
    wte: Range<usize>,
    /// `wte` and its spare rows: the tied decoder's weight, over the vocabulary rounded up
    /// (padded_head.rs)
    head: Range<usize>,
    wpe: Option<Range<usize>>,
    tte: Range<usize>,
    emb_ln: Norm,
    stack: Stack,
    final_ln: Option<Norm>,
    mlm_dense: Linear,
    mlm_ln: Norm,
    mlm_bias: Range<usize>,
    /// `mlm_bias` and its spare values (their gradient: the padding's column sums, zero)
    mlm_bias_head: Range<usize>,
    pooler: Option<Linear>,
    nsp: Option<Linear>,
    classifier: Option<Linear>,
    scores: Vec<ScoreParams>,
}

fn build(cfg: &BertConfig) -> (ParamTable, Layout) {
    let (v, c, f, hd) = (cfg.vocab_size, cfg.n_embd, cfg.n_inner, cfg.head_dim());
    let std = 0.02;
    let mut t = ParamTable::new();
    let emb = |t: &mut ParamTable, name: &str, rows: usize| {
        let id = t.push(name, &[rows, c], ParamKind::Embedding, Init::Normal { std });
        t.range(id)
    };
    let pad = cfg.head_rows() - v;
    let id = t.push_with_spare("bert.embeddings.word_embeddings.weight", &[v, c], ParamKind::Embedding, Init::Normal { std: token_init_std(cfg.positions, c, std) }, pad * c);
    let (wte, head) = (t.range(id), t.reserved_range(id));
    let wpe = (cfg.positions == Positions::Learned).then(|| emb(&mut t, "bert.embeddings.position_embeddings.weight", cfg.max_positions));
    let tte = emb(&mut t, "bert.embeddings.token_type_embeddings.weight", cfg.type_vocab_size);
    let emb_ln = Norm::push(&mut t, "bert.embeddings.LayerNorm", c);
    let mut subs = Vec::new();
    let mut scores = Vec::new();
    for i in 0..cfg.n_layer {
        let p = format!("bert.encoder.layer.{i}");
        let qkv = Linear::push(&mut t, &[&format!("{p}.attention.self.query"), &format!("{p}.attention.self.key"), &format!("{p}.attention.self.value")], c, c, std);
        let sc = ScoreParams::push(&mut t, &format!("{p}.attention.self"), cfg.scores, cfg.n_head, hd, cfg.additive_width());
        scores.push(sc.clone());
        let proj = Linear::push(&mut t, &[&format!("{p}.attention.output.dense")], c, c, std);
        let ln = Norm::push(&mut t, &format!("{p}.attention.output.LayerNorm"), c);
        subs.push(Sublayer { ln, inner: Inner::SelfAttn { qkv, proj, scores: sc, causal: false } });
        let fc = Linear::push(&mut t, &[&format!("{p}.intermediate.dense")], c, f, std);
        let proj = Linear::push(&mut t, &[&format!("{p}.output.dense")], f, c, std);
        let ln = Norm::push(&mut t, &format!("{p}.output.LayerNorm"), c);
        subs.push(Sublayer { ln, inner: Inner::Ffn { fc, proj } });
    }
    let final_ln = (cfg.ln_placement == LayerNormPlacement::Pre).then(|| Norm::push(&mut t, "bert.encoder.final_layer_norm", c));
    let pooled = cfg.nsp || cfg.num_labels > 0;
    let pooler = pooled.then(|| Linear::push(&mut t, &["bert.pooler.dense"], c, c, std));
    let mlm_dense = Linear::push(&mut t, &["cls.predictions.transform.dense"], c, c, std);
    let mlm_ln = Norm::push(&mut t, "cls.predictions.transform.LayerNorm", c);
    let bias = t.push_with_spare("cls.predictions.bias", &[v], ParamKind::Bias, Init::Zeros, pad);
    let (mlm_bias, mlm_bias_head) = (t.range(bias), t.reserved_range(bias));
    let nsp = cfg.nsp.then(|| Linear::push(&mut t, &["cls.seq_relationship"], c, 2, std));
    let classifier = (cfg.num_labels > 0).then(|| Linear::push(&mut t, &["classifier"], c, cfg.num_labels, std));
    let stack = Stack { subs, placement: cfg.ln_placement, ffn: f };
    (t, Layout { wte, head, wpe, tte, emb_ln, stack, final_ln, mlm_dense, mlm_ln, mlm_bias, mlm_bias_head, pooler, nsp, classifier, scores })
}

/// The batch on the device.
struct Loaded<B: Backend> {
    b: usize,
    t: usize,
    tokens: B::Ids,
    positions: B::Ids,
    segments: B::Ids,
    /// None when no sequence is padded.
    lens: Option<B::Ids>,
    lens_host: Vec<u32>,
    /// Row index b*T of each [CLS] (B).
    cls_rows: B::Ids,
    mlm: Option<(B::Ids, usize)>,
    nsp: Option<B::Ids>,
    labels: Option<B::Ids>,
    paired: bool,
    /// This pass's dropout (None: evaluation, or the config has none).
    dropout: Option<DropoutPass>,
}

/// A classification head's activations: logits (their gradient after the backward pass),
/// log-sum-exp, per-row losses.
struct HeadActs<B: Backend> {
    logits: B::Buf,
    lse: B::Buf,
    losses: B::Buf,
}

/// Activations (and gradient scratch) for one batch shape.
struct Acts<B: Backend> {
    b: usize,
    t: usize,
    emb: B::Buf, // (N, C) sum of the embeddings
    emb_ln: NormActs<B>,
    emb_drop: B::Buf, // (N, C) dropout(LN(emb)) in training passes; empty without dropout
    stack: StackActs<B>,
    final_ln: Option<NormActs<B>>,
    mlm_h: B::Buf, // (N, C) dense
    mlm_g: B::Buf, // (N, C) gelu
    mlm_ln: NormActs<B>,
    mlm: HeadActs<B>, // logits (N, V)
    cls: B::Buf,      // (B, C) hidden state of [CLS]
    pool_pre: B::Buf, // (B, C)
    pooled: B::Buf,   // (B, C) tanh
    nsp: HeadActs<B>, // (B, 2)
    class: HeadActs<B>,
    pool_mat: B::Buf, // (B, N) mean-pooling weights
    z: B::Buf,        // (B, C) contrastive embeddings
    // gradients
    dhf: B::Buf,   // (N, C)
    dn1: B::Buf,   // (N, C)
    dn2: B::Buf,   // (N, C)
    dpool: B::Buf, // (B, C)
    dpre: B::Buf,  // (B, C)
    dcls: B::Buf,  // (B, C)
    dz_dev: B::Buf, // (B, C) the contrastive loss's dz, uploaded
}

pub struct Bert<B: Backend> {
    be: B,
    cfg: BertConfig,
    table: ParamTable,
    lay: Layout,
    sinusoidal: Option<B::Buf>,
    params: B::Buf,
    grads: B::Buf,
    batch: Option<Loaded<B>>,
    acts: Option<Acts<B>>,
    losses: BertLosses,
    /// d(contrastive loss)/dz of the last forward (host), used by backward.
    dz: Option<Vec<f32>>,
    /// (Vp) the decoder's bias when the vocabulary is padded: `cls.predictions.bias`, copied in
    /// before each forward, then the padding's mask (padded_head.rs)
    head_bias: Option<B::Buf>,
}

/// Errors for options a backend lacks, raised when a model is built: a score kind without
/// kernels, or an additive score wider than the backend's kernels take.
pub(crate) fn check_scores_supported<B: Backend>(be: &B, kind: ScoreKind, additive_width: usize) -> Result<(), ConfigError> {
    match OptionalOp::of_scores(kind) {
        Some(op) if !be.supports(op) => Err(ConfigError::new(
            "scores",
            format!("{kind:?} attention scores are CPU-only until they have kernels for the {} backend", be.name()).to_lowercase(),
        )),
        _ if kind == ScoreKind::Additive && additive_width > be.max_additive_width() => Err(ConfigError::new(
            "additive_width",
            format!("{additive_width} is wider than the {} backend's additive-score kernels take (at most {})", be.name(), be.max_additive_width()),
        )),
        _ => Ok(()),
    }
}

impl<B: Backend> Bert<B> {
    /// A model with BERT's initialisation (N(0, 0.02), zero biases; general scores start at the
    /// identity; word embeddings N(0, C^-0.5) with sinusoidal positions), seeded per tensor.
    pub fn new(be: B, cfg: BertConfig, seed: u64) -> Result<Self, EngineError> {
        cfg.validate()?;
        let (table, lay) = build(&cfg);
        let mut host = table.init(seed);
        for s in &lay.scores {
            s.init_host(&mut host, cfg.n_head, cfg.head_dim());
        }
        Self::from_params(be, cfg, &host)
    }

    pub fn from_params(be: B, cfg: BertConfig, host: &[f32]) -> Result<Self, EngineError> {
        cfg.validate()?;
        check_scores_supported(&be, cfg.scores, cfg.additive_width())?;
        let (table, lay) = build(&cfg);
        table.check_buffer(host).map_err(EngineError::Batch)?;
        let sinusoidal = (cfg.positions == Positions::Sinusoidal).then(|| be.upload(&sinusoidal_table(cfg.max_positions, cfg.n_embd)));
        let params = be.upload(host);
        let grads = be.zeros(table.total());
        let head_bias = padded_head::mask(&be, cfg.vocab_size);
        Ok(Bert { be, cfg, table, lay, sinusoidal, params, grads, batch: None, acts: None, losses: BertLosses::default(), dz: None, head_bias })
    }

    pub fn param_table(cfg: &BertConfig) -> ParamTable {
        build(cfg).0
    }
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }
    super::flat_params::flat_param_accessors!();
    /// Each objective's loss in the last forward pass.
    pub fn losses(&self) -> BertLosses {
        self.losses
    }

    fn acts(&self) -> &Acts<B> {
        self.acts.as_ref().expect("forward first")
    }
    /// Masked-LM logits of the last forward, (B, T, V) (computed when the batch had MLM targets
    /// or no targets at all); after a backward pass, their gradient.
    pub fn logits(&self) -> Vec<f32> {
        padded_head::unpadded(self.be.download(all(&self.be, &self.acts().mlm.logits)), self.cfg.vocab_size)
    }
    /// Next-sentence logits (B, 2); after a backward pass, their gradient.
    pub fn nsp_logits(&self) -> Vec<f32> {
        self.be.download(all(&self.be, &self.acts().nsp.logits))
    }
    /// Classification logits (B, num_labels); after a backward pass, their gradient.
    pub fn class_logits(&self) -> Vec<f32> {
        self.be.download(all(&self.be, &self.acts().class.logits))
    }
    /// Final hidden states (B, T, C).
    pub fn hidden(&self) -> Vec<f32> {
        let a = self.acts();
        let out = self.lay.stack.output(&a.stack, &a.emb_ln.out);
        self.be.download(all(&self.be, a.final_ln.as_ref().map_or(out, |n| &n.out)))
    }
    /// Sequence embeddings (B, C) by the configured pooling, of the last forward with `paired`.
    pub fn embeddings(&self) -> Vec<f32> {
        self.be.download(all(&self.be, &self.acts().z))
    }
    /// Attention probabilities of layer `l` in the last forward, (B, T, H, T), on backends that
    /// save probabilities (the CPU); None elsewhere.
    pub fn attention_probs(&self, l: usize) -> Option<Vec<f32>> {
        let a = self.acts();
        let buf = saved_probs(&a.stack.subs[2 * l]);
        let (b, t, h) = (a.b, a.t, self.cfg.n_head);
        (self.be.len(buf) == b * t * h * t).then(|| self.be.download(all(&self.be, buf)))
    }

    fn load(&mut self, x: &BertBatch) -> Result<(), EngineError> {
        let (b, t, cfg) = (x.batch, x.seq_len, &self.cfg);
        let bad = |m: String| Err(EngineError::Batch(m));
        if b == 0 || t == 0 {
            return bad(format!("empty batch ({b} x {t})"));
        }
        if t > cfg.max_positions {
            return bad(format!("sequence length {t} exceeds the model's max_positions {}", cfg.max_positions));
        }
        if x.tokens.len() != b * t {
            return bad(format!("{} tokens for a {b} x {t} batch", x.tokens.len()));
        }
        if let Some(&id) = x.tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return bad(format!("token id {id} outside the vocabulary of {}", cfg.vocab_size));
        }
        let segments = x.segments.clone().unwrap_or_else(|| vec![0; b * t]);
        if segments.len() != b * t {
            return bad(format!("{} segment ids for a {b} x {t} batch", segments.len()));
        }
        if let Some(&s) = segments.iter().find(|&&s| s as usize >= cfg.type_vocab_size) {
            return bad(format!("segment id {s} outside type_vocab_size {}", cfg.type_vocab_size));
        }
        let lens_host = x.lens.clone().unwrap_or_else(|| vec![t as u32; b]);
        if lens_host.len() != b {
            return bad(format!("{} lengths for a batch of {b}", lens_host.len()));
        }
        if let Some(&l) = lens_host.iter().find(|&&l| l == 0 || l as usize > t) {
            return bad(format!("sequence length {l} outside 1..={t}"));
        }
        let padded = lens_host.iter().any(|&l| l as usize != t);
        if padded && !self.be.supports(OptionalOp::KeyPaddingMask) {
            return bad(format!(
                "the batch has padded sequences, and key padding masks are CPU-only until they have kernels for the {} backend; send unpadded batches",
                self.be.name()
            ));
        }
        let mlm = match &x.mlm_targets {
            None => None,
            Some(tg) => {
                if tg.len() != b * t {
                    return bad(format!("{} MLM targets for a {b} x {t} batch", tg.len()));
                }
                if let Some(&id) = tg.iter().find(|&&id| id != IGNORE_INDEX && id as usize >= cfg.vocab_size) {
                    return bad(format!("MLM target {id} outside the vocabulary of {}", cfg.vocab_size));
                }
                Some((self.be.upload_ids(tg), tg.iter().filter(|&&id| id != IGNORE_INDEX).count()))
            }
        };
        let labels_of = |name: &str, l: &Option<Vec<u32>>, classes: usize, head: bool| -> Result<Option<B::Ids>, EngineError> {
            let Some(l) = l else { return Ok(None) };
            if !head {
                return Err(EngineError::Batch(format!("the batch has {name} labels but the model has no {name} head")));
            }
            if l.len() != b {
                return Err(EngineError::Batch(format!("{} {name} labels for a batch of {b}", l.len())));
            }
            if let Some(&y) = l.iter().find(|&&y| y as usize >= classes) {
                return Err(EngineError::Batch(format!("{name} label {y} outside 0..{classes}")));
            }
            Ok(Some(self.be.upload_ids(l)))
        };
        let nsp = labels_of("next-sentence", &x.nsp_labels, 2, cfg.nsp)?;
        let labels = labels_of("classification", &x.labels, cfg.num_labels, cfg.num_labels > 0)?;
        if x.paired && (b < 4 || b % 2 != 0) {
            return bad(format!("a paired (contrastive) batch needs an even number of sequences, at least 4 (2 pairs); got {b}"));
        }
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        let cls_rows: Vec<u32> = (0..b).map(|i| (i * t) as u32).collect();
        self.batch = Some(Loaded {
            b,
            t,
            tokens: self.be.upload_ids(&x.tokens),
            positions: self.be.upload_ids(&positions),
            segments: self.be.upload_ids(&segments),
            lens: padded.then(|| self.be.upload_ids(&lens_host)),
            lens_host,
            cls_rows: self.be.upload_ids(&cls_rows),
            mlm,
            nsp,
            labels,
            paired: x.paired,
            dropout: (x.train && cfg.dropout > 0.0).then_some(DropoutPass { p: cfg.dropout, seed: x.dropout_seed, first: 0 }),
        });
        if self.acts.as_ref().is_none_or(|a| a.b != b || a.t != t) {
            // the old buffers go first, so the device never holds both sets
            self.acts = None;
            self.acts = Some(self.alloc(b, t));
        }
        Ok(())
    }

    fn dims(&self, b: usize, t: usize) -> Dims {
        Dims { b, t, tm: t, c: self.cfg.n_embd, heads: self.cfg.n_head }
    }

    fn alloc(&self, b: usize, t: usize) -> Acts<B> {
        let be = &self.be;
        let (n, c, v) = (b * t, self.cfg.n_embd, self.cfg.head_rows());
        let z = |k: usize| be.zeros(k);
        let head = |rows: usize, classes: usize| HeadActs { logits: z(rows * classes), lse: z(rows), losses: z(rows) };
        Acts {
            b,
            t,
            emb: z(n * c),
            emb_ln: self.lay.emb_ln.alloc(be, n),
            emb_drop: z(if self.cfg.dropout > 0.0 { n * c } else { 0 }),
            stack: self.lay.stack.alloc(be, self.dims(b, t)),
            final_ln: self.lay.final_ln.as_ref().map(|l| l.alloc(be, n)),
            mlm_h: z(n * c),
            mlm_g: z(n * c),
            mlm_ln: self.lay.mlm_ln.alloc_matmul_input(be, n),
            // the MLM logits: read by the decoder matmul and the classifier only (bf16 on CUDA)
            mlm: HeadActs { logits: be.activation_zeros(n * v), lse: z(n), losses: z(n) },
            cls: z(b * c),
            pool_pre: z(b * c),
            pooled: z(b * c),
            nsp: head(b, 2),
            class: head(b, self.cfg.num_labels),
            pool_mat: z(b * n),
            z: z(b * c),
            dhf: z(n * c),
            dn1: z(n * c),
            dn2: z(n * c),
            dpool: z(b * c),
            dpre: z(b * c),
            dcls: z(b * c),
            dz_dev: z(b * c),
        }
    }

    /// Forward pass; returns the summed loss of the objectives the batch carries (None if none).
    pub fn forward(&mut self, x: &BertBatch) -> Result<Option<f32>, EngineError> {
        self.load(x)?;
        let Bert { be, cfg, lay, sinusoidal, params, batch, acts, losses: last_losses, dz: last_dz, head_bias, .. } = self;
        let (batch, a) = (batch.as_ref().unwrap(), acts.as_mut().unwrap());
        let cx = Ctx { be, params };
        // the decoder and the softmax run over the vocabulary rounded up (padded_head.rs)
        let (b, t, c, v) = (batch.b, batch.t, cfg.n_embd, cfg.head_rows());
        let n = b * t;
        let d = Dims { b, t, tm: t, c, heads: cfg.n_head };

        // emb = wte[tokens] (* sqrt(C) if sinusoidal) + positions + tte[segments]; x0 = LN(emb)  // (N, C)
        be.embedding_forward(all_mut(be, &mut a.emb), &batch.tokens, cx.p(&lay.wte), c, false);
        if let Some(s) = token_scale(cfg.positions, c) {
            be.scale(all_mut(be, &mut a.emb), s);
        }
        let pos_table = match (&lay.wpe, sinusoidal) {
            (Some(wpe), _) => cx.p(wpe),
            (None, Some(s)) => be.view(s, 0..cfg.max_positions * c),
            (None, None) => unreachable!("positions are learned or sinusoidal"),
        };
        be.embedding_forward(all_mut(be, &mut a.emb), &batch.positions, pos_table, c, true);
        be.embedding_forward(all_mut(be, &mut a.emb), &batch.segments, cx.p(&lay.tte), c, true);
        lay.emb_ln.forward(&cx, &mut a.emb_ln, &a.emb);
        // x0 = dropout(LN(emb)) in training passes (site 0), the stack's sublayers sites 1..
        let x0 = match batch.dropout {
            Some(dp) => {
                be.dropout_forward(all_mut(be, &mut a.emb_drop), all(be, &a.emb_ln.out), dp.site(0, n * c));
                &a.emb_drop
            }
            None => &a.emb_ln.out,
        };

        let lens = Lens::<B> { own: batch.lens.as_ref(), memory: None };
        let stack_dropout = batch.dropout.map(|dp| DropoutPass { first: 1, ..dp });
        lay.stack.forward_with_dropout(&cx, &mut a.stack, x0, None, lens, d, stack_dropout);
        let out = lay.stack.output(&a.stack, &a.emb_ln.out);
        if let (Some(ln), Some(la)) = (&lay.final_ln, a.final_ln.as_mut()) {
            ln.forward(&cx, la, out);
        }
        let hf = a.final_ln.as_ref().map_or(lay.stack.output(&a.stack, &a.emb_ln.out), |l| &l.out);

        let mut losses = BertLosses::default();
        let others = batch.nsp.is_some() || batch.labels.is_some() || batch.paired;
        if batch.mlm.is_some() || !others {
            // logits = LN(gelu(hf W1^T + b1)) wte^T + bias                  // (N, V)
            lay.mlm_dense.forward(&cx, &mut a.mlm_h, hf, n);
            be.gelu_forward(all_mut(be, &mut a.mlm_g), all(be, &a.mlm_h));
            lay.mlm_ln.forward(&cx, &mut a.mlm_ln, &a.mlm_g);
            let dec = MatmulShape { rows: n, in_features: c, out_features: v, layout: WeightLayout::OutIn };
            let bias = match head_bias {
                Some(hb) => {
                    // the bias's V values in front of the padding's mask
                    be.copy(be.view_mut(hb, 0..cfg.vocab_size), cx.p(&lay.mlm_bias));
                    all(be, hb)
                }
                None => cx.p(&lay.mlm_bias),
            };
            be.matmul_forward(all_mut(be, &mut a.mlm.logits), all(be, &a.mlm_ln.out), cx.p(&lay.head), Some(bias), dec);
            if let Some((targets, count)) = &batch.mlm {
                losses.mlm = Some(cross_entropy_mean(be, &mut a.mlm, targets, v, *count));
            }
        }
        if let Some(pooler) = &lay.pooler {
            // pooled = tanh(hf[cls] Wp^T + bp)                               // (B, C)
            be.embedding_forward(all_mut(be, &mut a.cls), &batch.cls_rows, all(be, hf), c, false);
            pooler.forward(&cx, &mut a.pool_pre, &a.cls, b);
            be.tanh_forward(all_mut(be, &mut a.pooled), all(be, &a.pool_pre));
            if let Some(nsp) = &lay.nsp {
                nsp.forward(&cx, &mut a.nsp.logits, &a.pooled, b);
                if let Some(y) = &batch.nsp {
                    losses.nsp = Some(cross_entropy_mean(be, &mut a.nsp, y, 2, b));
                }
            }
            if let Some(cl) = &lay.classifier {
                cl.forward(&cx, &mut a.class.logits, &a.pooled, b);
                if let Some(y) = &batch.labels {
                    losses.classification = Some(cross_entropy_mean(be, &mut a.class, y, cfg.num_labels, b));
                }
            }
        }
        *last_dz = None;
        if batch.paired {
            // z = pooled hidden states (B, C); InfoNCE between rows i and i + B/2
            match cfg.pooling {
                Pooling::Cls => be.embedding_forward(all_mut(be, &mut a.z), &batch.cls_rows, all(be, hf), c, false),
                Pooling::Mean => {
                    let mut pm = vec![0.0f32; b * n];
                    for (i, &len) in batch.lens_host.iter().enumerate() {
                        for j in 0..len as usize {
                            pm[i * n + i * t + j] = 1.0 / len as f32;
                        }
                    }
                    be.write(all_mut(be, &mut a.pool_mat), &pm);
                    // z (B, C) = P (B, N) @ hf (N, C)
                    let shape = MatmulShape { rows: b, in_features: n, out_features: c, layout: WeightLayout::InOut };
                    be.matmul_forward(all_mut(be, &mut a.z), all(be, &a.pool_mat), all(be, hf), None, shape);
                }
            }
            let z = be.download(all(be, &a.z));
            let half = b / 2;
            let r = info_nce(&z[..half * c], &z[half * c..], half, c, cfg.temperature);
            losses.contrastive = Some(r.loss);
            losses.contrastive_accuracy = Some(r.accuracy);
            *last_dz = Some([r.dza, r.dzb].concat());
        }
        *last_losses = losses;
        Ok(losses.total())
    }

    /// Backward pass of the last forward: accumulates the gradient of `loss_scale * loss`.
    /// Each head's logits buffer then holds their gradient (`logits`, `nsp_logits` and
    /// `class_logits` read logits only until the backward pass).
    ///
    /// Zero fills left: the pooler's tanh (its backward only accumulates). Each LayerNorm whose
    /// input gradient has nothing to join writes it over its buffer (`layernorm_backward_set`:
    /// the MLM head's, the embeddings', the final one (pre-LN), each post-LN sublayer's); every
    /// other op writes over its output, and the first head to reach the hidden states sets
    /// their gradient.
    pub fn backward(&mut self, loss_scale: f32) -> Result<(), EngineError> {
        self.backward_overlapped(loss_scale, &mut |_, _, _| {})
    }

    /// [`backward`](Self::backward), calling `ready(backend, grads, range)` as soon as a range
    /// of the flat gradient is final: each encoder sublayer's when its backward is done (the
    /// last first), then, once the pass is over, everything else (the heads, the final and the
    /// embedding LayerNorms, and the embeddings, whose word table the tied MLM decoder also
    /// writes). Every value is in exactly one range; gradient buckets are averaged while the
    /// pass goes on (Gpt::backward_overlapped's contract).
    pub fn backward_overlapped(&mut self, loss_scale: f32, ready: &mut ReadyFn<'_, B>) -> Result<(), EngineError> {
        let Bert { be, cfg, lay, params, grads, batch, acts, losses, dz, .. } = self;
        let batch = batch.as_ref().ok_or_else(|| EngineError::Batch("backward before forward".into()))?;
        if losses.total().is_none() {
            return Err(EngineError::Batch("backward needs a batch with targets (MLM, next-sentence, labels or pairs)".into()));
        }
        let a = acts.as_mut().unwrap();
        let cx = Ctx { be, params };
        // over the vocabulary rounded up: the padding's dlogits are zero, so are its gradients
        let (b, t, c, v) = (batch.b, batch.t, cfg.n_embd, cfg.head_rows());
        let n = b * t;
        let d = Dims { b, t, tm: t, c, heads: cfg.n_head };
        let Acts { emb, emb_ln, emb_drop, stack, final_ln, mlm_h, mlm_g, mlm_ln, mlm, cls, pooled, nsp, class, pool_mat, dhf, dn1, dn2, dpool, dpre, dcls, dz_dev, .. } = a;
        let stack_out = lay.stack.output(stack, &emb_ln.out);
        let hf = final_ln.as_ref().map_or(stack_out, |l| &l.out);
        // whether dhf holds a gradient yet: the first head sets it, the others add
        let mut dhf_written = false;

        if let Some((targets, count)) = &batch.mlm {
            // dlogits = dloss * (softmax - onehot), written over the logits     // (N, V)
            let dloss = loss_scale / (*count).max(1) as f32;
            be.cross_entropy_backward_in_place(all_mut(be, &mut mlm.logits), all(be, &mlm.lse), targets, dloss, v);
            // through the tied decoder: dln = dlogits wte, dwte += dlogits^T ln, dbias += sum
            let dec = MatmulShape { rows: n, in_features: c, out_features: v, layout: WeightLayout::OutIn };
            let [dw, db] = be.split_mut(grads, [lay.head.clone(), lay.mlm_bias_head.clone()]);
            be.matmul_backward_set_dinp(all_mut(be, dn1), dw, Some(db), all(be, &mlm.logits), all(be, &mlm_ln.out), cx.p(&lay.head), dec);
            lay.mlm_ln.backward_set(&cx, grads, dn2, dn1, mlm_g, mlm_ln);
            be.gelu_backward_set(all_mut(be, dn1), all(be, mlm_h), all(be, dn2));
            lay.mlm_dense.backward(&cx, grads, dhf, Grad::after(dhf_written), dn1, hf, n);
            dhf_written = true;
        }
        if let Some(pooler) = &lay.pooler {
            let heads = [(&lay.nsp, &batch.nsp, &mut *nsp, 2), (&lay.classifier, &batch.labels, &mut *class, cfg.num_labels)];
            let mut dpool_written = false;
            for (lin, y, h, classes) in heads {
                if let (Some(lin), Some(y)) = (lin, y) {
                    // dlogits written over the logits                            // (B, classes)
                    be.cross_entropy_backward_in_place(all_mut(be, &mut h.logits), all(be, &h.lse), y, loss_scale / b as f32, classes);
                    lin.backward(&cx, grads, dpool, Grad::after(dpool_written), &h.logits, pooled, b);
                    dpool_written = true;
                }
            }
            if dpool_written {
                // tanh_backward only accumulates                                 // (B, C)
                zero(be, dpre);
                be.tanh_backward(all_mut(be, dpre), all(be, pooled), all(be, dpool));
                pooler.backward(&cx, grads, dcls, Grad::Set, dpre, cls, b);
                // the scatter adds into the [CLS] rows only: every other row must hold a gradient
                if !dhf_written {
                    zero(be, dhf);
                    dhf_written = true;
                }
                be.embedding_backward(all_mut(be, dhf), all(be, dcls), &batch.cls_rows, c);
            }
        }
        if let Some(dz) = dz.as_ref() {
            let scaled: Vec<f32> = dz.iter().map(|g| g * loss_scale).collect();
            be.write(all_mut(be, dz_dev), &scaled);
            // both poolings add into dhf (a scatter, or the GEMM's weight gradient)
            if !dhf_written {
                zero(be, dhf);
                dhf_written = true;
            }
            match cfg.pooling {
                Pooling::Cls => be.embedding_backward(all_mut(be, dhf), all(be, dz_dev), &batch.cls_rows, c),
                Pooling::Mean => {
                    // z = P hf: dhf += P^T dz (hf plays the weight, in (in, out) layout)
                    let shape = MatmulShape { rows: b, in_features: n, out_features: c, layout: WeightLayout::InOut };
                    be.matmul_backward(None, all_mut(be, dhf), None, all(be, dz_dev), all(be, pool_mat), all(be, hf), shape);
                }
            }
        }
        if !dhf_written {
            // unreachable while every objective above has a head; a zero gradient if not
            zero(be, dhf);
        }

        // through the final LayerNorm (pre-LN) into dn1; post-LN: the stack's output is hf, and
        // the stack takes dhf as its output's gradient
        let dstack: &mut B::Buf = match (&lay.final_ln, final_ln.as_ref()) {
            (Some(ln), Some(la)) => {
                ln.backward_set(&cx, grads, dn1, dhf, stack_out, la);
                &mut *dn1
            }
            _ => &mut *dhf,
        };
        let lens = Lens::<B> { own: batch.lens.as_ref(), memory: None };
        let x0 = if batch.dropout.is_some() { &*emb_drop } else { &emb_ln.out };
        let stack_dropout = batch.dropout.map(|dp| DropoutPass { first: 1, ..dp });
        let mut reported = Vec::new();
        let mut track = |be: &B, g: &mut B::Buf, r: std::ops::Range<usize>| {
            reported.push(r.clone());
            ready(be, g, r)
        };
        lay.stack.backward_with_dropout(&cx, grads, stack, x0, None, None, lens, dstack, d, stack_dropout, &mut track);
        // dstack: the gradient of x0 (in dn1 or dhf); through the embedding dropout's mask (its
        // forward is its backward, written over dn2) and the embedding LayerNorm into a zeroed
        // buffer that neither of those occupies
        let demb: &mut B::Buf = match batch.dropout {
            Some(dp) => {
                be.dropout_forward(all_mut(be, dn2), all(be, dstack), dp.site(0, n * c));
                lay.emb_ln.backward_set(&cx, grads, dn1, dn2, emb, emb_ln);
                dn1
            }
            None => {
                lay.emb_ln.backward_set(&cx, grads, dn2, dstack, emb, emb_ln);
                dn2
            }
        };
        if let Some(wpe) = &lay.wpe {
            be.embedding_backward(be.view_mut(grads, wpe.clone()), all(be, demb), &batch.positions, c);
        }
        be.embedding_backward(be.view_mut(grads, lay.tte.clone()), all(be, demb), &batch.segments, c);
        // the word lookup was scaled: so is its gradient (demb is spent after this)
        if let Some(s) = token_scale(cfg.positions, c) {
            be.scale(all_mut(be, demb), s);
        }
        be.embedding_backward(be.view_mut(grads, lay.wte.clone()), all(be, demb), &batch.tokens, c);
        for r in unreported(be.len(grads), &reported) {
            ready(be, grads, r);
        }
        Ok(())
    }
}

/// Cross-entropy of a head's logits; the mean over `count` counted rows.
fn cross_entropy_mean<B: Backend>(be: &B, h: &mut HeadActs<B>, targets: &B::Ids, classes: usize, count: usize) -> f32 {
    be.cross_entropy_forward(all_mut(be, &mut h.losses), all_mut(be, &mut h.lse), all(be, &h.logits), targets, classes);
    let sum: f64 = be.download(all(be, &h.losses)).iter().map(|&x| x as f64).sum();
    (sum / count.max(1) as f64) as f32
}
