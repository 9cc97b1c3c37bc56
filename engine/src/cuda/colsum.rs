//! Deterministic column sums `dst (C) += sum_n src (N, C)`: per chunk of rows (the CPU
//! reference's `ROWS_PER_TASK`) a partial from 0 in row order, then the partials added in a
//! fixed order (eight interleaved runs of chunks, then those in order) onto `dst`. The same bits
//! on every run; the CPU's chunk-order sum differs from it by rounding only.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::CudaBackend;
use crate::cpu::ROWS_PER_TASK;

pub(crate) const THREADS: u32 = 128;

/// Number of row chunks for `rows` rows.
pub(crate) fn chunks(rows: usize) -> usize {
    rows.div_ceil(ROWS_PER_TASK)
}

/// Launch shape of a per-(chunk, column) partial kernel: x = chunk, y = column block.
pub(crate) fn partial_cfg(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (chunks(rows).max(1) as u32, cols.div_ceil(THREADS as usize) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Scratch for the partials of `rows x cols`, freed in stream order after the kernels using it.
pub(crate) fn scratch(be: &CudaBackend, rows: usize, cols: usize) -> (CudaSlice<f32>, u64) {
    let len = chunks(rows).max(1) * cols;
    // SAFETY: the partial kernel writes every element before column_sum_finish reads it.
    let buf = unsafe { be.stream().alloc::<f32>(len) }.unwrap_or_else(|e| {
        panic!("cuda:{}: cannot allocate {len} floats of scratch: {e:?}", be.ordinal())
    });
    let ptr = be.buf_ptr(&buf);
    (buf, ptr)
}

/// `dst[c] += partial[0, c] + partial[1, c] + ...` (in the fixed order of column_sum_finish).
pub(crate) fn finish(be: &CudaBackend, dst: u64, partial: u64, rows: usize, cols: usize) {
    let f = be.func("column_sum_finish");
    let (k, c) = (chunks(rows) as u64, cols as u64);
    let mut b = be.stream().launch_builder(&f);
    b.arg(&dst).arg(&partial).arg(&k).arg(&c);
    // 32 columns per block of 8 warps (see column_sum_finish in bias.cu)
    let cfg = LaunchConfig { grid_dim: (cols.div_ceil(32) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 8 * 32 * 4 };
    // SAFETY: column_sum_finish(float*, const float*, u64, u64) reads k*c partials, rewrites c.
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), "column_sum_finish");
}

/// `finish` for two gradients of the same shape (LayerNorm's weight and bias) in one launch, each
/// summed as `finish` sums it.
pub(crate) fn finish2(be: &CudaBackend, (dst0, partial0): (u64, u64), (dst1, partial1): (u64, u64), rows: usize, cols: usize) {
    let f = be.func("column_sum_finish2");
    let (k, c) = (chunks(rows) as u64, cols as u64);
    let mut b = be.stream().launch_builder(&f);
    b.arg(&dst0).arg(&partial0).arg(&dst1).arg(&partial1).arg(&k).arg(&c);
    let cfg = LaunchConfig { grid_dim: (cols.div_ceil(32) as u32, 2, 1), block_dim: (256, 1, 1), shared_mem_bytes: 8 * 32 * 4 };
    // SAFETY: column_sum_finish2(float*, const float*, float*, const float*, u64, u64) reads k*c
    // partials of each pair and rewrites the c values of its dst.
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), "column_sum_finish2");
}

/// `dst (cols) += sum over rows of src (rows, cols)`; `src_bf16`: src holds bf16 (summed in f32).
pub(crate) fn add_column_sums(be: &CudaBackend, dst: u64, src: u64, src_bf16: bool, rows: usize, cols: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    let (_scratch, partial) = scratch(be, rows, cols);
    // four columns per thread when every row starts on a 16-byte (f32) / 8-byte (bf16) boundary
    // (the scratch is a fresh allocation: aligned); same sums, bitwise
    let elem = if src_bf16 { 2 } else { 4 };
    let x4 = cols.is_multiple_of(4) && src.is_multiple_of(4 * elem);
    let name = match (src_bf16, x4) {
        (false, false) => "column_sum_partial",
        (true, false) => "column_sum_partial_bf16",
        (false, true) => "column_sum_partial_x4",
        (true, true) => "column_sum_partial_bf16_x4",
    };
    let f = be.func(name);
    let (n, c, per) = (rows as u64, cols as u64, ROWS_PER_TASK as u64);
    let mut b = be.stream().launch_builder(&f);
    b.arg(&partial).arg(&src).arg(&n).arg(&c).arg(&per);
    let cfg = if x4 { partial_cfg(rows, cols.div_ceil(4)) } else { partial_cfg(rows, cols) };
    // SAFETY: column_sum_partial[_bf16][_x4](float*, const float* or const unsigned short*, u64,
    // u64, u64) reads rows*cols elements of src and writes chunks*cols partials (the _x4 ones
    // four columns per thread: cols % 4 == 0 and src aligned, checked above).
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), name);
    finish(be, dst, partial, rows, cols);
}
