//! The CUDA backend keeps its scratch memory across synchronizations: the device's default
//! memory pool (where the ops' stream-ordered scratch buffers come from) gets a release
//! threshold of "never", so a step's scratch is not handed back to the driver at the step's sync
//! and mapped again in the next step. Skips (printing why) without a GPU.
#![cfg(feature = "cuda")]

use cudarc::driver::sys;
use smelt_engine::backend::{MatmulShape, WeightLayout};
use smelt_engine::cuda::CudaBackend;
use smelt_engine::Backend;

#[test]
fn the_default_pool_keeps_freed_scratch_across_a_sync() {
    let be = match CudaBackend::new(0) {
        Ok(be) => be,
        Err(e) => {
            println!("skipping: no usable GPU ({e})");
            return;
        }
    };
    let mut dev: sys::CUdevice = 0;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: out-pointers to locals; the driver is loaded (the backend exists).
    unsafe {
        assert_eq!(sys::cuDeviceGet(&mut dev, 0), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(sys::cuDeviceGetDefaultMemPool(&mut pool, dev), sys::CUresult::CUDA_SUCCESS);
    }
    let attr = |a: sys::CUmemPool_attribute| -> u64 {
        let mut v = 0u64;
        // SAFETY: these attributes are cuuint64_t values.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, a, (&mut v as *mut u64).cast()) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{a:?}");
        v
    };
    assert_eq!(attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD), u64::MAX);
    // an op with a stream-ordered scratch (a bias gradient's column-sum partials: 2,048 rows
    // of 1,024 columns), then a sync: the freed scratch stays reserved in the pool
    let s = MatmulShape { rows: 2048, in_features: 8, out_features: 1024, layout: WeightLayout::InOut };
    let dout = be.upload(&vec![1.0; s.rows * s.out_features]);
    let inp = be.upload(&vec![0.0; s.rows * s.in_features]);
    let w = be.upload(&vec![0.0; s.in_features * s.out_features]);
    let (mut dw, mut db) = (be.zeros(s.in_features * s.out_features), be.zeros(s.out_features));
    let (nw, nb) = (be.len(&dw), be.len(&db));
    be.matmul_backward(None, be.view_mut(&mut dw, 0..nw), Some(be.view_mut(&mut db, 0..nb)), be.view(&dout, 0..s.rows * s.out_features), be.view(&inp, 0..s.rows * s.in_features), be.view(&w, 0..nw), s);
    be.synchronize().unwrap();
    assert!(attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT) > 0, "the pool gave its memory back at the sync");
    assert_eq!(be.download(be.view(&db, 0..nb)), vec![s.rows as f32; nb]);
}
