//! Matmuls through cuBLAS (`cublasGemmEx`, f32 storage, math mode from `MatmulPrecision`), bias
//! broadcast before the GEMM (beta = 1 then adds the product, the CPU's order) and the bias
//! gradient as deterministic column sums.
//!
//! With `MatmulPrecision::Bf16` each operand is first converted to bf16 into the backend's
//! scratch (one memory pass, `kernels/convert.cu`) and the GEMM runs bf16 x bf16 -> f32 with f32
//! accumulation: several times faster on an H100 than letting cuBLAS convert f32 operands
//! itself (`CUBLAS_COMPUTE_32F_FAST_16BF`), with the same rounding of the operands.
//!
//! A forward matmul with a bias and bf16 operands runs as one cuBLASLt GEMM with a bias
//! epilogue instead (lt.rs): no broadcast pass, no read of C.
//!
//! The weight operand is read from a bf16 shadow of its whole buffer when the backend keeps one
//! (shadow.rs: made once per write generation, kept up to date by AdamW), with no conversion.
//!
//! bf16 activation views (view.rs) are GEMM operands as they are, without a conversion pass,
//! and a bf16 `out` / overwritten `dinp` is the GEMM's own bf16 output (rounded once from the
//! f32 accumulator, as autocast's).
//!
//! cuBLAS is column-major; a row-major `X (r, c)` is the column-major `X^T` with ld = c, so
//! `out = inp @ W` is computed as `out^T (OC, N) = W' (OC, IC) @ inp^T (IC, N)`.

use std::ffi::c_void;

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
};
use cudarc::driver::PushKernelArg;

use super::colsum;
use super::lt::{LtArgs, LtEpilogue, LtShape};
use super::memory::elementwise_cfg;
use super::shadow;
use super::view::{CudaView, CudaViewMut};
use super::{CudaBackend, MatmulPrecision};
use crate::backend::{MatmulShape, WeightLayout};

mod epilogues;
pub(crate) use epilogues::{backward_dgelu, forward_gelu};

const N: cublasOperation_t = cublasOperation_t::CUBLAS_OP_N;
const T: cublasOperation_t = cublasOperation_t::CUBLAS_OP_T;

/// A GEMM input in device memory: f32, or a bf16 copy in the scratch.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    bf16: bool,
}

impl Operand {
    fn f32(ptr: u64) -> Self {
        Operand { ptr, bf16: false }
    }
    fn dtype(self) -> cudaDataType {
        if self.bf16 {
            cudaDataType::CUDA_R_16BF
        } else {
            cudaDataType::CUDA_R_32F
        }
    }
}

/// One column-major GEMM `C (m, n) = alpha op(A) (m, k) @ op(B) (k, n) + beta C`, C in f32
/// (or bf16 with beta = 0).
struct Gemm {
    ta: cublasOperation_t,
    tb: cublasOperation_t,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    lda: usize,
    b: Operand,
    ldb: usize,
    c: u64,
    ldc: usize,
    beta: f32,
    c_bf16: bool,
}

fn compute_type(p: MatmulPrecision) -> cublasComputeType_t {
    match p {
        MatmulPrecision::Bf16 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
        MatmulPrecision::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        MatmulPrecision::F32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC,
    }
}

fn gemm(be: &CudaBackend, g: Gemm, what: &str) {
    if g.m == 0 || g.n == 0 {
        return;
    }
    let dims = [g.m, g.n, g.k, g.lda, g.ldb, g.ldc];
    if dims.iter().any(|&d| d > i32::MAX as usize) {
        be.fail(what, format!("gemm dimensions {dims:?} exceed cuBLAS's 32-bit limit"));
        return;
    }
    assert!(!g.c_bf16 || g.beta == 0.0, "{what}: a bf16 output cannot be accumulated into");
    if gemm_lt_autotuned(be, &g, what) {
        return;
    }
    let alpha = 1.0f32;
    // bf16 operands (converted by us) take plain f32 accumulation; f32 operands take the
    // precision's math mode.
    let compute = if g.a.bf16 && g.b.bf16 {
        cublasComputeType_t::CUBLAS_COMPUTE_32F
    } else {
        compute_type(be.options().matmul)
    };
    be.check(be.stream().context().bind_to_thread(), "bind context");
    // SAFETY: the callers check that every operand view holds the (ld x cols) extent the GEMM
    // reads or writes; alpha and beta are host scalars (the handle's default pointer mode).
    let r = unsafe {
        cudarc::cublas::result::gemm_ex(
            *be.blas().handle(),
            g.ta,
            g.tb,
            g.m as i32,
            g.n as i32,
            g.k as i32,
            &alpha as *const f32 as *const c_void,
            g.a.ptr as *const c_void,
            g.a.dtype(),
            g.lda as i32,
            g.b.ptr as *const c_void,
            g.b.dtype(),
            g.ldb as i32,
            &g.beta as *const f32 as *const c_void,
            g.c as *mut c_void,
            if g.c_bf16 { cudaDataType::CUDA_R_16BF } else { cudaDataType::CUDA_R_32F },
            g.ldc as i32,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    if let Err(e) = r {
        be.fail(what, format!("cublasGemmEx: {e:?}"));
    }
}

/// `g` through cuBLASLt when autotuning is on (lt_autotune.rs), so that the plain GEMMs are
/// tuned too: bf16 operands and beta 0 or 1 only. false, with nothing launched, otherwise (or
/// where cuBLASLt refused the shape: cublasGemmEx runs it then).
fn gemm_lt_autotuned(be: &CudaBackend, g: &Gemm, what: &str) -> bool {
    let Some(lt) = be.lt() else { return false };
    if !(lt.autotune() && g.a.bf16 && g.b.bf16) || !(g.beta == 0.0 || g.beta == 1.0) {
        return false;
    }
    let shape = LtShape {
        transa: g.ta == T,
        transb: g.tb == T,
        m: g.m,
        n: g.n,
        k: g.k,
        lda: g.lda,
        ldb: g.ldb,
        ldd: g.ldc,
        d_bf16: g.c_bf16,
        epilogue: LtEpilogue::Plain,
    };
    let args = LtArgs { a: g.a.ptr, b: g.b.ptr, d: g.c, c: (g.beta == 1.0).then_some(g.c), bias: 0, aux: 0 };
    be.check(be.stream().context().bind_to_thread(), "bind context");
    // SAFETY: as `gemm`'s: the callers checked the operands' extents; C is D (beta = 1).
    match unsafe { lt.matmul(be.stream(), shape, args) } {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(what, error = %e, "cublaslt declined a plain gemm; cublasgemmex runs it");
            false
        }
    }
}

/// Leading dimension a tensor-core GEMM wants: a multiple of 8 elements (16 bytes of bf16).
fn padded_ld(cols: usize) -> usize {
    cols.div_ceil(8) * 8
}

/// One matmul operand as the caller holds it: a dense row-major `(len / cols, cols)` view, f32
/// or bf16; as a GEMM input it gets at least `rows_alloc` rows (the extra ones zero).
#[derive(Clone, Copy)]
struct Dense<'a> {
    view: CudaView<'a>,
    cols: usize,
    rows_alloc: usize,
    /// Copy a bf16 view into the scratch even when it is usable as it is (see `weight_dense`).
    force_copy: bool,
}

impl<'a> Dense<'a> {
    fn new(view: CudaView<'a>, cols: usize) -> Self {
        Dense { view, cols, rows_alloc: Self::rows_of(&view, cols), force_copy: false }
    }
    /// With zero rows appended up to `rows` (a GEMM over a rounded-up dimension).
    fn with_rows(self, rows: usize) -> Self {
        Dense { rows_alloc: rows.max(self.rows()), ..self }
    }
    fn rows_of(view: &CudaView<'_>, cols: usize) -> usize {
        view.len.checked_div(cols).unwrap_or(0)
    }
    fn rows(&self) -> usize {
        Self::rows_of(&self.view, self.cols)
    }
    /// Usable by a GEMM as it is: bf16 already, rows a multiple of 8 wide, nothing to append.
    fn ready_bf16(&self) -> bool {
        self.view.is_bf16() && !self.force_copy && padded_ld(self.cols) == self.cols && self.rows_alloc == self.rows()
    }
}

/// A weight operand `(len / cols, cols)`: with bf16 matmuls, the bf16 shadow of its buffer when
/// the backend has or makes one (shadow.rs), else the view itself (converted by `operands`).
/// A shadow view goes to the GEMM as it is where a bf16 activation would, except when it is not
/// 16-byte aligned (a parameter at an odd offset): the scratch regions the per-call conversion
/// writes are, and cuBLAS picks its kernel by alignment too, so such a view is copied into the
/// scratch, which keeps the results bitwise those of the conversion.
fn weight_dense<'a>(be: &CudaBackend, weight: CudaView<'a>, cols: usize) -> Dense<'a> {
    let view = shadow::weight_view(be, weight);
    let from_shadow = view.is_bf16() && !weight.is_bf16();
    Dense { force_copy: from_shadow && !view.addr().is_multiple_of(16), ..Dense::new(view, cols) }
}

/// The operands of one matmul call as GEMM inputs. With `MatmulPrecision::Bf16`: a bf16 view
/// as it is when its rows are a multiple of 8 wide (`ld` = its columns); otherwise a bf16 copy,
/// side by side in the scratch, each with its row stride padded to `padded_ld` (regions 16-byte
/// aligned; padding columns and appended rows zero); `ld` is that stride. Without bf16: the
/// f32 views themselves, `ld` = their columns. `None` when the scratch could not be allocated
/// (the failure is recorded).
fn operands<const K: usize>(be: &CudaBackend, dense: [Dense<'_>; K]) -> Option<[(Operand, usize); K]> {
    if be.options().matmul != MatmulPrecision::Bf16 {
        return Some(dense.map(|d| (Operand::f32(d.view.ptr()), d.cols)));
    }
    let size = |d: &Dense<'_>| if d.cols == 0 || d.ready_bf16() { 0 } else { d.rows_alloc * padded_ld(d.cols) };
    let total: usize = dense.iter().map(size).sum();
    let base = be.bf16_scratch(total)?;
    let mut offset = 0usize;
    Some(dense.map(|d| {
        if d.ready_bf16() {
            return (Operand { ptr: d.view.addr(), bf16: true }, d.cols);
        }
        let ptr = base + 2 * offset as u64;
        offset += size(&d);
        let ld = padded_ld(d.cols);
        let rows = d.rows();
        if d.view.len > 0 {
            let n = d.view.len as u64;
            if ld == d.cols && !d.view.is_bf16() {
                let f = be.func("f32_to_bf16");
                let mut b = be.stream().launch_builder(&f);
                b.arg(&ptr).arg(d.view.ptr_ref()).arg(&n);
                // SAFETY: f32_to_bf16(u16*, const float*, u64) reads the view's n floats and
                // writes n bf16 values inside the scratch region sized above.
                be.check(unsafe { b.launch(elementwise_cfg(be, d.view.len.div_ceil(4))) }.map(|_| ()), "f32_to_bf16");
            } else {
                let name = if d.view.is_bf16() { "bf16_rows_repack" } else { "f32_to_bf16_rows" };
                let f = be.func(name);
                let (rows64, cols, ld64) = (rows as u64, d.cols as u64, ld as u64);
                let mut b = be.stream().launch_builder(&f);
                b.arg(&ptr).arg(d.view.addr_ref()).arg(&rows64).arg(&cols).arg(&ld64);
                // SAFETY: f32_to_bf16_rows / bf16_rows_repack(u16*, const float* or const u16*
                // (the view's type), u64, u64, u64) read rows*cols elements and write rows rows
                // of stride ld inside the region sized above.
                be.check(unsafe { b.launch(elementwise_cfg(be, rows * ld)) }.map(|_| ()), name);
            }
        }
        if d.rows_alloc > rows {
            let (at, count) = (ptr + 2 * (rows * ld) as u64, (d.rows_alloc - rows) * ld);
            be.check(be.stream().context().bind_to_thread(), "bind context");
            // SAFETY: the appended rows lie inside the region sized above (rows_alloc * ld).
            let r = unsafe { cudarc::driver::sys::cuMemsetD16Async(at, 0, count, be.stream().cu_stream()) }.result();
            be.check(r, "zero padding rows");
        }
        (Operand { ptr, bf16: true }, ld)
    }))
}

fn check_shapes(s: &MatmulShape, inp: usize, weight: usize, out: usize) {
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    assert_eq!(inp, n * ic, "matmul inp: {inp} floats, expected (N={n}, IC={ic})");
    assert_eq!(weight, ic * oc, "matmul weight: {weight} floats, expected IC={ic} x OC={oc}");
    assert_eq!(out, n * oc, "matmul out: {out} floats, expected (N={n}, OC={oc})");
}

/// out (N, OC) = inp (N, IC) @ W + bias (OC)
pub(crate) fn forward(
    be: &CudaBackend,
    out: CudaViewMut<'_>,
    inp: CudaView<'_>,
    weight: CudaView<'_>,
    bias: Option<CudaView<'_>>,
    s: MatmulShape,
) {
    forward_into(be, &out, inp, weight, bias, s, None);
}

/// out (N, OC) = residual (N, OC) + (inp @ W + bias): in the epilogue of the cuBLASLt GEMM
/// when that path runs (C = residual, beta = 1), else one add after the matmul.
pub(crate) fn forward_residual(
    be: &CudaBackend,
    out: CudaViewMut<'_>,
    residual: CudaView<'_>,
    inp: CudaView<'_>,
    weight: CudaView<'_>,
    bias: Option<CudaView<'_>>,
    s: MatmulShape,
) {
    assert_eq!(out.len, residual.len, "matmul residual: out {} vs residual {}", out.len, residual.len);
    assert!(!out.is_bf16() && !residual.is_bf16(), "matmul residual: the residual stream is f32");
    if !forward_into(be, &out, inp, weight, bias, s, Some(residual)) {
        super::elementwise::add_onto(be, &out, residual);
    }
}

/// The forward matmul into `out`; with `residual` (f32, like out) it may add it in the GEMM's
/// epilogue, and says whether it did.
fn forward_into(
    be: &CudaBackend,
    out: &CudaViewMut<'_>,
    inp: CudaView<'_>,
    weight: CudaView<'_>,
    bias: Option<CudaView<'_>>,
    s: MatmulShape,
    residual: Option<CudaView<'_>>,
) -> bool {
    check_shapes(&s, inp.len, weight.len, out.len);
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    if let Some(bias) = bias {
        assert_eq!(bias.len, oc, "matmul bias: {} floats, expected OC={oc}", bias.len);
    }
    // W (IC, OC) row-major is column-major (OC, IC); W (OC, IC) is column-major (IC, OC),
    // transposed for the GEMM.
    let (ta, w_cols) = match s.layout {
        WeightLayout::InOut => (N, oc),
        WeightLayout::OutIn => (T, ic),
    };
    // A bf16 GEMM whose output rows are not a multiple of 8 wide (the LM head over 50,257 or
    // 30,522 ids) runs over OC rounded up (the weight gets zero rows) into a padded f32
    // scratch, then one pass moves it into `out` adding the bias.
    let padded_out = be.options().matmul == MatmulPrecision::Bf16 && padded_ld(oc) != oc && n > 0;
    let m = if padded_out { padded_ld(oc) } else { oc };
    let w_dense = match s.layout {
        WeightLayout::InOut => weight_dense(be, weight, w_cols),
        WeightLayout::OutIn => weight_dense(be, weight, w_cols).with_rows(m),
    };
    let out_bf16 = out.is_bf16();
    // A bf16 output through cuBLASLt's bias epilogue takes the bias in bf16 too (lt.rs): it
    // is converted with the operands (rounded once, as autocast's linear does).
    let bias_bf16 = match bias {
        Some(b) if out_bf16 && !padded_out && be.lt().is_some() => Some(b),
        _ => None,
    };
    let ((w, lda), (x, ldb), lt_bias) = match bias_bf16 {
        Some(b) => {
            let Some([w, x, (bb, _)]) = operands(be, [w_dense, Dense::new(inp, ic), Dense::new(b, oc)]) else { return false };
            (w, x, Some(bb.ptr))
        }
        None => {
            let Some([w, x]) = operands(be, [w_dense, Dense::new(inp, ic)]) else { return false };
            (w, x, bias.map(|b| b.ptr()))
        }
    };
    // bf16 operands and a bias: one cuBLASLt GEMM adds it in its epilogue (lt.rs).
    if let (Some(bias), Some(lt), false) = (bias, be.lt(), padded_out) {
        if w.bf16 && x.bf16 && n * oc > 0 {
            let shape = LtShape { transa: ta == T, transb: false, m: oc, n, k: ic, lda, ldb, ldd: oc, d_bf16: out_bf16, epilogue: LtEpilogue::Bias };
            be.check(be.stream().context().bind_to_thread(), "bind context");
            // SAFETY: w and x are bf16 (lda x .., ldb x N), out holds N*OC elements of the type
            // the shape names and the bias OC of the same type (asserted above; the bf16 copy
            // made by `operands` when out is bf16).
            let bias_ptr = lt_bias.unwrap_or_else(|| bias.ptr());
            // SAFETY (residual): f32 like out, of out's length (asserted by forward_residual).
            let c = residual.map(|r| r.ptr());
            let args = LtArgs { a: w.ptr, b: x.ptr, d: out.addr(), c, bias: bias_ptr, aux: 0 };
            match unsafe { lt.matmul(be.stream(), shape, args) } {
                Ok(()) => return residual.is_some(),
                // A cuBLASLt without a bf16-output bias epilogue: the scratch path below.
                Err(e) if out_bf16 => warn_bf16_epilogue_once(&e),
                Err(e) => {
                    be.fail("matmul_forward", e);
                    return false;
                }
            }
        }
    }
    // Through an f32 scratch: a padded output, or a bf16 output with a bias.
    if padded_out || (out_bf16 && bias.is_some() && n * oc > 0) {
        let ldc = padded_ld(oc);
        let Some(c) = be.f32_scratch(n * ldc) else { return false };
        gemm(be, Gemm { ta, tb: N, m, n, k: ic, a: w, lda, b: x, ldb, c, ldc, beta: 0.0, c_bf16: false }, "matmul_forward");
        let name = if out_bf16 { "unpad_rows_add_bias_bf16" } else { "unpad_rows_add_bias" };
        let f = be.func(name);
        let bias_ptr = bias.map_or(0u64, |b| b.ptr());
        let (rows, cols, ld64) = (n as u64, oc as u64, ldc as u64);
        let mut b = be.stream().launch_builder(&f);
        b.arg(out.addr_ref()).arg(&c).arg(&bias_ptr).arg(&rows).arg(&cols).arg(&ld64);
        // SAFETY: unpad_rows_add_bias[_bf16](float* or unsigned short* (out's type), const
        // float*, const float* or null, u64, u64, u64) reads rows rows of stride ld from the
        // scratch and writes N*OC elements of `out`.
        be.check(unsafe { b.launch(elementwise_cfg(be, n * oc)) }.map(|_| ()), name);
        return false;
    }
    if let Some(bias) = bias {
        if n * oc > 0 {
            let f = be.func("bias_broadcast");
            let (rows, cols) = (n as u64, oc as u64);
            let mut b = be.stream().launch_builder(&f);
            b.arg(out.ptr_ref()).arg(bias.ptr_ref()).arg(&rows).arg(&cols);
            // SAFETY: bias_broadcast(float*, const float*, u64, u64) writes N*OC floats.
            be.check(unsafe { b.launch(elementwise_cfg(be, n * oc)) }.map(|_| ()), "bias_broadcast");
        }
    }
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    let gemm_out = Gemm { ta, tb: N, m: oc, n, k: ic, a: w, lda, b: x, ldb, c: out.addr(), ldc: oc, beta, c_bf16: out_bf16 };
    gemm(be, gemm_out, "matmul_forward");
    false
}

/// Says once per process that bf16 outputs with a bias take the scratch path.
fn warn_bf16_epilogue_once(e: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(error = %e, "cublaslt bias epilogue with a bf16 output unavailable; using an f32 scratch and one pass")
    });
}

/// dinp += dout @ W^T; dW += inp^T @ dout (in W's layout); dbias += column sums of dout.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    be: &CudaBackend,
    dinp: Option<CudaViewMut<'_>>,
    dweight: CudaViewMut<'_>,
    dbias: Option<CudaViewMut<'_>>,
    dout: CudaView<'_>,
    inp: CudaView<'_>,
    weight: CudaView<'_>,
    s: MatmulShape,
) {
    backward_with(be, dinp, 1.0, dweight, dbias, dout, inp, weight, s)
}

/// [`backward`] with dinp = dinp_beta * dinp + dout @ W^T (0: overwritten, 1: accumulated).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_with(
    be: &CudaBackend,
    dinp: Option<CudaViewMut<'_>>,
    dinp_beta: f32,
    dweight: CudaViewMut<'_>,
    dbias: Option<CudaViewMut<'_>>,
    dout: CudaView<'_>,
    inp: CudaView<'_>,
    weight: CudaView<'_>,
    s: MatmulShape,
) {
    check_shapes(&s, inp.len, weight.len, dout.len);
    assert_eq!(dweight.len, weight.len, "matmul dweight: {} floats, weight {}", dweight.len, weight.len);
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    let w_cols = match s.layout {
        WeightLayout::InOut => oc,
        WeightLayout::OutIn => ic,
    };
    // With bf16 operands and OC not a multiple of 8 (an LM head over 50,257 or 30,522 ids),
    // every GEMM runs over OC rounded up to `op`: dout gets zero columns, W zero rows or
    // columns, so dinp's k = op adds zeros, and dW's rounded-up GEMM goes into an f32
    // scratch whose first OC rows or columns are added into dW.
    let odd = be.options().matmul == MatmulPrecision::Bf16 && padded_ld(oc) != oc && n > 0;
    let op = if odd { padded_ld(oc) } else { oc };
    let dy = Dense::new(dout, oc);
    let x = Dense::new(inp, ic);
    // The weight is only read for dinp; skip converting it (or reading its shadow) when there
    // is none.
    let ((dy, lddy), (x, ldx), (w, ldw)) = if dinp.is_some() {
        let w_dense = match s.layout {
            WeightLayout::InOut => weight_dense(be, weight, w_cols),
            WeightLayout::OutIn => weight_dense(be, weight, w_cols).with_rows(op),
        };
        let Some([dy, x, w]) = operands(be, [dy, x, w_dense]) else { return };
        (dy, x, w)
    } else {
        let Some([dy, x]) = operands(be, [dy, x]) else { return };
        (dy, x, (Operand::f32(weight.ptr()), w_cols))
    };
    if let Some(dinp) = dinp {
        assert_eq!(dinp.len, n * ic, "matmul dinp: {} floats, expected (N={n}, IC={ic})", dinp.len);
        assert!(!dinp.is_bf16() || dinp_beta == 0.0, "matmul backward: a bf16 dinp can only be overwritten");
        // dinp^T (IC, N) += W'' (IC, OC) @ dout^T (OC, N); W (IC, OC) row-major is column-major
        // (OC, IC): transpose it; W (OC, IC) row-major is column-major (IC, OC) already.
        let ta = match s.layout {
            WeightLayout::InOut => T,
            WeightLayout::OutIn => N,
        };
        let g = Gemm { ta, tb: N, m: ic, n, k: op, a: w, lda: ldw, b: dy, ldb: lddy, c: dinp.addr(), ldc: ic, beta: dinp_beta, c_bf16: dinp.is_bf16() };
        gemm(be, g, "matmul_backward dinp");
    }
    weight_grads(be, dweight, dbias, (dy, lddy), (x, ldx), dout, s, op);
}

/// dW += inp^T @ dout (in W's layout) and dbias += column sums of dout, from the GEMM operands
/// `dy` (dout, ld lddy) and `x` (inp, ld ldx) as `operands` made them; `op` is OC, rounded up
/// to 8 where the bf16 GEMMs run over a padded OC. With the backend's bgrad epilogue on, the
/// bias gradient comes from the dW GEMM's epilogue (BGRADA / BGRADB, lt.rs) where cuBLASLt
/// has one, else from a column-sum pass over dout.
#[allow(clippy::too_many_arguments)]
fn weight_grads(
    be: &CudaBackend,
    dweight: CudaViewMut<'_>,
    dbias: Option<CudaViewMut<'_>>,
    (dy, lddy): (Operand, usize),
    (x, ldx): (Operand, usize),
    dout: CudaView<'_>,
    s: MatmulShape,
    op: usize,
) {
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    let odd = op != oc;
    if let Some(dbias) = &dbias {
        assert_eq!(dbias.len, oc, "matmul dbias: {} floats, expected OC={oc}", dbias.len);
        if !odd && epilogues::weight_grads_bgrad(be, &dweight, dbias, (dy, lddy), (x, ldx), s) {
            return;
        }
    }
    // dW's GEMM: straight into dweight (beta = 1), or over the rounded-up OC into a scratch.
    let (dw_c, dw_beta) = if odd {
        let Some(c) = be.f32_scratch(op * ic) else { return };
        (c, 0.0)
    } else {
        (dweight.ptr(), 1.0)
    };
    let (g, rows, cols, ld) = match s.layout {
        // dW (IC, OC) row-major = column-major dW^T (OC, IC) += dout^T (OC, N) @ inp (N, IC)
        WeightLayout::InOut => (
            Gemm { ta: N, tb: T, m: op, n: ic, k: n, a: dy, lda: lddy, b: x, ldb: ldx, c: dw_c, ldc: op, beta: dw_beta, c_bf16: false },
            ic, oc, op,
        ),
        // dW (OC, IC) row-major = column-major dW^T (IC, OC) += inp^T (IC, N) @ dout (N, OC)
        WeightLayout::OutIn => (
            Gemm { ta: N, tb: T, m: ic, n: op, k: n, a: x, lda: ldx, b: dy, ldb: lddy, c: dw_c, ldc: ic, beta: dw_beta, c_bf16: false },
            oc, ic, ic,
        ),
    };
    gemm(be, g, "matmul_backward dweight");
    if odd {
        // dweight (rows, cols) row-major += scratch (rows, ld) [:, :cols]
        let f = be.func("add_unpadded");
        let (r64, c64, ld64) = (rows as u64, cols as u64, ld as u64);
        let mut b = be.stream().launch_builder(&f);
        b.arg(dweight.ptr_ref()).arg(&dw_c).arg(&r64).arg(&c64).arg(&ld64);
        // SAFETY: add_unpadded(float*, const float*, u64, u64, u64) rewrites rows*cols floats
        // of dweight (= IC*OC, asserted) and reads rows rows of stride ld of the scratch
        // (op*ic floats, allocated above).
        be.check(unsafe { b.launch(elementwise_cfg(be, rows * cols)) }.map(|_| ()), "add_unpadded");
    }
    if let Some(dbias) = dbias {
        colsum::add_column_sums(be, dbias.ptr(), dout.addr(), dout.is_bf16(), n, oc);
    }
}
