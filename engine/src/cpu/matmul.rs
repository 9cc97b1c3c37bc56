//! Matmul with bias through the `gemm` crate. gemm splits work over output tiles and walks the
//! inner dimension in cache-sized blocks fixed by the shape, so its sums do not depend on the
//! thread count; the bias gradient is reduced over fixed row chunks for the same reason.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::ROWS_PER_TASK;
use crate::backend::{MatmulShape, WeightLayout};

fn parallelism() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

/// `dst (m, n) (+)= lhs (m, k) @ rhs (k, n)` with arbitrary element strides `(row, col)`.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    dst: &mut [f32],
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    assert!(dst.len() >= m * n, "gemm: dst holds {} < {}x{}", dst.len(), m, n);
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs, "gemm: lhs too short");
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs, "gemm: rhs too short");
    }
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and the
    // borrow checker guarantees dst does not alias lhs or rhs.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

/// Strides `(row, col)` of W viewed as a `(IC, OC)` matrix.
fn weight_in_out_strides(s: &MatmulShape) -> (usize, usize) {
    match s.layout {
        WeightLayout::InOut => (s.out_features, 1),
        WeightLayout::OutIn => (1, s.in_features),
    }
}

/// out (N, OC) = inp (N, IC) @ W (IC, OC) + bias (OC)
pub fn forward(out: &mut [f32], inp: &[f32], weight: &[f32], bias: Option<&[f32]>, s: MatmulShape) {
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    assert_eq!(out.len(), n * oc, "matmul out");
    assert_eq!(inp.len(), n * ic, "matmul inp");
    assert_eq!(weight.len(), ic * oc, "matmul weight");
    if let Some(b) = bias {
        assert_eq!(b.len(), oc, "matmul bias");
        out.par_chunks_mut(oc).for_each(|row| row.copy_from_slice(b));
    }
    gemm_strided(out, bias.is_some(), (n, oc, ic), inp, (ic, 1), weight, weight_in_out_strides(&s));
}

/// dinp (N, IC) += dout (N, OC) @ W^T; dW += inp^T @ dout; dbias (OC) += sum over rows of dout.
pub fn backward(
    dinp: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    s: MatmulShape,
) {
    backward_with(dinp, true, dweight, dbias, dout, inp, weight, s)
}

/// [`backward`], with `dinp` overwritten when `accumulate_dinp` is false.
#[allow(clippy::too_many_arguments)]
pub fn backward_with(
    dinp: Option<&mut [f32]>,
    accumulate_dinp: bool,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    s: MatmulShape,
) {
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    assert_eq!(dout.len(), n * oc, "matmul dout");
    assert_eq!(inp.len(), n * ic, "matmul inp");
    assert_eq!(dweight.len(), ic * oc, "matmul dweight");
    let (w_rs, w_cs) = weight_in_out_strides(&s);
    if let Some(dinp) = dinp {
        assert_eq!(dinp.len(), n * ic, "matmul dinp");
        // W^T as an (OC, IC) matrix: swap W's strides.
        gemm_strided(dinp, accumulate_dinp, (n, ic, oc), dout, (oc, 1), weight, (w_cs, w_rs));
    }
    match s.layout {
        // dW (IC, OC) += inp^T (IC, N) @ dout (N, OC)
        WeightLayout::InOut => gemm_strided(dweight, true, (ic, oc, n), inp, (1, ic), dout, (oc, 1)),
        // dW (OC, IC) += dout^T (OC, N) @ inp (N, IC)
        WeightLayout::OutIn => gemm_strided(dweight, true, (oc, ic, n), dout, (1, oc), inp, (ic, 1)),
    }
    if let Some(dbias) = dbias {
        assert_eq!(dbias.len(), oc, "matmul dbias");
        add_column_sums(dbias, dout, oc);
    }
}

/// `dbias (cols) +=` the column sums of `rows (N, cols)`: per chunk of `ROWS_PER_TASK` rows a
/// partial from 0 in row order, the partials then added in chunk order (a bias gradient, in the
/// same order whichever op sums it: a projection's backward, or the op that wrote its dout).
pub(crate) fn add_column_sums(dbias: &mut [f32], rows: &[f32], cols: usize) {
    assert!(cols > 0 && rows.len().is_multiple_of(cols), "column sums: {} values are not rows of {cols}", rows.len());
    let partials: Vec<Vec<f32>> = rows
        .par_chunks(ROWS_PER_TASK * cols)
        .map(|chunk| {
            let mut acc = vec![0.0f32; cols];
            for row in chunk.chunks(cols) {
                acc.iter_mut().zip(row).for_each(|(a, &d)| *a += d);
            }
            acc
        })
        .collect();
    for p in &partials {
        dbias.iter_mut().zip(p).for_each(|(d, &x)| *d += x);
    }
}
