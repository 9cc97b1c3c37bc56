//! The CUDA backend's bf16 activation buffers (`Backend::activation_zeros` on a backend with
//! `MatmulPrecision::Bf16`) against the CPU reference.
//!
//! Every op that accepts a bf16 view is run on the GPU with bf16 buffers and on the CPU with f32
//! buffers holding the *same* values: every input the GPU stores or converts to bf16 (activations,
//! and matmul weights, which the bf16 GEMMs convert) is rounded to bf16 on the host first, with a
//! rounding written here (`round_bf16`), so both backends see identical operands. What is left
//! is the GPU's one rounding of a bf16 output (relative error about 2^-9 per value, ~1e-3 as a
//! norm: tolerance `BF16_OUT`) and f32 accumulation order (~1e-6: tolerance `F32_OUT`, tight
//! enough that an f32 output rounded through bf16 by mistake fails). Errors are printed.
//!
//! Tests run one at a time: they share one backend, whose conversion scratch is not meant for
//! two threads issuing matmuls at once. Without a GPU (or with `SMELT_BF16_ACTIVATIONS=0`) the
//! GPU tests print a skip line.
#![cfg(feature = "cuda")]

#[macro_use]
mod backend_pair;
use backend_pair::Runner;

mod bf16_reference;
use bf16_reference::{round_all, round_bf16};

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, OnceLock};

use smelt_engine::backend::{Backend, MatmulShape, RopeShape, WeightLayout, IGNORE_INDEX};
use smelt_engine::cuda::{CudaBackend, CudaOptions, Dtype, MatmulPrecision};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

/// A value stored in bf16 and compared as a norm: 8 bits of mantissa.
const BF16_OUT: f64 = 1e-2;
/// An f32 output from operands both backends hold exactly: only summation order differs.
const F32_OUT: f64 = 2e-4;

// ---- the GPU, once per test binary ------------------------------------------------------------

/// The bf16 backend and a guard that keeps the other tests of this binary off it meanwhile;
/// None (after a skip line) without a GPU or with bf16 activations switched off.
fn gpu() -> Option<(&'static CudaBackend, MutexGuard<'static, ()>)> {
    static CELL: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    static SERIAL: Mutex<()> = Mutex::new(());
    let made = CELL.get_or_init(|| {
        CudaBackend::new_with(0, CudaOptions { matmul: MatmulPrecision::Bf16 }).map_err(|e| e.to_string())
    });
    let be = match made {
        Ok(be) => be,
        Err(why) => {
            println!("skipping: {why}");
            return None;
        }
    };
    // A test that failed while holding the guard poisons it; the others still run.
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if be.activation_zeros(1).dtype() != Dtype::Bf16 {
        let off = !be.tuning().bf16_activations;
        assert!(off, "a Bf16 backend must hand out bf16 activations unless SMELT_BF16_ACTIVATIONS=0");
        println!("skipping: SMELT_BF16_ACTIVATIONS=0 keeps activations in f32");
        return None;
    }
    Some((be, serial))
}

// ---- helpers ----------------------------------------------------------------------------------


fn randn(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

/// `randn`, rounded to bf16: values a bf16 buffer holds exactly.
fn randn_bf16(seed: u64, n: usize, std: f64) -> Vec<f32> {
    round_all(&randn(seed, n, std))
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

/// An activation buffer (bf16 on the GPU, f32 on the CPU) holding `values`.
fn activation<B: Backend>(be: &B, values: &[f32]) -> B::Buf {
    let mut buf = be.activation_zeros(values.len());
    be.write(all_mut(be, &mut buf), values);
    buf
}

/// An activation buffer when `bf16`, else a plain f32 one, holding `values`.
fn buffer<B: Backend>(be: &B, bf16: bool, values: &[f32]) -> B::Buf {
    if bf16 {
        activation(be, values)
    } else {
        be.upload(values)
    }
}

/// `a - b`, elementwise (what an accumulating op added).
fn minus(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// ‖got − want‖ / ‖want‖ in f64 (‖got‖ where want is all zeros).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut d, mut w) = (0.0f64, 0.0f64);
    for (&g, &x) in got.iter().zip(want) {
        d += (g as f64 - x as f64).powi(2);
        w += (x as f64).powi(2);
    }
    if w == 0.0 {
        d.sqrt()
    } else {
        (d / w).sqrt()
    }
}

/// Bit-for-bit equality (so -0.0 differs from 0.0), NaN matching any NaN.
fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let same = if w.is_nan() { g.is_nan() } else { g.to_bits() == w.to_bits() };
        assert!(same, "{what}: element {i} is {g:e} ({:#010x}), expected {w:e} ({:#010x})", g.to_bits(), w.to_bits());
    }
}

/// Named outputs of one test body, each with its tolerance.
type Outs = Vec<(&'static str, Vec<f32>, f64)>;

/// Runs `body` on the CPU and on `gpu`, compares each named output within its tolerance.
fn compare(what: &str, gpu: &CudaBackend, body: impl Fn(&dyn Runner<Outs>) -> Outs) {
    let want = body(&CpuBackend::new());
    let got = body(gpu);
    gpu.synchronize().unwrap_or_else(|e| panic!("{what}: device error: {e}"));
    assert_eq!(got.len(), want.len());
    for ((name, g, tol), (_, w, _)) in got.iter().zip(&want) {
        assert!(g.iter().all(|x| x.is_finite()), "{what}/{name}: non-finite output on the GPU");
        let e = rel_err(g, w);
        println!("{what}/{name}: rel err {e:.3e} (tol {tol:.0e}) over {} values", g.len());
        assert!(e <= *tol, "{what}/{name}: rel err {e:.3e} > {tol:.1e}");
    }
}


// ---- rotary positions on bf16 q|k|v rows -------------------------------------------------------

fn rope_body<B: Backend>(be: &B) -> Outs {
    let s = RopeShape { rows: 2 * 45, seq_len: 45, channels: 64, heads: 2 };
    let table = be.upload(&smelt_engine::model::rotary::table(64, 32));
    let mut qkv = activation(be, &randn_bf16(61, s.rows * 3 * s.channels, 1.0));
    be.rope(all_mut(be, &mut qkv), all(be, &table), s, false);
    let mut dqkv = activation(be, &randn_bf16(62, s.rows * 3 * s.channels, 1.0));
    be.rope(all_mut(be, &mut dqkv), all(be, &table), s, true);
    vec![("rope", host(be, &qkv), BF16_OUT), ("rope_inverse", host(be, &dqkv), BF16_OUT)]
}

#[test]
fn rope_on_bf16_rows_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    compare("rope", g, both!(rope_body));
}

// ---- the host rounding itself -----------------------------------------------------------------

#[test]
fn round_bf16_rounds_to_nearest_even() {
    // Runs everywhere: the reference every GPU comparison below leans on.
    let ulp = 2f32.powi(-7); // bf16's spacing in [1, 2)
    let cases = [
        (1.0 + ulp / 2.0, 1.0),                      // a tie, kept part even: down
        (1.0 + 1.5 * ulp, 1.0 + 2.0 * ulp),          // a tie, kept part odd: up
        (1.0 + ulp / 2.0 + 2f32.powi(-20), 1.0 + ulp), // just above the tie: up
        (1.0 + ulp / 2.0 - 2f32.powi(-20), 1.0),     // just below it: down
        (-(1.0 + 1.5 * ulp), -(1.0 + 2.0 * ulp)),    // sign-magnitude: the same for negatives
        (2.0 - ulp / 4.0, 2.0),                      // carry into the exponent
        (f32::MAX, f32::INFINITY),                   // beyond the largest bf16: infinity
        (f32::INFINITY, f32::INFINITY),
        (-0.0, -0.0),
        (1e-40, f32::from_bits(1e-40f32.to_bits() & 0xffff_0000)), // a subnormal with a small tail
    ];
    for (x, want) in cases {
        assert_same_bits(&format!("round_bf16({x:e})"), &[round_bf16(x)], &[want]);
    }
    assert!(round_bf16(f32::NAN).is_nan());
}

// ---- 1. memory: write, download, fill, copy ---------------------------------------------------

/// Inputs whose rounding the tie rule decides, the ends of the range, zeros of both signs.
fn special_values() -> Vec<f32> {
    let ulp = 2f32.powi(-7);
    vec![
        1.0 + ulp / 2.0,
        1.0 + 1.5 * ulp,
        -(1.0 + 1.5 * ulp),
        1.0 + ulp / 2.0 + 2f32.powi(-20),
        2.0 - ulp / 4.0,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.1,
        65_504.0,
    ]
}

#[test]
fn bf16_write_download_fill_and_copy_are_exact() {
    let Some((g, _serial)) = gpu() else { return };
    // An odd length: the last value shares its 32-bit word with nothing.
    let n = 10_007;
    let mut x = randn(1, n, 3.0);
    let special = special_values();
    x[..special.len()].copy_from_slice(&special);
    x[n - 1] = 1.0 + 1.5 * 2f32.powi(-7); // a tie in the very last element

    let mut a = g.activation_zeros(n);
    assert_eq!(a.dtype(), Dtype::Bf16);
    assert_eq!(g.len(&a), n);
    assert!(host(g, &a).iter().all(|&v| v.to_bits() == 0), "activation_zeros: not all +0.0");
    g.write(all_mut(g, &mut a), &x);
    let mut model = round_all(&x); // what `a` must hold from here on
    assert_same_bits("write then download", &host(g, &a), &model);

    // Views at odd element offsets (2-byte, not 4-byte, aligned) read and write the right values.
    assert_same_bits("download of a window", &g.download(g.view(&a, 3..1_000)), &model[3..1_000]);
    let y = randn(2, 13, 1.0);
    g.write(g.view_mut(&mut a, 5..18), &y);
    model[5..18].copy_from_slice(&round_all(&y));
    assert_same_bits("write into a window", &host(g, &a), &model);

    // fill: a long odd range, a short one at an odd offset, a value that needs rounding.
    g.fill(g.view_mut(&mut a, 101..2_002), 1.5);
    model[101..2_002].fill(1.5);
    g.fill(g.view_mut(&mut a, 3_001..3_004), 0.0);
    model[3_001..3_004].fill(0.0);
    g.fill(g.view_mut(&mut a, 9_000..n), 0.1);
    model[9_000..n].fill(round_bf16(0.1));
    assert_same_bits("fill", &host(g, &a), &model);

    // copy bf16 -> bf16 between different offsets (odd to odd+1), then a whole buffer.
    let z = randn(3, n, 1.0);
    let mut b = activation(g, &z);
    let mut model_b = round_all(&z);
    g.copy(g.view_mut(&mut b, 1..5_001), g.view(&a, 7..5_007));
    model_b[1..5_001].copy_from_slice(&model[7..5_007]);
    assert_same_bits("copy of a window", &host(g, &b), &model_b);
    let mut c = g.activation_zeros(n);
    g.copy(all_mut(g, &mut c), all(g, &b));
    assert_same_bits("copy of a whole buffer", &host(g, &c), &model_b);
    g.synchronize().expect("no device error");
}

// ---- 2. matmul forward ------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct FwdCase {
    rows: usize,
    ic: usize,
    oc: usize,
    layout: WeightLayout,
    bias: bool,
    inp_bf16: bool,
    out_bf16: bool,
}

/// Values an output buffer holds before the op, which must overwrite them (exact in bf16).
const STALE: f32 = 3.0;
/// Elements past the end of an output view, which the op must not touch.
const GUARD: usize = 5;

fn matmul_forward_body<B: Backend>(be: &B, c: FwdCase) -> Outs {
    let s = MatmulShape { rows: c.rows, in_features: c.ic, out_features: c.oc, layout: c.layout };
    let (n, ic, oc) = (c.rows, c.ic, c.oc);
    // inp (N, IC), W (IC, OC) or (OC, IC), both as bf16 values; the bias is an f32 parameter.
    let inp = buffer(be, c.inp_bf16, &randn_bf16(10, n * ic, 1.0));
    let w = be.upload(&randn_bf16(11, ic * oc, 0.1));
    let b = be.upload(&randn(12, oc, 1.0));
    let len = n * oc + GUARD;
    let mut out = if c.out_bf16 { be.activation_zeros(len) } else { be.zeros(len) };
    be.fill(all_mut(be, &mut out), STALE);
    be.matmul_forward(be.view_mut(&mut out, 0..n * oc), all(be, &inp), all(be, &w), c.bias.then(|| all(be, &b)), s);
    let got = host(be, &out);
    assert!(got[n * oc..].iter().all(|&v| v == STALE), "{}: {c:?} wrote past the output", be.name());
    let tol = if c.out_bf16 { BF16_OUT } else { F32_OUT };
    vec![("out", got[..n * oc].to_vec(), tol)]
}

#[test]
fn matmul_forward_with_bf16_activations_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    use WeightLayout::{InOut, OutIn};
    let case = |rows, oc, layout, bias, inp_bf16, out_bf16| FwdCase { rows, ic: 96, oc, layout, bias, inp_bf16, out_bf16 };
    for c in [
        // bf16 -> bf16 with a bias: the MLP's first layer (cuBLASLt epilogue, or its scratch path)
        case(257, 4 * 96, InOut, true, true, true),
        case(70, 4 * 96, InOut, true, true, true),
        // bf16 -> bf16 without a bias, OC = 1001: the padded scratch path; 1000: the GEMM's own
        case(257, 1001, OutIn, false, true, true),
        case(257, 1000, OutIn, false, true, true),
        // the padded path adding a bias
        case(70, 1001, InOut, true, true, true),
        // bf16 inp, f32 out (with and without a bias, padded and not)
        case(257, 4 * 96, InOut, true, true, false),
        case(257, 1001, OutIn, false, true, false),
        case(70, 4 * 96, OutIn, false, true, false),
        // f32 inp (converted by the backend), bf16 out
        case(257, 4 * 96, InOut, true, false, true),
        case(257, 4 * 96, InOut, false, false, true),
        case(70, 1001, OutIn, false, false, true),
    ] {
        compare(&format!("matmul_forward {c:?}"), g, both!(matmul_forward_body, c));
    }
}

// ---- 3. matmul backward -----------------------------------------------------------------------

/// What the backward pass does with the input gradient.
#[derive(Clone, Copy, Debug)]
enum Dinp {
    /// `matmul_backward_set_dinp` into a bf16 activation buffer.
    SetBf16,
    /// `matmul_backward_set_dinp` into an f32 buffer.
    SetF32,
    /// `matmul_backward` accumulating into an f32 buffer.
    AccumulateF32,
    /// `matmul_backward` without an input gradient (the buffer must stay as it was).
    Skip,
}

/// `matmul_forward_residual`: out (f32) = residual + bf16 inp @ W + bias, the GPT projections
/// (cuBLASLt with C = residual and beta = 1 on the GPU).
fn matmul_residual_body<B: Backend>(be: &B, rows: usize, ic: usize, oc: usize) -> Outs {
    let s = MatmulShape { rows, in_features: ic, out_features: oc, layout: WeightLayout::InOut };
    let inp = activation(be, &randn_bf16(20, rows * ic, 1.0));
    let w = be.upload(&randn_bf16(21, ic * oc, 0.1));
    let b = be.upload(&randn(22, oc, 1.0));
    let residual = be.upload(&randn(23, rows * oc, 1.0));
    let mut out = be.zeros(rows * oc + GUARD);
    be.fill(all_mut(be, &mut out), STALE);
    be.matmul_forward_residual(be.view_mut(&mut out, 0..rows * oc), all(be, &residual), all(be, &inp), all(be, &w), Some(all(be, &b)), s);
    let got = host(be, &out);
    assert!(got[rows * oc..].iter().all(|&v| v == STALE), "{}: residual matmul wrote past the output", be.name());
    vec![("out", got[..rows * oc].to_vec(), F32_OUT)]
}

#[test]
fn matmul_forward_residual_with_bf16_inputs_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    compare("residual 257x96->96", g, both!(matmul_residual_body, 257, 96, 96));
    compare("residual 70x384->96", g, both!(matmul_residual_body, 70, 4 * 96, 96));
}

#[derive(Clone, Copy, Debug)]
struct BwdCase {
    rows: usize,
    ic: usize,
    oc: usize,
    layout: WeightLayout,
    bias: bool,
    dout_bf16: bool,
    inp_bf16: bool,
    dinp: Dinp,
}

fn matmul_backward_body<B: Backend>(be: &B, c: BwdCase) -> Outs {
    let s = MatmulShape { rows: c.rows, in_features: c.ic, out_features: c.oc, layout: c.layout };
    let (n, ic, oc) = (c.rows, c.ic, c.oc);
    // dout (N, OC), inp (N, IC), W as bf16 values (the GEMMs read bf16 operands).
    let dout = buffer(be, c.dout_bf16, &randn_bf16(20, n * oc, 1.0));
    let inp = buffer(be, c.inp_bf16, &randn_bf16(21, n * ic, 1.0));
    let w = be.upload(&randn_bf16(22, ic * oc, 0.1));
    // Gradients start from random values: the parameter ones must be accumulated into, an
    // overwritten dinp must lose them.
    let (dw0, db0, dx0) = (randn(23, ic * oc, 1.0), randn(24, oc, 1.0), randn_bf16(25, n * ic, 1.0));
    let mut dw = be.upload(&dw0);
    let mut db = be.upload(&db0);
    let mut dinp = buffer(be, matches!(c.dinp, Dinp::SetBf16), &dx0);
    let dbias = c.bias.then(|| all_mut(be, &mut db));
    let (dwv, doutv, inpv, wv) = (all_mut(be, &mut dw), all(be, &dout), all(be, &inp), all(be, &w));
    match c.dinp {
        Dinp::SetBf16 | Dinp::SetF32 => be.matmul_backward_set_dinp(all_mut(be, &mut dinp), dwv, dbias, doutv, inpv, wv, s),
        Dinp::AccumulateF32 => be.matmul_backward(Some(all_mut(be, &mut dinp)), dwv, dbias, doutv, inpv, wv, s),
        Dinp::Skip => be.matmul_backward(None, dwv, dbias, doutv, inpv, wv, s),
    }
    let mut outs: Outs = vec![("dweight - initial", minus(&host(be, &dw), &dw0), F32_OUT)];
    if c.bias {
        outs.push(("dbias - initial", minus(&host(be, &db), &db0), F32_OUT));
    }
    let dx = host(be, &dinp);
    match c.dinp {
        Dinp::SetBf16 => outs.push(("dinp", dx, BF16_OUT)),
        Dinp::SetF32 => outs.push(("dinp", dx, F32_OUT)),
        Dinp::AccumulateF32 => outs.push(("dinp - initial", minus(&dx, &dx0), F32_OUT)),
        Dinp::Skip => assert_same_bits(&format!("{}: {c:?} dinp untouched", be.name()), &dx, &dx0),
    }
    outs
}

#[test]
fn matmul_backward_with_bf16_activations_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    use WeightLayout::{InOut, OutIn};
    let case = |rows, ic, oc, layout, bias, dout_bf16, inp_bf16, dinp| BwdCase { rows, ic, oc, layout, bias, dout_bf16, inp_bf16, dinp };
    for c in [
        // all three bf16, dinp overwritten: the MLP's first layer
        case(257, 96, 4 * 96, InOut, true, true, true, Dinp::SetBf16),
        case(70, 96, 4 * 96, InOut, true, true, true, Dinp::SetBf16),
        // an LM head: bf16 logits' gradient with rows of 1001 (not a multiple of 8)
        case(257, 96, 1001, OutIn, false, true, true, Dinp::SetBf16),
        // the MLP's projection: bf16 hidden layer as inp, an f32 dout from the residual stream
        case(257, 4 * 96, 96, InOut, true, false, true, Dinp::SetBf16),
        // bf16 dout into an f32 dinp, overwritten or accumulated into
        case(70, 96, 1001, OutIn, false, true, true, Dinp::SetF32),
        case(257, 96, 4 * 96, InOut, true, true, true, Dinp::AccumulateF32),
        case(257, 96, 4 * 96, OutIn, true, true, false, Dinp::AccumulateF32),
        // no input gradient (a first layer)
        case(257, 96, 4 * 96, InOut, true, true, true, Dinp::Skip),
    ] {
        compare(&format!("matmul_backward {c:?}"), g, both!(matmul_backward_body, c));
    }
}

// ---- 4. layernorm with a bf16 output ----------------------------------------------------------

fn layernorm_body<B: Backend>(be: &B, n: usize, c: usize) -> Outs {
    // inp (N, C) f32 with per-row offsets, so the means differ; w, b (C).
    let mut x = randn(30, n * c, 1.0);
    x.iter_mut().enumerate().for_each(|(i, v)| *v += (i / c) as f32 * 0.01);
    let inp = be.upload(&x);
    let w = be.upload(&randn(31, c, 1.0));
    let b = be.upload(&randn(32, c, 1.0));
    let mut out = be.activation_zeros(n * c + GUARD);
    be.fill(all_mut(be, &mut out), STALE);
    let mut mean = be.upload(&randn(33, n, 1.0)); // overwritten
    let mut rstd = be.upload(&randn(34, n, 1.0)); // overwritten
    be.layernorm_forward(
        be.view_mut(&mut out, 0..n * c),
        all_mut(be, &mut mean),
        all_mut(be, &mut rstd),
        all(be, &inp),
        all(be, &w),
        all(be, &b),
        c,
    );
    let got = host(be, &out);
    assert!(got[n * c..].iter().all(|&v| v == STALE), "{}: layernorm wrote past its output", be.name());
    vec![("out", got[..n * c].to_vec(), BF16_OUT), ("mean", host(be, &mean), F32_OUT), ("rstd", host(be, &rstd), F32_OUT)]
}

#[test]
fn layernorm_with_a_bf16_output_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    compare("layernorm 257x96", g, both!(layernorm_body, 257, 96));
    compare("layernorm 70x768", g, both!(layernorm_body, 70, 768));
    // C odd: rows start at odd bf16 offsets
    compare("layernorm 5x7", g, both!(layernorm_body, 5, 7));
}

// ---- 5. gelu on bf16 --------------------------------------------------------------------------

/// Value around a view, which the ops must leave alone (exact in bf16).
const SENTINEL: f32 = 7.0;

/// An activation buffer of `SENTINEL`s with `values` at `offset..offset + len`, and `GUARD`
/// more sentinels after them.
fn placed<B: Backend>(be: &B, values: &[f32], offset: usize) -> B::Buf {
    let mut buf = be.activation_zeros(offset + values.len() + GUARD);
    be.fill(all_mut(be, &mut buf), SENTINEL);
    be.write(be.view_mut(&mut buf, offset..offset + values.len()), values);
    buf
}

/// The window `offset..offset + n` of an output buffer made by `placed`, after checking that
/// everything around it still holds the sentinel.
fn window<B: Backend>(be: &B, buf: &B::Buf, offset: usize, n: usize, what: &str) -> Vec<f32> {
    let v = host(be, buf);
    let mut outside = v[..offset].iter().chain(&v[offset + n..]);
    assert!(outside.all(|&x| x == SENTINEL), "{}: {what} wrote outside its view", be.name());
    v[offset..offset + n].to_vec()
}

/// gelu_forward and gelu_backward_set with every view bf16, over `n` values; `offsets` are the
/// element offsets of the views of out (and dinp), inp and dout in their buffers. The kernels
/// take 8 bytes (4 values) at a time only when every pointer is 8-byte aligned, i.e. at offsets
/// that are multiples of 4; others, and the n % 4 tail, take the scalar loop.
fn gelu_body<B: Backend>(be: &B, n: usize, offsets: [usize; 3]) -> Outs {
    let [o_out, o_inp, o_dout] = offsets;
    let inp = placed(be, &randn_bf16(40, n, 2.0), o_inp);
    let dout = placed(be, &randn_bf16(41, n, 1.0), o_dout);
    let inp_v = be.view(&inp, o_inp..o_inp + n);
    let dout_v = be.view(&dout, o_dout..o_dout + n);
    let mut out = placed(be, &vec![STALE; n], o_out);
    be.gelu_forward(be.view_mut(&mut out, o_out..o_out + n), inp_v);
    let mut dinp = placed(be, &vec![STALE; n], o_out);
    be.gelu_backward_set(be.view_mut(&mut dinp, o_out..o_out + n), inp_v, dout_v);
    vec![
        ("gelu", window(be, &out, o_out, n, "gelu_forward"), BF16_OUT),
        ("dgelu_set", window(be, &dinp, o_out, n, "gelu_backward_set"), BF16_OUT),
    ]
}

#[test]
fn gelu_on_bf16_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    for (n, offsets) in [
        (4 * 96 * 70, [0, 0, 0]), // the MLP's hidden layer: vector loop only
        (1001, [0, 0, 0]),        // vector loop and a tail of 1
        (1003, [0, 0, 0]),        // a tail of 3
        (1001, [1, 1, 1]),        // every view 2 bytes off: scalar loop
        (4 * 96 * 70, [1, 1, 1]),
        (1001, [0, 1, 0]),        // one misaligned view is enough to leave the vector loop
        (1001, [0, 0, 1]),
        (1001, [3, 0, 0]),
        (1001, [4, 4, 4]),        // 8-byte aligned, not at the buffer's start: vector loop
        (3, [0, 0, 0]),           // shorter than one vector
    ] {
        compare(&format!("gelu bf16 n={n} offsets={offsets:?}"), g, both!(gelu_body, n, offsets));
    }
}

/// The GELU backward with the up-projection's bias gradient in the same pass: dinp bitwise the
/// plain gelu_backward_set's on the same device, and dbias (which it adds onto) the column sums of
/// that dinp within f32 rounding; 135 rows (two 64-row chunks and a short one) of 3 x 8 columns.
/// Columns not a multiple of 8 or a misaligned view decline (false) and leave dbias alone.
#[test]
fn gelu_backward_with_bias_sums_is_gelu_backward_and_the_column_sums() {
    let Some((g, _serial)) = gpu() else { return };
    let (rows, cols) = (135, 24);
    let n = rows * cols;
    let inp = activation(g, &randn_bf16(42, n, 2.0));
    let dout = activation(g, &randn_bf16(43, n, 1.0));
    let mut plain = activation(g, &vec![STALE; n]);
    g.gelu_backward_set(all_mut(g, &mut plain), all(g, &inp), all(g, &dout));
    let mut fused = activation(g, &vec![STALE; n]);
    let start: Vec<f32> = (0..cols).map(|c| c as f32 * 0.5).collect();
    let mut dbias = g.upload(&start);
    assert!(g.gelu_backward_set_with_bias(all_mut(g, &mut fused), all_mut(g, &mut dbias), all(g, &inp), all(g, &dout), cols), "declined a bf16 24-column matrix");
    let (want, got) = (host(g, &plain), host(g, &fused));
    assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "dinp differs from gelu_backward_set's");
    let sums: Vec<f64> = (0..cols).map(|c| start[c] as f64 + (0..rows).map(|r| want[r * cols + c] as f64).sum::<f64>()).collect();
    for (c, (&b, &w)) in host(g, &dbias).iter().zip(&sums).enumerate() {
        assert!((b as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "dbias[{c}] = {b}, the column's sum {w}");
    }
    // 20 columns (not a multiple of 8) and a view one element in: declined, dbias untouched
    let mut dbias = g.upload(&start[..20]);
    assert!(!g.gelu_backward_set_with_bias(g.view_mut(&mut fused, 0..rows * 20), all_mut(g, &mut dbias), g.view(&inp, 0..rows * 20), g.view(&dout, 0..rows * 20), 20));
    let mut dbias = g.upload(&start);
    assert!(!g.gelu_backward_set_with_bias(g.view_mut(&mut fused, 1..1 + 24 * 8), all_mut(g, &mut dbias), g.view(&inp, 1..1 + 24 * 8), g.view(&dout, 1..1 + 24 * 8), cols));
    assert_eq!(host(g, &dbias), start, "a declined call wrote dbias");
}

/// The attention backward with the qkv projection's bias gradient summed as its passes store
/// dqkv (`attention_backward_set_with_bias`): dqkv bitwise `attention_backward_set`'s on the same
/// device, and dbias (which it adds onto) bitwise what the projection's backward adds from dqkv
/// (the same 64-row partials, the same finish). Causal and bidirectional, head dims 32 and 64,
/// two batch entries of 128 rows. T = 100 (not a multiple of 64) and split q / kv decline
/// (false) and leave dbias alone; so does every case with SMELT_FUSED_QKV_BIAS=0.
#[test]
fn attention_backward_with_bias_sums_is_the_backward_and_the_column_sums() {
    use smelt_engine::backend::{AttnShape, QkvSource};
    let Some((g, _serial)) = gpu() else { return };
    let on = g.tuning().fused_qkv_bias;
    for (b, t, c, heads, causal) in [(2, 128, 96, 3, true), (2, 128, 128, 2, false), (1, 100, 96, 3, true)] {
        let shape = AttnShape { batch: b, q_len: t, kv_len: t, channels: c, heads, causal };
        let what = format!("B{b} T{t} C{c} H{heads} causal={causal}");
        let rows = b * t;
        let qkv = activation(g, &randn_bf16(50, rows * 3 * c, 1.0));
        let dout = activation(g, &randn_bf16(51, rows * c, 1.0));
        let mut out = g.activation_zeros(rows * c);
        let mut saved = g.zeros(g.attention_saved_len(shape));
        g.attention_forward(all_mut(g, &mut out), all_mut(g, &mut saved), QkvSource::Packed(all(g, &qkv)), shape);
        // the plain backward, then the projection's column sums of its dqkv (a matmul backward
        // with a bias: dW of a zero input, dbias += sum_n dqkv)
        let mut plain = activation(g, &vec![STALE; rows * 3 * c]);
        g.attention_backward_set(QkvSource::Packed(all_mut(g, &mut plain)), all(g, &dout), QkvSource::Packed(all(g, &qkv)), all(g, &out), all(g, &saved), shape);
        let start: Vec<f32> = (0..3 * c).map(|i| i as f32 * 0.25).collect();
        let mut want_db = g.upload(&start);
        let s = MatmulShape { rows, in_features: 8, out_features: 3 * c, layout: WeightLayout::InOut };
        let (zero_in, zero_w) = (activation(g, &vec![0.0; rows * 8]), g.upload(&vec![0.0; 8 * 3 * c]));
        let mut dw = g.zeros(8 * 3 * c);
        g.matmul_backward(None, all_mut(g, &mut dw), Some(all_mut(g, &mut want_db)), all(g, &plain), all(g, &zero_in), all(g, &zero_w), s);
        // the fused one
        let mut fused = activation(g, &vec![STALE; rows * 3 * c]);
        let mut db = g.upload(&start);
        let took = g.attention_backward_set_with_bias(QkvSource::Packed(all_mut(g, &mut fused)), all_mut(g, &mut db), all(g, &dout), QkvSource::Packed(all(g, &qkv)), all(g, &out), all(g, &saved), shape);
        assert_eq!(took, on && t % 64 == 0, "{what}: taken {took}");
        if took {
            assert_same_bits(&format!("{what}: dqkv"), &host(g, &fused), &host(g, &plain));
            assert_same_bits(&format!("{what}: dbias"), &host(g, &db), &host(g, &want_db));
            assert_ne!(host(g, &db), start, "{what}: dbias unchanged");
        } else {
            assert_eq!(host(g, &db), start, "{what}: a declined call wrote dbias");
        }
    }
    // split q and kv (cross-attention's layout): declined
    let shape = AttnShape { batch: 1, q_len: 64, kv_len: 64, channels: 64, heads: 1, causal: false };
    let (q, kv) = (activation(g, &randn_bf16(52, 64 * 64, 1.0)), activation(g, &randn_bf16(53, 64 * 128, 1.0)));
    let dout = activation(g, &randn_bf16(54, 64 * 64, 1.0));
    let mut out = g.activation_zeros(64 * 64);
    let mut saved = g.zeros(g.attention_saved_len(shape));
    g.attention_forward(all_mut(g, &mut out), all_mut(g, &mut saved), QkvSource::Split { q: all(g, &q), kv: all(g, &kv) }, shape);
    let (mut dq, mut dkv) = (g.activation_zeros(64 * 64), g.activation_zeros(64 * 128));
    let mut db = g.upload(&[1.0; 192]);
    let took = g.attention_backward_set_with_bias(QkvSource::Split { q: all_mut(g, &mut dq), kv: all_mut(g, &mut dkv) }, all_mut(g, &mut db), all(g, &dout), QkvSource::Split { q: all(g, &q), kv: all(g, &kv) }, all(g, &out), all(g, &saved), shape);
    assert!(!took, "split q / kv taken");
    assert_eq!(host(g, &db), vec![1.0; 192], "a declined call wrote dbias");
}

/// The LayerNorm backward with the next projection's bias gradient summed from its bf16 copy of
/// dinp (`layernorm_backward_and_copy_with_sum`): dinp, its copy and the LayerNorm's own
/// gradients bitwise `layernorm_backward_and_copy`'s on the same device, and dsum (which it adds
/// onto) bitwise what the projection's backward adds from the copy (the same 64-row partials,
/// the same finish). Both modes; 135 rows (two 64-row chunks and a short one) of 768 columns
/// (GPT-2's). C > 1024 (the two-pass kernels) and an f32 copy decline and leave dsum alone; so
/// does every case with SMELT_FUSED_PROJ_BIAS=0.
#[test]
fn layernorm_backward_with_sum_is_the_backward_and_the_copys_column_sums() {
    let Some((g, _serial)) = gpu() else { return };
    let on = g.tuning().fused_proj_bias;
    for (n, c, accumulate, bf16_copy) in [(135, 768, true, true), (135, 768, false, true), (70, 1100, true, true), (70, 256, true, false)] {
        let what = format!("N{n} C{c} accumulate={accumulate} bf16 copy={bf16_copy}");
        let inp = g.upload(&randn(60, n * c, 1.0));
        let w = g.upload(&randn(61, c, 1.0));
        let dout = activation(g, &randn_bf16(62, n * c, 1.0));
        let (mean, rstd) = (g.upload(&randn(63, n, 0.1)), g.upload(&vec![1.3; n]));
        let dinp0 = randn(64, n * c, 1.0);
        let copy_buf = |v: f32| if bf16_copy { activation(g, &vec![v; n * c]) } else { g.upload(&vec![v; n * c]) };
        // the plain op, then the column sums of its copy (a matmul backward with a bias)
        let (mut dinp_a, mut copy_a) = (g.upload(&dinp0), copy_buf(STALE));
        let (mut dw_a, mut db_a) = (g.upload(&vec![0.5; c]), g.upload(&vec![-0.5; c]));
        g.layernorm_backward_and_copy(accumulate, all_mut(g, &mut dinp_a), all_mut(g, &mut copy_a), all_mut(g, &mut dw_a), all_mut(g, &mut db_a), all(g, &dout), all(g, &inp), all(g, &w), all(g, &mean), all(g, &rstd), c);
        let start: Vec<f32> = (0..c).map(|i| i as f32 * 0.125).collect();
        let mut want_sum = g.upload(&start);
        let s = MatmulShape { rows: n, in_features: 8, out_features: c, layout: WeightLayout::InOut };
        let (zero_in, zero_w, mut scratch_dw) = (activation(g, &vec![0.0; n * 8]), g.upload(&vec![0.0; 8 * c]), g.zeros(8 * c));
        if bf16_copy {
            g.matmul_backward(None, all_mut(g, &mut scratch_dw), Some(all_mut(g, &mut want_sum)), all(g, &copy_a), all(g, &zero_in), all(g, &zero_w), s);
        }
        // the fused one
        let (mut dinp_b, mut copy_b) = (g.upload(&dinp0), copy_buf(STALE));
        let (mut dw_b, mut db_b) = (g.upload(&vec![0.5; c]), g.upload(&vec![-0.5; c]));
        let mut sum = g.upload(&start);
        let took = g.layernorm_backward_and_copy_with_sum(accumulate, all_mut(g, &mut dinp_b), all_mut(g, &mut copy_b), all_mut(g, &mut sum), all_mut(g, &mut dw_b), all_mut(g, &mut db_b), all(g, &dout), all(g, &inp), all(g, &w), all(g, &mean), all(g, &rstd), c);
        assert_eq!(took, on && c <= 1024 && bf16_copy, "{what}: taken {took}");
        if took {
            assert_same_bits(&format!("{what}: dinp"), &host(g, &dinp_b), &host(g, &dinp_a));
            assert_same_bits(&format!("{what}: copy"), &host(g, &copy_b), &host(g, &copy_a));
            assert_same_bits(&format!("{what}: dw"), &host(g, &dw_b), &host(g, &dw_a));
            assert_same_bits(&format!("{what}: db"), &host(g, &db_b), &host(g, &db_a));
            assert_same_bits(&format!("{what}: the copy's column sums"), &host(g, &sum), &host(g, &want_sum));
            assert_ne!(host(g, &sum), start, "{what}: dsum unchanged");
        } else {
            assert_eq!(host(g, &sum), start, "{what}: a declined call wrote dsum");
            assert_eq!(host(g, &dinp_b), dinp0, "{what}: a declined call wrote dinp");
        }
    }
}

// ---- 6. cross-entropy on bf16 logits ----------------------------------------------------------

fn cross_entropy_body<B: Backend>(be: &B, n: usize, v: usize) -> Outs {
    // targets (N): every fifth ignored, the first and last ids present.
    let mut rng = Rng::new(50);
    let targets: Vec<u32> = (0..n)
        .map(|i| match i % 5 {
            3 => IGNORE_INDEX,
            1 if i == 1 => 0,
            2 if i == 2 => v as u32 - 1,
            _ => rng.below(v as u64) as u32,
        })
        .collect();
    let t = be.upload_ids(&targets);
    // logits (N, V) as bf16 values, spread like a trained model's
    let mut logits = activation(be, &randn_bf16(51, n * v, 3.0));
    let mut losses = be.upload(&randn(52, n, 1.0)); // overwritten
    let mut lse = be.upload(&randn(53, n, 1.0)); // overwritten
    be.cross_entropy_forward(all_mut(be, &mut losses), all_mut(be, &mut lse), all(be, &logits), &t, v);
    be.cross_entropy_backward_in_place(all_mut(be, &mut logits), all(be, &lse), &t, 0.37, v);
    let grad = host(be, &logits);
    for (row, _) in targets.iter().enumerate().filter(|&(_, &t)| t == IGNORE_INDEX) {
        assert!(grad[row * v..(row + 1) * v].iter().all(|&g| g == 0.0), "{}: ignored row {row} has a gradient", be.name());
    }
    vec![("losses", host(be, &losses), F32_OUT), ("lse", host(be, &lse), F32_OUT), ("dlogits in place", grad, BF16_OUT)]
}

#[test]
fn cross_entropy_on_bf16_logits_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    compare("cross_entropy bf16 70x1001", g, both!(cross_entropy_body, 70, 1001));
    // a GPT-2 vocabulary: many values per thread of a row's block
    compare("cross_entropy bf16 9x50257", g, both!(cross_entropy_body, 9, 50257));
}

// ---- 7. ops that take f32 only refuse a bf16 view ---------------------------------------------

/// The message of a caught panic (`panic!` with arguments gives a String, a literal a &str).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(not a string)".into())
}

/// Runs `f`, which must panic with a message containing `needle`.
fn assert_panics_with(what: &str, needle: &str, f: impl FnOnce()) {
    let payload = catch_unwind(AssertUnwindSafe(f)).err().unwrap_or_else(|| panic!("{what}: did not panic"));
    let msg = panic_message(payload);
    println!("{what}: panicked with {msg:?}");
    assert!(msg.contains(needle), "{what}: panic message {msg:?} does not mention {needle:?}");
}

#[test]
fn f32_only_ops_refuse_bf16_views() {
    let Some((g, _serial)) = gpu() else { return };
    let n = 64;
    let act = activation(g, &randn_bf16(60, n, 1.0));
    let f = g.upload(&randn(61, n, 1.0));
    let mut out_f32 = g.zeros(n);
    let mut out_bf16 = g.activation_zeros(n);
    assert_panics_with("residual_forward, bf16 input", "bf16", || {
        g.residual_forward(all_mut(g, &mut out_f32), all(g, &act), all(g, &f))
    });
    assert_panics_with("residual_forward, bf16 output", "bf16", || {
        g.residual_forward(all_mut(g, &mut out_bf16), all(g, &f), all(g, &f))
    });
    assert_panics_with("gelu_forward, bf16 out and f32 inp", "bf16", || {
        g.gelu_forward(all_mut(g, &mut out_bf16), all(g, &f))
    });
    // A bf16 dinp can only be overwritten (a GEMM's bf16 output has no beta = 1).
    let s = MatmulShape { rows: 8, in_features: 8, out_features: 8, layout: WeightLayout::InOut };
    let (w, dout) = (g.upload(&randn_bf16(62, 64, 0.1)), activation(g, &randn_bf16(63, 64, 1.0)));
    let mut dw = g.zeros(64);
    let mut dinp = g.activation_zeros(64);
    assert_panics_with("matmul_backward accumulating into a bf16 dinp", "bf16", || {
        g.matmul_backward(Some(all_mut(g, &mut dinp)), all_mut(g, &mut dw), None, all(g, &dout), all(g, &act), all(g, &w), s)
    });
    // The refusals come before any kernel that could fault.
    g.synchronize().expect("a refused op leaves no device error");
}
