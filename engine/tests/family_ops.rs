//! The ops added for the transformer family (`attention_ex_*`: dot, general and additive scores,
//! key padding masks; `tanh_*`) against plain f64 references written here and central finite
//! differences of their forward passes. Same method as `op_gradcheck.rs`: a random projection
//! `R`, `L = sum(out * R)`, gradient buffers pre-filled with `ACC` so an op that overwrites
//! instead of accumulating fails (and `attention_ex_backward_set`, on buffers pre-filled with
//! something else, must give the same gradients).
//!
//! Bodies are generic over `B: Backend`; `family_op_tests!` instantiates them per backend (a
//! backend whose `supports` says no to an op skips that case, loudly).

use smelt_engine::backend::{AttnShape, Backend, OptionalOp, QkvSource, ScoreKind, Scores};
use smelt_engine::rng::Rng;

const ACC: f32 = 0.375;
const TOL: f64 = 1e-2;
const STEP: f32 = 1e-2;

fn randn(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std as f64) as f32).collect()
}

fn all<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> B::View<'a> {
    be.view(buf, 0..be.len(buf))
}

fn all_mut<'a, B: Backend>(be: &B, buf: &'a mut B::Buf) -> B::ViewMut<'a> {
    let n = be.len(buf);
    be.view_mut(buf, 0..n)
}

fn host<B: Backend>(be: &B, buf: &B::Buf) -> Vec<f32> {
    be.download(all(be, buf))
}

fn dot64(a: &[f32], r: &[f32]) -> f64 {
    a.iter().zip(r).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn numeric_grad(loss: &mut dyn FnMut(&[Vec<f32>]) -> f64, inputs: &[Vec<f32>], which: usize, h: f32) -> Vec<f64> {
    let mut x = inputs.to_vec();
    (0..inputs[which].len())
        .map(|i| {
            let x0 = inputs[which][i];
            x[which][i] = x0 + h;
            let lp = loss(&x);
            x[which][i] = x0 - h;
            let lm = loss(&x);
            x[which][i] = x0;
            (lp - lm) / ((x0 + h) as f64 - (x0 - h) as f64)
        })
        .collect()
}

fn assert_grad(what: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: gradient length");
    let scale = numeric.iter().chain(analytic).fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(scale > 1e-3, "{what}: gradient is ~0 everywhere ({scale:e}); the check would be vacuous");
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        assert!((a - n).abs() <= tol * scale, "{what}[{i}]: analytic {a}, numeric {n} (scale {scale:e})");
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w}");
    }
}

/// One case: the shape, packed or split source, score kind, optional key lengths.
#[derive(Clone)]
struct Case {
    s: AttnShape,
    split: bool,
    kind: ScoreKind,
    width: usize,
    key_lens: Option<Vec<u32>>,
}

/// Inputs in order: sources ([qkv] or [q, kv]) then the score parameters.
fn inputs(case: &Case, rng: &mut Rng) -> Vec<Vec<f32>> {
    let s = &case.s;
    let (c, h, hd, a) = (s.channels, s.heads, s.head_dim(), case.width);
    let mut x = if case.split {
        vec![randn(rng, s.batch * s.q_len * c, 1.5), randn(rng, s.batch * s.kv_len * 2 * c, 1.5)]
    } else {
        vec![randn(rng, s.batch * s.q_len * 3 * c, 1.5)]
    };
    match case.kind {
        ScoreKind::Dot => {}
        ScoreKind::General => {
            // identity plus noise, as a trained W might look
            let mut w = randn(rng, h * hd * hd, 0.5);
            for hh in 0..h {
                for d in 0..hd {
                    w[hh * hd * hd + d * hd + d] += 1.0;
                }
            }
            x.push(w);
        }
        ScoreKind::Additive => {
            x.push(randn(rng, h * hd * a, 0.7));
            x.push(randn(rng, h * hd * a, 0.7));
            x.push(randn(rng, h * a, 1.0));
        }
    }
    x
}

fn n_src(case: &Case) -> usize {
    if case.split {
        2
    } else {
        1
    }
}

fn scores_of<'a, B: Backend>(be: &B, case: &Case, p: &'a [B::Buf]) -> Scores<B::View<'a>> {
    match case.kind {
        ScoreKind::Dot => Scores::Dot,
        ScoreKind::General => Scores::General { w: all(be, &p[0]) },
        ScoreKind::Additive => Scores::Additive { wq: all(be, &p[0]), wk: all(be, &p[1]), v: all(be, &p[2]), width: case.width },
    }
}

fn src_of<'a, B: Backend>(be: &B, bufs: &'a [B::Buf]) -> QkvSource<B::View<'a>> {
    match bufs {
        [qkv] => QkvSource::Packed(all(be, qkv)),
        [q, kv] => QkvSource::Split { q: all(be, q), kv: all(be, kv) },
        _ => unreachable!(),
    }
}

/// (uploaded inputs, out, saved)
fn forward<B: Backend>(be: &B, case: &Case, x: &[Vec<f32>]) -> (Vec<B::Buf>, B::Buf, B::Buf) {
    let s = case.s;
    let bufs: Vec<B::Buf> = x.iter().map(|v| be.upload(v)).collect();
    let lens = case.key_lens.as_ref().map(|l| be.upload_ids(l));
    let mut out = be.upload(&vec![7.0; s.batch * s.q_len * s.channels]);
    let mut saved = be.zeros(be.attention_saved_len(s));
    let (src, par) = bufs.split_at(n_src(case));
    be.attention_ex_forward(all_mut(be, &mut out), all_mut(be, &mut saved), src_of(be, src), scores_of(be, case, par), lens.as_ref(), s);
    (bufs, out, saved)
}

/// The definition, in f64: per head, softmax over visible keys of score(q_i, k_j), times v.
fn reference(case: &Case, x: &[Vec<f32>]) -> Vec<f64> {
    let s = &case.s;
    let (c, hd, tq, tk, a) = (s.channels, s.head_dim(), s.q_len, s.kv_len, case.width);
    let (q, k, v) = if case.split {
        ((&x[0][..], 0, c), (&x[1][..], 0, 2 * c), (&x[1][..], c, 2 * c))
    } else {
        ((&x[0][..], 0, 3 * c), (&x[0][..], c, 3 * c), (&x[0][..], 2 * c, 3 * c))
    };
    let par = &x[n_src(case)..];
    let at = |(buf, off, stride): (&[f32], usize, usize), row: usize, ch: usize| buf[row * stride + off + ch] as f64;
    let mut out = vec![0.0f64; s.batch * tq * c];
    for b in 0..s.batch {
        let len = case.key_lens.as_ref().map_or(tk, |l| l[b] as usize);
        for h in 0..s.heads {
            for i in 0..tq {
                let n_vis = if s.causal { len.min(i + 1) } else { len };
                let qv: Vec<f64> = (0..hd).map(|d| at(q, b * tq + i, h * hd + d)).collect();
                let scores: Vec<f64> = (0..n_vis)
                    .map(|j| {
                        let kv: Vec<f64> = (0..hd).map(|d| at(k, b * tk + j, h * hd + d)).collect();
                        match case.kind {
                            ScoreKind::Dot => qv.iter().zip(&kv).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt(),
                            ScoreKind::General => {
                                let w = |d: usize, e: usize| par[0][h * hd * hd + d * hd + e] as f64;
                                (0..hd).flat_map(|d| (0..hd).map(move |e| (d, e))).map(|(d, e)| qv[d] * w(d, e) * kv[e]).sum::<f64>()
                                    / (hd as f64).sqrt()
                            }
                            ScoreKind::Additive => (0..a)
                                .map(|t| {
                                    let pre: f64 = (0..hd)
                                        .map(|d| qv[d] * par[0][(h * hd + d) * a + t] as f64 + kv[d] * par[1][(h * hd + d) * a + t] as f64)
                                        .sum();
                                    par[2][h * a + t] as f64 * pre.tanh()
                                })
                                .sum(),
                        }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out[(b * tq + i) * c + h * hd + d] = (0..n_vis).map(|j| e[j] / z * at(v, b * tk + j, h * hd + d)).sum::<f64>();
                }
            }
        }
    }
    out
}

fn required_ops(case: &Case) -> Vec<OptionalOp> {
    let mut ops: Vec<OptionalOp> = OptionalOp::of_scores(case.kind).into_iter().collect();
    if case.key_lens.is_some() {
        ops.push(OptionalOp::KeyPaddingMask);
    }
    ops
}

fn run_case<B: Backend>(be: &B, case: Case, seed: u64) {
    if let Some(op) = required_ops(&case).into_iter().find(|&op| !be.supports(op)) {
        eprintln!("skipping on {}: no {op:?}", be.name());
        return;
    }
    let s = case.s;
    let mut rng = Rng::new(seed);
    let x = inputs(&case, &mut rng);
    let r = randn(&mut rng, s.batch * s.q_len * s.channels, 1.0);
    let tag = format!("{:?} split {} causal {} lens {:?}", case.kind, case.split, s.causal, case.key_lens);

    let (bufs, out, saved) = forward(be, &case, &x);
    assert_close(&format!("{tag} forward"), &host(be, &out), &reference(&case, &x), 1e-5);

    let dout = be.upload(&r);
    let lens = case.key_lens.as_ref().map(|l| be.upload_ids(l));
    // set: attention_ex_backward_set, which writes the sources' gradients over what they held
    let backward = |grads: &mut [B::Buf], set: bool| {
        let (gsrc, gpar) = grads.split_at_mut(n_src(&case));
        let dsrc = match gsrc {
            [dqkv] => QkvSource::Packed(all_mut(be, dqkv)),
            [dq, dkv] => QkvSource::Split { q: all_mut(be, dq), kv: all_mut(be, dkv) },
            _ => unreachable!(),
        };
        let dscores = match (case.kind, gpar) {
            (ScoreKind::Dot, []) => Scores::Dot,
            (ScoreKind::General, [w]) => Scores::General { w: all_mut(be, w) },
            (ScoreKind::Additive, [wq, wk, v]) => Scores::Additive { wq: all_mut(be, wq), wk: all_mut(be, wk), v: all_mut(be, v), width: case.width },
            _ => unreachable!(),
        };
        let (src, par) = bufs.split_at(n_src(&case));
        let (dout, src, scores, out, saved) = (all(be, &dout), src_of(be, src), scores_of(be, &case, par), all(be, &out), all(be, &saved));
        if set {
            be.attention_ex_backward_set(dsrc, dscores, dout, src, scores, lens.as_ref(), out, saved, s);
        } else {
            be.attention_ex_backward(dsrc, dscores, dout, src, scores, lens.as_ref(), out, saved, s);
        }
    };
    let mut grads: Vec<B::Buf> = x.iter().map(|v| be.upload(&vec![ACC; v.len()])).collect();
    backward(&mut grads, false);
    let mut loss = |x: &[Vec<f32>]| dot64(&host(be, &forward(be, &case, x).1), &r);
    for (which, g) in grads.iter().enumerate() {
        let analytic: Vec<f64> = host(be, g).iter().map(|&v| v as f64 - ACC as f64).collect();
        let numeric = numeric_grad(&mut loss, &x, which, STEP);
        assert_grad(&format!("{tag} input {which}"), &analytic, &numeric, TOL);
    }

    // The overwriting variant, on source gradients full of something else: the same gradients
    // (padded keys' rows included: zeros), while the score parameters' still accumulate.
    let mut over: Vec<B::Buf> = x.iter().enumerate().map(|(i, v)| be.upload(&vec![if i < n_src(&case) { -7.0 } else { ACC }; v.len()])).collect();
    backward(&mut over, true);
    for (which, (g, o)) in grads.iter().zip(&over).enumerate() {
        let want: Vec<f64> = host(be, g).iter().map(|&v| v as f64 - if which < n_src(&case) { ACC as f64 } else { 0.0 }).collect();
        assert_close(&format!("{tag} input {which}: attention_ex_backward_set vs the accumulating op"), &host(be, o), &want, 1e-5);
    }
}

fn shape(q_len: usize, kv_len: usize, causal: bool) -> AttnShape {
    AttnShape { batch: 2, q_len, kv_len, channels: 8, heads: 2, causal }
}

pub fn check_masked_dot<B: Backend>(be: &B) {
    run_case(be, Case { s: shape(5, 5, false), split: false, kind: ScoreKind::Dot, width: 0, key_lens: Some(vec![3, 5]) }, 31);
    run_case(be, Case { s: shape(5, 5, true), split: false, kind: ScoreKind::Dot, width: 0, key_lens: Some(vec![2, 4]) }, 32);
    run_case(be, Case { s: shape(3, 5, false), split: true, kind: ScoreKind::Dot, width: 0, key_lens: Some(vec![4, 1]) }, 33);
}

pub fn check_general<B: Backend>(be: &B) {
    run_case(be, Case { s: shape(5, 5, true), split: false, kind: ScoreKind::General, width: 0, key_lens: None }, 34);
    run_case(be, Case { s: shape(3, 5, false), split: true, kind: ScoreKind::General, width: 0, key_lens: Some(vec![5, 2]) }, 35);
}

pub fn check_additive<B: Backend>(be: &B) {
    run_case(be, Case { s: shape(5, 5, false), split: false, kind: ScoreKind::Additive, width: 3, key_lens: Some(vec![4, 5]) }, 36);
    run_case(be, Case { s: shape(3, 4, false), split: true, kind: ScoreKind::Additive, width: 5, key_lens: None }, 37);
    run_case(be, Case { s: shape(4, 4, true), split: false, kind: ScoreKind::Additive, width: 4, key_lens: None }, 38);
}

/// Keys and values past a sequence's length change nothing (bitwise), and the unmasked dot case
/// of `attention_ex` is `attention_forward` exactly.
pub fn check_mask_hides_padding<B: Backend>(be: &B) {
    let s = shape(6, 6, false);
    let c = s.channels;
    let case = Case { s, split: false, kind: ScoreKind::Dot, width: 0, key_lens: Some(vec![4, 6]) };
    if !be.supports(OptionalOp::KeyPaddingMask) {
        return;
    }
    let mut rng = Rng::new(39);
    let qkv = randn(&mut rng, s.batch * 6 * 3 * c, 1.0);
    let base = host(be, &forward(be, &case, std::slice::from_ref(&qkv)).1);
    let mut changed = qkv.clone();
    for j in 4..6 {
        changed[j * 3 * c + c..(j + 1) * 3 * c].iter_mut().for_each(|x| *x += 5.0);
    }
    let after = host(be, &forward(be, &case, &[changed]).1);
    assert_eq!(after, base, "keys/values past key_lens[0] = 4 changed the output");

    let unmasked = Case { key_lens: None, ..case };
    let ex = host(be, &forward(be, &unmasked, std::slice::from_ref(&qkv)).1);
    let q = be.upload(&qkv);
    let mut out = be.zeros(s.batch * 6 * c);
    let mut saved = be.zeros(be.attention_saved_len(s));
    be.attention_forward(all_mut(be, &mut out), all_mut(be, &mut saved), QkvSource::Packed(all(be, &q)), s);
    assert_close("attention_ex dot without mask vs attention_forward", &ex, &host(be, &out).iter().map(|&x| x as f64).collect::<Vec<_>>(), 1e-6);
}

pub fn check_tanh<B: Backend>(be: &B) {
    let mut rng = Rng::new(40);
    let x = randn(&mut rng, 37, 1.5);
    let r = randn(&mut rng, 37, 1.0);
    let fwd = |x: &[Vec<f32>]| {
        let inp = be.upload(&x[0]);
        let mut out = be.upload(&vec![7.0; x[0].len()]);
        be.tanh_forward(all_mut(be, &mut out), all(be, &inp));
        host(be, &out)
    };
    let y = fwd(std::slice::from_ref(&x));
    assert_close("tanh forward", &y, &x.iter().map(|&v| (v as f64).tanh()).collect::<Vec<_>>(), 1e-6);
    let (yb, dout) = (be.upload(&y), be.upload(&r));
    let mut dx = be.upload(&vec![ACC; 37]);
    be.tanh_backward(all_mut(be, &mut dx), all(be, &yb), all(be, &dout));
    let analytic: Vec<f64> = host(be, &dx).iter().map(|&v| v as f64 - ACC as f64).collect();
    let numeric = numeric_grad(&mut |x| dot64(&fwd(x), &r), &[x], 0, STEP);
    assert_grad("tanh dinp", &analytic, &numeric, TOL);
}

macro_rules! family_op_tests {
    ($name:ident, $backend:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn attention_masked_dot() {
                check_masked_dot(&$backend);
            }
            #[test]
            fn attention_general_scores() {
                check_general(&$backend);
            }
            #[test]
            fn attention_additive_scores() {
                check_additive(&$backend);
            }
            #[test]
            fn attention_mask_hides_padding() {
                check_mask_hides_padding(&$backend);
            }
            #[test]
            fn tanh() {
                check_tanh(&$backend);
            }
        }
    };
}

family_op_tests!(cpu, smelt_engine::CpuBackend::new());
