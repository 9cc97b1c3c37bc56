//! GELU, the residual add and tanh: one grid-stride kernel each.

use cudarc::driver::PushKernelArg;

use super::colsum;
use super::memory::elementwise_cfg;
use super::view::{CudaView, CudaViewMut};
use super::CudaBackend;
use crate::cpu::ROWS_PER_TASK;

/// Launches `name(ptrs..., n)` over n elements.
fn launch(be: &CudaBackend, name: &str, ptrs: &[u64], n: usize) {
    if n == 0 {
        return;
    }
    let f = be.func(name);
    let n64 = n as u64;
    let mut b = be.stream().launch_builder(&f);
    for p in ptrs {
        b.arg(p);
    }
    b.arg(&n64);
    // SAFETY: each kernel of elementwise.cu takes its pointers (float*, or unsigned short* for
    // the _bf16 kernels, whose callers check every view is bf16) then u64 n and touches
    // elements 0..n of each; callers check every view holds n elements.
    be.check(unsafe { b.launch(elementwise_cfg(be, n)) }.map(|_| ()), name);
}

/// out = gelu(inp): both f32, or both bf16 (activations, see view.rs).
pub(crate) fn gelu_forward(be: &CudaBackend, out: CudaViewMut<'_>, inp: CudaView<'_>) {
    assert_eq!(out.len, inp.len, "gelu: out {} vs inp {}", out.len, inp.len);
    if out.is_bf16() || inp.is_bf16() {
        assert!(out.is_bf16() && inp.is_bf16(), "gelu: out and inp must both be bf16 or both f32");
        return launch(be, "gelu_forward_bf16", &[out.addr(), inp.addr()], out.len);
    }
    launch(be, "gelu_forward", &[out.ptr(), inp.ptr()], out.len)
}

pub(crate) fn gelu_backward(be: &CudaBackend, dinp: CudaViewMut<'_>, inp: CudaView<'_>, dout: CudaView<'_>) {
    assert!(dinp.len == inp.len && dout.len == inp.len, "gelu backward: lengths differ");
    launch(be, "gelu_backward", &[dinp.ptr(), inp.ptr(), dout.ptr()], inp.len)
}

/// dinp = dout * gelu'(inp): all three f32, or all three bf16.
pub(crate) fn gelu_backward_set(be: &CudaBackend, dinp: CudaViewMut<'_>, inp: CudaView<'_>, dout: CudaView<'_>) {
    assert!(dinp.len == inp.len && dout.len == inp.len, "gelu backward: lengths differ");
    if dinp.is_bf16() || inp.is_bf16() || dout.is_bf16() {
        assert!(dinp.is_bf16() && inp.is_bf16() && dout.is_bf16(), "gelu backward: dinp, inp and dout must all be bf16 or all f32");
        return launch(be, "gelu_backward_set_bf16", &[dinp.addr(), inp.addr(), dout.addr()], inp.len);
    }
    launch(be, "gelu_backward_set", &[dinp.ptr(), inp.ptr(), dout.ptr()], inp.len)
}

/// `gelu_backward_set` and `dbias (cols) += sum_n dinp` in one pass (gelu_backward_set_bias_bf16:
/// the same dinp and the same bias gradient bitwise as the two passes), where it applies: every
/// view bf16, `cols` a multiple of 8 and every buffer 16-byte aligned (one word per thread per
/// row), and `SMELT_FUSED_GELU_BIAS` on. Else false, nothing written.
pub(crate) fn gelu_backward_set_with_bias(
    be: &CudaBackend,
    dinp: CudaViewMut<'_>,
    dbias: CudaViewMut<'_>,
    inp: CudaView<'_>,
    dout: CudaView<'_>,
    cols: usize,
) -> bool {
    assert!(dinp.len == inp.len && dout.len == inp.len, "gelu backward: lengths differ");
    assert_eq!(dbias.len, cols, "gelu backward bias: {} floats for {cols} columns", dbias.len);
    let aligned = [dinp.addr(), inp.addr(), dout.addr()].iter().all(|a| a % 16 == 0);
    if !be.tuning().fused_gelu_bias || !(dinp.is_bf16() && inp.is_bf16() && dout.is_bf16()) || dbias.is_bf16() || cols == 0 || cols % 8 != 0 || inp.len % cols != 0 || !aligned {
        return false;
    }
    let rows = inp.len / cols;
    if rows == 0 {
        return true;
    }
    let (_scratch, partial) = colsum::scratch(be, rows, cols);
    let f = be.func("gelu_backward_set_bias_bf16");
    let (n, c, per) = (rows as u64, cols as u64, ROWS_PER_TASK as u64);
    let (d, x, dy) = (dinp.addr(), inp.addr(), dout.addr());
    let mut b = be.stream().launch_builder(&f);
    b.arg(&d).arg(&partial).arg(&x).arg(&dy).arg(&n).arg(&c).arg(&per);
    // SAFETY: gelu_backward_set_bias_bf16(unsigned short*, float*, const unsigned short* x2, u64
    // rows, u64 cols, u64 rows_per_chunk): rows*cols bf16 values per view (lengths checked),
    // chunks*cols partials (the scratch's size), cols % 8 == 0 and 16-byte aligned views (checked).
    let tasks = colsum::chunks(rows) * (cols / 8);
    be.check(unsafe { b.launch(elementwise_cfg(be, tasks)) }.map(|_| ()), "gelu_backward_set_bias_bf16");
    colsum::finish(be, dbias.ptr(), partial, rows, cols);
    true
}

pub(crate) fn residual_forward(be: &CudaBackend, out: CudaViewMut<'_>, a: CudaView<'_>, b: CudaView<'_>) {
    assert!(out.len == a.len && a.len == b.len, "residual: lengths differ");
    launch(be, "residual_forward", &[out.ptr(), a.ptr(), b.ptr()], a.len)
}

/// `out = residual + out` in place (a projection already in `out`), f32.
pub(crate) fn add_onto(be: &CudaBackend, out: &CudaViewMut<'_>, residual: CudaView<'_>) {
    assert_eq!(out.len, residual.len, "residual: lengths differ");
    // residual_forward(out, a, b) reads a[i] and b[i] before writing out[i]: b may be out
    launch(be, "residual_forward", &[out.ptr(), residual.ptr(), out.ptr()], out.len)
}

pub(crate) fn residual_backward(be: &CudaBackend, da: CudaViewMut<'_>, db: CudaViewMut<'_>, dout: CudaView<'_>) {
    assert!(da.len == dout.len && db.len == dout.len, "residual backward: lengths differ");
    launch(be, "residual_backward", &[da.ptr(), db.ptr(), dout.ptr()], dout.len)
}

/// BERT's pooler runs this on (B, C) values per step: on the device, so the step never waits for
/// a host round trip (the trait's default goes through the host).
pub(crate) fn tanh_forward(be: &CudaBackend, out: CudaViewMut<'_>, inp: CudaView<'_>) {
    assert_eq!(out.len, inp.len, "tanh: out {} vs inp {}", out.len, inp.len);
    launch(be, "tanh_forward", &[out.ptr(), inp.ptr()], out.len)
}

pub(crate) fn tanh_backward(be: &CudaBackend, dinp: CudaViewMut<'_>, out: CudaView<'_>, dout: CudaView<'_>) {
    assert!(dinp.len == out.len && dout.len == out.len, "tanh backward: lengths differ");
    launch(be, "tanh_backward", &[dinp.ptr(), out.ptr(), dout.ptr()], out.len)
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_names_exist_in_the_source() {
        let names = crate::cuda::kernels::kernel_names(include_str!("kernels/elementwise.cu"));
        for k in ["gelu_forward", "gelu_backward", "gelu_backward_set", "residual_forward", "residual_backward", "tanh_forward", "tanh_backward"] {
            assert!(names.iter().any(|n| n == k), "{k} missing from elementwise.cu: {names:?}");
        }
    }
}
