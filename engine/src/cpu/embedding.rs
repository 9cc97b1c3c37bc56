//! Row lookup: token, position and segment embeddings share it.

use rayon::prelude::*;

/// out[n] (+)= table[ids[n]]; out (N, C), table (R, C), ids (N).
pub fn forward(out: &mut [f32], ids: &[u32], table: &[f32], c: usize, accumulate: bool) {
    let rows = table.len() / c;
    assert_eq!(out.len(), ids.len() * c, "embedding out");
    out.par_chunks_mut(c).zip(ids.par_iter()).for_each(|(o, &id)| {
        let id = id as usize;
        assert!(id < rows, "embedding: id {id} outside a table of {rows} rows");
        let row = &table[id * c..(id + 1) * c];
        if accumulate {
            o.iter_mut().zip(row).for_each(|(o, &t)| *o += t);
        } else {
            o.copy_from_slice(row);
        }
    });
}

/// dtable[ids[n]] += dout[n], in order of n: N*C adds, negligible next to the matmuls, and
/// sequential so that rows hit twice sum in a fixed order.
pub fn backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], c: usize) {
    assert_eq!(dout.len(), ids.len() * c, "embedding dout");
    for (n, &id) in ids.iter().enumerate() {
        let id = id as usize;
        let row = &mut dtable[id * c..(id + 1) * c];
        row.iter_mut().zip(&dout[n * c..(n + 1) * c]).for_each(|(d, &g)| *d += g);
    }
}
