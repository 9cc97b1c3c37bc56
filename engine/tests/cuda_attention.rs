//! The CUDA fused attention against the CPU reference (`cpu/attention.rs`): forward output and
//! every input gradient, on random inputs and shapes that cross the kernels' 64-row tiles and
//! head-dim buckets, for both kernel families (f32 reference: `MatmulPrecision::F32`; bf16
//! tensor cores: `MatmulPrecision::Bf16`). One test body runs on both backends; without a GPU
//! each test prints why it skips and passes. The `bf16_io_*` tests run the bf16 family on bf16
//! activation buffers (`Backend::activation_zeros`) for every q/kv, out, dout, dq and dkv.
//! Every bf16 case also runs with the fused backward (`with_fused_attention_backward`: dk, dv
//! and dq in one pass, dq by atomics), whatever `SMELT_ATTN_FUSED_BWD` says; the other
//! backends have it off. On an sm_90 card (H100, H200) every bf16 case runs a third time on the
//! Hopper kernels (`attn_wgmma`: forward, dkv and dq passes on wgmma), whatever
//! `SMELT_ATTN_WGMMA` says; elsewhere that variant prints why it skips.
#![cfg(feature = "cuda")]

mod bf16_reference;
use bf16_reference::round_all;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use smelt_engine::backend::{AttnShape, OptionalOp, QkvSource, Scores};
use smelt_engine::cuda::{CudaBackend, CudaOptions, CudaTuning, Dtype, MatmulPrecision};
use smelt_engine::rng::Rng;
use smelt_engine::{Backend, CpuBackend};

/// ‖gpu − cpu‖ / ‖cpu‖ bounds of the forward output and of the gradients (whose sums run in
/// a different order on the GPU): (f32 kernels, bf16 tensor-core kernels).
const F32_TOL: (f64, f64) = (1e-5, 3e-5);
const BF16_TOL: (f64, f64) = (1e-2, 1e-2);

/// The backends under test: the f32 reference kernels, the bf16 tensor-core kernels with the
/// dkv and dq passes, the bf16 kernels with the fused backward, and (sm_90 only) the bf16
/// kernels on wgmma.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    F32,
    Bf16,
    Bf16Fused,
    Bf16Wgmma,
}

/// One backend per variant for every test in this file (NVRTC compiles all modules once).
fn gpu(v: Variant) -> Option<&'static CudaBackend> {
    static F32: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    static BF16: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    static FUSED: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    static WGMMA: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    let (cell, p) = match v {
        Variant::F32 => (&F32, MatmulPrecision::F32),
        Variant::Bf16 => (&BF16, MatmulPrecision::Bf16),
        Variant::Bf16Fused => (&FUSED, MatmulPrecision::Bf16),
        Variant::Bf16Wgmma => (&WGMMA, MatmulPrecision::Bf16),
    };
    let init = || {
        let opts = CudaOptions { matmul: p };
        if v == Variant::Bf16Wgmma {
            // compiled for sm_90a, so the switch must be on at construction
            let tuning = CudaTuning { attn_wgmma: true, ..CudaTuning::from_env().map_err(|e| e.to_string())? };
            let be = CudaBackend::new_with_tuning(0, opts, tuning).map_err(|e| e.to_string())?;
            if be.arch() != "sm_90" {
                return Err(format!("the wgmma kernels need an sm_90 device, this one is {}", be.arch()));
            }
            return Ok(be.with_fused_attention_backward(false));
        }
        CudaBackend::new_with(0, opts)
            .map(|be| be.with_fused_attention_backward(v == Variant::Bf16Fused))
            .map_err(|e| e.to_string())
    };
    match cell.get_or_init(init) {
        Ok(be) => Some(be),
        Err(why) => {
            eprintln!("skipping: no usable GPU ({why})");
            None
        }
    }
}

/// Host inputs of one attention call.
struct Inputs {
    shape: AttnShape,
    packed: bool,
    /// Packed: qkv (B,T,3C). Split: q (B,Tq,C).
    q: Vec<f32>,
    /// Split only: kv (B,Tk,2C).
    kv: Vec<f32>,
    dout: Vec<f32>,
    /// Starting values of the gradients, nonzero so that accumulation (`+=`) is checked.
    dq0: Vec<f32>,
    dkv0: Vec<f32>,
    /// Key padding mask (B), through `attention_ex_*`; None: the plain ops.
    key_lens: Option<Vec<u32>>,
}

/// Host results: the output and the gradient increments (final minus starting values).
struct Outputs {
    out: Vec<f32>,
    dq: Vec<f32>,
    dkv: Vec<f32>,
}

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

fn inputs(seed: u64, shape: AttnShape, packed: bool) -> Inputs {
    let mut rng = Rng::new(seed);
    let (b, c) = (shape.batch, shape.channels);
    let (nq, nkv) = if packed {
        (b * shape.q_len * 3 * c, 0)
    } else {
        (b * shape.q_len * c, b * shape.kv_len * 2 * c)
    };
    // std 1.5 makes the softmax peaked enough that the running max changes across key tiles.
    Inputs {
        shape,
        packed,
        q: randn(&mut rng, nq, 1.5),
        kv: randn(&mut rng, nkv, 1.5),
        dout: randn(&mut rng, b * shape.q_len * c, 1.0),
        dq0: randn(&mut rng, nq, 1.0),
        dkv0: randn(&mut rng, nkv, 1.0),
        key_lens: None,
    }
}

fn all<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> B::View<'a> {
    be.view(buf, 0..be.len(buf))
}

fn all_mut<'a, B: Backend>(be: &B, buf: &'a mut B::Buf) -> B::ViewMut<'a> {
    let n = be.len(buf);
    be.view_mut(buf, 0..n)
}

/// Forward then backward on one backend; the test body both backends share.
fn run<B: Backend>(be: &B, x: &Inputs) -> Outputs {
    let s = x.shape;
    let q = be.upload(&x.q);
    // Split sources only: a device may refuse a zero-length allocation.
    let kv = (!x.packed).then(|| be.upload(&x.kv));
    let dout = be.upload(&x.dout);
    let mut out = be.zeros(s.batch * s.q_len * s.channels);
    let mut saved = be.zeros(be.attention_saved_len(s));
    let src = || match &kv {
        None => QkvSource::Packed(all(be, &q)),
        Some(kv) => QkvSource::Split {
            q: all(be, &q),
            kv: all(be, kv),
        },
    };
    let lens = x.key_lens.as_ref().map(|l| be.upload_ids(l));
    match &lens {
        None => be.attention_forward(all_mut(be, &mut out), all_mut(be, &mut saved), src(), s),
        Some(lens) => be.attention_ex_forward(
            all_mut(be, &mut out),
            all_mut(be, &mut saved),
            src(),
            Scores::Dot,
            Some(lens),
            s,
        ),
    }

    let mut dq = be.upload(&x.dq0);
    let mut dkv = (!x.packed).then(|| be.upload(&x.dkv0));
    let dsrc = match &mut dkv {
        None => QkvSource::Packed(all_mut(be, &mut dq)),
        Some(dkv) => QkvSource::Split {
            q: all_mut(be, &mut dq),
            kv: all_mut(be, dkv),
        },
    };
    match &lens {
        None => be.attention_backward(
            dsrc,
            all(be, &dout),
            src(),
            all(be, &out),
            all(be, &saved),
            s,
        ),
        Some(lens) => be.attention_ex_backward(
            dsrc,
            Scores::Dot,
            all(be, &dout),
            src(),
            Scores::Dot,
            Some(lens),
            all(be, &out),
            all(be, &saved),
            s,
        ),
    }
    be.synchronize()
        .expect("attention ran without a device error");

    let minus = |a: Vec<f32>, b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    {
        // The overwriting variant, on buffers full of something else: the same gradient (with a
        // key mask, the padded keys' rows included: they must come out zero, not 7).
        let mut dq2 = be.upload(&vec![7.0; x.dq0.len()]);
        let mut dkv2 = (!x.packed).then(|| be.upload(&vec![-7.0; x.dkv0.len()]));
        let dsrc2 = match &mut dkv2 {
            None => QkvSource::Packed(all_mut(be, &mut dq2)),
            Some(dkv) => QkvSource::Split { q: all_mut(be, &mut dq2), kv: all_mut(be, dkv) },
        };
        let op = match &lens {
            None => {
                be.attention_backward_set(dsrc2, all(be, &dout), src(), all(be, &out), all(be, &saved), s);
                "attention_backward_set"
            }
            Some(lens) => {
                let (d, sc) = (Scores::Dot, Scores::Dot);
                be.attention_ex_backward_set(dsrc2, d, all(be, &dout), src(), sc, Some(lens), all(be, &out), all(be, &saved), s);
                "attention_ex_backward_set"
            }
        };
        be.synchronize().expect("the overwriting backward ran without a device error");
        let e = rel_err(&be.download(all(be, &dq2)), &minus(be.download(all(be, &dq)), &x.dq0));
        assert!(e < 1e-5, "{}: {op} dq differs from the accumulating op by {e}", be.name());
        if let (Some(d2), Some(d)) = (&dkv2, &dkv) {
            let e = rel_err(&be.download(all(be, d2)), &minus(be.download(all(be, d)), &x.dkv0));
            assert!(e < 1e-5, "{}: {op} dkv differs from the accumulating op by {e}", be.name());
        }
    }
    Outputs {
        out: be.download(all(be, &out)),
        dq: minus(be.download(all(be, &dq)), &x.dq0),
        dkv: dkv
            .map(|d| minus(be.download(all(be, &d)), &x.dkv0))
            .unwrap_or_default(),
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    assert!(
        den > 0.0,
        "reference is all zeros: the comparison would prove nothing"
    );
    (num / den).sqrt()
}

/// Runs one case on the CPU and on both GPU kernel families, and bounds the relative errors.
fn check(name: &str, seed: u64, shape: AttnShape, packed: bool) {
    check_inputs(name, &inputs(seed, shape, packed));
}

fn check_inputs(name: &str, x: &Inputs) {
    let packed = x.packed;
    let mut want = None;
    for (p, (fwd_tol, grad_tol)) in [(Variant::F32, F32_TOL), (Variant::Bf16, BF16_TOL), (Variant::Bf16Fused, BF16_TOL), (Variant::Bf16Wgmma, BF16_TOL)] {
        let Some(gpu) = gpu(p) else { return };
        if x.key_lens.is_some() && !gpu.supports(OptionalOp::KeyPaddingMask) {
            println!("skipping {name}: the CUDA backend does not route key padding masks yet");
            return;
        }
        let want = want.get_or_insert_with(|| run(&CpuBackend::new(), x));
        let got = run(gpu, x);
        let e_out = rel_err(&got.out, &want.out);
        let e_dq = rel_err(&got.dq, &want.dq);
        let e_dkv = if packed {
            0.0
        } else {
            rel_err(&got.dkv, &want.dkv)
        };
        let grad = if packed { "dqkv" } else { "dq" };
        println!("{name} [{p:?}]: rel err out {e_out:.2e}, {grad} {e_dq:.2e}, dkv {e_dkv:.2e}");
        assert!(
            e_out < fwd_tol,
            "{name} [{p:?}]: forward rel err {e_out:.2e} >= {fwd_tol:.0e}"
        );
        assert!(
            e_dq < grad_tol,
            "{name} [{p:?}]: {grad} rel err {e_dq:.2e} >= {grad_tol:.0e}"
        );
        assert!(
            e_dkv < grad_tol,
            "{name} [{p:?}]: dkv rel err {e_dkv:.2e} >= {grad_tol:.0e}"
        );
    }
}

fn shape(
    batch: usize,
    q_len: usize,
    kv_len: usize,
    channels: usize,
    heads: usize,
    causal: bool,
) -> AttnShape {
    AttnShape {
        batch,
        q_len,
        kv_len,
        channels,
        heads,
        causal,
    }
}

#[test]
fn causal_packed_crosses_tiles() {
    // T = 129: two full 64-row tiles and a 1-row tail; hd = 32.
    check(
        "causal packed B=2 T=129 C=96 H=3",
        1,
        shape(2, 129, 129, 96, 3, true),
        true,
    );
}

#[test]
fn bidirectional_packed() {
    check(
        "bidirectional packed B=2 T=70 C=96 H=3",
        2,
        shape(2, 70, 70, 96, 3, false),
        true,
    );
}

#[test]
fn cross_attention_split() {
    // Tq != Tk, each with a tail tile.
    check(
        "cross split B=2 Tq=33 Tk=77 C=96 H=3",
        3,
        shape(2, 33, 77, 96, 3, false),
        false,
    );
}

#[test]
fn gpt2_head_dim_64() {
    check(
        "causal packed B=2 T=256 C=128 H=2 (hd 64)",
        4,
        shape(2, 256, 256, 128, 2, true),
        true,
    );
}

#[test]
fn head_dim_128() {
    check(
        "causal packed B=1 T=100 C=256 H=2 (hd 128)",
        5,
        shape(1, 100, 100, 256, 2, true),
        true,
    );
}

#[test]
fn odd_head_dim_cross() {
    // hd = 40 runs the 64-wide kernels with padded columns; Tk spans three key tiles.
    check(
        "cross split B=1 Tq=65 Tk=130 C=120 H=3 (hd 40)",
        6,
        shape(1, 65, 130, 120, 3, false),
        false,
    );
}

#[test]
fn tiny_causal() {
    // Fewer rows than one warp's share of a tile.
    check(
        "causal packed B=3 T=3 C=40 H=2 (hd 20)",
        7,
        shape(3, 3, 3, 40, 2, true),
        true,
    );
}

#[test]
fn key_padding_mask_bidirectional() {
    // BERT-style: the second sequence has 37 real keys of 70; keys past 64 form a padding tile.
    let mut x = inputs(9, shape(2, 70, 70, 96, 3, false), true);
    x.key_lens = Some(vec![70, 37]);
    check_inputs("masked bidirectional packed T=70 lens [70, 37]", &x);
}

#[test]
fn key_padding_mask_cross_and_causal() {
    let mut x = inputs(10, shape(2, 33, 77, 96, 3, false), false);
    x.key_lens = Some(vec![5, 77]);
    check_inputs("masked cross split Tq=33 Tk=77 lens [5, 77]", &x);
    // A length on a tile edge: the second key tile of the first sequence is all padding.
    let mut x = inputs(11, shape(2, 129, 129, 96, 3, true), true);
    x.key_lens = Some(vec![64, 100]);
    check_inputs("masked causal packed T=129 lens [64, 100]", &x);
}

#[test]
fn harness_runs_on_the_cpu() {
    // The shared test body must work without a GPU too (masked path included), so a broken
    // harness shows here rather than only on the device machine.
    let mut x = inputs(12, shape(2, 70, 70, 96, 3, false), true);
    x.key_lens = Some(vec![70, 37]);
    let o = run(&CpuBackend::new(), &x);
    assert!(
        o.out.iter().chain(&o.dq).all(|v| v.is_finite()),
        "non-finite CPU result"
    );
    assert!(
        o.dq.iter().any(|&v| v != 0.0),
        "the CPU backward added nothing"
    );
}

#[test]
fn backward_is_deterministic() {
    // dq comes from its own pass, not atomics: two runs agree bit for bit (the fused backward's
    // dq is summed by atomics in no fixed order, so it is left out).
    for p in [Variant::F32, Variant::Bf16, Variant::Bf16Wgmma] {
        let Some(gpu) = gpu(p) else { return };
        let x = inputs(8, shape(2, 129, 129, 96, 3, true), true);
        let a = run(gpu, &x);
        let b = run(gpu, &x);
        assert!(
            a.out == b.out,
            "[{p:?}] forward output differs between identical runs"
        );
        assert!(a.dq == b.dq, "[{p:?}] dqkv differs between identical runs");
    }
}

// ---- bf16 activation buffers ------------------------------------------------------------------
//
// With bf16 matmuls the model keeps q/kv, out, dout, dq and dkv in bf16 activation buffers
// (`activation_zeros`), which the bf16 kernels read and write directly (AttnParams.io_bf16).
// The inputs are rounded to bf16 on the host first, so the CPU reference (f32 buffers holding
// the same values) and the GPU see identical operands; what is left is the bf16 family's own
// error (BF16_TOL above, ~1e-2) plus one bf16 rounding of each output (~1e-3 as a norm).

/// ‖gpu − cpu‖ / ‖cpu‖ bounds with bf16 buffers: (forward output, gradients).
const BF16_IO_TOL: (f64, f64) = (2e-2, 3e-2);

/// The bf16 backend when it hands out bf16 activation buffers; None (after a skip line)
/// without a GPU, or where activations stay f32.
fn bf16_activations(v: Variant) -> Option<&'static CudaBackend> {
    let be = gpu(v)?;
    if be.activation_zeros(1).dtype() != Dtype::Bf16 {
        let off = !be.tuning().bf16_activations;
        let sm80 = be.arch().strip_prefix("sm_").and_then(|v| v.parse::<u32>().ok()).is_some_and(|v| v >= 80);
        assert!(
            off || !sm80,
            "a Bf16 backend on {} must hand out bf16 activations unless SMELT_BF16_ACTIVATIONS=0",
            be.arch()
        );
        println!("skipping: activations stay f32 here ({}, SMELT_BF16_ACTIVATIONS=0: {off})", be.arch());
        return None;
    }
    Some(be)
}


fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

/// An activation buffer (bf16 on a Bf16 CUDA backend, f32 on the CPU) holding `values`.
fn activation<B: Backend>(be: &B, values: &[f32]) -> B::Buf {
    let mut buf = be.activation_zeros(values.len());
    be.write(all_mut(be, &mut buf), values);
    buf
}

fn source<'a, B: Backend>(be: &B, q: &'a B::Buf, kv: Option<&'a B::Buf>) -> QkvSource<B::View<'a>> {
    match kv {
        None => QkvSource::Packed(all(be, q)),
        Some(kv) => QkvSource::Split { q: all(be, q), kv: all(be, kv) },
    }
}

fn dsource<'a, B: Backend>(be: &B, dq: &'a mut B::Buf, dkv: Option<&'a mut B::Buf>) -> QkvSource<B::ViewMut<'a>> {
    match dkv {
        None => QkvSource::Packed(all_mut(be, dq)),
        Some(dkv) => QkvSource::Split { q: all_mut(be, dq), kv: all_mut(be, dkv) },
    }
}

/// The plain forward op, or `attention_ex_forward` with dot scores when there is a key mask.
fn forward_op<B: Backend>(
    be: &B,
    out: B::ViewMut<'_>,
    saved: B::ViewMut<'_>,
    src: QkvSource<B::View<'_>>,
    lens: Option<&B::Ids>,
    s: AttnShape,
) {
    match lens {
        None => be.attention_forward(out, saved, src, s),
        Some(l) => be.attention_ex_forward(out, saved, src, Scores::Dot, Some(l), s),
    }
}

/// One of the four backward ops: accumulating or overwriting, plain or `_ex` (key mask).
#[allow(clippy::too_many_arguments)]
fn backward_op<B: Backend>(
    be: &B,
    accumulate: bool,
    dsrc: QkvSource<B::ViewMut<'_>>,
    dout: B::View<'_>,
    src: QkvSource<B::View<'_>>,
    out: B::View<'_>,
    saved: B::View<'_>,
    lens: Option<&B::Ids>,
    s: AttnShape,
) {
    let (d, sc) = (Scores::Dot, Scores::Dot);
    match (lens, accumulate) {
        (None, true) => be.attention_backward(dsrc, dout, src, out, saved, s),
        (None, false) => be.attention_backward_set(dsrc, dout, src, out, saved, s),
        (Some(l), true) => be.attention_ex_backward(dsrc, d, dout, src, sc, Some(l), out, saved, s),
        (Some(l), false) => be.attention_ex_backward_set(dsrc, d, dout, src, sc, Some(l), out, saved, s),
    }
}

/// Host results of [`run_io`]: the output, the accumulating backward's increments and the
/// overwriting backward's results (both should be the gradient).
struct IoOutputs {
    out: Vec<f32>,
    dq: Vec<f32>,
    dkv: Vec<f32>,
    dq_set: Vec<f32>,
    dkv_set: Vec<f32>,
}

/// Forward, accumulating backward and overwriting backward, every tensor but the saved state
/// in an activation buffer (bf16 on the GPU under test, f32 on the CPU).
fn run_io<B: Backend>(be: &B, x: &Inputs) -> IoOutputs {
    let s = x.shape;
    let q = activation(be, &x.q);
    // Split sources only: a device may refuse a zero-length allocation.
    let kv = (!x.packed).then(|| activation(be, &x.kv));
    let dout = activation(be, &x.dout);
    let mut out = be.activation_zeros(s.batch * s.q_len * s.channels);
    let mut saved = be.zeros(be.attention_saved_len(s));
    let lens = x.key_lens.as_ref().map(|l| be.upload_ids(l));
    let lens = lens.as_ref();
    forward_op(be, all_mut(be, &mut out), all_mut(be, &mut saved), source(be, &q, kv.as_ref()), lens, s);

    let mut dq = activation(be, &x.dq0);
    let mut dkv = (!x.packed).then(|| activation(be, &x.dkv0));
    let (src, dsrc) = (source(be, &q, kv.as_ref()), dsource(be, &mut dq, dkv.as_mut()));
    backward_op(be, true, dsrc, all(be, &dout), src, all(be, &out), all(be, &saved), lens, s);
    // Overwriting, over NaN: any element the kernels leave unwritten (a padded key's row
    // included, which must become zero) stays NaN.
    let nan = |n: usize| vec![f32::NAN; n];
    let mut dq2 = activation(be, &nan(x.dq0.len()));
    let mut dkv2 = (!x.packed).then(|| activation(be, &nan(x.dkv0.len())));
    let (src, dsrc) = (source(be, &q, kv.as_ref()), dsource(be, &mut dq2, dkv2.as_mut()));
    backward_op(be, false, dsrc, all(be, &dout), src, all(be, &out), all(be, &saved), lens, s);
    be.synchronize().expect("attention on activation buffers ran without a device error");

    let minus = |a: Vec<f32>, b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    let host = |b: &B::Buf| be.download(all(be, b));
    IoOutputs {
        out: host(&out),
        dq: minus(host(&dq), &x.dq0),
        dkv: dkv.map(|d| minus(host(&d), &x.dkv0)).unwrap_or_default(),
        dq_set: host(&dq2),
        dkv_set: dkv2.map(|d| host(&d)).unwrap_or_default(),
    }
}

/// `inputs` with q/kv and dout rounded to bf16 (values a bf16 buffer holds exactly).
fn bf16_inputs(seed: u64, shape: AttnShape, packed: bool, key_lens: Option<Vec<u32>>) -> Inputs {
    let mut x = inputs(seed, shape, packed);
    x.q = round_all(&x.q);
    x.kv = round_all(&x.kv);
    x.dout = round_all(&x.dout);
    x.key_lens = key_lens;
    x
}

/// Starting gradients for the accumulating op: bf16 values with the gradient's own scale, so
/// that the bf16 rounding of (start + gradient) stays small next to the gradient (a start much
/// larger than the gradient would drown it), while a lost start or lost gradient is an O(1) error.
fn gradient_sized_start(seed: u64, grad: &[f32]) -> Vec<f32> {
    if grad.is_empty() {
        return Vec::new();
    }
    let mut rng = Rng::new(seed);
    round_all(&randn(&mut rng, grad.len(), rms(grad)))
}

fn assert_finite(name: &str, what: &str, v: &[f32]) {
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    assert!(bad == 0, "{name}: {bad} of {} {what} values are not finite (unwritten NaN, or overflow)", v.len());
}

/// One case on the CPU (f32 buffers) and on the GPU (bf16 buffers), errors bounded.
fn check_bf16_io(name: &str, seed: u64, shape: AttnShape, packed: bool, key_lens: Option<Vec<u32>>) {
    for v in [Variant::Bf16, Variant::Bf16Fused, Variant::Bf16Wgmma] {
        check_bf16_io_on(v, name, seed, shape, packed, key_lens.clone());
    }
}

fn check_bf16_io_on(v: Variant, name: &str, seed: u64, shape: AttnShape, packed: bool, key_lens: Option<Vec<u32>>) {
    let Some(be) = bf16_activations(v) else { return };
    let name = &format!("{name} [{v:?}]");
    let mut x = bf16_inputs(seed, shape, packed, key_lens);
    let want = run_io(&CpuBackend::new(), &x);
    x.dq0 = gradient_sized_start(seed + 100, &want.dq_set);
    x.dkv0 = gradient_sized_start(seed + 200, &want.dkv_set);
    let got = run_io(be, &x);
    let (fwd_tol, grad_tol) = BF16_IO_TOL;
    let grad = if packed { "dqkv" } else { "dq" };
    let mut checks = vec![
        ("out", &got.out, &want.out, fwd_tol),
        (grad, &got.dq, &want.dq_set, grad_tol),
        ("set", &got.dq_set, &want.dq_set, grad_tol),
    ];
    if !packed {
        checks.push(("dkv", &got.dkv, &want.dkv_set, grad_tol));
        checks.push(("dkv set", &got.dkv_set, &want.dkv_set, grad_tol));
    }
    let mut line = format!("{name} [bf16 buffers]: rel err");
    for (what, g, _, _) in &checks {
        assert_finite(name, what, g);
    }
    let errs: Vec<f64> = checks.iter().map(|(_, g, w, _)| rel_err(g, w)).collect();
    for ((what, _, _, _), e) in checks.iter().zip(&errs) {
        line += &format!(" {what} {e:.2e}");
    }
    println!("{line}");
    for ((what, _, _, tol), e) in checks.iter().zip(&errs) {
        assert!(e < tol, "{name} [bf16 buffers]: {what} rel err {e:.2e} >= {tol:.0e}");
    }
}

#[test]
fn bf16_io_packed_self_attention() {
    // T = 129: two full 64-row tiles and a 1-row tail; hd = 32.
    check_bf16_io("causal packed B=2 T=129 C=96 H=3", 21, shape(2, 129, 129, 96, 3, true), true, None);
    check_bf16_io("bidirectional packed B=2 T=70 C=96 H=3", 22, shape(2, 70, 70, 96, 3, false), true, None);
    check_bf16_io("causal packed B=3 T=3 C=40 H=2 (hd 20)", 23, shape(3, 3, 3, 40, 2, true), true, None);
}

#[test]
fn bf16_io_head_dims_64_and_128() {
    check_bf16_io("causal packed B=2 T=256 C=128 H=2 (hd 64)", 24, shape(2, 256, 256, 128, 2, true), true, None);
    check_bf16_io("causal packed B=1 T=100 C=256 H=2 (hd 128)", 25, shape(1, 100, 100, 256, 2, true), true, None);
}

#[test]
fn bf16_io_cross_attention_split() {
    check_bf16_io("cross split B=2 Tq=33 Tk=77 C=96 H=3", 26, shape(2, 33, 77, 96, 3, false), false, None);
    // hd = 40 runs the 64-wide kernels with padded columns; Tk spans three key tiles.
    check_bf16_io("cross split B=1 Tq=65 Tk=130 C=120 H=3 (hd 40)", 27, shape(1, 65, 130, 120, 3, false), false, None);
}

#[test]
fn bf16_io_key_padding_masks() {
    // Keys past 64 of the second sequence form a tile of padding, whose dk, dv rows the
    // overwriting op must zero (they start as NaN).
    let s = shape(2, 70, 70, 96, 3, false);
    check_bf16_io("masked bidirectional packed T=70 lens [70, 37]", 28, s, true, Some(vec![70, 37]));
    let s = shape(2, 33, 77, 96, 3, false);
    check_bf16_io("masked cross split Tq=33 Tk=77 lens [5, 77]", 29, s, false, Some(vec![5, 77]));
    // A length on a tile edge: the second key tile of the first sequence is all padding.
    let s = shape(2, 129, 129, 96, 3, true);
    check_bf16_io("masked causal packed T=129 lens [64, 100]", 30, s, true, Some(vec![64, 100]));
}

/// The text of a caught panic.
fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast_ref::<&str>().map(|s| s.to_string()).unwrap_or_default(),
    }
}

/// `op` must panic, naming the element type.
fn assert_refused(what: &str, op: impl FnOnce()) {
    let payload = catch_unwind(AssertUnwindSafe(op)).err();
    let text = payload.map(panic_text).unwrap_or_else(|| panic!("{what}: accepted, should have panicked"));
    assert!(text.contains("element type"), "{what}: panicked without naming the element type: {text}");
}

#[test]
fn bf16_io_refuses_mixed_element_types() {
    // A bf16 source with an f32 output (or gradient) would have the kernels read or write one
    // of them with the wrong element size; the op must refuse before launching anything.
    let Some(be) = bf16_activations(Variant::Bf16) else { return };
    let s = shape(1, 8, 8, 32, 2, true);
    let (n_qkv, n_out) = (8 * 3 * 32, 8 * 32);
    let qkv = activation(be, &vec![0.5; n_qkv]);
    let dout = activation(be, &vec![0.25; n_out]);
    let mut out = be.activation_zeros(n_out);
    let mut out_f32 = be.zeros(n_out);
    let mut saved = be.zeros(be.attention_saved_len(s));
    let src = || QkvSource::Packed(all(be, &qkv));
    assert_refused("forward with an f32 out", || {
        be.attention_forward(all_mut(be, &mut out_f32), all_mut(be, &mut saved), src(), s)
    });
    // A proper forward, so that only the element type is wrong below.
    be.attention_forward(all_mut(be, &mut out), all_mut(be, &mut saved), src(), s);
    let mut dqkv_f32 = be.zeros(n_qkv);
    assert_refused("backward into an f32 dqkv", || {
        let d = QkvSource::Packed(all_mut(be, &mut dqkv_f32));
        be.attention_backward(d, all(be, &dout), src(), all(be, &out), all(be, &saved), s)
    });
    let mut dqkv = be.activation_zeros(n_qkv);
    let dout_f32 = be.zeros(n_out);
    assert_refused("backward_set from an f32 dout", || {
        let d = QkvSource::Packed(all_mut(be, &mut dqkv));
        be.attention_backward_set(d, all(be, &dout_f32), src(), all(be, &out), all(be, &saved), s)
    });
    be.synchronize().expect("the refused calls left no device error");
}

#[test]
fn bf16_io_harness_runs_on_the_cpu() {
    // The bf16-buffer test body without a GPU (CPU activation buffers are f32): both backward
    // variants agree and the NaN the overwriting one starts from is gone.
    let x = bf16_inputs(31, shape(2, 33, 77, 96, 3, false), false, Some(vec![5, 77]));
    let o = run_io(&CpuBackend::new(), &x);
    for (what, v) in [("dq", &o.dq_set), ("dkv", &o.dkv_set)] {
        assert_finite("cpu", what, v);
    }
    assert!(rel_err(&o.dq, &o.dq_set) < 1e-5, "cpu: accumulating and overwriting dq differ");
    assert!(rel_err(&o.dkv, &o.dkv_set) < 1e-5, "cpu: accumulating and overwriting dkv differ");
}
