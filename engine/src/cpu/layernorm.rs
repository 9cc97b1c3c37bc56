//! LayerNorm over the last dimension, eps = 1e-5 (GPT-2, BERT, T5-with-LayerNorm).

use rayon::prelude::*;

use super::ROWS_PER_TASK;

pub const EPS: f32 = 1e-5;

/// out (N, C) = (inp - mean) * rstd * w + b; saves mean (N), rstd (N).
pub fn forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: &[f32],
    c: usize,
) {
    let n = inp.len() / c;
    assert_eq!(out.len(), n * c, "layernorm out");
    assert!(mean.len() == n && rstd.len() == n, "layernorm saved state");
    assert!(w.len() == c && b.len() == c, "layernorm params");
    out.par_chunks_mut(c)
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((o, x), (mu, rs))| {
            let m = x.iter().sum::<f32>() / c as f32;
            let var = x.iter().map(|&v| (v - m) * (v - m)).sum::<f32>() / c as f32;
            let r = 1.0 / (var + EPS).sqrt();
            for i in 0..c {
                o[i] = (x[i] - m) * r * w[i] + b[i];
            }
            *mu = m;
            *rs = r;
        });
}

/// With xhat = (x - mean) * rstd and dxhat = dout * w:
/// dx += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)); dw += sum_n dout * xhat;
/// db += sum_n dout.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let n = inp.len() / c;
    assert!(dinp.len() == n * c && dout.len() == n * c, "layernorm grads");
    assert!(dw.len() == c && db.len() == c, "layernorm param grads");
    // Fixed chunks of rows each return partial (dw, db); summed in chunk order below.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dinp
        .par_chunks_mut(ROWS_PER_TASK * c)
        .enumerate()
        .map(|(chunk, dx_rows)| {
            let mut pdw = vec![0.0f32; c];
            let mut pdb = vec![0.0f32; c];
            for (r, dx) in dx_rows.chunks_mut(c).enumerate() {
                let row = chunk * ROWS_PER_TASK + r;
                let x = &inp[row * c..(row + 1) * c];
                let dy = &dout[row * c..(row + 1) * c];
                let (mu, rs) = (mean[row], rstd[row]);
                let mut dnorm_mean = 0.0f32;
                let mut dnorm_norm_mean = 0.0f32;
                for i in 0..c {
                    let xhat = (x[i] - mu) * rs;
                    let dxhat = dy[i] * w[i];
                    dnorm_mean += dxhat;
                    dnorm_norm_mean += dxhat * xhat;
                    pdw[i] += dy[i] * xhat;
                    pdb[i] += dy[i];
                }
                dnorm_mean /= c as f32;
                dnorm_norm_mean /= c as f32;
                for i in 0..c {
                    let xhat = (x[i] - mu) * rs;
                    let dxhat = dy[i] * w[i];
                    dx[i] += rs * (dxhat - dnorm_mean - xhat * dnorm_norm_mean);
                }
            }
            (pdw, pdb)
        })
        .collect();
    for (pdw, pdb) in &partials {
        dw.iter_mut().zip(pdw).for_each(|(a, &x)| *a += x);
        db.iter_mut().zip(pdb).for_each(|(a, &x)| *a += x);
    }
}
