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
mod mlp_gemms;
mod op_buffers;

use mlp_gemms::{bias_backward, check, mlp, BF16_OUT, C, F32_OUT};
use smelt_engine::backend::WeightLayout;
use smelt_engine::cuda::{CudaBackend, CudaOptions, EpilogueStats, MatmulPrecision};
use smelt_engine::CpuBackend;

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

#[test]
fn gelu_epilogues_match_the_cpu_ops() {
    let Some(g) = gpu() else { return };
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        let before = g.epilogue_stats();
        let (got, fused) = mlp(&g, layout);
        let after = g.epilogue_stats();
        assert!(
            fused && after.gelu_forward == before.gelu_forward + 1 && after.dgelu_backward == before.dgelu_backward + 1,
            "{layout:?}: cuBLASLt did not take the GELU epilogues ({before:?} -> {after:?}; refusals: {:?})",
            g.epilogue_refusals()
        );
        let (want, cpu_fused) = mlp(&CpuBackend::new(), layout);
        assert!(!cpu_fused, "the CPU backend has no fused MLP ops");
        got.check_against(&want, &format!("{layout:?}"));
    }
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
            "{layout:?} OC={oc}: bias-gradient epilogue taken {took} times, expected {} ({before:?} -> {after:?}; refusals: {:?})",
            fused as u64,
            g.epilogue_refusals()
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
