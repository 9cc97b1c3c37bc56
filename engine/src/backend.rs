//! The `Backend` trait: every operation a transformer needs, forward beside backward.
//!
//! A backend owns memory (`Buf` for f32 values, `Ids` for token ids and targets) and hands out
//! views of sub-ranges, so that one flat parameter buffer and one flat gradient buffer can hold
//! every tensor of a model (llm.c style). Models are written once against this trait; the CPU
//! backend is the readable reference and the CUDA backend must match it within tolerance.
//!
//! Conventions shared by every op:
//! - shapes are row-major and named in the doc comments, `N` = rows (batch * time);
//! - every backward op *accumulates* (`+=`) into its gradient outputs, so the caller zeroes
//!   gradient buffers when a new accumulation starts; parameter gradients therefore sum over
//!   micro-batches for free;
//! - what a backward pass needs from its forward pass ("saved state") is an explicit argument:
//!   LayerNorm's mean and reciprocal standard deviation, attention's saved buffer (its size is
//!   the backend's choice: probabilities on CPU, a log-sum-exp per row for a flash kernel),
//!   cross-entropy's log-sum-exp per row.

use std::ops::Range;

/// Target id that contributes neither loss nor gradient (padding, unmasked MLM positions).
pub const IGNORE_INDEX: u32 = u32::MAX;

/// Layout of a matmul weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `(in, out)`: `y = x @ W`. Hugging Face GPT-2's `Conv1D` layout.
    InOut,
    /// `(out, in)`: `y = x @ W^T`. PyTorch `Linear`, and a tied LM head over `wte (V, C)`.
    OutIn,
}

/// Shape of one matmul `out (N, OC) = inp (N, IC) @ W (+ bias)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulShape {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub layout: WeightLayout,
}

/// Shape of a rotary position embedding call ([`Backend::rope`]): packed (rows, 3C) q|k|v
/// rows, `seq_len` positions per sequence (row r sits at position r % seq_len).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    pub rows: usize,
    pub seq_len: usize,
    /// Model width C = heads * head_dim (head_dim even).
    pub channels: usize,
    pub heads: usize,
}

impl RopeShape {
    pub fn head_dim(&self) -> usize {
        self.channels / self.heads
    }
}

/// Shape of one multi-head attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    /// Number of query positions (Tq).
    pub q_len: usize,
    /// Number of key/value positions (Tk); equals `q_len` for self-attention.
    pub kv_len: usize,
    /// Model width C = heads * head_dim.
    pub channels: usize,
    pub heads: usize,
    /// Query i sees keys j <= i only (decoder self-attention).
    pub causal: bool,
}

impl AttnShape {
    pub fn head_dim(&self) -> usize {
        self.channels / self.heads
    }
}

/// Where queries, keys and values come from.
pub enum QkvSource<V> {
    /// Self-attention: one `(B, T, 3C)` buffer, per row `[q | k | v]`.
    Packed(V),
    /// Cross-attention: queries `(B, Tq, C)` from one source, keys and values `(B, Tk, 2C)`
    /// (per row `[k | v]`) from another (an encoder's output).
    Split { q: V, kv: V },
}

/// A backend's mark on its device's timeline (`Backend::timeline_mark`), opaque to the rest.
pub struct TimelineMark(pub Box<dyn std::any::Any + Send + Sync>);

/// How an attention score between query `q` and key `k` (one head, width hd) is computed, with
/// the parameters of the learned kinds (per head, stacked over heads).
pub enum Scores<V> {
    /// `q . k / sqrt(hd)`: the fast path every backend has.
    Dot,
    /// Luong's general score `q^T W_h k / sqrt(hd)`; `w` is `(H, hd, hd)`. With `W_h = I` it
    /// equals `Dot`, which is how models initialise it.
    General { w: V },
    /// Bahdanau's additive score `v_h . tanh(q W_q,h + k W_k,h)` (no scaling); `wq` and `wk` are
    /// `(H, hd, A)`, `v` is `(H, A)`, A = the additive width.
    Additive { wq: V, wk: V, v: V, width: usize },
}

impl<V> Scores<V> {
    pub fn kind(&self) -> ScoreKind {
        match self {
            Scores::Dot => ScoreKind::Dot,
            Scores::General { .. } => ScoreKind::General,
            Scores::Additive { .. } => ScoreKind::Additive,
        }
    }
}

/// The attention score kinds, without their parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreKind {
    #[default]
    Dot,
    General,
    Additive,
}

/// Ops a backend may lack (added after the first backends were written); models ask with
/// `Backend::supports` at construction or before a batch and fail with an error naming the op
/// rather than reach an `unimplemented!` default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionalOp {
    /// `attention_ex_*` with per-sequence key lengths (padding masks).
    KeyPaddingMask,
    /// `attention_ex_*` with `Scores::General`.
    GeneralScores,
    /// `attention_ex_*` with `Scores::Additive`.
    AdditiveScores,
}

impl OptionalOp {
    pub fn of_scores(kind: ScoreKind) -> Option<OptionalOp> {
        match kind {
            ScoreKind::Dot => None,
            ScoreKind::General => Some(OptionalOp::GeneralScores),
            ScoreKind::Additive => Some(OptionalOp::AdditiveScores),
        }
    }
}

/// One dropout call's mask: element i (of the view) is kept with probability `1 - p`, decided by
/// a hash of `(seed, offset + i)` (see `cpu::dropout`). Forward and backward with the same value
/// see the same mask, so nothing is saved between them, and every backend draws the same mask.
/// `p` must lie in [0, 1); the ops panic with a message naming it otherwise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    /// Counter of the view's element 0: calls sharing a seed use disjoint counter ranges.
    pub offset: u64,
}

/// One AdamW update's hyper-parameters (PyTorch semantics, decoupled weight decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub t: u64,
    /// Multiplies every gradient first (global-norm clipping, loss scaling).
    pub grad_scale: f32,
}

/// The flat buffer as consecutive runs of one weight decay each (AdamW decays matmul weights,
/// not biases or LayerNorm), on the host and, for a one-pass update, on the device: `ends[r]`
/// is run r's end offset, `decay[r]` its weight decay. (Generic over the backend's id and
/// float buffers, so a backend wrapping another passes it through.)
pub struct DecayRuns<I, F> {
    pub host: Vec<(std::ops::Range<usize>, f32)>,
    pub ends: I,
    pub decay: F,
}

impl<I, F> DecayRuns<I, F> {
    /// `runs` must tile [0, n) in order.
    pub fn new<B: Backend<Ids = I, Buf = F>>(be: &B, runs: Vec<(std::ops::Range<usize>, f32)>) -> Self {
        let mut at = 0;
        for (r, _) in &runs {
            assert_eq!(r.start, at, "decay runs must tile the buffer in order");
            at = r.end;
        }
        // Offsets past u32 have no device table: such a buffer takes the per-run path.
        let ends: Vec<u32> = runs.iter().map(|(r, _)| u32::try_from(r.end).unwrap_or(u32::MAX)).collect();
        let decay: Vec<f32> = runs.iter().map(|(_, wd)| *wd).collect();
        DecayRuns { ends: be.upload_ids(&ends), decay: be.upload(&decay), host: runs }
    }
    /// Elements covered.
    pub fn len(&self) -> usize {
        self.host.last().map_or(0, |(r, _)| r.end)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// [`Backend::adamw_update_runs`] as one [`Backend::adamw_update`] per run: the trait's default,
/// and a backend's fallback where its one-pass kernel does not apply.
pub fn adamw_update_each_run<B: Backend>(
    be: &B,
    params: &mut B::Buf,
    grads: &B::Buf,
    m: &mut B::Buf,
    v: &mut B::Buf,
    runs: &DecayRuns<B::Ids, B::Buf>,
    hp: AdamWStep,
) {
    for (range, wd) in &runs.host {
        let [mr] = be.split_mut(m, [range.clone()]);
        let [vr] = be.split_mut(v, [range.clone()]);
        be.adamw_update(be.view_mut(params, range.clone()), be.view(grads, range.clone()), mr, vr, AdamWStep { weight_decay: *wd, ..hp });
    }
}

pub trait Backend: Send + Sync + 'static {
    /// Owned f32 memory on the device.
    type Buf: Send;
    /// Owned u32 memory on the device (token ids, targets, positions).
    type Ids: Send;
    /// A read-only sub-range of a `Buf`.
    type View<'a>: Copy
    where
        Self: 'a;
    /// A writable sub-range of a `Buf`.
    type ViewMut<'a>
    where
        Self: 'a;

    fn name(&self) -> &'static str;

    /// The device's dense bf16 peak in FLOP/s, the yardstick of MFU; None where there is no
    /// such figure (the CPU, an unknown GPU).
    fn peak_flops(&self) -> Option<f64> {
        None
    }

    /// Waits for all queued device work and returns the first device error recorded since the
    /// last call (ops return `()`; an asynchronous backend records failures and reports them
    /// here). The trainer calls it once per step before reading the loss.
    fn synchronize(&self) -> Result<(), crate::EngineError> {
        Ok(())
    }

    /// A mark on the device's timeline, recorded without waiting (CUDA: a timing event queued on
    /// the stream), for profiles that must not serialise the device (`Profiled::timeline`);
    /// None where ops run synchronously (the CPU), whose wall clock serves instead.
    fn timeline_mark(&self) -> Option<TimelineMark> {
        None
    }
    /// Seconds from mark `from` to mark `to` on the device's timeline (waits until the device has
    /// reached both); None where marks are not this backend's or could not be read.
    fn timeline_secs(&self, _from: &TimelineMark, _to: &TimelineMark) -> Option<f64> {
        None
    }

    // ---- memory -------------------------------------------------------------------------

    fn zeros(&self, len: usize) -> Self::Buf;
    /// A zeroed buffer for an activation the backend may store at reduced precision (the CUDA
    /// backend with bf16 matmuls keeps bf16, as autocast does). Only these ops accept one:
    /// `matmul_forward` (inp, out), `matmul_backward*` (dout, inp, and dinp when overwritten),
    /// `layernorm_forward` (out), `layernorm_backward*` (dout), `layernorm_backward_and_copy`
    /// (dinp_copy), `gelu_forward` (both), `gelu_backward_set` (all three),
    /// `attention_forward` / `attention_backward*` / `attention_ex_*` (q, kv, out, dout, dq, dkv:
    /// all of them reduced or none),
    /// `cross_entropy_forward` and `cross_entropy_backward_in_place` (logits), and `download`,
    /// `write`, `fill`, `copy` (between buffers of one kind); others panic on one.
    fn activation_zeros(&self, len: usize) -> Self::Buf {
        self.zeros(len)
    }
    fn upload(&self, host: &[f32]) -> Self::Buf;
    fn upload_ids(&self, host: &[u32]) -> Self::Ids;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, range: Range<usize>) -> Self::View<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::ViewMut<'a>;
    /// Several disjoint writable ranges of one buffer at once (a weight's and a bias's gradient).
    /// Panics if two ranges overlap.
    fn split_mut<'a, const K: usize>(
        &self,
        buf: &'a mut Self::Buf,
        ranges: [Range<usize>; K],
    ) -> [Self::ViewMut<'a>; K];
    fn download(&self, view: Self::View<'_>) -> Vec<f32>;
    fn write(&self, dst: Self::ViewMut<'_>, host: &[f32]);
    fn fill(&self, dst: Self::ViewMut<'_>, value: f32);
    fn copy(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>);
    /// `dst *= s`
    fn scale(&self, dst: Self::ViewMut<'_>, s: f32);
    /// Sum of squares in f64, in an order that does not depend on the thread count.
    fn sum_squares(&self, src: Self::View<'_>) -> f64;

    // ---- embedding lookup: token, position and segment embeddings --------------------------

    /// `out[n] (+)= table[ids[n]]`; out `(N, C)`, table `(R, C)`, ids `(N)`.
    fn embedding_forward(
        &self,
        out: Self::ViewMut<'_>,
        ids: &Self::Ids,
        table: Self::View<'_>,
        channels: usize,
        accumulate: bool,
    );
    /// `dtable[ids[n]] += dout[n]`.
    fn embedding_backward(
        &self,
        dtable: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        ids: &Self::Ids,
        channels: usize,
    );

    // ---- matmul with optional bias --------------------------------------------------------

    /// `out (N, OC) = inp (N, IC) @ W + bias (OC)`.
    fn matmul_forward(
        &self,
        out: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        bias: Option<Self::View<'_>>,
        shape: MatmulShape,
    );
    /// `out = residual + (inp @ W + bias)`: a projection added onto the residual stream in one
    /// op, the same value as `matmul_forward` then `residual_forward(out, residual, proj)` (the
    /// CUDA backend adds it in the GEMM's epilogue: no projection buffer, no separate pass).
    /// Its backward is a matmul backward with `dout` = the residual's gradient.
    fn matmul_forward_residual(
        &self,
        out: Self::ViewMut<'_>,
        residual: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        bias: Option<Self::View<'_>>,
        shape: MatmulShape,
    );
    /// `dinp += dout @ W^T`, `dW += inp^T @ dout` (in W's layout), `dbias += sum_n dout`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: Option<Self::ViewMut<'_>>,
        dweight: Self::ViewMut<'_>,
        dbias: Option<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        shape: MatmulShape,
    );
    /// [`Backend::matmul_backward`] with `dinp = dout @ W^T` overwritten, not accumulated: a
    /// caller that would zero `dinp` first saves that pass (the GEMM's beta = 0).
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_set_dinp(
        &self,
        dinp: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dbias: Option<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        shape: MatmulShape,
    );

    // ---- LayerNorm (eps 1e-5) ---------------------------------------------------------------

    /// out `(N, C)` = (inp - mean) * rstd * w + b; saves mean `(N)` and rstd `(N)`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        bias: Self::View<'_>,
        channels: usize,
    );
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dbias: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        channels: usize,
    );
    /// [`Backend::layernorm_backward`] with the input gradient written over `dinp`, not added
    /// (saves the caller a zero fill and the read of dinp).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_set(
        &self,
        dinp: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dbias: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        channels: usize,
    );
    /// [`Backend::layernorm_backward`] (`accumulate`) or [`Backend::layernorm_backward_set`]
    /// (not), then the final `dinp` also written into `dinp_copy`, an activation buffer (from
    /// `activation_zeros`) of dinp's length, in the same pass where the backend can. Why: in the
    /// pre-LN GPT the next op after a LayerNorm backward is a projection's matmul backward with
    /// dinp (the residual stream's gradient, f32) as its dout; the CUDA backend with bf16
    /// matmuls would convert that dout to bf16 on every call, while a bf16 copy written by the
    /// LayerNorm kernel is read as it is. The CPU keeps f32 activations: there the copy equals
    /// dinp.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_and_copy(
        &self,
        accumulate: bool,
        dinp: Self::ViewMut<'_>,
        dinp_copy: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dbias: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        channels: usize,
    );
    /// [`Backend::layernorm_backward_and_copy`] and `dsum (C) += sum_n dinp_copy`: the bias
    /// gradient of the projection that reads the copy as its output gradient next (pre-LN GPT:
    /// ln_f's and LN1's feed the MLP's down-projection, LN2's the attention's), summed in the
    /// same pass where a backend can (the CUDA backend's one-pass kernels with a bf16 copy: the
    /// column sums of the copy as they store it, instead of a pass reading it back). Returns
    /// false, having done nothing, where it does not (the default): the caller runs
    /// `layernorm_backward_and_copy` and passes the bias gradient to the projection's backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_and_copy_with_sum(
        &self,
        accumulate: bool,
        dinp: Self::ViewMut<'_>,
        dinp_copy: Self::ViewMut<'_>,
        dsum: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dbias: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        channels: usize,
    ) -> bool {
        let _ = (accumulate, dinp, dinp_copy, dsum, dweight, dbias, dout, inp, weight, mean, rstd, channels);
        false
    }

    // ---- multi-head scaled dot-product attention ------------------------------------------

    /// Length of the state `attention_forward` saves for its backward pass.
    fn attention_saved_len(&self, shape: AttnShape) -> usize;
    /// out `(B, Tq, C)`: per head, softmax(q k^T / sqrt(hd)) v, heads concatenated.
    fn attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        saved: Self::ViewMut<'_>,
        src: QkvSource<Self::View<'_>>,
        shape: AttnShape,
    );
    /// Accumulates into the gradient of the source(s), laid out like `src`.
    fn attention_backward(
        &self,
        dsrc: QkvSource<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        src: QkvSource<Self::View<'_>>,
        out: Self::View<'_>,
        saved: Self::View<'_>,
        shape: AttnShape,
    );
    /// [`Backend::attention_backward`] writing the gradient over what `dsrc` held (saves the
    /// caller a zero fill of the (B, T, 3C) buffer).
    fn attention_backward_set(
        &self,
        dsrc: QkvSource<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        src: QkvSource<Self::View<'_>>,
        out: Self::View<'_>,
        saved: Self::View<'_>,
        shape: AttnShape,
    );
    /// `attention_backward_set` and `dbias (3C) += sum_n dqkv`, the qkv projection's bias
    /// gradient, in one pass where a backend can (the CUDA backend's bf16 kernels on packed
    /// self-attention with T a multiple of 64: the column sums of dqkv as its kernels store it,
    /// instead of a pass reading it back). Returns false, having written nothing, where it does
    /// not (the default): the caller runs `attention_backward_set` and passes the bias gradient
    /// to the projection's backward.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_set_with_bias(
        &self,
        dsrc: QkvSource<Self::ViewMut<'_>>,
        dbias: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        src: QkvSource<Self::View<'_>>,
        out: Self::View<'_>,
        saved: Self::View<'_>,
        shape: AttnShape,
    ) -> bool {
        let _ = (dsrc, dbias, dout, src, out, saved, shape);
        false
    }

    // ---- GELU (tanh approximation, as GPT-2) ----------------------------------------------

    fn gelu_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>);
    fn gelu_backward(&self, dinp: Self::ViewMut<'_>, inp: Self::View<'_>, dout: Self::View<'_>);
    /// `dinp = dout * gelu'(inp)`, overwritten (saves the caller a zero fill).
    fn gelu_backward_set(&self, dinp: Self::ViewMut<'_>, inp: Self::View<'_>, dout: Self::View<'_>);

    // ---- rotary position embedding --------------------------------------------------------

    /// RoPE (GPT-NeoX / Llama "rotate half" layout) in place on the q and k thirds of packed
    /// (rows, 3C) rows; v is left alone. In each head of width hd, channel i < hd/2 pairs with
    /// i + hd/2 and the pair turns by the angle of its position p and frequency i:
    /// `(a, b) -> (a cos - b sin, b cos + a sin)`, each product rounded, then the sum.
    /// `table` is (T_max, hd/2) cosines followed by (T_max, hd/2) sines (`model::rotary`).
    /// `inverse` turns the other way: the rotation's transpose, which is its backward pass
    /// (applied to dq and dk in place).
    fn rope(&self, qkv: Self::ViewMut<'_>, table: Self::View<'_>, s: RopeShape, inverse: bool);

    // ---- residual add ---------------------------------------------------------------------

    /// `out = a + b`
    fn residual_forward(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>);
    /// `da += dout; db += dout`
    fn residual_backward(
        &self,
        da: Self::ViewMut<'_>,
        db: Self::ViewMut<'_>,
        dout: Self::View<'_>,
    );

    // ---- softmax cross-entropy --------------------------------------------------------------

    /// Per row: `losses[n] = logsumexp(logits[n]) - logits[n, target[n]]`, 0 where the target
    /// is `IGNORE_INDEX`; saves `lse (N)`. logits `(N, V)`.
    fn cross_entropy_forward(
        &self,
        losses: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
        logits: Self::View<'_>,
        targets: &Self::Ids,
        vocab: usize,
    );
    /// `dlogits[n] += dloss * (softmax(logits[n]) - onehot(target[n]))`, nothing for ignored rows.
    fn cross_entropy_backward(
        &self,
        dlogits: Self::ViewMut<'_>,
        logits: Self::View<'_>,
        lse: Self::View<'_>,
        targets: &Self::Ids,
        dloss: f32,
        vocab: usize,
    );

    /// The fused classifier's backward: overwrites `logits (N, V)` with their gradient,
    /// `dloss * (softmax(logits[n]) - onehot(target[n]))`, zeros for ignored rows. Nothing
    /// reads the logits after the backward pass, so their buffer can hold the gradient: no
    /// second (N, V) buffer, no zero fill, one pass over the largest activation there is.
    fn cross_entropy_backward_in_place(
        &self,
        logits: Self::ViewMut<'_>,
        lse: Self::View<'_>,
        targets: &Self::Ids,
        dloss: f32,
        vocab: usize,
    );
    /// `cross_entropy_forward` (losses, lse) then `cross_entropy_backward_in_place` (logits
    /// overwritten by their gradient, zeros for ignored rows), with the same results: a backend
    /// may read each row once for both. No default body: the trait cannot read a `ViewMut`.
    fn cross_entropy_forward_backward_in_place(
        &self,
        losses: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
        logits: Self::ViewMut<'_>,
        targets: &Self::Ids,
        dloss: f32,
        vocab: usize,
    );

    // ---- optimizer ------------------------------------------------------------------------

    /// One AdamW step over a range of the flat buffers (params, grads, first and second moments).
    fn adamw_update(
        &self,
        params: Self::ViewMut<'_>,
        grads: Self::View<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        hp: AdamWStep,
    );

    /// One AdamW step over whole flat buffers, each run with its own weight decay
    /// (`hp.weight_decay` is ignored). The default launches [`Backend::adamw_update`] once per
    /// run; a backend may do it in one pass (the same arithmetic, so the same bits).
    fn adamw_update_runs(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        runs: &DecayRuns<Self::Ids, Self::Buf>,
        hp: AdamWStep,
    ) where
        Self: Sized,
    {
        adamw_update_each_run(self, params, grads, m, v, runs, hp)
    }

    // ---- later additions, each with a default body --------------------------------------------
    // Backends written before these ops keep compiling; `supports` tells models which of the
    // optional ones a backend really has.

    /// Whether this backend implements an optional op (the defaults below only cover the cases
    /// every backend has).
    fn supports(&self, op: OptionalOp) -> bool {
        let _ = op;
        false
    }

    /// The widest additive score (`Scores::Additive { width }`) this backend takes; models
    /// check their `additive_width` against it when built.
    fn max_additive_width(&self) -> usize {
        usize::MAX
    }

    /// Attention with a selectable score and an optional key padding mask: for batch entry b,
    /// keys j >= `key_lens[b]` are invisible (as are j > i when causal); `key_lens` is `(B)`,
    /// each in 1..=Tk. The saved state has `attention_saved_len(shape)` values, as for
    /// `attention_forward`. The default covers `Scores::Dot` without a mask only.
    fn attention_ex_forward(
        &self,
        out: Self::ViewMut<'_>,
        saved: Self::ViewMut<'_>,
        src: QkvSource<Self::View<'_>>,
        scores: Scores<Self::View<'_>>,
        key_lens: Option<&Self::Ids>,
        shape: AttnShape,
    ) {
        match (&scores, key_lens) {
            (Scores::Dot, None) => self.attention_forward(out, saved, src, shape),
            _ => unimplemented!(
                "{}: {:?} attention scores with a key mask: {} are CPU-only until they have kernels for this backend",
                self.name(),
                scores.kind(),
                if key_lens.is_some() { "key padding masks" } else { "general and additive scores" }
            ),
        }
    }

    /// Backward of `attention_ex_forward`: accumulates into the gradients of the source(s) and
    /// of the score parameters (`dscores` of the same kind as `scores`).
    #[allow(clippy::too_many_arguments)]
    fn attention_ex_backward(
        &self,
        dsrc: QkvSource<Self::ViewMut<'_>>,
        dscores: Scores<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        src: QkvSource<Self::View<'_>>,
        scores: Scores<Self::View<'_>>,
        key_lens: Option<&Self::Ids>,
        out: Self::View<'_>,
        saved: Self::View<'_>,
        shape: AttnShape,
    ) {
        match (&scores, &dscores, key_lens) {
            (Scores::Dot, Scores::Dot, None) => self.attention_backward(dsrc, dout, src, out, saved, shape),
            _ => unimplemented!(
                "{}: {:?} attention scores with a key mask: general and additive scores and key padding masks are CPU-only until they have kernels for this backend",
                self.name(),
                scores.kind()
            ),
        }
    }

    /// [`Backend::attention_ex_backward`] writing the gradient of the source(s) over what `dsrc`
    /// held (padded keys' rows get zeros), saving the caller a zero fill of the source
    /// gradients; the score parameters' gradients still accumulate into `dscores`. The default
    /// covers `Scores::Dot` without a mask only, like `attention_ex_backward`'s.
    #[allow(clippy::too_many_arguments)]
    fn attention_ex_backward_set(
        &self,
        dsrc: QkvSource<Self::ViewMut<'_>>,
        dscores: Scores<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        src: QkvSource<Self::View<'_>>,
        scores: Scores<Self::View<'_>>,
        key_lens: Option<&Self::Ids>,
        out: Self::View<'_>,
        saved: Self::View<'_>,
        shape: AttnShape,
    ) {
        match (&scores, &dscores, key_lens) {
            (Scores::Dot, Scores::Dot, None) => self.attention_backward_set(dsrc, dout, src, out, saved, shape),
            _ => unimplemented!(
                "{}: attention_ex_backward_set with {:?} scores or a key mask: general and additive scores and key padding masks are CPU-only until they have kernels for this backend",
                self.name(),
                scores.kind()
            ),
        }
    }

    /// The MLP's up-projection and its GELU as one op where a backend fuses them (the CUDA
    /// backend's cuBLASLt GELU epilogue): `pre = inp @ W + bias`, `out = gelu(pre)` (tanh
    /// approximation), both written. Returns false, having written nothing, where it does not
    /// (the default): the caller then runs `matmul_forward` and `gelu_forward`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_gelu_forward_fused(
        &self,
        out: Self::ViewMut<'_>,
        pre: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        bias: Option<Self::View<'_>>,
        shape: MatmulShape,
    ) -> bool {
        let _ = (out, pre, inp, weight, bias, shape);
        false
    }
    /// The backward pass of `y = act @ W + bias` with `act = gelu(pre)`, fused where a backend
    /// can (the CUDA backend's cuBLASLt DGELU_BGRAD epilogue): `dW += act^T @ dout`,
    /// `dbias += sum_n dout`, `dpre = gelu'(pre) * (dout @ W^T)` (overwritten) and
    /// `dpre_bias += sum_n dpre`, the up-projection's bias gradient (so that projection's
    /// backward then takes no dbias). Returns false, having written nothing, where it does not
    /// (the default): the caller runs `matmul_backward_set_dinp` into a scratch for d(act),
    /// `gelu_backward_set`, and the up-projection's backward with its dbias.
    #[allow(clippy::too_many_arguments)]
    fn matmul_dgelu_backward_fused(
        &self,
        dpre: Self::ViewMut<'_>,
        dpre_bias: Option<Self::ViewMut<'_>>,
        dweight: Self::ViewMut<'_>,
        dbias: Option<Self::ViewMut<'_>>,
        dout: Self::View<'_>,
        act: Self::View<'_>,
        pre: Self::View<'_>,
        weight: Self::View<'_>,
        shape: MatmulShape,
    ) -> bool {
        let _ = (dpre, dpre_bias, dweight, dbias, dout, act, pre, weight, shape);
        false
    }

    /// `gelu_backward_set` over a (rows, `cols`) matrix and `dbias (cols) += sum_n dinp`, the
    /// up-projection's bias gradient, in one pass where a backend can (the CUDA backend on bf16
    /// activations: the column sums of dinp as its kernel writes it, instead of a pass reading it
    /// back). Returns false, having written nothing, where it does not (the default): the caller
    /// runs `gelu_backward_set` and passes the bias gradient to the up-projection's backward.
    fn gelu_backward_set_with_bias(
        &self,
        dinp: Self::ViewMut<'_>,
        dbias: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        dout: Self::View<'_>,
        cols: usize,
    ) -> bool {
        let _ = (dinp, dbias, inp, dout, cols);
        false
    }

    /// Inverted dropout: `out = inp * keep / (1 - p)`, keep from `mask` (p = 0: `out = inp`
    /// exactly). The default computes on the host through `cpu::dropout`, so any backend draws
    /// the same mask as the CPU.
    fn dropout_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>, mask: Dropout) {
        let x = self.download(inp);
        let mut y = vec![0.0; x.len()];
        crate::cpu::dropout::forward(&mut y, &x, mask);
        self.write(out, &y);
    }
    /// `dinp += dout * keep / (1 - p)`, with the forward's `mask`. The default computes the
    /// product on the host and accumulates it through `residual_backward` (into a scratch twin).
    fn dropout_backward(&self, dinp: Self::ViewMut<'_>, dout: Self::View<'_>, mask: Dropout) {
        let dy = self.download(dout);
        let mut g = vec![0.0; dy.len()];
        crate::cpu::dropout::backward(&mut g, &dy, mask);
        let g = self.upload(&g);
        let n = dy.len();
        let mut scratch = self.zeros(n);
        self.residual_backward(dinp, self.view_mut(&mut scratch, 0..n), self.view(&g, 0..n));
    }

    /// `out = tanh(inp)` (BERT's pooler). The default goes through the host: it runs on a
    /// handful of rows per batch.
    fn tanh_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>) {
        let y: Vec<f32> = self.download(inp).iter().map(|x| x.tanh()).collect();
        self.write(out, &y);
    }
    /// `dinp += dout * (1 - out^2)`, from the forward's output. The default computes the
    /// product on the host and accumulates it through `residual_backward` (into a scratch twin).
    fn tanh_backward(&self, dinp: Self::ViewMut<'_>, out: Self::View<'_>, dout: Self::View<'_>) {
        let (y, dy) = (self.download(out), self.download(dout));
        let g: Vec<f32> = y.iter().zip(&dy).map(|(&y, &g)| g * (1.0 - y * y)).collect();
        let g = self.upload(&g);
        let mut scratch = self.zeros(y.len());
        let n = y.len();
        self.residual_backward(dinp, self.view_mut(&mut scratch, 0..n), self.view(&g, 0..n));
    }
}
