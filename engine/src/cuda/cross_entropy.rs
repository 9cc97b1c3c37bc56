//! Fused softmax cross-entropy, one block per row of logits.

use std::sync::OnceLock;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, DriverError, LaunchConfig, PushKernelArg};

use super::view::{CudaView, CudaViewMut};
use super::{device_err, CudaBackend};
use crate::error::EngineError;

/// Threads per row. The forward merges per-warp results through a 32-entry shared array and
/// warp shuffles (a multiple of 32, at most 1024); head and tail elements of a row (up to 3 each,
/// before and after the 4-element words the kernels load) take one thread each (at least 4).
/// The fused kernel's launch bounds allow at most its CE_FUSED_THREADS (512; a unit test checks).
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

/// `forward` then `backward_in_place`; with the backend's fused classifier on, in one kernel
/// (`cross_entropy_fused[_bf16]`) that runs both on a row in the same block, so that the
/// backward's read of the row is served by L2 (one DRAM read and one write of the logits instead
/// of two reads and a write; the same results bitwise). Any V, f32 or bf16 logits.
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
    // the fused kernel only where asked for (CudaBackend::with_fused_classifier) until it is
    // measured against the two kernels on a card
    if !be.fused_classifier() {
        forward(be, losses, lse.reborrow(), logits.as_view(), targets, v);
        return backward_in_place(be, logits, lse.as_view(), targets, dloss, v);
    }
    let bf16 = logits.is_bf16();
    let name = fused_name(bf16);
    let f = be.func(name);
    let smem = fused_smem(be, &f, bf16);
    let (t, err, vv) = (be.ids_ptr(targets), be.err_ptr(), v as u64);
    let mut b = be.stream().launch_builder(&f);
    b.arg(losses.ptr_ref()).arg(lse.ptr_ref()).arg(logits.addr_ref()).arg(&t).arg(&dloss).arg(&vv).arg(&err);
    let cfg = LaunchConfig { shared_mem_bytes: smem, ..row_cfg(n) };
    // SAFETY: cross_entropy_fused[_bf16](float*, float*, float* or unsigned short* (the view's
    // type, as the name is picked), const unsigned*, float, u64, unsigned*), one block of
    // THREADS (<= its launch bounds) per row, reads and writes row n of logits only (aligned
    // 4-element words, scalar head and tail) and writes losses[n], lse[n]. The dynamic shared
    // memory is never touched (it only limits the blocks per SM) and is at most what
    // fused_smem allowed the function.
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), name);
}

// Blocks of the fused kernel resident per SM (`CudaTuning::ce_blocks_per_sm`, default 2).
//
// Why a cap: the fused kernel's backward half re-reads the row its block has just read, which
// saves a DRAM read only if the row is still in L2. The rows in flight (blocks per SM x SMs x
// the row's bytes) must therefore stay well under L2: at GPT-2's V = 50304 a bf16 row is 100 KB,
// so 2 blocks on each of an H100's 132 SMs keep 26 MB of its 50 MB in flight, where the 3 that
// fit by registers would keep 40 MB (and 4, the thread limit, 53 MB). f32 rows are twice as long
// (53 MB at 2 per SM), but f32 logits are for comparisons, not speed.

/// The fused kernels' dynamic shared memory in bytes (by logits type), worked out on first use
/// per backend: the functions are the backend's own.
#[derive(Default)]
pub(crate) struct FusedSmem {
    f32: OnceLock<u32>,
    bf16: OnceLock<u32>,
}

/// The fused kernel's name for bf16 or f32 logits.
fn fused_name(bf16: bool) -> &'static str {
    if bf16 {
        "cross_entropy_fused_bf16"
    } else {
        "cross_entropy_fused"
    }
}

/// The dynamic shared memory to launch the fused kernel `f` with: see `cap_smem`. If the driver
/// cannot tell, none (no cap; the same results, maybe slower), with a warning.
fn fused_smem(be: &CudaBackend, f: &CudaFunction, bf16: bool) -> u32 {
    let cell = if bf16 { &be.ce_fused_smem.bf16 } else { &be.ce_fused_smem.f32 };
    *cell.get_or_init(|| {
        let cap = be.tuning().ce_blocks_per_sm;
        cap_smem(be, f, cap).unwrap_or_else(|e| {
            let kernel = fused_name(bf16);
            tracing::warn!(kernel, blocks_per_sm = cap, error = ?e, "cannot cap the fused classifier's blocks per SM");
            0
        })
    })
}

/// Bytes by which `cap_smem` steps its share down (the allocation granularity's multiple).
const SMEM_STEP: usize = 1024;

/// Dynamic shared memory, never touched by the kernel, that leaves room for at most `cap` of
/// `f`'s blocks per SM (the comment above the fused-kernel names says why); 0 when no more than `cap` fit anyway.
/// Sets the function's attributes for it: the whole carveout as shared memory (so that the
/// occupancy computed here is the one it runs at; the L1 it leaves is of no use to a streaming
/// kernel), and the opt-in to more than 48 KiB.
fn cap_smem(be: &CudaBackend, f: &CudaFunction, cap: u32) -> Result<u32, DriverError> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN as OPT_IN;
    use CUfunction_attribute_enum::{
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYNAMIC,
        CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT as CARVEOUT, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES as STATIC,
    };
    let static_smem = f.get_attribute(STATIC)?; // (also makes the backend's context current)
    if f.occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)? <= cap {
        return Ok(0);
    }
    f.set_attribute(CARVEOUT, 100)?;
    // any size up to the device's limit may be launched (and asked about below)
    f.set_attribute(MAX_DYNAMIC, be.ctx.attribute(OPT_IN)? - static_smem)?;
    // the most that lets `cap` blocks fit, more than cap + 1 blocks' share
    let mut smem = f.occupancy_available_dynamic_smem_per_block(cap, THREADS)?;
    let mut got = f.occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)?;
    // That figure leaves out the shared memory the system reserves per block (1 KiB on sm_90:
    // run 16 got one block where two were asked for), so step down until `cap` fit.
    while got < cap && smem >= SMEM_STEP {
        smem -= SMEM_STEP;
        got = f.occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)?;
    }
    if got != cap {
        let why = "the fused classifier's cap on blocks per SM did not take";
        tracing::warn!(blocks_per_sm = got, wanted = cap, smem, "{why}");
    }
    Ok(smem as u32)
}

/// Blocks per SM of the fused classifier kernel (`CudaBackend::fused_classifier_occupancy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedClassifierOccupancy {
    /// The cap asked for (`SMELT_CE_BLOCKS_PER_SM`, default 2).
    pub cap: u32,
    /// Blocks that fit per SM without the cap (by registers and threads).
    pub uncapped: u32,
    /// Blocks that fit with the dynamic shared memory the kernel is launched with: the smaller
    /// of the two above when the cap took.
    pub blocks_per_sm: u32,
}

impl CudaBackend {
    /// The fused classifier kernel's blocks per SM for bf16 or f32 logits, as it is launched
    /// (setting up its cap first if no launch has yet).
    pub fn fused_classifier_occupancy(&self, bf16: bool) -> Result<FusedClassifierOccupancy, EngineError> {
        let f = self.func(fused_name(bf16));
        let smem = fused_smem(self, &f, bf16);
        let at = |smem: u32| {
            f.occupancy_max_active_blocks_per_multiprocessor(THREADS, smem as usize, None)
                .map_err(|e| device_err(format!("{}: occupancy: {e:?}", fused_name(bf16))))
        };
        Ok(FusedClassifierOccupancy { cap: self.tuning().ce_blocks_per_sm, uncapped: at(0)?, blocks_per_sm: at(smem)? })
    }
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
    use super::THREADS;

    #[test]
    fn launches_within_the_fused_kernels_launch_bounds() {
        // the kernels are launched with THREADS; more than their launch bounds would fail to launch
        let src = include_str!("kernels/cross_entropy.cu");
        assert!(src.contains(&format!("#define CE_FUSED_THREADS {THREADS}\n")), "CE_FUSED_THREADS != THREADS");
        let bounded = src.matches("__launch_bounds__(CE_FUSED_THREADS, ").count();
        assert_eq!(bounded, 2, "both fused kernels are bounded by CE_FUSED_THREADS");
    }
}
