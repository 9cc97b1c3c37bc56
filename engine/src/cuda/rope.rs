//! Rotary position embedding on the GPU (kernels/rope.cu): f32 or bf16 q|k|v rows, in place.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaView, CudaViewMut};
use crate::backend::RopeShape;

pub(crate) fn rope(be: &CudaBackend, qkv: CudaViewMut<'_>, table: CudaView<'_>, s: RopeShape, inverse: bool) {
    let (c, heads) = (s.channels, s.heads);
    let half = s.head_dim() / 2;
    assert!(heads > 0 && c.is_multiple_of(heads) && s.head_dim().is_multiple_of(2), "rope: head width {c}/{heads} must be even");
    assert_eq!(qkv.len, s.rows * 3 * c, "rope: qkv holds {} values, not rows x 3C = {}", qkv.len, s.rows * 3 * c);
    assert!(!table.is_bf16(), "rope: the table is f32");
    let t_max = table.len / (2 * half);
    assert!(table.len == 2 * half * t_max && s.seq_len <= t_max, "rope: a table of {t_max} positions for sequences of {}", s.seq_len);
    if s.rows == 0 || c == 0 {
        return;
    }
    // eight pairs per thread (16-byte words) where a head's half is whole words and both
    // buffers are aligned for them: rope_bf16_x8, bitwise rope_bf16
    let tasks = s.rows as u64 * c as u64 / 8;
    let x8 = qkv.is_bf16() && half.is_multiple_of(8) && qkv.addr().is_multiple_of(16) && table.ptr().is_multiple_of(16) && tasks < 1 << 31;
    let (name, data) = match (qkv.is_bf16(), x8) {
        (true, true) => ("rope_bf16_x8", qkv.addr()),
        (true, false) => ("rope_bf16", qkv.addr()),
        _ => ("rope_f32", qkv.ptr()),
    };
    let f = be.func(name);
    let (rows, t, c32, h32, tmax, inv) = (s.rows as u64, s.seq_len as u32, c as u32, heads as u32, t_max as u32, inverse as i32);
    let table_ptr = table.ptr();
    let mut b = be.stream().launch_builder(&f);
    b.arg(&data).arg(&table_ptr).arg(&rows).arg(&t).arg(&c32).arg(&h32).arg(&tmax).arg(&inv);
    // SAFETY: rope.cu's kernels take (qkv, table, u64 rows, u32 t, u32 c, u32 n_head, u32 t_max,
    // int inverse) and touch qkv[0..rows*3C) and table[0..2*t_max*hd/2), checked above (the x8
    // kernel: hd/2 % 8 == 0, both buffers 16-byte aligned and under 2^31 tasks, checked above);
    // any grid is correct (rows block-stride, a row's pairs thread-stride; the x8 kernel's tasks
    // grid-stride): a block per row (per 256 tasks), capped.
    let wanted = if x8 { (tasks as usize).div_ceil(256) } else { s.rows };
    let blocks = wanted.min(32 * be.sm_count() as usize) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), name);
}
