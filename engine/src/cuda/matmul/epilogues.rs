//! The training epilogues of the bf16 matmuls (lt.rs's `LtEpilogue`): the MLP's up-projection
//! with its GELU (`forward_gelu`), the down-projection's backward with the GELU backward and the
//! up-projection's bias gradient (`backward_dgelu`), and bias gradients from the weight-gradient
//! GEMM (`weight_grads_bgrad`). Each says whether it ran: where the backend has the epilogue off
//! or cuBLASLt refuses it, nothing is written and matmul.rs's unfused ops run instead.

use cudarc::driver::PushKernelArg;

use super::super::lt::{self, LtArgs, LtEpilogue, LtShape};
use super::super::memory::elementwise_cfg;
use super::super::view::{CudaView, CudaViewMut};
use super::super::{CudaBackend, MatmulPrecision};
use super::{check_shapes, operands, padded_ld, weight_dense, weight_grads, Dense, Operand, N, T};
use crate::backend::{MatmulShape, WeightLayout};

/// `weight_grads` through one cuBLASLt GEMM whose epilogue also sums dout over the rows: dW +=
/// (beta = 1, dW itself as C) and the f32 sums into the f32 scratch, then added onto dbias.
/// dout is the GEMM's A with op(A) = N for a W (IC, OC) (BGRADA: A summed over k = N), its B
/// with op(B) = T for a W (OC, IC) (BGRADB). false, with nothing written, where the backend's
/// bgrad epilogue is off, the operands are not bf16 or cuBLASLt has no such kernel.
pub(super) fn weight_grads_bgrad(
    be: &CudaBackend,
    dweight: &CudaViewMut<'_>,
    dbias: &CudaViewMut<'_>,
    (dy, lddy): (Operand, usize),
    (x, ldx): (Operand, usize),
    s: MatmulShape,
) -> bool {
    let Some(lt) = be.lt() else { return false };
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    if !be.bgrad_epilogue() || !dy.bf16 || !x.bf16 || n == 0 || oc == 0 || ic == 0 {
        return false;
    }
    let Some(sums) = be.f32_scratch(oc) else { return false };
    let (shape, a, b) = match s.layout {
        // dW^T (OC, IC) += dout^T (OC, N) @ inp (N, IC): A = dout^T, summed over N per row
        WeightLayout::InOut => (
            LtShape { transa: false, transb: true, m: oc, n: ic, k: n, lda: lddy, ldb: ldx, ldd: oc, d_bf16: false, epilogue: LtEpilogue::BgradA },
            dy.ptr,
            x.ptr,
        ),
        // dW^T (IC, OC) += inp^T (IC, N) @ dout (N, OC): op(B) = dout, summed over N per column
        WeightLayout::OutIn => (
            LtShape { transa: false, transb: true, m: ic, n: oc, k: n, lda: ldx, ldb: lddy, ldd: ic, d_bf16: false, epilogue: LtEpilogue::BgradB },
            x.ptr,
            dy.ptr,
        ),
    };
    be.check(be.stream().context().bind_to_thread(), "bind context");
    let args = LtArgs { a, b, d: dweight.ptr(), c: Some(dweight.ptr()), bias: sums, aux: 0 };
    // SAFETY: dy and x are bf16 GEMM operands of (N, OC) and (N, IC) with their ld (operands),
    // dweight holds IC*OC floats (asserted by the caller) and is D and C alike (in place, same
    // layout), the scratch holds OC floats for the sums.
    if let Err(e) = unsafe { lt.matmul(be.stream(), shape, args) } {
        warn_epilogue_once(be, &BGRAD_WARNED, "bgrad", &e);
        return false;
    }
    lt::EpilogueCounts::bump(&be.epilogue_counts().bgrad);
    let f = be.func("add_unpadded");
    let (one, c64) = (1u64, oc as u64);
    let mut l = be.stream().launch_builder(&f);
    l.arg(dbias.ptr_ref()).arg(&sums).arg(&one).arg(&c64).arg(&c64);
    // SAFETY: add_unpadded(float*, const float*, u64, u64, u64) adds one row of OC floats from
    // the scratch onto dbias (OC floats, asserted by the caller).
    be.check(unsafe { l.launch(elementwise_cfg(be, oc)) }.map(|_| ()), "add_unpadded");
    true
}

static BGRAD_WARNED: std::sync::Once = std::sync::Once::new();
static GELU_WARNED: std::sync::Once = std::sync::Once::new();
static DGELU_WARNED: std::sync::Once = std::sync::Once::new();

/// Says once per process and epilogue that cuBLASLt refused it (the unfused ops run instead),
/// and keeps the refusal on the backend (`CudaBackend::epilogue_refusals`: what a test that
/// expected the epilogue prints, where no log is read).
fn warn_epilogue_once(be: &CudaBackend, once: &std::sync::Once, which: &'static str, e: &str) {
    be.epilogue_counts().refused(which, e);
    once.call_once(|| tracing::warn!(epilogue = which, error = %e, "cublaslt epilogue unavailable; running the unfused ops"));
}

/// Device addresses 16-byte aligned (what cuBLASLt's vectorised epilogues take for granted).
fn aligned16(addrs: &[u64]) -> bool {
    addrs.iter().all(|a| a.is_multiple_of(16))
}

/// `pre (N, OC) = inp @ W + bias`, `out = gelu_tanh(pre)` in one cuBLASLt GEMM (GELU_AUX_BIAS:
/// aux = pre, D = out) when the backend's GELU epilogue is on and the call fits it: bf16
/// matmuls, bf16 `out` and `pre`, a bias, OC a multiple of 8. The bias goes in bf16 (D's type),
/// as for the bias epilogue. false, with nothing written, otherwise.
pub(crate) fn forward_gelu(
    be: &CudaBackend,
    out: CudaViewMut<'_>,
    pre: CudaViewMut<'_>,
    inp: CudaView<'_>,
    weight: CudaView<'_>,
    bias: Option<CudaView<'_>>,
    s: MatmulShape,
) -> bool {
    let (Some(bias), Some(lt)) = (bias, be.lt()) else { return false };
    if !be.gelu_epilogue() || be.options().matmul != MatmulPrecision::Bf16 || !out.is_bf16() || !pre.is_bf16() {
        return false;
    }
    check_shapes(&s, inp.len, weight.len, out.len);
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    assert_eq!(pre.len, out.len, "matmul gelu: pre {} vs out {}", pre.len, out.len);
    assert_eq!(bias.len, oc, "matmul bias: {} floats, expected OC={oc}", bias.len);
    if n * oc == 0 || padded_ld(oc) != oc || !aligned16(&[out.addr(), pre.addr()]) {
        return false;
    }
    let (ta, w_cols) = match s.layout {
        WeightLayout::InOut => (N, oc),
        WeightLayout::OutIn => (T, ic),
    };
    let Some([(w, lda), (x, ldb), (b, _)]) = operands(be, [weight_dense(be, weight, w_cols), Dense::new(inp, ic), Dense::new(bias, oc)]) else {
        return false;
    };
    if !(w.bf16 && x.bf16 && b.bf16) {
        return false;
    }
    let shape = LtShape { transa: ta == T, transb: false, m: oc, n, k: ic, lda, ldb, ldd: oc, d_bf16: true, epilogue: LtEpilogue::GeluAuxBias };
    be.check(be.stream().context().bind_to_thread(), "bind context");
    let args = LtArgs { a: w.ptr, b: x.ptr, d: out.addr(), c: None, bias: b.ptr, aux: pre.addr() };
    // SAFETY: w and x are bf16 GEMM operands (lda x .., ldb x N), out and pre hold N*OC bf16
    // values each (asserted), the bias OC bf16 values (its copy made by `operands`).
    match unsafe { lt.matmul(be.stream(), shape, args) } {
        Ok(()) => {
            lt::EpilogueCounts::bump(&be.epilogue_counts().gelu_forward);
            true
        }
        Err(e) => {
            warn_epilogue_once(be, &GELU_WARNED, "gelu_aux_bias", &e);
            false
        }
    }
}

/// The backward pass of `y = act @ W + bias` with `act = gelu_tanh(pre)`, in one cuBLASLt GEMM
/// for the input side (DGELU_BGRAD): `dpre = gelu'(pre) * (dout @ W^T)` (overwritten, bf16) and
/// `dpre_bias += sum_n dpre` (the up-projection's bias gradient, written by the epilogue in
/// bf16 into a scratch, then added), then dW and dbias as `backward`. Conditions as
/// `forward_gelu`, plus IC (GELU's width) a multiple of 8 and a `dpre_bias`. false, with
/// nothing written, otherwise.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_dgelu(
    be: &CudaBackend,
    dpre: CudaViewMut<'_>,
    dpre_bias: Option<CudaViewMut<'_>>,
    dweight: CudaViewMut<'_>,
    dbias: Option<CudaViewMut<'_>>,
    dout: CudaView<'_>,
    act: CudaView<'_>,
    pre: CudaView<'_>,
    weight: CudaView<'_>,
    s: MatmulShape,
) -> bool {
    let (Some(dpre_bias), Some(lt)) = (dpre_bias, be.lt()) else { return false };
    if !be.gelu_epilogue() || be.options().matmul != MatmulPrecision::Bf16 || !dpre.is_bf16() || !pre.is_bf16() {
        return false;
    }
    check_shapes(&s, act.len, weight.len, dout.len);
    assert_eq!(dweight.len, weight.len, "matmul dweight: {} floats, weight {}", dweight.len, weight.len);
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    assert!(dpre.len == n * ic && pre.len == n * ic, "matmul dgelu: dpre {} / pre {}, expected (N={n}, IC={ic})", dpre.len, pre.len);
    assert_eq!(dpre_bias.len, ic, "matmul dgelu: dpre_bias {} floats, expected IC={ic}", dpre_bias.len);
    if n == 0 || padded_ld(oc) != oc || padded_ld(ic) != ic || !aligned16(&[dpre.addr(), pre.addr()]) {
        return false;
    }
    let (ta, w_cols) = match s.layout {
        WeightLayout::InOut => (true, oc),
        WeightLayout::OutIn => (false, ic),
    };
    let dense = [Dense::new(dout, oc), Dense::new(act, ic), weight_dense(be, weight, w_cols)];
    let Some([(dy, lddy), (x, ldx), (w, ldw)]) = operands(be, dense) else { return false };
    if !(dy.bf16 && x.bf16 && w.bf16) {
        return false;
    }
    // IC bf16 sums: the f32 scratch as raw memory (nothing else uses it until the add below)
    let Some(sums) = be.f32_scratch(ic.div_ceil(2)) else { return false };
    // dpre^T (IC, N) = W'' (IC, OC) @ dout^T (OC, N), then * gelu'(pre^T), summed over N
    let shape = LtShape { transa: ta, transb: false, m: ic, n, k: oc, lda: ldw, ldb: lddy, ldd: ic, d_bf16: true, epilogue: LtEpilogue::DGeluBgrad };
    be.check(be.stream().context().bind_to_thread(), "bind context");
    let args = LtArgs { a: w.ptr, b: dy.ptr, d: dpre.addr(), c: None, bias: sums, aux: pre.addr() };
    // SAFETY: w and dy are bf16 GEMM operands with their ld (operands), dpre and pre hold N*IC
    // bf16 values (asserted), the scratch IC bf16 values.
    if let Err(e) = unsafe { lt.matmul(be.stream(), shape, args) } {
        warn_epilogue_once(be, &DGELU_WARNED, "dgelu_bgrad", &e);
        return false;
    }
    lt::EpilogueCounts::bump(&be.epilogue_counts().dgelu_backward);
    let f = be.func("add_bf16_onto_f32");
    let n_ic = ic as u64;
    let mut l = be.stream().launch_builder(&f);
    l.arg(dpre_bias.ptr_ref()).arg(&sums).arg(&n_ic);
    // SAFETY: add_bf16_onto_f32(float*, const unsigned short*, u64) adds IC bf16 sums onto
    // dpre_bias (IC floats, asserted).
    be.check(unsafe { l.launch(elementwise_cfg(be, ic)) }.map(|_| ()), "add_bf16_onto_f32");
    weight_grads(be, dweight, dbias, (dy, lddy), (x, ldx), dout, s, oc);
    true
}
