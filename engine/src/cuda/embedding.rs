//! Embedding lookup and its backward.
//!
//! The backward is deterministic: the ids are grouped on the host by id in increasing position,
//! from the host copy kept with them at upload (ids.rs: no read-back, so no stream
//! synchronisation). A group of at most [`SEG`] positions (every
//! id of a token or position table in practice) is summed by one thread per (id, column) onto
//! dtable in position order: bitwise the CPU's sequential loop. A longer group (a segment table:
//! 2 ids over all N positions) would make those threads loop N/2 times in a launch of a few
//! blocks, so it is split into segments of SEG positions: one thread per (segment, column) sums
//! its rows from 0 into a partial, then one per (id, column) adds the partials onto dtable in
//! segment order. Still deterministic, but it differs from the CPU's sum by rounding (the
//! partials are `dtable + (d0 + .. + d63) + (d64 + ..)`, not `((dtable + d0) + d1) + ..`).
//! Atomics would avoid the grouping but make the sums depend on scheduling.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::memory::{elementwise_cfg, upload};
use super::view::{CudaView, CudaViewMut};
use super::{CudaBackend, CudaIds};

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

/// Most positions one thread sums in a row: groups longer than this are split into segments.
pub(crate) const SEG: usize = 64;

/// The segments of the groups longer than `seg`: runs of `seg` consecutive entries of `order`
/// (the last run of a group shorter). A group of at most `seg` positions has none.
pub(crate) struct Segments {
    /// (G+1) CSR over segments: group g's are [first[g], first[g+1]).
    pub first: Vec<u32>,
    /// (S) segment s covers order[start[s]..end[s]].
    pub start: Vec<u32>,
    pub end: Vec<u32>,
}

pub(crate) fn segment(offsets: &[u32], seg: usize) -> Segments {
    let mut s = Segments { first: vec![0], start: Vec::new(), end: Vec::new() };
    for w in offsets.windows(2) {
        let (begin, end) = (w[0] as usize, w[1] as usize);
        if end - begin > seg {
            for k in (begin..end).step_by(seg) {
                s.start.push(k as u32);
                s.end.push((k + seg).min(end) as u32);
            }
        }
        s.first.push(s.start.len() as u32);
    }
    s
}

/// Device addresses of the host arrays, all uploaded in one copy (each separate pageable copy
/// costs its own latency). `_packed` keeps them alive; it is freed in stream order, after the
/// kernels queued on it.
struct Plan {
    _packed: CudaSlice<u32>,
    rows: u64,
    offsets: u64,
    order: u64,
    seg_first: u64,
    seg_start: u64,
    seg_end: u64,
}

fn upload_plan(be: &CudaBackend, g: &Groups, s: &Segments) -> Plan {
    let parts: [&[u32]; 6] = [&g.rows, &g.offsets, &g.order, &s.first, &s.start, &s.end];
    let packed: Vec<u32> = parts.concat();
    let buf = upload(be, &packed);
    let base = be.ids_ptr(&buf);
    let mut at = [0u64; 6];
    let mut k = 0;
    for (a, p) in at.iter_mut().zip(parts) {
        *a = base + 4 * k as u64;
        k += p.len();
    }
    Plan { _packed: buf, rows: at[0], offsets: at[1], order: at[2], seg_first: at[3], seg_start: at[4], seg_end: at[5] }
}

/// Launch shape of one thread per (item, column): x = item (group or segment), y = column block.
fn per_item_cfg(items: usize, c: usize) -> LaunchConfig {
    const THREADS: usize = 128;
    LaunchConfig {
        grid_dim: (items as u32, c.div_ceil(THREADS) as u32, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Scratch for `segments x c` partials, in stream order like colsum's; `None` (and a null
/// address) when there are no segments. Freed in stream order after the kernels using it.
fn partial_scratch(be: &CudaBackend, segments: usize, c: usize) -> (Option<CudaSlice<f32>>, u64) {
    if segments == 0 {
        return (None, 0);
    }
    let len = segments * c;
    // SAFETY: embedding_backward_segments writes every element before embedding_backward_grouped
    // reads it.
    let buf = unsafe { be.stream().alloc::<f32>(len) }.unwrap_or_else(|e| {
        panic!("cuda:{}: cannot allocate {len} floats of scratch: {e:?}", be.ordinal())
    });
    let ptr = be.buf_ptr(&buf);
    (Some(buf), ptr)
}

/// The ids' host copy; `None` (after recording the failure) when one is outside the table.
fn checked_ids<'a>(be: &CudaBackend, ids: &'a CudaIds, table_rows: usize) -> Option<&'a [u32]> {
    let host = ids.host();
    if let Some(&bad) = host.iter().find(|&&id| id as usize >= table_rows) {
        be.fail("embedding_backward", format!("id {bad} outside a table of {table_rows} rows"));
        return None;
    }
    Some(host)
}

/// dtable[ids[n]] += dout[n].
pub(crate) fn backward(
    be: &CudaBackend,
    dtable: CudaViewMut<'_>,
    dout: CudaView<'_>,
    ids: &CudaIds,
    c: usize,
) {
    let n = ids.len();
    assert!(c > 0 && dtable.len.is_multiple_of(c), "embedding backward: dtable of {} floats is not (R, {c})", dtable.len);
    assert_eq!(dout.len, n * c, "embedding dout: {} floats, expected (N={n}, C={c})", dout.len);
    if n == 0 {
        return;
    }
    let Some(host) = checked_ids(be, ids, dtable.len / c) else { return };
    let g = group_by_id(host);
    let s = segment(&g.offsets, SEG);
    let plan = upload_plan(be, &g, &s);
    let (_scratch, partial) = partial_scratch(be, s.start.len(), c);
    let cc = c as u64;
    if !s.start.is_empty() {
        let f = be.func("embedding_backward_segments");
        let mut b = be.stream().launch_builder(&f);
        b.arg(&partial).arg(dout.ptr_ref()).arg(&plan.order).arg(&plan.seg_start).arg(&plan.seg_end).arg(&cc);
        // SAFETY: embedding_backward_segments(float*, const float*, const unsigned*, const
        // unsigned*, const unsigned*, u64) writes S*C partials; every start..end lies in order,
        // every position below N.
        let r = unsafe { b.launch(per_item_cfg(s.start.len(), c)) };
        be.check(r.map(|_| ()), "embedding_backward_segments");
    }
    let f = be.func("embedding_backward_grouped");
    let mut b = be.stream().launch_builder(&f);
    b.arg(dtable.ptr_ref()).arg(dout.ptr_ref()).arg(&partial).arg(&plan.rows).arg(&plan.offsets);
    b.arg(&plan.order).arg(&plan.seg_first).arg(&cc);
    // SAFETY: embedding_backward_grouped(float*, const float*, const float*, const unsigned*,
    // const unsigned*, const unsigned*, const unsigned*, u64): every row id is below table_rows
    // (checked on download), every position below N; partial is read only by groups with
    // segments, which exist only when it was allocated.
    let r = unsafe { b.launch(per_item_cfg(g.rows.len(), c)) };
    be.check(r.map(|_| ()), "embedding_backward_grouped");
}

#[cfg(test)]
mod tests {
    use super::{group_by_id, segment, SEG};

    #[test]
    fn groups_positions_by_id_in_order() {
        let g = group_by_id(&[5, 2, 5, 0, 2, 5]);
        assert_eq!(g.rows, vec![0, 2, 5]);
        assert_eq!(g.offsets, vec![0, 1, 3, 6]);
        assert_eq!(g.order, vec![3, 1, 4, 0, 2, 5]);
    }

    #[test]
    fn splits_only_groups_longer_than_seg_into_runs_in_order() {
        // ids 1: 1 position, 3: 2 (= seg), 2: 3, 4: 5; seg 2.
        let g = group_by_id(&[4, 2, 4, 3, 4, 1, 2, 4, 3, 2, 4]);
        assert_eq!(g.rows, vec![1, 2, 3, 4]);
        assert_eq!(g.offsets, vec![0, 1, 4, 6, 11]);
        let s = segment(&g.offsets, 2);
        // ids 1 and 3 have no segments; id 2 has order[1..3], [3..4]; id 4 [6..8], [8..10], [10..11].
        assert_eq!(s.first, vec![0, 0, 2, 2, 5]);
        assert_eq!(s.start, vec![1, 3, 6, 8, 10]);
        assert_eq!(s.end, vec![3, 4, 8, 10, 11]);
    }

    #[test]
    fn two_ids_over_16384_positions_tile_each_group_in_runs_of_seg() {
        // Like BERT's token types: 2 ids over 16,384 positions (here 10,922 and 5,462, so that
        // both groups end in a short run).
        let ids: Vec<u32> = (0..16_384u32).map(|n| u32::from(n % 3 == 0)).collect();
        let g = group_by_id(&ids);
        let s = segment(&g.offsets, SEG);
        let (g0, g1) = ((g.offsets[1] - g.offsets[0]) as usize, (g.offsets[2] - g.offsets[1]) as usize);
        assert_eq!(s.first, vec![0, g0.div_ceil(SEG) as u32, (g0.div_ceil(SEG) + g1.div_ceil(SEG)) as u32]);
        // The runs tile each group's range of order exactly, in order, none longer than SEG.
        assert_eq!(s.start[0], 0);
        assert_eq!(*s.end.last().unwrap(), 16_384);
        for k in 0..s.start.len() {
            assert!(s.start[k] < s.end[k] && (s.end[k] - s.start[k]) as usize <= SEG, "segment {k}");
            if k + 1 < s.start.len() {
                assert_eq!(s.end[k], s.start[k + 1], "segment {k} and the next are not adjacent");
            }
        }
        // Only the last run of a group is short.
        let short: Vec<usize> = (0..s.start.len()).filter(|&k| ((s.end[k] - s.start[k]) as usize) < SEG).collect();
        assert_eq!(short, vec![s.first[1] as usize - 1, s.start.len() - 1]);
    }
}
