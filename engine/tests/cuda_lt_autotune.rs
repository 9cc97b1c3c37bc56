//! cuBLASLt autotuning (engine/src/cuda/lt_autotune.rs) against the CPU reference: a shape's
//! first call times several algorithms on the call's own operands before the real run, so the
//! timed runs must leave no trace, above all in the outputs that accumulate (dW, dinp, db with
//! beta = 1, which the tuner redirects to a scratch D). Each shape runs twice (tuning, then the
//! kept algorithm) from nonzero gradients, with and without the bias-gradient epilogue (without
//! it the plain dW GEMM comes through cuBLASLt's `Plain` path), and through the GELU epilogues.
//! Skips (prints why) without a GPU.
#![cfg(feature = "cuda")]

mod bf16_reference;
mod mlp_gemms;
mod op_buffers;

use mlp_gemms::{bias_backward, check, mlp, C, F32_OUT};
use smelt_engine::backend::WeightLayout;
use smelt_engine::cuda::{AutotuneStats, CudaBackend, CudaOptions, MatmulPrecision};
use smelt_engine::CpuBackend;

/// A bf16 backend, or None (after a skip line) without a GPU.
fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new_with(0, CudaOptions { matmul: MatmulPrecision::Bf16 }) {
        Ok(be) => Some(be),
        Err(e) => {
            println!("skipping: {e}");
            None
        }
    }
}

#[test]
fn autotuned_gemms_match_the_cpu() {
    let Some(first) = gpu() else { return };
    drop(first);
    let cpu = CpuBackend::new();
    for bgrad in [false, true] {
        let g = gpu().expect("the GPU seen above").with_lt_autotune(true).with_gelu_epilogue(true).with_bgrad_epilogue(bgrad);
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            for (ic, oc) in [(C, 96), (256, 768)] {
                for pass in ["tuning call", "tuned call"] {
                    let got = bias_backward(&g, layout, ic, oc);
                    let want = bias_backward(&cpu, layout, ic, oc);
                    for ((name, got), (_, want)) in got.iter().zip(&want) {
                        check(&format!("bgrad={bgrad} {layout:?} {ic}->{oc} {pass} {name}"), got, want, F32_OUT);
                    }
                }
            }
            let (got, fused) = mlp(&g, layout);
            assert!(fused, "{layout:?}: cuBLASLt did not take the GELU epilogues with autotuning on (refusals: {:?})", g.epilogue_refusals());
            let (want, _) = mlp(&cpu, layout);
            got.check_against(&want, &format!("bgrad={bgrad} {layout:?} mlp"));
        }
        let stats = g.lt_autotune_stats();
        println!("bgrad={bgrad}: {stats:?}");
        // every shape above has several cuBLASLt algorithms on a Hopper card
        assert!(stats.shapes >= 4, "bgrad={bgrad}: only {} shapes were tuned ({stats:?})", stats.shapes);
    }
}

#[test]
fn autotuning_stays_off_unless_asked() {
    let Some(g) = gpu() else { return };
    let g = g.with_lt_autotune(false);
    let got = bias_backward(&g, WeightLayout::InOut, C, 96);
    let want = bias_backward(&CpuBackend::new(), WeightLayout::InOut, C, 96);
    for ((name, got), (_, want)) in got.iter().zip(&want) {
        check(&format!("untuned {name}"), got, want, F32_OUT);
    }
    assert_eq!(g.lt_autotune_stats(), AutotuneStats::default());
}
