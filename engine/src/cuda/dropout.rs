//! Dropout: one grid-stride kernel each way (`kernels/dropout.cu`), the mask recomputed from
//! (seed, counter) with the CPU's hash, so both backends draw the same mask.

use cudarc::driver::PushKernelArg;

use super::memory::elementwise_cfg;
use super::view::{CudaView, CudaViewMut};
use super::CudaBackend;
use crate::backend::Dropout;
use crate::cpu::dropout::mask_params;

/// Launches `name(dst, src, seed, offset, threshold, scale, n)` over n elements.
fn launch(be: &CudaBackend, name: &str, dst: u64, src: u64, n: usize, mask: Dropout) {
    // validates p (panics naming it) and gives the CPU's exact threshold and scale
    let (threshold, scale) = mask_params(mask.p);
    if n == 0 {
        return;
    }
    let f = be.func(name);
    let n64 = n as u64;
    let mut b = be.stream().launch_builder(&f);
    b.arg(&dst).arg(&src).arg(&mask.seed).arg(&mask.offset).arg(&threshold).arg(&scale).arg(&n64);
    // SAFETY: both dropout kernels take (float*, const float*, u64, u64, unsigned, float, u64)
    // and touch elements 0..n of each pointer; callers check both views hold n floats.
    be.check(unsafe { b.launch(elementwise_cfg(be, n)) }.map(|_| ()), name);
}

pub(crate) fn forward(be: &CudaBackend, out: CudaViewMut<'_>, inp: CudaView<'_>, mask: Dropout) {
    assert_eq!(out.len, inp.len, "dropout: out {} vs inp {}", out.len, inp.len);
    launch(be, "dropout_forward", out.ptr(), inp.ptr(), inp.len, mask)
}

pub(crate) fn backward(be: &CudaBackend, dinp: CudaViewMut<'_>, dout: CudaView<'_>, mask: Dropout) {
    assert_eq!(dinp.len, dout.len, "dropout backward: dinp {} vs dout {}", dinp.len, dout.len);
    launch(be, "dropout_backward", dinp.ptr(), dout.ptr(), dout.len, mask)
}
