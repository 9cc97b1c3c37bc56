//! Multi-head scaled dot-product attention, the plain way: per query row, scores against every
//! visible key, softmax, weighted sum of values. Saves the probabilities (B, Tq, H, Tk) for the
//! backward pass (a CUDA flash kernel saves a log-sum-exp per row instead).

use rayon::prelude::*;

use crate::backend::{AttnShape, QkvSource};

pub fn saved_len(s: AttnShape) -> usize {
    s.batch * s.q_len * s.heads * s.kv_len
}

/// Offsets and row strides of q, k and v inside their source buffers.
#[derive(Clone, Copy)]
struct Layout {
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
}

fn layout<V>(src: &QkvSource<V>, c: usize) -> Layout {
    match src {
        QkvSource::Packed(_) => Layout { q: (0, 3 * c), k: (c, 3 * c), v: (2 * c, 3 * c) },
        QkvSource::Split { .. } => Layout { q: (0, c), k: (0, 2 * c), v: (c, 2 * c) },
    }
}

/// (query buffer, key/value buffer)
fn buffers<'a>(src: &QkvSource<&'a [f32]>, s: &AttnShape) -> (&'a [f32], &'a [f32]) {
    let c = s.channels;
    match *src {
        QkvSource::Packed(qkv) => {
            assert_eq!(s.q_len, s.kv_len, "self-attention needs Tq == Tk");
            assert_eq!(qkv.len(), s.batch * s.q_len * 3 * c, "attention qkv (B,T,3C)");
            (qkv, qkv)
        }
        QkvSource::Split { q, kv } => {
            assert_eq!(q.len(), s.batch * s.q_len * c, "attention q (B,Tq,C)");
            assert_eq!(kv.len(), s.batch * s.kv_len * 2 * c, "attention kv (B,Tk,2C)");
            (q, kv)
        }
    }
}

fn check_shape(s: &AttnShape) {
    assert!(s.heads > 0 && s.channels % s.heads == 0, "channels must divide into heads");
    assert!(!s.causal || s.q_len == s.kv_len, "causal attention needs Tq == Tk");
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Keys visible from query i: all of them, or j <= i when causal.
fn visible(s: &AttnShape, i: usize) -> usize {
    if s.causal {
        i + 1
    } else {
        s.kv_len
    }
}

/// out (B, Tq, C); saved (B, Tq, H, Tk) attention probabilities (0 where masked).
pub fn forward(out: &mut [f32], saved: &mut [f32], src: QkvSource<&[f32]>, s: AttnShape) {
    check_shape(&s);
    let (c, nh, hd, tq, tk) = (s.channels, s.heads, s.head_dim(), s.q_len, s.kv_len);
    let lay = layout(&src, c);
    let (qbuf, kvbuf) = buffers(&src, &s);
    assert_eq!(out.len(), s.batch * tq * c, "attention out (B,Tq,C)");
    assert_eq!(saved.len(), saved_len(s), "attention saved");
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(c)
        .zip(saved.par_chunks_mut(nh * tk))
        .enumerate()
        .for_each(|(row, (o, probs))| {
            let (b, i) = (row / tq, row % tq);
            let q_row = (b * tq + i) * lay.q.1 + lay.q.0;
            let n_vis = visible(&s, i);
            for h in 0..nh {
                let q = &qbuf[q_row + h * hd..q_row + (h + 1) * hd];
                let p = &mut probs[h * tk..(h + 1) * tk];
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(n_vis) {
                    let k_at = (b * tk + j) * lay.k.1 + lay.k.0 + h * hd;
                    *pj = dot(q, &kvbuf[k_at..k_at + hd]) * scale;
                    max = max.max(*pj);
                }
                let mut sum = 0.0f32;
                for pj in p.iter_mut().take(n_vis) {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let inv = 1.0 / sum;
                p[..n_vis].iter_mut().for_each(|pj| *pj *= inv);
                p[n_vis..].fill(0.0);
                let oh = &mut o[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                for (j, &pj) in p.iter().enumerate().take(n_vis) {
                    let v_at = (b * tk + j) * lay.v.1 + lay.v.0 + h * hd;
                    let v = &kvbuf[v_at..v_at + hd];
                    oh.iter_mut().zip(v).for_each(|(o, &v)| *o += pj * v);
                }
            }
        });
}

/// Gradients of one (batch, head): dq (Tq, hd), dk (Tk, hd), dv (Tk, hd).
struct HeadGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// With P the saved probabilities and dP = dout V^T:
/// dV = P^T dout; dS = P * (dP - rowsum(P * dP)); dQ = scale dS K; dK = scale dS^T Q.
pub fn backward(
    dsrc: QkvSource<&mut [f32]>,
    dout: &[f32],
    src: QkvSource<&[f32]>,
    saved: &[f32],
    s: AttnShape,
) {
    check_shape(&s);
    let (c, nh, hd, tq, tk) = (s.channels, s.heads, s.head_dim(), s.q_len, s.kv_len);
    let lay = layout(&src, c);
    let (qbuf, kvbuf) = buffers(&src, &s);
    assert_eq!(dout.len(), s.batch * tq * c, "attention dout (B,Tq,C)");
    assert_eq!(saved.len(), saved_len(s), "attention saved");
    let scale = 1.0 / (hd as f32).sqrt();

    let grads: Vec<HeadGrads> = (0..s.batch * nh)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / nh, bh % nh);
            let mut g = HeadGrads {
                dq: vec![0.0; tq * hd],
                dk: vec![0.0; tk * hd],
                dv: vec![0.0; tk * hd],
            };
            let mut dp = vec![0.0f32; tk];
            for i in 0..tq {
                let n_vis = visible(&s, i);
                let p = &saved[((b * tq + i) * nh + h) * tk..][..tk];
                let dy = &dout[(b * tq + i) * c + h * hd..][..hd];
                let q_at = (b * tq + i) * lay.q.1 + lay.q.0 + h * hd;
                let q = &qbuf[q_at..q_at + hd];
                let mut p_dot_dp = 0.0f32;
                for j in 0..n_vis {
                    let v_at = (b * tk + j) * lay.v.1 + lay.v.0 + h * hd;
                    dp[j] = dot(dy, &kvbuf[v_at..v_at + hd]);
                    p_dot_dp += p[j] * dp[j];
                    let dv = &mut g.dv[j * hd..(j + 1) * hd];
                    dv.iter_mut().zip(dy).for_each(|(d, &y)| *d += p[j] * y);
                }
                let dq = &mut g.dq[i * hd..(i + 1) * hd];
                for j in 0..n_vis {
                    let ds = p[j] * (dp[j] - p_dot_dp) * scale;
                    let k_at = (b * tk + j) * lay.k.1 + lay.k.0 + h * hd;
                    let k = &kvbuf[k_at..k_at + hd];
                    dq.iter_mut().zip(k).for_each(|(d, &k)| *d += ds * k);
                    let dk = &mut g.dk[j * hd..(j + 1) * hd];
                    dk.iter_mut().zip(q).for_each(|(d, &q)| *d += ds * q);
                }
            }
            g
        })
        .collect();

    // Scatter the per-head gradients into the source layout, one batch row block per task.
    let add = |dst: &mut [f32], src: &[f32]| dst.iter_mut().zip(src).for_each(|(d, &x)| *d += x);
    match dsrc {
        QkvSource::Packed(dqkv) => {
            assert_eq!(dqkv.len(), s.batch * tq * 3 * c, "attention dqkv (B,T,3C)");
            dqkv.par_chunks_mut(tq * 3 * c).enumerate().for_each(|(b, blk)| {
                for h in 0..nh {
                    let g = &grads[b * nh + h];
                    for t in 0..tq {
                        let r = &mut blk[t * 3 * c..(t + 1) * 3 * c];
                        add(&mut r[h * hd..][..hd], &g.dq[t * hd..][..hd]);
                        add(&mut r[c + h * hd..][..hd], &g.dk[t * hd..][..hd]);
                        add(&mut r[2 * c + h * hd..][..hd], &g.dv[t * hd..][..hd]);
                    }
                }
            });
        }
        QkvSource::Split { q: dq, kv: dkv } => {
            assert_eq!(dq.len(), s.batch * tq * c, "attention dq (B,Tq,C)");
            assert_eq!(dkv.len(), s.batch * tk * 2 * c, "attention dkv (B,Tk,2C)");
            dq.par_chunks_mut(tq * c).enumerate().for_each(|(b, blk)| {
                for h in 0..nh {
                    let g = &grads[b * nh + h];
                    for t in 0..tq {
                        add(&mut blk[t * c + h * hd..][..hd], &g.dq[t * hd..][..hd]);
                    }
                }
            });
            dkv.par_chunks_mut(tk * 2 * c).enumerate().for_each(|(b, blk)| {
                for h in 0..nh {
                    let g = &grads[b * nh + h];
                    for t in 0..tk {
                        add(&mut blk[t * 2 * c + h * hd..][..hd], &g.dk[t * hd..][..hd]);
                        add(&mut blk[t * 2 * c + c + h * hd..][..hd], &g.dv[t * hd..][..hd]);
                    }
                }
            });
        }
    }
}
