//! `CpuBackend`: the readable f32 reference. Matmuls go through the `gemm` crate; every other op
//! is a plain loop over rows, parallel with rayon. Every reduction runs in an order fixed by the
//! data's shape, never by the thread count, so results are bitwise identical whatever the pool.

mod adamw;
mod attention;
mod attention_ex;
mod cross_entropy;
/// The dropout mask (a hash of seed and element counter), shared with the CUDA kernel.
pub mod dropout;
mod elementwise;
mod embedding;
mod layernorm;
/// LayerNorm's epsilon (GPT-2's `layer_norm_epsilon`), for code that must agree with it.
pub use layernorm::EPS as LAYER_NORM_EPS;
mod matmul;
mod rope;

use std::ops::Range;

use rayon::prelude::*;

use crate::backend::{AdamWStep, AttnShape, Backend, Dropout, MatmulShape, OptionalOp, QkvSource, RopeShape, Scores};

/// Rows handled by one task in chunked reductions; a constant so that partial sums (and thus
/// rounding) never depend on how many threads run them.
pub(crate) const ROWS_PER_TASK: usize = 64;
/// Elements per partial sum in `sum_squares`.
const SUM_CHUNK: usize = 4096;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn upload(&self, host: &[f32]) -> Vec<f32> {
        host.to_vec()
    }
    fn upload_ids(&self, host: &[u32]) -> Vec<u32> {
        host.to_vec()
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }
    fn split_mut<'a, const K: usize>(
        &self,
        buf: &'a mut Vec<f32>,
        ranges: [Range<usize>; K],
    ) -> [&'a mut [f32]; K] {
        split_disjoint(buf, ranges)
    }
    fn download(&self, view: &[f32]) -> Vec<f32> {
        view.to_vec()
    }
    fn write(&self, dst: &mut [f32], host: &[f32]) {
        dst.copy_from_slice(host);
    }
    fn fill(&self, dst: &mut [f32], value: f32) {
        dst.par_chunks_mut(1 << 16).for_each(|c| c.fill(value));
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
    fn scale(&self, dst: &mut [f32], s: f32) {
        dst.par_chunks_mut(1 << 16).for_each(|c| c.iter_mut().for_each(|x| *x *= s));
    }
    fn sum_squares(&self, src: &[f32]) -> f64 {
        let partials: Vec<f64> = src
            .par_chunks(SUM_CHUNK)
            .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .collect();
        partials.iter().sum()
    }

    fn embedding_forward(
        &self,
        out: &mut [f32],
        ids: &Vec<u32>,
        table: &[f32],
        channels: usize,
        accumulate: bool,
    ) {
        embedding::forward(out, ids, table, channels, accumulate)
    }
    fn embedding_backward(&self, dtable: &mut [f32], dout: &[f32], ids: &Vec<u32>, channels: usize) {
        embedding::backward(dtable, dout, ids, channels)
    }

    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        shape: MatmulShape,
    ) {
        matmul::forward(out, inp, weight, bias, shape)
    }
    fn matmul_forward_residual(
        &self,
        out: &mut [f32],
        residual: &[f32],
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        shape: MatmulShape,
    ) {
        assert_eq!(out.len(), residual.len(), "matmul residual: out {} vs residual {}", out.len(), residual.len());
        matmul::forward(out, inp, weight, bias, shape);
        // residual + projection, the order `residual_forward(out, residual, proj)` adds in
        elementwise::add_onto(out, residual);
    }
    fn matmul_backward(
        &self,
        dinp: Option<&mut [f32]>,
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        shape: MatmulShape,
    ) {
        matmul::backward(dinp, dweight, dbias, dout, inp, weight, shape)
    }
    fn matmul_backward_set_dinp(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        shape: MatmulShape,
    ) {
        matmul::backward_with(Some(dinp), false, dweight, dbias, dout, inp, weight, shape)
    }

    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        channels: usize,
    ) {
        layernorm::forward(out, mean, rstd, inp, weight, bias, channels)
    }
    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        channels: usize,
    ) {
        layernorm::backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, channels)
    }
    fn layernorm_backward_set(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        channels: usize,
    ) {
        // the reference: zeros, then the accumulating backward (0 + x = x, bit for bit)
        dinp.fill(0.0);
        layernorm::backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, channels)
    }
    fn layernorm_backward_and_copy(
        &self,
        accumulate: bool,
        dinp: &mut [f32],
        dinp_copy: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        channels: usize,
    ) {
        assert_eq!(dinp_copy.len(), dinp.len(), "layernorm backward: dinp's copy and dinp differ in length");
        // activations are f32 here: the op, then a plain copy
        if accumulate {
            self.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, channels);
        } else {
            self.layernorm_backward_set(dinp, dweight, dbias, dout, inp, weight, mean, rstd, channels);
        }
        self.copy(dinp_copy, dinp);
    }

    fn attention_saved_len(&self, shape: AttnShape) -> usize {
        attention::saved_len(shape)
    }
    fn attention_forward(
        &self,
        out: &mut [f32],
        saved: &mut [f32],
        src: QkvSource<&[f32]>,
        shape: AttnShape,
    ) {
        attention::forward(out, saved, src, shape)
    }
    fn attention_backward(
        &self,
        dsrc: QkvSource<&mut [f32]>,
        dout: &[f32],
        src: QkvSource<&[f32]>,
        _out: &[f32],
        saved: &[f32],
        shape: AttnShape,
    ) {
        attention::backward(dsrc, dout, src, saved, shape)
    }
    fn attention_backward_set(
        &self,
        dsrc: QkvSource<&mut [f32]>,
        dout: &[f32],
        src: QkvSource<&[f32]>,
        _out: &[f32],
        saved: &[f32],
        shape: AttnShape,
    ) {
        attention::backward(zeroed(dsrc), dout, src, saved, shape)
    }
    // The bias-gradient fusions as their two steps, in the order the projections' backward would
    // sum them (bitwise the same gradients): so the CPU runs the models' fused paths too.
    fn attention_backward_set_with_bias(
        &self,
        dsrc: QkvSource<&mut [f32]>,
        dbias: &mut [f32],
        dout: &[f32],
        src: QkvSource<&[f32]>,
        out: &[f32],
        saved: &[f32],
        shape: AttnShape,
    ) -> bool {
        let QkvSource::Packed(dqkv) = dsrc else { return false };
        assert_eq!(dbias.len(), 3 * shape.channels, "attention dbias (3C)");
        self.attention_backward_set(QkvSource::Packed(&mut *dqkv), dout, src, out, saved, shape);
        matmul::add_column_sums(dbias, dqkv, 3 * shape.channels);
        true
    }
    fn layernorm_backward_and_copy_with_sum(
        &self,
        accumulate: bool,
        dinp: &mut [f32],
        dinp_copy: &mut [f32],
        dsum: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        channels: usize,
    ) -> bool {
        assert_eq!(dsum.len(), channels, "layernorm backward: the copy's column sums (C)");
        self.layernorm_backward_and_copy(accumulate, dinp, &mut *dinp_copy, dweight, dbias, dout, inp, weight, mean, rstd, channels);
        matmul::add_column_sums(dsum, dinp_copy, channels);
        true
    }
    fn gelu_backward_set_with_bias(&self, dinp: &mut [f32], dbias: &mut [f32], inp: &[f32], dout: &[f32], cols: usize) -> bool {
        assert_eq!(dbias.len(), cols, "gelu backward: dbias (cols)");
        self.gelu_backward_set(&mut *dinp, inp, dout);
        matmul::add_column_sums(dbias, dinp, cols);
        true
    }

    fn rope(&self, qkv: &mut [f32], table: &[f32], s: RopeShape, inverse: bool) {
        rope::rope(qkv, table, s, inverse)
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        elementwise::gelu_forward(out, inp)
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        elementwise::gelu_backward(dinp, inp, dout)
    }
    fn gelu_backward_set(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        dinp.fill(0.0);
        elementwise::gelu_backward(dinp, inp, dout)
    }
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        elementwise::residual_forward(out, a, b)
    }
    fn residual_backward(&self, da: &mut [f32], db: &mut [f32], dout: &[f32]) {
        elementwise::residual_backward(da, db, dout)
    }

    fn dropout_forward(&self, out: &mut [f32], inp: &[f32], mask: Dropout) {
        dropout::forward(out, inp, mask)
    }
    fn dropout_backward(&self, dinp: &mut [f32], dout: &[f32], mask: Dropout) {
        dropout::backward(dinp, dout, mask)
    }

    fn cross_entropy_forward(
        &self,
        losses: &mut [f32],
        lse: &mut [f32],
        logits: &[f32],
        targets: &Vec<u32>,
        vocab: usize,
    ) {
        cross_entropy::forward(losses, lse, logits, targets, vocab)
    }
    fn cross_entropy_backward(
        &self,
        dlogits: &mut [f32],
        logits: &[f32],
        lse: &[f32],
        targets: &Vec<u32>,
        dloss: f32,
        vocab: usize,
    ) {
        cross_entropy::backward(dlogits, logits, lse, targets, dloss, vocab)
    }
    fn cross_entropy_backward_in_place(&self, logits: &mut [f32], lse: &[f32], targets: &Vec<u32>, dloss: f32, vocab: usize) {
        cross_entropy::backward_in_place(logits, lse, targets, dloss, vocab)
    }
    fn cross_entropy_forward_backward_in_place(
        &self,
        losses: &mut [f32],
        lse: &mut [f32],
        logits: &mut [f32],
        targets: &Vec<u32>,
        dloss: f32,
        vocab: usize,
    ) {
        cross_entropy::forward(losses, lse, logits, targets, vocab);
        cross_entropy::backward_in_place(logits, lse, targets, dloss, vocab)
    }

    fn adamw_update(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        hp: AdamWStep,
    ) {
        adamw::update(params, grads, m, v, hp)
    }

    fn supports(&self, op: OptionalOp) -> bool {
        match op {
            OptionalOp::KeyPaddingMask | OptionalOp::GeneralScores | OptionalOp::AdditiveScores => true,
        }
    }
    fn attention_ex_forward(
        &self,
        out: &mut [f32],
        saved: &mut [f32],
        src: QkvSource<&[f32]>,
        scores: Scores<&[f32]>,
        key_lens: Option<&Vec<u32>>,
        shape: AttnShape,
    ) {
        attention_ex::forward(out, saved, src, scores, key_lens.map(|l| &l[..]), shape)
    }
    fn attention_ex_backward(
        &self,
        dsrc: QkvSource<&mut [f32]>,
        dscores: Scores<&mut [f32]>,
        dout: &[f32],
        src: QkvSource<&[f32]>,
        scores: Scores<&[f32]>,
        key_lens: Option<&Vec<u32>>,
        _out: &[f32],
        saved: &[f32],
        shape: AttnShape,
    ) {
        attention_ex::backward(dsrc, dscores, dout, src, scores, key_lens.map(|l| &l[..]), saved, shape)
    }
    fn attention_ex_backward_set(
        &self,
        dsrc: QkvSource<&mut [f32]>,
        dscores: Scores<&mut [f32]>,
        dout: &[f32],
        src: QkvSource<&[f32]>,
        scores: Scores<&[f32]>,
        key_lens: Option<&Vec<u32>>,
        _out: &[f32],
        saved: &[f32],
        shape: AttnShape,
    ) {
        attention_ex::backward(zeroed(dsrc), dscores, dout, src, scores, key_lens.map(|l| &l[..]), saved, shape)
    }
}

/// The overwriting attention backwards' reference: zero the source gradients, then accumulate.
fn zeroed(dsrc: QkvSource<&mut [f32]>) -> QkvSource<&mut [f32]> {
    match dsrc {
        QkvSource::Packed(d) => {
            d.fill(0.0);
            QkvSource::Packed(d)
        }
        QkvSource::Split { q, kv } => {
            q.fill(0.0);
            kv.fill(0.0);
            QkvSource::Split { q, kv }
        }
    }
}

/// Splits `buf` into `K` disjoint mutable ranges (in any order). Panics on overlap.
fn split_disjoint<const K: usize>(buf: &mut [f32], ranges: [Range<usize>; K]) -> [&mut [f32]; K] {
    let mut order: Vec<usize> = (0..K).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut slots: Vec<Option<&mut [f32]>> = (0..K).map(|_| None).collect();
    let mut rest: &mut [f32] = buf;
    let mut consumed = 0;
    for &i in &order {
        let r = &ranges[i];
        assert!(r.start >= consumed, "split_mut: ranges overlap ({:?})", ranges);
        let tail = std::mem::take(&mut rest);
        let (_, tail) = tail.split_at_mut(r.start - consumed);
        let (piece, tail) = tail.split_at_mut(r.end - r.start);
        slots[i] = Some(piece);
        rest = tail;
        consumed = r.end;
    }
    let v: Vec<&mut [f32]> = slots.into_iter().map(|s| s.unwrap()).collect();
    match v.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("exactly K slots were filled"),
    }
}

#[cfg(test)]
mod tests {
    use super::CpuBackend;
    use crate::backend::Backend;
    use crate::rng::Rng;

    fn randn(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn layernorm_backward_and_copy_matches_layernorm_backward() {
        let be = CpuBackend::new();
        let (n, c) = (70, 9); // two row chunks of the reference's reductions
        let (x, w, b, dout, dinp0) = (randn(1, n * c), randn(2, c), randn(3, c), randn(4, n * c), randn(5, n * c));
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, c);
        for accumulate in [true, false] {
            // the reference: the accumulating op onto dinp0, or onto zeros for the set mode
            let mut want = if accumulate { dinp0.clone() } else { vec![0.0; n * c] };
            let (mut dw_want, mut db_want) = (randn(6, c), randn(7, c));
            be.layernorm_backward(&mut want, &mut dw_want, &mut db_want, &dout, &x, &w, &mean, &rstd, c);
            // set mode starts from NaN (it must overwrite); the copy always does
            let mut dinp = if accumulate { dinp0.clone() } else { vec![f32::NAN; n * c] };
            let mut copy = vec![f32::NAN; n * c];
            let (mut dw, mut db) = (randn(6, c), randn(7, c));
            be.layernorm_backward_and_copy(accumulate, &mut dinp, &mut copy, &mut dw, &mut db, &dout, &x, &w, &mean, &rstd, c);
            assert_eq!(bits(&dinp), bits(&want), "accumulate {accumulate}: dinp");
            assert_eq!(bits(&copy), bits(&want), "accumulate {accumulate}: the copy");
            assert_eq!(bits(&dw), bits(&dw_want), "accumulate {accumulate}: dweight");
            assert_eq!(bits(&db), bits(&db_want), "accumulate {accumulate}: dbias");
        }
    }
}
