//! The GEMMs of a transformer's MLP and of a matmul backward with a bias, run on any backend
//! with bf16-rounded inputs (so that CPU and GPU see the same operands), and the comparison
//! the CUDA tests of cuBLASLt's paths make against the CPU (cuda_epilogues.rs,
//! cuda_lt_autotune.rs).
#![allow(dead_code)]

use super::bf16_reference::round_all;
use super::op_buffers::{activation, all, all_mut, host, randn, rel_err};
use smelt_engine::backend::{Backend, MatmulShape, WeightLayout};

/// A bf16 output compared as a norm: 8 bits of mantissa, plus GELU' at bf16-rounded inputs.
pub const BF16_OUT: f64 = 1.5e-2;
/// An f32 output from operands both backends hold exactly: summation order only.
pub const F32_OUT: f64 = 5e-4;

pub const N: usize = 200;
pub const C: usize = 64;
pub const F: usize = 256;

pub fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    println!("{what}: relative error {e:.2e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} above {tol:.0e}");
}

/// Weights `(IC, OC)` for `InOut`, `(OC, IC)` for `OutIn`: same values, as each layout stores them.
pub fn weight(seed: u64, ic: usize, oc: usize, layout: WeightLayout) -> Vec<f32> {
    let w = round_all(&randn(seed, ic * oc, 0.1));
    match layout {
        WeightLayout::InOut => w,
        WeightLayout::OutIn => (0..oc).flat_map(|o| (0..ic).map(move |i| (o, i))).map(|(o, i)| w[i * oc + o]).collect(),
    }
}

/// What one MLP pass produced: pre, out = gelu(pre), then from dy: dpre, the down-projection's
/// dW and db, and the up-projection's db (`fc_db`). Gradients start from nonzero values, so the
/// accumulating ones are checked to add, the overwritten one (dpre) to overwrite.
pub struct Mlp {
    pub pre: Vec<f32>,
    pub out: Vec<f32>,
    pub dpre: Vec<f32>,
    pub proj_dw: Vec<f32>,
    pub proj_db: Vec<f32>,
    pub fc_db: Vec<f32>,
}

impl Mlp {
    /// Every output against the CPU's (`want`), each error bounded as its precision allows;
    /// `label` starts each line.
    pub fn check_against(&self, want: &Mlp, label: &str) {
        let what = |name: &str| format!("{label} {name}");
        check(&what("pre"), &self.pre, &want.pre, BF16_OUT);
        check(&what("out"), &self.out, &want.out, BF16_OUT);
        check(&what("dpre"), &self.dpre, &want.dpre, BF16_OUT);
        // dW's operands are out (bf16 on both sides up to one rounding) and dy (exact)
        check(&what("proj dW"), &self.proj_dw, &want.proj_dw, BF16_OUT);
        check(&what("proj db"), &self.proj_db, &want.proj_db, F32_OUT);
        // the up-projection's bias gradient, bf16 where the DGELU_BGRAD epilogue writes it
        check(&what("fc db"), &self.fc_db, &want.fc_db, BF16_OUT);
    }
}

/// Runs the MLP's up-projection + GELU and the backward pass through the down-projection and
/// the GELU, fused where `be` fuses (`fused` says whether both fused calls returned true).
pub fn mlp<B: Backend>(be: &B, layout: WeightLayout) -> (Mlp, bool) {
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

/// One matmul backward with a bias over shape (N, ic) -> oc: dinp, dW and db from nonzero
/// starting values (both accumulate).
pub fn bias_backward<B: Backend>(be: &B, layout: WeightLayout, ic: usize, oc: usize) -> Vec<(&'static str, Vec<f32>)> {
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

