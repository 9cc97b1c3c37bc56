//! LayerNorm: forward and input gradient one warp per row; weight and bias gradients as
//! deterministic column sums over fixed row chunks (see colsum.rs).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::colsum;
use super::view::{CudaView, CudaViewMut};
use super::CudaBackend;
use crate::cpu::ROWS_PER_TASK;

const ROWS_PER_BLOCK: usize = 8; // 8 warps of 32 threads

fn warp_per_row_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out (N, C) = (inp - mean) * rstd * w + b; saves mean (N), rstd (N).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    be: &CudaBackend,
    out: CudaViewMut<'_>,
    mean: CudaViewMut<'_>,
    rstd: CudaViewMut<'_>,
    inp: CudaView<'_>,
    w: CudaView<'_>,
    b: CudaView<'_>,
    c: usize,
) {
    assert!(c > 0 && inp.len.is_multiple_of(c), "layernorm: input of {} floats is not (N, {c})", inp.len);
    let n = inp.len / c;
    assert_eq!(out.len, n * c, "layernorm out");
    assert!(mean.len == n && rstd.len == n, "layernorm saved state: mean {}, rstd {}, rows {n}", mean.len, rstd.len);
    assert!(w.len == c && b.len == c, "layernorm params: w {}, b {}, C {c}", w.len, b.len);
    if n == 0 {
        return;
    }
    // out may be a bf16 activation (a GEMM's input, see view.rs); everything else is f32
    let f = be.func(if out.is_bf16() { "layernorm_forward_bf16out" } else { "layernorm_forward" });
    let (rows, cc) = (n as u64, c as u64);
    let mut l = be.stream().launch_builder(&f);
    l.arg(out.addr_ref()).arg(mean.ptr_ref()).arg(rstd.ptr_ref()).arg(inp.ptr_ref()).arg(w.ptr_ref()).arg(b.ptr_ref()).arg(&rows).arg(&cc);
    // SAFETY: layernorm_forward(float*, float*, float*, const float* x3, u64, u64) (the _bf16out
    // variant takes unsigned short* out, matching the view's type): sizes asserted.
    be.check(unsafe { l.launch(warp_per_row_cfg(n)) }.map(|_| ()), "layernorm_forward");
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    be: &CudaBackend,
    dinp: CudaViewMut<'_>,
    dw: CudaViewMut<'_>,
    db: CudaViewMut<'_>,
    dout: CudaView<'_>,
    inp: CudaView<'_>,
    w: CudaView<'_>,
    mean: CudaView<'_>,
    rstd: CudaView<'_>,
    c: usize,
) {
    assert!(c > 0 && inp.len.is_multiple_of(c), "layernorm backward: input of {} floats is not (N, {c})", inp.len);
    let n = inp.len / c;
    assert!(dinp.len == n * c && dout.len == n * c, "layernorm grads");
    assert!(dw.len == c && db.len == c && w.len == c, "layernorm param grads");
    assert!(mean.len == n && rstd.len == n, "layernorm saved state");
    if n == 0 {
        return;
    }
    let (rows, cc) = (n as u64, c as u64);
    let f = be.func("layernorm_backward_input");
    let mut l = be.stream().launch_builder(&f);
    l.arg(dinp.ptr_ref()).arg(dout.ptr_ref()).arg(inp.ptr_ref()).arg(w.ptr_ref()).arg(mean.ptr_ref()).arg(rstd.ptr_ref()).arg(&rows).arg(&cc);
    // SAFETY: layernorm_backward_input(float*, const float* x5, u64, u64): sizes asserted.
    be.check(unsafe { l.launch(warp_per_row_cfg(n)) }.map(|_| ()), "layernorm_backward_input");

    let (_pdw_buf, pdw) = colsum::scratch(be, n, c);
    let (_pdb_buf, pdb) = colsum::scratch(be, n, c);
    let f = be.func("layernorm_backward_params_partial");
    let per = ROWS_PER_TASK as u64;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&pdw).arg(&pdb).arg(dout.ptr_ref()).arg(inp.ptr_ref()).arg(mean.ptr_ref()).arg(rstd.ptr_ref()).arg(&rows).arg(&cc).arg(&per);
    // SAFETY: layernorm_backward_params_partial(float*, float*, const float* x4, u64, u64, u64)
    // writes chunks*C floats to each scratch buffer.
    be.check(
        unsafe { l.launch(colsum::partial_cfg(n, c)) }.map(|_| ()),
        "layernorm_backward_params_partial",
    );
    colsum::finish(be, dw.ptr(), pdw, n, c);
    colsum::finish(be, db.ptr(), pdb, n, c);
}
