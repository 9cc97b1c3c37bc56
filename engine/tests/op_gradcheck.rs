//! Every `Backend` op's backward against central finite differences of its forward, and the
//! forward passes against plain references written here.
//!
//! Method: seeded random inputs, a random projection `R`, the objective `L = sum(out * R)` in f64
//! on the host. The analytic gradient is the op's backward with `dout = R`, written into gradient
//! buffers pre-filled with `ACC` (so an op that overwrites instead of accumulating fails), minus
//! `ACC`. The numeric gradient is a central difference of `L` for every input element. Errors are
//! measured against the largest gradient entry of the tensor.
//!
//! The bodies are generic over `B: Backend` and instantiated per backend by `backend_op_tests!`
//! at the bottom of this file; another backend adds one line, e.g.
//! `backend_op_tests!(cuda, *cuda_f32().unwrap(), cuda_f32().is_some());` (skips without a GPU).

use smelt_engine::backend::{
    AdamWStep, AttnShape, Backend, Dropout, MatmulShape, QkvSource, RopeShape, WeightLayout, IGNORE_INDEX,
};
use smelt_engine::rng::Rng;

/// What gradient buffers hold before a backward call.
const ACC: f32 = 0.375;
/// Allowed error of a gradient, relative to the tensor's largest entry.
const TOL: f64 = 1e-2;
/// Central-difference step on f32 inputs.
const STEP: f32 = 1e-2;

// ---- helpers ----------------------------------------------------------------------------------

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

/// A gradient buffer holding `ACC` everywhere.
fn prefilled<B: Backend>(be: &B, n: usize) -> B::Buf {
    be.upload(&vec![ACC; n])
}

/// What a backward call added to a buffer that held `ACC`.
fn accumulated<B: Backend>(be: &B, buf: &B::Buf) -> Vec<f64> {
    host(be, buf).iter().map(|&x| x as f64 - ACC as f64).collect()
}

fn dot64(a: &[f32], r: &[f32]) -> f64 {
    assert_eq!(a.len(), r.len(), "projection length");
    a.iter().zip(r).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Central differences of `loss` with respect to every element of `inputs[which]`.
fn numeric_grad(
    loss: &mut dyn FnMut(&[Vec<f32>]) -> f64,
    inputs: &[Vec<f32>],
    which: usize,
    h: f32,
) -> Vec<f64> {
    let mut x = inputs.to_vec();
    (0..inputs[which].len())
        .map(|i| {
            let x0 = inputs[which][i];
            let (xp, xm) = (x0 + h, x0 - h);
            x[which][i] = xp;
            let lp = loss(&x);
            x[which][i] = xm;
            let lm = loss(&x);
            x[which][i] = x0;
            (lp - lm) / (xp as f64 - xm as f64)
        })
        .collect()
}

/// max |analytic - numeric| <= tol * max |numeric|, and the gradient is not trivially zero.
fn assert_grad(what: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: gradient length");
    let scale = numeric.iter().chain(analytic).fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(scale > 1e-3, "{what}: gradient is ~0 everywhere ({scale:e}); the check would be vacuous");
    let (worst, i) = analytic
        .iter()
        .zip(numeric)
        .enumerate()
        .map(|(i, (a, n))| ((a - n).abs(), i))
        .fold((0.0f64, 0), |m, x| if x.0 > m.0 { x } else { m });
    assert!(
        worst <= tol * scale,
        "{what}: analytic and numeric gradients differ by {worst:e} at [{i}] (analytic {}, numeric {}), \
         {:.3e} of the largest entry {scale:e}",
        analytic[i],
        numeric[i],
        worst / scale
    );
}

/// max |got - want| <= tol * max(max |want|, 1).
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * scale,
            "{what}[{i}]: got {g}, want {w} (tolerance {:e})",
            tol * scale
        );
    }
}

// ---- embedding --------------------------------------------------------------------------------

pub fn check_embedding<B: Backend>(be: &B) {
    let (rows, c) = (5, 6);
    // ids 3 three times and 0 twice: their table rows receive several gradients; row 2 none
    let ids_host = [3u32, 0, 3, 4, 1, 3, 0];
    let n = ids_host.len();
    let mut rng = Rng::new(11);
    let table = randn(&mut rng, rows * c, 1.0);
    let init = randn(&mut rng, n * c, 1.0);
    let r = randn(&mut rng, n * c, 1.0);
    let ids = be.upload_ids(&ids_host);

    for accumulate in [false, true] {
        let fwd = |x: &[Vec<f32>]| {
            let mut out = be.upload(&init);
            let table = be.upload(&x[0]);
            be.embedding_forward(all_mut(be, &mut out), &ids, all(be, &table), c, accumulate);
            host(be, &out)
        };
        let out = fwd(std::slice::from_ref(&table));
        for (k, &id) in ids_host.iter().enumerate() {
            for j in 0..c {
                let t = table[id as usize * c + j];
                let want = if accumulate { init[k * c + j] + t } else { t };
                assert_eq!(out[k * c + j], want, "embedding forward (accumulate {accumulate}) at [{k}, {j}]");
            }
        }

        let mut dtable = prefilled(be, rows * c);
        let dout = be.upload(&r);
        be.embedding_backward(all_mut(be, &mut dtable), all(be, &dout), &ids, c);
        let dhost = host(be, &dtable);
        assert!(dhost[2 * c..3 * c].iter().all(|&x| x == ACC), "embedding backward touched an unused row");
        let analytic = accumulated(be, &dtable);
        let numeric = numeric_grad(&mut |x| dot64(&fwd(x), &r), std::slice::from_ref(&table), 0, STEP);
        assert_grad(&format!("embedding dtable (accumulate {accumulate})"), &analytic, &numeric, TOL);
    }
}

// ---- matmul -----------------------------------------------------------------------------------

/// W viewed as (in, out), whatever its layout.
fn w_at(w: &[f32], s: &MatmulShape, i: usize, o: usize) -> f64 {
    (match s.layout {
        WeightLayout::InOut => w[i * s.out_features + o],
        WeightLayout::OutIn => w[o * s.in_features + i],
    }) as f64
}

fn matmul_ref(inp: &[f32], w: &[f32], bias: Option<&[f32]>, s: &MatmulShape) -> Vec<f64> {
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    let mut out = vec![0.0f64; n * oc];
    for r in 0..n {
        for o in 0..oc {
            let mut acc = bias.map_or(0.0, |b| b[o] as f64);
            for i in 0..ic {
                acc += inp[r * ic + i] as f64 * w_at(w, s, i, o);
            }
            out[r * oc + o] = acc;
        }
    }
    out
}

fn matmul_forward_host<B: Backend>(be: &B, inp: &[f32], w: &[f32], bias: Option<&[f32]>, s: MatmulShape) -> Vec<f32> {
    // garbage in the output: the forward must overwrite it, with or without a bias
    let mut out = be.upload(&vec![7.0; s.rows * s.out_features]);
    let (inp, w) = (be.upload(inp), be.upload(w));
    let bias = bias.map(|b| be.upload(b));
    be.matmul_forward(all_mut(be, &mut out), all(be, &inp), all(be, &w), bias.as_ref().map(|b| all(be, b)), s);
    host(be, &out)
}

/// (dinp, dweight, dbias) added by one backward call, None for the gradients not asked for.
fn matmul_backward_host<B: Backend>(
    be: &B,
    inp: &[f32],
    w: &[f32],
    dout: &[f32],
    want_dinp: bool,
    want_dbias: bool,
    s: MatmulShape,
) -> (Option<Vec<f64>>, Vec<f64>, Option<Vec<f64>>) {
    let (inp, w, dout) = (be.upload(inp), be.upload(w), be.upload(dout));
    let mut dinp = want_dinp.then(|| prefilled(be, s.rows * s.in_features));
    let mut dw = prefilled(be, s.in_features * s.out_features);
    let mut db = want_dbias.then(|| prefilled(be, s.out_features));
    be.matmul_backward(
        dinp.as_mut().map(|d| all_mut(be, d)),
        all_mut(be, &mut dw),
        db.as_mut().map(|d| all_mut(be, d)),
        all(be, &dout),
        all(be, &inp),
        all(be, &w),
        s,
    );
    (dinp.map(|d| accumulated(be, &d)), accumulated(be, &dw), db.map(|d| accumulated(be, &d)))
}

pub fn check_matmul<B: Backend>(be: &B) {
    let mut rng = Rng::new(12);
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        let s = MatmulShape { rows: 7, in_features: 5, out_features: 9, layout };
        let inp = randn(&mut rng, s.rows * s.in_features, 1.0);
        let w = randn(&mut rng, s.in_features * s.out_features, 1.0);
        let b = randn(&mut rng, s.out_features, 1.0);
        let r = randn(&mut rng, s.rows * s.out_features, 1.0);
        for with_bias in [true, false] {
            for with_dinp in [true, false] {
                let tag = format!("matmul {layout:?} bias {with_bias} dinp {with_dinp}");
                let fwd = |x: &[Vec<f32>]| matmul_forward_host(be, &x[0], &x[1], with_bias.then_some(&x[2][..]), s);
                let inputs = [inp.clone(), w.clone(), b.clone()];
                let out = fwd(&inputs);
                assert_close(&format!("{tag} forward"), &out, &matmul_ref(&inp, &w, with_bias.then_some(&b[..]), &s), 1e-5);

                let (dinp, dw, db) = matmul_backward_host(be, &inp, &w, &r, with_dinp, with_bias, s);
                let mut loss = |x: &[Vec<f32>]| dot64(&fwd(x), &r);
                assert_grad(&format!("{tag} dweight"), &dw, &numeric_grad(&mut loss, &inputs, 1, STEP), TOL);
                assert_eq!(dinp.is_some(), with_dinp);
                if let Some(dinp) = dinp {
                    assert_grad(&format!("{tag} dinp"), &dinp, &numeric_grad(&mut loss, &inputs, 0, STEP), TOL);
                }
                if let Some(db) = db {
                    assert_grad(&format!("{tag} dbias"), &db, &numeric_grad(&mut loss, &inputs, 2, STEP), TOL);
                }
            }
        }
    }

    // matmul_backward_set_dinp: dinp overwritten (whatever it held), the same values the
    // accumulating op adds; dW and dbias still accumulate.
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        let s = MatmulShape { rows: 7, in_features: 5, out_features: 9, layout };
        let (inp, w, r) = (randn(&mut rng, 35, 1.0), randn(&mut rng, 45, 1.0), randn(&mut rng, 63, 1.0));
        let (dinp_acc, dw_acc, db_acc) = matmul_backward_host(be, &inp, &w, &r, true, true, s);
        let (inp_d, w_d, r_d) = (be.upload(&inp), be.upload(&w), be.upload(&r));
        let mut dinp = be.upload(&randn(&mut rng, 35, 100.0));
        let (mut dw, mut db) = (prefilled(be, 45), prefilled(be, 9));
        be.matmul_backward_set_dinp(all_mut(be, &mut dinp), all_mut(be, &mut dw), Some(all_mut(be, &mut db)), all(be, &r_d), all(be, &inp_d), all(be, &w_d), s);
        let got: Vec<f64> = host(be, &dinp).iter().map(|&x| x as f64).collect();
        assert_close_f64(&format!("set_dinp {layout:?} dinp"), &got, &dinp_acc.unwrap(), 1e-5);
        assert_close_f64(&format!("set_dinp {layout:?} dweight"), &accumulated(be, &dw), &dw_acc, 1e-5);
        assert_close_f64(&format!("set_dinp {layout:?} dbias"), &accumulated(be, &db), &db_acc.unwrap(), 1e-5);
    }
}

fn assert_close_f64(tag: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{tag}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{tag}[{i}]: got {g}, want {w}");
    }
}

/// Shapes past gemm's small-matrix paths and past one 64-row reduction chunk, against the
/// closed-form gradients (dinp = dout W^T, dW = inp^T dout, db = column sums of dout) in f64.
pub fn check_matmul_larger<B: Backend>(be: &B) {
    let mut rng = Rng::new(13);
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        let s = MatmulShape { rows: 131, in_features: 67, out_features: 45, layout };
        let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
        let inp = randn(&mut rng, n * ic, 1.0);
        let w = randn(&mut rng, ic * oc, 1.0);
        let b = randn(&mut rng, oc, 1.0);
        let dout = randn(&mut rng, n * oc, 1.0);
        let tag = format!("matmul {layout:?} {n}x{ic}x{oc}");
        let out = matmul_forward_host(be, &inp, &w, Some(&b), s);
        assert_close(&format!("{tag} forward"), &out, &matmul_ref(&inp, &w, Some(&b), &s), 1e-5);

        let (dinp, dw, db) = matmul_backward_host(be, &inp, &w, &dout, true, true, s);
        let mut want_dinp = vec![0.0f64; n * ic];
        let mut want_dw = vec![0.0f64; ic * oc];
        let mut want_db = vec![0.0f64; oc];
        for r in 0..n {
            for o in 0..oc {
                let g = dout[r * oc + o] as f64;
                want_db[o] += g;
                for i in 0..ic {
                    want_dinp[r * ic + i] += g * w_at(&w, &s, i, o);
                    let at = match layout {
                        WeightLayout::InOut => i * oc + o,
                        WeightLayout::OutIn => o * ic + i,
                    };
                    want_dw[at] += inp[r * ic + i] as f64 * g;
                }
            }
        }
        assert_grad(&format!("{tag} dinp"), &dinp.unwrap(), &want_dinp, 1e-5);
        assert_grad(&format!("{tag} dweight"), &dw, &want_dw, 1e-5);
        assert_grad(&format!("{tag} dbias"), &db.unwrap(), &want_db, 1e-5);
    }
}

// ---- layernorm --------------------------------------------------------------------------------

fn layernorm_case<B: Backend>(be: &B, n: usize, c: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    // rows with their own offset and spread, as real activations have
    let mut inp = randn(&mut rng, n * c, 1.0);
    for row in inp.chunks_mut(c) {
        let (shift, spread) = (rng.normal() as f32 * 2.0, 0.5 + rng.next_f64() as f32 * 2.0);
        row.iter_mut().for_each(|x| *x = *x * spread + shift);
    }
    let w: Vec<f32> = (0..c).map(|_| 1.0 + 0.5 * rng.normal() as f32).collect();
    let b = randn(&mut rng, c, 1.0);
    let r = randn(&mut rng, n * c, 1.0);
    let tag = format!("layernorm {n}x{c}");

    let run = |x: &[Vec<f32>]| {
        let (inp, w, b) = (be.upload(&x[0]), be.upload(&x[1]), be.upload(&x[2]));
        let (mut out, mut mean, mut rstd) = (be.zeros(n * c), be.zeros(n), be.zeros(n));
        be.layernorm_forward(all_mut(be, &mut out), all_mut(be, &mut mean), all_mut(be, &mut rstd), all(be, &inp), all(be, &w), all(be, &b), c);
        (out, mean, rstd)
    };
    let inputs = [inp.clone(), w.clone(), b.clone()];
    let (out, mean, rstd) = run(&inputs);

    // forward against the definition (eps 1e-5, biased variance)
    let mut want_out = vec![0.0f64; n * c];
    let (mut want_mean, mut want_rstd) = (vec![0.0f64; n], vec![0.0f64; n]);
    for k in 0..n {
        let x = &inp[k * c..(k + 1) * c];
        let m = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + 1e-5).sqrt();
        want_mean[k] = m;
        want_rstd[k] = rs;
        for i in 0..c {
            want_out[k * c + i] = (x[i] as f64 - m) * rs * w[i] as f64 + b[i] as f64;
        }
    }
    assert_close(&format!("{tag} out"), &host(be, &out), &want_out, 1e-5);
    assert_close(&format!("{tag} mean"), &host(be, &mean), &want_mean, 1e-5);
    let got_rstd = host(be, &rstd);
    for k in 0..n {
        let rel = (got_rstd[k] as f64 - want_rstd[k]).abs() / want_rstd[k];
        assert!(rel < 1e-5, "{tag} rstd[{k}]: got {}, want {}", got_rstd[k], want_rstd[k]);
    }

    let (dinp, dw, db) = (prefilled(be, n * c), prefilled(be, c), prefilled(be, c));
    let (mut dinp, mut dw, mut db) = (dinp, dw, db);
    let dout = be.upload(&r);
    let (inp_d, w_d) = (be.upload(&inp), be.upload(&w));
    be.layernorm_backward(
        all_mut(be, &mut dinp),
        all_mut(be, &mut dw),
        all_mut(be, &mut db),
        all(be, &dout),
        all(be, &inp_d),
        all(be, &w_d),
        all(be, &mean),
        all(be, &rstd),
        c,
    );
    let mut loss = |x: &[Vec<f32>]| dot64(&host(be, &run(x).0), &r);
    for (name, got, which) in [("dinp", &dinp, 0), ("dweight", &dw, 1), ("dbias", &db, 2)] {
        let numeric = numeric_grad(&mut loss, &inputs, which, STEP);
        assert_grad(&format!("{tag} {name}"), &accumulated(be, got), &numeric, TOL);
    }
}

pub fn check_layernorm<B: Backend>(be: &B) {
    layernorm_case(be, 5, 7, 14);
    // more rows than one reduction chunk (64), so dweight/dbias sum partial chunks
    layernorm_case(be, 70, 6, 15);
}

// ---- attention --------------------------------------------------------------------------------

/// Host buffers of one attention source: `[qkv]` (packed) or `[q, kv]` (split).
fn attention_src<'a, B: Backend>(be: &B, bufs: &'a [B::Buf]) -> QkvSource<B::View<'a>> {
    match bufs {
        [qkv] => QkvSource::Packed(all(be, qkv)),
        [q, kv] => QkvSource::Split { q: all(be, q), kv: all(be, kv) },
        _ => unreachable!(),
    }
}

fn attention_forward_host<B: Backend>(be: &B, x: &[Vec<f32>], s: AttnShape) -> (Vec<B::Buf>, B::Buf, B::Buf) {
    let bufs: Vec<B::Buf> = x.iter().map(|v| be.upload(v)).collect();
    let mut out = be.upload(&vec![7.0; s.batch * s.q_len * s.channels]);
    let mut saved = be.zeros(be.attention_saved_len(s));
    be.attention_forward(all_mut(be, &mut out), all_mut(be, &mut saved), attention_src(be, &bufs), s);
    (bufs, out, saved)
}

/// softmax(q k^T / sqrt(hd)) v per head, in f64, with explicit scores.
fn attention_ref(x: &[Vec<f32>], s: &AttnShape) -> Vec<f64> {
    let (c, hd, tq, tk) = (s.channels, s.head_dim(), s.q_len, s.kv_len);
    // (buffer, offset, row stride) of q, k and v
    let (q, k, v) = match x {
        [qkv] => ((&qkv[..], 0, 3 * c), (&qkv[..], c, 3 * c), (&qkv[..], 2 * c, 3 * c)),
        [q, kv] => ((&q[..], 0, c), (&kv[..], 0, 2 * c), (&kv[..], c, 2 * c)),
        _ => unreachable!(),
    };
    let at = |(buf, off, stride): (&[f32], usize, usize), row: usize, ch: usize| buf[row * stride + off + ch] as f64;
    let mut out = vec![0.0f64; s.batch * tq * c];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..tq {
                let n_vis = if s.causal { i + 1 } else { tk };
                let scores: Vec<f64> = (0..n_vis)
                    .map(|j| {
                        (0..hd).map(|d| at(q, b * tq + i, h * hd + d) * at(k, b * tk + j, h * hd + d)).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out[(b * tq + i) * c + h * hd + d] =
                        (0..n_vis).map(|j| e[j] / z * at(v, b * tk + j, h * hd + d)).sum::<f64>();
                }
            }
        }
    }
    out
}

fn attention_case<B: Backend>(be: &B, s: AttnShape, split: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    let c = s.channels;
    // std 1.5: scores spread enough that softmax is far from uniform
    let x: Vec<Vec<f32>> = if split {
        vec![randn(&mut rng, s.batch * s.q_len * c, 1.5), randn(&mut rng, s.batch * s.kv_len * 2 * c, 1.5)]
    } else {
        vec![randn(&mut rng, s.batch * s.q_len * 3 * c, 1.5)]
    };
    let r = randn(&mut rng, s.batch * s.q_len * c, 1.0);
    let tag = format!("attention {} causal {} B{} Tq{} Tk{} C{} H{}", if split { "split" } else { "packed" }, s.causal, s.batch, s.q_len, s.kv_len, c, s.heads);

    let (bufs, out, saved) = attention_forward_host(be, &x, s);
    assert_close(&format!("{tag} forward"), &host(be, &out), &attention_ref(&x, &s), 1e-5);

    let dout = be.upload(&r);
    let mut grads: Vec<B::Buf> = x.iter().map(|v| prefilled(be, v.len())).collect();
    let dsrc = match &mut grads[..] {
        [dqkv] => QkvSource::Packed(all_mut(be, dqkv)),
        [dq, dkv] => QkvSource::Split { q: all_mut(be, dq), kv: all_mut(be, dkv) },
        _ => unreachable!(),
    };
    be.attention_backward(dsrc, all(be, &dout), attention_src(be, &bufs), all(be, &out), all(be, &saved), s);

    let mut loss = |x: &[Vec<f32>]| dot64(&host(be, &attention_forward_host(be, x, s).1), &r);
    let names = if split { ["dq", "dkv"].as_slice() } else { ["dqkv"].as_slice() };
    let mut set: Vec<B::Buf> = x.iter().map(|v| be.upload(&vec![f32::NAN; v.len()])).collect();
    let dsrc = match &mut set[..] {
        [dqkv] => QkvSource::Packed(all_mut(be, dqkv)),
        [dq, dkv] => QkvSource::Split { q: all_mut(be, dq), kv: all_mut(be, dkv) },
        _ => unreachable!(),
    };
    be.attention_backward_set(dsrc, all(be, &dout), attention_src(be, &bufs), all(be, &out), all(be, &saved), s);
    for (which, name) in names.iter().enumerate() {
        let numeric = numeric_grad(&mut loss, &x, which, STEP);
        assert_grad(&format!("{tag} {name}"), &accumulated(be, &grads[which]), &numeric, TOL);
        // The overwriting variant: the same gradient, whatever the buffer held (NaN here).
        let got: Vec<f64> = host(be, &set[which]).iter().map(|&v| v as f64).collect();
        assert_grad(&format!("{tag} {name} (set)"), &got, &numeric, TOL);
    }
}

pub fn check_attention_causal<B: Backend>(be: &B) {
    let s = AttnShape { batch: 2, q_len: 5, kv_len: 5, channels: 8, heads: 2, causal: true };
    attention_case(be, s, false, 16);
}

pub fn check_attention_bidirectional<B: Backend>(be: &B) {
    let s = AttnShape { batch: 2, q_len: 5, kv_len: 5, channels: 8, heads: 2, causal: false };
    attention_case(be, s, false, 17);
}

pub fn check_attention_cross<B: Backend>(be: &B) {
    let s = AttnShape { batch: 2, q_len: 3, kv_len: 5, channels: 8, heads: 2, causal: false };
    attention_case(be, s, true, 18);
}

/// In causal attention, output row i is exactly unchanged when the keys and values of positions
/// j > i change (and row j itself does change).
pub fn check_attention_causal_mask<B: Backend>(be: &B) {
    let s = AttnShape { batch: 2, q_len: 6, kv_len: 6, channels: 8, heads: 2, causal: true };
    let (c, t) = (s.channels, s.q_len);
    let mut rng = Rng::new(19);
    let qkv = randn(&mut rng, s.batch * t * 3 * c, 1.0);
    let base = host(be, &attention_forward_host(be, std::slice::from_ref(&qkv), s).1);
    for j in 1..t {
        let mut changed = qkv.clone();
        for b in 0..s.batch {
            let row = &mut changed[(b * t + j) * 3 * c..(b * t + j + 1) * 3 * c];
            // keys and values only (the query of row j is [0, c))
            row[c..].iter_mut().for_each(|x| *x += 3.0 * rng.normal() as f32);
        }
        let out = host(be, &attention_forward_host(be, &[changed], s).1);
        for b in 0..s.batch {
            for i in 0..t {
                let r = (b * t + i) * c..(b * t + i + 1) * c;
                if i < j {
                    assert_eq!(out[r.clone()], base[r], "row {i} (batch {b}) saw keys/values of position {j}");
                } else if i == j {
                    assert_ne!(out[r.clone()], base[r], "row {j} (batch {b}) ignored its own key/value");
                }
            }
        }
    }
}

// ---- gelu, residual ---------------------------------------------------------------------------

pub fn check_gelu<B: Backend>(be: &B) {
    let mut rng = Rng::new(20);
    let mut inp: Vec<f32> = (0..17).map(|i| -4.0 + 0.5 * i as f32).collect();
    inp.extend(randn(&mut rng, 23, 2.0));
    let r = randn(&mut rng, inp.len(), 1.0);
    let fwd = |x: &[Vec<f32>]| {
        let inp = be.upload(&x[0]);
        let mut out = be.upload(&vec![7.0; x[0].len()]);
        be.gelu_forward(all_mut(be, &mut out), all(be, &inp));
        host(be, &out)
    };
    let want: Vec<f64> = inp
        .iter()
        .map(|&x| {
            let x = x as f64;
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        })
        .collect();
    assert_close("gelu forward", &fwd(&[inp.clone()]), &want, 1e-5);

    let (inp_d, dout) = (be.upload(&inp), be.upload(&r));
    let mut dinp = prefilled(be, inp.len());
    be.gelu_backward(all_mut(be, &mut dinp), all(be, &inp_d), all(be, &dout));
    let numeric = numeric_grad(&mut |x| dot64(&fwd(x), &r), &[inp.clone()], 0, STEP);
    assert_grad("gelu dinp", &accumulated(be, &dinp), &numeric, TOL);
    // The overwriting variant: the same gradient whatever dinp held.
    let mut set = be.upload(&vec![f32::NAN; inp.len()]);
    be.gelu_backward_set(all_mut(be, &mut set), all(be, &inp_d), all(be, &dout));
    let set: Vec<f64> = host(be, &set).iter().map(|&x| x as f64).collect();
    assert_grad("gelu dinp (set)", &set, &numeric, TOL);
}

/// RoPE: the forward against a reference written here (angles in f64), the inverse turn
/// against finite differences of the forward (it is the forward's transpose, its backward).
pub fn check_rope<B: Backend>(be: &B) {
    let mut rng = Rng::new(24);
    let s = RopeShape { rows: 2 * 5, seq_len: 5, channels: 12, heads: 2 };
    let (c, hd) = (s.channels, s.head_dim());
    let table = be.upload(&smelt_engine::model::rotary::table(8, hd));
    let x = randn(&mut rng, s.rows * 3 * c, 1.0);
    let r = randn(&mut rng, x.len(), 1.0);
    let fwd = |x: &[Vec<f32>]| {
        let mut buf = be.upload(&x[0]);
        be.rope(all_mut(be, &mut buf), all(be, &table), s, false);
        host(be, &buf)
    };
    let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for row in 0..s.rows {
        let pos = (row % s.seq_len) as f64;
        for head in 0..2 * s.heads {
            let at = row * 3 * c + head * hd; // q heads, then k heads
            for i in 0..hd / 2 {
                let angle = pos * 10_000f64.powf(-((2 * i) as f64) / hd as f64);
                let (a, b) = (x[at + i] as f64, x[at + i + hd / 2] as f64);
                want[at + i] = a * angle.cos() - b * angle.sin();
                want[at + i + hd / 2] = b * angle.cos() + a * angle.sin();
            }
        }
    }
    assert_close("rope forward", &fwd(&[x.clone()]), &want, 1e-5);

    let mut d = be.upload(&r);
    be.rope(all_mut(be, &mut d), all(be, &table), s, true);
    let analytic: Vec<f64> = host(be, &d).iter().map(|&v| v as f64).collect();
    let numeric = numeric_grad(&mut |x| dot64(&fwd(x), &r), &[x.clone()], 0, STEP);
    assert_grad("rope inverse = backward", &analytic, &numeric, TOL);
}

pub fn check_residual<B: Backend>(be: &B) {
    let mut rng = Rng::new(21);
    let n = 29;
    let (a, b, r) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
    let fwd = |x: &[Vec<f32>]| {
        let (a, b) = (be.upload(&x[0]), be.upload(&x[1]));
        let mut out = be.upload(&vec![7.0; n]);
        be.residual_forward(all_mut(be, &mut out), all(be, &a), all(be, &b));
        host(be, &out)
    };
    let inputs = [a.clone(), b.clone()];
    let out = fwd(&inputs);
    for i in 0..n {
        assert_eq!(out[i], a[i] + b[i], "residual forward [{i}]");
    }
    let (mut da, mut db, dout) = (prefilled(be, n), prefilled(be, n), be.upload(&r));
    be.residual_backward(all_mut(be, &mut da), all_mut(be, &mut db), all(be, &dout));
    let mut loss = |x: &[Vec<f32>]| dot64(&fwd(x), &r);
    assert_grad("residual da", &accumulated(be, &da), &numeric_grad(&mut loss, &inputs, 0, STEP), TOL);
    assert_grad("residual db", &accumulated(be, &db), &numeric_grad(&mut loss, &inputs, 1, STEP), TOL);
}

// ---- cross-entropy ----------------------------------------------------------------------------

pub fn check_cross_entropy<B: Backend>(be: &B) {
    let (n, v) = (6, 7);
    let targets = [2u32, IGNORE_INDEX, 0, 6, IGNORE_INDEX, 3];
    let mut rng = Rng::new(22);
    let mut logits = randn(&mut rng, n * v, 2.0);
    // a row of large logits
    logits[3 * v..4 * v].iter_mut().for_each(|x| *x += 100.0);
    let dloss = 0.7f32;
    let ids = be.upload_ids(&targets);

    let run = |x: &[Vec<f32>]| {
        let logits = be.upload(&x[0]);
        let (mut losses, mut lse) = (be.upload(&vec![7.0; n]), be.zeros(n));
        be.cross_entropy_forward(all_mut(be, &mut losses), all_mut(be, &mut lse), all(be, &logits), &ids, v);
        (host(be, &losses), lse)
    };
    let (losses, lse) = run(&[logits.clone()]);
    let lse_host = host(be, &lse);
    for k in 0..n {
        let row = &logits[k * v..(k + 1) * v];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let want_lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        assert!((lse_host[k] as f64 - want_lse).abs() < 1e-5 * want_lse.abs().max(1.0), "lse[{k}]: got {}, want {want_lse}", lse_host[k]);
        if targets[k] == IGNORE_INDEX {
            assert_eq!(losses[k], 0.0, "ignored row {k} has a loss");
        } else {
            let want = want_lse - row[targets[k] as usize] as f64;
            assert!(want > 0.0 && (losses[k] as f64 - want).abs() < 2e-5 * want.max(1.0), "loss[{k}]: got {}, want {want}", losses[k]);
        }
    }

    let logits_d = be.upload(&logits);
    let mut dlogits = prefilled(be, n * v);
    be.cross_entropy_backward(all_mut(be, &mut dlogits), all(be, &logits_d), all(be, &lse), &ids, dloss, v);
    let dhost = host(be, &dlogits);
    for k in [1, 4] {
        assert!(dhost[k * v..(k + 1) * v].iter().all(|&x| x == ACC), "ignored row {k} got a gradient");
    }
    let numeric = numeric_grad(&mut |x| dloss as f64 * run(x).0.iter().map(|&l| l as f64).sum::<f64>(), &[logits.clone()], 0, STEP);
    let analytic = accumulated(be, &dlogits);
    assert_grad("cross-entropy dlogits", &analytic, &numeric, TOL);

    // Softmax is shift-invariant: logits + 1000 (exp overflows even in f64 unless the maximum is
    // subtracted first) give the same losses and gradients, up to the rounding of the shift.
    let shifted: Vec<f32> = logits.iter().map(|&x| x + 1000.0).collect();
    let (losses2, lse2) = run(std::slice::from_ref(&shifted));
    for k in 0..n {
        assert!((losses2[k] - losses[k]).abs() < 1e-3, "loss[{k}] with logits + 1000: {} vs {}", losses2[k], losses[k]);
    }
    let shifted_d = be.upload(&shifted);
    let mut dlogits2 = prefilled(be, n * v);
    be.cross_entropy_backward(all_mut(be, &mut dlogits2), all(be, &shifted_d), all(be, &lse2), &ids, dloss, v);
    let analytic2 = accumulated(be, &dlogits2);
    for i in 0..n * v {
        assert!((analytic2[i] - analytic[i]).abs() < 1e-3, "dlogits[{i}] with logits + 1000: {} vs {}", analytic2[i], analytic[i]);
    }

    // The fused classifier's in-place backward: the logits become exactly the gradient the
    // accumulating op adds to a zeroed buffer, ignored rows zeros.
    let mut in_place = be.upload(&logits);
    be.cross_entropy_backward_in_place(all_mut(be, &mut in_place), all(be, &lse), &ids, dloss, v);
    let mut zeroed = be.zeros(n * v);
    be.cross_entropy_backward(all_mut(be, &mut zeroed), all(be, &logits_d), all(be, &lse), &ids, dloss, v);
    let (got, want) = (host(be, &in_place), host(be, &zeroed));
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "in-place cross-entropy backward differs:\n{got:?}\n{want:?}");
    for k in [1, 4] {
        assert!(got[k * v..(k + 1) * v].iter().all(|&x| x == 0.0), "ignored row {k} is not zero");
    }
}

// ---- AdamW ------------------------------------------------------------------------------------

/// PyTorch's AdamW, one element at a time, in f64.
fn adamw_ref(p: &mut [f64], g: &[f32], m: &mut [f64], v: &mut [f64], hp: &AdamWStep) {
    let (lr, b1, b2, eps, wd, scale) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64, hp.eps as f64, hp.weight_decay as f64, hp.grad_scale as f64);
    let bc1 = 1.0 - b1.powi(hp.t as i32);
    let bc2 = 1.0 - b2.powi(hp.t as i32);
    for i in 0..p.len() {
        let g = g[i] as f64 * scale;
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        p[i] -= lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
    }
}

pub fn check_adamw<B: Backend>(be: &B) {
    // longer than one parallel chunk of the CPU backend (16384)
    let n = 40_000;
    let mut rng = Rng::new(23);
    let cases = [
        // (t, weight decay, grad scale, fresh moments)
        (1u64, 0.1f32, 1.0f32, true),
        (1, 0.0, 0.5, true),
        (3, 0.1, 0.25, false),
        (3, 0.0, 1.0, false),
    ];
    for (t, wd, grad_scale, fresh) in cases {
        let p0 = randn(&mut rng, n, 1.0);
        let mut g = randn(&mut rng, n, 0.1);
        g[..100].fill(0.0); // zero gradients: only decay moves these (and eps keeps 0/0 away)
        let (m0, v0) = if fresh {
            (vec![0.0f32; n], vec![0.0f32; n])
        } else {
            // a state Adam can reach: v >= m^2, so that |m| / sqrt(v) stays O(1)
            let m = randn(&mut rng, n, 0.05);
            let v = m.iter().map(|&m| 2.0 * m * m + (0.03 * rng.normal() as f32).powi(2)).collect();
            (m, v)
        };
        let hp = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: wd, t, grad_scale };

        let (mut p, gd, mut m, mut v) = (be.upload(&p0), be.upload(&g), be.upload(&m0), be.upload(&v0));
        be.adamw_update(all_mut(be, &mut p), all(be, &gd), all_mut(be, &mut m), all_mut(be, &mut v), hp);

        let mut pr: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut mr: Vec<f64> = m0.iter().map(|&x| x as f64).collect();
        let mut vr: Vec<f64> = v0.iter().map(|&x| x as f64).collect();
        adamw_ref(&mut pr, &g, &mut mr, &mut vr, &hp);
        let tag = format!("adamw t={t} wd={wd} grad_scale={grad_scale}");
        let (ph, mh, vh) = (host(be, &p), host(be, &m), host(be, &v));
        for i in 0..n {
            // the update itself is ~lr = 1e-2; 1e-6 is ~1e-4 of it
            assert!((ph[i] as f64 - pr[i]).abs() < 1e-6, "{tag}: param[{i}] {} vs reference {} (from {})", ph[i], pr[i], p0[i]);
        }
        let rel = |got: &[f32], want: &[f64]| {
            let scale = want.iter().fold(1e-30f64, |a, x| a.max(x.abs()));
            got.iter().zip(want).fold(0.0f64, |a, (&x, &y)| a.max((x as f64 - y).abs())) / scale
        };
        assert!(rel(&mh, &mr) < 1e-5, "{tag}: first moment off by {:e}", rel(&mh, &mr));
        assert!(rel(&vh, &vr) < 1e-5, "{tag}: second moment off by {:e}", rel(&vh, &vr));
        // a sanity check on the reference itself: the first step moves each param by ~lr
        if t == 1 && wd == 0.0 {
            let i = 500;
            assert!(((pr[i] - p0[i] as f64).abs() - 1e-2).abs() < 1e-4, "{tag}: first step size");
        }
    }
}

// ---- memory ops -------------------------------------------------------------------------------

pub fn check_sum_squares_scale<B: Backend>(be: &B) {
    let mut rng = Rng::new(24);
    let n = 10_007; // a few 4096-element partial sums and a ragged tail
    let x = randn(&mut rng, n, 3.0);
    let buf = be.upload(&x);
    let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let got = be.sum_squares(all(be, &buf));
    assert!((got - want).abs() <= 1e-12 * want, "sum_squares {got} vs {want}");
    // a sub-range, and an empty one
    let want_sub: f64 = x[123..5000].iter().map(|&v| v as f64 * v as f64).sum();
    let got_sub = be.sum_squares(be.view(&buf, 123..5000));
    assert!((got_sub - want_sub).abs() <= 1e-12 * want_sub, "sum_squares of a sub-range {got_sub} vs {want_sub}");
    assert_eq!(be.sum_squares(be.view(&buf, 7..7)), 0.0);

    // scale a sub-range: exactly x * s inside, untouched outside
    let mut buf = be.upload(&x);
    be.scale(be.view_mut(&mut buf, 100..9000), -0.3);
    let h = host(be, &buf);
    for i in 0..n {
        let want = if (100..9000).contains(&i) { x[i] * -0.3 } else { x[i] };
        assert_eq!(h[i], want, "scale [{i}]");
    }

    // fill, copy and write on sub-ranges leave the rest alone
    let mut buf = be.upload(&x);
    be.fill(be.view_mut(&mut buf, 10..20), 2.5);
    let src = be.upload(&[1.0, 2.0, 3.0]);
    be.copy(be.view_mut(&mut buf, 30..33), all(be, &src));
    be.write(be.view_mut(&mut buf, 40..42), &[-1.0, -2.0]);
    let h = host(be, &buf);
    for i in 0..n {
        let want = match i {
            10..20 => 2.5,
            30..33 => (i - 29) as f32,
            40..42 => -((i - 39) as f32),
            _ => x[i],
        };
        assert_eq!(h[i], want, "fill/copy/write [{i}]");
    }
    assert_eq!(be.download(be.view(&buf, 30..33)), vec![1.0, 2.0, 3.0]);
}

pub fn check_split_mut<B: Backend>(be: &B) {
    let mut buf = be.zeros(12);
    {
        // out of order and touching: [8, 12), [0, 3), [3, 8)
        let [a, b, c] = be.split_mut(&mut buf, [8..12, 0..3, 3..8]);
        be.fill(a, 1.0);
        be.fill(b, 2.0);
        be.fill(c, 3.0);
    }
    let h = host(be, &buf);
    assert_eq!(h, [2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0]);
    {
        // gaps are fine too
        let [a, b] = be.split_mut(&mut buf, [10..11, 1..2]);
        be.fill(a, 5.0);
        be.fill(b, 6.0);
    }
    let h = host(be, &buf);
    assert_eq!(h, [2.0, 6.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0, 1.0, 5.0, 1.0]);
}

/// Overlapping ranges (in bounds) must panic rather than hand out aliasing views; the panic
/// message names the overlap.
pub fn check_split_mut_overlap<B: Backend>(be: &B) {
    let mut buf = be.zeros(12);
    let [a, b] = be.split_mut(&mut buf, [4..9, 0..5]);
    be.fill(a, 1.0);
    be.fill(b, 2.0);
}

// ---- dropout ----------------------------------------------------------------------------------

/// The mask written from its definition (SplitMix64 read at a counter, upper 32 bits against
/// round(p * 2^32)), independently of the engine's code.
fn dropout_keeps_ref(seed: u64, counter: u64, p: f32) -> bool {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    let state = mix(seed).wrapping_add(counter.wrapping_add(1).wrapping_mul(0x9E3779B97F4A7C15));
    (mix(state) >> 32) as f64 >= (p as f64 * 4294967296.0).round()
}

pub fn check_dropout<B: Backend>(be: &B) {
    let mut rng = Rng::new(23);
    let n = 300;
    let (inp, r) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
    let mask = Dropout { p: 0.3, seed: 99, offset: 1_000 };
    let fwd = |x: &[Vec<f32>]| {
        let inp = be.upload(&x[0]);
        let mut out = be.upload(&vec![7.0; n]);
        be.dropout_forward(all_mut(be, &mut out), all(be, &inp), mask);
        host(be, &out)
    };
    let out = fwd(std::slice::from_ref(&inp));
    let scale = 1.0 / (1.0 - mask.p);
    for i in 0..n {
        let want = if dropout_keeps_ref(mask.seed, mask.offset + i as u64, mask.p) { inp[i] * scale } else { 0.0 };
        assert_eq!(out[i], want, "dropout forward [{i}]");
    }
    let dropped = out.iter().filter(|&&x| x == 0.0).count();
    assert!((50..130).contains(&dropped), "dropout dropped {dropped} of {n} at p = 0.3");

    let (mut dinp, dout) = (prefilled(be, n), be.upload(&r));
    be.dropout_backward(all_mut(be, &mut dinp), all(be, &dout), mask);
    let numeric = numeric_grad(&mut |x| dot64(&fwd(x), &r), std::slice::from_ref(&inp), 0, STEP);
    assert_grad("dropout dinp", &accumulated(be, &dinp), &numeric, TOL);
    // dropped elements receive exactly nothing
    let dhost = host(be, &dinp);
    for i in (0..n).filter(|&i| out[i] == 0.0) {
        assert_eq!(dhost[i], ACC, "dropout backward reached dropped element [{i}]");
    }
}

// ---- instantiation ----------------------------------------------------------------------------

macro_rules! backend_op_tests {
    ($name:ident, $backend:expr) => {
        backend_op_tests!($name, $backend, true);
    };
    // `$available` is checked first: a backend that may be absent (a GPU) skips its tests.
    ($name:ident, $backend:expr, $available:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn embedding() {
                if !$available {
                    return;
                }
                check_embedding(&$backend);
            }
            #[test]
            fn rope() {
                if !$available {
                    return;
                }
                check_rope(&$backend);
            }
            #[test]
            fn matmul() {
                if !$available {
                    return;
                }
                check_matmul(&$backend);
            }
            #[test]
            fn matmul_larger() {
                if !$available {
                    return;
                }
                check_matmul_larger(&$backend);
            }
            #[test]
            fn layernorm() {
                if !$available {
                    return;
                }
                check_layernorm(&$backend);
            }
            #[test]
            fn attention_causal() {
                if !$available {
                    return;
                }
                check_attention_causal(&$backend);
            }
            #[test]
            fn attention_bidirectional() {
                if !$available {
                    return;
                }
                check_attention_bidirectional(&$backend);
            }
            #[test]
            fn attention_cross() {
                if !$available {
                    return;
                }
                check_attention_cross(&$backend);
            }
            #[test]
            fn attention_causal_mask() {
                if !$available {
                    return;
                }
                check_attention_causal_mask(&$backend);
            }
            #[test]
            fn gelu() {
                if !$available {
                    return;
                }
                check_gelu(&$backend);
            }
            #[test]
            fn residual() {
                if !$available {
                    return;
                }
                check_residual(&$backend);
            }
            #[test]
            fn dropout() {
                if !$available {
                    return;
                }
                check_dropout(&$backend);
            }
            #[test]
            fn cross_entropy() {
                if !$available {
                    return;
                }
                check_cross_entropy(&$backend);
            }
            #[test]
            fn adamw() {
                if !$available {
                    return;
                }
                check_adamw(&$backend);
            }
            #[test]
            fn sum_squares_scale() {
                if !$available {
                    return;
                }
                check_sum_squares_scale(&$backend);
            }
            #[test]
            fn split_mut() {
                if !$available {
                    return;
                }
                check_split_mut(&$backend);
            }
            #[test]
            #[should_panic(expected = "overlap")]
            fn split_mut_overlap_panics() {
                if !$available {
                    panic!("overlap check skipped: backend not available");
                }
                check_split_mut_overlap(&$backend);
            }
        }
    };
}

backend_op_tests!(cpu, smelt_engine::CpuBackend::new());

/// The CUDA backend with f32 matmuls (finite differences need f32), built once per test binary;
/// `None` (and a printed reason) without a GPU.
#[cfg(feature = "cuda")]
fn cuda_f32() -> Option<&'static smelt_engine::cuda::CudaBackend> {
    use smelt_engine::cuda::{CudaBackend, CudaOptions, MatmulPrecision};
    static GPU: std::sync::OnceLock<Result<CudaBackend, String>> = std::sync::OnceLock::new();
    let made = GPU.get_or_init(|| {
        CudaBackend::new_with(0, CudaOptions { matmul: MatmulPrecision::F32 }).map_err(|e| e.to_string())
    });
    match made {
        Ok(be) => Some(be),
        Err(why) => {
            println!("skipping: {why}");
            None
        }
    }
}

#[cfg(feature = "cuda")]
backend_op_tests!(cuda, *cuda_f32().unwrap(), cuda_f32().is_some());
