//! Which device a worker trains on (`--device auto|cpu|cuda:N`), decided once at startup so that
//! a worker that cannot use the GPU it was given fails before it registers, not at its first job.
//!
//! - `cpu`: the CPU backend; gradients over the TCP ring.
//! - `cuda:N`: GPU N; gradients over NCCL. Refused at startup when the binary lacks the `cuda`
//!   feature or a `CudaBackend` does not come up on GPU N (no driver, no such GPU, NVRTC missing).
//! - `auto`: `cuda:0` when it would be accepted, else `cpu`; the choice and why are logged.

use std::fmt;
use std::str::FromStr;

use smelt_proto::v1::DeviceClass;
use thiserror::Error;
use tracing::info;

/// What `--device` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
}

/// The device a worker trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("device {given:?}: expected auto, cpu or cuda:N (N a GPU ordinal, e.g. cuda:0)")]
    Parse { given: String },
    #[error("--device cuda:{ordinal}: {why}")]
    Unusable { ordinal: usize, why: String },
    /// A GPU performance switch set to a value it cannot mean: refused rather than taken as a
    /// reason to train on the CPU (`auto` would otherwise fall back without a word).
    #[error("{why} (a GPU performance switch: unset it, or see engine/src/cuda/tuning.rs for what it takes)")]
    Switch { why: String },
}

/// Why a GPU is never usable from this binary.
pub const BUILT_WITHOUT_CUDA: &str =
    "this smelt binary was built without the `cuda` feature (build it with `cargo build --release -p smelt --features cuda`)";

impl FromStr for DeviceRequest {
    type Err = DeviceError;

    /// `auto`, `cpu`, `cuda` (GPU 0, as in PyTorch) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let bad = || DeviceError::Parse { given: s.to_string() };
        match s.trim() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                // Digits only: `usize::from_str` would take "+1".
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                n.parse().map(DeviceRequest::Cuda).map_err(|_| bad())
            }
        }
    }
}

/// As `--device` takes it: `auto`, `cpu`, `cuda:N`.
impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => write!(f, "auto"),
            DeviceRequest::Cpu => write!(f, "cpu"),
            DeviceRequest::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// The class the coordinator schedules by.
    pub fn class(self) -> DeviceClass {
        match self {
            Device::Cpu => DeviceClass::Cpu,
            Device::Cuda(_) => DeviceClass::Cuda,
        }
    }

    /// GPU ordinal (0 on the CPU): ranks on one host follow it.
    pub fn index(self) -> u32 {
        match self {
            Device::Cpu => 0,
            Device::Cuda(n) => n as u32,
        }
    }
}

/// Decides the device, asking `probe` whether a GPU ordinal is usable (`Err(why)` if not).
pub fn resolve_with(req: DeviceRequest, probe: impl Fn(usize) -> Result<(), String>) -> Result<Device, DeviceError> {
    match req {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Cuda(ordinal) => match probe(ordinal) {
            Ok(()) => Ok(Device::Cuda(ordinal)),
            Err(why) => Err(DeviceError::Unusable { ordinal, why }),
        },
        DeviceRequest::Auto => match probe(0) {
            Ok(()) => {
                info!(device = "cuda:0", "device auto: a usable gpu is present");
                Ok(Device::Cuda(0))
            }
            Err(why) => {
                info!(device = "cpu", reason = %why, "device auto: no usable gpu; using the cpu");
                Ok(Device::Cpu)
            }
        },
    }
}

/// Decides the device on this machine.
pub fn resolve(req: DeviceRequest) -> Result<Device, DeviceError> {
    check_switches(req, switch_error())?;
    resolve_with(req, probe_cuda)
}

/// A request that may train on a GPU (`auto`, `cuda:N`) is refused when a GPU switch is
/// invalid (`why`): a GPU that does not come up for that reason is a mistake to name, not a
/// machine without a GPU. `cpu` ignores the switches.
pub fn check_switches(req: DeviceRequest, why: Option<String>) -> Result<(), DeviceError> {
    match (req, why) {
        (DeviceRequest::Cpu, _) | (_, None) => Ok(()),
        (_, Some(why)) => Err(DeviceError::Switch { why }),
    }
}

/// What is wrong with this process's GPU performance switches (`SMELT_*`, `CudaTuning`), if
/// anything.
#[cfg(feature = "cuda")]
pub fn switch_error() -> Option<String> {
    smelt_engine::cuda::CudaTuning::from_env().err().map(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
pub fn switch_error() -> Option<String> {
    None
}

/// Whether GPU `ordinal` can train here: a `CudaBackend` comes up on it (libraries load, the
/// device exists, the kernels compile). The backend is dropped; each job makes its own.
#[cfg(feature = "cuda")]
pub fn probe_cuda(ordinal: usize) -> Result<(), String> {
    smelt_engine::cuda::CudaBackend::new(ordinal).map(drop).map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
pub fn probe_cuda(_ordinal: usize) -> Result<(), String> {
    Err(BUILT_WITHOUT_CUDA.to_string())
}

/// How many GPUs the driver sees (`Err(why)` when it cannot be asked: no `cuda` feature, no
/// driver or CUDA libraries).
#[cfg(feature = "cuda")]
pub fn gpu_count() -> Result<usize, String> {
    if let Some(why) = smelt_engine::cuda::missing_library() {
        return Err(why);
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| format!("counting gpus: {e:?}"))
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_count() -> Result<usize, String> {
    Err(BUILT_WITHOUT_CUDA.to_string())
}

/// A fresh NCCL unique id (rank 0 of a multi-GPU job, before the rendezvous relays it).
#[cfg(feature = "cuda")]
pub fn nccl_unique_id() -> Result<Vec<u8>, String> {
    smelt_engine::cuda::nccl::unique_id().map(|id| id.to_vec()).map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
pub fn nccl_unique_id() -> Result<Vec<u8>, String> {
    Err(BUILT_WITHOUT_CUDA.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_names_a_bad_one() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:0".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:7".parse(), Ok(DeviceRequest::Cuda(7)));
        // shown as it was written, in messages
        assert_eq!([DeviceRequest::Auto, DeviceRequest::Cpu, DeviceRequest::Cuda(7)].map(|d| d.to_string()), ["auto", "cpu", "cuda:7"]);
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "cuda:1:2", "CPU0", "cuda0"] {
            let e = bad.parse::<DeviceRequest>().unwrap_err();
            assert_eq!(e, DeviceError::Parse { given: bad.to_string() });
            let msg = e.to_string();
            assert!(msg.contains(&format!("{bad:?}")) && msg.contains("cuda:N"), "{msg}");
        }
    }

    #[test]
    fn an_invalid_gpu_switch_is_an_error_unless_the_cpu_was_asked_for() {
        let why = || Some("invalid `SMELT_GELU_EPILOGUE`: `on` is not 0 (off) or 1 (on)".to_string());
        for req in [DeviceRequest::Auto, DeviceRequest::Cuda(0), DeviceRequest::Cuda(3)] {
            let e = check_switches(req, why()).expect_err("auto and cuda:N refuse it");
            assert!(e.to_string().contains("SMELT_GELU_EPILOGUE") && e.to_string().contains("`on`"), "{e}");
            assert_eq!(check_switches(req, None), Ok(()));
        }
        assert_eq!(check_switches(DeviceRequest::Cpu, why()), Ok(()), "the cpu has no use for gpu switches");
    }

    #[test]
    fn auto_takes_gpu_0_when_usable_else_the_cpu() {
        let yes = |_: usize| Ok(());
        let no = |_: usize| Err("no driver".to_string());
        assert_eq!(resolve_with(DeviceRequest::Auto, yes), Ok(Device::Cuda(0)));
        assert_eq!(resolve_with(DeviceRequest::Auto, no), Ok(Device::Cpu));
        // Only ordinal 0 is asked about.
        let only_1 = |n: usize| if n == 1 { Ok(()) } else { Err(format!("cuda:{n} missing")) };
        assert_eq!(resolve_with(DeviceRequest::Auto, only_1), Ok(Device::Cpu));
    }

    #[test]
    fn an_unusable_gpu_is_an_error_naming_it() {
        let no = |n: usize| Err(format!("no such device ({n} asked, 1 present)"));
        let e = resolve_with(DeviceRequest::Cuda(3), no).unwrap_err();
        assert_eq!(e.to_string(), "--device cuda:3: no such device (3 asked, 1 present)");
        assert_eq!(resolve_with(DeviceRequest::Cuda(3), |_| Ok(())), Ok(Device::Cuda(3)));
        assert_eq!(resolve_with(DeviceRequest::Cpu, no), Ok(Device::Cpu));
    }

    #[test]
    fn class_and_index_for_the_coordinator() {
        assert_eq!((Device::Cpu.class(), Device::Cpu.index()), (DeviceClass::Cpu, 0));
        assert_eq!((Device::Cuda(2).class(), Device::Cuda(2).index()), (DeviceClass::Cuda, 2));
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    /// On this build, a GPU is refused for a reason a user can act on: the missing feature, or
    /// (with the feature, on a machine without a GPU) the missing library or device.
    #[test]
    fn this_machine_answers_with_a_reason() {
        if let Err(why) = probe_cuda(0) {
            assert!(!why.is_empty());
            if !cfg!(feature = "cuda") {
                assert_eq!(why, BUILT_WITHOUT_CUDA);
                assert_eq!(gpu_count(), Err(BUILT_WITHOUT_CUDA.to_string()));
                assert_eq!(nccl_unique_id(), Err(BUILT_WITHOUT_CUDA.to_string()));
            }
        }
    }
}
