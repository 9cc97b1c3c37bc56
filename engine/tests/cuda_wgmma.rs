//! One Hopper warpgroup MMA of each kind the wgmma attention kernels issue (attention_wgmma.cuh),
//! on an sm_90 card: C (64 x 64) = A (64 x 16, registers from a core-matrix tile by ldmatrix)
//! times B (16 x 64) read by descriptor from a core-matrix tile, K-major (as the key tile in
//! q k^T) and MN-major (as the value tile in P v). Small integers, so every product is exact
//! and the comparison is bit for bit. When the attention tests fail under the wgmma kernels,
//! this says which piece (A fragments, K-major or MN-major descriptors) the card reads
//! differently from the host emulator. Skips (printing why) without an sm_90 GPU.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use smelt_engine::cuda::kernels;

const PROBE: &str = r#"
// out (64, 64) f32 = a (64, 16) b, b given as bk (64 n, 16 k) row-major (B^T) for mn = 0, or as
// bm (16 k, 64 n) row-major for mn = 1. One block of one warpgroup.
extern "C" __global__ void __launch_bounds__(128) wgmma_probe(float* out, const bf16_t* a, const bf16_t* bk,
                                                              const bf16_t* bm, int mn) {
    extern __shared__ float smem[];
    bf16_t* As = (bf16_t*)smem;  // (64, 16) core-matrix tile
    bf16_t* Bk = As + 64 * 16;   // (64 n, 16 k) core-matrix tile: B K-major
    bf16_t* Bm = Bk + 64 * 16;   // (64, 64) core-matrix tile, rows 0..16 = k: B MN-major
    for (int i = threadIdx.x; i < 64 * 16; i += 128) {
        As[cm_at<16>(i / 16, i % 16)] = a[i];
        Bk[cm_at<16>(i / 16, i % 16)] = bk[i];
    }
    for (int i = threadIdx.x; i < 64 * 64; i += 128) Bm[cm_at<64>(i / 64, i % 64)] = i / 64 < 16 ? bm[i] : 0;
    fence_proxy_async();
    __syncthreads();
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    u32 af[1][4];
    load_a_cm<16>(af[0], As, warp * 16, 0);
    float d[8][4];
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) d[j][e] = 0.0f;
    if (mn) {
        wgmma_product<64, 1, 1, 64>(d, af, Bm);
    } else {
        wgmma_product<64, 0, 1, 16>(d, af, Bk);
    }
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) out[(warp * 16 + g + 8 * (e >> 1)) * 64 + 8 * j + 2 * t + (e & 1)] = d[j][e];
}
"#;

/// The attention module's primitives (everything before the kernels that use them) and the
/// probe, compiled for sm_90a (NVRTC runs ptxas on it).
fn probe_module() -> kernels::CompiledModule {
    let src = kernels::ATTENTION_SOURCE;
    let cut = src.find("// The tensor-core attention forward").expect("the forward's header comment");
    kernels::compile_source("wgmma_probe", &format!("{}{PROBE}", &src[..cut]), "sm_90a").unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_probe_compiles_for_sm90a() {
    // CI has NVRTC but no GPU: the probe a card runs below must at least build
    if !kernels::nvrtc_available() {
        println!("skipping: libnvrtc cannot be loaded");
        return;
    }
    let m = probe_module();
    assert!(m.kernels.contains(&"wgmma_probe".to_string()));
    assert_eq!(m.ptx.to_src().matches("wgmma.mma_async.sync.aligned.m64n64k16").count(), 2);
}

fn bf16(x: f32) -> u16 {
    (x.to_bits() >> 16) as u16 // exact: the values are small integers
}

#[test]
fn one_wgmma_of_each_majorness_matches_the_host_product() {
    // SAFETY: only tries to dlopen libcuda's candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        println!("skipping: no libcuda (no NVIDIA driver here)");
        return;
    }
    let ctx = match CudaContext::device_count().ok().filter(|&n| n > 0).map(|_| CudaContext::new(0)) {
        Some(Ok(ctx)) => ctx,
        other => {
            println!("skipping: no usable GPU ({:?})", other.map(|r| r.err()));
            return;
        }
    };
    let (major, minor) = ctx.compute_capability().expect("compute capability");
    if (major, minor) != (9, 0) {
        println!("skipping: wgmma needs an sm_90 device, this one is sm_{major}{minor}");
        return;
    }
    let module = ctx.load_module(probe_module().ptx).expect("load the probe");
    let f = module.load_function("wgmma_probe").expect("wgmma_probe");
    let stream: Arc<_> = ctx.default_stream();

    let a: Vec<f32> = (0..64 * 16).map(|i| ((i * 7 + 3) % 9) as f32 - 4.0).collect(); // (64 m, 16 k)
    let b: Vec<f32> = (0..16 * 64).map(|i| ((i * 5 + 1) % 7) as f32 - 3.0).collect(); // (16 k, 64 n)
    let bt: Vec<f32> = (0..64 * 16).map(|i| b[(i % 16) * 64 + i / 16]).collect(); // (64 n, 16 k)
    let want: Vec<f32> = (0..64 * 64).map(|i| (0..16).map(|k| a[(i / 64) * 16 + k] * b[k * 64 + i % 64]).sum()).collect();
    let to_dev = |v: &[f32]| stream.clone_htod(&v.iter().map(|&x| bf16(x)).collect::<Vec<u16>>()).unwrap();
    let (da, dbk, dbm) = (to_dev(&a), to_dev(&bt), to_dev(&b));
    let mut failures = Vec::new();
    for (mn, what) in [(0i32, "K-major B (the key tile of q k^T)"), (1, "MN-major B (the value tile of P v)")] {
        let mut out = stream.alloc_zeros::<f32>(64 * 64).unwrap();
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 2 * (2 * 64 * 16 + 64 * 64) };
        let mut l = stream.launch_builder(&f);
        l.arg(&mut out).arg(&da).arg(&dbk).arg(&dbm).arg(&mn);
        // SAFETY: wgmma_probe(float*, const bf16*, const bf16*, const bf16*, int) reads 64x16,
        // 64x16 and 16x64 bf16 and writes 64x64 f32, the sizes allocated above.
        unsafe { l.launch(cfg) }.expect("launch");
        let got = stream.clone_dtoh(&out).unwrap();
        let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
        println!("{what}: {} of 4096 elements differ", bad.len());
        if let Some(&i) = bad.first() {
            failures.push(format!(
                "{what}: {} of 4096 differ; first at row {} col {}: got {} want {}; row 0 got {:?} want {:?}",
                bad.len(), i / 64, i % 64, got[i], want[i], &got[..16], &want[..16]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
