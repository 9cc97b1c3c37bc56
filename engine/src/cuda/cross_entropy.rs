//! Fused softmax cross-entropy, one block per row of logits.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::view::{CudaView, CudaViewMut};
use super::CudaBackend;

/// Threads per row. The forward merges per-warp results through a 32-entry shared array and
/// warp shuffles (a multiple of 32, at most 1024); head and tail elements of a row (up to 3 each,
/// before and after the 4-element words the kernels load) take one thread each (at least 4).
const THREADS: u32 = 512;
const _: () = assert!(THREADS.is_multiple_of(32) && THREADS >= 32 && THREADS <= 1024);

fn row_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// losses[n] = lse(logits[n]) - logits[n, t] (0 when ignored); saves lse (N).
pub(crate) fn forward(
    be: &CudaBackend,
    losses: CudaViewMut<'_>,
    lse: CudaViewMut<'_>,
    logits: CudaView<'_>,
    targets: &CudaSlice<u32>,
    v: usize,
) {
    let n = targets.len();
    assert!(losses.len == n && lse.len == n, "cross entropy: losses {}, lse {}, rows {n}", losses.len, lse.len);
    assert_eq!(logits.len, n * v, "cross entropy: logits {} floats, expected (N={n}, V={v})", logits.len);
    if n == 0 {
        return;
    }
    // f32 or bf16 logits (the latter an activation buffer, see view.rs)
    let f = be.func(if logits.is_bf16() { "cross_entropy_forward_bf16" } else { "cross_entropy_forward" });
    let (t, err, vv) = (be.ids_ptr(targets), be.err_ptr(), v as u64);
    let mut b = be.stream().launch_builder(&f);
    b.arg(losses.ptr_ref()).arg(lse.ptr_ref()).arg(logits.addr_ref()).arg(&t).arg(&vv).arg(&err);
    // SAFETY: cross_entropy_forward[_bf16](float*, float*, const float* or const unsigned short*
    // (matching the view's type), const unsigned*, u64, unsigned*) with one block per row reads
    // row n of logits (its 4-element words only where they are aligned, computed from the
    // address) and writes losses[n], lse[n].
    be.check(unsafe { b.launch(row_cfg(n)) }.map(|_| ()), "cross_entropy_forward");
}

/// logits[n] = dloss * (softmax(logits[n]) - onehot(t)), zeros for ignored rows.
pub(crate) fn backward_in_place(be: &CudaBackend, logits: CudaViewMut<'_>, lse: CudaView<'_>, targets: &CudaSlice<u32>, dloss: f32, v: usize) {
    let n = targets.len();
    assert_eq!(logits.len, n * v, "cross entropy backward in place: logits {} floats, expected (N={n}, V={v})", logits.len);
    assert_eq!(lse.len, n, "cross entropy backward in place: lse");
    if n == 0 {
        return;
    }
    let f = be.func(if logits.is_bf16() { "cross_entropy_backward_in_place_bf16" } else { "cross_entropy_backward_in_place" });
    let (t, vv) = (be.ids_ptr(targets), v as u64);
    let mut b = be.stream().launch_builder(&f);
    b.arg(logits.addr_ref()).arg(lse.ptr_ref()).arg(&t).arg(&dloss).arg(&vv);
    // SAFETY: cross_entropy_backward_in_place[_bf16](float* or unsigned short* (the view's
    // type), const float*, const unsigned*, float, u64), one block per row, reads and writes
    // row n of logits only (aligned 4-element words, scalar head and tail).
    be.check(unsafe { b.launch(row_cfg(n)) }.map(|_| ()), "cross_entropy_backward_in_place");
}

/// Words of 4 bf16 logits each thread of the fused kernel may hold, one kernel per value
/// (cross_entropy.cu's `cross_entropy_fused_bf16_k{K}`). f32 logits take the two kernels.
const FUSED_K_BF16: &[usize] = &[16, 32];
/// The fused kernels' block size: their CE_FUSED_THREADS, which fixes where each held word lies.
const FUSED_THREADS: u32 = 512;

/// The fused kernel for rows of `v` logits: the smallest K whose K words per thread cover a row
/// (at most v / 4 whole words after a head of up to 3 elements), None for f32 logits and rows
/// longer than the largest K covers.
fn fused_kernel(bf16: bool, v: usize) -> Option<String> {
    if !bf16 {
        return None;
    }
    let k = FUSED_K_BF16.iter().copied().find(|&k| k * FUSED_THREADS as usize >= v / 4)?;
    Some(format!("cross_entropy_fused_bf16_k{k}"))
}

/// `forward` then `backward_in_place`; with the backend's fused classifier on, in one kernel that
/// reads each row once and keeps it in registers (one read and one write of the logits instead of
/// two reads and a write; the same results bitwise). f32 logits and rows too long for the
/// registers take the two kernels.
pub(crate) fn forward_backward_in_place(
    be: &CudaBackend,
    losses: CudaViewMut<'_>,
    mut lse: CudaViewMut<'_>,
    logits: CudaViewMut<'_>,
    targets: &CudaSlice<u32>,
    dloss: f32,
    v: usize,
) {
    let n = targets.len();
    assert!(losses.len == n && lse.len == n, "cross entropy fused: losses {}, lse {}, rows {n}", losses.len, lse.len);
    assert_eq!(logits.len, n * v, "cross entropy fused: logits {} values, expected (N={n}, V={v})", logits.len);
    if n == 0 {
        return;
    }
    // the fused kernel only where asked for (CudaBackend::with_fused_classifier): one block of
    // 512 threads per SM holding a 50k row measured 2.0 ms against the two kernels' 1.3
    let fused = if be.fused_classifier() { fused_kernel(logits.is_bf16(), v) } else { None };
    let Some(name) = fused else {
        forward(be, losses, lse.reborrow(), logits.as_view(), targets, v);
        return backward_in_place(be, logits, lse.as_view(), targets, dloss, v);
    };
    let f = be.func(&name);
    let (t, err, vv) = (be.ids_ptr(targets), be.err_ptr(), v as u64);
    let mut b = be.stream().launch_builder(&f);
    b.arg(losses.ptr_ref()).arg(lse.ptr_ref()).arg(logits.addr_ref()).arg(&t).arg(&dloss).arg(&vv).arg(&err);
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (FUSED_THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: cross_entropy_fused_bf16_k{K}(float*, float*, unsigned short* (a bf16 view, as
    // fused_kernel requires), const unsigned*, float, u64, unsigned*), one block of FUSED_THREADS
    // per row with K * 4 * FUSED_THREADS >= v (fused_kernel), reads and writes row n of logits
    // only (aligned 4-element words, scalar head and tail) and writes losses[n], lse[n].
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), "cross_entropy_fused");
}

/// dlogits[n] += dloss * (softmax(logits[n]) - onehot(t)), skipping ignored rows.
pub(crate) fn backward(
    be: &CudaBackend,
    dlogits: CudaViewMut<'_>,
    logits: CudaView<'_>,
    lse: CudaView<'_>,
    targets: &CudaSlice<u32>,
    dloss: f32,
    v: usize,
) {
    let n = targets.len();
    assert!(dlogits.len == logits.len && logits.len == n * v, "cross entropy backward: shapes");
    assert_eq!(lse.len, n, "cross entropy backward: lse");
    if n == 0 {
        return;
    }
    let f = be.func("cross_entropy_backward");
    let (t, vv) = (be.ids_ptr(targets), v as u64);
    let mut b = be.stream().launch_builder(&f);
    b.arg(dlogits.ptr_ref()).arg(logits.ptr_ref()).arg(lse.ptr_ref()).arg(&t).arg(&dloss).arg(&vv);
    // SAFETY: cross_entropy_backward(float*, const float*, const float*, const unsigned*,
    // float, u64), one block per row, touches row n of dlogits and logits.
    be.check(unsafe { b.launch(row_cfg(n)) }.map(|_| ()), "cross_entropy_backward");
}

#[cfg(test)]
mod tests {
    use super::fused_kernel;

    #[test]
    fn fused_kernel_covers_the_row() {
        // GPT-2 (padded and not): 25 words per thread; BERT, T5: 15, 16
        assert_eq!(fused_kernel(true, 50304).as_deref(), Some("cross_entropy_fused_bf16_k32"));
        assert_eq!(fused_kernel(true, 50257).as_deref(), Some("cross_entropy_fused_bf16_k32"));
        assert_eq!(fused_kernel(true, 30522).as_deref(), Some("cross_entropy_fused_bf16_k16"));
        assert_eq!(fused_kernel(true, 32128).as_deref(), Some("cross_entropy_fused_bf16_k16"));
        assert_eq!(fused_kernel(true, 1).as_deref(), Some("cross_entropy_fused_bf16_k16"));
        // the longest rows each K covers: 4 * 512 * K words and a tail of 3
        assert_eq!(fused_kernel(true, 32768 + 3).as_deref(), Some("cross_entropy_fused_bf16_k16"));
        assert_eq!(fused_kernel(true, 32768 + 4).as_deref(), Some("cross_entropy_fused_bf16_k32"));
        assert_eq!(fused_kernel(true, 65536 + 3).as_deref(), Some("cross_entropy_fused_bf16_k32"));
        assert_eq!(fused_kernel(true, 65536 + 4), None);
        assert_eq!(fused_kernel(false, 32128), None);
    }
}
