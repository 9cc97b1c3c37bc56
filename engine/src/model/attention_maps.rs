//! Attention weights for interpretability, recomputed on the host from a layer's q, k and v.
//!
//! Recomputing (rather than reading a backend's saved state) works on every backend: a flash
//! kernel keeps only a log-sum-exp per row, and the CPU backend's saved layout is its own
//! business. The cost is one T×T softmax per head, fine for the short texts people inspect.

/// Softmax(q k^T / sqrt(hd)) per head for one sequence of a packed self-attention input.
///
/// `qkv` is `(T, 3C)` with rows `[q | k | v]`, heads taking consecutive `hd = C / heads`
/// channels of each. Returns `(H, T, T)`: row `i` of head `h` is query `i`'s weights over keys;
/// with `causal`, keys after the query get exactly 0.
pub fn self_attention_probs(qkv: &[f32], t: usize, channels: usize, heads: usize, causal: bool) -> Vec<f32> {
    assert_eq!(qkv.len(), t * 3 * channels, "qkv must be (T, 3C)");
    assert!(heads > 0 && channels % heads == 0, "channels must split into heads");
    let hd = channels / heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0f32; heads * t * t];
    let mut scores = vec![0.0f64; t];
    for h in 0..heads {
        for i in 0..t {
            let q = &qkv[i * 3 * channels + h * hd..][..hd];
            let visible = if causal { i + 1 } else { t };
            let mut max = f64::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate().take(visible) {
                let k = &qkv[j * 3 * channels + channels + h * hd..][..hd];
                *s = q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale;
                max = max.max(*s);
            }
            let total: f64 = scores[..visible].iter().map(|s| (s - max).exp()).sum();
            let row = &mut out[(h * t + i) * t..][..t];
            for j in 0..visible {
                row[j] = ((scores[j] - max).exp() / total) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_distributions_and_causal_rows_ignore_the_future() {
        let (t, c, h) = (5, 8, 2);
        let qkv: Vec<f32> = (0..t * 3 * c).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
        for causal in [false, true] {
            let p = self_attention_probs(&qkv, t, c, h, causal);
            for row in p.chunks(t) {
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
            }
            if causal {
                for hh in 0..h {
                    for i in 0..t {
                        for j in i + 1..t {
                            assert_eq!(p[(hh * t + i) * t + j], 0.0);
                        }
                    }
                }
                // The first query sees only itself.
                assert_eq!(p[0], 1.0);
            }
        }
    }

    /// The recomputation agrees with the CPU backend's attention op, which saves its
    /// probabilities as (B, Tq, H, Tk).
    #[test]
    fn matches_the_cpu_attention_op() {
        use crate::backend::{AttnShape, Backend, QkvSource};
        use crate::cpu::CpuBackend;
        let (t, c, h) = (7, 12, 3);
        let qkv: Vec<f32> = (0..t * 3 * c).map(|i| (((i * 7919) % 101) as f32 - 50.0) / 40.0).collect();
        let be = CpuBackend::new();
        let shape = AttnShape { batch: 1, q_len: t, kv_len: t, channels: c, heads: h, causal: true };
        let mut out = vec![0.0; t * c];
        let mut saved = vec![0.0; be.attention_saved_len(shape)];
        be.attention_forward(&mut out, &mut saved, QkvSource::Packed(&qkv), shape);
        let ours = self_attention_probs(&qkv, t, c, h, true);
        for hh in 0..h {
            for i in 0..t {
                for j in 0..t {
                    let theirs = saved[(i * h + hh) * t + j];
                    let mine = ours[(hh * t + i) * t + j];
                    assert!((theirs - mine).abs() < 1e-6, "head {hh} query {i} key {j}: {mine} vs {theirs}");
                }
            }
        }
    }
}
