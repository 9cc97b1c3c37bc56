//! One `CudaBackend` per matmul precision for a whole test binary, handed to models by value.
//!
//! Models own their backend, and building a `CudaBackend` compiles every kernel module through
//! NVRTC (seconds each time). [`Shared`] is a `Backend` that forwards every op to a backend built
//! once, so a test binary pays for one compile per precision however many models it builds.
//! The ops with a default body that BERT and T5 reach are forwarded too (`supports`,
//! `max_additive_width`,
//! `attention_ex_*`, `tanh_*`), so those models see the CUDA backend's own ops; the others
//! (dropout: the test configs have none) keep the trait's host defaults here.
#![allow(clippy::too_many_arguments)] // the trait's own signatures

use std::ops::Range;
use std::sync::OnceLock;

use smelt_engine::backend::{AdamWStep, AttnShape, Backend, DecayRuns, Dropout, MatmulShape, OptionalOp, QkvSource, Scores};
use smelt_engine::cuda::{CudaBackend, CudaOptions, MatmulPrecision};
use smelt_engine::EngineError;

type Cuda = CudaBackend;
type View<'a> = <Cuda as Backend>::View<'a>;
type ViewMut<'a> = <Cuda as Backend>::ViewMut<'a>;
type Buf = <Cuda as Backend>::Buf;
type Ids = <Cuda as Backend>::Ids;

/// A handle on a backend that lives as long as the test binary.
#[derive(Clone, Copy, Debug)]
pub struct Shared(pub &'static CudaBackend);

/// The shared backend for `p`, or `None` (after printing why) without a usable GPU.
pub fn shared(p: MatmulPrecision) -> Option<Shared> {
    static F32: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    static TF32: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    static BF16: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    let cell = match p {
        MatmulPrecision::F32 => &F32,
        MatmulPrecision::Tf32 => &TF32,
        MatmulPrecision::Bf16 => &BF16,
    };
    match cell.get_or_init(|| CudaBackend::new_with(0, CudaOptions { matmul: p }).map_err(|e| e.to_string())) {
        Ok(be) => Some(Shared(be)),
        Err(why) => {
            println!("skipping: {why}");
            None
        }
    }
}

impl Backend for Shared {
    type Buf = Buf;
    type Ids = Ids;
    type View<'a> = View<'a>;
    type ViewMut<'a> = ViewMut<'a>;

    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn synchronize(&self) -> Result<(), EngineError> {
        self.0.synchronize()
    }
    fn zeros(&self, len: usize) -> Buf {
        self.0.zeros(len)
    }
    fn activation_zeros(&self, len: usize) -> Buf {
        self.0.activation_zeros(len)
    }
    fn upload(&self, host: &[f32]) -> Buf {
        self.0.upload(host)
    }
    fn upload_ids(&self, host: &[u32]) -> Ids {
        self.0.upload_ids(host)
    }
    fn len(&self, buf: &Buf) -> usize {
        self.0.len(buf)
    }
    fn view<'a>(&self, buf: &'a Buf, range: Range<usize>) -> View<'a> {
        self.0.view(buf, range)
    }
    fn view_mut<'a>(&self, buf: &'a mut Buf, range: Range<usize>) -> ViewMut<'a> {
        self.0.view_mut(buf, range)
    }
    fn split_mut<'a, const K: usize>(&self, buf: &'a mut Buf, ranges: [Range<usize>; K]) -> [ViewMut<'a>; K] {
        self.0.split_mut(buf, ranges)
    }
    fn download(&self, view: View<'_>) -> Vec<f32> {
        self.0.download(view)
    }
    fn write(&self, dst: ViewMut<'_>, host: &[f32]) {
        self.0.write(dst, host)
    }
    fn fill(&self, dst: ViewMut<'_>, value: f32) {
        self.0.fill(dst, value)
    }
    fn copy(&self, dst: ViewMut<'_>, src: View<'_>) {
        self.0.copy(dst, src)
    }
    fn scale(&self, dst: ViewMut<'_>, s: f32) {
        self.0.scale(dst, s)
    }
    fn sum_squares(&self, src: View<'_>) -> f64 {
        self.0.sum_squares(src)
    }
    fn embedding_forward(&self, out: ViewMut<'_>, ids: &Ids, table: View<'_>, channels: usize, accumulate: bool) {
        self.0.embedding_forward(out, ids, table, channels, accumulate)
    }
    fn embedding_backward(&self, dtable: ViewMut<'_>, dout: View<'_>, ids: &Ids, channels: usize) {
        self.0.embedding_backward(dtable, dout, ids, channels)
    }
    fn matmul_forward(&self, out: ViewMut<'_>, inp: View<'_>, weight: View<'_>, bias: Option<View<'_>>, shape: MatmulShape) {
        self.0.matmul_forward(out, inp, weight, bias, shape)
    }
    fn matmul_forward_residual(
        &self,
        out: ViewMut<'_>,
        residual: View<'_>,
        inp: View<'_>,
        weight: View<'_>,
        bias: Option<View<'_>>,
        shape: MatmulShape,
    ) {
        self.0.matmul_forward_residual(out, residual, inp, weight, bias, shape)
    }
    fn matmul_backward(
        &self,
        dinp: Option<ViewMut<'_>>,
        dweight: ViewMut<'_>,
        dbias: Option<ViewMut<'_>>,
        dout: View<'_>,
        inp: View<'_>,
        weight: View<'_>,
        shape: MatmulShape,
    ) {
        self.0.matmul_backward(dinp, dweight, dbias, dout, inp, weight, shape)
    }
    fn matmul_backward_set_dinp(
        &self,
        dinp: ViewMut<'_>,
        dweight: ViewMut<'_>,
        dbias: Option<ViewMut<'_>>,
        dout: View<'_>,
        inp: View<'_>,
        weight: View<'_>,
        shape: MatmulShape,
    ) {
        self.0.matmul_backward_set_dinp(dinp, dweight, dbias, dout, inp, weight, shape)
    }
    fn layernorm_forward(
        &self,
        out: ViewMut<'_>,
        mean: ViewMut<'_>,
        rstd: ViewMut<'_>,
        inp: View<'_>,
        weight: View<'_>,
        bias: View<'_>,
        channels: usize,
    ) {
        self.0.layernorm_forward(out, mean, rstd, inp, weight, bias, channels)
    }
    fn layernorm_backward(
        &self,
        dinp: ViewMut<'_>,
        dweight: ViewMut<'_>,
        dbias: ViewMut<'_>,
        dout: View<'_>,
        inp: View<'_>,
        weight: View<'_>,
        mean: View<'_>,
        rstd: View<'_>,
        channels: usize,
    ) {
        self.0.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, channels)
    }
    fn layernorm_backward_set(
        &self,
        dinp: ViewMut<'_>,
        dweight: ViewMut<'_>,
        dbias: ViewMut<'_>,
        dout: View<'_>,
        inp: View<'_>,
        weight: View<'_>,
        mean: View<'_>,
        rstd: View<'_>,
        channels: usize,
    ) {
        self.0.layernorm_backward_set(dinp, dweight, dbias, dout, inp, weight, mean, rstd, channels)
    }
    fn layernorm_backward_and_copy(
        &self,
        accumulate: bool,
        dinp: ViewMut<'_>,
        dinp_copy: ViewMut<'_>,
        dweight: ViewMut<'_>,
        dbias: ViewMut<'_>,
        dout: View<'_>,
        inp: View<'_>,
        weight: View<'_>,
        mean: View<'_>,
        rstd: View<'_>,
        channels: usize,
    ) {
        self.0.layernorm_backward_and_copy(accumulate, dinp, dinp_copy, dweight, dbias, dout, inp, weight, mean, rstd, channels)
    }
    fn layernorm_backward_and_copy_with_sum(
        &self,
        accumulate: bool,
        dinp: ViewMut<'_>,
        dinp_copy: ViewMut<'_>,
        dsum: ViewMut<'_>,
        dweight: ViewMut<'_>,
        dbias: ViewMut<'_>,
        dout: View<'_>,
        inp: View<'_>,
        weight: View<'_>,
        mean: View<'_>,
        rstd: View<'_>,
        channels: usize,
    ) -> bool {
        self.0.layernorm_backward_and_copy_with_sum(accumulate, dinp, dinp_copy, dsum, dweight, dbias, dout, inp, weight, mean, rstd, channels)
    }
    fn attention_saved_len(&self, shape: AttnShape) -> usize {
        self.0.attention_saved_len(shape)
    }
    fn attention_forward(&self, out: ViewMut<'_>, saved: ViewMut<'_>, src: QkvSource<View<'_>>, shape: AttnShape) {
        self.0.attention_forward(out, saved, src, shape)
    }
    fn attention_backward(
        &self,
        dsrc: QkvSource<ViewMut<'_>>,
        dout: View<'_>,
        src: QkvSource<View<'_>>,
        out: View<'_>,
        saved: View<'_>,
        shape: AttnShape,
    ) {
        self.0.attention_backward(dsrc, dout, src, out, saved, shape)
    }
    fn attention_backward_set(
        &self,
        dsrc: QkvSource<ViewMut<'_>>,
        dout: View<'_>,
        src: QkvSource<View<'_>>,
        out: View<'_>,
        saved: View<'_>,
        shape: AttnShape,
    ) {
        self.0.attention_backward_set(dsrc, dout, src, out, saved, shape)
    }
    fn attention_backward_set_with_bias(
        &self,
        dsrc: QkvSource<ViewMut<'_>>,
        dbias: ViewMut<'_>,
        dout: View<'_>,
        src: QkvSource<View<'_>>,
        out: View<'_>,
        saved: View<'_>,
        shape: AttnShape,
    ) -> bool {
        self.0.attention_backward_set_with_bias(dsrc, dbias, dout, src, out, saved, shape)
    }
    fn rope(&self, qkv: ViewMut<'_>, table: View<'_>, s: smelt_engine::backend::RopeShape, inverse: bool) {
        self.0.rope(qkv, table, s, inverse)
    }
    fn gelu_forward(&self, out: ViewMut<'_>, inp: View<'_>) {
        self.0.gelu_forward(out, inp)
    }
    fn gelu_backward(&self, dinp: ViewMut<'_>, inp: View<'_>, dout: View<'_>) {
        self.0.gelu_backward(dinp, inp, dout)
    }
    fn gelu_backward_set(&self, dinp: ViewMut<'_>, inp: View<'_>, dout: View<'_>) {
        self.0.gelu_backward_set(dinp, inp, dout)
    }
    fn residual_forward(&self, out: ViewMut<'_>, a: View<'_>, b: View<'_>) {
        self.0.residual_forward(out, a, b)
    }
    fn residual_backward(&self, da: ViewMut<'_>, db: ViewMut<'_>, dout: View<'_>) {
        self.0.residual_backward(da, db, dout)
    }
    fn cross_entropy_forward(&self, losses: ViewMut<'_>, lse: ViewMut<'_>, logits: View<'_>, targets: &Ids, vocab: usize) {
        self.0.cross_entropy_forward(losses, lse, logits, targets, vocab)
    }
    fn cross_entropy_backward(&self, dlogits: ViewMut<'_>, logits: View<'_>, lse: View<'_>, targets: &Ids, dloss: f32, vocab: usize) {
        self.0.cross_entropy_backward(dlogits, logits, lse, targets, dloss, vocab)
    }
    fn cross_entropy_backward_in_place(&self, logits: ViewMut<'_>, lse: View<'_>, targets: &Ids, dloss: f32, vocab: usize) {
        self.0.cross_entropy_backward_in_place(logits, lse, targets, dloss, vocab)
    }
    fn cross_entropy_forward_backward_in_place(&self, losses: ViewMut<'_>, lse: ViewMut<'_>, logits: ViewMut<'_>, targets: &Ids, dloss: f32, vocab: usize) {
        self.0.cross_entropy_forward_backward_in_place(losses, lse, logits, targets, dloss, vocab)
    }
    fn adamw_update(&self, params: ViewMut<'_>, grads: View<'_>, m: ViewMut<'_>, v: ViewMut<'_>, hp: AdamWStep) {
        self.0.adamw_update(params, grads, m, v, hp)
    }
    fn adamw_update_runs(&self, params: &mut Buf, grads: &Buf, m: &mut Buf, v: &mut Buf, runs: &DecayRuns<Ids, Buf>, hp: AdamWStep) {
        self.0.adamw_update_runs(params, grads, m, v, runs, hp)
    }
    fn supports(&self, op: OptionalOp) -> bool {
        self.0.supports(op)
    }
    fn max_additive_width(&self) -> usize {
        self.0.max_additive_width()
    }
    fn attention_ex_forward(
        &self,
        out: ViewMut<'_>,
        saved: ViewMut<'_>,
        src: QkvSource<View<'_>>,
        scores: Scores<View<'_>>,
        key_lens: Option<&Ids>,
        shape: AttnShape,
    ) {
        self.0.attention_ex_forward(out, saved, src, scores, key_lens, shape)
    }
    fn attention_ex_backward(
        &self,
        dsrc: QkvSource<ViewMut<'_>>,
        dscores: Scores<ViewMut<'_>>,
        dout: View<'_>,
        src: QkvSource<View<'_>>,
        scores: Scores<View<'_>>,
        key_lens: Option<&Ids>,
        out: View<'_>,
        saved: View<'_>,
        shape: AttnShape,
    ) {
        self.0.attention_ex_backward(dsrc, dscores, dout, src, scores, key_lens, out, saved, shape)
    }
    fn attention_ex_backward_set(
        &self,
        dsrc: QkvSource<ViewMut<'_>>,
        dscores: Scores<ViewMut<'_>>,
        dout: View<'_>,
        src: QkvSource<View<'_>>,
        scores: Scores<View<'_>>,
        key_lens: Option<&Ids>,
        out: View<'_>,
        saved: View<'_>,
        shape: AttnShape,
    ) {
        self.0.attention_ex_backward_set(dsrc, dscores, dout, src, scores, key_lens, out, saved, shape)
    }
    fn tanh_forward(&self, out: ViewMut<'_>, inp: View<'_>) {
        self.0.tanh_forward(out, inp)
    }
    fn dropout_forward(&self, out: ViewMut<'_>, inp: View<'_>, mask: Dropout) {
        self.0.dropout_forward(out, inp, mask)
    }
    fn dropout_backward(&self, dinp: ViewMut<'_>, dout: View<'_>, mask: Dropout) {
        self.0.dropout_backward(dinp, dout, mask)
    }
    fn tanh_backward(&self, dinp: ViewMut<'_>, out: View<'_>, dout: View<'_>) {
        self.0.tanh_backward(dinp, out, dout)
    }
}
