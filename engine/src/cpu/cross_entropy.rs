//! Softmax cross-entropy over the vocabulary, one row per position.

use rayon::prelude::*;

use crate::backend::IGNORE_INDEX;

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// losses[n] = lse(logits[n]) - logits[n, t]; saves lse (N). logits (N, V).
pub fn forward(losses: &mut [f32], lse: &mut [f32], logits: &[f32], targets: &[u32], v: usize) {
    let n = targets.len();
    assert!(losses.len() == n && lse.len() == n && logits.len() == n * v, "cross entropy");
    losses
        .par_iter_mut()
        .zip(lse.par_iter_mut())
        .zip(logits.par_chunks(v).zip(targets.par_iter()))
        .for_each(|((loss, lse), (row, &t))| {
            let l = log_sum_exp(row);
            *lse = l;
            *loss = if t == IGNORE_INDEX {
                0.0
            } else {
                assert!((t as usize) < v, "cross entropy: target {t} outside vocabulary {v}");
                l - row[t as usize]
            };
        });
}

/// dlogits[n] += dloss * (softmax(logits[n]) - onehot(t)), skipping ignored rows.
/// `logits[n] = dloss * (softmax(logits[n]) - onehot(t))`, zeros for ignored rows: the same
/// arithmetic as [`backward`] into a zeroed buffer, so the two agree bit for bit.
pub fn backward_in_place(logits: &mut [f32], lse: &[f32], targets: &[u32], dloss: f32, v: usize) {
    assert!(logits.len() == targets.len() * v && lse.len() == targets.len(), "cross entropy");
    logits.par_chunks_mut(v).zip(lse.par_iter().zip(targets.par_iter())).for_each(|(row, (&l, &t))| {
        if t == IGNORE_INDEX {
            row.fill(0.0);
            return;
        }
        for x in row.iter_mut() {
            *x = 0.0 + dloss * (*x - l).exp();
        }
        row[t as usize] -= dloss;
    });
}

pub fn backward(
    dlogits: &mut [f32],
    logits: &[f32],
    lse: &[f32],
    targets: &[u32],
    dloss: f32,
    v: usize,
) {
    assert!(dlogits.len() == logits.len() && logits.len() == targets.len() * v, "cross entropy");
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(lse.par_iter().zip(targets.par_iter()))
        .for_each(|((d, row), (&l, &t))| {
            if t == IGNORE_INDEX {
                return;
            }
            for i in 0..v {
                d[i] += dloss * (row[i] - l).exp();
            }
            d[t as usize] -= dloss;
        });
}
