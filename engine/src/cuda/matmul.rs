//! Matmuls through cuBLAS (`cublasGemmEx`, f32 storage, math mode from `MatmulPrecision`), bias
//! broadcast before the GEMM (beta = 1 then adds the product, the CPU's order) and the bias
//! gradient as deterministic column sums.
//!
//! With `MatmulPrecision::Bf16` each operand is first converted to bf16 into the backend's
//! scratch (one memory pass, `kernels/convert.cu`) and the GEMM runs bf16 x bf16 -> f32 with f32
//! accumulation: several times faster on an H100 than letting cuBLAS convert f32 operands
//! itself (`CUBLAS_COMPUTE_32F_FAST_16BF`), with the same rounding of the operands.
//!
//! cuBLAS is column-major; a row-major `X (r, c)` is the column-major `X^T` with ld = c, so
//! `out = inp @ W` is computed as `out^T (OC, N) = W' (OC, IC) @ inp^T (IC, N)`.

use std::ffi::c_void;

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
};
use cudarc::driver::PushKernelArg;

use super::colsum;
use super::memory::elementwise_cfg;
use super::view::{CudaView, CudaViewMut};
use super::{CudaBackend, MatmulPrecision};
use crate::backend::{MatmulShape, WeightLayout};

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

/// One column-major GEMM `C (m, n) = alpha op(A) (m, k) @ op(B) (k, n) + beta C`, C in f32.
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
            cudaDataType::CUDA_R_32F,
            g.ldc as i32,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    if let Err(e) = r {
        be.fail(what, format!("cublasGemmEx: {e:?}"));
    }
}

/// The operands of one matmul call as GEMM inputs: with `MatmulPrecision::Bf16`, bf16 copies
/// side by side in the scratch (each region 16-byte aligned); otherwise the f32 views
/// themselves. `None` when the scratch could not be allocated (the failure is recorded).
fn operands<const K: usize>(be: &CudaBackend, views: [CudaView<'_>; K]) -> Option<[Operand; K]> {
    if be.options().matmul != MatmulPrecision::Bf16 {
        return Some(views.map(|v| Operand::f32(v.ptr)));
    }
    let padded = |n: usize| n.div_ceil(8) * 8;
    let total: usize = views.iter().map(|v| padded(v.len)).sum();
    let base = be.bf16_scratch(total)?;
    let mut offset = 0usize;
    Some(views.map(|v| {
        let ptr = base + 2 * offset as u64;
        offset += padded(v.len);
        if v.len > 0 {
            let f = be.func("f32_to_bf16");
            let n = v.len as u64;
            let mut b = be.stream().launch_builder(&f);
            b.arg(&ptr).arg(&v.ptr).arg(&n);
            // SAFETY: f32_to_bf16(u16*, const float*, u64) reads n floats of the view and writes
            // n bf16 values inside the scratch region sized above.
            be.check(unsafe { b.launch(elementwise_cfg(be, v.len.div_ceil(4))) }.map(|_| ()), "f32_to_bf16");
        }
        Operand { ptr, bf16: true }
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
    check_shapes(&s, inp.len, weight.len, out.len);
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    if let Some(bias) = bias {
        assert_eq!(bias.len, oc, "matmul bias: {} floats, expected OC={oc}", bias.len);
        if n * oc > 0 {
            let f = be.func("bias_broadcast");
            let (rows, cols) = (n as u64, oc as u64);
            let mut b = be.stream().launch_builder(&f);
            b.arg(&out.ptr).arg(&bias.ptr).arg(&rows).arg(&cols);
            // SAFETY: bias_broadcast(float*, const float*, u64, u64) writes N*OC floats.
            be.check(unsafe { b.launch(elementwise_cfg(be, n * oc)) }.map(|_| ()), "bias_broadcast");
        }
    }
    let (ta, lda) = match s.layout {
        // W (IC, OC) row-major is column-major (OC, IC), ld OC.
        WeightLayout::InOut => (N, oc),
        // W (OC, IC) row-major is column-major (IC, OC); transpose it.
        WeightLayout::OutIn => (T, ic),
    };
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    let Some([w, x]) = operands(be, [weight, inp]) else { return };
    gemm(
        be,
        Gemm { ta, tb: N, m: oc, n, k: ic, a: w, lda, b: x, ldb: ic, c: out.ptr, ldc: oc, beta },
        "matmul_forward",
    );
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
    check_shapes(&s, inp.len, weight.len, dout.len);
    assert_eq!(dweight.len, weight.len, "matmul dweight: {} floats, weight {}", dweight.len, weight.len);
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    // The weight is only read for dinp; skip converting it when there is none.
    let (dy, x, w) = if dinp.is_some() {
        let Some([dy, x, w]) = operands(be, [dout, inp, weight]) else { return };
        (dy, x, w)
    } else {
        let Some([dy, x]) = operands(be, [dout, inp]) else { return };
        (dy, x, Operand::f32(weight.ptr))
    };
    if let Some(dinp) = dinp {
        assert_eq!(dinp.len, n * ic, "matmul dinp: {} floats, expected (N={n}, IC={ic})", dinp.len);
        // dinp^T (IC, N) += W'' (IC, OC) @ dout^T (OC, N)
        let (ta, lda) = match s.layout {
            // W (IC, OC) row-major is column-major (OC, IC): transpose to (IC, OC).
            WeightLayout::InOut => (T, oc),
            // W (OC, IC) row-major is column-major (IC, OC) already.
            WeightLayout::OutIn => (N, ic),
        };
        gemm(
            be,
            Gemm { ta, tb: N, m: ic, n, k: oc, a: w, lda, b: dy, ldb: oc, c: dinp.ptr, ldc: ic, beta: 1.0 },
            "matmul_backward dinp",
        );
    }
    let g = match s.layout {
        // dW (IC, OC) row-major = column-major dW^T (OC, IC) += dout^T (OC, N) @ inp (N, IC)
        WeightLayout::InOut => Gemm {
            ta: N, tb: T, m: oc, n: ic, k: n, a: dy, lda: oc, b: x, ldb: ic, c: dweight.ptr, ldc: oc, beta: 1.0,
        },
        // dW (OC, IC) row-major = column-major dW^T (IC, OC) += inp^T (IC, N) @ dout (N, OC)
        WeightLayout::OutIn => Gemm {
            ta: N, tb: T, m: ic, n: oc, k: n, a: x, lda: ic, b: dy, ldb: oc, c: dweight.ptr, ldc: ic, beta: 1.0,
        },
    };
    gemm(be, g, "matmul_backward dweight");
    if let Some(dbias) = dbias {
        assert_eq!(dbias.len, oc, "matmul dbias: {} floats, expected OC={oc}", dbias.len);
        colsum::add_column_sums(be, dbias.ptr, dout.ptr, n, oc);
    }
}
