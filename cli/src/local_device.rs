//! The device `smelt sample` and `smelt eval` run a model on: `--device auto|cpu|cuda:N`, decided
//! as a worker decides its own (`smelt_worker::device`: `auto` takes GPU 0 when a `CudaBackend`
//! comes up on it, else the CPU, and says why), then handed to the command's generic body as a
//! backend value.

use anyhow::Result;
use smelt_engine::backend::Backend;
use smelt_engine::CpuBackend;
use smelt_worker::device::{self, Device};
use smelt_worker::DeviceRequest;
use tracing::info;

/// `--device`'s parser (the worker's words and errors).
pub fn parse(s: &str) -> Result<DeviceRequest, String> {
    s.parse().map_err(|e: device::DeviceError| e.to_string())
}

/// A command's body, written once for any backend (a closure cannot be generic over it).
pub trait OnBackend {
    type Out;
    fn run<B: Backend>(self, be: B) -> Result<Self::Out>;
}

/// Runs `body` on the device `req` resolves to.
pub fn run<J: OnBackend>(req: DeviceRequest, body: J) -> Result<J::Out> {
    let device = device::resolve(req)?;
    info!(device = %device, "running on");
    match device {
        Device::Cpu => body.run(CpuBackend::new()),
        Device::Cuda(ordinal) => on_gpu(ordinal, body),
    }
}

#[cfg(feature = "cuda")]
fn on_gpu<J: OnBackend>(ordinal: usize, body: J) -> Result<J::Out> {
    body.run(smelt_engine::cuda::CudaBackend::new(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn on_gpu<J: OnBackend>(_: usize, _: J) -> Result<J::Out> {
    // `device::resolve` refuses a GPU in a binary without the feature; kept for the match
    anyhow::bail!(device::BUILT_WITHOUT_CUDA)
}
