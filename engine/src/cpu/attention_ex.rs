//! Attention with a selectable score (dot, general, additive) and per-sequence key padding
//! masks: the CPU reference of `Backend::attention_ex_*`. Work is split per (batch, head); each
//! task runs its head start to end and returns its pieces, which are scattered (and the score
//! parameters' gradients summed over the batch) in a fixed order, so results do not depend on the
//! thread count. Saves the probabilities (B, Tq, H, Tk), like `attention.rs`.

use rayon::prelude::*;

use crate::backend::{AttnShape, QkvSource, Scores};

/// (offset, row stride) of q, k and v inside their source buffers.
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

/// (query buffer, key/value buffer), lengths checked.
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

fn check(s: &AttnShape, scores: &Scores<&[f32]>, key_lens: Option<&[u32]>) {
    assert!(s.heads > 0 && s.channels.is_multiple_of(s.heads), "channels must divide into heads");
    assert!(!s.causal || s.q_len == s.kv_len, "causal attention needs Tq == Tk");
    let (h, hd) = (s.heads, s.head_dim());
    match scores {
        Scores::Dot => {}
        Scores::General { w } => assert_eq!(w.len(), h * hd * hd, "general score w (H,hd,hd)"),
        Scores::Additive { wq, wk, v, width } => {
            assert_eq!(wq.len(), h * hd * width, "additive score wq (H,hd,A)");
            assert_eq!(wk.len(), h * hd * width, "additive score wk (H,hd,A)");
            assert_eq!(v.len(), h * width, "additive score v (H,A)");
        }
    }
    if let Some(l) = key_lens {
        assert_eq!(l.len(), s.batch, "key_lens (B)");
        for (b, &n) in l.iter().enumerate() {
            assert!(n >= 1 && n as usize <= s.kv_len, "key_lens[{b}] = {n} outside 1..={}", s.kv_len);
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out (rows, n) = inp (rows, m) @ w (m, n)`, small and plain.
fn small_matmul(inp: &[f32], w: &[f32], m: usize, n: usize) -> Vec<f32> {
    let rows = inp.len() / m;
    let mut out = vec![0.0f32; rows * n];
    for r in 0..rows {
        for d in 0..m {
            let x = inp[r * m + d];
            out[r * n..(r + 1) * n].iter_mut().zip(&w[d * n..(d + 1) * n]).for_each(|(o, &w)| *o += x * w);
        }
    }
    out
}

/// One head's q, k, v gathered into contiguous (T, hd) arrays.
struct HeadInputs {
    q: Vec<f32>, // (Tq, hd)
    k: Vec<f32>, // (Tk, hd)
    v: Vec<f32>, // (Tk, hd)
}

fn gather(qbuf: &[f32], kvbuf: &[f32], lay: Layout, s: &AttnShape, b: usize, h: usize) -> HeadInputs {
    let (hd, tq, tk) = (s.head_dim(), s.q_len, s.kv_len);
    let rows = |buf: &[f32], (off, stride): (usize, usize), t: usize| -> Vec<f32> {
        (0..t).flat_map(|j| buf[(b * t + j) * stride + off + h * hd..][..hd].iter().copied()).collect()
    };
    HeadInputs { q: rows(qbuf, lay.q, tq), k: rows(kvbuf, lay.k, tk), v: rows(kvbuf, lay.v, tk) }
}

/// A head's score function with whatever it precomputes from q and k.
enum HeadScore {
    /// q rows already multiplied by the scale (and by W_h for the general score).
    Bilinear { qt: Vec<f32> }, // (Tq, hd)
    Additive { qa: Vec<f32>, ka: Vec<f32>, v: Vec<f32>, a: usize }, // (Tq, A), (Tk, A), (A)
}

fn head_score(scores: &Scores<&[f32]>, x: &HeadInputs, h: usize, hd: usize) -> HeadScore {
    let scale = 1.0 / (hd as f32).sqrt();
    match scores {
        Scores::Dot => HeadScore::Bilinear { qt: x.q.iter().map(|&q| q * scale).collect() },
        Scores::General { w } => {
            let mut qt = small_matmul(&x.q, &w[h * hd * hd..(h + 1) * hd * hd], hd, hd);
            qt.iter_mut().for_each(|q| *q *= scale);
            HeadScore::Bilinear { qt }
        }
        Scores::Additive { wq, wk, v, width } => {
            let a = *width;
            let wq = &wq[h * hd * a..(h + 1) * hd * a];
            let wk = &wk[h * hd * a..(h + 1) * hd * a];
            HeadScore::Additive {
                qa: small_matmul(&x.q, wq, hd, a),
                ka: small_matmul(&x.k, wk, hd, a),
                v: v[h * a..(h + 1) * a].to_vec(),
                a,
            }
        }
    }
}

impl HeadScore {
    fn score(&self, x: &HeadInputs, hd: usize, i: usize, j: usize) -> f32 {
        match self {
            HeadScore::Bilinear { qt } => dot(&qt[i * hd..(i + 1) * hd], &x.k[j * hd..(j + 1) * hd]),
            HeadScore::Additive { qa, ka, v, a } => {
                let (qa, ka) = (&qa[i * a..(i + 1) * a], &ka[j * a..(j + 1) * a]);
                (0..*a).map(|t| v[t] * (qa[t] + ka[t]).tanh()).sum()
            }
        }
    }
}

/// Keys visible from query i of batch entry b.
fn visible(s: &AttnShape, key_lens: Option<&[u32]>, b: usize, i: usize) -> usize {
    let n = key_lens.map_or(s.kv_len, |l| l[b] as usize);
    if s.causal {
        n.min(i + 1)
    } else {
        n
    }
}

/// out (B, Tq, C); saved (B, Tq, H, Tk) probabilities, 0 where masked.
pub fn forward(
    out: &mut [f32],
    saved: &mut [f32],
    src: QkvSource<&[f32]>,
    scores: Scores<&[f32]>,
    key_lens: Option<&[u32]>,
    s: AttnShape,
) {
    check(&s, &scores, key_lens);
    let (c, nh, hd, tq, tk) = (s.channels, s.heads, s.head_dim(), s.q_len, s.kv_len);
    let lay = layout(&src, c);
    let (qbuf, kvbuf) = buffers(&src, &s);
    assert_eq!(out.len(), s.batch * tq * c, "attention out (B,Tq,C)");
    assert_eq!(saved.len(), s.batch * tq * nh * tk, "attention saved (B,Tq,H,Tk)");

    // per (b, h): (y (Tq, hd), p (Tq, Tk))
    let heads: Vec<(Vec<f32>, Vec<f32>)> = (0..s.batch * nh)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / nh, bh % nh);
            let x = gather(qbuf, kvbuf, lay, &s, b, h);
            let sc = head_score(&scores, &x, h, hd);
            let (mut y, mut p) = (vec![0.0f32; tq * hd], vec![0.0f32; tq * tk]);
            for i in 0..tq {
                let n_vis = visible(&s, key_lens, b, i);
                let pi = &mut p[i * tk..(i + 1) * tk];
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in pi.iter_mut().enumerate().take(n_vis) {
                    *pj = sc.score(&x, hd, i, j);
                    max = max.max(*pj);
                }
                let mut sum = 0.0f32;
                for pj in pi.iter_mut().take(n_vis) {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let inv = 1.0 / sum;
                pi[..n_vis].iter_mut().for_each(|pj| *pj *= inv);
                let yi = &mut y[i * hd..(i + 1) * hd];
                for (j, &pj) in pi.iter().enumerate().take(n_vis) {
                    yi.iter_mut().zip(&x.v[j * hd..(j + 1) * hd]).for_each(|(o, &v)| *o += pj * v);
                }
            }
            (y, p)
        })
        .collect();

    out.par_chunks_mut(c).zip(saved.par_chunks_mut(nh * tk)).enumerate().for_each(|(row, (o, sv))| {
        let (b, i) = (row / tq, row % tq);
        for h in 0..nh {
            let (y, p) = &heads[b * nh + h];
            o[h * hd..(h + 1) * hd].copy_from_slice(&y[i * hd..(i + 1) * hd]);
            sv[h * tk..(h + 1) * tk].copy_from_slice(&p[i * tk..(i + 1) * tk]);
        }
    });
}

/// Gradients of one (batch, head): dq (Tq, hd), dk (Tk, hd), dv (Tk, hd) and the score
/// parameters' share of this head, laid out as that head's slice (general: dW (hd, hd);
/// additive: dWq (hd, A), dWk (hd, A), dv (A) back to back).
struct HeadGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dparams: Vec<f32>,
}

/// With P the saved probabilities, dP = dout V^T and dS = P * (dP - rowsum(P * dP)):
/// dV = P^T dout, then dS flows through the score function:
/// - dot: dQ = scale dS K, dK = scale dS^T Q;
/// - general (Qt = scale Q W): dQt = dS K, dK = dS^T Qt, dQ = scale dQt W^T, dW = scale Q^T dQt;
/// - additive (t = tanh(qa_i + ka_j)): g = dS_ij v (1 - t^2) adds to dqa_i and dka_j,
///   dv += dS_ij t; dQ = dqa Wq^T, dWq = Q^T dqa (and the same for K).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dsrc: QkvSource<&mut [f32]>,
    dscores: Scores<&mut [f32]>,
    dout: &[f32],
    src: QkvSource<&[f32]>,
    scores: Scores<&[f32]>,
    key_lens: Option<&[u32]>,
    saved: &[f32],
    s: AttnShape,
) {
    check(&s, &scores, key_lens);
    assert_eq!(dscores.kind(), scores.kind(), "dscores must be of the same kind as scores");
    let (c, nh, hd, tq, tk) = (s.channels, s.heads, s.head_dim(), s.q_len, s.kv_len);
    let lay = layout(&src, c);
    let (qbuf, kvbuf) = buffers(&src, &s);
    assert_eq!(dout.len(), s.batch * tq * c, "attention dout (B,Tq,C)");
    assert_eq!(saved.len(), s.batch * tq * nh * tk, "attention saved (B,Tq,H,Tk)");
    let scale = 1.0 / (hd as f32).sqrt();

    let grads: Vec<HeadGrads> = (0..s.batch * nh)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / nh, bh % nh);
            let x = gather(qbuf, kvbuf, lay, &s, b, h);
            let sc = head_score(&scores, &x, h, hd);
            let mut g = HeadGrads { dq: vec![0.0; tq * hd], dk: vec![0.0; tk * hd], dv: vec![0.0; tk * hd], dparams: Vec::new() };
            // gradients of the score function's own inputs: dQt (bilinear) or dqa, dka, dv_a (additive)
            let (mut dqt, mut dqa, mut dka, mut dva) = (vec![0.0f32; tq * hd], Vec::new(), Vec::new(), Vec::new());
            if let HeadScore::Additive { a, .. } = &sc {
                (dqa, dka, dva) = (vec![0.0f32; tq * a], vec![0.0f32; tk * a], vec![0.0f32; *a]);
            }
            let mut dp = vec![0.0f32; tk];
            for i in 0..tq {
                let n_vis = visible(&s, key_lens, b, i);
                let p = &saved[((b * tq + i) * nh + h) * tk..][..tk];
                let dy = &dout[(b * tq + i) * c + h * hd..][..hd];
                let mut p_dot_dp = 0.0f32;
                for j in 0..n_vis {
                    dp[j] = dot(dy, &x.v[j * hd..(j + 1) * hd]);
                    p_dot_dp += p[j] * dp[j];
                    g.dv[j * hd..(j + 1) * hd].iter_mut().zip(dy).for_each(|(d, &y)| *d += p[j] * y);
                }
                for j in 0..n_vis {
                    let ds = p[j] * (dp[j] - p_dot_dp);
                    match &sc {
                        HeadScore::Bilinear { qt } => {
                            let (k, qti) = (&x.k[j * hd..(j + 1) * hd], &qt[i * hd..(i + 1) * hd]);
                            dqt[i * hd..(i + 1) * hd].iter_mut().zip(k).for_each(|(d, &k)| *d += ds * k);
                            g.dk[j * hd..(j + 1) * hd].iter_mut().zip(qti).for_each(|(d, &q)| *d += ds * q);
                        }
                        HeadScore::Additive { qa, ka, v, a } => {
                            let a = *a;
                            for t in 0..a {
                                let th = (qa[i * a + t] + ka[j * a + t]).tanh();
                                let gt = ds * v[t] * (1.0 - th * th);
                                dqa[i * a + t] += gt;
                                dka[j * a + t] += gt;
                                dva[t] += ds * th;
                            }
                        }
                    }
                }
            }
            // from the score function's inputs back to q, k and the score parameters
            match (&scores, &sc) {
                (Scores::Dot, _) => {
                    // Qt = scale Q: dQ = scale dQt
                    g.dq.iter_mut().zip(&dqt).for_each(|(d, &x)| *d += scale * x);
                }
                (Scores::General { w }, _) => {
                    let w = &w[h * hd * hd..(h + 1) * hd * hd];
                    let mut dw = vec![0.0f32; hd * hd];
                    for i in 0..tq {
                        let (qi, dqti) = (&x.q[i * hd..(i + 1) * hd], &dqt[i * hd..(i + 1) * hd]);
                        for d in 0..hd {
                            g.dq[i * hd + d] += scale * dot(&w[d * hd..(d + 1) * hd], dqti);
                            dw[d * hd..(d + 1) * hd].iter_mut().zip(dqti).for_each(|(o, &e)| *o += scale * qi[d] * e);
                        }
                    }
                    g.dparams = dw;
                }
                (Scores::Additive { wq, wk, width, .. }, _) => {
                    let a = *width;
                    let wq = &wq[h * hd * a..(h + 1) * hd * a];
                    let wk = &wk[h * hd * a..(h + 1) * hd * a];
                    let mut dwq = vec![0.0f32; hd * a];
                    let mut dwk = vec![0.0f32; hd * a];
                    let back = |xs: &[f32], dxa: &[f32], w: &[f32], dx: &mut [f32], dw: &mut [f32], t: usize| {
                        for r in 0..t {
                            let (xr, dar) = (&xs[r * hd..(r + 1) * hd], &dxa[r * a..(r + 1) * a]);
                            for d in 0..hd {
                                dx[r * hd + d] += dot(&w[d * a..(d + 1) * a], dar);
                                dw[d * a..(d + 1) * a].iter_mut().zip(dar).for_each(|(o, &e)| *o += xr[d] * e);
                            }
                        }
                    };
                    back(&x.q, &dqa, wq, &mut g.dq, &mut dwq, tq);
                    back(&x.k, &dka, wk, &mut g.dk, &mut dwk, tk);
                    g.dparams = [dwq, dwk, dva].concat();
                }
            }
            g
        })
        .collect();

    // score parameters: per head, summed over the batch in order
    let add = |dst: &mut [f32], src: &[f32]| dst.iter_mut().zip(src).for_each(|(d, &x)| *d += x);
    match dscores {
        Scores::Dot => {}
        Scores::General { w: dw } => {
            assert_eq!(dw.len(), nh * hd * hd, "general score dw (H,hd,hd)");
            for (bh, g) in grads.iter().enumerate() {
                let h = bh % nh;
                add(&mut dw[h * hd * hd..(h + 1) * hd * hd], &g.dparams);
            }
        }
        Scores::Additive { wq: dwq, wk: dwk, v: dv, width: a } => {
            assert!(dwq.len() == nh * hd * a && dwk.len() == nh * hd * a && dv.len() == nh * a, "additive score grads");
            for (bh, g) in grads.iter().enumerate() {
                let h = bh % nh;
                let gp = &g.dparams;
                add(&mut dwq[h * hd * a..(h + 1) * hd * a], &gp[..hd * a]);
                add(&mut dwk[h * hd * a..(h + 1) * hd * a], &gp[hd * a..2 * hd * a]);
                add(&mut dv[h * a..(h + 1) * a], &gp[2 * hd * a..]);
            }
        }
    }

    // q, k, v: scattered into the source layout, one batch block per task
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
