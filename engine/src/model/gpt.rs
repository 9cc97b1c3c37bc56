//! GPT (decoder-only), written once against `Backend`: token + learned position embeddings,
//! blocks of causal multi-head self-attention and a GELU MLP with LayerNorm before (pre-LN) or
//! after (post-LN) each residual add, a final LayerNorm and an LM head tied to the token table.
//! Tensor names and shapes are Hugging Face GPT-2's (linear weights in `Conv1D` layout (in, out)),
//! so an export is a copy.

use crate::backend::{AttnShape, Backend, MatmulShape, QkvSource, RopeShape, WeightLayout, IGNORE_INDEX};
use crate::error::EngineError;
use crate::model::gpt_config::{GptConfig, GptPositions, LayerNormPlacement};
use crate::model::{padded_head, rotary};
use crate::params::{Init, ParamId, ParamKind, ParamTable};

mod decode;
pub use decode::Decoder;

/// Parameter ids of one block.
#[derive(Clone, Copy, Debug)]
struct BlockParams {
    ln1_w: ParamId,
    ln1_b: ParamId,
    qkv_w: ParamId,
    qkv_b: ParamId,
    proj_w: ParamId,
    proj_b: ParamId,
    ln2_w: ParamId,
    ln2_b: ParamId,
    fc_w: ParamId,
    fc_b: ParamId,
    fcproj_w: ParamId,
    fcproj_b: ParamId,
}

/// Activations of one block, saved for the backward pass. Rows = B*T.
/// pre-LN:  ln1 = LN1(x); resid1 = x + proj(attn(ln1)); ln2 = LN2(resid1); resid2 = resid1 + mlp(ln2)
/// post-LN: resid1 = x + proj(attn(x)); ln1 = LN1(resid1); resid2 = ln1 + mlp(ln1); ln2 = LN2(resid2)
struct BlockActs<B: Backend> {
    ln1: B::Buf,      // (BT, C)
    ln1_mean: B::Buf, // (BT)
    ln1_rstd: B::Buf, // (BT)
    qkv: B::Buf,      // (BT, 3C)
    atty: B::Buf,     // (BT, C)
    att_saved: B::Buf,
    resid1: B::Buf,   // (BT, C)
    ln2: B::Buf,      // (BT, C)
    ln2_mean: B::Buf, // (BT)
    ln2_rstd: B::Buf, // (BT)
    fch: B::Buf,      // (BT, 4C)
    fch_gelu: B::Buf, // (BT, 4C)
    resid2: B::Buf,   // (BT, C)
}

/// Gradient scratch, reused by every block (only one block is in flight in the backward pass).
struct Scratch<B: Backend> {
    dres: B::Buf,      // (BT, C) gradient of the current block's output
    dx: B::Buf,        // (BT, C) gradient of the current block's input
    dmid: B::Buf,      // (BT, C)
    dln: B::Buf,       // (BT, C) f32: post-LN's LayerNorm gradients (they accumulate), a head's dhidden
    // (BT, C) pre-LN: a LayerNorm output's gradient, written by one GEMM and read by the
    // LayerNorm backward only, so stored as an activation (bf16 on CUDA, as autocast keeps it)
    dln_act: B::Buf,
    // (BT, C) pre-LN: dres as an activation, written by the LayerNorm backward that produced
    // dres and read as dout by the next projection's matmul backward (bf16 on CUDA: that GEMM
    // then needs no conversion pass); (0) post-LN
    dres_act: B::Buf,
    datty: B::Buf,     // (BT, C)
    dqkv: B::Buf,      // (BT, 3C)
    dfch: B::Buf,      // (BT, 4C)
    dfch_gelu: B::Buf, // (BT, 4C)
}

/// Everything sized by the batch: allocated for a capacity of rows and of attention state, used
/// for the current B*T.
struct Acts<B: Backend> {
    rows_cap: usize,
    /// Length of each block's `att_saved`. Attention's saved state is not bounded by the rows
    /// (on CPU it is B*T*H*T), so a batch with fewer rows but longer sequences can need more.
    saved_cap: usize,
    encoded: B::Buf, // (BT, C)
    blocks: Vec<BlockActs<B>>,
    lnf: B::Buf,      // (BT, C)
    lnf_mean: B::Buf, // (BT)
    lnf_rstd: B::Buf, // (BT)
    logits: B::Buf,   // (BT, Vp): Vp = head_rows, the vocabulary rounded up
    lse: B::Buf,      // (BT)
    losses: B::Buf,   // (BT)
    scratch: Scratch<B>,
}

/// The batch currently loaded: its shape, ids on the device and how many targets count.
struct Batch<B: Backend> {
    b: usize,
    t: usize,
    tokens: B::Ids,
    positions: B::Ids,
    targets: Option<B::Ids>,
    n_targets: usize,
    /// Set by `forward_train`: the logits buffer already holds the gradient of
    /// `loss_scale * mean loss`, for this loss_scale.
    logits_grad_scale: Option<f32>,
}

pub struct Gpt<B: Backend> {
    be: B,
    cfg: GptConfig,
    table: ParamTable,
    wte: ParamId,
    /// The learned position table (none with rotary positions).
    wpe: Option<ParamId>,
    lnf_w: ParamId,
    lnf_b: ParamId,
    blocks: Vec<BlockParams>,
    params: B::Buf,
    grads: B::Buf,
    acts: Option<Acts<B>>,
    batch: Option<Batch<B>>,
    /// (Vp) the LM head's bias when it runs over more rows than the vocabulary has (the
    /// padding's logits masked out; padded_head.rs), None when the vocabulary is a round number.
    head_mask: Option<B::Buf>,
    /// Rotary positions: the (block_size, hd/2) cosine and sine table `Backend::rope` reads.
    rope_table: Option<B::Buf>,
}

/// The name table of a GPT config, in Hugging Face GPT-2 order.
fn build_table(cfg: &GptConfig) -> (ParamTable, [ParamId; 3], Option<ParamId>, Vec<BlockParams>) {
    let (c, v, l) = (cfg.n_embd, cfg.vocab_size, cfg.n_layer);
    let std = 0.02f32;
    // GPT-2 scales the projections that write into the residual stream by 1/sqrt(2L).
    let resid_std = std / ((2 * l) as f32).sqrt();
    let mut t = ParamTable::new();
    // the rows the LM head computes beyond the vocabulary are wte's spare values, zero for good
    let spare = (cfg.head_rows() - v) * c;
    let wte = t.push_with_spare("transformer.wte.weight", &[v, c], ParamKind::Embedding, Init::Normal { std }, spare);
    let wpe = (cfg.positions == GptPositions::Learned)
        .then(|| t.push("transformer.wpe.weight", &[cfg.block_size, c], ParamKind::Embedding, Init::Normal { std }));
    let mut blocks = Vec::with_capacity(l);
    for i in 0..l {
        let p = |s: &str| format!("transformer.h.{i}.{s}");
        let w = |std| Init::Normal { std };
        blocks.push(BlockParams {
            ln1_w: t.push(&p("ln_1.weight"), &[c], ParamKind::Norm, Init::Ones),
            ln1_b: t.push(&p("ln_1.bias"), &[c], ParamKind::Norm, Init::Zeros),
            qkv_w: t.push(&p("attn.c_attn.weight"), &[c, 3 * c], ParamKind::Weight, w(std)),
            qkv_b: t.push(&p("attn.c_attn.bias"), &[3 * c], ParamKind::Bias, Init::Zeros),
            proj_w: t.push(&p("attn.c_proj.weight"), &[c, c], ParamKind::Weight, w(resid_std)),
            proj_b: t.push(&p("attn.c_proj.bias"), &[c], ParamKind::Bias, Init::Zeros),
            ln2_w: t.push(&p("ln_2.weight"), &[c], ParamKind::Norm, Init::Ones),
            ln2_b: t.push(&p("ln_2.bias"), &[c], ParamKind::Norm, Init::Zeros),
            fc_w: t.push(&p("mlp.c_fc.weight"), &[c, 4 * c], ParamKind::Weight, w(std)),
            fc_b: t.push(&p("mlp.c_fc.bias"), &[4 * c], ParamKind::Bias, Init::Zeros),
            fcproj_w: t.push(&p("mlp.c_proj.weight"), &[4 * c, c], ParamKind::Weight, w(resid_std)),
            fcproj_b: t.push(&p("mlp.c_proj.bias"), &[c], ParamKind::Bias, Init::Zeros),
        });
    }
    let lnf_w = t.push("transformer.ln_f.weight", &[c], ParamKind::Norm, Init::Ones);
    let lnf_b = t.push("transformer.ln_f.bias", &[c], ParamKind::Norm, Init::Zeros);
    (t, [wte, lnf_w, lnf_b], wpe, blocks)
}

fn mm(rows: usize, in_features: usize, out_features: usize) -> MatmulShape {
    MatmulShape { rows, in_features, out_features, layout: WeightLayout::InOut }
}

impl<B: Backend> Gpt<B> {
    /// A model with seeded GPT-2 initialisation.
    pub fn new(be: B, cfg: GptConfig, seed: u64) -> Result<Self, EngineError> {
        cfg.validate()?;
        let (table, ..) = build_table(&cfg);
        let host = table.init(seed);
        Self::from_params(be, cfg, &host)
    }

    /// A model holding the given flat parameters (in this config's table order).
    pub fn from_params(be: B, cfg: GptConfig, host: &[f32]) -> Result<Self, EngineError> {
        cfg.validate()?;
        let (table, [wte, lnf_w, lnf_b], wpe, blocks) = build_table(&cfg);
        table.check_buffer(host).map_err(EngineError::Batch)?;
        let params = be.upload(host);
        let grads = be.zeros(table.total());
        let head_mask = padded_head::mask(&be, cfg.vocab_size);
        let rope_table = (cfg.positions == GptPositions::Rotary)
            .then(|| be.upload(&rotary::table(cfg.block_size, cfg.n_embd / cfg.n_head)));
        Ok(Gpt { be, cfg, table, wte, wpe, lnf_w, lnf_b, blocks, params, grads, acts: None, batch: None, head_mask, rope_table })
    }

    /// The parameter table this config produces, without building a model.
    pub fn param_table(cfg: &GptConfig) -> ParamTable {
        build_table(cfg).0
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }
    super::flat_params::flat_param_accessors!();

    /// Loads a batch: tokens (B, T) and optional targets (B, T) (`IGNORE_INDEX` skips one).
    fn load_batch(&mut self, tokens: &[u32], targets: Option<&[u32]>, b: usize, t: usize) -> Result<(), EngineError> {
        let v = self.cfg.vocab_size;
        if b == 0 || t == 0 {
            return Err(EngineError::Batch(format!("empty batch ({b} x {t})")));
        }
        if t > self.cfg.block_size {
            return Err(EngineError::Batch(format!(
                "sequence length {t} exceeds the model's block_size {}",
                self.cfg.block_size
            )));
        }
        if tokens.len() != b * t {
            return Err(EngineError::Batch(format!("{} tokens for a {b} x {t} batch", tokens.len())));
        }
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= v) {
            return Err(EngineError::Batch(format!("token id {bad} outside the vocabulary of {v}")));
        }
        let mut n_targets = 0;
        if let Some(tg) = targets {
            if tg.len() != b * t {
                return Err(EngineError::Batch(format!("{} targets for a {b} x {t} batch", tg.len())));
            }
            for &x in tg {
                if x != IGNORE_INDEX {
                    if x as usize >= v {
                        return Err(EngineError::Batch(format!("target id {x} outside the vocabulary of {v}")));
                    }
                    n_targets += 1;
                }
            }
        }
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        self.batch = Some(Batch {
            b,
            t,
            tokens: self.be.upload_ids(tokens),
            positions: self.be.upload_ids(&positions),
            targets: targets.map(|tg| self.be.upload_ids(tg)),
            n_targets,
            logits_grad_scale: None,
        });
        let (rows, saved) = (b * t, self.attention_saved_len(b, t));
        if self.acts.as_ref().is_none_or(|a| a.rows_cap < rows || a.saved_cap < saved) {
            // Grow to cover both the old and the new batch, so alternating shapes settle.
            let (rows, saved) = match &self.acts {
                Some(a) => (rows.max(a.rows_cap), saved.max(a.saved_cap)),
                None => (rows, saved),
            };
            // the old buffers go first, so the device never holds both sets
            self.acts = None;
            self.acts = Some(self.alloc_acts(rows, saved));
        }
        Ok(())
    }

    fn attention_saved_len(&self, b: usize, t: usize) -> usize {
        self.be.attention_saved_len(AttnShape {
            batch: b,
            q_len: t,
            kv_len: t,
            channels: self.cfg.n_embd,
            heads: self.cfg.n_head,
            causal: true,
        })
    }

    /// Activations for up to `rows` rows and `saved` values of attention state per block.
    fn alloc_acts(&self, rows: usize, saved: usize) -> Acts<B> {
        let be = &self.be;
        let (c, vp) = (self.cfg.n_embd, self.cfg.head_rows());
        let z = |n: usize| be.zeros(n);
        // GEMM inputs and outputs read by nothing but matmuls, attention, GELU, LayerNorm's
        // forward and the classifier: stored as the backend likes activations (bf16 on CUDA
        // with bf16 matmuls). Post-LN's LayerNorm outputs also feed residual adds, so they
        // stay f32.
        let act = |n: usize| be.activation_zeros(n);
        let ln_out = |n: usize| match self.cfg.ln_placement {
            LayerNormPlacement::Pre => be.activation_zeros(n),
            LayerNormPlacement::Post => be.zeros(n),
        };
        Acts {
            rows_cap: rows,
            saved_cap: saved,
            encoded: z(rows * c),
            blocks: (0..self.cfg.n_layer)
                .map(|_| BlockActs {
                    ln1: ln_out(rows * c),
                    ln1_mean: z(rows),
                    ln1_rstd: z(rows),
                    qkv: act(rows * 3 * c),
                    atty: act(rows * c),
                    att_saved: z(saved),
                    resid1: z(rows * c),
                    ln2: ln_out(rows * c),
                    ln2_mean: z(rows),
                    ln2_rstd: z(rows),
                    fch: act(rows * 4 * c),
                    fch_gelu: act(rows * 4 * c),
                    resid2: z(rows * c),
                })
                .collect(),
            lnf: z(rows * c),
            lnf_mean: z(rows),
            lnf_rstd: z(rows),
            logits: act(rows * vp),
            lse: z(rows),
            losses: z(rows),
            scratch: Scratch {
                dres: z(rows * c),
                dx: z(rows * c),
                dmid: z(rows * c),
                dln: z(rows * c),
                dln_act: match self.cfg.ln_placement {
                    LayerNormPlacement::Pre => act(rows * c),
                    LayerNormPlacement::Post => z(0),
                },
                dres_act: match self.cfg.ln_placement {
                    LayerNormPlacement::Pre => act(rows * c),
                    LayerNormPlacement::Post => z(0),
                },
                datty: act(rows * c),
                dqkv: act(rows * 3 * c),
                dfch: act(rows * 4 * c),
                dfch_gelu: act(rows * 4 * c),
            },
        }
    }

    /// Attention weights of sequence 0 of the last forward pass, per layer `(H, T, T)`,
    /// recomputed on the host from each block's q and k (see `attention_maps`).
    pub fn attention_maps(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        let (Some(acts), Some(batch)) = (self.acts.as_ref(), self.batch.as_ref()) else {
            return Err(EngineError::Batch("attention maps need a forward pass first".into()));
        };
        let (t, c) = (batch.t, self.cfg.n_embd);
        Ok(acts
            .blocks
            .iter()
            .map(|blk| {
                let qkv = self.be.download(self.be.view(&blk.qkv, 0..t * 3 * c));
                super::attention_maps::self_attention_probs(&qkv, t, c, self.cfg.n_head, true)
            })
            .collect())
    }

    /// Forward pass over tokens (B, T). With targets, returns the mean cross-entropy over the
    /// targets that count; the logits of the batch stay available through `logits`.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>, EngineError> {
        self.forward_with(tokens, targets, b, t, None)
    }

    /// A training pass's forward half: the mean cross-entropy over the targets that count, and
    /// the logits' gradient for `backward(loss_scale)` (or `backward_overlapped`) written over
    /// the logits in the same op (the fused classifier, `cross_entropy_forward_backward_in_place`,
    /// which a backend may run as one kernel per row: the logits of a batch are the largest
    /// activation there is). The logits are not available
    /// afterwards (`logits` panics), and `backward` must get the same loss_scale (else an error).
    pub fn forward_train(&mut self, tokens: &[u32], targets: &[u32], b: usize, t: usize, loss_scale: f32) -> Result<f32, EngineError> {
        Ok(self.forward_with(tokens, Some(targets), b, t, Some(loss_scale))?.expect("targets given"))
    }

    fn forward_with(
        &mut self,
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
        train_loss_scale: Option<f32>,
    ) -> Result<Option<f32>, EngineError> {
        self.load_batch(tokens, targets, b, t)?;
        self.body_forward();
        let Gpt { be, cfg, table, params, acts, head_mask, .. } = self;
        let acts = acts.as_mut().unwrap();
        // the softmax runs over the head's Vp columns, the padding's masked (padded_head.rs)
        let v = cfg.head_rows();
        let rows = b * t;

        // logits = lnf @ wte^T (+ mask)                        // (BT, Vp)
        let head = MatmulShape { rows, in_features: cfg.n_embd, out_features: v, layout: WeightLayout::OutIn };
        let mask = head_mask.as_ref().map(|m| be.view(m, 0..v));
        be.matmul_forward(be.view_mut(&mut acts.logits, 0..rows * v), be.view(&acts.lnf, 0..rows * cfg.n_embd), be.view(params, table.reserved_range(self.wte)), mask, head);

        let batch = self.batch.as_mut().unwrap();
        let Some(targets) = &batch.targets else { return Ok(None) };
        match train_loss_scale {
            None => be.cross_entropy_forward(
                be.view_mut(&mut acts.losses, 0..rows),
                be.view_mut(&mut acts.lse, 0..rows),
                be.view(&acts.logits, 0..rows * v),
                targets,
                v,
            ),
            Some(loss_scale) => {
                // dlogits = dloss * (softmax - onehot) over the logits, as `backward` would
                let dloss = loss_scale / batch.n_targets.max(1) as f32;
                be.cross_entropy_forward_backward_in_place(
                    be.view_mut(&mut acts.losses, 0..rows),
                    be.view_mut(&mut acts.lse, 0..rows),
                    be.view_mut(&mut acts.logits, 0..rows * v),
                    targets,
                    dloss,
                    v,
                );
                batch.logits_grad_scale = Some(loss_scale);
            }
        }
        let losses = be.download(be.view(&acts.losses, 0..rows));
        let sum: f64 = losses.iter().map(|&x| x as f64).sum();
        Ok(Some((sum / batch.n_targets.max(1) as f64) as f32))
    }

    /// Forward pass over tokens (B, T) up to the final LayerNorm, without the LM head: for task
    /// heads (classification) that read the hidden states through `hidden` and hand their
    /// gradient back to `backward_hidden`.
    pub fn forward_hidden(&mut self, tokens: &[u32], b: usize, t: usize) -> Result<(), EngineError> {
        self.load_batch(tokens, None, b, t)?;
        self.body_forward();
        Ok(())
    }

    /// Final hidden states of the last forward pass (after `ln_f`), (B*T, C) on the device.
    pub fn hidden(&self) -> B::View<'_> {
        let (acts, batch) = (self.acts.as_ref().expect("forward first"), self.batch.as_ref().expect("forward first"));
        self.be.view(&acts.lnf, 0..batch.b * batch.t * self.cfg.n_embd)
    }

    /// Embeddings, blocks and `ln_f` of the loaded batch: fills `acts.lnf` (BT, C).
    fn body_forward(&mut self) {
        let Gpt { be, cfg, table, params, acts, batch, blocks, .. } = self;
        let (acts, batch) = (acts.as_mut().unwrap(), batch.as_ref().unwrap());
        let (b, t, c) = (batch.b, batch.t, cfg.n_embd);
        let rows = b * t;
        let (rc, rc3, rc4) = (0..rows * c, 0..rows * 3 * c, 0..rows * 4 * c);
        let p = |id: ParamId| be.view(params, table.range(id));
        let attn = AttnShape { batch: b, q_len: t, kv_len: t, channels: c, heads: cfg.n_head, causal: true };
        let saved_len = be.attention_saved_len(attn);

        // encoded = wte[tokens] + wpe[positions]            // (BT, C); rotary: wte[tokens]
        be.embedding_forward(be.view_mut(&mut acts.encoded, rc.clone()), &batch.tokens, p(self.wte), c, false);
        if let Some(wpe) = self.wpe {
            be.embedding_forward(be.view_mut(&mut acts.encoded, rc.clone()), &batch.positions, p(wpe), c, true);
        }
        let rope = RopeShape { rows, seq_len: t, channels: c, heads: cfg.n_head };

        for (l, bp) in blocks.iter().enumerate() {
            let (done, rest) = acts.blocks.split_at_mut(l);
            let a = &mut rest[0];
            let x = if l == 0 { &acts.encoded } else { block_output(&done[l - 1], cfg.ln_placement) };
            let x = be.view(x, rc.clone());
            let ln = |be: &B, out: &mut B::Buf, mean: &mut B::Buf, rstd: &mut B::Buf, inp: B::View<'_>, w, bb| {
                be.layernorm_forward(
                    be.view_mut(out, rc.clone()),
                    be.view_mut(mean, 0..rows),
                    be.view_mut(rstd, 0..rows),
                    inp,
                    p(w),
                    p(bb),
                    c,
                )
            };
            // attention input: LN1(x) before the residual (pre-LN), x itself (post-LN)
            let att_in = match cfg.ln_placement {
                LayerNormPlacement::Pre => {
                    ln(be, &mut a.ln1, &mut a.ln1_mean, &mut a.ln1_rstd, x, bp.ln1_w, bp.ln1_b);
                    be.view(&a.ln1, rc.clone())
                }
                LayerNormPlacement::Post => x,
            };
            // qkv = att_in @ c_attn + b                     // (BT, 3C)
            be.matmul_forward(be.view_mut(&mut a.qkv, rc3.clone()), att_in, p(bp.qkv_w), Some(p(bp.qkv_b)), mm(rows, c, 3 * c));
            // rotary: q, k turned by their positions in place (the backward reads them turned)
            if let Some(tab) = self.rope_table.as_ref() {
                be.rope(be.view_mut(&mut a.qkv, rc3.clone()), be.view(tab, 0..be.len(tab)), rope, false);
            }
            // atty = attention(q, k, v)                      // (BT, C)
            be.attention_forward(
                be.view_mut(&mut a.atty, rc.clone()),
                be.view_mut(&mut a.att_saved, 0..saved_len),
                QkvSource::Packed(be.view(&a.qkv, rc3.clone())),
                attn,
            );
            // resid1 = x + (atty @ c_proj + b), the projection added onto the residual in one op
            be.matmul_forward_residual(be.view_mut(&mut a.resid1, rc.clone()), x, be.view(&a.atty, rc.clone()), p(bp.proj_w), Some(p(bp.proj_b)), mm(rows, c, c));
            // mlp input: LN2(resid1) (pre-LN) or LN1(resid1) (post-LN)
            let mlp_in = match cfg.ln_placement {
                LayerNormPlacement::Pre => {
                    ln(be, &mut a.ln2, &mut a.ln2_mean, &mut a.ln2_rstd, be.view(&a.resid1, rc.clone()), bp.ln2_w, bp.ln2_b);
                    &a.ln2
                }
                LayerNormPlacement::Post => {
                    ln(be, &mut a.ln1, &mut a.ln1_mean, &mut a.ln1_rstd, be.view(&a.resid1, rc.clone()), bp.ln1_w, bp.ln1_b);
                    &a.ln1
                }
            };
            // fch = mlp_in @ c_fc + b (BT, 4C); fch_gelu = gelu(fch): one op where the backend
            // fuses the GELU into the GEMM
            let fc = (be.view(mlp_in, rc.clone()), p(bp.fc_w), Some(p(bp.fc_b)), mm(rows, c, 4 * c));
            if !be.matmul_gelu_forward_fused(be.view_mut(&mut a.fch_gelu, rc4.clone()), be.view_mut(&mut a.fch, rc4.clone()), fc.0, fc.1, fc.2, fc.3) {
                be.matmul_forward(be.view_mut(&mut a.fch, rc4.clone()), fc.0, fc.1, fc.2, fc.3);
                be.gelu_forward(be.view_mut(&mut a.fch_gelu, rc4.clone()), be.view(&a.fch, rc4.clone()));
            }
            // resid2 = mlp_in's residual + (fch_gelu @ c_proj + b); post-LN then normalises it
            let fcproj = |be: &B, out: &mut B::Buf, residual: B::View<'_>| {
                be.matmul_forward_residual(be.view_mut(out, rc.clone()), residual, be.view(&a.fch_gelu, rc4.clone()), p(bp.fcproj_w), Some(p(bp.fcproj_b)), mm(rows, 4 * c, c))
            };
            match cfg.ln_placement {
                LayerNormPlacement::Pre => fcproj(be, &mut a.resid2, be.view(&a.resid1, rc.clone())),
                LayerNormPlacement::Post => {
                    fcproj(be, &mut a.resid2, be.view(&a.ln1, rc.clone()));
                    ln(be, &mut a.ln2, &mut a.ln2_mean, &mut a.ln2_rstd, be.view(&a.resid2, rc.clone()), bp.ln2_w, bp.ln2_b);
                }
            }
        }

        // lnf = LN_f(last block output)                     // (BT, C)
        let last = match acts.blocks.last() {
            Some(a) => block_output(a, cfg.ln_placement),
            None => &acts.encoded,
        };
        be.layernorm_forward(
            be.view_mut(&mut acts.lnf, rc.clone()),
            be.view_mut(&mut acts.lnf_mean, 0..rows),
            be.view_mut(&mut acts.lnf_rstd, 0..rows),
            be.view(last, rc.clone()),
            p(self.lnf_w),
            p(self.lnf_b),
            c,
        );
    }

    /// Logits of the last forward pass, (B, T, V) on the host (the head's padding left out).
    pub fn logits(&self) -> Vec<f32> {
        let (acts, batch) = (self.acts.as_ref().expect("forward first"), self.batch.as_ref().expect("forward first"));
        assert!(batch.logits_grad_scale.is_none(), "forward_train replaced the logits by their gradient");
        let n = batch.b * batch.t * self.cfg.head_rows();
        padded_head::unpadded(self.be.download(self.be.view(&acts.logits, 0..n)), self.cfg.vocab_size)
    }

    /// Each position's cross-entropy in the last forward pass with targets, (B, T) on the host,
    /// 0 where the target was ignored: what the mean loss averages (a multiple-choice eval sums
    /// a row's own).
    pub fn losses(&self) -> Vec<f32> {
        let (acts, batch) = (self.acts.as_ref().expect("forward first"), self.batch.as_ref().expect("forward first"));
        assert!(batch.targets.is_some(), "losses need a forward pass with targets");
        self.be.download(self.be.view(&acts.losses, 0..batch.b * batch.t))
    }

    /// Logits at one position of the last forward pass.
    pub fn logits_at(&self, b: usize, t: usize) -> Vec<f32> {
        let (acts, batch) = (self.acts.as_ref().expect("forward first"), self.batch.as_ref().expect("forward first"));
        assert!(batch.logits_grad_scale.is_none(), "forward_train replaced the logits by their gradient");
        let (v, vp) = (self.cfg.vocab_size, self.cfg.head_rows());
        let row = b * batch.t + t;
        self.be.download(self.be.view(&acts.logits, row * vp..row * vp + v))
    }

    /// Backward pass of the last forward (which must have had targets): accumulates into the
    /// gradient buffer the gradient of `loss_scale * mean loss`. The logits buffer then holds
    /// their gradient (`logits_at` reads logits only until the backward pass). Use `loss_scale = 1/k` to average
    /// k accumulated micro-batches.
    pub fn backward(&mut self, loss_scale: f32) -> Result<(), EngineError> {
        self.backward_overlapped(loss_scale, &mut |_, _, _| {})
    }

    /// [`backward`](Self::backward), calling `ready(backend, grads, range)` as soon as a range of
    /// the flat gradient buffer is final (nothing later in this pass writes it): `ln_f`, then
    /// each block from the last to the first (contiguous in the table), then the embeddings
    /// last (the tied `wte` also gets the LM head's gradient, at the start). The ranges cover
    /// the table once. Data-parallel training starts averaging them while the pass goes on
    /// (grad_buckets.rs); `ready` must not write into the ranges still to come.
    pub fn backward_overlapped(&mut self, loss_scale: f32, ready: &mut ReadyFn<'_, B>) -> Result<(), EngineError> {
        {
            let Gpt { be, cfg, table, params, grads, acts, batch, wte, .. } = &mut *self;
            let batch = batch.as_ref().ok_or_else(|| EngineError::Batch("backward before forward".into()))?;
            let targets = batch.targets.as_ref().ok_or_else(|| EngineError::Batch("backward needs targets".into()))?;
            let acts = acts.as_mut().unwrap();
            // over the head's Vp rows: the padding's dlogits are exactly zero (its softmax share
            // is), so wte's spare values get zero gradients
            let (c, v) = (cfg.n_embd, cfg.head_rows());
            let rows = batch.b * batch.t;
            let s = &mut acts.scratch;
            // dlogits = dloss * (softmax - onehot), written over the logits: the fused
            // classifier keeps no second (BT, V) buffer                 // (BT, V)
            let dloss = loss_scale / batch.n_targets.max(1) as f32;
            match batch.logits_grad_scale {
                // forward_train computed the gradient already (its loss_scale must be this one:
                // the logits it would take to redo it are gone)
                Some(s) if s != loss_scale => {
                    return Err(EngineError::Batch(format!("backward with loss_scale {loss_scale} after forward_train with {s}")));
                }
                Some(_) => {}
                None => be.cross_entropy_backward_in_place(be.view_mut(&mut acts.logits, 0..rows * v), be.view(&acts.lse, 0..rows), targets, dloss, v),
            }
            let dlogits = &acts.logits;
            // through the tied head: dlnf = dlogits @ wte, dwte += dlogits^T @ lnf
            let head = MatmulShape { rows, in_features: c, out_features: v, layout: WeightLayout::OutIn };
            let dlnf = match cfg.ln_placement {
                LayerNormPlacement::Pre => &mut s.dln_act,
                LayerNormPlacement::Post => &mut s.dln,
            };
            be.matmul_backward_set_dinp(
                be.view_mut(dlnf, 0..rows * c),
                be.view_mut(grads, table.reserved_range(*wte)),
                None,
                be.view(dlogits, 0..rows * v),
                be.view(&acts.lnf, 0..rows * c),
                be.view(params, table.reserved_range(*wte)),
                head,
            );
        }
        let lnf_grad_in_act = self.cfg.ln_placement == LayerNormPlacement::Pre;
        self.body_backward(ready, lnf_grad_in_act);
        Ok(())
    }

    /// Backward pass of the last forward from the gradient of its final hidden states
    /// `dhidden` (B*T, C) (a task head's output): accumulates into the gradient buffer like
    /// `backward`. Works after `forward_hidden` or `forward`.
    pub fn backward_hidden(&mut self, dhidden: B::View<'_>) -> Result<(), EngineError> {
        self.backward_hidden_overlapped(dhidden, &mut |_, _, _| {})
    }

    /// [`backward_hidden`](Self::backward_hidden), reporting final gradient ranges to `ready`
    /// as [`backward_overlapped`](Self::backward_overlapped) does.
    pub fn backward_hidden_overlapped(&mut self, dhidden: B::View<'_>, ready: &mut ReadyFn<'_, B>) -> Result<(), EngineError> {
        let batch = self.batch.as_ref().ok_or_else(|| EngineError::Batch("backward before forward".into()))?;
        let n = batch.b * batch.t * self.cfg.n_embd;
        let acts = self.acts.as_mut().unwrap();
        self.be.copy(self.be.view_mut(&mut acts.scratch.dln, 0..n), dhidden);
        self.body_backward(ready, false);
        Ok(())
    }

    /// From the gradient of `lnf` (BT, C) down through `ln_f`, the blocks and the embeddings, into
    /// the gradient buffer. The gradient is in `scratch.dln_act` (`lnf_grad_in_act`, the LM
    /// head's pre-LN output) or `scratch.dln`.
    fn body_backward(&mut self, ready: &mut ReadyFn<'_, B>, lnf_grad_in_act: bool) {
        let Gpt { be, cfg, table, params, grads, acts, batch, blocks, .. } = self;
        let batch = batch.as_ref().expect("forward first");
        let acts = acts.as_mut().unwrap();
        let (b, t, c) = (batch.b, batch.t, cfg.n_embd);
        let rows = b * t;
        let (rc, rc3, rc4) = (0..rows * c, 0..rows * 3 * c, 0..rows * 4 * c);
        let p = |id: ParamId| be.view(params, table.range(id));
        let attn = AttnShape { batch: b, q_len: t, kv_len: t, channels: c, heads: cfg.n_head, causal: true };
        let saved_len = be.attention_saved_len(attn);
        let rope = RopeShape { rows, seq_len: t, channels: c, heads: cfg.n_head };
        let Acts { encoded, blocks: block_acts, lnf_mean, lnf_rstd, scratch: s, .. } = acts;
        // dinp += LN'(dout), or with `set` dinp = LN'(dout) (no zero fill first); with `copy`,
        // the final dinp is also written there (an activation buffer: the next matmul's dout),
        // and with `sum` (the bias of that matmul) the copy's column sums are added to its
        // gradient where the backend sums them in the same pass: true when it did
        let ln_grad = |set: bool, grads: &mut B::Buf, dinp: &mut B::Buf, copy: Option<&mut B::Buf>, sum: Option<ParamId>, dout: &B::Buf, inp: &B::Buf, mean: &B::Buf, rstd: &B::Buf, w: ParamId, bias: ParamId| -> bool {
            let mut copy = copy;
            if let (Some(copy), Some(sum)) = (copy.as_deref_mut(), sum) {
                let [dw, db, ds] = be.split_mut(grads, [table.range(w), table.range(bias), table.range(sum)]);
                let (dinp, copy, dout, inp) = (be.view_mut(dinp, rc.clone()), be.view_mut(copy, rc.clone()), be.view(dout, rc.clone()), be.view(inp, rc.clone()));
                if be.layernorm_backward_and_copy_with_sum(!set, dinp, copy, ds, dw, db, dout, inp, p(w), be.view(mean, 0..rows), be.view(rstd, 0..rows), c) {
                    return true;
                }
            }
            let (dw, db) = weight_and_bias_grads(be, table, grads, w, bias);
            let (dinp, dout, inp) = (be.view_mut(dinp, rc.clone()), be.view(dout, rc.clone()), be.view(inp, rc.clone()));
            let (mean, rstd) = (be.view(mean, 0..rows), be.view(rstd, 0..rows));
            match copy {
                Some(copy) => be.layernorm_backward_and_copy(!set, dinp, be.view_mut(copy, rc.clone()), dw, db, dout, inp, p(w), mean, rstd, c),
                None if set => be.layernorm_backward_set(dinp, dw, db, dout, inp, p(w), mean, rstd, c),
                None => be.layernorm_backward(dinp, dw, db, dout, inp, p(w), mean, rstd, c),
            }
            false
        };

        let last = match block_acts.last() {
            Some(a) => block_output(a, cfg.ln_placement),
            None => &*encoded,
        };
        let dlnf = if lnf_grad_in_act { &s.dln_act } else { &s.dln };
        // pre-LN: the last block's fcproj reads this gradient next (none without blocks)
        let pre_ln = cfg.ln_placement == LayerNormPlacement::Pre;
        let lnf_copy = (pre_ln && !blocks.is_empty()).then_some(&mut s.dres_act);
        // the top block's fcproj reads ln_f's copy: its bias gradient from ln_f's pass where it can
        let top_fcproj_b = blocks.last().filter(|_| pre_ln).map(|bp| bp.fcproj_b);
        let mut fcproj_bias_done = ln_grad(true, grads, &mut s.dres, lnf_copy, top_fcproj_b, dlnf, last, lnf_mean, lnf_rstd, self.lnf_w, self.lnf_b);
        ready(be, grads, table.range(self.lnf_w).start..table.range(self.lnf_b).end);

        for (l, bp) in blocks.iter().enumerate().rev() {
            let a = &block_acts[l];
            let x = if l == 0 { &*encoded } else { block_output(&block_acts[l - 1], cfg.ln_placement) };
            // A residual add passes its gradient to both inputs unchanged: one input's gradient
            // is a copy (it accumulates more later), the branch reads the same buffer directly.
            // mlp_in: the MLP's input; dmlp_in ends up holding its full gradient
            // pre-LN needs no copies: LN2's input gradient is added onto dres in place (dres :=
            // dresid1), then LN1's (dres := dx). Each of those LayerNorm backwards (and ln_f's)
            // also writes the result into dres_act, an activation (bf16 on CUDA), which the
            // projection after it reads as dout (fcproj, attproj) with no conversion.
            let (mlp_in, dres_mlp, dfcproj) = match cfg.ln_placement {
                LayerNormPlacement::Pre => {
                    // resid2 = resid1 + fcproj: dfcproj = dres (its copy in dres_act);
                    // dresid1 = dres + LN2'(...) below
                    (&a.ln2, false, &s.dres_act)
                }
                LayerNormPlacement::Post => {
                    // out = LN2(resid2); resid2 = ln1 + fcproj: dln1 := dresid2, dfcproj = dresid2
                    ln_grad(true, grads, &mut s.dmid, None, None, &s.dres, &a.resid2, &a.ln2_mean, &a.ln2_rstd, bp.ln2_w, bp.ln2_b);
                    be.copy(be.view_mut(&mut s.dln, rc.clone()), be.view(&s.dmid, rc.clone()));
                    (&a.ln1, true, &s.dmid)
                }
            };
            // fcproj = fch_gelu @ W + b; fch_gelu = gelu(fch): dfch straight from the GEMM where
            // the backend fuses the GELU backward and fc's bias gradient into it (fc_b done),
            // else through dfch_gelu
            let [dw, db, dfc_b] = be.split_mut(grads, [table.range(bp.fcproj_w), table.range(bp.fcproj_b), table.range(bp.fc_b)]);
            let db = (!fcproj_bias_done).then_some(db);
            let fcproj = (be.view(dfcproj, rc.clone()), be.view(&a.fch_gelu, rc4.clone()), p(bp.fcproj_w), mm(rows, 4 * c, c));
            let mut fc_bias_done = be.matmul_dgelu_backward_fused(be.view_mut(&mut s.dfch, rc4.clone()), Some(dfc_b), dw, db, fcproj.0, fcproj.1, be.view(&a.fch, rc4.clone()), fcproj.2, fcproj.3);
            if !fc_bias_done {
                let (dw, db) = weight_and_bias_grads(be, table, grads, bp.fcproj_w, bp.fcproj_b);
                let db = (!fcproj_bias_done).then_some(db);
                be.matmul_backward_set_dinp(be.view_mut(&mut s.dfch_gelu, rc4.clone()), dw, db, fcproj.0, fcproj.1, fcproj.2, fcproj.3);
                // fc's bias gradient from the GELU backward's own pass where the backend can
                let (dfch, fch, dfch_gelu) = (be.view_mut(&mut s.dfch, rc4.clone()), be.view(&a.fch, rc4.clone()), be.view(&s.dfch_gelu, rc4.clone()));
                let dfc_b = be.view_mut(grads, table.range(bp.fc_b));
                fc_bias_done = be.gelu_backward_set_with_bias(dfch, dfc_b, fch, dfch_gelu, 4 * c);
                if !fc_bias_done {
                    be.gelu_backward_set(be.view_mut(&mut s.dfch, rc4.clone()), be.view(&a.fch, rc4.clone()), be.view(&s.dfch_gelu, rc4.clone()));
                }
            }
            // fch = mlp_in @ W + b; post-LN accumulates onto the residual gradient already in dln
            let (dw, db) = weight_and_bias_grads(be, table, grads, bp.fc_w, bp.fc_b);
            let db = (!fc_bias_done).then_some(db);
            let fc = (be.view(&s.dfch, rc4.clone()), be.view(mlp_in, rc.clone()), p(bp.fc_w), mm(rows, c, 4 * c));
            if dres_mlp {
                be.matmul_backward(Some(be.view_mut(&mut s.dln, rc.clone())), dw, db, fc.0, fc.1, fc.2, fc.3);
            } else {
                be.matmul_backward_set_dinp(be.view_mut(&mut s.dln_act, rc.clone()), dw, db, fc.0, fc.1, fc.2, fc.3);
            }
            // the gradient of resid1: in dres (pre-LN, in place; attproj reads its copy in
            // dres_act) or dmid (post-LN)
            // (pre-LN: attproj's bias gradient from LN2's pass where the backend sums it there)
            let (dresid1, attproj_bias_done) = match cfg.ln_placement {
                LayerNormPlacement::Pre => {
                    let done = ln_grad(false, grads, &mut s.dres, Some(&mut s.dres_act), Some(bp.proj_b), &s.dln_act, &a.resid1, &a.ln2_mean, &a.ln2_rstd, bp.ln2_w, bp.ln2_b);
                    (&s.dres_act, done)
                }
                LayerNormPlacement::Post => {
                    ln_grad(true, grads, &mut s.dmid, None, None, &s.dln, &a.resid1, &a.ln1_mean, &a.ln1_rstd, bp.ln1_w, bp.ln1_b);
                    // resid1 = x + attproj: dx := dresid1 (more below)
                    be.copy(be.view_mut(&mut s.dx, rc.clone()), be.view(&s.dmid, rc.clone()));
                    (&s.dmid, false)
                }
            };
            // attproj = atty @ W + b: dattproj = dresid1
            let (dw, db) = weight_and_bias_grads(be, table, grads, bp.proj_w, bp.proj_b);
            let db = (!attproj_bias_done).then_some(db);
            be.matmul_backward_set_dinp(be.view_mut(&mut s.datty, rc.clone()), dw, db, be.view(dresid1, rc.clone()), be.view(&a.atty, rc.clone()), p(bp.proj_w), mm(rows, c, c));
            // atty = attention(qkv); qkv's bias gradient summed by the attention backward as it
            // writes dqkv where the backend can (not with rotary positions, which turn dqkv after)
            let qkv_bias_done = self.rope_table.is_none()
                && be.attention_backward_set_with_bias(
                    QkvSource::Packed(be.view_mut(&mut s.dqkv, rc3.clone())),
                    be.view_mut(grads, table.range(bp.qkv_b)),
                    be.view(&s.datty, rc.clone()),
                    QkvSource::Packed(be.view(&a.qkv, rc3.clone())),
                    be.view(&a.atty, rc.clone()),
                    be.view(&a.att_saved, 0..saved_len),
                    attn,
                );
            if !qkv_bias_done {
                be.attention_backward_set(
                    QkvSource::Packed(be.view_mut(&mut s.dqkv, rc3.clone())),
                    be.view(&s.datty, rc.clone()),
                    QkvSource::Packed(be.view(&a.qkv, rc3.clone())),
                    be.view(&a.atty, rc.clone()),
                    be.view(&a.att_saved, 0..saved_len),
                    attn,
                );
            }
            // rotary: dq, dk turned back (the rotation's transpose) into the gradient of qkv
            if let Some(tab) = self.rope_table.as_ref() {
                be.rope(be.view_mut(&mut s.dqkv, rc3.clone()), be.view(tab, 0..be.len(tab)), rope, true);
            }
            // qkv = att_in @ W + b; att_in = LN1(x) (pre-LN) or x (post-LN)
            let (dw, db) = weight_and_bias_grads(be, table, grads, bp.qkv_w, bp.qkv_b);
            let db = (!qkv_bias_done).then_some(db);
            match cfg.ln_placement {
                LayerNormPlacement::Pre => {
                    be.matmul_backward_set_dinp(be.view_mut(&mut s.dln_act, rc.clone()), dw, db, be.view(&s.dqkv, rc3.clone()), be.view(&a.ln1, rc.clone()), p(bp.qkv_w), mm(rows, c, 3 * c));
                    // dres := dx = dresid1 + LN1'(dln), in place; copied into dres_act for the
                    // fcproj of block l - 1 (block 0's feeds the embeddings, which read f32 dres)
                    let copy = (l > 0).then_some(&mut s.dres_act);
                    let below_fcproj_b = l.checked_sub(1).map(|k| blocks[k].fcproj_b);
                    fcproj_bias_done = ln_grad(false, grads, &mut s.dres, copy, below_fcproj_b, &s.dln_act, x, &a.ln1_mean, &a.ln1_rstd, bp.ln1_w, bp.ln1_b);
                }
                LayerNormPlacement::Post => {
                    be.matmul_backward(Some(be.view_mut(&mut s.dx, rc.clone())), dw, db, be.view(&s.dqkv, rc3.clone()), be.view(x, rc.clone()), p(bp.qkv_w), mm(rows, c, 3 * c));
                    std::mem::swap(&mut s.dres, &mut s.dx);
                }
            }
            // every parameter of block l is final (pushed from ln_1.weight to mlp.c_proj.bias)
            ready(be, grads, table.range(bp.ln1_w).start..table.range(bp.fcproj_b).end);
        }

        // encoded = wte[tokens] + wpe[positions]
        be.embedding_backward(be.view_mut(grads, table.range(self.wte)), be.view(&s.dres, rc.clone()), &batch.tokens, c);
        let mut embeddings = table.reserved_range(self.wte);
        if let Some(wpe) = self.wpe {
            be.embedding_backward(be.view_mut(grads, table.range(wpe)), be.view(&s.dres, rc.clone()), &batch.positions, c);
            embeddings.end = table.reserved_range(wpe).end;
        }
        ready(be, grads, embeddings);
    }
}

/// Told by [`Gpt::backward_overlapped`] which range of the flat gradient became final.
pub type ReadyFn<'a, B> = dyn FnMut(&B, &mut <B as Backend>::Buf, std::ops::Range<usize>) + 'a;

/// The gradients of a weight and its bias, two disjoint ranges of the flat gradient buffer.
fn weight_and_bias_grads<'g, B: Backend>(
    be: &B,
    table: &ParamTable,
    grads: &'g mut B::Buf,
    w: ParamId,
    bias: ParamId,
) -> (B::ViewMut<'g>, B::ViewMut<'g>) {
    let [dw, db] = be.split_mut(grads, [table.range(w), table.range(bias)]);
    (dw, db)
}

/// The buffer holding a block's output: resid2 (pre-LN) or LN2(resid2) (post-LN).
fn block_output<B: Backend>(a: &BlockActs<B>, placement: LayerNormPlacement) -> &B::Buf {
    match placement {
        LayerNormPlacement::Pre => &a.resid2,
        LayerNormPlacement::Post => &a.ln2,
    }
}
