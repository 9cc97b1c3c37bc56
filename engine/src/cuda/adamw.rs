//! Fused AdamW over a range of the flat buffers.

use cudarc::driver::PushKernelArg;

use super::memory::elementwise_cfg;
use super::shadow;
use super::view::{CudaBuf, CudaView, CudaViewMut};
use super::{CudaBackend, CudaIds};
use crate::backend::{AdamWStep, DecayRuns};

/// All runs in one launch (see `adamw_update_runs` in adamw.cu). Every parameter is rewritten,
/// so a bf16 shadow of `params` (shadow.rs) gets the new values in the same pass and stays valid.
pub(crate) fn update_runs(
    be: &CudaBackend,
    params: &mut CudaBuf,
    grads: &CudaBuf,
    m: &mut CudaBuf,
    v: &mut CudaBuf,
    runs: &DecayRuns<CudaIds, CudaBuf>,
    hp: AdamWStep,
) {
    let n = runs.len();
    assert!(params.len == n && grads.len == n && m.len == n && v.len == n, "adamw: buffers of different lengths");
    if n == 0 {
        return;
    }
    let bc1 = 1.0 - hp.beta1.powi(hp.t as i32);
    let bc2 = 1.0 - hp.beta2.powi(hp.t as i32);
    // Four elements per thread where every buffer allows 16-byte (the shadow 8-byte) accesses.
    let aligned = |ptr: u64, bytes: u64| ptr.is_multiple_of(bytes);
    let (n64, nruns) = (n as u64, runs.host.len() as u32);
    // The `_for_write` accessors start new write generations of the buffers written.
    let (pp, gp) = (be.buf_ptr(params.f32_data_for_write()), be.buf_ptr(grads.f32_data()));
    let (mp, vp) = (be.buf_ptr(m.f32_data_for_write()), be.buf_ptr(v.f32_data_for_write()));
    let (ends, decay) = (be.ids_ptr(&runs.ends), be.buf_ptr(runs.decay.f32_data()));
    // Null when params has no shadow.
    let shadow = shadow::rewrite_target(be, params);
    let x4 = [pp, gp, mp, vp].iter().all(|&a| aligned(a, 16)) && aligned(shadow, 8);
    let name = if x4 { "adamw_update_runs_x4" } else { "adamw_update_runs" };
    let f = be.func(name);
    let mut b = be.stream().launch_builder(&f);
    b.arg(&pp).arg(&shadow).arg(&gp).arg(&mp).arg(&vp).arg(&n64).arg(&ends).arg(&decay).arg(&nruns);
    b.arg(&hp.lr).arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps).arg(&hp.grad_scale).arg(&bc1).arg(&bc2);
    // SAFETY: adamw_update_runs(float*, unsigned short* or null, const float*, float*, float*,
    // u64, const unsigned*, const float*, unsigned, 7 x float) touches elements 0..n of four
    // buffers of n floats (asserted) and of the shadow (at least n values, rewrite_target), and
    // reads nruns >= 1 entries of ends and decay.
    // (the _x4 kernel: the same with four elements per thread, pointers aligned as checked)
    let threads = if x4 { n.div_ceil(4) } else { n };
    let r = unsafe { b.launch(elementwise_cfg(be, threads)) }.map(|_| ());
    let launched = r.is_ok();
    be.check(r, name);
    // The kernel covers every element 0..n, so the shadow holds the whole new generation.
    shadow::rewritten(be, params, launched && shadow != 0);
}

/// One range, through views: no shadow is written here (the views' buffers are unknown), and the
/// `view_mut` that made `params` started a new generation, so the next matmul reconverts.
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
    b.arg(params.ptr_ref()).arg(grads.ptr_ref()).arg(m.ptr_ref()).arg(v.ptr_ref()).arg(&n64);
    b.arg(&hp.lr).arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps).arg(&hp.weight_decay);
    b.arg(&hp.grad_scale).arg(&bc1).arg(&bc2);
    // SAFETY: adamw_update(float*, const float*, float*, float*, u64, 8 x float) touches
    // elements 0..n of four views of n floats each (asserted).
    be.check(unsafe { b.launch(elementwise_cfg(be, n)) }.map(|_| ()), "adamw_update");
}
