//! Generation with a key/value cache: a GPT that has read n tokens keeps each layer's keys and
//! values, so the next token costs one row through the blocks (and its attention n + 1 dot
//! products per head) instead of a forward pass over all n + 1 tokens. The ops are the
//! training forward's, in the same order, on the same backend: a prompt is read in one pass
//! (causal self-attention over its rows, as `Gpt::forward`), each token after it as one query
//! row against the cache (`QkvSource::Split`, keys and values `(Tk, 2C)`).

use crate::backend::{AttnShape, Backend, MatmulShape, QkvSource, RopeShape, WeightLayout};
use crate::error::EngineError;
use crate::model::gpt_config::{GptPositions, LayerNormPlacement};
use crate::model::rotary;
use crate::params::ParamId;

use super::{mm, Gpt};

/// Row buffers for a pass over `rows` new tokens, kept between calls and grown when a longer
/// pass comes (a prompt), so that one-token steps allocate no buffers (they upload their token
/// and position ids).
struct Rows<B: Backend> {
    cap: usize,
    x: B::Buf,      // (n, C) the residual stream entering a block
    ln: B::Buf,     // (n, C) a LayerNorm's output
    mean: B::Buf,   // (n)
    rstd: B::Buf,   // (n)
    qkv: B::Buf,    // (n, 3C)
    atty: B::Buf,   // (n, C)
    resid1: B::Buf, // (n, C)
    resid2: B::Buf, // (n, C) post-LN: the sum LN2 normalises
    fch: B::Buf,    // (n, 4C)
    gelu: B::Buf,   // (n, 4C)
    saved: B::Buf,  // attention's saved probabilities (unused: no backward)
    lnf: B::Buf,    // (1, C) the last row's final LayerNorm
    rope_step: B::Buf, // (hd) rotary: a step's one-position table
    logits: B::Buf, // (1, Vp) the last row's
}

/// A GPT reading a text token by token, its keys and values cached per layer.
pub struct Decoder<'m, B: Backend> {
    model: &'m Gpt<B>,
    /// Per layer, `(block_size, 2C)`: row p holds position p's `[k | v]` (k turned, with rotary
    /// positions), what `QkvSource::Split` reads as the keys and values.
    cache: Vec<B::Buf>,
    /// Tokens read so far (rows of the cache in use).
    len: usize,
    rows: Option<Rows<B>>,
    /// Rotary positions: the host table, from which a step takes its one position's row.
    rope_host: Option<Vec<f32>>,
}

impl<B: Backend> Gpt<B> {
    /// A decoder over this model's weights with an empty cache (`block_size` positions).
    pub fn decoder(&self) -> Decoder<'_, B> {
        let (c, t) = (self.cfg.n_embd, self.cfg.block_size);
        let cache = (0..self.cfg.n_layer).map(|_| self.be.activation_zeros(t * 2 * c)).collect();
        let rope_host = (self.cfg.positions == GptPositions::Rotary).then(|| rotary::table(t, c / self.cfg.n_head));
        Decoder { model: self, cache, len: 0, rows: None, rope_host }
    }
}

impl<B: Backend> Decoder<'_, B> {
    /// Tokens read so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many tokens the cache holds at most: the model's positions.
    pub fn capacity(&self) -> usize {
        self.model.cfg.block_size
    }

    /// Forgets what was read (the next `feed` starts at position 0).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Reads `tokens` after what was read before and returns the logits (V, the head's padding
    /// left out) of the last of them: the distribution of the token after it. Positions run on
    /// from `len()`; past `capacity()` the call is refused and nothing is read.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let cfg = &self.model.cfg;
        if tokens.is_empty() {
            return Err(EngineError::Batch("no tokens to read".into()));
        }
        if self.len + tokens.len() > cfg.block_size {
            return Err(EngineError::Batch(format!(
                "{} tokens after {} read exceed the model's block_size {}",
                tokens.len(),
                self.len,
                cfg.block_size
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= cfg.vocab_size) {
            return Err(EngineError::Batch(format!("token id {bad} outside the vocabulary of {}", cfg.vocab_size)));
        }
        if self.len == 0 {
            // a prompt: every row at once, causal self-attention among them
            self.pass(tokens)
        } else {
            // after it: one query row at a time against the cache (tokens.len() is 1 when
            // generating; a longer piece takes its tokens in turn)
            let mut logits = Vec::new();
            for &tok in tokens {
                logits = self.pass(&[tok])?;
            }
            Ok(logits)
        }
    }

    /// One pass over n new tokens at positions len..len+n: n == 1, or len == 0 (a prompt).
    fn pass(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let Decoder { model, cache, len, rows, rope_host } = self;
        let Gpt { be, cfg, table, params, blocks, head_mask, rope_table, .. } = *model;
        let (n, c, start) = (tokens.len(), cfg.n_embd, *len);
        debug_assert!(n == 1 || start == 0);
        let attn = if start == 0 {
            AttnShape { batch: 1, q_len: n, kv_len: n, channels: c, heads: cfg.n_head, causal: true }
        } else {
            AttnShape { batch: 1, q_len: 1, kv_len: start + 1, channels: c, heads: cfg.n_head, causal: false }
        };
        let saved_len = be.attention_saved_len(attn);
        if rows.as_ref().is_none_or(|r| r.cap < n || be.len(&r.saved) < saved_len) {
            let cap = n.max(rows.as_ref().map_or(0, |r| r.cap));
            // room for this pass and for any one-token step up to the last position, so that
            // steps after a prompt never reallocate
            let last_step = AttnShape { batch: 1, q_len: 1, kv_len: cfg.block_size, channels: c, heads: cfg.n_head, causal: false };
            let saved = saved_len.max(be.attention_saved_len(last_step)).max(rows.as_ref().map_or(0, |r| be.len(&r.saved)));
            *rows = None; // the old buffers go first
            *rows = Some(Rows::alloc(be, cfg.ln_placement, c, c / cfg.n_head, cfg.head_rows(), cap, saved));
        }
        let r = rows.as_mut().unwrap();
        let (rc, rc3, rc4) = (0..n * c, 0..n * 3 * c, 0..n * 4 * c);
        let p = |id: ParamId| be.view(params, table.range(id));

        // x = wte[tokens] + wpe[positions]                   // (n, C); rotary: wte[tokens]
        let positions: Vec<u32> = (start as u32..(start + n) as u32).collect();
        be.embedding_forward(be.view_mut(&mut r.x, rc.clone()), &be.upload_ids(tokens), p(model.wte), c, false);
        if let Some(wpe) = model.wpe {
            be.embedding_forward(be.view_mut(&mut r.x, rc.clone()), &be.upload_ids(&positions), p(wpe), c, true);
        }
        // rotary: a prompt turns by the model's table; a step by its one position's row
        // (cosines then sines, a table of one position), written into the step's buffer
        let step_table = match (rope_host.as_ref(), start) {
            (Some(host), s) if s > 0 => {
                let half = c / cfg.n_head / 2;
                let t_max = host.len() / (2 * half);
                let row: Vec<f32> = host[s * half..][..half].iter().chain(&host[t_max * half + s * half..][..half]).copied().collect();
                be.write(be.view_mut(&mut r.rope_step, 0..2 * half), &row);
                Some(&r.rope_step)
            }
            _ => None,
        };
        let rope = RopeShape { rows: n, seq_len: n, channels: c, heads: cfg.n_head };

        for (bp, kv) in blocks.iter().zip(cache.iter_mut()) {
            let ln = |be: &B, out: &mut B::Buf, mean: &mut B::Buf, rstd: &mut B::Buf, inp: B::View<'_>, w, b| {
                be.layernorm_forward(be.view_mut(out, rc.clone()), be.view_mut(mean, 0..n), be.view_mut(rstd, 0..n), inp, p(w), p(b), c)
            };
            // attention input: LN1(x) (pre-LN) or x (post-LN)
            let pre = cfg.ln_placement == LayerNormPlacement::Pre;
            if pre {
                ln(be, &mut r.ln, &mut r.mean, &mut r.rstd, be.view(&r.x, rc.clone()), bp.ln1_w, bp.ln1_b);
            }
            let att_in = if pre { be.view(&r.ln, rc.clone()) } else { be.view(&r.x, rc.clone()) };
            // qkv = att_in @ c_attn + b                      // (n, 3C)
            be.matmul_forward(be.view_mut(&mut r.qkv, rc3.clone()), att_in, p(bp.qkv_w), Some(p(bp.qkv_b)), mm(n, c, 3 * c));
            match (&step_table, rope_table) {
                (Some(step), _) => be.rope(be.view_mut(&mut r.qkv, rc3.clone()), be.view(step, 0..be.len(step)), rope, false),
                (None, Some(full)) => be.rope(be.view_mut(&mut r.qkv, rc3.clone()), be.view(full, 0..be.len(full)), rope, false),
                (None, None) => {}
            }
            // the new rows' [k | v] (the last 2C of each [q | k | v] row) into the cache
            for i in 0..n {
                let (src, at) = ((i * 3 + 1) * c..(i + 1) * 3 * c, (start + i) * 2 * c);
                be.copy(be.view_mut(kv, at..at + 2 * c), be.view(&r.qkv, src));
            }
            // atty = attention                               // (n, C)
            let src = if start == 0 {
                QkvSource::Packed(be.view(&r.qkv, rc3.clone()))
            } else {
                QkvSource::Split { q: be.view(&r.qkv, 0..c), kv: be.view(kv, 0..(start + 1) * 2 * c) }
            };
            be.attention_forward(be.view_mut(&mut r.atty, rc.clone()), be.view_mut(&mut r.saved, 0..saved_len), src, attn);
            // resid1 = x + (atty @ c_proj + b)
            be.matmul_forward_residual(be.view_mut(&mut r.resid1, rc.clone()), be.view(&r.x, rc.clone()), be.view(&r.atty, rc.clone()), p(bp.proj_w), Some(p(bp.proj_b)), mm(n, c, c));
            // mlp input: LN2(resid1) (pre-LN) or LN1(resid1) (post-LN)
            let (w, b) = if pre { (bp.ln2_w, bp.ln2_b) } else { (bp.ln1_w, bp.ln1_b) };
            ln(be, &mut r.ln, &mut r.mean, &mut r.rstd, be.view(&r.resid1, rc.clone()), w, b);
            // gelu = GELU(mlp_in @ c_fc + b)                 // (n, 4C)
            let fc = (be.view(&r.ln, rc.clone()), p(bp.fc_w), Some(p(bp.fc_b)), mm(n, c, 4 * c));
            if !be.matmul_gelu_forward_fused(be.view_mut(&mut r.gelu, rc4.clone()), be.view_mut(&mut r.fch, rc4.clone()), fc.0, fc.1, fc.2, fc.3) {
                be.matmul_forward(be.view_mut(&mut r.fch, rc4.clone()), fc.0, fc.1, fc.2, fc.3);
                be.gelu_forward(be.view_mut(&mut r.gelu, rc4.clone()), be.view(&r.fch, rc4.clone()));
            }
            // the block's output, the next block's x: resid1 + mlp (pre-LN), or
            // LN2(LN1(resid1) + mlp) (post-LN)
            let residual = if pre { be.view(&r.resid1, rc.clone()) } else { be.view(&r.ln, rc.clone()) };
            let fcproj = |be: &B, out: &mut B::Buf, residual: B::View<'_>| {
                be.matmul_forward_residual(be.view_mut(out, rc.clone()), residual, be.view(&r.gelu, rc4.clone()), p(bp.fcproj_w), Some(p(bp.fcproj_b)), mm(n, 4 * c, c))
            };
            if pre {
                fcproj(be, &mut r.x, residual);
            } else {
                fcproj(be, &mut r.resid2, residual);
                ln(be, &mut r.x, &mut r.mean, &mut r.rstd, be.view(&r.resid2, rc.clone()), bp.ln2_w, bp.ln2_b);
            }
        }

        // the last row only: lnf = LN_f(x[n-1]); logits = lnf @ wte^T (+ mask)   // (1, Vp)
        let last = (n - 1) * c..n * c;
        be.layernorm_forward(be.view_mut(&mut r.lnf, 0..c), be.view_mut(&mut r.mean, 0..1), be.view_mut(&mut r.rstd, 0..1), be.view(&r.x, last), p(model.lnf_w), p(model.lnf_b), c);
        let vp = cfg.head_rows();
        let head = MatmulShape { rows: 1, in_features: c, out_features: vp, layout: WeightLayout::OutIn };
        let mask = head_mask.as_ref().map(|m| be.view(m, 0..vp));
        be.matmul_forward(be.view_mut(&mut r.logits, 0..vp), be.view(&r.lnf, 0..c), be.view(params, table.reserved_range(model.wte)), mask, head);
        *len += n;
        Ok(be.download(be.view(&r.logits, 0..cfg.vocab_size)))
    }
}

impl<B: Backend> Rows<B> {
    /// Buffers typed as the training forward's (activations where it keeps activations: bf16 on
    /// CUDA with bf16 matmuls), so every op sees the element types it is written for.
    fn alloc(be: &B, placement: LayerNormPlacement, c: usize, hd: usize, vp: usize, n: usize, saved: usize) -> Rows<B> {
        let act = |len: usize| be.activation_zeros(len);
        Rows {
            cap: n,
            x: be.zeros(n * c),
            // pre-LN's LayerNorm outputs feed matmuls only; post-LN's also the residual
            ln: match placement {
                LayerNormPlacement::Pre => act(n * c),
                LayerNormPlacement::Post => be.zeros(n * c),
            },
            mean: be.zeros(n),
            rstd: be.zeros(n),
            qkv: act(n * 3 * c),
            atty: act(n * c),
            resid1: be.zeros(n * c),
            resid2: match placement {
                LayerNormPlacement::Pre => be.zeros(0),
                LayerNormPlacement::Post => be.zeros(n * c),
            },
            fch: act(n * 4 * c),
            gelu: act(n * 4 * c),
            saved: be.zeros(saved),
            lnf: be.zeros(c),
            rope_step: be.zeros(hd),
            logits: act(vp),
        }
    }
}
