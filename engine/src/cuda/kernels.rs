//! Kernel sources (one `.cu` file per op family, candle style) and their NVRTC compilation.
//!
//! Every module is compiled once per backend, at construction, for the device's own
//! architecture (`sm_XY`); the CI compile test runs the same `compile_all` for `sm_90` with no
//! GPU. Kernels use only NVRTC built-ins, so no CUDA headers are needed; `SMELT_CUDA_INCLUDE`
//! (or `/usr/local/cuda/include` when it exists) is still passed as an include path so that a
//! module may `#include <cuda_bf16.h>`.

use cudarc::nvrtc::{CompileOptions, Ptx};

use super::CudaTuning;
use thiserror::Error;

/// The attention module's files, in the order they are compiled (attention.cuh says what each
/// holds): one module, so the forward and backward share their primitives and tiles.
pub const ATTENTION_SOURCE: &str = concat!(
    include_str!("kernels/attention.cuh"),
    include_str!("kernels/attention_f32.cu"),
    include_str!("kernels/attention_mma.cuh"),
    include_str!("kernels/attention_wgmma.cuh"),
    include_str!("kernels/attention_operands.cu"),
    include_str!("kernels/attention_mma_forward.cu"),
    include_str!("kernels/attention_mma_backward.cu"),
);

/// (module name, CUDA C++ source), one entry per `.cu` file (attention: its files); modules that
/// touch bf16 storage get `bf16.cuh` (conversions) prepended.
pub const MODULES: &[(&str, &str)] = &[
    ("memory", concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/memory.cu"))),
    ("embedding", include_str!("kernels/embedding.cu")),
    ("bias", concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/bias.cu"))),
    ("layernorm", concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/layernorm.cu"))),
    ("elementwise", concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/elementwise.cu"))),
    ("dropout", include_str!("kernels/dropout.cu")),
    ("cross_entropy", concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/cross_entropy.cu"))),
    ("adamw", concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/adamw.cu"))),
    ("attention", ATTENTION_SOURCE),
    ("learned_scores", concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/learned_scores.cu"))),
    ("convert", concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/convert.cu"))),
    ("rope", concat!(include_str!("kernels/bf16.cuh"), include_str!("kernels/rope.cu"))),
];

/// Env var naming a directory of CUDA headers to add to NVRTC's include path.
pub const INCLUDE_ENV: &str = "SMELT_CUDA_INCLUDE";

#[derive(Debug, Error)]
pub enum KernelError {
    #[error(
        "libnvrtc could not be loaded (looked for libnvrtc.so and libnvrtc.so.13 on the dynamic \
         loader's path; set LD_LIBRARY_PATH to the directory holding them, e.g. \
         /usr/local/cuda/lib64 or the pip wheel's nvidia/cu13/lib)"
    )]
    NvrtcMissing,
    #[error("nvrtc failed on module `{module}` for {arch}: {message}")]
    Compile { module: String, arch: String, message: String },
}

/// One compiled module: its PTX and the names of its `extern "C" __global__` kernels.
pub struct CompiledModule {
    pub name: &'static str,
    pub ptx: Ptx,
    pub kernels: Vec<String>,
}

/// Whether libnvrtc can be loaded (cudarc panics on first use when it cannot).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen candidate library names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles every module in [`MODULES`] for `arch` (e.g. "sm_90") with `tuning`'s
/// preprocessor definitions (`CudaTuning::defines`: the kernels' compiled-in switches), each
/// module for [`module_arch`].
pub fn compile_all(arch: &str, tuning: &CudaTuning) -> Result<Vec<CompiledModule>, KernelError> {
    if !nvrtc_available() {
        return Err(KernelError::NvrtcMissing);
    }
    let defines = tuning.defines();
    MODULES.iter().map(|&(name, src)| compile_one(name, src, &module_arch(name, arch, tuning.attn_wgmma), &defines)).collect()
}

/// The architecture a module is compiled for on a device of `arch`: with the wgmma attention
/// kernels asked for (`CudaTuning::attn_wgmma`) on an sm_90 device, the attention module for
/// Hopper's architecture-specific target sm_90a (wgmma needs it; its PTX loads on sm_90 devices
/// only); otherwise `arch` (the wgmma kernels then compile to a trap, never launched).
pub fn module_arch(module: &str, arch: &str, wgmma: bool) -> String {
    if wgmma && module == "attention" && arch == "sm_90" {
        "sm_90a".to_string()
    } else {
        arch.to_string()
    }
}

/// Compiles one source without defines (tests' own snippets).
pub fn compile_source(name: &'static str, src: &str, arch: &str) -> Result<CompiledModule, KernelError> {
    compile_one_with(name, src, arch, &[])
}

/// Compiles one source with the preprocessor definitions `defines`.
pub fn compile_one_with(name: &'static str, src: &str, arch: &str, defines: &[String]) -> Result<CompiledModule, KernelError> {
    if !nvrtc_available() {
        return Err(KernelError::NvrtcMissing);
    }
    compile_one(name, src, arch, defines)
}

fn compile_one(name: &'static str, src: &str, arch: &str, defines: &[String]) -> Result<CompiledModule, KernelError> {
    let mut include_paths = Vec::new();
    if let Ok(dir) = std::env::var(INCLUDE_ENV) {
        include_paths.push(dir);
    } else if std::path::Path::new("/usr/local/cuda/include").is_dir() {
        include_paths.push("/usr/local/cuda/include".to_string());
    }
    let opts = CompileOptions {
        // IEEE division and sqrt: the CPU reference is IEEE f32, and the tests compare to it.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        include_paths,
        options: [vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()], defines.to_vec()].concat(),
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| KernelError::Compile {
        module: name.to_string(),
        arch: arch.to_string(),
        message: describe(&e),
    })?;
    Ok(CompiledModule { name, ptx, kernels: kernel_names(src) })
}

/// NVRTC's log, readable, instead of the Debug dump of a CString.
fn describe(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
            format!("{nvrtc:?}: {}", log.to_string_lossy())
        }
        other => format!("{other:?}"),
    }
}

/// Names of the kernels a source defines: the identifier before the parameter list of every
/// `__global__` function (skipping a `__launch_bounds__(..)` qualifier).
pub fn kernel_names(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find("__global__") {
        rest = &rest[at + "__global__".len()..];
        loop {
            let Some(paren) = rest.find('(') else { return names };
            let ident = rest[..paren].split_whitespace().last().unwrap_or("");
            let ident = ident.trim_start_matches('*');
            rest = &rest[paren + 1..];
            if ident == "__launch_bounds__" {
                continue;
            }
            if !ident.is_empty() && ident.chars().all(|c| c.is_alphanumeric() || c == '_') {
                names.push(ident.to_string());
            }
            break;
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::kernel_names;

    #[test]
    fn finds_kernel_names() {
        let src = "extern \"C\" __global__ void a_b(float* x) {}\n\
                   extern \"C\" __global__ void __launch_bounds__(256) c(int n) {}\n\
                   __device__ float helper(float x) { return x; }";
        assert_eq!(kernel_names(src), vec!["a_b".to_string(), "c".to_string()]);
    }
}
