//! cuBLASLt GEMMs with epilogues: `D = op(A) op(B) + bias` in one pass over D, and the
//! training epilogues that fuse a GELU or a bias gradient into a GEMM.
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
//! The training epilogues (`LtEpilogue`), as NVIDIA's Transformer Engine uses them:
//! - `GeluAuxBias`: aux = A B + bias (GELU's input, kept for the backward pass), D = GELU(aux)
//!   with the tanh approximation (GPT-2's), both bf16: the MLP's up-projection and its GELU in
//!   one pass, no separate GELU kernel.
//! - `DGeluBgrad`: D = (A B) * GELU'(aux), and the sums of D over its n columns (our rows) into
//!   the bias pointer, in D's type: the MLP's down-projection backward, the GELU backward and
//!   the up-projection's bias gradient in one pass.
//! - `BgradA` / `BgradB`: D = A B + beta C and the sums of A (op(A) = N) or B (op(B) = T) over
//!   k into the bias pointer: a weight gradient GEMM that also sums dout for the bias gradient,
//!   instead of a column-sum pass over dout.
//!
//! The bias-gradient epilogues write (not add) their sums, so callers direct them into a
//! scratch and add that onto the gradient (accumulation over micro-batches).
//!
//! Plans (descriptors, layouts and the heuristic's algorithm) are built once per shape and
//! kept; only the pointers change between calls. `SMELT_CUBLASLT=0` turns the path off
//! (read once per process), for comparison on a card.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Mutex;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::lt_autotune;

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
    pub epilogue: LtEpilogue,
}

/// What a GEMM does besides the product (see the module's comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LtEpilogue {
    /// D = A B (+ C), no bias: the plain GEMMs (matmul.rs's backward), which take this path
    /// only while autotuning (lt_autotune.rs); else cublasGemmEx runs them.
    Plain,
    /// D = A B (+ C) + bias (m values of D's type).
    Bias,
    /// aux = A B + bias, D = GELU_tanh(aux); aux of D's type and leading dimension.
    GeluAuxBias,
    /// D = (A B) * GELU_tanh'(aux); the bias pointer gets each of D's m rows summed over n.
    DGeluBgrad,
    /// D = A B + beta C; the bias pointer gets op(A) = A (m, k) summed over k (m values).
    BgradA,
    /// D = A B + beta C; the bias pointer gets op(B) = B^T (k, n) summed over k (n values).
    BgradB,
}

impl LtEpilogue {
    fn raw(self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t as E;
        match self {
            LtEpilogue::Plain => E::CUBLASLT_EPILOGUE_DEFAULT,
            LtEpilogue::Bias => E::CUBLASLT_EPILOGUE_BIAS,
            LtEpilogue::GeluAuxBias => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            LtEpilogue::DGeluBgrad => E::CUBLASLT_EPILOGUE_DGELU_BGRAD,
            LtEpilogue::BgradA => E::CUBLASLT_EPILOGUE_BGRADA,
            LtEpilogue::BgradB => E::CUBLASLT_EPILOGUE_BGRADB,
        }
    }
    /// Whether the epilogue reads or writes an aux matrix (GELU's input).
    fn has_aux(self) -> bool {
        matches!(self, LtEpilogue::GeluAuxBias | LtEpilogue::DGeluBgrad)
    }
    /// Whether the epilogue reads or writes the bias pointer.
    fn has_bias(self) -> bool {
        self != LtEpilogue::Plain
    }
}

/// How many calls took each training epilogue since the backend was made (the unfused ops
/// ran for the rest): lets tests and benches see that a fused path really ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpilogueStats {
    /// Up-projection + GELU forward (GELU_AUX_BIAS).
    pub gelu_forward: u64,
    /// Down-projection + GELU backward + the up-projection's bias gradient (DGELU_BGRAD).
    pub dgelu_backward: u64,
    /// Weight gradients with their bias gradient (BGRADA / BGRADB).
    pub bgrad: u64,
}

/// The counters behind [`EpilogueStats`].
#[derive(Debug, Default)]
pub(crate) struct EpilogueCounts {
    pub gelu_forward: std::sync::atomic::AtomicU64,
    pub dgelu_backward: std::sync::atomic::AtomicU64,
    pub bgrad: std::sync::atomic::AtomicU64,
    /// The distinct refusals so far, "epilogue: cuBLASLt's error" (a few at most: a refused
    /// plan is cached, so each shape is refused once).
    refusals: Mutex<Vec<String>>,
}

impl EpilogueCounts {
    pub(crate) fn refused(&self, which: &str, e: &str) {
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let line = format!("{which}: {e}");
        if r.len() < 16 && !r.contains(&line) {
            r.push(line);
        }
    }
    pub(crate) fn refusals(&self) -> Vec<String> {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    pub(crate) fn stats(&self) -> EpilogueStats {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        EpilogueStats { gelu_forward: get(&self.gelu_forward), dgelu_backward: get(&self.dgelu_backward), bgrad: get(&self.bgrad) }
    }
}

/// The device pointers of one epilogue GEMM call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LtArgs {
    pub a: u64,
    pub b: u64,
    pub d: u64,
    /// C (laid out as D) with beta = 1; None: beta = 0.
    pub c: Option<u64>,
    /// The bias (`Bias`, `GeluAuxBias`) or the bias gradient's output (the `*Bgrad*` ones).
    pub bias: u64,
    /// GELU's input (`GeluAuxBias` writes it, `DGeluBgrad` reads it); 0 otherwise.
    pub aux: u64,
}

/// The alignment in bytes cuBLASLt's heuristic may assume of each operand: the largest power of
/// two dividing its address, up to 256 (cuBLASLt's own default assumption, which GPT-2's
/// buffers meet, so the plans measured on cards stay what they were). Part of a plan's key, so
/// that an algorithm picked for aligned operands (the heuristic's, or autotuning's timed on
/// the first call's) never runs on less aligned ones, which cuBLASLt would refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Alignment {
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    aux: u32,
}

impl Alignment {
    fn of(args: &LtArgs) -> Alignment {
        let of = |ptr: u64| if ptr == 0 { 256 } else { 1u32 << ptr.trailing_zeros().min(8) };
        Alignment { a: of(args.a), b: of(args.b), c: of(args.c.unwrap_or(args.d)), d: of(args.d), aux: of(args.aux) }
    }
}

pub(super) struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    /// The algorithm every call runs: the heuristic's first, or the autotuner's pick.
    pub(super) algo: sys::cublasLtMatmulAlgo_t,
    /// What autotuning found for this shape (None: not tuned).
    pub(super) tuned: Option<lt_autotune::Tuned>,
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
    plans: Mutex<HashMap<(LtShape, Alignment), Result<Plan, String>>>,
    /// Whether a new shape times the heuristic's candidates and keeps the fastest
    /// (lt_autotune.rs); plain GEMMs then come through here too (matmul.rs).
    autotune: bool,
    /// How many of the heuristic's algorithms autotuning times per shape.
    candidates: usize,
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

impl Lt {
    /// A handle and workspace on `stream`'s device, autotuning new shapes (over `candidates`
    /// algorithms each) or not, or a description of why not.
    pub(crate) fn new(stream: &std::sync::Arc<CudaStream>, autotune: bool, candidates: usize) -> Result<Lt, String> {
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
        Ok(Lt { handle, workspace, plans: Mutex::new(HashMap::new()), autotune, candidates })
    }

    /// Turns autotuning of shapes not seen yet on or off (see lt_autotune.rs).
    pub(crate) fn set_autotune(&mut self, on: bool) {
        self.autotune = on;
    }
    pub(crate) fn autotune(&self) -> bool {
        self.autotune
    }
    /// What autotuning did so far, over every plan.
    pub(crate) fn autotune_stats(&self) -> lt_autotune::AutotuneStats {
        let plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        lt_autotune::AutotuneStats::over(plans.values().filter_map(|p| p.as_ref().ok()?.tuned.as_ref()))
    }

    /// One GEMM with the epilogue `s.epilogue` (see `LtEpilogue`): A and B bf16, D f32 or bf16
    /// (`s.d_bf16`; the bias, aux and bias-gradient vectors of D's type), f32 accumulation.
    /// Err describes a cuBLASLt failure, in which case nothing was launched; a shape whose plan
    /// failed fails again at once (no second heuristic query).
    ///
    /// # Safety
    /// The pointers in `args` must be device memory holding the extents `s` describes (A: lda x
    /// (k or m), B: ldb x (n or k), D, C and aux: ldd x n, bias: m values, or n for `BgradB`).
    pub(crate) unsafe fn matmul(&self, stream: &std::sync::Arc<CudaStream>, s: LtShape, args: LtArgs) -> Result<(), String> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let align = Alignment::of(&args);
        let plan = match plans.entry((s, align)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                // one heuristic query: its first algorithm, or (autotuning) the candidates
                let n = if self.autotune { self.candidates } else { 1 };
                let plan = self.plan(s, align, args.aux, n).map(|(mut plan, candidates)| {
                    if self.autotune {
                        // SAFETY: as this function's; the timed runs write only what the call
                        // itself writes, or a scratch in place of D (lt_autotune.rs).
                        unsafe { lt_autotune::tune(self, stream, s, &mut plan, &candidates, args) };
                    }
                    plan
                });
                v.insert(plan)
            }
        };
        let plan = plan.as_mut().map_err(|e| e.clone())?;
        if let Some(t) = plan.tuned.as_mut() {
            t.calls += 1;
        }
        let algo = plan.algo;
        self.launch(stream, s, plan, &algo, args)
    }

    /// One cuBLASLt matmul of `plan` with `algo`.
    ///
    /// # Safety
    /// As [`Lt::matmul`].
    pub(super) unsafe fn launch(&self, stream: &CudaStream, s: LtShape, plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t, args: LtArgs) -> Result<(), String> {
        let set_ptr = |attr, ptr: &u64, what: &str| {
            lt::set_matmul_desc_attribute(plan.desc, attr, ptr as *const u64 as *const c_void, size_of::<u64>())
                .map_err(|e| format!("cuBLASLt {what} pointer: {e:?}"))
        };
        if s.epilogue.has_bias() {
            set_ptr(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &args.bias, "bias")?;
        }
        if s.epilogue.has_aux() {
            set_ptr(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &args.aux, "aux")?;
        }
        // With c: D = A B + C (+ bias), C laid out as D, beta = 1 (a residual added in the
        // epilogue, or a weight gradient accumulated).
        let (alpha, beta) = (1.0f32, if args.c.is_some() { 1.0f32 } else { 0.0 });
        let c = args.c.unwrap_or(args.d);
        let ws = self.workspace.device_ptr(stream).0;
        lt::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            args.a as *const c_void,
            plan.a,
            args.b as *const c_void,
            plan.b,
            c as *const c_void,
            plan.d,
            args.d as *mut c_void,
            plan.d,
            algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(|e| format!("cublasLtMatmul {s:?}: {e:?}"))
    }

    /// Descriptors and the heuristic's first algorithm for one shape, with its first `n`
    /// algorithms (the chosen one first).
    /// `aux`: the first call's aux pointer (GELU epilogues), set before the heuristic is asked,
    /// which refuses an aux epilogue whose pointer is still null (later calls set their own).
    fn plan(&self, s: LtShape, align: Alignment, aux: u64, n: usize) -> Result<(Plan, Vec<sys::cublasLtMatmulAlgo_t>), String> {
        let mut plan = self.descriptors(s)?;
        if s.epilogue.has_aux() {
            // SAFETY: a u64 device address, the attribute's documented type.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                    &aux as *const u64 as *const c_void,
                    size_of::<u64>(),
                )
            }
            .map_err(|e| format!("cuBLASLt aux pointer for {s:?}: {e:?}"))?;
        }
        let algos = self.heuristics(&plan, align, n).map_err(|e| format!("cuBLASLt algorithm heuristic for {s:?} ({align:?}): {e}"))?;
        plan.algo = algos[0];
        Ok((plan, algos))
    }

    /// The descriptors of one shape, with no algorithm yet.
    fn descriptors(&self, s: LtShape) -> Result<Plan, String> {
        let err = |what: &'static str| move |e: lt::CublasError| format!("cuBLASLt {what} for {s:?}: {e:?}");
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let f32t = sys::cudaDataType_t::CUDA_R_32F;
        let (a_rows, a_cols) = if s.transa { (s.k, s.m) } else { (s.m, s.k) };
        let (b_rows, b_cols) = if s.transb { (s.n, s.k) } else { (s.k, s.n) };
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t).map_err(err("matmul desc"))?;
        // From here on the plan owns what exists, so an early return frees it.
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            tuned: None,
        };
        // cublasOperation_t as the attribute stores it: 0 = N, 1 = T.
        let op = |t: bool| t as i32;
        let epilogue = s.epilogue.raw();
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
            if s.epilogue.has_aux() {
                // aux is laid out as D (GELU's input of the same (m, n) block)
                let aux_ld = s.ldd as i64;
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                    &aux_ld as *const i64 as *const c_void,
                    size_of::<i64>(),
                )
                .map_err(err("aux leading dimension"))?;
            }
        }
        plan.a = lt::create_matrix_layout(bf16, a_rows as u64, a_cols as u64, s.lda as i64).map_err(err("layout A"))?;
        plan.b = lt::create_matrix_layout(bf16, b_rows as u64, b_cols as u64, s.ldb as i64).map_err(err("layout B"))?;
        let d_type = if s.d_bf16 { bf16 } else { f32t };
        plan.d = lt::create_matrix_layout(d_type, s.m as u64, s.n as u64, s.ldd as i64).map_err(err("layout D"))?;
        Ok(plan)
    }

    /// Up to `n` algorithms for `plan`, the heuristic's best first (at least one, or Err).
    fn heuristics(&self, plan: &Plan, align: Alignment, n: usize) -> Result<Vec<sys::cublasLtMatmulAlgo_t>, String> {
        let pref = lt::create_matmul_pref().map_err(|e| format!("preference: {e:?}"))?;
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(n);
        let mut count = 0i32;
        // SAFETY: pref was created above and is destroyed below whatever happens between;
        // cuBLASLt writes at most `n` results into the vector's capacity and says how many.
        let r = unsafe {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let aligned = [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align.a),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align.b),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align.c),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align.d),
            ]
            .into_iter()
            .try_for_each(|(attr, bytes)| {
                lt::set_matmul_pref_attribute(pref, attr, &bytes as *const u32 as *const c_void, size_of::<u32>())
            });
            let r = aligned
                .and_then(|()| {
                    lt::set_matmul_pref_attribute(
                        pref,
                        P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        &WORKSPACE_BYTES as *const usize as *const c_void,
                        size_of::<usize>(),
                    )
                })
                .map_err(|e| format!("{e:?}"))
                .and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.d,
                    plan.d,
                    pref,
                    n as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()
                .map_err(|e| format!("{e:?}"))
            });
            let _ = lt::destroy_matmul_pref(pref);
            if r.is_ok() {
                results.set_len((count.max(0) as usize).min(n));
            }
            r
        };
        r?;
        let algos: Vec<_> = results.iter().filter(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS).map(|h| h.algo).collect();
        if algos.is_empty() {
            return Err("no algorithm (CUBLAS_STATUS_NOT_SUPPORTED)".into());
        }
        Ok(algos)
    }
}

#[cfg(test)]
mod tests {
    use super::{Alignment, LtArgs};

    #[test]
    fn a_plans_alignment_is_each_operands_largest_power_of_two_up_to_256() {
        let args = LtArgs { a: 0x7f00_0000_0100, b: 0x7f00_0000_1010, d: 0x7f00_0000_0002, c: None, bias: 0x8, aux: 0 };
        let al = Alignment::of(&args);
        assert_eq!((al.a, al.b, al.c, al.d, al.aux), (256, 16, 2, 2, 256), "C defaults to D; no aux assumes nothing");
        // the same shape with an accumulated C of its own, and an aux 32-byte aligned
        let al = Alignment::of(&LtArgs { c: Some(0x7f00_0000_0040), aux: 0x7f00_0000_0020, ..args });
        assert_eq!((al.c, al.aux), (64, 32));
        // a plan made for aligned operands is not the plan for less aligned ones
        assert_ne!(Alignment::of(&LtArgs { b: 0x7f00_0000_1000, ..args }), Alignment::of(&args));
    }
}
