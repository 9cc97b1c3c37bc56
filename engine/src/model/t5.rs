//! A T5-style encoder-decoder, written once against `Backend`: one token table shared by the
//! encoder input, the decoder input and the (tied) LM head; positions sinusoidal (default) or
//! learned per side; encoder layers of self-attention (padded keys masked) and a GELU FFN;
//! decoder layers of causal self-attention, cross-attention over the encoder output (same key
//! mask) and a GELU FFN; pre-LN (T5) or post-LN; a final LayerNorm on each side; attention
//! scores dot, general or additive.
//!
//! With sinusoidal positions both input lookups of `shared` are multiplied by sqrt(C) before the
//! positions are added, and `shared` starts N(0, C^-0.5) (Vaswani et al., fairseq; why: see
//! `blocks::token_scale`); the tied head reads `shared` unscaled. Learned positions: no factor,
//! `shared` N(0, 0.02).
//!
//! The tied head reads the decoder output times C^-0.5, as T5's (`T5Config::scaled_head`; the
//! logits are scaled after the GEMM, which is the same product).
//!
//! "T5-style": tensor names follow Hugging Face T5's (`shared`, `encoder.block.{i}.layer.0
//! .SelfAttention.q`, ...), but these layers have biases and LayerNorm (not RMSNorm), GELU (not
//! ReLU) and absolute positions (not relative bias), so Hugging Face T5 checkpoints do not load. The loss is the mean cross-entropy over counted targets.

use std::ops::Range;

use crate::backend::{Backend, MatmulShape, OptionalOp, WeightLayout, IGNORE_INDEX};
use crate::error::EngineError;
use crate::model::bert::check_scores_supported;
use crate::model::bert_config::Positions;
use crate::model::blocks::{all, all_mut, saved_probs, sinusoidal_table, token_init_std, token_scale, Ctx, Dims, Inner, Lens, Linear, Norm, NormActs, ScoreParams, Stack, StackActs, Sublayer};
use crate::grad_buckets::unreported;
use crate::model::gpt::ReadyFn;
use crate::model::padded_head;
use crate::model::t5_config::T5Config;
use crate::params::{Init, ParamKind, ParamTable};

/// One batch: encoder inputs, decoder inputs and targets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct T5Batch {
    pub batch: usize,
    pub enc_len: usize,
    pub dec_len: usize,
    /// (B, Te)
    pub enc_tokens: Vec<u32>,
    /// (B) real encoder lengths; encoder positions past them are padding. All Te when absent.
    pub enc_lens: Option<Vec<u32>>,
    /// (B, Td) decoder inputs: the targets shifted right behind a start token.
    pub dec_tokens: Vec<u32>,
    /// (B, Td), `IGNORE_INDEX` on padding.
    pub targets: Option<Vec<u32>>,
}

impl T5Batch {
    /// Pads (input, target) pairs into a batch: encoder inputs padded with `pad` (and masked by
    /// their lengths), decoder inputs `[start, target[..n-1]]`, targets padded with
    /// `IGNORE_INDEX`. T5 uses the pad id as the start token.
    pub fn from_pairs(pairs: &[(Vec<u32>, Vec<u32>)], pad: u32, start: u32) -> T5Batch {
        let b = pairs.len();
        let te = pairs.iter().map(|p| p.0.len()).max().unwrap_or(0);
        let td = pairs.iter().map(|p| p.1.len()).max().unwrap_or(0);
        let mut x = T5Batch { batch: b, enc_len: te, dec_len: td, ..Default::default() };
        let mut lens = Vec::with_capacity(b);
        let mut targets = Vec::with_capacity(b * td);
        for (inp, tgt) in pairs {
            x.enc_tokens.extend(inp.iter().copied().chain(std::iter::repeat(pad)).take(te));
            lens.push(inp.len() as u32);
            x.dec_tokens.extend(std::iter::once(start).chain(tgt.iter().copied()).chain(std::iter::repeat(pad)).take(td));
            targets.extend(tgt.iter().copied().chain(std::iter::repeat(IGNORE_INDEX)).take(td));
        }
        x.enc_lens = Some(lens);
        x.targets = Some(targets);
        x
    }
}

#[derive(Clone, Debug)]
struct Layout {
    shared: Range<usize>,
    /// `shared` and its spare rows: the tied head's weight, over the vocabulary rounded up
    /// (padded_head.rs)
    head: Range<usize>,
    enc_pos: Option<Range<usize>>,
    dec_pos: Option<Range<usize>>,
    encoder: Stack,
    enc_ln: Norm,
    decoder: Stack,
    dec_ln: Norm,
    scores: Vec<ScoreParams>,
}

fn build(cfg: &T5Config) -> (ParamTable, Layout) {
    let (v, c, f, h, hd) = (cfg.vocab_size, cfg.n_embd, cfg.n_inner, cfg.n_head, cfg.head_dim());
    let std = 0.02;
    let mut t = ParamTable::new();
    let emb = |t: &mut ParamTable, name: &str, rows: usize| {
        let id = t.push(name, &[rows, c], ParamKind::Embedding, Init::Normal { std });
        t.range(id)
    };
    let spare = (cfg.head_rows() - v) * c;
    let id = t.push_with_spare("shared.weight", &[v, c], ParamKind::Embedding, Init::Normal { std: token_init_std(cfg.positions, c, std) }, spare);
    let (shared, head) = (t.range(id), t.reserved_range(id));
    let learned = cfg.positions == Positions::Learned;
    let enc_pos = learned.then(|| emb(&mut t, "encoder.embed_positions.weight", cfg.max_positions));
    let dec_pos = learned.then(|| emb(&mut t, "decoder.embed_positions.weight", cfg.max_positions));
    let mut scores = Vec::new();
    let self_attn = |t: &mut ParamTable, p: &str, causal: bool, scores: &mut Vec<ScoreParams>| {
        let qkv = Linear::push(t, &[&format!("{p}.q"), &format!("{p}.k"), &format!("{p}.v")], c, c, std);
        let sc = ScoreParams::push(t, p, cfg.scores, h, hd, cfg.additive_width());
        scores.push(sc.clone());
        let proj = Linear::push(t, &[&format!("{p}.o")], c, c, std);
        Inner::SelfAttn { qkv, proj, scores: sc, causal }
    };
    let ffn = |t: &mut ParamTable, p: &str| Inner::Ffn {
        fc: Linear::push(t, &[&format!("{p}.wi")], c, f, std),
        proj: Linear::push(t, &[&format!("{p}.wo")], f, c, std),
    };
    let mut enc = Vec::new();
    for i in 0..cfg.n_layer {
        let p = format!("encoder.block.{i}.layer");
        let inner = self_attn(&mut t, &format!("{p}.0.SelfAttention"), false, &mut scores);
        enc.push(Sublayer { ln: Norm::push(&mut t, &format!("{p}.0.layer_norm"), c), inner });
        let inner = ffn(&mut t, &format!("{p}.1.DenseReluDense"));
        enc.push(Sublayer { ln: Norm::push(&mut t, &format!("{p}.1.layer_norm"), c), inner });
    }
    let enc_ln = Norm::push(&mut t, "encoder.final_layer_norm", c);
    let mut dec = Vec::new();
    for i in 0..cfg.n_decoder_layer {
        let p = format!("decoder.block.{i}.layer");
        let inner = self_attn(&mut t, &format!("{p}.0.SelfAttention"), true, &mut scores);
        dec.push(Sublayer { ln: Norm::push(&mut t, &format!("{p}.0.layer_norm"), c), inner });
        let a = format!("{p}.1.EncDecAttention");
        let q = Linear::push(&mut t, &[&format!("{a}.q")], c, c, std);
        let kv = Linear::push(&mut t, &[&format!("{a}.k"), &format!("{a}.v")], c, c, std);
        let sc = ScoreParams::push(&mut t, &a, cfg.scores, h, hd, cfg.additive_width());
        scores.push(sc.clone());
        let proj = Linear::push(&mut t, &[&format!("{a}.o")], c, c, std);
        dec.push(Sublayer { ln: Norm::push(&mut t, &format!("{p}.1.layer_norm"), c), inner: Inner::CrossAttn { q, kv, proj, scores: sc } });
        let inner = ffn(&mut t, &format!("{p}.2.DenseReluDense"));
        dec.push(Sublayer { ln: Norm::push(&mut t, &format!("{p}.2.layer_norm"), c), inner });
    }
    let dec_ln = Norm::push(&mut t, "decoder.final_layer_norm", c);
    let encoder = Stack { subs: enc, placement: cfg.ln_placement, ffn: f };
    let decoder = Stack { subs: dec, placement: cfg.ln_placement, ffn: f };
    (t, Layout { shared, head, enc_pos, dec_pos, encoder, enc_ln, decoder, dec_ln, scores })
}

struct Loaded<B: Backend> {
    b: usize,
    te: usize,
    td: usize,
    enc_tokens: B::Ids,
    enc_positions: B::Ids,
    enc_lens: Option<B::Ids>,
    dec_tokens: B::Ids,
    dec_positions: B::Ids,
    targets: Option<(B::Ids, usize)>,
}

struct Acts<B: Backend> {
    b: usize,
    te: usize,
    td: usize,
    enc_x: B::Buf, // (B Te, C)
    enc: StackActs<B>,
    enc_out: NormActs<B>, // (B Te, C)
    dec_x: B::Buf,        // (B Td, C)
    dec: StackActs<B>,
    dec_out: NormActs<B>, // (B Td, C)
    logits: B::Buf,       // (B Td, V); their gradient after the backward pass
    lse: B::Buf,
    losses: B::Buf,
    dhead: B::Buf, // (B Td, C) gradient of dec_out
    ddec: B::Buf,  // (B Td, C)
    denc: B::Buf,  // (B Te, C) gradient of enc_out
    dx: B::Buf,    // (B Te, C)
}

pub struct T5<B: Backend> {
    be: B,
    cfg: T5Config,
    table: ParamTable,
    lay: Layout,
    sinusoidal: Option<B::Buf>,
    params: B::Buf,
    grads: B::Buf,
    batch: Option<Loaded<B>>,
    acts: Option<Acts<B>>,
    /// (Vp) the tied head's bias when the vocabulary is padded (padded_head.rs)
    head_mask: Option<B::Buf>,
}

impl<B: Backend> T5<B> {
    /// Seeded initialisation: N(0, 0.02) weights and embeddings (`shared` N(0, C^-0.5) with
    /// sinusoidal positions), zero biases, general scores at the identity.
    pub fn new(be: B, cfg: T5Config, seed: u64) -> Result<Self, EngineError> {
        cfg.validate()?;
        let (table, lay) = build(&cfg);
        let mut host = table.init(seed);
        for s in &lay.scores {
            s.init_host(&mut host, cfg.n_head, cfg.head_dim());
        }
        Self::from_params(be, cfg, &host)
    }

    pub fn from_params(be: B, cfg: T5Config, host: &[f32]) -> Result<Self, EngineError> {
        cfg.validate()?;
        check_scores_supported(&be, cfg.scores, cfg.additive_width())?;
        let (table, lay) = build(&cfg);
        table.check_buffer(host).map_err(EngineError::Batch)?;
        let sinusoidal = (cfg.positions == Positions::Sinusoidal).then(|| be.upload(&sinusoidal_table(cfg.max_positions, cfg.n_embd)));
        let params = be.upload(host);
        let grads = be.zeros(table.total());
        let head_mask = padded_head::mask(&be, cfg.vocab_size);
        Ok(T5 { be, cfg, table, lay, sinusoidal, params, grads, batch: None, acts: None, head_mask })
    }

    pub fn param_table(cfg: &T5Config) -> ParamTable {
        build(cfg).0
    }
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }
    super::flat_params::flat_param_accessors!();
    /// Decoder logits of the last forward, (B, Td, V); after a backward pass, their gradient.
    pub fn logits(&self) -> Vec<f32> {
        let padded = self.be.download(all(&self.be, &self.acts.as_ref().expect("forward first").logits));
        padded_head::unpadded(padded, self.cfg.vocab_size)
    }
    /// Encoder output (after its final LayerNorm), (B, Te, C).
    pub fn encoder_output(&self) -> Vec<f32> {
        self.be.download(all(&self.be, &self.acts.as_ref().expect("forward first").enc_out.out))
    }
    /// Attention probabilities of the last forward on backends that save them (the CPU):
    /// encoder layer l's self-attention (B, Te, H, Te), or decoder layer l's self-attention
    /// (B, Td, H, Td) and cross-attention (B, Td, H, Te).
    pub fn attention_probs(&self, which: T5Attention, l: usize) -> Option<Vec<f32>> {
        let a = self.acts.as_ref().expect("forward first");
        let (buf, tq, tk) = match which {
            T5Attention::Encoder => (saved_probs(&a.enc.subs[2 * l]), a.te, a.te),
            T5Attention::DecoderSelf => (saved_probs(&a.dec.subs[3 * l]), a.td, a.td),
            T5Attention::Cross => (saved_probs(&a.dec.subs[3 * l + 1]), a.td, a.te),
        };
        (self.be.len(buf) == a.b * tq * self.cfg.n_head * tk).then(|| self.be.download(all(&self.be, buf)))
    }

    fn load(&mut self, x: &T5Batch) -> Result<(), EngineError> {
        let (b, te, td, cfg) = (x.batch, x.enc_len, x.dec_len, &self.cfg);
        let bad = |m: String| Err(EngineError::Batch(m));
        if b == 0 || te == 0 || td == 0 {
            return bad(format!("empty batch ({b} x {te} -> {td})"));
        }
        for (what, len) in [("encoder", te), ("decoder", td)] {
            if len > cfg.max_positions {
                return bad(format!("{what} length {len} exceeds the model's max_positions {}", cfg.max_positions));
            }
        }
        for (what, ids, len) in [("encoder tokens", &x.enc_tokens, b * te), ("decoder tokens", &x.dec_tokens, b * td)] {
            if ids.len() != len {
                return bad(format!("{} {what} for a batch of {b} x {}", ids.len(), len / b));
            }
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return bad(format!("{what}: id {id} outside the vocabulary of {}", cfg.vocab_size));
            }
        }
        let lens = x.enc_lens.clone().unwrap_or_else(|| vec![te as u32; b]);
        if lens.len() != b {
            return bad(format!("{} encoder lengths for a batch of {b}", lens.len()));
        }
        if let Some(&l) = lens.iter().find(|&&l| l == 0 || l as usize > te) {
            return bad(format!("encoder length {l} outside 1..={te}"));
        }
        let padded = lens.iter().any(|&l| l as usize != te);
        if padded && !self.be.supports(OptionalOp::KeyPaddingMask) {
            return bad(format!(
                "the batch has padded encoder inputs, and key padding masks are CPU-only until they have kernels for the {} backend; send unpadded batches",
                self.be.name()
            ));
        }
        let targets = match &x.targets {
            None => None,
            Some(tg) => {
                if tg.len() != b * td {
                    return bad(format!("{} targets for a batch of {b} x {td}", tg.len()));
                }
                if let Some(&id) = tg.iter().find(|&&id| id != IGNORE_INDEX && id as usize >= cfg.vocab_size) {
                    return bad(format!("target id {id} outside the vocabulary of {}", cfg.vocab_size));
                }
                Some((self.be.upload_ids(tg), tg.iter().filter(|&&id| id != IGNORE_INDEX).count()))
            }
        };
        let positions = |t: usize| -> Vec<u32> { (0..b).flat_map(|_| 0..t as u32).collect() };
        self.batch = Some(Loaded {
            b,
            te,
            td,
            enc_tokens: self.be.upload_ids(&x.enc_tokens),
            enc_positions: self.be.upload_ids(&positions(te)),
            enc_lens: padded.then(|| self.be.upload_ids(&lens)),
            dec_tokens: self.be.upload_ids(&x.dec_tokens),
            dec_positions: self.be.upload_ids(&positions(td)),
            targets,
        });
        if self.acts.as_ref().is_none_or(|a| (a.b, a.te, a.td) != (b, te, td)) {
            // the old buffers go first, so the device never holds both sets
            self.acts = None;
            self.acts = Some(self.alloc(b, te, td));
        }
        Ok(())
    }

    fn dims(&self, b: usize, te: usize, td: usize) -> (Dims, Dims) {
        let (c, heads) = (self.cfg.n_embd, self.cfg.n_head);
        (Dims { b, t: te, tm: te, c, heads }, Dims { b, t: td, tm: te, c, heads })
    }

    fn alloc(&self, b: usize, te: usize, td: usize) -> Acts<B> {
        let be = &self.be;
        let (c, v) = (self.cfg.n_embd, self.cfg.head_rows());
        let (de, dd) = self.dims(b, te, td);
        let (ne, nd) = (b * te, b * td);
        Acts {
            b,
            te,
            td,
            enc_x: be.zeros(ne * c),
            enc: self.lay.encoder.alloc(be, de),
            enc_out: self.lay.enc_ln.alloc(be, ne),
            dec_x: be.zeros(nd * c),
            dec: self.lay.decoder.alloc(be, dd),
            dec_out: self.lay.dec_ln.alloc(be, nd),
            // read by the head matmul and the classifier only (bf16 on CUDA)
            logits: be.activation_zeros(nd * v),
            lse: be.zeros(nd),
            losses: be.zeros(nd),
            dhead: be.zeros(nd * c),
            ddec: be.zeros(nd * c),
            denc: be.zeros(ne * c),
            dx: be.zeros(ne * c),
        }
    }

    /// Forward pass; with targets, returns the mean cross-entropy over the counted targets.
    pub fn forward(&mut self, x: &T5Batch) -> Result<Option<f32>, EngineError> {
        self.load(x)?;
        let (de, dd) = self.dims(x.batch, x.enc_len, x.dec_len);
        let T5 { be, cfg, lay, sinusoidal, params, batch, acts, head_mask, .. } = self;
        let (batch, a) = (batch.as_ref().unwrap(), acts.as_mut().unwrap());
        let cx = Ctx { be, params };
        // the head and the softmax run over the vocabulary rounded up (padded_head.rs)
        let (c, v) = (cfg.n_embd, cfg.head_rows());
        let factor = token_scale(cfg.positions, c);
        let pos = |learned: &Option<Range<usize>>| match (learned, sinusoidal.as_ref()) {
            (Some(r), _) => cx.p(r),
            (None, Some(s)) => be.view(s, 0..cfg.max_positions * c),
            (None, None) => unreachable!("positions are learned or sinusoidal"),
        };

        // encoder: x = shared[tokens] (* sqrt(C) if sinusoidal) + pos; stack; final LN  // (B Te, C)
        be.embedding_forward(all_mut(be, &mut a.enc_x), &batch.enc_tokens, cx.p(&lay.shared), c, false);
        if let Some(s) = factor {
            be.scale(all_mut(be, &mut a.enc_x), s);
        }
        be.embedding_forward(all_mut(be, &mut a.enc_x), &batch.enc_positions, pos(&lay.enc_pos), c, true);
        let enc_lens = Lens::<B> { own: batch.enc_lens.as_ref(), memory: None };
        lay.encoder.forward(&cx, &mut a.enc, &a.enc_x, None, enc_lens, de);
        lay.enc_ln.forward(&cx, &mut a.enc_out, lay.encoder.output(&a.enc, &a.enc_x));

        // decoder: causal self-attention, cross-attention over enc_out        // (B Td, C)
        be.embedding_forward(all_mut(be, &mut a.dec_x), &batch.dec_tokens, cx.p(&lay.shared), c, false);
        if let Some(s) = factor {
            be.scale(all_mut(be, &mut a.dec_x), s);
        }
        be.embedding_forward(all_mut(be, &mut a.dec_x), &batch.dec_positions, pos(&lay.dec_pos), c, true);
        let dec_lens = Lens::<B> { own: None, memory: batch.enc_lens.as_ref() };
        lay.decoder.forward(&cx, &mut a.dec, &a.dec_x, Some(&a.enc_out.out), dec_lens, dd);
        lay.dec_ln.forward(&cx, &mut a.dec_out, lay.decoder.output(&a.dec, &a.dec_x));

        // logits = (dec_out C^-0.5) shared^T (+ the padding's mask)          // (B Td, Vp)
        let head = MatmulShape { rows: batch.b * batch.td, in_features: c, out_features: v, layout: WeightLayout::OutIn };
        let mask = head_mask.as_ref().map(|m| all(be, m));
        be.matmul_forward(all_mut(be, &mut a.logits), all(be, &a.dec_out.out), cx.p(&lay.head), mask, head);
        // the factor on the logits rather than on dec_out, which the backward reads as it is (the
        // padding's -1e30 stays far below any real logit)
        if let Some(s) = head_scale(cfg) {
            be.scale(all_mut(be, &mut a.logits), s);
        }
        let Some((targets, count)) = &batch.targets else { return Ok(None) };
        be.cross_entropy_forward(all_mut(be, &mut a.losses), all_mut(be, &mut a.lse), all(be, &a.logits), targets, v);
        let sum: f64 = be.download(all(be, &a.losses)).iter().map(|&x| x as f64).sum();
        Ok(Some((sum / (*count).max(1) as f64) as f32))
    }

    /// Backward pass of the last forward (which had targets): accumulates the gradient of
    /// `loss_scale * mean loss`. The logits buffer then holds their gradient.
    ///
    /// No zero fills: the final LayerNorms and post-LN sublayers write their input gradients
    /// over the buffers (`layernorm_backward_set`), as every other op here does.
    pub fn backward(&mut self, loss_scale: f32) -> Result<(), EngineError> {
        self.backward_overlapped(loss_scale, &mut |_, _, _| {})
    }

    /// [`backward`](Self::backward), calling `ready(backend, grads, range)` as soon as a range
    /// of the flat gradient is final: each decoder sublayer's, then each encoder sublayer's,
    /// when its backward is done (the last first), then, once the pass is over, everything else
    /// (the final LayerNorms, the positions and the shared table, which the tied head and both
    /// embeddings write). Every value is in exactly one range (Gpt::backward_overlapped's
    /// contract).
    pub fn backward_overlapped(&mut self, loss_scale: f32, ready: &mut ReadyFn<'_, B>) -> Result<(), EngineError> {
        let batch = self.batch.as_ref().ok_or_else(|| EngineError::Batch("backward before forward".into()))?;
        let (de, dd) = self.dims(batch.b, batch.te, batch.td);
        let T5 { be, cfg, lay, params, grads, batch, acts, .. } = self;
        let batch = batch.as_ref().unwrap();
        let (targets, count) = batch.targets.as_ref().ok_or_else(|| EngineError::Batch("backward needs targets".into()))?;
        let a = acts.as_mut().unwrap();
        let cx = Ctx { be, params };
        // over the vocabulary rounded up: the padding's dlogits are zero, so are its gradients
        let (c, v) = (cfg.n_embd, cfg.head_rows());
        let factor = token_scale(cfg.positions, c);
        let Acts { enc_x, enc, enc_out, dec_x, dec, dec_out, logits, lse, dhead, ddec, denc, dx, .. } = a;

        // dlogits = dloss * (softmax - onehot), written over the logits          // (B Td, V)
        // (with the head's factor: the gradient of the GEMM's output is s times that of the logits)
        let dscale = loss_scale / (*count).max(1) as f32 * head_scale(cfg).unwrap_or(1.0);
        be.cross_entropy_backward_in_place(all_mut(be, logits), all(be, lse), targets, dscale, v);
        // tied head: dhead = dlogits shared (written over); dshared += dlogits^T dec_out
        let head = MatmulShape { rows: batch.b * batch.td, in_features: c, out_features: v, layout: WeightLayout::OutIn };
        be.matmul_backward_set_dinp(all_mut(be, dhead), be.view_mut(grads, lay.head.clone()), None, all(be, logits), all(be, &dec_out.out), cx.p(&lay.head), head);
        lay.dec_ln.backward_set(&cx, grads, ddec, dhead, lay.decoder.output(dec, dec_x), dec_out);
        // decoder stack; its cross-attention writes denc (the gradient of enc_out)
        let dec_lens = Lens::<B> { own: None, memory: batch.enc_lens.as_ref() };
        let mut reported = Vec::new();
        let mut track = |be: &B, g: &mut B::Buf, r: Range<usize>| {
            reported.push(r.clone());
            ready(be, g, r)
        };
        lay.decoder.backward(&cx, grads, dec, dec_x, Some(&enc_out.out), Some(denc), dec_lens, ddec, dd, &mut track);
        if let Some(r) = &lay.dec_pos {
            be.embedding_backward(be.view_mut(grads, r.clone()), all(be, ddec), &batch.dec_positions, c);
        }
        // the lookup was scaled: so is its gradient (ddec is spent after this)
        if let Some(s) = factor {
            be.scale(all_mut(be, ddec), s);
        }
        be.embedding_backward(be.view_mut(grads, lay.shared.clone()), all(be, ddec), &batch.dec_tokens, c);
        // encoder: final LN, stack, embeddings
        lay.enc_ln.backward_set(&cx, grads, dx, denc, lay.encoder.output(enc, enc_x), enc_out);
        let enc_lens = Lens::<B> { own: batch.enc_lens.as_ref(), memory: None };
        lay.encoder.backward(&cx, grads, enc, enc_x, None, None, enc_lens, dx, de, &mut track);
        if let Some(r) = &lay.enc_pos {
            be.embedding_backward(be.view_mut(grads, r.clone()), all(be, dx), &batch.enc_positions, c);
        }
        if let Some(s) = factor {
            be.scale(all_mut(be, dx), s);
        }
        be.embedding_backward(be.view_mut(grads, lay.shared.clone()), all(be, dx), &batch.enc_tokens, c);
        for r in unreported(be.len(grads), &reported) {
            ready(be, grads, r);
        }
        Ok(())
    }
}

/// The tied head's factor on the decoder output, C^-0.5 (`T5Config::scaled_head`).
fn head_scale(cfg: &T5Config) -> Option<f32> {
    cfg.scaled_head.then(|| (cfg.n_embd as f64).powf(-0.5) as f32)
}

/// Which attention of a T5 layer `attention_probs` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum T5Attention {
    Encoder,
    DecoderSelf,
    Cross,
}
