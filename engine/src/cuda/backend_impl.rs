//! `impl Backend for CudaBackend`: each op handed to the module that runs it (matmul.rs,
//! attention.rs, layernorm.rs, ...); the backend itself (context, stream, kernels, scratch,
//! switches) is in mod.rs.

use std::ops::Range;

use super::{adamw, attention, cross_entropy, dropout, elementwise, embedding, layernorm, learned_scores, matmul, memory, peak, rope};
use super::{CudaBackend, CudaBuf, CudaIds, CudaView, CudaViewMut};
use crate::error::EngineError;
use crate::backend::{AdamWStep, AttnShape, Backend, DecayRuns, Dropout, MatmulShape, OptionalOp, QkvSource, Scores, TimelineMark};

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type View<'a> = CudaView<'a>;
    type ViewMut<'a> = CudaViewMut<'a>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn peak_flops(&self) -> Option<f64> {
        peak::dense_bf16_tflops(&self.device_name).map(|t| t * 1e12)
    }
    fn timeline_mark(&self) -> Option<TimelineMark> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        match self.stream.record_event(Some(CU_EVENT_DEFAULT)) {
            Ok(event) => Some(TimelineMark(Box::new(event))),
            Err(e) => {
                self.fail("timeline event", format!("{e:?}"));
                None
            }
        }
    }
    fn timeline_secs(&self, from: &TimelineMark, to: &TimelineMark) -> Option<f64> {
        let (from, to) = (from.0.downcast_ref::<cudarc::driver::CudaEvent>()?, to.0.downcast_ref::<cudarc::driver::CudaEvent>()?);
        from.elapsed_ms(to).ok().map(|ms| f64::from(ms) / 1e3)
    }
    fn synchronize(&self) -> Result<(), EngineError> {
        self.check(self.stream.synchronize(), "stream synchronize");
        self.check(self.ctx.check_err(), "deferred driver call");
        let kernel = self.take_kernel_errors();
        let first = self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        match first.or(kernel) {
            Some(e) => Err(EngineError::Device(e)),
            None => Ok(()),
        }
    }

    // ---- memory -------------------------------------------------------------------------

    fn zeros(&self, len: usize) -> CudaBuf {
        CudaBuf::f32(memory::zeros(self, len))
    }
    fn activation_zeros(&self, len: usize) -> CudaBuf {
        // Only the bf16 attention kernels read and write bf16 activations, so bf16 matmuls on a
        // GPU without them (before sm_80) keep f32 activations.
        if attention::bf16_family(self) && self.tuning().bf16_activations {
            memory::zeros_bf16(self, len)
        } else {
            self.zeros(len)
        }
    }
    fn upload(&self, host: &[f32]) -> CudaBuf {
        CudaBuf::f32(memory::upload(self, host))
    }
    fn upload_ids(&self, host: &[u32]) -> CudaIds {
        CudaIds::new(memory::upload(self, host), host.to_vec())
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }
    fn view<'a>(&self, buf: &'a CudaBuf, range: Range<usize>) -> CudaView<'a> {
        memory::view(self, buf, range)
    }
    fn view_mut<'a>(&self, buf: &'a mut CudaBuf, range: Range<usize>) -> CudaViewMut<'a> {
        memory::view_mut(self, buf, range)
    }
    fn split_mut<'a, const K: usize>(
        &self,
        buf: &'a mut CudaBuf,
        ranges: [Range<usize>; K],
    ) -> [CudaViewMut<'a>; K] {
        memory::split_mut(self, buf, ranges)
    }
    fn download(&self, view: CudaView<'_>) -> Vec<f32> {
        memory::download(self, view)
    }
    fn write(&self, dst: CudaViewMut<'_>, host: &[f32]) {
        memory::write(self, dst, host)
    }
    fn fill(&self, dst: CudaViewMut<'_>, value: f32) {
        memory::fill(self, dst, value)
    }
    fn copy(&self, dst: CudaViewMut<'_>, src: CudaView<'_>) {
        memory::copy(self, dst, src)
    }
    fn scale(&self, dst: CudaViewMut<'_>, s: f32) {
        memory::scale(self, dst, s)
    }
    fn sum_squares(&self, src: CudaView<'_>) -> f64 {
        memory::sum_squares(self, src)
    }

    // ---- embedding ----------------------------------------------------------------------

    fn embedding_forward(
        &self,
        out: CudaViewMut<'_>,
        ids: &CudaIds,
        table: CudaView<'_>,
        channels: usize,
        accumulate: bool,
    ) {
        embedding::forward(self, out, ids, table, channels, accumulate)
    }
    fn embedding_backward(
        &self,
        dtable: CudaViewMut<'_>,
        dout: CudaView<'_>,
        ids: &CudaIds,
        channels: usize,
    ) {
        embedding::backward(self, dtable, dout, ids, channels)
    }

    // ---- matmul -------------------------------------------------------------------------

    fn matmul_forward(
        &self,
        out: CudaViewMut<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        bias: Option<CudaView<'_>>,
        shape: MatmulShape,
    ) {
        matmul::forward(self, out, inp, weight, bias, shape)
    }
    fn matmul_forward_residual(
        &self,
        out: CudaViewMut<'_>,
        residual: CudaView<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        bias: Option<CudaView<'_>>,
        shape: MatmulShape,
    ) {
        matmul::forward_residual(self, out, residual, inp, weight, bias, shape)
    }
    fn matmul_backward(
        &self,
        dinp: Option<CudaViewMut<'_>>,
        dweight: CudaViewMut<'_>,
        dbias: Option<CudaViewMut<'_>>,
        dout: CudaView<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        shape: MatmulShape,
    ) {
        matmul::backward(self, dinp, dweight, dbias, dout, inp, weight, shape)
    }
    fn matmul_backward_set_dinp(
        &self,
        dinp: CudaViewMut<'_>,
        dweight: CudaViewMut<'_>,
        dbias: Option<CudaViewMut<'_>>,
        dout: CudaView<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        shape: MatmulShape,
    ) {
        matmul::backward_with(self, Some(dinp), 0.0, dweight, dbias, dout, inp, weight, shape)
    }

    // ---- layernorm ----------------------------------------------------------------------

    fn layernorm_forward(
        &self,
        out: CudaViewMut<'_>,
        mean: CudaViewMut<'_>,
        rstd: CudaViewMut<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        bias: CudaView<'_>,
        channels: usize,
    ) {
        layernorm::forward(self, out, mean, rstd, inp, weight, bias, channels)
    }
    fn layernorm_backward(
        &self,
        dinp: CudaViewMut<'_>,
        dweight: CudaViewMut<'_>,
        dbias: CudaViewMut<'_>,
        dout: CudaView<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        mean: CudaView<'_>,
        rstd: CudaView<'_>,
        channels: usize,
    ) {
        layernorm::backward(self, true, dinp, None, dweight, dbias, dout, inp, weight, mean, rstd, channels)
    }
    fn layernorm_backward_set(
        &self,
        dinp: CudaViewMut<'_>,
        dweight: CudaViewMut<'_>,
        dbias: CudaViewMut<'_>,
        dout: CudaView<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        mean: CudaView<'_>,
        rstd: CudaView<'_>,
        channels: usize,
    ) {
        layernorm::backward(self, false, dinp, None, dweight, dbias, dout, inp, weight, mean, rstd, channels)
    }
    fn layernorm_backward_and_copy_with_sum(
        &self,
        accumulate: bool,
        dinp: CudaViewMut<'_>,
        dinp_copy: CudaViewMut<'_>,
        dsum: CudaViewMut<'_>,
        dweight: CudaViewMut<'_>,
        dbias: CudaViewMut<'_>,
        dout: CudaView<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        mean: CudaView<'_>,
        rstd: CudaView<'_>,
        channels: usize,
    ) -> bool {
        if !layernorm::can_sum_copy(self, &dinp_copy, channels) {
            return false;
        }
        layernorm::backward_with_sum(self, accumulate, dinp, dinp_copy, dsum, dweight, dbias, dout, inp, weight, mean, rstd, channels);
        true
    }
    fn layernorm_backward_and_copy(
        &self,
        accumulate: bool,
        mut dinp: CudaViewMut<'_>,
        dinp_copy: CudaViewMut<'_>,
        dweight: CudaViewMut<'_>,
        dbias: CudaViewMut<'_>,
        dout: CudaView<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        mean: CudaView<'_>,
        rstd: CudaView<'_>,
        channels: usize,
    ) {
        if dinp_copy.is_bf16() {
            // the kernel that writes dinp stores its bf16 copy too
            layernorm::backward(self, accumulate, dinp, Some(dinp_copy), dweight, dbias, dout, inp, weight, mean, rstd, channels)
        } else {
            // f32 activations (SMELT_BF16_ACTIVATIONS=0, or no bf16 matmuls): the op, then a copy
            layernorm::backward(self, accumulate, dinp.reborrow(), None, dweight, dbias, dout, inp, weight, mean, rstd, channels);
            memory::copy(self, dinp_copy, dinp.as_view())
        }
    }

    // ---- attention (attention.rs) -------------------------------------------------------

    fn attention_saved_len(&self, shape: AttnShape) -> usize {
        attention::saved_len(self, shape)
    }
    fn attention_forward(
        &self,
        out: CudaViewMut<'_>,
        saved: CudaViewMut<'_>,
        src: QkvSource<CudaView<'_>>,
        shape: AttnShape,
    ) {
        attention::forward(self, out, saved, src, shape)
    }
    fn attention_backward(
        &self,
        dsrc: QkvSource<CudaViewMut<'_>>,
        dout: CudaView<'_>,
        src: QkvSource<CudaView<'_>>,
        out: CudaView<'_>,
        saved: CudaView<'_>,
        shape: AttnShape,
    ) {
        attention::backward(self, dsrc, dout, src, out, saved, shape, true)
    }
    fn attention_backward_set(
        &self,
        dsrc: QkvSource<CudaViewMut<'_>>,
        dout: CudaView<'_>,
        src: QkvSource<CudaView<'_>>,
        out: CudaView<'_>,
        saved: CudaView<'_>,
        shape: AttnShape,
    ) {
        attention::backward(self, dsrc, dout, src, out, saved, shape, false)
    }
    fn attention_backward_set_with_bias(
        &self,
        dsrc: QkvSource<CudaViewMut<'_>>,
        dbias: CudaViewMut<'_>,
        dout: CudaView<'_>,
        src: QkvSource<CudaView<'_>>,
        out: CudaView<'_>,
        saved: CudaView<'_>,
        shape: AttnShape,
    ) -> bool {
        attention::backward_set_with_bias(self, dsrc, dbias, dout, src, out, saved, shape)
    }
    fn supports(&self, op: OptionalOp) -> bool {
        // Dot scores run the flash kernels (attention.rs), general and additive ones the
        // learned-score kernels (learned_scores.rs); both take key padding masks.
        matches!(op, OptionalOp::KeyPaddingMask | OptionalOp::GeneralScores | OptionalOp::AdditiveScores)
    }
    fn max_additive_width(&self) -> usize {
        learned_scores::MAX_WIDTH
    }
    fn attention_ex_forward(
        &self,
        out: CudaViewMut<'_>,
        saved: CudaViewMut<'_>,
        src: QkvSource<CudaView<'_>>,
        scores: Scores<CudaView<'_>>,
        key_lens: Option<&CudaIds>,
        shape: AttnShape,
    ) {
        match scores {
            Scores::Dot => attention::forward_masked(self, out, saved, src, key_lens, shape),
            learned => learned_scores::forward(self, out, saved, src, learned, key_lens, shape),
        }
    }
    fn attention_ex_backward(
        &self,
        dsrc: QkvSource<CudaViewMut<'_>>,
        dscores: Scores<CudaViewMut<'_>>,
        dout: CudaView<'_>,
        src: QkvSource<CudaView<'_>>,
        scores: Scores<CudaView<'_>>,
        key_lens: Option<&CudaIds>,
        out: CudaView<'_>,
        saved: CudaView<'_>,
        shape: AttnShape,
    ) {
        attention_ex_backward(self, dsrc, dscores, dout, src, scores, key_lens, out, saved, shape, true)
    }
    fn attention_ex_backward_set(
        &self,
        dsrc: QkvSource<CudaViewMut<'_>>,
        dscores: Scores<CudaViewMut<'_>>,
        dout: CudaView<'_>,
        src: QkvSource<CudaView<'_>>,
        scores: Scores<CudaView<'_>>,
        key_lens: Option<&CudaIds>,
        out: CudaView<'_>,
        saved: CudaView<'_>,
        shape: AttnShape,
    ) {
        // Overwrite mode also writes zeros for the padded keys' rows (both kernel families).
        attention_ex_backward(self, dsrc, dscores, dout, src, scores, key_lens, out, saved, shape, false)
    }

    // ---- elementwise --------------------------------------------------------------------

    fn matmul_gelu_forward_fused(
        &self,
        out: CudaViewMut<'_>,
        pre: CudaViewMut<'_>,
        inp: CudaView<'_>,
        weight: CudaView<'_>,
        bias: Option<CudaView<'_>>,
        shape: MatmulShape,
    ) -> bool {
        matmul::forward_gelu(self, out, pre, inp, weight, bias, shape)
    }
    fn matmul_dgelu_backward_fused(
        &self,
        dpre: CudaViewMut<'_>,
        dpre_bias: Option<CudaViewMut<'_>>,
        dweight: CudaViewMut<'_>,
        dbias: Option<CudaViewMut<'_>>,
        dout: CudaView<'_>,
        act: CudaView<'_>,
        pre: CudaView<'_>,
        weight: CudaView<'_>,
        shape: MatmulShape,
    ) -> bool {
        matmul::backward_dgelu(self, dpre, dpre_bias, dweight, dbias, dout, act, pre, weight, shape)
    }
    fn rope(&self, qkv: CudaViewMut<'_>, table: CudaView<'_>, s: crate::backend::RopeShape, inverse: bool) {
        rope::rope(self, qkv, table, s, inverse)
    }
    fn gelu_forward(&self, out: CudaViewMut<'_>, inp: CudaView<'_>) {
        elementwise::gelu_forward(self, out, inp)
    }
    fn gelu_backward(&self, dinp: CudaViewMut<'_>, inp: CudaView<'_>, dout: CudaView<'_>) {
        elementwise::gelu_backward(self, dinp, inp, dout)
    }
    fn gelu_backward_set(&self, dinp: CudaViewMut<'_>, inp: CudaView<'_>, dout: CudaView<'_>) {
        elementwise::gelu_backward_set(self, dinp, inp, dout)
    }
    fn gelu_backward_set_with_bias(&self, dinp: CudaViewMut<'_>, dbias: CudaViewMut<'_>, inp: CudaView<'_>, dout: CudaView<'_>, cols: usize) -> bool {
        elementwise::gelu_backward_set_with_bias(self, dinp, dbias, inp, dout, cols)
    }
    fn tanh_forward(&self, out: CudaViewMut<'_>, inp: CudaView<'_>) {
        elementwise::tanh_forward(self, out, inp)
    }
    fn tanh_backward(&self, dinp: CudaViewMut<'_>, out: CudaView<'_>, dout: CudaView<'_>) {
        elementwise::tanh_backward(self, dinp, out, dout)
    }
    fn residual_forward(&self, out: CudaViewMut<'_>, a: CudaView<'_>, b: CudaView<'_>) {
        elementwise::residual_forward(self, out, a, b)
    }
    fn residual_backward(&self, da: CudaViewMut<'_>, db: CudaViewMut<'_>, dout: CudaView<'_>) {
        elementwise::residual_backward(self, da, db, dout)
    }
    fn dropout_forward(&self, out: CudaViewMut<'_>, inp: CudaView<'_>, mask: Dropout) {
        dropout::forward(self, out, inp, mask)
    }
    fn dropout_backward(&self, dinp: CudaViewMut<'_>, dout: CudaView<'_>, mask: Dropout) {
        dropout::backward(self, dinp, dout, mask)
    }

    // ---- cross-entropy ------------------------------------------------------------------

    fn cross_entropy_forward(
        &self,
        losses: CudaViewMut<'_>,
        lse: CudaViewMut<'_>,
        logits: CudaView<'_>,
        targets: &CudaIds,
        vocab: usize,
    ) {
        cross_entropy::forward(self, losses, lse, logits, targets, vocab)
    }
    fn cross_entropy_backward(
        &self,
        dlogits: CudaViewMut<'_>,
        logits: CudaView<'_>,
        lse: CudaView<'_>,
        targets: &CudaIds,
        dloss: f32,
        vocab: usize,
    ) {
        cross_entropy::backward(self, dlogits, logits, lse, targets, dloss, vocab)
    }
    fn cross_entropy_backward_in_place(&self, logits: CudaViewMut<'_>, lse: CudaView<'_>, targets: &CudaIds, dloss: f32, vocab: usize) {
        cross_entropy::backward_in_place(self, logits, lse, targets, dloss, vocab)
    }
    fn cross_entropy_forward_backward_in_place(
        &self,
        losses: CudaViewMut<'_>,
        lse: CudaViewMut<'_>,
        logits: CudaViewMut<'_>,
        targets: &CudaIds,
        dloss: f32,
        vocab: usize,
    ) {
        cross_entropy::forward_backward_in_place(self, losses, lse, logits, targets, dloss, vocab)
    }

    // ---- optimizer ----------------------------------------------------------------------

    fn adamw_update_runs(
        &self,
        params: &mut CudaBuf,
        grads: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        runs: &DecayRuns<CudaIds, CudaBuf>,
        hp: AdamWStep,
    ) {
        // Run ends are stored as u32: a larger buffer takes the per-run launches.
        if runs.len() < u32::MAX as usize {
            adamw::update_runs(self, params, grads, m, v, runs, hp)
        } else {
            crate::backend::adamw_update_each_run(self, params, grads, m, v, runs, hp)
        }
    }
    fn adamw_update(
        &self,
        params: CudaViewMut<'_>,
        grads: CudaView<'_>,
        m: CudaViewMut<'_>,
        v: CudaViewMut<'_>,
        hp: AdamWStep,
    ) {
        adamw::update(self, params, grads, m, v, hp)
    }
}

/// `attention_ex_backward(_set)`: the dot score by the flash kernels, the learned ones by theirs.
#[allow(clippy::too_many_arguments)]
fn attention_ex_backward(
    be: &CudaBackend,
    dsrc: QkvSource<CudaViewMut<'_>>,
    dscores: Scores<CudaViewMut<'_>>,
    dout: CudaView<'_>,
    src: QkvSource<CudaView<'_>>,
    scores: Scores<CudaView<'_>>,
    key_lens: Option<&CudaIds>,
    out: CudaView<'_>,
    saved: CudaView<'_>,
    shape: AttnShape,
    accumulate: bool,
) {
    match (scores, dscores) {
        (Scores::Dot, Scores::Dot) => attention::backward_masked(be, dsrc, dout, src, out, saved, key_lens, shape, accumulate),
        (scores, dscores) => learned_scores::backward(be, dsrc, dscores, dout, src, scores, key_lens, out, saved, shape, accumulate),
    }
}
