//! Embedding lookup and its backward.
//!
//! The backward is deterministic and bitwise equal to the CPU's: the ids are read back (N u32,
//! one small synchronous copy), grouped on the host by id in increasing position, and one thread
//! per (distinct id, column) adds that id's rows in position order. Atomics would avoid the
//! read-back but make the sums depend on scheduling.

use cudarc::driver::{result, CudaSlice, LaunchConfig, PushKernelArg};

use super::memory::{elementwise_cfg, upload};
use super::view::{CudaView, CudaViewMut};
use super::CudaBackend;

/// out[n] (+)= table[ids[n]]; out (N, C), table (R, C), ids (N).
pub(crate) fn forward(
    be: &CudaBackend,
    out: CudaViewMut<'_>,
    ids: &CudaSlice<u32>,
    table: CudaView<'_>,
    c: usize,
    accumulate: bool,
) {
    let n = ids.len();
    assert!(c > 0 && table.len.is_multiple_of(c), "embedding: table of {} floats is not (R, {c})", table.len);
    assert_eq!(out.len, n * c, "embedding out: {} floats, expected (N={n}, C={c})", out.len);
    if n == 0 {
        return;
    }
    let f = be.func("embedding_forward");
    let (ids_ptr, err) = (be.ids_ptr(ids), be.err_ptr());
    let (rows, cc, table_rows, acc) = (n as u64, c as u64, (table.len / c) as u64, accumulate as i32);
    let mut b = be.stream().launch_builder(&f);
    b.arg(out.ptr_ref()).arg(&ids_ptr).arg(table.ptr_ref()).arg(&rows).arg(&cc).arg(&table_rows).arg(&acc).arg(&err);
    // SAFETY: embedding_forward(float*, const unsigned*, const float*, u64, u64, u64, int,
    // unsigned*) writes N*C floats of out and reads rows of table below table_rows.
    be.check(unsafe { b.launch(elementwise_cfg(be, n * c)) }.map(|_| ()), "embedding_forward");
}

/// Positions grouped by id: distinct ids ascending, CSR offsets, positions in increasing order.
pub(crate) struct Groups {
    pub rows: Vec<u32>,
    pub offsets: Vec<u32>,
    pub order: Vec<u32>,
}

pub(crate) fn group_by_id(ids: &[u32]) -> Groups {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    // Stable: positions of one id stay in increasing order.
    order.sort_by_key(|&n| ids[n as usize]);
    let mut rows = Vec::new();
    let mut offsets = Vec::new();
    for (k, &n) in order.iter().enumerate() {
        let id = ids[n as usize];
        if rows.last() != Some(&id) {
            rows.push(id);
            offsets.push(k as u32);
        }
    }
    offsets.push(order.len() as u32);
    Groups { rows, offsets, order }
}

/// dtable[ids[n]] += dout[n].
pub(crate) fn backward(
    be: &CudaBackend,
    dtable: CudaViewMut<'_>,
    dout: CudaView<'_>,
    ids: &CudaSlice<u32>,
    c: usize,
) {
    let n = ids.len();
    assert!(c > 0 && dtable.len.is_multiple_of(c), "embedding backward: dtable of {} floats is not (R, {c})", dtable.len);
    assert_eq!(dout.len, n * c, "embedding dout: {} floats, expected (N={n}, C={c})", dout.len);
    if n == 0 {
        return;
    }
    let mut host = vec![0u32; n];
    let stream = be.stream();
    be.check(stream.context().bind_to_thread(), "bind context");
    // SAFETY: host holds n ids, ids as many; synchronised before host is read.
    let r = unsafe { result::memcpy_dtoh_async(&mut host[..], be.ids_ptr(ids), stream.cu_stream()) };
    be.check(r, "embedding ids download");
    be.check(stream.synchronize(), "embedding ids synchronize");
    let table_rows = dtable.len / c;
    if let Some(&bad) = host.iter().find(|&&id| id as usize >= table_rows) {
        be.fail("embedding_backward", format!("id {bad} outside a table of {table_rows} rows"));
        return;
    }
    let g = group_by_id(&host);
    let (rows, offsets, order) = (upload(be, &g.rows), upload(be, &g.offsets), upload(be, &g.order));
    let f = be.func("embedding_backward_grouped");
    let (rows_p, offsets_p, order_p, cc) = (be.ids_ptr(&rows), be.ids_ptr(&offsets), be.ids_ptr(&order), c as u64);
    let mut b = stream.launch_builder(&f);
    b.arg(dtable.ptr_ref()).arg(dout.ptr_ref()).arg(&rows_p).arg(&offsets_p).arg(&order_p).arg(&cc);
    const THREADS: usize = 128;
    let cfg = LaunchConfig {
        grid_dim: (g.rows.len() as u32, c.div_ceil(THREADS) as u32, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: embedding_backward_grouped(float*, const float*, const unsigned*, const unsigned*,
    // const unsigned*, u64): every row id is below table_rows (checked above), every position
    // below N. The uploaded arrays are freed in stream order, after the kernel.
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), "embedding_backward_grouped");
}

#[cfg(test)]
mod tests {
    use super::group_by_id;

    #[test]
    fn groups_positions_by_id_in_order() {
        let g = group_by_id(&[5, 2, 5, 0, 2, 5]);
        assert_eq!(g.rows, vec![0, 2, 5]);
        assert_eq!(g.offsets, vec![0, 1, 3, 6]);
        assert_eq!(g.order, vec![3, 1, 4, 0, 2, 5]);
    }
}
