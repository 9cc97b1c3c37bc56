//! `Profiled<B>`: any backend, with the time of every op recorded.
//!
//! By default ([`Profiled::new`]) each op is bracketed by `synchronize`, so on an asynchronous
//! device the time is the op's own (launch + run), not the launch alone. That serialises the
//! device and removes any overlap, so a profiled step is slower than a real one: the table says
//! where time goes, not how fast a step is. `smelt bench step --profile` prints it.
//!
//! [`Profiled::timeline`] instead brackets each op with marks on the device's timeline
//! (`Backend::timeline_mark`: CUDA events), so the device runs as it does unprofiled; each op's
//! time is read from its two marks, and the time between one op's end and the next one's start
//! is the device waiting for the host (launch overhead, host work, syncs), reported as its own
//! row, [`IDLE`]. `smelt bench step --timeline` prints it. A backend without marks (the CPU,
//! whose ops are synchronous) is timed as by `new`.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Instant;

use crate::backend::{AdamWStep, AttnShape, Backend, DecayRuns, Dropout, MatmulShape, OptionalOp, QkvSource, Scores, TimelineMark};
use crate::EngineError;

/// Calls and total seconds of one op (keyed by op name and shape).
#[derive(Clone, Debug, Default)]
pub struct OpTime {
    pub calls: u64,
    pub secs: f64,
}

/// The timeline profile's row for the device's idle time between ops.
pub const IDLE: &str = "(device idle between ops)";

/// Marks read back in batches of at most this many ops (one sync each), so that a long profile
/// does not hold unboundedly many events.
const MAX_PENDING: usize = 4096;

/// Timeline marks of ops not read back yet, in launch order, and the end mark of the op before
/// the first of them (so the gap before it is counted too).
pub(crate) struct MarkLog<M> {
    pending: Vec<(String, M, M)>,
    last_end: Option<M>,
}

impl<M> MarkLog<M> {
    pub(crate) fn new() -> Self {
        MarkLog { pending: Vec::new(), last_end: None }
    }

    pub(crate) fn push(&mut self, key: String, start: M, end: M) {
        self.pending.push((key, start, end));
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Forgets every mark: after warm-up, or after a sync of our own, whose wait is not the
    /// workload's (the next op's gap is then not counted).
    pub(crate) fn forget(&mut self) {
        self.pending.clear();
        self.last_end = None;
    }

    /// Reads the pending marks with `secs` (device seconds from one mark to another; None: not
    /// readable, the op or gap is left out): each op's own time into `times` under its key, the
    /// gaps between ops into `times[IDLE]` (its calls: the gaps counted).
    pub(crate) fn drain(&mut self, secs: impl Fn(&M, &M) -> Option<f64>, times: &mut HashMap<String, OpTime>) {
        for (key, start, end) in self.pending.drain(..) {
            if let Some(gap) = self.last_end.as_ref().and_then(|prev| secs(prev, &start)) {
                let e = times.entry(IDLE.to_string()).or_default();
                e.calls += 1;
                e.secs += gap.max(0.0);
            }
            if let Some(t) = secs(&start, &end) {
                let e = times.entry(key).or_default();
                e.calls += 1;
                e.secs += t.max(0.0);
            }
            self.last_end = Some(end);
        }
    }
}

pub struct Profiled<B: Backend> {
    inner: B,
    times: Mutex<HashMap<String, OpTime>>,
    /// Some for a timeline profile: the marks not read back yet.
    marks: Option<Mutex<MarkLog<TimelineMark>>>,
}

impl<B: Backend> Profiled<B> {
    /// Each op bracketed by device syncs (see the module's comment).
    pub fn new(inner: B) -> Self {
        Profiled { inner, times: Mutex::new(HashMap::new()), marks: None }
    }
    /// Each op bracketed by marks on the device's timeline, no syncs (see the module's comment).
    pub fn timeline(inner: B) -> Self {
        Profiled { inner, times: Mutex::new(HashMap::new()), marks: Some(Mutex::new(MarkLog::new())) }
    }
    pub fn inner(&self) -> &B {
        &self.inner
    }
    /// Forgets what was recorded (after warm-up steps).
    pub fn reset(&self) {
        self.times.lock().unwrap().clear();
        if let Some(m) = &self.marks {
            m.lock().unwrap().forget();
        }
    }
    /// (op, calls, seconds), most expensive first. A timeline profile first waits for the device
    /// and reads its marks.
    pub fn report(&self) -> Vec<(String, OpTime)> {
        self.read_marks();
        let mut rows: Vec<_> = self.times.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        rows.sort_by(|a, b| b.1.secs.total_cmp(&a.1.secs));
        rows
    }

    /// Waits for the device and moves the pending marks' times into the table.
    fn read_marks(&self) {
        let Some(marks) = &self.marks else { return };
        let _ = self.inner.synchronize();
        let mut marks = marks.lock().unwrap();
        marks.drain(|a, b| self.inner.timeline_secs(a, b), &mut self.times.lock().unwrap());
    }

    fn timed<R>(&self, key: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
        self.timed_if(key, f, |_| true)
    }

    /// A fused op that may decline (returns false: the caller runs the separate ops, which are
    /// timed themselves): timed only when it ran, so the profile shows no row of zero-time calls.
    fn timed_fused(&self, key: impl FnOnce() -> String, f: impl FnOnce() -> bool) -> bool {
        self.timed_if(key, f, |ran| *ran)
    }

    /// `f` timed under `key` when `keep` says its result counts.
    fn timed_if<R>(&self, key: impl FnOnce() -> String, f: impl FnOnce() -> R, keep: impl FnOnce(&R) -> bool) -> R {
        if let Some(marks) = &self.marks {
            if let Some(start) = self.inner.timeline_mark() {
                let r = f();
                if !keep(&r) {
                    return r;
                }
                if let Some(end) = self.inner.timeline_mark() {
                    let full = {
                        let mut m = marks.lock().unwrap();
                        m.push(key(), start, end);
                        m.len() >= MAX_PENDING
                    };
                    if full {
                        self.read_marks();
                        // the wait just now was ours, not the workload's
                        marks.lock().unwrap().forget();
                    }
                }
                return r;
            }
        }
        // A failed sync leaves its error recorded in the inner backend for the trainer's own
        // `synchronize` to report; here only the time matters.
        let _ = self.inner.synchronize();
        let t = Instant::now();
        let r = f();
        let _ = self.inner.synchronize();
        let secs = t.elapsed().as_secs_f64();
        if !keep(&r) {
            return r;
        }
        let mut times = self.times.lock().unwrap();
        let e = times.entry(key()).or_default();
        e.calls += 1;
        e.secs += secs;
        r
    }
}

fn mm_key(op: &str, s: MatmulShape) -> String {
    format!("{op} {}x{}->{} {:?}", s.rows, s.in_features, s.out_features, s.layout)
}
fn attn_key(op: &str, s: AttnShape) -> String {
    format!("{op} B{} Tq{} Tk{} C{} H{}{}", s.batch, s.q_len, s.kv_len, s.channels, s.heads, if s.causal { " causal" } else { "" })
}

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    type Ids = B::Ids;
    type View<'a> = B::View<'a>;
    type ViewMut<'a> = B::ViewMut<'a>;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn synchronize(&self) -> Result<(), EngineError> {
        self.inner.synchronize()
    }
    fn peak_flops(&self) -> Option<f64> {
        self.inner.peak_flops()
    }
    fn zeros(&self, len: usize) -> B::Buf {
        self.timed(|| "zeros".into(), || self.inner.zeros(len))
    }
    fn activation_zeros(&self, len: usize) -> B::Buf {
        self.timed(|| "zeros".into(), || self.inner.activation_zeros(len))
    }
    fn upload(&self, host: &[f32]) -> B::Buf {
        self.timed(|| "upload".into(), || self.inner.upload(host))
    }
    fn upload_ids(&self, host: &[u32]) -> B::Ids {
        self.timed(|| "upload_ids".into(), || self.inner.upload_ids(host))
    }
    fn len(&self, buf: &B::Buf) -> usize {
        self.inner.len(buf)
    }
    fn view<'a>(&self, buf: &'a B::Buf, range: Range<usize>) -> B::View<'a> {
        self.inner.view(buf, range)
    }
    fn view_mut<'a>(&self, buf: &'a mut B::Buf, range: Range<usize>) -> B::ViewMut<'a> {
        self.inner.view_mut(buf, range)
    }
    fn split_mut<'a, const K: usize>(&self, buf: &'a mut B::Buf, ranges: [Range<usize>; K]) -> [B::ViewMut<'a>; K] {
        self.inner.split_mut(buf, ranges)
    }
    fn download(&self, view: B::View<'_>) -> Vec<f32> {
        self.timed(|| "download".into(), || self.inner.download(view))
    }
    fn write(&self, dst: B::ViewMut<'_>, host: &[f32]) {
        self.timed(|| "write".into(), || self.inner.write(dst, host))
    }
    fn fill(&self, dst: B::ViewMut<'_>, value: f32) {
        self.timed(|| "fill".into(), || self.inner.fill(dst, value))
    }
    fn copy(&self, dst: B::ViewMut<'_>, src: B::View<'_>) {
        self.timed(|| "copy".into(), || self.inner.copy(dst, src))
    }
    fn scale(&self, dst: B::ViewMut<'_>, s: f32) {
        self.timed(|| "scale".into(), || self.inner.scale(dst, s))
    }
    fn sum_squares(&self, src: B::View<'_>) -> f64 {
        self.timed(|| "sum_squares".into(), || self.inner.sum_squares(src))
    }
    fn embedding_forward(&self, out: B::ViewMut<'_>, ids: &B::Ids, table: B::View<'_>, channels: usize, accumulate: bool) {
        self.timed(|| "embedding_forward".into(), || self.inner.embedding_forward(out, ids, table, channels, accumulate))
    }
    fn embedding_backward(&self, dtable: B::ViewMut<'_>, dout: B::View<'_>, ids: &B::Ids, channels: usize) {
        self.timed(|| "embedding_backward".into(), || self.inner.embedding_backward(dtable, dout, ids, channels))
    }
    fn matmul_forward(&self, out: B::ViewMut<'_>, inp: B::View<'_>, weight: B::View<'_>, bias: Option<B::View<'_>>, shape: MatmulShape) {
        self.timed(|| mm_key("matmul_forward", shape), || self.inner.matmul_forward(out, inp, weight, bias, shape))
    }
    fn matmul_forward_residual(
        &self,
        out: B::ViewMut<'_>,
        residual: B::View<'_>,
        inp: B::View<'_>,
        weight: B::View<'_>,
        bias: Option<B::View<'_>>,
        shape: MatmulShape,
    ) {
        self.timed(|| mm_key("matmul_forward_residual", shape), || self.inner.matmul_forward_residual(out, residual, inp, weight, bias, shape))
    }
    fn matmul_backward(
        &self,
        dinp: Option<B::ViewMut<'_>>,
        dweight: B::ViewMut<'_>,
        dbias: Option<B::ViewMut<'_>>,
        dout: B::View<'_>,
        inp: B::View<'_>,
        weight: B::View<'_>,
        shape: MatmulShape,
    ) {
        self.timed(|| mm_key("matmul_backward", shape), || self.inner.matmul_backward(dinp, dweight, dbias, dout, inp, weight, shape))
    }
    fn matmul_backward_set_dinp(
        &self,
        dinp: B::ViewMut<'_>,
        dweight: B::ViewMut<'_>,
        dbias: Option<B::ViewMut<'_>>,
        dout: B::View<'_>,
        inp: B::View<'_>,
        weight: B::View<'_>,
        shape: MatmulShape,
    ) {
        self.timed(|| mm_key("matmul_backward", shape), || self.inner.matmul_backward_set_dinp(dinp, dweight, dbias, dout, inp, weight, shape))
    }
    fn layernorm_forward(
        &self,
        out: B::ViewMut<'_>,
        mean: B::ViewMut<'_>,
        rstd: B::ViewMut<'_>,
        inp: B::View<'_>,
        weight: B::View<'_>,
        bias: B::View<'_>,
        channels: usize,
    ) {
        self.timed(|| "layernorm_forward".into(), || self.inner.layernorm_forward(out, mean, rstd, inp, weight, bias, channels))
    }
    fn layernorm_backward(
        &self,
        dinp: B::ViewMut<'_>,
        dweight: B::ViewMut<'_>,
        dbias: B::ViewMut<'_>,
        dout: B::View<'_>,
        inp: B::View<'_>,
        weight: B::View<'_>,
        mean: B::View<'_>,
        rstd: B::View<'_>,
        channels: usize,
    ) {
        self.timed(
            || "layernorm_backward".into(),
            || self.inner.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, channels),
        )
    }
    fn layernorm_backward_set(
        &self,
        dinp: B::ViewMut<'_>,
        dweight: B::ViewMut<'_>,
        dbias: B::ViewMut<'_>,
        dout: B::View<'_>,
        inp: B::View<'_>,
        weight: B::View<'_>,
        mean: B::View<'_>,
        rstd: B::View<'_>,
        channels: usize,
    ) {
        self.timed(
            || "layernorm_backward".into(),
            || self.inner.layernorm_backward_set(dinp, dweight, dbias, dout, inp, weight, mean, rstd, channels),
        )
    }
    fn layernorm_backward_and_copy(
        &self,
        accumulate: bool,
        dinp: B::ViewMut<'_>,
        dinp_copy: B::ViewMut<'_>,
        dweight: B::ViewMut<'_>,
        dbias: B::ViewMut<'_>,
        dout: B::View<'_>,
        inp: B::View<'_>,
        weight: B::View<'_>,
        mean: B::View<'_>,
        rstd: B::View<'_>,
        channels: usize,
    ) {
        self.timed(
            || "layernorm_backward".into(),
            || self.inner.layernorm_backward_and_copy(accumulate, dinp, dinp_copy, dweight, dbias, dout, inp, weight, mean, rstd, channels),
        )
    }
    fn layernorm_backward_and_copy_with_sum(
        &self,
        accumulate: bool,
        dinp: B::ViewMut<'_>,
        dinp_copy: B::ViewMut<'_>,
        dsum: B::ViewMut<'_>,
        dweight: B::ViewMut<'_>,
        dbias: B::ViewMut<'_>,
        dout: B::View<'_>,
        inp: B::View<'_>,
        weight: B::View<'_>,
        mean: B::View<'_>,
        rstd: B::View<'_>,
        channels: usize,
    ) -> bool {
        self.timed_fused(
            || "layernorm_backward+bias".into(),
            || self.inner.layernorm_backward_and_copy_with_sum(accumulate, dinp, dinp_copy, dsum, dweight, dbias, dout, inp, weight, mean, rstd, channels),
        )
    }
    fn attention_saved_len(&self, shape: AttnShape) -> usize {
        self.inner.attention_saved_len(shape)
    }
    fn attention_forward(&self, out: B::ViewMut<'_>, saved: B::ViewMut<'_>, src: QkvSource<B::View<'_>>, shape: AttnShape) {
        self.timed(|| attn_key("attention_forward", shape), || self.inner.attention_forward(out, saved, src, shape))
    }
    fn attention_backward(
        &self,
        dsrc: QkvSource<B::ViewMut<'_>>,
        dout: B::View<'_>,
        src: QkvSource<B::View<'_>>,
        out: B::View<'_>,
        saved: B::View<'_>,
        shape: AttnShape,
    ) {
        self.timed(|| attn_key("attention_backward", shape), || self.inner.attention_backward(dsrc, dout, src, out, saved, shape))
    }
    fn attention_backward_set(
        &self,
        dsrc: QkvSource<B::ViewMut<'_>>,
        dout: B::View<'_>,
        src: QkvSource<B::View<'_>>,
        out: B::View<'_>,
        saved: B::View<'_>,
        shape: AttnShape,
    ) {
        self.timed(|| attn_key("attention_backward", shape), || self.inner.attention_backward_set(dsrc, dout, src, out, saved, shape))
    }
    fn attention_backward_set_with_bias(
        &self,
        dsrc: QkvSource<B::ViewMut<'_>>,
        dbias: B::ViewMut<'_>,
        dout: B::View<'_>,
        src: QkvSource<B::View<'_>>,
        out: B::View<'_>,
        saved: B::View<'_>,
        shape: AttnShape,
    ) -> bool {
        self.timed_fused(
            || attn_key("attention_backward+bias", shape),
            || self.inner.attention_backward_set_with_bias(dsrc, dbias, dout, src, out, saved, shape),
        )
    }
    fn matmul_gelu_forward_fused(
        &self,
        out: B::ViewMut<'_>,
        pre: B::ViewMut<'_>,
        inp: B::View<'_>,
        weight: B::View<'_>,
        bias: Option<B::View<'_>>,
        shape: MatmulShape,
    ) -> bool {
        self.timed_fused(|| mm_key("matmul_forward+gelu", shape), || self.inner.matmul_gelu_forward_fused(out, pre, inp, weight, bias, shape))
    }
    fn matmul_dgelu_backward_fused(
        &self,
        dpre: B::ViewMut<'_>,
        dpre_bias: Option<B::ViewMut<'_>>,
        dweight: B::ViewMut<'_>,
        dbias: Option<B::ViewMut<'_>>,
        dout: B::View<'_>,
        act: B::View<'_>,
        pre: B::View<'_>,
        weight: B::View<'_>,
        shape: MatmulShape,
    ) -> bool {
        self.timed_fused(
            || mm_key("matmul_backward+gelu", shape),
            || self.inner.matmul_dgelu_backward_fused(dpre, dpre_bias, dweight, dbias, dout, act, pre, weight, shape),
        )
    }
    fn rope(&self, qkv: B::ViewMut<'_>, table: B::View<'_>, s: crate::backend::RopeShape, inverse: bool) {
        self.timed(|| if inverse { "rope_backward" } else { "rope_forward" }.into(), || self.inner.rope(qkv, table, s, inverse))
    }
    fn gelu_backward_set_with_bias(&self, dinp: B::ViewMut<'_>, dbias: B::ViewMut<'_>, inp: B::View<'_>, dout: B::View<'_>, cols: usize) -> bool {
        self.timed_fused(|| "gelu_backward+bias".into(), || self.inner.gelu_backward_set_with_bias(dinp, dbias, inp, dout, cols))
    }
    fn gelu_forward(&self, out: B::ViewMut<'_>, inp: B::View<'_>) {
        self.timed(|| "gelu_forward".into(), || self.inner.gelu_forward(out, inp))
    }
    fn gelu_backward(&self, dinp: B::ViewMut<'_>, inp: B::View<'_>, dout: B::View<'_>) {
        self.timed(|| "gelu_backward".into(), || self.inner.gelu_backward(dinp, inp, dout))
    }
    fn gelu_backward_set(&self, dinp: B::ViewMut<'_>, inp: B::View<'_>, dout: B::View<'_>) {
        self.timed(|| "gelu_backward".into(), || self.inner.gelu_backward_set(dinp, inp, dout))
    }
    fn residual_forward(&self, out: B::ViewMut<'_>, a: B::View<'_>, b: B::View<'_>) {
        self.timed(|| "residual_forward".into(), || self.inner.residual_forward(out, a, b))
    }
    fn residual_backward(&self, da: B::ViewMut<'_>, db: B::ViewMut<'_>, dout: B::View<'_>) {
        self.timed(|| "residual_backward".into(), || self.inner.residual_backward(da, db, dout))
    }
    fn cross_entropy_forward(&self, losses: B::ViewMut<'_>, lse: B::ViewMut<'_>, logits: B::View<'_>, targets: &B::Ids, vocab: usize) {
        self.timed(|| "cross_entropy_forward".into(), || self.inner.cross_entropy_forward(losses, lse, logits, targets, vocab))
    }
    fn cross_entropy_backward(
        &self,
        dlogits: B::ViewMut<'_>,
        logits: B::View<'_>,
        lse: B::View<'_>,
        targets: &B::Ids,
        dloss: f32,
        vocab: usize,
    ) {
        self.timed(
            || "cross_entropy_backward".into(),
            || self.inner.cross_entropy_backward(dlogits, logits, lse, targets, dloss, vocab),
        )
    }
    fn cross_entropy_backward_in_place(&self, logits: B::ViewMut<'_>, lse: B::View<'_>, targets: &B::Ids, dloss: f32, vocab: usize) {
        self.timed(|| "cross_entropy_backward_in_place".into(), || self.inner.cross_entropy_backward_in_place(logits, lse, targets, dloss, vocab))
    }
    fn cross_entropy_forward_backward_in_place(
        &self,
        losses: B::ViewMut<'_>,
        lse: B::ViewMut<'_>,
        logits: B::ViewMut<'_>,
        targets: &B::Ids,
        dloss: f32,
        vocab: usize,
    ) {
        self.timed(
            || "cross_entropy_forward_backward_in_place".into(),
            || self.inner.cross_entropy_forward_backward_in_place(losses, lse, logits, targets, dloss, vocab),
        )
    }
    fn adamw_update_runs(&self, params: &mut B::Buf, grads: &B::Buf, m: &mut B::Buf, v: &mut B::Buf, runs: &DecayRuns<B::Ids, B::Buf>, hp: AdamWStep) {
        self.timed(|| "adamw_update".into(), || self.inner.adamw_update_runs(params, grads, m, v, runs, hp))
    }
    fn adamw_update(&self, params: B::ViewMut<'_>, grads: B::View<'_>, m: B::ViewMut<'_>, v: B::ViewMut<'_>, hp: AdamWStep) {
        self.timed(|| "adamw_update".into(), || self.inner.adamw_update(params, grads, m, v, hp))
    }
    fn supports(&self, op: OptionalOp) -> bool {
        self.inner.supports(op)
    }
    fn max_additive_width(&self) -> usize {
        self.inner.max_additive_width()
    }
    fn attention_ex_forward(
        &self,
        out: B::ViewMut<'_>,
        saved: B::ViewMut<'_>,
        src: QkvSource<B::View<'_>>,
        scores: Scores<B::View<'_>>,
        key_lens: Option<&B::Ids>,
        shape: AttnShape,
    ) {
        self.timed(|| attn_key("attention_ex_forward", shape), || self.inner.attention_ex_forward(out, saved, src, scores, key_lens, shape))
    }
    fn attention_ex_backward(
        &self,
        dsrc: QkvSource<B::ViewMut<'_>>,
        dscores: Scores<B::ViewMut<'_>>,
        dout: B::View<'_>,
        src: QkvSource<B::View<'_>>,
        scores: Scores<B::View<'_>>,
        key_lens: Option<&B::Ids>,
        out: B::View<'_>,
        saved: B::View<'_>,
        shape: AttnShape,
    ) {
        self.timed(
            || attn_key("attention_ex_backward", shape),
            || self.inner.attention_ex_backward(dsrc, dscores, dout, src, scores, key_lens, out, saved, shape),
        )
    }
    fn attention_ex_backward_set(
        &self,
        dsrc: QkvSource<B::ViewMut<'_>>,
        dscores: Scores<B::ViewMut<'_>>,
        dout: B::View<'_>,
        src: QkvSource<B::View<'_>>,
        scores: Scores<B::View<'_>>,
        key_lens: Option<&B::Ids>,
        out: B::View<'_>,
        saved: B::View<'_>,
        shape: AttnShape,
    ) {
        self.timed(
            || attn_key("attention_ex_backward", shape),
            || self.inner.attention_ex_backward_set(dsrc, dscores, dout, src, scores, key_lens, out, saved, shape),
        )
    }
    fn dropout_forward(&self, out: B::ViewMut<'_>, inp: B::View<'_>, mask: Dropout) {
        self.timed(|| "dropout_forward".into(), || self.inner.dropout_forward(out, inp, mask))
    }
    fn dropout_backward(&self, dinp: B::ViewMut<'_>, dout: B::View<'_>, mask: Dropout) {
        self.timed(|| "dropout_backward".into(), || self.inner.dropout_backward(dinp, dout, mask))
    }
    fn tanh_forward(&self, out: B::ViewMut<'_>, inp: B::View<'_>) {
        self.timed(|| "tanh_forward".into(), || self.inner.tanh_forward(out, inp))
    }
    fn tanh_backward(&self, dinp: B::ViewMut<'_>, out: B::View<'_>, dout: B::View<'_>) {
        self.timed(|| "tanh_backward".into(), || self.inner.tanh_backward(dinp, out, dout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    /// Profiling changes nothing about the results, and records every op called.
    #[test]
    fn profiled_results_equal_the_inner_backend_and_ops_are_counted() {
        let (n, c) = (5, 4);
        let x: Vec<f32> = (0..n * c).map(|i| i as f32 * 0.1 - 0.7).collect();
        let run = |be: &dyn Fn(&[f32]) -> Vec<f32>| be(&x);
        let cpu = CpuBackend::new();
        let plain = run(&|x| {
            let inp = cpu.upload(x);
            let mut out = cpu.zeros(n * c);
            cpu.gelu_forward(cpu.view_mut(&mut out, 0..n * c), cpu.view(&inp, 0..n * c));
            out
        });
        let prof = Profiled::new(CpuBackend::new());
        let profiled = run(&|x| {
            let inp = prof.upload(x);
            let mut out = prof.zeros(n * c);
            prof.gelu_forward(prof.view_mut(&mut out, 0..n * c), prof.view(&inp, 0..n * c));
            prof.gelu_forward(prof.view_mut(&mut out, 0..n * c), prof.view(&inp, 0..n * c));
            out
        });
        assert_eq!(plain, profiled);
        let report = prof.report();
        let gelu = report.iter().find(|(k, _)| k == "gelu_forward").expect("gelu recorded");
        assert_eq!(gelu.1.calls, 2);
        assert!(report.iter().any(|(k, t)| k == "upload" && t.calls == 1));
    }

    /// Marks as device timestamps in microseconds: each op's time is its end minus its start,
    /// each gap the next start minus the previous end, across drains too; a forgotten log
    /// counts no gap before its next op.
    #[test]
    fn mark_log_splits_op_time_from_idle_time() {
        let secs = |a: &u64, b: &u64| Some((*b as f64 - *a as f64) * 1e-6);
        let mut log = MarkLog::new();
        let mut times = HashMap::new();
        log.push("matmul".into(), 0u64, 100);
        log.push("gelu".into(), 100, 130); // no gap
        log.push("matmul".into(), 150, 260); // 20 us idle before
        log.drain(secs, &mut times);
        log.push("adamw".into(), 300, 340); // 40 us idle before, counted across the drain
        log.drain(secs, &mut times);
        log.forget();
        log.push("gelu".into(), 1000, 1010); // after a forget: no gap counted
        log.drain(secs, &mut times);
        let us = |k: &str| (times[k].secs * 1e6).round() as u64;
        assert_eq!((us("matmul"), times["matmul"].calls), (210, 2));
        assert_eq!((us("gelu"), times["gelu"].calls), (40, 2));
        assert_eq!(us("adamw"), 40);
        assert_eq!((us(IDLE), times[IDLE].calls), (60, 3));
        assert_eq!(log.len(), 0);
    }

    /// Unreadable marks leave their op or gap out instead of counting a wrong time.
    #[test]
    fn mark_log_leaves_out_what_it_cannot_read() {
        let secs = |a: &u64, b: &u64| if *a == 7 || *b == 7 { None } else { Some((*b - *a) as f64) };
        let mut log = MarkLog::new();
        let mut times = HashMap::new();
        log.push("a".into(), 0u64, 2);
        log.push("b".into(), 7, 9); // start unreadable: no gap, no time
        log.push("c".into(), 10, 15);
        log.drain(secs, &mut times);
        assert!(!times.contains_key("b"));
        assert_eq!(times["a"].secs, 2.0);
        assert_eq!(times["c"].secs, 5.0);
        assert_eq!(times[IDLE].secs, 1.0); // 9 -> 10 only
    }

    /// On a backend without timeline marks (the CPU), a timeline profile times ops as the
    /// synchronised one does, and reports no idle row.
    #[test]
    fn a_timeline_profile_without_marks_times_each_op() {
        let prof = Profiled::timeline(CpuBackend::new());
        let inp = prof.upload(&[0.5; 16]);
        let mut out = prof.zeros(16);
        prof.gelu_forward(prof.view_mut(&mut out, 0..16), prof.view(&inp, 0..16));
        let report = prof.report();
        assert!(report.iter().any(|(k, t)| k == "gelu_forward" && t.calls == 1));
        assert!(report.iter().all(|(k, _)| k != IDLE));
    }
}
