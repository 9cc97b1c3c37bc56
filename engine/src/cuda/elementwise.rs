//! GELU and the residual add: one grid-stride kernel each.

use cudarc::driver::PushKernelArg;

use super::memory::elementwise_cfg;
use super::view::{CudaView, CudaViewMut};
use super::CudaBackend;

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
    // SAFETY: each kernel of elementwise.cu takes its float pointers then u64 n and touches
    // elements 0..n of each; callers check every view holds n floats.
    be.check(unsafe { b.launch(elementwise_cfg(be, n)) }.map(|_| ()), name);
}

pub(crate) fn gelu_forward(be: &CudaBackend, out: CudaViewMut<'_>, inp: CudaView<'_>) {
    assert_eq!(out.len, inp.len, "gelu: out {} vs inp {}", out.len, inp.len);
    launch(be, "gelu_forward", &[out.ptr, inp.ptr], out.len)
}

pub(crate) fn gelu_backward(be: &CudaBackend, dinp: CudaViewMut<'_>, inp: CudaView<'_>, dout: CudaView<'_>) {
    assert!(dinp.len == inp.len && dout.len == inp.len, "gelu backward: lengths differ");
    launch(be, "gelu_backward", &[dinp.ptr, inp.ptr, dout.ptr], inp.len)
}

pub(crate) fn residual_forward(be: &CudaBackend, out: CudaViewMut<'_>, a: CudaView<'_>, b: CudaView<'_>) {
    assert!(out.len == a.len && a.len == b.len, "residual: lengths differ");
    launch(be, "residual_forward", &[out.ptr, a.ptr, b.ptr], a.len)
}

pub(crate) fn residual_backward(be: &CudaBackend, da: CudaViewMut<'_>, db: CudaViewMut<'_>, dout: CudaView<'_>) {
    assert!(da.len == dout.len && db.len == dout.len, "residual backward: lengths differ");
    launch(be, "residual_backward", &[da.ptr, db.ptr, dout.ptr], dout.len)
}
