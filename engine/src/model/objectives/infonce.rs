//! In-batch InfoNCE (the symmetric form of CLIP; SimCSE's supervised pairs): rows `za[i]` and
//! `zb[i]` are a positive pair, every other row of the other side a negative. With unit vectors
//! `u = z / |z|` and `S = ua ub^T / tau` (N, N):
//! `L = (1/2N) sum_i [ CE(S[i, :], i) + CE(S[:, i], i) ]`.
//! Forward and backward side by side, in f64.

/// The loss, its gradients with respect to both sides, and top-1 accuracy of the a->b direction.
#[derive(Clone, Debug)]
pub struct InfoNce {
    pub loss: f32,
    pub dza: Vec<f32>, // (N, C)
    pub dzb: Vec<f32>, // (N, C)
    pub accuracy: f32,
}

/// Unit rows and their norms.
fn normalise(z: &[f32], n: usize, c: usize) -> (Vec<f64>, Vec<f64>) {
    let mut u = vec![0.0f64; n * c];
    let mut norms = vec![0.0f64; n];
    for i in 0..n {
        let row = &z[i * c..(i + 1) * c];
        // a floor keeps an all-zero row finite (its gradient is then just large, not NaN)
        let r = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt().max(1e-12);
        norms[i] = r;
        for k in 0..c {
            u[i * c + k] = row[k] as f64 / r;
        }
    }
    (u, norms)
}

/// `dz = (du - u (u . du)) / |z|`: the gradient through `u = z / |z|`.
fn normalise_backward(u: &[f64], norms: &[f64], du: &[f64], n: usize, c: usize) -> Vec<f32> {
    let mut dz = vec![0.0f32; n * c];
    for i in 0..n {
        let (ui, dui) = (&u[i * c..(i + 1) * c], &du[i * c..(i + 1) * c]);
        let proj: f64 = ui.iter().zip(dui).map(|(a, b)| a * b).sum();
        for k in 0..c {
            dz[i * c + k] = ((dui[k] - ui[k] * proj) / norms[i]) as f32;
        }
    }
    dz
}

/// Softmax of `x` in place, returning log-sum-exp.
fn softmax(x: &mut [f64]) -> f64 {
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = x.iter().map(|v| (v - max).exp()).sum();
    let lse = max + sum.ln();
    x.iter_mut().for_each(|v| *v = (*v - lse).exp());
    lse
}

/// za, zb (N, C); N >= 2 (one pair has no negatives).
pub fn info_nce(za: &[f32], zb: &[f32], n: usize, c: usize, temperature: f32) -> InfoNce {
    assert!(n >= 2, "info_nce needs at least 2 pairs, got {n}");
    assert!(za.len() == n * c && zb.len() == n * c, "info_nce: za, zb must be (N, C)");
    let tau = temperature as f64;
    let (ua, na) = normalise(za, n, c);
    let (ub, nb) = normalise(zb, n, c);
    // S[i][j] = ua_i . ub_j / tau
    let mut s = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            s[i * n + j] = (0..c).map(|k| ua[i * c + k] * ub[j * c + k]).sum::<f64>() / tau;
        }
    }
    let mut loss = 0.0f64;
    let mut correct = 0usize;
    // dS = (1/2N) [(softmax_rows(S) - I) + (softmax_cols(S) - I)]
    let mut ds = vec![0.0f64; n * n];
    for i in 0..n {
        let mut row: Vec<f64> = s[i * n..(i + 1) * n].to_vec();
        let argmax = (0..n).fold(0, |m, j| if row[j] > row[m] { j } else { m });
        correct += (argmax == i) as usize;
        let lse = softmax(&mut row);
        loss += lse - s[i * n + i];
        for j in 0..n {
            ds[i * n + j] += (row[j] - (i == j) as u8 as f64) / (2 * n) as f64;
        }
    }
    for j in 0..n {
        let mut col: Vec<f64> = (0..n).map(|i| s[i * n + j]).collect();
        let lse = softmax(&mut col);
        loss += lse - s[j * n + j];
        for i in 0..n {
            ds[i * n + j] += (col[i] - (i == j) as u8 as f64) / (2 * n) as f64;
        }
    }
    loss /= (2 * n) as f64;
    // dua = dS ub / tau; dub = dS^T ua / tau
    let mut dua = vec![0.0f64; n * c];
    let mut dub = vec![0.0f64; n * c];
    for i in 0..n {
        for j in 0..n {
            let g = ds[i * n + j] / tau;
            for k in 0..c {
                dua[i * c + k] += g * ub[j * c + k];
                dub[j * c + k] += g * ua[i * c + k];
            }
        }
    }
    InfoNce {
        loss: loss as f32,
        dza: normalise_backward(&ua, &na, &dua, n, c),
        dzb: normalise_backward(&ub, &nb, &dub, n, c),
        accuracy: correct as f32 / n as f32,
    }
}
