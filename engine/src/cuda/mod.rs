//! `CudaBackend`: the `Backend` trait on one NVIDIA GPU.
//!
//! CUDA is loaded at run time (cudarc `dynamic-loading`): the crate builds and runs without it,
//! and [`CudaBackend::new`] returns a clear error when libcuda, libnvrtc or libcublas cannot be
//! loaded or the device does not exist. Kernels live in `kernels/*.cu`, are compiled by NVRTC
//! once per backend for the device's own architecture, and run on one stream; ops return `()`
//! and record the first failure, which [`Backend::synchronize`] reports.
//!
//! Precision: parameters, gradients and optimizer state are f32 (the master weights). Matmuls
//! run through cuBLAS / cuBLASLt with a selectable math mode ([`MatmulPrecision`]); the default
//! `Bf16` multiplies bf16 operands on the tensor cores and accumulates in fp32. With `Bf16`, the
//! activations a model allocates through `Backend::activation_zeros` (GEMM inputs and outputs
//! such as LayerNorm outputs, the MLP's hidden layer, the logits) are stored as bf16 (see
//! view.rs for which ops take them); the residual stream and everything else stays f32.
//! bf16 matmuls read their weights from a bf16 copy of the whole parameter buffer made once per
//! write generation and updated by AdamW (shadow.rs), not converted per call.
//! The performance switches (these two, the fused paths, the kernels' compiled-in tuning) are
//! one struct, [`CudaTuning`] (tuning.rs): its defaults, overridden by `SMELT_*` variables.

mod adamw;
mod attention;
mod backend_impl;
mod colsum;
mod cross_entropy;
mod dropout;
mod elementwise;
mod embedding;
mod ids;
pub mod kernels;
mod layernorm;
mod learned_scores;
mod lt;
mod lt_autotune;
mod matmul;
mod memory;
mod peak;
mod rope;
mod shadow;
mod tuning;
pub mod nccl;
pub mod view;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError};

use crate::error::{ConfigError, EngineError};
pub use cross_entropy::FusedClassifierOccupancy;
pub use lt::EpilogueStats;
pub use lt_autotune::AutotuneStats;
pub use shadow::ShadowStats;
pub use tuning::CudaTuning;
pub use ids::CudaIds;
pub use view::{CudaBuf, CudaView, CudaViewMut, Dtype};

/// Math mode of the cuBLAS matmuls (storage is f32 in every mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// bf16 tensor-core products, fp32 accumulation: fastest, ~3 significant digits per operand.
    /// Matmul operands are converted to bf16 copies first (`kernels/convert.cu`); attention runs
    /// its bf16 `mma.sync` kernels (sm_80 and newer).
    #[default]
    Bf16,
    /// TF32 tensor-core products (10-bit mantissa), fp32 accumulation; f32 attention kernels.
    Tf32,
    /// Plain fp32 (no tensor cores): the reference for tests.
    F32,
}

impl FromStr for MatmulPrecision {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "bf16" => Ok(MatmulPrecision::Bf16),
            "tf32" => Ok(MatmulPrecision::Tf32),
            "f32" => Ok(MatmulPrecision::F32),
            other => Err(ConfigError::new(
                "matmul_precision",
                format!("`{other}` is not one of bf16, tf32, f32"),
            )),
        }
    }
}

/// Options of a [`CudaBackend`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaOptions {
    pub matmul: MatmulPrecision,
}

/// The `Backend` on one GPU: a context, one stream, a cuBLAS handle and the compiled kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<String, CudaFunction>,
    opts: CudaOptions,
    /// First failure of an op since the last `synchronize` (sticky until reported).
    error: Mutex<Option<String>>,
    /// Device word kernels `atomicOr` error bits into (bad ids, bad targets); read by `synchronize`.
    err_word: CudaSlice<u32>,
    /// bf16 copies of matmul operands (`MatmulPrecision::Bf16`), grown to the largest call.
    bf16_scratch: Mutex<Option<CudaSlice<u16>>>,
    /// f32 GEMM outputs with a padded leading dimension (see matmul.rs), grown as needed.
    f32_scratch: Mutex<Option<CudaSlice<f32>>>,
    /// cuBLASLt for GEMMs with a bias epilogue (lt.rs); `None` where it could not be set up or
    /// `SMELT_CUBLASLT=0`, and then matmul.rs uses cublasGemmEx alone.
    lt: Option<lt::Lt>,
    /// The performance switches (tuning.rs): the defaults with the environment applied, then
    /// whatever the `with_*` builders changed.
    tuning: CudaTuning,
    /// The fused classifier kernels' dynamic shared memory, which caps their blocks per SM
    /// (cross_entropy.rs), worked out on first use.
    ce_fused_smem: cross_entropy::FusedSmem,
    /// Calls that took each training epilogue.
    epilogue_counts: lt::EpilogueCounts,
    /// The shadows and the counts that decide which buffers get one.
    shadows: Mutex<shadow::ShadowCache<CudaSlice<u16>>>,
    ordinal: usize,
    device_name: String,
    arch: String,
    sm_count: u32,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ordinal)
            .field("device", &self.device_name)
            .field("arch", &self.arch)
            .field("opts", &self.opts)
            .field("tuning", &self.tuning)
            .finish()
    }
}

/// Error bits of the device error word; must match the .cu files' `ERR_*` defines.
const ERR_EMBEDDING_ID: u32 = 1;
const ERR_TARGET: u32 = 2;

fn device_err(what: impl std::fmt::Display) -> EngineError {
    EngineError::Device(what.to_string())
}

/// Why CUDA cannot be used here, or `None` when the libraries load. cudarc panics on first use
/// of a library it cannot find, so probe each one before touching it.
pub fn missing_library() -> Option<String> {
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    type Probe = (&'static str, &'static str, unsafe fn() -> bool);
    let probes: [Probe; 3] = [
        ("libcuda (the NVIDIA driver)", "libcuda.so, libcuda.so.1", cudarc::driver::sys::is_culib_present),
        ("libnvrtc", "libnvrtc.so, libnvrtc.so.13", cudarc::nvrtc::sys::is_culib_present),
        ("libcublas", "libcublas.so, libcublas.so.13", cudarc::cublas::sys::is_culib_present),
    ];
    for (lib, names, present) in probes {
        // SAFETY: each probe only tries to dlopen candidate library names.
        if !unsafe { present() } {
            return Some(format!(
                "{lib} could not be loaded (tried {names}, ...; the system library path and \
                 LD_LIBRARY_PATH=`{ld}`)"
            ));
        }
    }
    None
}

/// The ops' scratch buffers (column-sum partials, LayerNorm partials, attention statistics, ...)
/// are stream-ordered allocations from the device's default memory pool, which by default hands
/// its free memory back to the driver at every synchronization (a training step has one, for its
/// loss): the next step then has the driver map it again, on the host, between launches. The
/// pool keeps it instead, as PyTorch's caching allocator does; it only ever holds the largest
/// scratch a step needs at once. Best effort: a driver that refuses leaves the default.
fn keep_pool_memory(ctx: &CudaContext, ordinal: usize) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    let got = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if got != sys::CUresult::CUDA_SUCCESS {
        tracing::debug!(ordinal, result = ?got, "no default memory pool; scratch memory is released at each sync");
        return;
    }
    let mut threshold = u64::MAX;
    // SAFETY: RELEASE_THRESHOLD takes a pointer to a cuuint64_t, which `threshold` is.
    let set = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    };
    if set != sys::CUresult::CUDA_SUCCESS {
        tracing::debug!(ordinal, result = ?set, "memory pool release threshold not set; scratch memory is released at each sync");
    }
}

impl CudaBackend {
    /// The backend on GPU `ordinal` with default options (bf16 matmuls).
    pub fn new(ordinal: usize) -> Result<Self, EngineError> {
        Self::new_with(ordinal, CudaOptions::default())
    }

    /// The backend on GPU `ordinal` with `opts` and the switches of this process's environment
    /// (`CudaTuning::from_env`).
    pub fn new_with(ordinal: usize, opts: CudaOptions) -> Result<Self, EngineError> {
        // A switch set to something it cannot mean is refused before the device is touched.
        let tuning = CudaTuning::from_env()?;
        Self::new_with_tuning(ordinal, opts, tuning)
    }

    /// The backend with the switches `tuning`, whatever the environment says: for the switches
    /// that decide how the kernels are compiled (`CudaTuning::defines`, and `attn_wgmma`, which
    /// compiles the attention module for sm_90a), which no `with_*` can change afterwards.
    pub fn new_with_tuning(ordinal: usize, opts: CudaOptions, tuning: CudaTuning) -> Result<Self, EngineError> {
        if let Some(why) = missing_library() {
            return Err(device_err(format!("cuda:{ordinal}: {why}")));
        }
        let count = CudaContext::device_count()
            .map_err(|e| device_err(format!("cuda:{ordinal}: cannot count devices: {e:?}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(device_err(format!("cuda:{ordinal}: no such device ({count} present)")));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| device_err(format!("cuda:{ordinal}: cannot create a context: {e:?}")))?;
        // One stream does all the work, so cudarc's per-buffer event tracking (meant for several
        // streams) would only add overhead. SAFETY: nothing is allocated yet, and this backend
        // never uses a second stream on these buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| device_err(format!("cuda:{ordinal}: cannot create a stream: {e:?}")))?;
        keep_pool_memory(&ctx, ordinal);
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| device_err(format!("cuda:{ordinal}: compute capability: {e:?}")))?;
        let arch = format!("sm_{major}{minor}");
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".to_string());
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| device_err(format!("cuda:{ordinal}: multiprocessor count: {e:?}")))?
            as u32;
        let compiled = kernels::compile_all(&arch, &tuning).map_err(|e| device_err(format!("cuda:{ordinal}: {e}")))?;
        let mut funcs = HashMap::new();
        for m in compiled {
            let module = ctx.load_module(m.ptx).map_err(|e| {
                device_err(format!("cuda:{ordinal}: loading module `{}`: {e:?}", m.name))
            })?;
            for k in m.kernels {
                let f = module.load_function(&k).map_err(|e| {
                    device_err(format!("cuda:{ordinal}: kernel `{k}` of module `{}`: {e:?}", m.name))
                })?;
                funcs.insert(k, f);
            }
        }
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| device_err(format!("cuda:{ordinal}: cublas handle: {e:?}")))?;
        let lt = if !tuning.cublaslt {
            None
        } else {
            match lt::Lt::new(&stream, tuning.lt_autotune, tuning.lt_autotune_candidates as usize) {
                Ok(lt) => Some(lt),
                Err(e) => {
                    tracing::warn!(device = ordinal, error = %e, "cublaslt unavailable, bias epilogues off");
                    None
                }
            }
        };
        let err_word = stream
            .alloc_zeros::<u32>(1)
            .map_err(|e| device_err(format!("cuda:{ordinal}: allocating the error word: {e:?}")))?;
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            funcs,
            opts,
            error: Mutex::new(None),
            err_word,
            bf16_scratch: Mutex::new(None),
            f32_scratch: Mutex::new(None),
            lt,
            tuning,
            ce_fused_smem: cross_entropy::FusedSmem::default(),
            epilogue_counts: lt::EpilogueCounts::default(),
            shadows: Mutex::new(shadow::ShadowCache::default()),
            ordinal,
            device_name,
            arch,
            sm_count,
        })
    }

    pub fn options(&self) -> CudaOptions {
        self.opts
    }
    /// The switches this backend runs with (what the bench reports).
    pub fn tuning(&self) -> CudaTuning {
        self.tuning
    }
    /// With `on`, the classifier's training forward (`cross_entropy_forward_backward_in_place`)
    /// runs the fused kernel: a row's forward and in-place backward in one block, the backward's
    /// read served by L2, with the blocks per SM capped (`SMELT_CE_BLOCKS_PER_SM`, default 2) so
    /// that the rows in flight stay in L2. Same results, bitwise. The default is off unless
    /// `SMELT_FUSED_CLASSIFIER=1`.
    pub fn with_fused_classifier(mut self, on: bool) -> Self {
        self.tuning.fused_classifier = on;
        self
    }
    pub(crate) fn fused_classifier(&self) -> bool {
        self.tuning.fused_classifier
    }
    /// With `on`, the MLP's up-projection + GELU and its backward run as cuBLASLt GELU
    /// epilogues where cuBLASLt has them (bf16 matmuls; see lt.rs). The default is off unless
    /// `SMELT_GELU_EPILOGUE=1`.
    pub fn with_gelu_epilogue(mut self, on: bool) -> Self {
        self.tuning.gelu_epilogue = on;
        self
    }
    pub(crate) fn gelu_epilogue(&self) -> bool {
        self.tuning.gelu_epilogue
    }
    /// With `on`, weight-gradient GEMMs with a bias also write the bias gradient from their
    /// epilogue (cuBLASLt BGRADA/BGRADB, bf16 matmuls) instead of a column-sum pass. The
    /// default is off unless `SMELT_BGRAD_EPILOGUE=1`.
    pub fn with_bgrad_epilogue(mut self, on: bool) -> Self {
        self.tuning.bgrad_epilogue = on;
        self
    }
    pub(crate) fn bgrad_epilogue(&self) -> bool {
        self.tuning.bgrad_epilogue
    }
    pub(crate) fn epilogue_counts(&self) -> &lt::EpilogueCounts {
        &self.epilogue_counts
    }
    /// With `on`, the bf16 attention backward computes dk, dv and dq in one pass over the tile
    /// pairs (5 products per pair instead of 7; dq added into an f32 scratch with atomics, so
    /// dq is no longer bitwise repeatable between runs). The default is off unless
    /// `SMELT_ATTN_FUSED_BWD=1`.
    pub fn with_fused_attention_backward(mut self, on: bool) -> Self {
        self.tuning.fused_attention_backward = on;
        self
    }
    pub(crate) fn fused_attention_backward(&self) -> bool {
        self.tuning.fused_attention_backward
    }
    /// With `on`, each GEMM shape not seen yet times cuBLASLt's first few algorithms on its
    /// first call and keeps the fastest (lt_autotune.rs); the backward pass's plain GEMMs then
    /// run through cuBLASLt too. Which algorithm wins depends on timing, so runs are no longer
    /// bitwise repeatable. The default is on unless `SMELT_LT_AUTOTUNE=0`; no effect where
    /// cuBLASLt is off.
    pub fn with_lt_autotune(mut self, on: bool) -> Self {
        self.tuning.lt_autotune = on;
        if let Some(lt) = self.lt.as_mut() {
            lt.set_autotune(on);
        }
        self
    }
    /// What GEMM autotuning did so far (zeros when it is off).
    pub fn lt_autotune_stats(&self) -> AutotuneStats {
        self.lt.as_ref().map(|lt| lt.autotune_stats()).unwrap_or_default()
    }
    /// How many matmul calls took each training epilogue so far (see `with_gelu_epilogue`,
    /// `with_bgrad_epilogue`).
    pub fn epilogue_stats(&self) -> EpilogueStats {
        self.epilogue_counts.stats()
    }
    /// Why cuBLASLt refused an epilogue, each distinct refusal so far ("epilogue: error").
    pub fn epilogue_refusals(&self) -> Vec<String> {
        self.epilogue_counts.refusals()
    }
    /// With `on` false, bf16 matmuls convert their weights on every call instead of reading
    /// bf16 shadows of their buffers (same results, bitwise; for comparison). The default is
    /// on unless `SMELT_WEIGHT_SHADOW=0`.
    pub fn with_weight_shadow(mut self, on: bool) -> Self {
        self.tuning.weight_shadow = on;
        self
    }
    pub fn weight_shadow(&self) -> bool {
        self.tuning.weight_shadow
    }
    /// Counts of what the weight shadows did so far.
    pub fn weight_shadow_stats(&self) -> ShadowStats {
        self.shadows().stats()
    }
    pub(crate) fn shadows(&self) -> std::sync::MutexGuard<'_, shadow::ShadowCache<CudaSlice<u16>>> {
        self.shadows.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn device_name(&self) -> &str {
        &self.device_name
    }
    /// "sm_XY", the architecture the kernels were compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub(crate) fn sm_count(&self) -> u32 {
        self.sm_count
    }
    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.blas
    }
    pub(crate) fn lt(&self) -> Option<&lt::Lt> {
        self.lt.as_ref()
    }

    /// Kernel by its `extern "C"` name. Panics on an unknown name: that is a bug in this crate.
    pub(crate) fn func(&self, name: &str) -> CudaFunction {
        match self.funcs.get(name) {
            Some(f) => f.clone(),
            None => panic!("cuda: no kernel named `{name}` in any module"),
        }
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Records the first failure (sticky); `synchronize` reports it.
    pub(crate) fn check(&self, r: Result<(), DriverError>, what: &str) {
        if let Err(e) = r {
            self.fail(what, format!("{e:?}"));
        }
    }

    /// Records a failure described by text (cuBLAS errors, shape problems found late).
    pub(crate) fn fail(&self, what: &str, message: String) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(format!("cuda:{} {what}: {message}", self.ordinal));
        }
    }

    pub(crate) fn ids_ptr(&self, ids: &CudaSlice<u32>) -> u64 {
        let (ptr, _sync) = ids.device_ptr(&self.stream);
        ptr
    }

    /// Device address of a bf16 scratch region of at least `len` elements, valid until the next
    /// call (which may grow it: the old buffer is freed in stream order, after the work queued
    /// on it). `None` after recording an allocation failure.
    pub(crate) fn bf16_scratch(&self, len: usize) -> Option<u64> {
        self.scratch(&self.bf16_scratch, len, "bf16")
    }

    /// Like `bf16_scratch`, for f32 values (a separate region: both can be in use at once).
    pub(crate) fn f32_scratch(&self, len: usize) -> Option<u64> {
        self.scratch(&self.f32_scratch, len, "f32")
    }

    fn scratch<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        slot: &Mutex<Option<CudaSlice<T>>>,
        len: usize,
        what: &str,
    ) -> Option<u64> {
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|s| s.len() < len) {
            slot.take();
            match self.stream.alloc_zeros::<T>(len.max(1)) {
                Ok(s) => *slot = Some(s),
                Err(e) => {
                    self.fail("scratch", format!("allocating {len} {what} values: {e:?}"));
                    return None;
                }
            }
        }
        let s = slot.as_ref().expect("allocated above");
        let (ptr, _sync) = s.device_ptr(&self.stream);
        Some(ptr)
    }

    /// Device address of the error word (`unsigned*` in kernels).
    pub(crate) fn err_ptr(&self) -> u64 {
        self.ids_ptr(&self.err_word)
    }

    /// Reads and clears the error word; describes the bits set.
    fn take_kernel_errors(&self) -> Option<String> {
        let mut word = [0u32];
        self.check(self.ctx.bind_to_thread(), "bind context");
        let ptr = self.err_ptr();
        // SAFETY: the error word is one u32; the stream is synchronised before `word` is read.
        let r = unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut word[..], ptr, self.stream.cu_stream()) };
        self.check(r, "error word download");
        self.check(self.stream.synchronize(), "error word synchronize");
        if word[0] == 0 {
            return None;
        }
        // SAFETY: one u32 at ptr; clears the word in stream order.
        let r = unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, 4, self.stream.cu_stream()) };
        self.check(r, "error word reset");
        let mut what = Vec::new();
        if word[0] & ERR_EMBEDDING_ID != 0 {
            what.push("an embedding id was outside its table");
        }
        if word[0] & ERR_TARGET != 0 {
            what.push("a cross-entropy target was outside the vocabulary (and not IGNORE_INDEX)");
        }
        Some(format!("cuda:{}: {} (error word {:#x})", self.ordinal, what.join("; "), word[0]))
    }

    pub(crate) fn buf_ptr(&self, buf: &CudaSlice<f32>) -> u64 {
        let (ptr, _sync) = buf.device_ptr(&self.stream);
        ptr
    }
}
