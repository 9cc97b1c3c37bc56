//! Fused flash-style multi-head attention on CUDA (kernels in `kernels/attention*.cu*`, one module: `kernels::ATTENTION_SOURCE`).
//!
//! Same semantics as `cpu/attention.rs`, but no (T, T) matrix is ever stored: the forward pass
//! streams 64-key tiles through shared memory with an online softmax and saves one log-sum-exp
//! per (B, H, Tq) row; the backward pass recomputes the probabilities from q, k and that lse.
//!
//! Kernel families, picked by the backend's [`MatmulPrecision`] (the math mode of every
//! tensor-core op):
//! - `Bf16` (sm_80+): tiles of q, k, v and dout move by `cp.async` in 16-byte chunks,
//!   double-buffered, and the operands that must be read transposed come through
//!   `ldmatrix.trans`; bf16 `mma.sync` with f32 accumulation and softmax, 128 threads per
//!   block, each warp owning 16 rows of the 64-row tile; the backward pass first computes each
//!   row's (lse log2 e, D). With bf16 activation buffers whose head dim is a kernel width and
//!   whose rows are 16-byte aligned (GPT-2, BERT, T5), the kernels read the buffers in place
//!   (`Params.direct`, zeros past the last row). Otherwise (f32 buffers, a head dim of 40) they
//!   read head-major bf16 copies, (B, H, Tpad, W) with rows rounded up to the 64-row tile and
//!   the head dim to W: kept in the saved state after the lse ([`Bf16Saved`]) when the backend
//!   does not expect in-place reads ([`copies_saved`]), else made for the call. Reading in
//!   place saved GPT-2 124M 48 copy passes per step (1.9 ms on an H100, bench/NOTES.md v8).
//! - `Tf32` and `F32`: the f32 reference kernels (256 threads, 4x4 cells per thread), which
//!   match the CPU to ~1e-6.
//!
//! Every family shares the launch geometry: forward grid (ceil(Tq/64), H, B); backward `dkv`
//! grid (ceil(Tk/64), H, B) (dk, dv of one key tile over all query tiles), then `dq` grid
//! (ceil(Tq/64), H, B) (dq of one query tile over all key tiles, recomputing P instead of using
//! atomics). Each gradient element is owned by one thread, so accumulation is deterministic;
//! the opt-in fused backward (one pass for dk, dv and dq, grid as dkv) adds dq into an f32
//! scratch from every key tile, so its dq is not.
//!
//! Kernels exist for head dims padded to 32, 64 and 128; larger head dims are rejected. An
//! optional key padding mask (`key_lens`, for `attention_ex_*` with dot scores) skips the key
//! tiles past each sequence's length.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::colsum;
use crate::backend::{AttnShape, QkvSource};
use crate::cuda::view::{CudaView, CudaViewMut};
use crate::cuda::{CudaBackend, CudaIds, MatmulPrecision};

/// Rows of a tile (queries or keys), fixed in attention.cuh.
const TILE: usize = 64;
/// Threads per block of the f32 kernels (and of the D kernel) and of the tensor-core kernels.
const THREADS: u32 = 256;
const MMA_THREADS: u32 = 128;
/// Largest head dim with a kernel.
pub(crate) const MAX_HEAD_DIM: usize = 128;

/// Kernel parameters, `AttnParams` in attention.cuh (same fields, same order, all 4 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct Params {
    pub(super) batch: i32,
    pub(super) tq: i32,
    pub(super) tk: i32,
    pub(super) channels: i32,
    pub(super) heads: i32,
    pub(super) hd: i32,
    pub(super) q_ld: i32,
    pub(super) q_off: i32,
    pub(super) k_ld: i32,
    pub(super) k_off: i32,
    pub(super) v_ld: i32,
    pub(super) v_off: i32,
    pub(super) causal: i32,
    pub(super) scale: f32,
    /// Backward: 1 adds into dq, dk, dv; 0 overwrites them.
    pub(super) accumulate: i32,
    /// bf16 family: q, kv, out, dout, dq, dkv are bf16 activation buffers (all or none).
    pub(super) io_bf16: i32,
    /// With io_bf16: every buffer pointer, row stride and column offset is even (in elements),
    /// so column pairs (d, d+1), d even, move as one 4-byte access (`pairs_allowed`).
    pub(super) pairs: i32,
    /// bf16 family: the tiled kernels read q, k, v and dout straight from the bf16 activation
    /// buffers (`direct_allowed`) instead of head-major copies.
    pub(super) direct: i32,
    /// Device pointer to `key_lens (B)` (u32), or 0 for no padding mask.
    pub(super) key_lens: u64,
    /// Device pointer to the qkv bias gradient's (B*T/64, 3C) column-sum partials the bf16
    /// gradient passes write as they store dqkv ([`backward_set_with_bias`]), or 0.
    pub(super) bias_partial: u64,
}

// SAFETY: plain-old-data with C layout, matching the kernels' by-value struct parameter.
unsafe impl DeviceRepr for Params {}

/// One log-sum-exp per (B, H, Tq) row.
pub(super) fn lse_len(shape: AttnShape) -> usize {
    shape.batch * shape.heads * shape.q_len
}

/// Where the bf16 kernels keep their head-major bf16 copies of q, k and v inside the saved
/// state, after the lse: offsets and lengths in f32 units (two bf16 per f32), each copy
/// starting on a 16-byte boundary for cp.async.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bf16Saved {
    /// Padded head dim W (32, 64, 128) and rows rounded up to the 64-row tile.
    w: usize,
    tq_pad: usize,
    tk_pad: usize,
    /// f32 offsets of the q, k and v copies, and the total length.
    q_at: usize,
    k_at: usize,
    v_at: usize,
    len: usize,
}

impl Bf16Saved {
    fn of(s: AttnShape) -> Bf16Saved {
        let (_, w) = bucket(s.head_dim());
        let tq_pad = s.q_len.div_ceil(TILE) * TILE;
        let tk_pad = s.kv_len.div_ceil(TILE) * TILE;
        let bh = s.batch * s.heads;
        let q_at = lse_len(s).div_ceil(4) * 4;
        let k_at = q_at + bh * tq_pad * w / 2;
        let v_at = k_at + bh * tk_pad * w / 2;
        Bf16Saved { w, tq_pad, tk_pad, q_at, k_at, v_at, len: v_at + bh * tk_pad * w / 2 }
    }
}

/// Length of the saved state: the lse, and for the bf16 kernels the operand copies unless the
/// kernels are expected to read the activations directly ([`copies_saved`]).
pub(crate) fn saved_len(be: &CudaBackend, shape: AttnShape) -> usize {
    if copies_saved(be, shape) {
        Bf16Saved::of(shape).len
    } else {
        lse_len(shape)
    }
}

/// Whether the forward pass keeps head-major bf16 copies of q, k and v in the saved state for
/// the backward pass: the bf16 family, unless the activations are bf16 buffers the kernels can
/// read in place (head dim exactly a kernel width, channels a multiple of 8). Without saved
/// copies a call that cannot read in place (f32 buffers, misaligned views) makes temporary
/// copies, in the backward pass again.
fn copies_saved(be: &CudaBackend, s: AttnShape) -> bool {
    Family::of(be) == Family::Bf16
        && !(be.tuning().bf16_activations && bucket(s.head_dim()).1 == s.head_dim() && s.channels.is_multiple_of(8))
}

/// Whether the tiled kernels may read q, k, v and dout in place (`Params.direct`): bf16
/// buffers, the head dim exactly the kernel's width W (a head's row is W contiguous bf16), and
/// every row stride, column offset and pointer on a 16-byte boundary (the cp.async chunks).
fn direct_allowed(p: &Params, ptrs: &[u64]) -> bool {
    let aligned = [p.q_ld, p.q_off, p.k_ld, p.k_off, p.v_ld, p.v_off, p.channels].iter().all(|x| x % 8 == 0);
    p.io_bf16 != 0 && bucket(p.hd as usize).1 == p.hd as usize && aligned && ptrs.iter().all(|x| x % 16 == 0)
}

/// Head-dim bucket of the kernels: `(suffix, W)` with W the padded head dim.
fn bucket(hd: usize) -> (&'static str, usize) {
    match hd {
        0..=32 => ("d32", 32),
        33..=64 => ("d64", 64),
        _ => ("d128", 128),
    }
}

/// Dynamic shared memory, in bytes, of each tiled kernel for padded head dim `w` (the layouts
/// at the top of the `*_impl` functions in attention_mma_*.cu); `bulk`: the fused backward
/// was compiled to add dq by bulk reductions ([`dq_by_bulk_reductions`]); `wgmma`: the wgmma
/// kernels' tiles, (64, W) core-matrix tiles without the mma.sync kernels' row padding.
fn smem_bytes(family: Family, kernel: Kernel, w: usize, bulk: bool, wgmma: bool) -> usize {
    match family {
        Family::F32 => {
            let tile = TILE * (w + 1); // a (64, W+1) f32 tile of q, k, v or dout
            let scores = TILE * (TILE + 1); // a (64, 65) tile of P or dS
            let floats = match kernel {
                Kernel::Forward => 3 * tile + scores,
                Kernel::Dkv => 4 * tile + 2 * scores + 2 * TILE,
                Kernel::Dq => 4 * tile + scores + 2 * TILE,
                Kernel::Fused => unreachable!("the fused backward has no f32 kernels"),
            };
            4 * floats
        }
        Family::Bf16 => {
            let rows = if wgmma { TILE * w } else { TILE * (w + 8) }; // a (64, W+8) or (64, W) bf16 tile
            let (halves, floats) = match kernel {
                // Q and two buffers each of K and V
                Kernel::Forward => (5 * rows, 0),
                // K, V and two buffers each of Q and dout; two (64, 2) (lse, D) tiles
                Kernel::Dkv => (6 * rows, 4 * TILE),
                // Q, dout and two buffers each of K and V
                Kernel::Dq => (6 * rows, 0),
                // as Dkv, plus a (64 keys, 72) tile of dS^T and, with bulk reductions at
                // W <= 64, each warp's (16, W + 8) f32 staging of its dq rows (without them
                // the 18 KiB would cost an A100 its second block per SM)
                Kernel::Fused => {
                    let staging = if bulk && w <= 64 { (MMA_THREADS as usize / 32) * 16 * (w + 8) } else { 0 };
                    (6 * rows + TILE * (TILE + 8), 4 * TILE + staging)
                }
            };
            2 * halves + 4 * floats
        }
    }
}

/// Whether `arch` ("sm_XY") has bf16 `mma.sync` (sm_80 and later).
fn has_bf16_mma(arch: &str) -> bool {
    arch_at_least(arch, 80)
}

/// Whether the fused backward adds dq by TMA bulk reductions: compiled in (SMELT_ATTN_DQ_BULK,
/// `CudaTuning::attn_dq_bulk`) and the device has them (sm_90); attention_mma.cuh's
/// SMELT_DQ_BULK_ARCH makes the same choice in the kernel.
fn dq_by_bulk_reductions(be: &CudaBackend) -> bool {
    be.tuning().attn_dq_bulk && arch_at_least(be.arch(), 90)
}

/// Whether `kernel` runs on Hopper's warpgroup MMA (attention_wgmma.cuh): asked for
/// (`SMELT_ATTN_WGMMA`, which also has the module compiled for sm_90a there:
/// kernels::module_arch), bf16 kernels, an sm_90 device, and not the fused backward (which has
/// no wgmma version).
fn uses_wgmma(be: &CudaBackend, family: Family, kernel: Kernel) -> bool {
    be.tuning().attn_wgmma && family == Family::Bf16 && be.arch() == "sm_90" && !matches!(kernel, Kernel::Fused)
}

fn arch_at_least(arch: &str, sm: u32) -> bool {
    arch.strip_prefix("sm_").and_then(|v| v.parse::<u32>().ok()).is_some_and(|v| v >= sm)
}

/// Kernel family: f32 reference or bf16 tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    F32,
    Bf16,
}

impl Family {
    fn of(be: &CudaBackend) -> Family {
        match be.options().matmul {
            MatmulPrecision::Bf16 if has_bf16_mma(be.arch()) => Family::Bf16,
            _ => Family::F32,
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Family::F32 => "f32",
            Family::Bf16 => "bf16",
        }
    }
    fn threads(self) -> u32 {
        match self {
            Family::F32 => THREADS,
            Family::Bf16 => MMA_THREADS,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kernel {
    Forward,
    Dkv,
    Dq,
    /// dk, dv and dq in one pass (bf16 family; `CudaBackend::with_fused_attention_backward`).
    Fused,
}

pub(super) fn check_shape(s: &AttnShape) {
    assert!(
        s.heads > 0 && s.channels.is_multiple_of(s.heads),
        "attention: channels must divide into heads"
    );
    assert!(
        s.head_dim() <= MAX_HEAD_DIM,
        "attention: head dim {} exceeds the CUDA kernels' maximum {MAX_HEAD_DIM}",
        s.head_dim()
    );
    assert!(
        !s.causal || s.q_len == s.kv_len,
        "attention: causal attention needs Tq == Tk"
    );
    assert!(
        s.heads <= 65535 && s.batch <= 65535,
        "attention: heads and batch must fit a grid dim"
    );
    // Row strides, lengths and counts travel as i32 (element offsets are computed in 64 bits).
    assert!(
        3 * s.channels <= i32::MAX as usize && s.q_len.max(s.kv_len) <= i32::MAX as usize,
        "attention: shape {s:?} too large for the kernels' 32-bit fields"
    );
}

/// Whether this backend's attention runs the bf16 tensor-core family, the only one that takes
/// bf16 activation buffers (so the backend hands out bf16 activations only then).
pub(crate) fn bf16_family(be: &CudaBackend) -> bool {
    Family::of(be) == Family::Bf16
}

/// Whether the source is bf16 (activation buffers); q and kv must agree.
fn src_is_bf16(src: &QkvSource<CudaView<'_>>) -> bool {
    match src {
        QkvSource::Packed(qkv) => qkv.is_bf16(),
        QkvSource::Split { q, kv } => {
            assert_eq!(q.is_bf16(), kv.is_bf16(), "attention: q and kv must both be bf16 or both f32");
            q.is_bf16()
        }
    }
}

/// Checks that a buffer has the source's element type, and that the family can read it.
#[track_caller]
pub(super) fn check_io(be: &CudaBackend, io_bf16: bool, bf16: bool, what: &str) {
    assert_eq!(bf16, io_bf16, "attention: {what} must have the element type of q, k, v (bf16 or f32)");
    assert!(!io_bf16 || bf16_family(be), "attention: bf16 buffers need the bf16 kernels (bf16 matmuls, sm_80+)");
}

/// Whether column pairs may move as 4-byte accesses: bf16 buffers (io_bf16) whose pointers are
/// 4-byte aligned, with even row strides, column offsets and channels (the head offsets h*hd
/// are then even when hd is; an odd hd takes the single-element path for its last column).
fn pairs_allowed(p: &Params, ptrs: &[u64]) -> bool {
    let even = [p.q_ld, p.q_off, p.k_ld, p.k_off, p.v_ld, p.v_off, p.channels, p.hd].iter().all(|x| x % 2 == 0);
    p.io_bf16 != 0 && even && ptrs.iter().all(|x| x % 4 == 0)
}

/// Kernel parameters and the (q, kv) pointers of a source, after checking its lengths.
pub(super) fn params(s: &AttnShape, src: &QkvSource<CudaView<'_>>, key_lens: u64) -> (Params, u64, u64) {
    let c = s.channels;
    let io_bf16 = src_is_bf16(src);
    // Queries always start at column 0 of their rows.
    let (q_ld, k_ld, k_off, v_ld, v_off, q, kv) = match src {
        QkvSource::Packed(qkv) => {
            assert_eq!(
                s.q_len, s.kv_len,
                "attention: self-attention needs Tq == Tk"
            );
            assert_eq!(qkv.len, s.batch * s.q_len * 3 * c, "attention qkv (B,T,3C)");
            (3 * c, 3 * c, c, 3 * c, 2 * c, qkv.addr(), qkv.addr())
        }
        QkvSource::Split { q, kv } => {
            assert_eq!(q.len, s.batch * s.q_len * c, "attention q (B,Tq,C)");
            assert_eq!(kv.len, s.batch * s.kv_len * 2 * c, "attention kv (B,Tk,2C)");
            (c, 2 * c, 0, 2 * c, c, q.addr(), kv.addr())
        }
    };
    let hd = s.head_dim();
    let p = Params {
        batch: s.batch as i32,
        tq: s.q_len as i32,
        tk: s.kv_len as i32,
        channels: c as i32,
        heads: s.heads as i32,
        hd: hd as i32,
        q_ld: q_ld as i32,
        q_off: 0,
        k_ld: k_ld as i32,
        k_off: k_off as i32,
        v_ld: v_ld as i32,
        v_off: v_off as i32,
        causal: s.causal as i32,
        scale: 1.0 / (hd as f32).sqrt(),
        accumulate: 1,
        io_bf16: io_bf16 as i32,
        pairs: 0,
        direct: 0,
        key_lens,
        bias_partial: 0,
    };
    (p, q, kv)
}

/// Launches one tiled kernel over `rows` tile rows (queries or keys) with pointer args `ptrs`.
fn launch_tiled(
    be: &CudaBackend,
    kernel: Kernel,
    s: &AttnShape,
    rows: usize,
    ptrs: &[u64],
    p: &Params,
) {
    let (suffix, w) = bucket(s.head_dim());
    let family = Family::of(be);
    let wgmma = uses_wgmma(be, family, kernel);
    let tag = if wgmma { "wgmma" } else { family.tag() };
    let name = match kernel {
        Kernel::Forward => format!("attention_forward_{tag}_{suffix}"),
        Kernel::Dkv => format!("attention_backward_dkv_{tag}_{suffix}"),
        Kernel::Dq => format!("attention_backward_dq_{tag}_{suffix}"),
        Kernel::Fused => format!("attention_backward_fused_{tag}_{suffix}"),
    };
    let f = be.func(&name);
    let smem = smem_bytes(family, kernel, w, dq_by_bulk_reductions(be), wgmma);
    // Above 48 KiB a kernel must opt in to its dynamic shared memory (per function, cheap).
    be.check(
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        ),
        &format!("{name}: raising dynamic shared memory to {smem} bytes"),
    );
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(TILE) as u32, s.heads as u32, s.batch as u32),
        block_dim: (family.threads(), 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = be.stream().launch_builder(&f);
    for ptr in ptrs {
        b.arg(ptr);
    }
    b.arg(p);
    // SAFETY: the pointer arguments match the kernel's parameter list (checked by the callers'
    // length asserts against the shape in `p`), and the kernels touch only rows < Tq / Tk and
    // columns < hd of those buffers.
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), &name);
}

/// out (B,Tq,C) and saved lse (B,H,Tq).
pub(crate) fn forward(
    be: &CudaBackend,
    out: CudaViewMut<'_>,
    saved: CudaViewMut<'_>,
    src: QkvSource<CudaView<'_>>,
    shape: AttnShape,
) {
    forward_masked(be, out, saved, src, None, shape)
}

/// Device pointer of a key-length vector after checking its length, or 0 for none.
pub(super) fn key_lens_ptr(be: &CudaBackend, key_lens: Option<&CudaIds>, s: &AttnShape) -> u64 {
    match key_lens {
        None => 0,
        Some(lens) => {
            assert_eq!(lens.len(), s.batch, "attention key_lens (B)");
            be.ids_ptr(lens)
        }
    }
}

/// [`forward`] with an optional key padding mask: for batch entry b, keys j >= `key_lens[b]`
/// are invisible (`key_lens` (B), each in 1..=Tk, as `Backend::attention_ex_forward` says).
pub(crate) fn forward_masked(
    be: &CudaBackend,
    out: CudaViewMut<'_>,
    saved: CudaViewMut<'_>,
    src: QkvSource<CudaView<'_>>,
    key_lens: Option<&CudaIds>,
    shape: AttnShape,
) {
    check_shape(&shape);
    let (p, q, kv) = params(&shape, &src, key_lens_ptr(be, key_lens, &shape));
    check_io(be, p.io_bf16 != 0, out.is_bf16(), "out");
    assert_eq!(
        out.len,
        shape.batch * shape.q_len * shape.channels,
        "attention out (B,Tq,C)"
    );
    assert_eq!(saved.len, saved_len(be, shape), "attention saved state");
    if shape.batch == 0 || shape.q_len == 0 {
        return;
    }
    assert!(shape.kv_len > 0, "attention: no keys to attend to");
    if Family::of(be) == Family::Bf16 {
        let mut p = p;
        p.pairs = pairs_allowed(&p, &[out.addr(), q, kv]) as i32;
        let base = saved.ptr();
        // The copies the backward pass will look for are made whether or not this pass reads
        // them (it reads in place when it can).
        let saved_copies = copies_saved(be, shape).then(|| {
            assert!(base.is_multiple_of(16), "attention saved state must start 16-byte aligned");
            let at = Bf16Saved::of(shape);
            let heads = HeadCopies { q: base + 4 * at.q_at as u64, k: base + 4 * at.k_at as u64, v: base + 4 * at.v_at as u64 };
            heads.fill(be, &p, &shape, q, kv);
            heads
        });
        if direct_allowed(&p, &[q, kv]) {
            p.direct = 1;
            launch_tiled(be, Kernel::Forward, &shape, shape.q_len, &[out.addr(), base, q, kv, kv], &p);
        } else if let Some(heads) = saved_copies {
            launch_tiled(be, Kernel::Forward, &shape, shape.q_len, &[out.addr(), base, heads.q, heads.k, heads.v], &p);
        } else {
            let Some((_scratch, heads)) = HeadCopies::temporary(be, &shape) else { return };
            heads.fill(be, &p, &shape, q, kv);
            launch_tiled(be, Kernel::Forward, &shape, shape.q_len, &[out.addr(), base, heads.q, heads.k, heads.v], &p);
        }
        return;
    }
    launch_tiled(
        be,
        Kernel::Forward,
        &shape,
        shape.q_len,
        &[out.ptr(), saved.ptr(), q, kv],
        &p,
    );
}

/// Accumulates dq, dk, dv into `dsrc` (laid out like `src`), or with `accumulate` false
/// writes them over whatever it held.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    be: &CudaBackend,
    dsrc: QkvSource<CudaViewMut<'_>>,
    dout: CudaView<'_>,
    src: QkvSource<CudaView<'_>>,
    out: CudaView<'_>,
    saved: CudaView<'_>,
    shape: AttnShape,
    accumulate: bool,
) {
    backward_with(be, dsrc, dout, src, out, saved, None, shape, accumulate, 0)
}

/// [`backward`] overwriting dqkv, and the qkv projection's bias gradient `dbias (3C) +=` the
/// column sums of dqkv, summed by the gradient passes as they store it (attention_mma.cuh
/// `add_bias_partial`: per 64-row chunk, then colsum's `finish`; bitwise the column-sum pass
/// the projection's backward would make over dqkv, without reading its 75 MB per GPT-2 layer
/// again), where the kernels can: the switch (`SMELT_FUSED_QKV_BIAS`), the bf16 family, packed
/// self-attention whose T is a multiple of 64 (a block's rows are one chunk), not the fused
/// backward. False, having done nothing, otherwise.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_set_with_bias(
    be: &CudaBackend,
    dsrc: QkvSource<CudaViewMut<'_>>,
    dbias: CudaViewMut<'_>,
    dout: CudaView<'_>,
    src: QkvSource<CudaView<'_>>,
    out: CudaView<'_>,
    saved: CudaView<'_>,
    shape: AttnShape,
) -> bool {
    const { assert!(crate::cpu::ROWS_PER_TASK == TILE, "a block's 64 rows must be one column-sum chunk") };
    let packed = matches!((&dsrc, &src), (QkvSource::Packed(_), QkvSource::Packed(_)));
    let able = be.tuning().fused_qkv_bias
        && Family::of(be) == Family::Bf16
        && !be.fused_attention_backward()
        && packed
        && shape.batch > 0
        && shape.q_len > 0
        && shape.q_len.is_multiple_of(TILE);
    if !able {
        return false;
    }
    let cols = 3 * shape.channels;
    assert_eq!(dbias.len, cols, "attention dbias (3C): {} floats", dbias.len);
    let rows = shape.batch * shape.q_len;
    // every (chunk, column) is written by one block of the dkv (k, v) or dq (q) pass
    let (partial_buf, partial) = colsum::scratch(be, rows, cols);
    backward_with(be, dsrc, dout, src, out, saved, None, shape, false, partial);
    colsum::finish(be, dbias.ptr(), partial, rows, cols);
    drop(partial_buf);
    true
}

/// [`backward`] with the key padding mask the forward pass used (keys past `key_lens[b]` get
/// no gradient: nothing added, or zeros written when `accumulate` is false).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_masked(
    be: &CudaBackend,
    dsrc: QkvSource<CudaViewMut<'_>>,
    dout: CudaView<'_>,
    src: QkvSource<CudaView<'_>>,
    out: CudaView<'_>,
    saved: CudaView<'_>,
    key_lens: Option<&CudaIds>,
    shape: AttnShape,
    accumulate: bool,
) {
    backward_with(be, dsrc, dout, src, out, saved, key_lens, shape, accumulate, 0)
}

/// The (dq, dkv) pointers of a gradient laid out like its source, after checking their lengths
/// and element types against the source's (`p.io_bf16`).
pub(super) fn gradient_pointers(be: &CudaBackend, p: &Params, dsrc: &QkvSource<CudaViewMut<'_>>, src: &QkvSource<CudaView<'_>>, shape: &AttnShape) -> (u64, u64) {
    match (dsrc, src) {
        (QkvSource::Packed(d), QkvSource::Packed(_)) => {
            assert_eq!(
                d.len,
                shape.batch * shape.q_len * 3 * shape.channels,
                "attention dqkv (B,T,3C)"
            );
            check_io(be, p.io_bf16 != 0, d.is_bf16(), "dqkv");
            (d.addr(), d.addr())
        }
        (QkvSource::Split { q: dq, kv: dkv }, QkvSource::Split { .. }) => {
            assert_eq!(
                dq.len,
                shape.batch * shape.q_len * shape.channels,
                "attention dq (B,Tq,C)"
            );
            assert_eq!(
                dkv.len,
                shape.batch * shape.kv_len * 2 * shape.channels,
                "attention dkv (B,Tk,2C)"
            );
            check_io(be, p.io_bf16 != 0, dq.is_bf16(), "dq");
            check_io(be, p.io_bf16 != 0, dkv.is_bf16(), "dkv");
            (dq.addr(), dkv.addr())
        }
        _ => panic!("attention backward: dsrc and src must both be packed or both split"),
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_with(
    be: &CudaBackend,
    dsrc: QkvSource<CudaViewMut<'_>>,
    dout: CudaView<'_>,
    src: QkvSource<CudaView<'_>>,
    out: CudaView<'_>,
    saved: CudaView<'_>,
    key_lens: Option<&CudaIds>,
    shape: AttnShape,
    accumulate: bool,
    bias_partial: u64,
) {
    check_shape(&shape);
    let (mut p, q, kv) = params(&shape, &src, key_lens_ptr(be, key_lens, &shape));
    p.accumulate = accumulate as i32;
    p.bias_partial = bias_partial;
    let (dq, dkv) = gradient_pointers(be, &p, &dsrc, &src, &shape);
    let n_out = shape.batch * shape.q_len * shape.channels;
    assert_eq!(dout.len, n_out, "attention dout (B,Tq,C)");
    assert_eq!(out.len, n_out, "attention out (B,Tq,C)");
    assert_eq!(saved.len, saved_len(be, shape), "attention saved state");
    if shape.batch == 0 || shape.q_len == 0 {
        return;
    }
    assert!(shape.kv_len > 0, "attention: no keys to attend to");
    check_io(be, p.io_bf16 != 0, dout.is_bf16(), "dout");
    check_io(be, p.io_bf16 != 0, out.is_bf16(), "out");
    if Family::of(be) == Family::Bf16 {
        p.pairs = pairs_allowed(&p, &[dq, dkv, dout.addr(), out.addr(), q, kv]) as i32;
        p.direct = direct_allowed(&p, &[q, kv, dout.addr(), out.addr()]) as i32;
        backward_bf16(be, &shape, &p, dq, (q, kv), dkv, dout.addr(), out.addr(), saved.ptr());
        return;
    }

    // D (B,H,Tq): scratch for this call only; freed stream-ordered after the kernels that read it.
    let rows = lse_len(shape);
    // SAFETY: every element is written by attention_backward_dot_f32 before anything reads it.
    let Some(dsum) = (unsafe { scratch::<f32>(be, rows, "attention backward: allocating D (B,H,Tq)") }) else { return };
    let dsum_ptr = be.buf_ptr(&dsum);
    {
        let name = "attention_backward_dot_f32";
        let f = be.func(name);
        let warps_per_block = THREADS as usize / 32;
        let cfg = blocks_of_threads(rows.div_ceil(warps_per_block));
        let mut b = be.stream().launch_builder(&f);
        b.arg(&dsum_ptr).arg(dout.ptr_ref()).arg(out.ptr_ref()).arg(&p);
        // SAFETY: dsum holds B*H*Tq floats, dout and out B*Tq*C (asserted above).
        be.check(unsafe { b.launch(cfg) }.map(|_| ()), name);
    }
    let lse = saved.ptr();
    launch_tiled(
        be,
        Kernel::Dkv,
        &shape,
        shape.kv_len,
        &[dkv, q, kv, dout.ptr(), lse, dsum_ptr],
        &p,
    );
    launch_tiled(
        be,
        Kernel::Dq,
        &shape,
        shape.q_len,
        &[dq, q, kv, dout.ptr(), lse, dsum_ptr],
        &p,
    );
    drop(dsum);
}

/// Uninitialised device memory for one call, freed in stream order when dropped (after the
/// kernels queued before then); None after recording the failure as `what`.
///
/// # Safety
/// The caller writes every element before a kernel reads it.
pub(super) unsafe fn scratch<T: DeviceRepr>(be: &CudaBackend, len: usize, what: &str) -> Option<CudaSlice<T>> {
    // SAFETY: uninitialised memory; the caller's contract says it is written before it is read.
    match unsafe { be.stream().alloc::<T>(len) } {
        Ok(buf) => Some(buf),
        Err(e) => {
            be.check(Err(e), what);
            None
        }
    }
}

/// A 1-D grid of `blocks` blocks of `THREADS` threads (the row and element kernels).
fn blocks_of_threads(blocks: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// dst (B, H, Tpad, w) bf16: the head columns of a strided (B, rows, ld) matrix (f32, or bf16
/// when `p.io_bf16`).
#[allow(clippy::too_many_arguments)]
fn heads_bf16(be: &CudaBackend, p: &Params, dst: u64, src: u64, rows: usize, ld: i32, off: i32, w: usize) {
    let name = "attention_heads_bf16";
    let f = be.func(name);
    let pairs = p.batch as usize * p.heads as usize * rows.div_ceil(TILE) * TILE * w / 2;
    let cfg = blocks_of_threads(pairs.div_ceil(THREADS as usize));
    let (rows, w) = (rows as i32, w as i32);
    let mut b = be.stream().launch_builder(&f);
    b.arg(&dst).arg(&src).arg(&rows).arg(&ld).arg(&off).arg(&w).arg(p);
    // SAFETY: dst holds B*H*Tpad*w bf16 (the callers' layouts); src rows < `rows` of stride ld
    // hold the head columns off + h*hd (checked against the shape by the callers).
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), name);
}

/// Head-major bf16 copies (B, H, Tpad, W) of q, k and v (device pointers), for calls whose
/// buffers the kernels cannot read in place.
#[derive(Clone, Copy)]
struct HeadCopies {
    q: u64,
    k: u64,
    v: u64,
}

impl HeadCopies {
    /// Copies in a scratch allocation for this call only (freed in stream order when the
    /// returned slice drops, after the kernels queued before then). None if it cannot be
    /// allocated (the error is recorded).
    fn temporary(be: &CudaBackend, s: &AttnShape) -> Option<(CudaSlice<u16>, HeadCopies)> {
        let at = Bf16Saved::of(*s);
        let (qn, kn) = (s.batch * s.heads * at.tq_pad * at.w, s.batch * s.heads * at.tk_pad * at.w);
        // SAFETY: `fill` writes every element (padding included) before a kernel reads them.
        let buf = unsafe { scratch::<u16>(be, qn + 2 * kn, "attention: allocating head-major bf16 copies of q, k, v") }?;
        let base = buf.device_ptr(be.stream()).0;
        // each copy starts on a 16-byte boundary: qn and kn are multiples of 64 * 32
        let heads = HeadCopies { q: base, k: base + 2 * qn as u64, v: base + 2 * (qn + kn) as u64 };
        Some((buf, heads))
    }

    /// Writes the copies from the source's q and kv buffers (`params`).
    fn fill(&self, be: &CudaBackend, p: &Params, s: &AttnShape, q: u64, kv: u64) {
        let w = Bf16Saved::of(*s).w;
        heads_bf16(be, p, self.q, q, s.q_len, p.q_ld, p.q_off, w);
        heads_bf16(be, p, self.k, kv, s.kv_len, p.k_ld, p.k_off, w);
        heads_bf16(be, p, self.v, kv, s.kv_len, p.v_ld, p.v_off, w);
    }
}

/// Backward of the bf16 kernels (attention_mma_backward.cu): with `p.direct` the passes read q, k, v and
/// dout in place; else q, k and v come from the forward pass's copies in `saved` (or fresh
/// temporary ones when it kept none) and dout is copied likewise. Each row's (lse log2 e, D) is
/// computed first, then the dkv and dq passes read their tiles by cp.async.
#[allow(clippy::too_many_arguments)]
fn backward_bf16(be: &CudaBackend, s: &AttnShape, p: &Params, dq: u64, (q, kv): (u64, u64), dkv: u64, dout: u64, out: u64, saved: u64) {
    let at = Bf16Saved::of(*s);
    let bh = s.batch * s.heads;
    // Scratch for this call only, freed in stream order after the kernels that read it.
    // SAFETY: attention_backward_stats writes every (lse, D) pair before the passes read them.
    let Some(stats) = (unsafe { scratch::<f32>(be, 2 * bh * at.tq_pad, "attention backward: allocating the row stats") }) else { return };
    let stats_ptr = be.buf_ptr(&stats);
    {
        // direct: hd/8 lanes per row, 16-byte loads; else a warp per row
        let rows = bh * at.tq_pad;
        let (name, cfg) = if p.direct != 0 {
            let (suffix, w) = bucket(s.head_dim());
            (format!("attention_backward_stats_vec_{suffix}"), blocks_of_threads((rows * w / 8).div_ceil(THREADS as usize)))
        } else {
            ("attention_backward_stats".to_string(), blocks_of_threads(rows.div_ceil(THREADS as usize / 32)))
        };
        let f = be.func(&name);
        let mut b = be.stream().launch_builder(&f);
        b.arg(&stats_ptr).arg(&dout).arg(&out).arg(&saved).arg(p);
        // SAFETY: stats holds B*H*Tqpad pairs; dout and out B*Tq*C (16-byte aligned rows for the
        // _vec kernels: direct_allowed), the lse at the start of saved B*H*Tq (asserted by the
        // caller).
        be.check(unsafe { b.launch(cfg) }.map(|_| ()), &name);
    }
    if p.direct != 0 {
        gradient_passes(be, s, p, (dq, dkv), [q, kv, kv, dout], stats_ptr);
        drop(stats);
        return;
    }
    let mut temporary = None;
    let heads = if copies_saved(be, *s) {
        HeadCopies { q: saved + 4 * at.q_at as u64, k: saved + 4 * at.k_at as u64, v: saved + 4 * at.v_at as u64 }
    } else {
        let Some((scratch, heads)) = HeadCopies::temporary(be, s) else { return };
        heads.fill(be, p, s, q, kv);
        temporary = Some(scratch);
        heads
    };
    // SAFETY: attention_heads_bf16 writes every element (padding included) before the passes.
    let Some(doh) = (unsafe { scratch::<u16>(be, bh * at.tq_pad * at.w, "attention backward: allocating the bf16 copy of dout") }) else { return };
    let doh_ptr = doh.device_ptr(be.stream()).0;
    heads_bf16(be, p, doh_ptr, dout, s.q_len, s.channels as i32, 0, at.w);
    gradient_passes(be, s, p, (dq, dkv), [heads.q, heads.k, heads.v, doh_ptr], stats_ptr);
    drop((doh, stats, temporary));
}

/// The bf16 family's gradient passes over the tile pairs, reading q, k, v and dout from `src`:
/// the dkv pass then the dq pass, each recomputing the scores and dP (7 products per tile pair);
/// or, with `CudaBackend::fused_attention_backward`, one pass for all three (5 products) that
/// adds dq into a zeroed f32 scratch (bulk reductions on sm_90, else vector atomics), then
/// `attention_dq_from_acc` into dq.
fn gradient_passes(be: &CudaBackend, s: &AttnShape, p: &Params, (dq, dkv): (u64, u64), src: [u64; 4], stats: u64) {
    let [q, k, v, dout] = src;
    if !be.fused_attention_backward() {
        launch_tiled(be, Kernel::Dkv, s, s.kv_len, &[dkv, q, k, v, dout, stats], p);
        launch_tiled(be, Kernel::Dq, s, s.q_len, &[dq, q, k, v, dout, stats], p);
        return;
    }
    let at = Bf16Saved::of(*s);
    let len = s.batch * s.heads * at.tq_pad * at.w;
    // SAFETY: zeroed below before the fused pass adds into it.
    let Some(mut acc) = (unsafe { scratch::<f32>(be, len, "attention backward: allocating the dq accumulator") }) else { return };
    be.check(be.stream().memset_zeros(&mut acc), "attention backward: zeroing the dq accumulator");
    let acc_ptr = be.buf_ptr(&acc);
    launch_tiled(be, Kernel::Fused, s, s.kv_len, &[dkv, acc_ptr, q, k, v, dout, stats], p);
    let name = "attention_dq_from_acc";
    let f = be.func(name);
    let pairs = s.batch * s.q_len * s.heads * s.head_dim().div_ceil(2);
    let w = at.w as i32;
    let mut b = be.stream().launch_builder(&f);
    b.arg(&dq).arg(&acc_ptr).arg(&w).arg(p);
    // SAFETY: acc holds (B, H, Tqpad, W) floats; the kernel writes the q columns (< hd) of rows
    // < Tq of dq, whose extent the caller asserted.
    be.check(unsafe { b.launch(blocks_of_threads(pairs.div_ceil(THREADS as usize))) }.map(|_| ()), name);
    drop(acc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_kernels_need_sm80() {
        assert!(has_bf16_mma("sm_90") && has_bf16_mma("sm_80") && has_bf16_mma("sm_100"));
        assert!(!has_bf16_mma("sm_75") && !has_bf16_mma("sm_70") && !has_bf16_mma("garbage"));
    }

    #[test]
    fn bf16_saved_state_layout() {
        // GPT-2 124M at B16 T1024: 12 heads of 64.
        let s = AttnShape { batch: 16, heads: 12, channels: 768, q_len: 1024, kv_len: 1024, causal: true };
        let at = Bf16Saved::of(s);
        let lse = 16 * 12 * 1024;
        let copy = 16 * 12 * 1024 * 64 / 2; // bf16 pairs per f32
        assert_eq!((at.w, at.tq_pad, at.tk_pad), (64, 1024, 1024));
        assert_eq!((at.q_at, at.k_at, at.v_at, at.len), (lse, lse + copy, lse + 2 * copy, lse + 3 * copy));
        // Odd lengths: rows rounded to the tile, the lse region to 16 bytes, hd 40 -> W 64.
        let s = AttnShape { batch: 3, heads: 3, channels: 120, q_len: 33, kv_len: 77, causal: false };
        let at = Bf16Saved::of(s);
        assert_eq!((at.w, at.tq_pad, at.tk_pad), (64, 64, 128));
        assert_eq!(at.q_at, (3 * 3 * 33usize).div_ceil(4) * 4);
        for off in [at.q_at, at.k_at, at.v_at] {
            assert_eq!(off % 4, 0, "copies start 16-byte aligned");
        }
        assert_eq!(at.k_at - at.q_at, 9 * 64 * 64 / 2);
        assert_eq!(at.len - at.v_at, 9 * 128 * 64 / 2);
    }

    #[test]
    fn buckets_cover_head_dims() {
        assert_eq!(bucket(1), ("d32", 32));
        assert_eq!(bucket(32), ("d32", 32));
        assert_eq!(bucket(33), ("d64", 64));
        assert_eq!(bucket(64), ("d64", 64));
        assert_eq!(bucket(65), ("d128", 128));
        assert_eq!(bucket(128), ("d128", 128));
    }

    #[test]
    fn shared_memory_fits_an_h100_and_an_a100() {
        // sm_80 allows 163 KiB of opt-in shared memory per block, sm_90 227 KiB.
        for f in [Family::F32, Family::Bf16] {
            for k in [Kernel::Forward, Kernel::Dkv, Kernel::Dq] {
                let bytes = smem_bytes(f, k, 128, true, false);
                assert!(bytes <= 166_912, "{f:?} {k:?}: {bytes}");
            }
        }
        let fused = smem_bytes(Family::Bf16, Kernel::Fused, 128, true, false);
        assert!(fused <= 166_912, "Bf16 Fused: {fused}");
        // the dkv pass's layout plus the (64, 72) dS^T tile, at GPT-2's head dim, and with bulk
        // reductions each warp's (16, 72) f32 staging: 82 KiB, two blocks per SM on an H100
        let dkv = smem_bytes(Family::Bf16, Kernel::Dkv, 64, true, false);
        assert_eq!(smem_bytes(Family::Bf16, Kernel::Fused, 64, true, false), dkv + 2 * 64 * 72 + 4 * 4 * 16 * 72);
        assert_eq!(smem_bytes(Family::Bf16, Kernel::Fused, 64, true, false), 83_968);
        // without them 64 KiB, two blocks per SM on an A100 too
        assert_eq!(smem_bytes(Family::Bf16, Kernel::Fused, 64, false, false), dkv + 2 * 64 * 72);
        assert!(2 * (smem_bytes(Family::Bf16, Kernel::Fused, 64, false, false) + 1024) <= 167_936);
        assert_eq!(
            smem_bytes(Family::F32, Kernel::Forward, 64, true, false),
            4 * (3 * 64 * 65 + 64 * 65)
        );
        assert_eq!(
            smem_bytes(Family::Bf16, Kernel::Forward, 64, true, false),
            2 * (5 * 64 * 72)
        );
        // the wgmma kernels' unpadded (64, W) tiles: at W = 128 the dkv and dq passes fit, and
        // at GPT-2's W = 64 the forward's 40 KiB leave room for 4 blocks per SM on an H100
        for k in [Kernel::Forward, Kernel::Dkv, Kernel::Dq] {
            let bytes = smem_bytes(Family::Bf16, k, 128, true, true);
            assert!(bytes <= 232_448 && bytes < smem_bytes(Family::Bf16, k, 128, true, false), "wgmma {k:?}: {bytes}");
        }
        assert_eq!(smem_bytes(Family::Bf16, Kernel::Forward, 64, true, true), 2 * (5 * 64 * 64));
        assert_eq!(smem_bytes(Family::Bf16, Kernel::Dkv, 64, true, true), 2 * (6 * 64 * 64) + 4 * 4 * 64);
        assert!(4 * (smem_bytes(Family::Bf16, Kernel::Forward, 64, true, true) + 1024) <= 233_472);
    }

    #[test]
    fn kernel_names_exist_in_the_source() {
        let names = crate::cuda::kernels::kernel_names(crate::cuda::kernels::ATTENTION_SOURCE);
        for tag in ["f32", "bf16", "wgmma"] {
            for suffix in ["d32", "d64", "d128"] {
                let fused = if tag == "bf16" { &["backward_fused"][..] } else { &[] };
                for k in ["forward", "backward_dkv", "backward_dq"].iter().chain(fused) {
                    let name = format!("attention_{k}_{tag}_{suffix}");
                    assert!(
                        names.contains(&name),
                        "{name} missing from the attention module: {names:?}"
                    );
                }
            }
        }
        assert!(names.contains(&"attention_backward_dot_f32".to_string()));
        for name in ["attention_heads_bf16", "attention_dq_from_acc", "attention_backward_stats", "attention_backward_stats_vec_d32", "attention_backward_stats_vec_d64", "attention_backward_stats_vec_d128"] {
            assert!(names.contains(&name.to_string()), "{name} missing from the attention module");
        }
    }
}
