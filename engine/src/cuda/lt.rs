//! cuBLASLt GEMMs with a bias epilogue: `D = op(A) op(B) + bias` in one pass over D.
//!
//! `cublasGemmEx` cannot add a bias, so the plain path broadcasts the bias into the output
//! first and runs the GEMM with beta = 1: two extra passes over an (N, OC) f32 output (for
//! GPT-2 124M at B16 T1024, ~0.9 GB per layer). The epilogue adds the same f32 bias to the same
//! f32 product (one IEEE addition, commutative), so results match the plain path bit for bit
//! up to the GEMM's own kernel choice.
//!
//! Two variants on the same plans: a bf16 D (an activation buffer) with a bf16 bias (the
//! heuristic finds no kernel for a bf16 D with an f32 bias on an H100), and `+ C` with beta = 1,
//! C laid out as D: a projection added onto the residual stream in the same pass
//! (`matmul_forward_residual`).
//!
//! Plans (descriptors, layouts and the heuristic's algorithm) are built once per shape and
//! kept; only the bias pointer changes between calls. `SMELT_CUBLASLT=0` turns the path off
//! (read once per process), for comparison on a card.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Mutex;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// Workspace NVIDIA recommends for Hopper (32 MiB); enough for every other architecture.
const WORKSPACE_BYTES: usize = 32 << 20;

/// One GEMM's shape in cuBLAS's column-major terms (see matmul.rs): D (m, n) = op(A) op(B).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LtShape {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldd: usize,
    /// D in bf16 (an activation buffer, see view.rs) instead of f32; the bias then is bf16 too
    /// (cuBLASLt's heuristic finds no kernel for a bf16 D with an f32 bias on an H100).
    pub d_bf16: bool,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this plan and is destroyed once; errors while
        // tearing down are not actionable.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle, its workspace and the plans built so far.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<LtShape, Result<Plan, String>>>,
}

// SAFETY: the cuBLASLt handle may be used from any thread (one call at a time is guaranteed by
// the backend's single stream and the plans' mutex); plans are only touched under the mutex.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.lock().unwrap_or_else(|p| p.into_inner()).clear();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Whether `SMELT_CUBLASLT=0` asked for the plain cublasGemmEx path.
pub(crate) fn disabled_by_env() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("SMELT_CUBLASLT").as_deref() == Ok("0"))
}

impl Lt {
    /// A handle and workspace on `stream`'s device, or a description of why not.
    pub(crate) fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Lt, String> {
        let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        // SAFETY: the workspace is scratch cuBLASLt writes before reading.
        let workspace = match unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) } {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(format!("allocating the cuBLASLt workspace: {e:?}"));
            }
        };
        Ok(Lt { handle, workspace, plans: Mutex::new(HashMap::new()) })
    }

    /// D (m, n) = op(A) op(B) + bias (m), A and B bf16, D and bias f32 or both bf16
    /// (`s.d_bf16`), f32 accumulation; with `c`, `+ C` too (C of D's type and layout). Err
    /// describes a cuBLASLt failure; a shape whose plan failed fails again at once (no second
    /// heuristic query).
    ///
    /// # Safety
    /// `a`, `b`, `d` and `bias` must be device pointers holding the extents `s` describes
    /// (A: lda x (k or m), B: ldb x (n or k), D and C: ldd x n, bias: m values).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_bias(
        &self,
        stream: &CudaStream,
        s: LtShape,
        a: u64,
        b: u64,
        d: u64,
        bias: u64,
        c: Option<u64>,
    ) -> Result<(), String> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match plans.entry(s) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(self.plan(s)),
        };
        let plan = plan.as_ref().map_err(|e| e.clone())?;
        lt::set_matmul_desc_attribute(
            plan.desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            &bias as *const u64 as *const c_void,
            size_of::<u64>(),
        )
        .map_err(|e| format!("cuBLASLt bias pointer: {e:?}"))?;
        // With c: D = A B + C + bias (C laid out as D, beta = 1), a residual added in the epilogue.
        let (alpha, beta) = (1.0f32, if c.is_some() { 1.0f32 } else { 0.0 });
        let c = c.unwrap_or(d);
        let ws = self.workspace.device_ptr(stream).0;
        lt::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            a as *const c_void,
            plan.a,
            b as *const c_void,
            plan.b,
            c as *const c_void,
            plan.d,
            d as *mut c_void,
            plan.d,
            &plan.algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(|e| format!("cublasLtMatmul {s:?}: {e:?}"))
    }

    /// Descriptors and the heuristic's first algorithm for one shape.
    fn plan(&self, s: LtShape) -> Result<Plan, String> {
        let err = |what: &'static str| move |e: lt::CublasError| format!("cuBLASLt {what} for {s:?}: {e:?}");
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let f32t = sys::cudaDataType_t::CUDA_R_32F;
        let (a_rows, a_cols) = if s.transa { (s.k, s.m) } else { (s.m, s.k) };
        let (b_rows, b_cols) = if s.transb { (s.n, s.k) } else { (s.k, s.n) };
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t).map_err(err("matmul desc"))?;
        // From here on the plan owns what exists, so an early return frees it.
        let mut plan = Plan { desc, a: std::ptr::null_mut(), b: std::ptr::null_mut(), d: std::ptr::null_mut(), algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] } };
        // cublasOperation_t as the attribute stores it: 0 = N, 1 = T.
        let op = |t: bool| t as i32;
        let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
        // SAFETY: attribute values are plain host values of the sizes cuBLASLt documents.
        unsafe {
            for (attr, value) in [
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, op(s.transa)),
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, op(s.transb)),
            ] {
                lt::set_matmul_desc_attribute(plan.desc, attr, &value as *const _ as *const c_void, size_of::<i32>())
                    .map_err(err("transpose"))?;
            }
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as *const c_void,
                size_of::<sys::cublasLtEpilogue_t>(),
            )
            .map_err(err("epilogue"))?;
        }
        plan.a = lt::create_matrix_layout(bf16, a_rows as u64, a_cols as u64, s.lda as i64).map_err(err("layout A"))?;
        plan.b = lt::create_matrix_layout(bf16, b_rows as u64, b_cols as u64, s.ldb as i64).map_err(err("layout B"))?;
        let d_type = if s.d_bf16 { bf16 } else { f32t };
        plan.d = lt::create_matrix_layout(d_type, s.m as u64, s.n as u64, s.ldd as i64).map_err(err("layout D"))?;
        let pref = lt::create_matmul_pref().map_err(err("preference"))?;
        // SAFETY: pref was created above and is destroyed below whatever happens between.
        let heuristic = unsafe {
            let r = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &WORKSPACE_BYTES as *const usize as *const c_void,
                size_of::<usize>(),
            )
            .and_then(|()| lt::get_matmul_algo_heuristic(self.handle, plan.desc, plan.a, plan.b, plan.d, plan.d, pref));
            let _ = lt::destroy_matmul_pref(pref);
            r.map_err(err("algorithm heuristic"))?
        };
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}
