//! The CUDA backend's cuBLASLt training epilogues (engine/src/cuda/lt.rs) against the CPU
//! reference: the MLP's up-projection + GELU in one GEMM (`matmul_gelu_forward_fused`, GELU_AUX_
//! BIAS), its backward with the up-projection's bias gradient (`matmul_dgelu_backward_fused`,
//! DGELU_BGRAD), and weight gradients that sum dout for the bias gradient in the same GEMM
//! (BGRADA / BGRADB in `matmul_backward`). Each test asserts that the fused path really ran
//! (`CudaBackend::epilogue_stats`): a card whose cuBLASLt refuses an epilogue fails here with
//! the reason logged, rather than passing on the unfused ops.
//!
//! Inputs are rounded to bf16 on the host first (the GPU's GEMMs take bf16 operands), so both
//! backends see the same operands; what remains is the GPU's rounding of bf16 outputs (`pre`,
//! `out`, `dpre`, and the bf16 bias gradient of DGELU_BGRAD: ~2^-9 per value) and summation
//! order. N = 200 rows is not a multiple of any GEMM tile. Skips (prints why) without a GPU.
#![cfg(feature = "cuda")]

mod bf16_reference;
mod op_buffers;

use bf16_reference::round_all;
use op_buffers::{activation, all, all_mut, host, randn, rel_err};
use smelt_engine::backend::{Backend, MatmulShape, WeightLayout};
use smelt_engine::cuda::{CudaBackend, CudaOptions, EpilogueStats, MatmulPrecision};
use smelt_engine::CpuBackend;

/// A bf16 output compared as a norm: 8 bits of mantissa, plus GELU' at bf16-rounded inputs.
const BF16_OUT: f64 = 1.5e-2;
/// An f32 output from operands both backends hold exactly: summation order only.
const F32_OUT: f64 = 5e-4;

const N: usize = 200;
const C: usize = 64;
const F: usize = 256;

/// A bf16 backend with both epilogues on, or None (after a skip line) without a GPU.
fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new_with(0, CudaOptions { matmul: MatmulPrecision::Bf16 }) {
        Ok(be) => Some(be.with_gelu_epilogue(true).with_bgrad_epilogue(true)),
        Err(e) => {
            println!("skipping: {e}");
            None
        }
    }
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    println!("{what}: relative error {e:.2e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} above {tol:.0e}");
}

/// Weights `(IC, OC)` for `InOut`, `(OC, IC)` for `OutIn`: same values, as each layout stores them.
fn weight(seed: u64, ic: usize, oc: usize, layout: WeightLayout) -> Vec<f32> {
    let w = round_all(&randn(seed, ic * oc, 0.1));
    match layout {
        WeightLayout::InOut => w,
        WeightLayout::OutIn => (0..oc).flat_map(|o| (0..ic).map(move |i| (o, i))).map(|(o, i)| w[i * oc + o]).collect(),
    }
}

/// What one MLP pass produced: pre, out = gelu(pre), then from dy: dpre, the down-projection's
/// dW and db, and the up-projection's db (`fc_db`). Gradients start from nonzero values, so the
/// accumulating ones are checked to add, the overwritten one (dpre) to overwrite.
struct Mlp {
    pre: Vec<f32>,
    out: Vec<f32>,
    dpre: Vec<f32>,
    proj_dw: Vec<f32>,
    proj_db: Vec<f32>,
    fc_db: Vec<f32>,
}

/// Runs the MLP's up-projection + GELU and the backward pass through the down-projection and
/// the GELU, fused where `be` fuses (`fused` says whether both fused calls returned true).
fn mlp<B: Backend>(be: &B, layout: WeightLayout) -> (Mlp, bool) {
    let fc = MatmulShape { rows: N, in_features: C, out_features: F, layout };
    let proj = MatmulShape { rows: N, in_features: F, out_features: C, layout };
    let x = activation(be, &round_all(&randn(1, N * C, 1.0)));
    let fc_w = be.upload(&weight(2, C, F, layout));
    let fc_b = be.upload(&round_all(&randn(3, F, 0.5)));
    let proj_w = be.upload(&weight(4, F, C, layout));
    let dy = activation(be, &round_all(&randn(5, N * C, 1.0)));
    let (mut pre, mut out) = (be.activation_zeros(N * F), be.activation_zeros(N * F));
    let fused_fwd = be.matmul_gelu_forward_fused(all_mut(be, &mut out), all_mut(be, &mut pre), all(be, &x), all(be, &fc_w), Some(all(be, &fc_b)), fc);
    if !fused_fwd {
        be.matmul_forward(all_mut(be, &mut pre), all(be, &x), all(be, &fc_w), Some(all(be, &fc_b)), fc);
        be.gelu_forward(all_mut(be, &mut out), all(be, &pre));
    }
    let mut dpre = activation(be, &vec![7.0; N * F]);
    let mut proj_dw = be.upload(&randn(6, F * C, 2.0));
    let mut proj_db = be.upload(&randn(7, C, 2.0));
    let mut fc_db = be.upload(&randn(8, F, 2.0));
    let fused_bwd = be.matmul_dgelu_backward_fused(
        all_mut(be, &mut dpre),
        Some(all_mut(be, &mut fc_db)),
        all_mut(be, &mut proj_dw),
        Some(all_mut(be, &mut proj_db)),
        all(be, &dy),
        all(be, &out),
        all(be, &pre),
        all(be, &proj_w),
        proj,
    );
    if !fused_bwd {
        let mut dact = be.activation_zeros(N * F);
        be.matmul_backward_set_dinp(all_mut(be, &mut dact), all_mut(be, &mut proj_dw), Some(all_mut(be, &mut proj_db)), all(be, &dy), all(be, &out), all(be, &proj_w), proj);
        be.gelu_backward_set(all_mut(be, &mut dpre), all(be, &pre), all(be, &dact));
        // the up-projection's bias gradient, as its matmul backward would add it (dW discarded)
        let mut scratch_dw = be.zeros(C * F);
        be.matmul_backward(None, all_mut(be, &mut scratch_dw), Some(all_mut(be, &mut fc_db)), all(be, &dpre), all(be, &x), all(be, &fc_w), fc);
    }
    be.synchronize().unwrap_or_else(|e| panic!("device error: {e}"));
    let run = Mlp {
        pre: host(be, &pre),
        out: host(be, &out),
        dpre: host(be, &dpre),
        proj_dw: host(be, &proj_dw),
        proj_db: host(be, &proj_db),
        fc_db: host(be, &fc_db),
    };
    (run, fused_fwd && fused_bwd)
}

#[test]
fn gelu_epilogues_match_the_cpu_ops() {
    let Some(g) = gpu() else { return };
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        let before = g.epilogue_stats();
        let (got, fused) = mlp(&g, layout);
        let after = g.epilogue_stats();
        assert!(
            fused && after.gelu_forward == before.gelu_forward + 1 && after.dgelu_backward == before.dgelu_backward + 1,
            "{layout:?}: cuBLASLt did not take the GELU epilogues ({before:?} -> {after:?}; its refusal is logged)"
        );
        let (want, cpu_fused) = mlp(&CpuBackend::new(), layout);
        assert!(!cpu_fused, "the CPU backend has no fused MLP ops");
        let what = |name: &str| format!("{layout:?} {name}");
        check(&what("pre"), &got.pre, &want.pre, BF16_OUT);
        check(&what("out"), &got.out, &want.out, BF16_OUT);
        check(&what("dpre"), &got.dpre, &want.dpre, BF16_OUT);
        // dW's operands are out (bf16 on both sides up to one rounding) and dy (exact)
        check(&what("proj dW"), &got.proj_dw, &want.proj_dw, BF16_OUT);
        check(&what("proj db"), &got.proj_db, &want.proj_db, F32_OUT);
        check(&what("fc db (from the epilogue, bf16)"), &got.fc_db, &want.fc_db, BF16_OUT);
    }
}

/// One matmul backward with a bias over shape (N, ic) -> oc: dinp, dW and db from nonzero
/// starting values (both accumulate).
fn bias_backward<B: Backend>(be: &B, layout: WeightLayout, ic: usize, oc: usize) -> Vec<(&'static str, Vec<f32>)> {
    let s = MatmulShape { rows: N, in_features: ic, out_features: oc, layout };
    let x = be.upload(&round_all(&randn(11, N * ic, 1.0)));
    let w = be.upload(&weight(12, ic, oc, layout));
    let dy = be.upload(&round_all(&randn(13, N * oc, 1.0)));
    let mut dinp = be.upload(&randn(14, N * ic, 0.1));
    let mut dw = be.upload(&randn(15, ic * oc, 0.1));
    let mut db = be.upload(&randn(16, oc, 0.1));
    be.matmul_backward(Some(all_mut(be, &mut dinp)), all_mut(be, &mut dw), Some(all_mut(be, &mut db)), all(be, &dy), all(be, &x), all(be, &w), s);
    be.synchronize().unwrap_or_else(|e| panic!("device error: {e}"));
    vec![("dinp", host(be, &dinp)), ("dW", host(be, &dw)), ("db", host(be, &db))]
}

#[test]
fn bias_gradients_from_the_weight_gemm_match_the_cpu() {
    let Some(g) = gpu() else { return };
    // OC = 96: the epilogue path; OC = 37 (not a multiple of 8): the padded GEMMs and the
    // column-sum pass, which must still be right with the epilogue switched on.
    for (layout, oc, fused) in [(WeightLayout::InOut, 96, true), (WeightLayout::OutIn, 96, true), (WeightLayout::InOut, 37, false), (WeightLayout::OutIn, 37, false)] {
        let before = g.epilogue_stats();
        let got = bias_backward(&g, layout, C, oc);
        let after = g.epilogue_stats();
        let took = after.bgrad - before.bgrad;
        assert_eq!(
            took,
            fused as u64,
            "{layout:?} OC={oc}: bias-gradient epilogue taken {took} times, expected {} ({before:?} -> {after:?}; a refusal is logged)",
            fused as u64
        );
        let want = bias_backward(&CpuBackend::new(), layout, C, oc);
        for ((name, got), (_, want)) in got.iter().zip(&want) {
            check(&format!("{layout:?} OC={oc} {name}"), got, want, F32_OUT);
        }
    }
}

#[test]
fn epilogues_stay_off_unless_asked() {
    let Ok(be) = CudaBackend::new_with(0, CudaOptions { matmul: MatmulPrecision::Bf16 }) else {
        println!("skipping: no GPU");
        return;
    };
    let be = be.with_gelu_epilogue(false).with_bgrad_epilogue(false);
    let (off, fused) = mlp(&be, WeightLayout::InOut);
    assert!(!fused, "the fused MLP ops ran with the epilogues off");
    let _ = bias_backward(&be, WeightLayout::InOut, C, 96);
    assert_eq!(be.epilogue_stats(), EpilogueStats::default());
    // and the unfused GPU path agrees with the CPU as well (the reference the fused one meets)
    let (want, _) = mlp(&CpuBackend::new(), WeightLayout::InOut);
    check("unfused dpre", &off.dpre, &want.dpre, BF16_OUT);
    check("unfused fc db", &off.fc_db, &want.fc_db, BF16_OUT);
}
