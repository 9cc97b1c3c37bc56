//! Fused AdamW over a range of the flat buffers.

use cudarc::driver::PushKernelArg;

use super::memory::elementwise_cfg;
use super::view::{CudaView, CudaViewMut};
use super::CudaBackend;
use crate::backend::AdamWStep;

pub(crate) fn update(
    be: &CudaBackend,
    params: CudaViewMut<'_>,
    grads: CudaView<'_>,
    m: CudaViewMut<'_>,
    v: CudaViewMut<'_>,
    hp: AdamWStep,
) {
    let n = params.len;
    assert!(grads.len == n && m.len == n && v.len == n, "adamw: buffers of different lengths");
    if n == 0 {
        return;
    }
    // Bias corrections in f32 on the host, exactly as the CPU reference.
    let bc1 = 1.0 - hp.beta1.powi(hp.t as i32);
    let bc2 = 1.0 - hp.beta2.powi(hp.t as i32);
    let f = be.func("adamw_update");
    let n64 = n as u64;
    let mut b = be.stream().launch_builder(&f);
    b.arg(&params.ptr).arg(&grads.ptr).arg(&m.ptr).arg(&v.ptr).arg(&n64);
    b.arg(&hp.lr).arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps).arg(&hp.weight_decay);
    b.arg(&hp.grad_scale).arg(&bc1).arg(&bc2);
    // SAFETY: adamw_update(float*, const float*, float*, float*, u64, 8 x float) touches
    // elements 0..n of four views of n floats each (asserted).
    be.check(unsafe { b.launch(elementwise_cfg(be, n)) }.map(|_| ()), "adamw_update");
}
