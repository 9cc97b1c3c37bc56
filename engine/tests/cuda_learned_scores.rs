//! The CUDA learned-score attention (Luong's general and Bahdanau's additive score,
//! `cuda/learned_scores.rs`) against the CPU's `attention_ex` (`cpu/attention_ex.rs`): the
//! output, the gradients of q, k, v (added onto nonzero starting values) and of the score's
//! parameters (added too), packed self-attention and split cross-attention, causal or
//! bidirectional, with and without key padding masks, head dims 16 and 33, additive widths
//! below, at and above the head dim, rows that cross the kernels' 16-row blocks and 32-key
//! tiles; with f32 buffers and with bf16 activation buffers (the CPU then sees the same values
//! rounded to bf16). The overwriting backward (`attention_ex_backward_set`) must give the
//! accumulating one's increments. Skips (prints why) without a GPU.
#![cfg(feature = "cuda")]

mod compare;
mod bf16_reference;
mod shared_cuda;

use bf16_reference::round_all;
use compare::rel_err;
use shared_cuda::shared;

use smelt_engine::backend::{AttnShape, Backend, OptionalOp, QkvSource, Scores};
use smelt_engine::cuda::{Dtype, MatmulPrecision};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

/// ‖gpu − cpu‖ / ‖cpu‖ bounds: f32 buffers (f32 kernels, sums in another order), bf16 ones.
const F32_TOL: f64 = 1e-4;
const BF16_TOL: f64 = 3e-2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    General,
    /// With its width A.
    Additive(usize),
}

/// One case's host inputs.
#[derive(Clone)]
struct Inputs {
    name: &'static str,
    shape: AttnShape,
    packed: bool,
    kind: Kind,
    key_lens: Option<Vec<u32>>,
    q: Vec<f32>,
    kv: Vec<f32>,
    dout: Vec<f32>,
    dq0: Vec<f32>,
    dkv0: Vec<f32>,
    /// The score's parameters, back to back: W (H, hd, hd), or Wq, Wk (H, hd, A) and v (H, A).
    params: Vec<f32>,
    dparams0: Vec<f32>,
}

/// Results: out, and the increments of dq, dkv and the parameters' gradient.
struct Outputs {
    out: Vec<f32>,
    dq: Vec<f32>,
    dkv: Vec<f32>,
    dparams: Vec<f32>,
}

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

fn inputs(name: &'static str, seed: u64, shape: AttnShape, packed: bool, kind: Kind, key_lens: Option<Vec<u32>>) -> Inputs {
    let mut rng = Rng::new(seed);
    let (b, c, h, hd) = (shape.batch, shape.channels, shape.heads, shape.head_dim());
    let (nq, nkv) = if packed { (b * shape.q_len * 3 * c, 0) } else { (b * shape.q_len * c, b * shape.kv_len * 2 * c) };
    let params = match kind {
        // near the identity, as models initialise it, plus enough noise to matter
        Kind::General => (0..h * hd * hd).map(|i| if (i / hd) % hd == i % hd { 1.0 } else { 0.0 } + (0.3 * rng.normal()) as f32).collect(),
        Kind::Additive(a) => {
            let s = 0.5 / (hd as f64).sqrt();
            let mut p = randn(&mut rng, 2 * h * hd * a, s);
            p.extend(randn(&mut rng, h * a, 1.0));
            p
        }
    };
    let n_params = params.len();
    Inputs {
        name,
        shape,
        packed,
        kind,
        key_lens,
        q: randn(&mut rng, nq, 1.0),
        kv: randn(&mut rng, nkv, 1.0),
        dout: randn(&mut rng, b * shape.q_len * c, 1.0),
        dq0: randn(&mut rng, nq, 1.0),
        dkv0: randn(&mut rng, nkv, 1.0),
        params,
        dparams0: randn(&mut rng, n_params, 0.1),
    }
}

/// The inputs with every activation rounded to bf16 (what bf16 buffers hold).
fn rounded(x: &Inputs) -> Inputs {
    Inputs { q: round_all(&x.q), kv: round_all(&x.kv), dout: round_all(&x.dout), dq0: round_all(&x.dq0), dkv0: round_all(&x.dkv0), ..x.clone() }
}

fn all<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> B::View<'a> {
    be.view(buf, 0..be.len(buf))
}

fn all_mut<'a, B: Backend>(be: &B, buf: &'a mut B::Buf) -> B::ViewMut<'a> {
    let n = be.len(buf);
    be.view_mut(buf, 0..n)
}

/// An activation buffer (bf16 on a Bf16 CUDA backend when `act`) or an f32 one, holding `values`.
fn buffer<B: Backend>(be: &B, values: &[f32], act: bool) -> B::Buf {
    let mut buf = if act { be.activation_zeros(values.len()) } else { be.zeros(values.len()) };
    be.write(all_mut(be, &mut buf), values);
    buf
}

/// The score's views over one flat parameter buffer.
fn scores<'a, B: Backend>(be: &B, kind: Kind, s: &AttnShape, p: &'a B::Buf) -> Scores<B::View<'a>> {
    let (h, hd) = (s.heads, s.head_dim());
    match kind {
        Kind::General => Scores::General { w: all(be, p) },
        Kind::Additive(a) => Scores::Additive {
            wq: be.view(p, 0..h * hd * a),
            wk: be.view(p, h * hd * a..2 * h * hd * a),
            v: be.view(p, 2 * h * hd * a..2 * h * hd * a + h * a),
            width: a,
        },
    }
}

fn dscores<'a, B: Backend>(be: &B, kind: Kind, s: &AttnShape, p: &'a mut B::Buf) -> Scores<B::ViewMut<'a>> {
    let (h, hd) = (s.heads, s.head_dim());
    match kind {
        Kind::General => Scores::General { w: all_mut(be, p) },
        Kind::Additive(a) => {
            let [wq, wk, v] = be.split_mut(p, [0..h * hd * a, h * hd * a..2 * h * hd * a, 2 * h * hd * a..2 * h * hd * a + h * a]);
            Scores::Additive { wq, wk, v, width: a }
        }
    }
}

/// Forward, the accumulating backward and the overwriting one, on one backend (`act`: the
/// activations in activation buffers); the overwriting op must give the accumulating one's
/// increments within `set_tol`.
fn run<B: Backend>(be: &B, x: &Inputs, act: bool, set_tol: f64) -> Outputs {
    let s = x.shape;
    let q = buffer(be, &x.q, act);
    let kv = (!x.packed).then(|| buffer(be, &x.kv, act));
    let src = || match &kv {
        None => QkvSource::Packed(all(be, &q)),
        Some(kv) => QkvSource::Split { q: all(be, &q), kv: all(be, kv) },
    };
    let params = be.upload(&x.params);
    let dout = buffer(be, &x.dout, act);
    let lens = x.key_lens.as_ref().map(|l| be.upload_ids(l));
    let mut out = buffer(be, &vec![0.0; s.batch * s.q_len * s.channels], act);
    let mut saved = be.zeros(be.attention_saved_len(s));
    be.attention_ex_forward(all_mut(be, &mut out), all_mut(be, &mut saved), src(), scores(be, x.kind, &s, &params), lens.as_ref(), s);

    let mut dq = buffer(be, &x.dq0, act);
    let mut dkv = (!x.packed).then(|| buffer(be, &x.dkv0, act));
    let mut dparams = be.upload(&x.dparams0);
    {
        let dsrc = match &mut dkv {
            None => QkvSource::Packed(all_mut(be, &mut dq)),
            Some(d) => QkvSource::Split { q: all_mut(be, &mut dq), kv: all_mut(be, d) },
        };
        let ds = dscores(be, x.kind, &s, &mut dparams);
        be.attention_ex_backward(dsrc, ds, all(be, &dout), src(), scores(be, x.kind, &s, &params), lens.as_ref(), all(be, &out), all(be, &saved), s);
    }
    // The overwriting backward on buffers of 7 (padded keys' rows must come out 0), its score
    // gradient added onto zeros.
    let mut dq2 = buffer(be, &vec![7.0; x.dq0.len()], act);
    let mut dkv2 = (!x.packed).then(|| buffer(be, &vec![-7.0; x.dkv0.len()], act));
    let mut dparams2 = be.zeros(x.params.len());
    {
        let dsrc = match &mut dkv2 {
            None => QkvSource::Packed(all_mut(be, &mut dq2)),
            Some(d) => QkvSource::Split { q: all_mut(be, &mut dq2), kv: all_mut(be, d) },
        };
        let ds = dscores(be, x.kind, &s, &mut dparams2);
        be.attention_ex_backward_set(dsrc, ds, all(be, &dout), src(), scores(be, x.kind, &s, &params), lens.as_ref(), all(be, &out), all(be, &saved), s);
    }
    be.synchronize().unwrap_or_else(|e| panic!("{}: device error: {e}", x.name));

    let minus = |a: Vec<f32>, b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    let got = Outputs {
        out: be.download(all(be, &out)),
        dq: minus(be.download(all(be, &dq)), &x.dq0),
        dkv: dkv.as_ref().map(|d| minus(be.download(all(be, d)), &x.dkv0)).unwrap_or_default(),
        dparams: minus(be.download(all(be, &dparams)), &x.dparams0),
    };
    let set = [
        ("dq", be.download(all(be, &dq2)), &got.dq),
        ("dkv", dkv2.as_ref().map(|d| be.download(all(be, d))).unwrap_or_default(), &got.dkv),
        ("score parameters", be.download(all(be, &dparams2)), &got.dparams),
    ];
    for (what, set, acc) in set {
        if acc.is_empty() {
            continue;
        }
        let e = rel_err(&set, acc);
        assert!(e < set_tol, "{} on {}: attention_ex_backward_set's {what} differs from the accumulating op's increment by {e:.2e}", x.name, be.name());
    }
    got
}

/// The case on the CPU and on CUDA with f32 buffers, then with bf16 activation buffers.
fn check(x: Inputs) {
    for (p, act, tol) in [(MatmulPrecision::F32, false, F32_TOL), (MatmulPrecision::Bf16, true, BF16_TOL)] {
        let Some(gpu) = shared(p) else { return };
        assert!(gpu.supports(OptionalOp::GeneralScores) && gpu.supports(OptionalOp::AdditiveScores));
        let bf16 = act && gpu.activation_zeros(1).dtype() == Dtype::Bf16;
        let x = if bf16 { rounded(&x) } else { x.clone() };
        let want = run(&CpuBackend::new(), &x, false, 1e-5);
        // bf16 buffers: the two ops' results differ by their rounding
        let got = run(&gpu, &x, act, if bf16 { BF16_TOL } else { 1e-5 });
        let mut errs = vec![("out", rel_err(&got.out, &want.out)), ("dq", rel_err(&got.dq, &want.dq)), ("score parameters", rel_err(&got.dparams, &want.dparams))];
        if !x.packed {
            errs.push(("dkv", rel_err(&got.dkv, &want.dkv)));
        }
        let line: Vec<String> = errs.iter().map(|(w, e)| format!("{w} {e:.2e}")).collect();
        println!("{} [{p:?}, bf16 buffers: {bf16}]: rel err {}", x.name, line.join(", "));
        for (what, e) in errs {
            assert!(e < tol, "{} [{p:?}, bf16 buffers: {bf16}]: {what} rel err {e:.2e} >= {tol:.0e}", x.name);
        }
    }
}

fn shape(batch: usize, q_len: usize, kv_len: usize, channels: usize, heads: usize, causal: bool) -> AttnShape {
    AttnShape { batch, q_len, kv_len, channels, heads, causal }
}

#[test]
fn general_packed_causal() {
    check(inputs("general packed causal B=2 T=70 C=64 H=4", 1, shape(2, 70, 70, 64, 4, true), true, Kind::General, None));
}

#[test]
fn general_split_masked_odd_head_dim() {
    let x = inputs("general split masked B=2 Tq=21 Tk=50 C=66 H=2", 2, shape(2, 21, 50, 66, 2, false), false, Kind::General, Some(vec![50, 33]));
    check(x);
}

#[test]
fn additive_packed_masked() {
    let x = inputs("additive(24) packed masked B=2 T=45 C=32 H=2", 3, shape(2, 45, 45, 32, 2, false), true, Kind::Additive(24), Some(vec![45, 17]));
    check(x);
}

#[test]
fn additive_packed_causal_wide() {
    check(inputs("additive(128) packed causal B=1 T=40 C=32 H=2", 4, shape(1, 40, 40, 32, 2, true), true, Kind::Additive(128), None));
}

#[test]
fn additive_split_masked_narrow() {
    let x = inputs("additive(8) split masked B=2 Tq=19 Tk=37 C=66 H=2", 5, shape(2, 19, 37, 66, 2, false), false, Kind::Additive(8), Some(vec![37, 5]));
    check(x);
}

/// The harness on the CPU alone (runs everywhere): every output carries signal, and the
/// overwriting backward matches the accumulating one.
#[test]
fn harness_runs_on_the_cpu() {
    let x = inputs("additive cpu", 6, shape(2, 20, 20, 32, 2, true), true, Kind::Additive(12), Some(vec![20, 9]));
    let r = run(&CpuBackend::new(), &x, false, 1e-5);
    for (what, v) in [("out", &r.out), ("dq", &r.dq), ("score parameters", &r.dparams)] {
        assert!(v.iter().any(|&g| g != 0.0) && v.iter().all(|g| g.is_finite()), "{what}");
    }
}
