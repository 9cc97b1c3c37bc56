//! Building blocks shared by the encoder models (BERT, T5): PyTorch-layout linears, LayerNorm,
//! and a residual *sublayer* (self-attention, cross-attention or GELU FFN) with LayerNorm before
//! (pre-LN: `x + f(LN(x))`) or after (post-LN: `LN(x + f(x))`) the residual add. A `Stack` is a
//! sequence of sublayers (an encoder layer is [self-attn, ffn], a decoder layer is
//! [causal self-attn, cross-attn, ffn]). Each piece has its forward beside its backward, written
//! against `Backend`; activations are sized exactly for the current batch. A training pass may
//! drop out each sublayer's output before its residual add (`forward_with_dropout`; BERT uses
//! it, T5 does not).

use std::ops::Range;

use crate::backend::{AttnShape, Backend, Dropout, MatmulShape, QkvSource, ScoreKind, Scores, WeightLayout};
use crate::model::bert_config::Positions;
use crate::model::gpt::ReadyFn;
use crate::model::gpt_config::LayerNormPlacement;
use crate::params::{Init, ParamKind, ParamTable};

/// Read access to the parameters: backend and flat buffer.
pub(crate) struct Ctx<'a, B: Backend> {
    pub be: &'a B,
    pub params: &'a B::Buf,
}

impl<'a, B: Backend> Ctx<'a, B> {
    pub fn p(&self, r: &Range<usize>) -> B::View<'a> {
        self.be.view(self.params, r.clone())
    }
}

pub(crate) fn all<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> B::View<'a> {
    be.view(buf, 0..be.len(buf))
}
pub(crate) fn all_mut<'a, B: Backend>(be: &B, buf: &'a mut B::Buf) -> B::ViewMut<'a> {
    let n = be.len(buf);
    be.view_mut(buf, 0..n)
}
pub(crate) fn zero<B: Backend>(be: &B, buf: &mut B::Buf) {
    be.fill(all_mut(be, buf), 0.0)
}

/// How a backward op delivers an input's gradient: written over the buffer (`Set`: no zero
/// fill first), or added to the gradient the buffer already holds (`Add`: a second path into
/// the same input, such as the other side of a residual add).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grad {
    Set,
    Add,
}

impl Grad {
    /// `Set` for the first writer of a buffer, `Add` once it holds a gradient.
    pub fn after(written: bool) -> Grad {
        if written {
            Grad::Add
        } else {
            Grad::Set
        }
    }
}

/// The dropout of one training pass: site k (the embedding, a sublayer's output, ...) of `len`
/// elements draws its mask at counters `[(first + k) * len, (first + k + 1) * len)` under the
/// pass's seed, so no two sites of a pass share a mask, and a rerun of the pass draws the same.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DropoutPass {
    pub p: f32,
    pub seed: u64,
    /// Site index of the first site this pass covers (a stack after an embedding site: 1).
    pub first: usize,
}

impl DropoutPass {
    pub fn site(&self, k: usize, len: usize) -> Dropout {
        Dropout { p: self.p, seed: self.seed, offset: ((self.first + k) as u64).wrapping_mul(len as u64) }
    }
}

/// `y (N, out) = x (N, in) @ W^T + b` with W `(out, in)` (PyTorch `Linear`). Several tensors
/// pushed back to back (HF BERT's query, key and value) form one fused weight.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    pub w: Range<usize>,
    pub b: Range<usize>,
    pub inp: usize,
    pub out: usize,
}

impl Linear {
    /// Pushes `{name}.weight (out, in)` and `{name}.bias (out)` for each name, weights first, so
    /// the weights (and the biases) are contiguous and act as one `(n*out, in)` linear.
    pub fn push(t: &mut ParamTable, names: &[&str], inp: usize, out: usize, std: f32) -> Linear {
        let ws: Vec<_> = names.iter().map(|n| t.push(&format!("{n}.weight"), &[out, inp], ParamKind::Weight, Init::Normal { std })).collect();
        let bs: Vec<_> = names.iter().map(|n| t.push(&format!("{n}.bias"), &[out], ParamKind::Bias, Init::Zeros)).collect();
        let span = |ids: &[usize]| t.range(ids[0]).start..t.range(*ids.last().unwrap()).end;
        Linear { w: span(&ws), b: span(&bs), inp, out: out * names.len() }
    }

    fn shape(&self, rows: usize) -> MatmulShape {
        MatmulShape { rows, in_features: self.inp, out_features: self.out, layout: WeightLayout::OutIn }
    }

    pub fn forward<B: Backend>(&self, cx: &Ctx<B>, out: &mut B::Buf, x: &B::Buf, rows: usize) {
        let be = cx.be;
        be.matmul_forward(all_mut(be, out), all(be, x), cx.p(&self.w), Some(cx.p(&self.b)), self.shape(rows));
    }

    /// `pre = x W^T + b`, `out = gelu(pre)`: an FFN's up-projection and its GELU, one op where
    /// the backend fuses them (`Backend::matmul_gelu_forward_fused`).
    pub fn forward_gelu<B: Backend>(&self, cx: &Ctx<B>, out: &mut B::Buf, pre: &mut B::Buf, x: &B::Buf, rows: usize) {
        let be = cx.be;
        let (x, w, b, shape) = (all(be, x), cx.p(&self.w), Some(cx.p(&self.b)), self.shape(rows));
        if !be.matmul_gelu_forward_fused(all_mut(be, out), all_mut(be, pre), x, w, b, shape) {
            be.matmul_forward(all_mut(be, pre), x, w, b, shape);
            be.gelu_forward(all_mut(be, out), all(be, pre));
        }
    }

    /// `dx = dy W` (`Set`) or `dx += dy W` (`Add`); `dW += dy^T x`, `db += sum dy`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(&self, cx: &Ctx<B>, grads: &mut B::Buf, dx: &mut B::Buf, mode: Grad, dy: &B::Buf, x: &B::Buf, rows: usize) {
        self.backward_bias(cx, grads, dx, mode, dy, x, rows, true)
    }

    /// `backward`, with the bias gradient only when `bias` (else already accumulated, as by
    /// `backward_dgelu`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_bias<B: Backend>(&self, cx: &Ctx<B>, grads: &mut B::Buf, dx: &mut B::Buf, mode: Grad, dy: &B::Buf, x: &B::Buf, rows: usize, bias: bool) {
        let be = cx.be;
        let [dw, db] = be.split_mut(grads, [self.w.clone(), self.b.clone()]);
        let db = if bias { Some(db) } else { None };
        let (dx, dy, x, w, shape) = (all_mut(be, dx), all(be, dy), all(be, x), cx.p(&self.w), self.shape(rows));
        match mode {
            Grad::Set => be.matmul_backward_set_dinp(dx, dw, db, dy, x, w, shape),
            Grad::Add => be.matmul_backward(Some(dx), dw, db, dy, x, w, shape),
        }
    }

    /// The backward pass of this linear over `act = gelu(pre)`, where `pre` came from the
    /// up-projection `up`: `dpre = gelu'(pre) * (dy W)` (overwritten), this linear's dW and db,
    /// and, where the backend fuses it all (`Backend::matmul_dgelu_backward_fused`, or the GELU
    /// backward with the column sums, `Backend::gelu_backward_set_with_bias`), `up`'s bias
    /// gradient too. Returns whether `up`'s bias gradient is done; `dact` is the scratch for
    /// d(act) the unfused path takes.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_dgelu<B: Backend>(
        &self,
        cx: &Ctx<B>,
        grads: &mut B::Buf,
        dpre: &mut B::Buf,
        dact: &mut B::Buf,
        dy: &B::Buf,
        act: &B::Buf,
        pre: &B::Buf,
        up: &Linear,
        rows: usize,
    ) -> bool {
        let be = cx.be;
        let [dw, db, dup_b] = be.split_mut(grads, [self.w.clone(), self.b.clone(), up.b.clone()]);
        let (w, shape) = (cx.p(&self.w), self.shape(rows));
        if be.matmul_dgelu_backward_fused(all_mut(be, dpre), Some(dup_b), dw, Some(db), all(be, dy), all(be, act), all(be, pre), w, shape) {
            return true;
        }
        self.backward(cx, grads, dact, Grad::Set, dy, act, rows);
        // up's bias gradient from the GELU backward's own pass where the backend can
        let cols = self.shape(rows).in_features;
        if be.gelu_backward_set_with_bias(all_mut(be, dpre), be.view_mut(grads, up.b.clone()), all(be, pre), all(be, dact), cols) {
            return true;
        }
        be.gelu_backward_set(all_mut(be, dpre), all(be, pre), all(be, dact));
        false
    }
}

/// LayerNorm parameters `{name}.weight`, `{name}.bias` (C).
#[derive(Clone, Debug)]
pub(crate) struct Norm {
    pub w: Range<usize>,
    pub b: Range<usize>,
    pub c: usize,
}

/// LayerNorm output and its saved statistics.
pub(crate) struct NormActs<B: Backend> {
    pub out: B::Buf,  // (N, C)
    pub mean: B::Buf, // (N)
    pub rstd: B::Buf, // (N)
}

impl Norm {
    pub fn push(t: &mut ParamTable, name: &str, c: usize) -> Norm {
        let w = t.push(&format!("{name}.weight"), &[c], ParamKind::Norm, Init::Ones);
        let b = t.push(&format!("{name}.bias"), &[c], ParamKind::Norm, Init::Zeros);
        Norm { w: t.range(w), b: t.range(b), c }
    }

    pub fn alloc<B: Backend>(&self, be: &B, rows: usize) -> NormActs<B> {
        NormActs { out: be.zeros(rows * self.c), mean: be.zeros(rows), rstd: be.zeros(rows) }
    }

    /// As `alloc`, with the output in the backend's activation storage (bf16 on CUDA): for a
    /// LayerNorm whose output only matmuls read (see `Backend::activation_zeros`).
    pub fn alloc_matmul_input<B: Backend>(&self, be: &B, rows: usize) -> NormActs<B> {
        NormActs { out: be.activation_zeros(rows * self.c), mean: be.zeros(rows), rstd: be.zeros(rows) }
    }

    pub fn forward<B: Backend>(&self, cx: &Ctx<B>, a: &mut NormActs<B>, x: &B::Buf) {
        let be = cx.be;
        be.layernorm_forward(all_mut(be, &mut a.out), all_mut(be, &mut a.mean), all_mut(be, &mut a.rstd), all(be, x), cx.p(&self.w), cx.p(&self.b), self.c);
    }

    /// `dx += LN'(dy)`, and the parameter gradients.
    pub fn backward<B: Backend>(&self, cx: &Ctx<B>, grads: &mut B::Buf, dx: &mut B::Buf, dy: &B::Buf, x: &B::Buf, a: &NormActs<B>) {
        let be = cx.be;
        let [dw, db] = be.split_mut(grads, [self.w.clone(), self.b.clone()]);
        be.layernorm_backward(all_mut(be, dx), dw, db, all(be, dy), all(be, x), cx.p(&self.w), all(be, &a.mean), all(be, &a.rstd), self.c);
    }

    /// `backward`, also writing the final dx into `copy`, an activation buffer (bf16 on CUDA) that
    /// the next GEMM reads as its dout without a conversion (`layernorm_backward_and_copy`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_copy<B: Backend>(&self, cx: &Ctx<B>, grads: &mut B::Buf, dx: &mut B::Buf, copy: &mut B::Buf, dy: &B::Buf, x: &B::Buf, a: &NormActs<B>) {
        let be = cx.be;
        let [dw, db] = be.split_mut(grads, [self.w.clone(), self.b.clone()]);
        be.layernorm_backward_and_copy(true, all_mut(be, dx), all_mut(be, copy), dw, db, all(be, dy), all(be, x), cx.p(&self.w), all(be, &a.mean), all(be, &a.rstd), self.c);
    }

    /// `dx = LN'(dy)` written over dx (no zero fill first), and the parameter gradients.
    pub fn backward_set<B: Backend>(&self, cx: &Ctx<B>, grads: &mut B::Buf, dx: &mut B::Buf, dy: &B::Buf, x: &B::Buf, a: &NormActs<B>) {
        let be = cx.be;
        let [dw, db] = be.split_mut(grads, [self.w.clone(), self.b.clone()]);
        be.layernorm_backward_set(all_mut(be, dx), dw, db, all(be, dy), all(be, x), cx.p(&self.w), all(be, &a.mean), all(be, &a.rstd), self.c);
    }
}

/// The learned parameters of an attention score.
#[derive(Clone, Debug)]
pub(crate) enum ScoreParams {
    Dot,
    /// `(H, hd, hd)`, initialised to the identity (so training starts from the dot score).
    General { w: Range<usize> },
    /// `(H, hd, A)`, `(H, hd, A)`, `(H, A)`.
    Additive { wq: Range<usize>, wk: Range<usize>, v: Range<usize>, width: usize },
}

impl ScoreParams {
    /// Pushes `{prefix}.score.*` for the kind. The general score's W is pushed as a `Norm`-kind
    /// tensor (never decayed): decay would pull it from the identity towards zero.
    pub fn push(t: &mut ParamTable, prefix: &str, kind: ScoreKind, heads: usize, hd: usize, width: usize) -> ScoreParams {
        match kind {
            ScoreKind::Dot => ScoreParams::Dot,
            ScoreKind::General => {
                let w = t.push(&format!("{prefix}.score.weight"), &[heads, hd, hd], ParamKind::Norm, Init::Zeros);
                ScoreParams::General { w: t.range(w) }
            }
            ScoreKind::Additive => {
                let std = 1.0 / (hd as f32).sqrt();
                let wq = t.push(&format!("{prefix}.score.wq"), &[heads, hd, width], ParamKind::Weight, Init::Normal { std });
                let wk = t.push(&format!("{prefix}.score.wk"), &[heads, hd, width], ParamKind::Weight, Init::Normal { std });
                let v = t.push(&format!("{prefix}.score.v"), &[heads, width], ParamKind::Weight, Init::Normal { std: 1.0 / (width as f32).sqrt() });
                ScoreParams::Additive { wq: t.range(wq), wk: t.range(wk), v: t.range(v), width }
            }
        }
    }

    /// Writes the identity into a general score's W (its table init is zeros).
    pub fn init_host(&self, host: &mut [f32], heads: usize, hd: usize) {
        if let ScoreParams::General { w } = self {
            let w = &mut host[w.clone()];
            w.fill(0.0);
            for h in 0..heads {
                for d in 0..hd {
                    w[h * hd * hd + d * hd + d] = 1.0;
                }
            }
        }
    }

    fn views<'a, B: Backend>(&self, cx: &Ctx<'a, B>) -> Scores<B::View<'a>> {
        match self {
            ScoreParams::Dot => Scores::Dot,
            ScoreParams::General { w } => Scores::General { w: cx.p(w) },
            ScoreParams::Additive { wq, wk, v, width } => Scores::Additive { wq: cx.p(wq), wk: cx.p(wk), v: cx.p(v), width: *width },
        }
    }

    fn grads<'g, B: Backend>(&self, be: &B, grads: &'g mut B::Buf) -> Scores<B::ViewMut<'g>> {
        match self {
            ScoreParams::Dot => Scores::Dot,
            ScoreParams::General { w } => Scores::General { w: be.view_mut(grads, w.clone()) },
            ScoreParams::Additive { wq, wk, v, width } => {
                let [wq, wk, v] = be.split_mut(grads, [wq.clone(), wk.clone(), v.clone()]);
                Scores::Additive { wq, wk, v, width: *width }
            }
        }
    }
}

/// What a sublayer computes from its (normalised or raw) input.
#[derive(Clone, Debug)]
pub(crate) enum Inner {
    /// `proj(attention(qkv(x)))`; `causal` for decoders.
    SelfAttn { qkv: Linear, proj: Linear, scores: ScoreParams, causal: bool },
    /// `proj(attention(q(x), kv(memory)))`: queries from the stream, keys/values from the encoder.
    CrossAttn { q: Linear, kv: Linear, proj: Linear, scores: ScoreParams },
    /// `proj(gelu(fc(x)))`.
    Ffn { fc: Linear, proj: Linear },
}

#[derive(Clone, Debug)]
pub(crate) struct Sublayer {
    pub ln: Norm,
    pub inner: Inner,
}

impl Sublayer {
    /// The ranges of the flat buffer this sublayer's parameters occupy: final once its
    /// backward is done (`Stack::backward_with_dropout` reports them then).
    pub fn param_ranges(&self) -> Vec<Range<usize>> {
        let lin = |l: &Linear| [l.w.clone(), l.b.clone()];
        let mut r = vec![self.ln.w.clone(), self.ln.b.clone()];
        let scores = |s: &ScoreParams| match s {
            ScoreParams::Dot => vec![],
            ScoreParams::General { w } => vec![w.clone()],
            ScoreParams::Additive { wq, wk, v, .. } => vec![wq.clone(), wk.clone(), v.clone()],
        };
        match &self.inner {
            Inner::SelfAttn { qkv, proj, scores: sc, .. } => {
                r.extend(lin(qkv).into_iter().chain(lin(proj)).chain(scores(sc)));
            }
            Inner::CrossAttn { q, kv, proj, scores: sc } => {
                r.extend(lin(q).into_iter().chain(lin(kv)).chain(lin(proj)).chain(scores(sc)));
            }
            Inner::Ffn { fc, proj } => r.extend(lin(fc).into_iter().chain(lin(proj))),
        }
        r
    }
}

/// Batch geometry of a stack: its own rows (B*T), the memory's rows (B*Tm) for cross-attention.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    /// Memory (encoder output) length; equals `t` when there is no memory.
    pub tm: usize,
    pub c: usize,
    pub heads: usize,
}

impl Dims {
    fn rows(&self) -> usize {
        self.b * self.t
    }
    fn attn(&self, kv_len: usize, causal: bool) -> AttnShape {
        AttnShape { batch: self.b, q_len: self.t, kv_len, channels: self.c, heads: self.heads, causal }
    }
}

/// Activations of one sublayer. pre-LN: ln = LN(x), f = inner(ln), resid = x + f (output);
/// post-LN: f = inner(x), resid = x + f, ln = LN(resid) (output).
pub(crate) struct SubActs<B: Backend> {
    ln: NormActs<B>,
    /// attention: qkv (N, 3C) or q (N, C); ffn: fc output (N, F)
    a: B::Buf,
    /// cross-attention: kv (Nm, 2C); ffn: gelu output (N, F); self-attention: unused
    b: B::Buf,
    /// attention output before its projection (N, C)
    att: B::Buf,
    saved: B::Buf,
    f: B::Buf,     // (N, C)
    resid: B::Buf, // (N, C)
}

/// Where the attention probabilities of one sublayer are, for attention maps.
pub(crate) fn saved_probs<B: Backend>(a: &SubActs<B>) -> &B::Buf {
    &a.saved
}

/// Gradient scratch for one stack, exactly sized.
pub(crate) struct Scratch<B: Backend> {
    g: B::Buf,     // (N, C) gradient of the current sublayer's output, then of its input
    g_act: B::Buf, // (N, C) pre-LN: g as an activation (the projections' dout); (0) post-LN
    gnext: B::Buf, // (N, C) post-LN: the gradient of the sublayer's input being collected
    df: B::Buf,    // (N, C) f's gradient under dropout; in a forward with dropout: dropout(f)
    dfin: B::Buf,  // (N, C)
    datt: B::Buf,  // (N, C)
    dqkv: B::Buf,  // (N, 3C)
    dq: B::Buf,    // (N, C)
    dkv: B::Buf,   // (Nm, 2C)
    dh: B::Buf,    // (N, F)
    dhg: B::Buf,   // (N, F)
}

pub(crate) struct StackActs<B: Backend> {
    pub subs: Vec<SubActs<B>>,
    scratch: Scratch<B>,
}

/// Key lengths of a stack's self-attention and of its cross-attention memory; `None` when every
/// sequence is full (the plain attention path, which every backend has).
#[derive(Clone, Copy)]
pub(crate) struct Lens<'a, B: Backend> {
    pub own: Option<&'a B::Ids>,
    pub memory: Option<&'a B::Ids>,
}

#[derive(Clone, Debug)]
pub(crate) struct Stack {
    pub subs: Vec<Sublayer>,
    pub placement: LayerNormPlacement,
    /// FFN width.
    pub ffn: usize,
}

impl Stack {
    pub fn alloc<B: Backend>(&self, be: &B, d: Dims) -> StackActs<B> {
        let (n, nm, c, f) = (d.rows(), d.b * d.tm, d.c, self.ffn);
        let z = |k: usize| be.zeros(k);
        // Attention's q, k, v and output, the FFN's hidden layer (fc output, GELU output) and
        // their gradients, and pre-LN's LayerNorm outputs are read only by matmuls, attention
        // and GELU: activation storage (bf16 on CUDA). Post-LN's LayerNorm output is the
        // sublayer's output (residual adds): f32.
        let act = |k: usize| be.activation_zeros(k);
        let pre = self.placement == LayerNormPlacement::Pre;
        let subs = self
            .subs
            .iter()
            .map(|s| {
                let (a, b, att, saved) = match &s.inner {
                    Inner::SelfAttn { causal, .. } => (act(n * 3 * c), z(0), act(n * c), z(be.attention_saved_len(d.attn(d.t, *causal)))),
                    Inner::CrossAttn { .. } => (act(n * c), act(nm * 2 * c), act(n * c), z(be.attention_saved_len(d.attn(d.tm, false)))),
                    Inner::Ffn { .. } => (act(n * f), act(n * f), z(0), z(0)),
                };
                let ln = if pre { s.ln.alloc_matmul_input(be, n) } else { s.ln.alloc(be, n) };
                SubActs { ln, a, b, att, saved, f: z(n * c), resid: z(n * c) }
            })
            .collect();
        let scratch = Scratch {
            g: z(n * c),
            g_act: if pre { act(n * c) } else { z(0) },
            gnext: z(n * c),
            df: z(n * c),
            dfin: z(n * c),
            datt: act(n * c),
            dqkv: act(n * 3 * c),
            dq: act(n * c),
            dkv: act(nm * 2 * c),
            dh: act(n * f),
            dhg: act(n * f),
        };
        StackActs { subs, scratch }
    }

    /// The buffer holding a sublayer's output.
    fn sub_out<'a, B: Backend>(&self, a: &'a SubActs<B>) -> &'a B::Buf {
        match self.placement {
            LayerNormPlacement::Pre => &a.resid,
            LayerNormPlacement::Post => &a.ln.out,
        }
    }

    /// The stack's output: the last sublayer's output (or `x` for an empty stack).
    pub fn output<'a, B: Backend>(&self, acts: &'a StackActs<B>, x: &'a B::Buf) -> &'a B::Buf {
        acts.subs.last().map_or(x, |a| self.sub_out(a))
    }

    pub fn forward<B: Backend>(&self, cx: &Ctx<B>, acts: &mut StackActs<B>, x: &B::Buf, memory: Option<&B::Buf>, lens: Lens<B>, d: Dims) {
        self.forward_with_dropout(cx, acts, x, memory, lens, d, None)
    }

    /// `forward`, with sublayer i's output `f` replaced by `dropout(f)` (site i of `dropout`)
    /// before the residual add. `None`: exactly `forward`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_dropout<B: Backend>(
        &self,
        cx: &Ctx<B>,
        acts: &mut StackActs<B>,
        x: &B::Buf,
        memory: Option<&B::Buf>,
        lens: Lens<B>,
        d: Dims,
        dropout: Option<DropoutPass>,
    ) {
        let be = cx.be;
        for (i, sub) in self.subs.iter().enumerate() {
            let (done, rest) = acts.subs.split_at_mut(i);
            let inp = if i == 0 { x } else { self.sub_out(&done[i - 1]) };
            let a = &mut rest[0];
            // f's input: LN(x) (pre-LN) or x (post-LN)
            if self.placement == LayerNormPlacement::Pre {
                sub.ln.forward(cx, &mut a.ln, inp);
            }
            let fin = if self.placement == LayerNormPlacement::Pre { &a.ln.out } else { inp };
            match &sub.inner {
                Inner::SelfAttn { qkv, proj, scores, causal } => {
                    qkv.forward(cx, &mut a.a, fin, d.rows()); // (N, 3C)
                    let key_lens = if *causal { None } else { lens.own };
                    be.attention_ex_forward(all_mut(be, &mut a.att), all_mut(be, &mut a.saved), QkvSource::Packed(all(be, &a.a)), scores.views(cx), key_lens, d.attn(d.t, *causal));
                    proj.forward(cx, &mut a.f, &a.att, d.rows());
                }
                Inner::CrossAttn { q, kv, proj, scores } => {
                    let mem = memory.expect("cross-attention needs a memory");
                    q.forward(cx, &mut a.a, fin, d.rows()); // (N, C)
                    kv.forward(cx, &mut a.b, mem, d.b * d.tm); // (Nm, 2C)
                    be.attention_ex_forward(
                        all_mut(be, &mut a.att),
                        all_mut(be, &mut a.saved),
                        QkvSource::Split { q: all(be, &a.a), kv: all(be, &a.b) },
                        scores.views(cx),
                        lens.memory,
                        d.attn(d.tm, false),
                    );
                    proj.forward(cx, &mut a.f, &a.att, d.rows());
                }
                Inner::Ffn { fc, proj } => {
                    fc.forward_gelu(cx, &mut a.b, &mut a.a, fin, d.rows()); // (N, F) each
                    proj.forward(cx, &mut a.f, &a.b, d.rows());
                }
            }
            // the residual adds f, or dropout(f) (kept in the backward's df scratch: f itself is
            // not needed again, and the mask is recomputed in the backward)
            let f = match dropout {
                Some(dp) => {
                    let dropped = &mut acts.scratch.df;
                    be.dropout_forward(all_mut(be, dropped), all(be, &a.f), dp.site(i, d.rows() * d.c));
                    &acts.scratch.df
                }
                None => &a.f,
            };
            be.residual_forward(all_mut(be, &mut a.resid), all(be, inp), all(be, f));
            if self.placement == LayerNormPlacement::Post {
                sub.ln.forward(cx, &mut a.ln, &a.resid);
            }
        }
    }

    /// On entry `dout` holds the gradient of the stack's output, on return the gradient of its
    /// input `x`. Cross-attention writes the memory's gradient into `dmemory` (over whatever it
    /// held; the first cross-attention sublayer met sets it, later ones add; zeros when the
    /// stack has none).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        cx: &Ctx<B>,
        grads: &mut B::Buf,
        acts: &mut StackActs<B>,
        x: &B::Buf,
        memory: Option<&B::Buf>,
        dmemory: Option<&mut B::Buf>,
        lens: Lens<B>,
        dout: &mut B::Buf,
        d: Dims,
        ready: &mut ReadyFn<'_, B>,
    ) {
        self.backward_with_dropout(cx, grads, acts, x, memory, dmemory, lens, dout, d, None, ready)
    }

    /// The backward of `forward_with_dropout` with the same `dropout`. Each sublayer's
    /// parameter ranges go to `ready` as soon as its backward is done (the last first).
    ///
    /// No zero fills (a post-LN sublayer's LayerNorm writes its input gradient over `gnext`): a
    /// residual add hands its gradient to both inputs unchanged, so the branch reads the
    /// residual's gradient buffer directly and the branch's input gradient is added onto it
    /// (pre-LN: through the LayerNorm into `g` itself; post-LN: by the first linear's GEMM into
    /// `gnext`), and every other op writes over its output.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with_dropout<B: Backend>(
        &self,
        cx: &Ctx<B>,
        grads: &mut B::Buf,
        acts: &mut StackActs<B>,
        x: &B::Buf,
        memory: Option<&B::Buf>,
        mut dmemory: Option<&mut B::Buf>,
        lens: Lens<B>,
        dout: &mut B::Buf,
        d: Dims,
        dropout: Option<DropoutPass>,
        ready: &mut ReadyFn<'_, B>,
    ) {
        let be = cx.be;
        let n = d.rows();
        let post = self.placement == LayerNormPlacement::Post;
        let StackActs { subs: sub_acts, scratch: s } = acts;
        // whether dmemory holds a gradient yet (its first writer sets, the others add)
        let mut dmemory_written = false;
        // pre-LN without dropout: whether s.g_act holds s.g (written by the LayerNorm backward
        // of the sublayer above), which the projections then read as their dout
        let mut g_act_current = false;
        std::mem::swap(&mut s.g, dout);
        for (i, sub) in self.subs.iter().enumerate().rev() {
            let a = &sub_acts[i];
            let inp = if i == 0 { x } else { self.sub_out(&sub_acts[i - 1]) };
            // s.g: gradient of this sublayer's output. resid = inp + f (or + dropout(f)) hands
            // its gradient dresid to inp and to f alike.
            if post {
                // out = LN(resid): dresid into gnext, which then collects inp's gradient
                sub.ln.backward_set(cx, grads, &mut s.gnext, &s.g, &a.resid, &a.ln);
            }
            // pre-LN: dresid is s.g itself (dout = dresid), which collects inp's gradient
            let dresid = if post { &s.gnext } else { &s.g };
            // df: f's gradient. Without dropout dresid itself; with it, dresid through the same
            // mask: dropout is a diagonal linear map, so its forward applied to dresid (written
            // over s.df) is its backward
            let df = match dropout {
                Some(dp) => {
                    be.dropout_forward(all_mut(be, &mut s.df), all(be, dresid), dp.site(i, n * d.c));
                    &s.df
                }
                None if g_act_current => &s.g_act,
                None => dresid,
            };
            let fin = if post { inp } else { &a.ln.out };
            // the gradient of f's input (`fin_grad`) is taken once df is spent: df may be s.gnext
            match &sub.inner {
                Inner::SelfAttn { qkv, proj, scores, causal } => {
                    proj.backward(cx, grads, &mut s.datt, Grad::Set, df, &a.att, n);
                    let key_lens = if *causal { None } else { lens.own };
                    be.attention_ex_backward_set(
                        QkvSource::Packed(all_mut(be, &mut s.dqkv)),
                        scores.grads(be, grads),
                        all(be, &s.datt),
                        QkvSource::Packed(all(be, &a.a)),
                        scores.views(cx),
                        key_lens,
                        all(be, &a.att),
                        all(be, &a.saved),
                        d.attn(d.t, *causal),
                    );
                    let (dfin, mode) = fin_grad::<B>(&mut s.gnext, &mut s.dfin, post);
                    qkv.backward(cx, grads, dfin, mode, &s.dqkv, fin, n);
                }
                Inner::CrossAttn { q, kv, proj, scores } => {
                    let mem = memory.expect("cross-attention needs a memory");
                    proj.backward(cx, grads, &mut s.datt, Grad::Set, df, &a.att, n);
                    be.attention_ex_backward_set(
                        QkvSource::Split { q: all_mut(be, &mut s.dq), kv: all_mut(be, &mut s.dkv) },
                        scores.grads(be, grads),
                        all(be, &s.datt),
                        QkvSource::Split { q: all(be, &a.a), kv: all(be, &a.b) },
                        scores.views(cx),
                        lens.memory,
                        all(be, &a.att),
                        all(be, &a.saved),
                        d.attn(d.tm, false),
                    );
                    let (dfin, mode) = fin_grad::<B>(&mut s.gnext, &mut s.dfin, post);
                    q.backward(cx, grads, dfin, mode, &s.dq, fin, n);
                    let dmem = dmemory.as_deref_mut().expect("cross-attention needs a memory gradient");
                    kv.backward(cx, grads, dmem, Grad::after(dmemory_written), &s.dkv, mem, d.b * d.tm);
                    dmemory_written = true;
                }
                Inner::Ffn { fc, proj } => {
                    let fc_bias_done = proj.backward_dgelu(cx, grads, &mut s.dh, &mut s.dhg, df, &a.b, &a.a, fc, n);
                    let (dfin, mode) = fin_grad::<B>(&mut s.gnext, &mut s.dfin, post);
                    fc.backward_bias(cx, grads, dfin, mode, &s.dh, fin, n, !fc_bias_done);
                }
            }
            if post {
                std::mem::swap(&mut s.g, &mut s.gnext);
            } else {
                // x + f(LN(x)): LN's input gradient joins dresid in s.g; without dropout, also
                // into s.g_act for the projections of the sublayer below (none below sublayer 0)
                g_act_current = dropout.is_none() && i > 0;
                if g_act_current {
                    sub.ln.backward_copy(cx, grads, &mut s.g, &mut s.g_act, &s.dfin, inp, &a.ln);
                } else {
                    sub.ln.backward(cx, grads, &mut s.g, &s.dfin, inp, &a.ln);
                }
            }
            for r in sub.param_ranges() {
                ready(be, grads, r);
            }
        }
        if let (Some(dmem), false) = (dmemory, dmemory_written) {
            // no cross-attention read the memory: its gradient is zero
            zero(be, dmem);
        }
        std::mem::swap(&mut s.g, dout);
    }
}

/// Where the gradient of a sublayer's f input goes: pre-LN written into `dfin` (then through
/// the LayerNorm); post-LN (f's input is the sublayer's input) added onto the residual's
/// gradient in `gnext`.
fn fin_grad<'a, B: Backend>(gnext: &'a mut B::Buf, dfin: &'a mut B::Buf, post: bool) -> (&'a mut B::Buf, Grad) {
    if post {
        (gnext, Grad::Add)
    } else {
        (dfin, Grad::Set)
    }
}

/// The sinusoidal position table (Vaswani et al.): row p, column 2i = sin(p / 10000^(2i/C)),
/// column 2i+1 = cos of the same angle. (P, C) on the host.
pub(crate) fn sinusoidal_table(positions: usize, c: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; positions * c];
    for p in 0..positions {
        for i in 0..c.div_ceil(2) {
            let angle = p as f64 / 10000f64.powf(2.0 * i as f64 / c as f64);
            t[p * c + 2 * i] = angle.sin() as f32;
            if 2 * i + 1 < c {
                t[p * c + 2 * i + 1] = angle.cos() as f32;
            }
        }
    }
    t
}

/// The factor on the token lookup: sqrt(C) with sinusoidal positions, none with learned ones.
///
/// Sinusoidal positions have entries of magnitude ~0.7 and are not learned: a token table at
/// N(0, 0.02) would sit ~35x below them and the model would see mostly positions. So, as in
/// Vaswani et al. (section 3.4) and fairseq (`embed_scale`), the lookup is multiplied by sqrt(C)
/// before the positions are added, and the table starts N(0, C^-0.5) (`token_init_std`): the
/// scaled token part has unit scale, and a head tied to the (unscaled) table starts with
/// unit-scale logits. Learned positions start as small as the tokens and keep both as they are.
pub(crate) fn token_scale(positions: Positions, c: usize) -> Option<f32> {
    (positions == Positions::Sinusoidal).then(|| (c as f32).sqrt())
}

/// The token table's init std: C^-0.5 with sinusoidal positions (see `token_scale`), else
/// `learned_std`, the model's usual embedding std.
pub(crate) fn token_init_std(positions: Positions, c: usize, learned_std: f32) -> f32 {
    match positions {
        Positions::Learned => learned_std,
        Positions::Sinusoidal => (c as f64).powf(-0.5) as f32,
    }
}
