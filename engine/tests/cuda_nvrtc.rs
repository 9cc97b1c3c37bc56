//! Every kernel module compiles for sm_90 through NVRTC, with no GPU needed.
//!
//! CI installs the pip wheels `nvidia-cuda-nvrtc==13.0.*` and `nvidia-cuda-runtime==13.0.*` and
//! points LD_LIBRARY_PATH at their `nvidia/cu13/lib` (and SMELT_CUDA_INCLUDE at
//! `nvidia/cu13/include`). Without libnvrtc the test prints a skip line, unless
//! SMELT_REQUIRE_NVRTC=1, where it fails.
#![cfg(feature = "cuda")]

use smelt_engine::cuda::kernels::{self, MODULES};

fn nvrtc_or_skip() -> bool {
    if kernels::nvrtc_available() {
        return true;
    }
    let required = std::env::var("SMELT_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(!required, "SMELT_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (set LD_LIBRARY_PATH)");
    println!("skipping: libnvrtc cannot be loaded (set LD_LIBRARY_PATH to a directory holding libnvrtc.so.13)");
    false
}

#[test]
fn every_module_compiles_for_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    let compiled = kernels::compile_all("sm_90", &smelt_engine::cuda::CudaTuning::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(compiled.len(), MODULES.len());
    for m in &compiled {
        let ptx = m.ptx.to_src();
        assert!(ptx.contains(".target sm_90"), "module {} was not compiled for sm_90", m.name);
        for k in &m.kernels {
            assert!(ptx.contains(&format!(".entry {k}(")), "module {}: no PTX entry for kernel {k}", m.name);
        }
    }
    // Every module but a placeholder defines kernels.
    let total: usize = compiled.iter().map(|m| m.kernels.len()).sum();
    assert!(total >= 15, "only {total} kernels found");
}

#[test]
fn a_broken_module_reports_its_name_and_the_compiler_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let err = kernels::compile_source("broken", "extern \"C\" __global__ void k() { undefined_thing(); }", "sm_90")
        .err()
        .expect("a module calling an undefined function must not compile");
    let msg = err.to_string();
    assert!(msg.contains("broken") && msg.contains("undefined_thing"), "unhelpful error: {msg}");
}

#[test]
fn the_attention_kernels_compile_with_every_compiled_in_switch_moved() {
    // the variants a card run selects through SMELT_ATTN_MIN_BLOCKS, SMELT_ATTN_DQ_BULK and
    // SMELT_ATTN_HEAD_GROUP must build too, not only the defaults
    if !nvrtc_or_skip() {
        return;
    }
    let vars = [("SMELT_ATTN_MIN_BLOCKS", "2,2,2"), ("SMELT_ATTN_DQ_BULK", "0"), ("SMELT_ATTN_HEAD_GROUP", "0")];
    let tuning = smelt_engine::cuda::CudaTuning::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).unwrap();
    let defines = tuning.defines();
    assert_ne!(defines, smelt_engine::cuda::CudaTuning::default().defines());
    let attention = kernels::compile_one_with("attention", kernels::ATTENTION_SOURCE, "sm_90", &defines).unwrap_or_else(|e| panic!("{e}"));
    let ptx = attention.ptx.to_src();
    // SMELT_ATTN_DQ_BULK=0 leaves no bulk reduction in the fused backward
    assert!(!ptx.contains("cp.reduce.async.bulk"), "bulk reductions compiled in with SMELT_ATTN_DQ_BULK=0");
    let defaults = kernels::compile_one_with("attention", kernels::ATTENTION_SOURCE, "sm_90", &smelt_engine::cuda::CudaTuning::default().defines()).unwrap();
    assert!(defaults.ptx.to_src().contains("cp.reduce.async.bulk"), "the default fused backward reduces dq in bulk on sm_90");
}

#[test]
fn the_gelu_kernels_compile_both_ways_and_the_default_uses_the_special_function_unit() {
    // SMELT_FAST_GELU=1 (the default): sigmoid by one ex2 and one rcp per value; 0: tanhf (its
    // range reduction and branches: a longer kernel). Every bf16 write of sm_80+ rounds by
    // cvt.rn.bf16 either way.
    if !nvrtc_or_skip() {
        return;
    }
    let src = kernels::MODULES.iter().find(|(n, _)| *n == "elementwise").unwrap().1;
    let with = |v: &str| {
        let t = smelt_engine::cuda::CudaTuning::from_lookup(|k| (k == "SMELT_FAST_GELU").then(|| v.to_string())).unwrap();
        kernels::compile_one_with("elementwise", src, "sm_90", &t.defines()).unwrap_or_else(|e| panic!("{e}")).ptx.to_src()
    };
    let (fast, precise) = (with("1"), with("0"));
    // the PTX of one kernel: from its .entry to the next
    let body = |ptx: &str, kernel: &str| {
        let start = ptx.find(&format!(".entry {kernel}(")).unwrap_or_else(|| panic!("no {kernel}"));
        let rest = &ptx[start + 1..];
        rest[..rest.find(".entry").unwrap_or(rest.len())].lines().count()
    };
    for kernel in ["gelu_forward_bf16", "gelu_backward_set_bf16"] {
        let (f, p) = (body(&fast, kernel), body(&precise, kernel));
        assert!(f < p, "{kernel}: {f} PTX lines with SMELT_FAST_GELU=1, {p} with 0");
    }
    assert!(fast.contains("rcp.approx.ftz.f32") && fast.contains("ex2.approx.ftz.f32"), "the default GELU does not use ex2/rcp");
    assert!(fast.contains("cvt.rn.bf16x2.f32") && precise.contains("cvt.rn.bf16x2.f32"), "bf16 stores do not round by cvt on sm_90");
}

#[test]
fn the_wgmma_attention_kernels_compile_for_sm90a_and_trap_elsewhere() {
    // With SMELT_ATTN_WGMMA=1 on an sm_90 device the attention module is compiled for sm_90a,
    // whose PTX has the wgmma kernels' warpgroup MMAs (NVRTC runs ptxas on them here: a
    // malformed wgmma fails the compile); by default, and for any other architecture (an A100
    // here), those kernels compile to a trap and the host never picks them.
    if !nvrtc_or_skip() {
        return;
    }
    assert_eq!(kernels::module_arch("attention", "sm_90", true), "sm_90a");
    assert_eq!(kernels::module_arch("attention", "sm_90", false), "sm_90");
    assert_eq!(kernels::module_arch("elementwise", "sm_90", true), "sm_90");
    assert_eq!(kernels::module_arch("attention", "sm_80", true), "sm_80");
    let defines = smelt_engine::cuda::CudaTuning::default().defines();
    let body = |ptx: &str, kernel: &str| -> String {
        let start = ptx.find(&format!(".entry {kernel}(")).unwrap_or_else(|| panic!("no {kernel}"));
        let rest = &ptx[start + 1..];
        rest[..rest.find(".entry").unwrap_or(rest.len())].to_string()
    };
    let hopper = kernels::compile_one_with("attention", kernels::ATTENTION_SOURCE, &kernels::module_arch("attention", "sm_90", true), &defines)
        .unwrap_or_else(|e| panic!("{e}"))
        .ptx
        .to_src();
    assert!(hopper.contains(".target sm_90a"), "the attention module was not compiled for sm_90a");
    // products per tile pair: forward q k^T and P v (4 + 4 of K 16), dq pass 4 + 4 + 4, dkv 8 + 8
    for (kernel, n) in [("attention_forward_wgmma_d64", 8), ("attention_backward_dq_wgmma_d64", 12), ("attention_backward_dkv_wgmma_d64", 16)] {
        let b = body(&hopper, kernel);
        assert_eq!(b.matches("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16").count(), n, "{kernel}");
        assert!(b.contains("wgmma.wait_group.sync.aligned 0") && b.contains("fence.proxy.async.shared::cta"), "{kernel}");
    }
    assert!(body(&hopper, "attention_forward_wgmma_d128").contains("m64n128k16"));
    assert!(body(&hopper, "attention_forward_wgmma_d32").contains("m64n32k16"));
    assert!(!body(&hopper, "attention_forward_bf16_d64").contains("wgmma.mma_async"), "the mma.sync forward changed");
    for arch in ["sm_80", "sm_90"] {
        let plain = kernels::compile_one_with("attention", kernels::ATTENTION_SOURCE, arch, &defines).unwrap_or_else(|e| panic!("{e}")).ptx.to_src();
        let b = body(&plain, "attention_forward_wgmma_d64");
        assert!(!b.contains("wgmma.mma_async") && b.contains("trap;"), "{arch}: the wgmma forward does not trap");
    }
}
