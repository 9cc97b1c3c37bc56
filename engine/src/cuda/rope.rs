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
    let (name, data) = if qkv.is_bf16() { ("rope_bf16", qkv.addr()) } else { ("rope_f32", qkv.ptr()) };
    let f = be.func(name);
    let (rows, t, c32, h32, tmax, inv) = (s.rows as u64, s.seq_len as u32, c as u32, heads as u32, t_max as u32, inverse as i32);
    let table_ptr = table.ptr();
    let mut b = be.stream().launch_builder(&f);
    b.arg(&data).arg(&table_ptr).arg(&rows).arg(&t).arg(&c32).arg(&h32).arg(&tmax).arg(&inv);
    // SAFETY: rope.cu's kernels take (qkv, table, u64 rows, u32 t, u32 c, u32 n_head, u32 t_max,
    // int inverse) and touch qkv[0..rows*3C) and table[0..2*t_max*hd/2), checked above; any
    // grid is correct (rows block-stride, a row's pairs thread-stride): a block per row, capped.
    let blocks = s.rows.min(32 * be.sm_count() as usize) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), name);
}
