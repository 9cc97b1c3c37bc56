//! The CUDA backend's `Backend::Ids`: token ids, positions or targets on the device, with the
//! host copy they were uploaded from.
//!
//! Ids never change once uploaded (the `Backend` trait has no op that writes them), so the host
//! copy stays true. The embedding backward groups positions by id on the host from it: reading
//! the ids back instead synchronised the stream, leaving the GPU idle while the host grouped
//! (about 1 ms per GPT-2 step, bench/NOTES.md v8).

use std::ops::Deref;

use cudarc::driver::CudaSlice;

pub struct CudaIds {
    dev: CudaSlice<u32>,
    host: Vec<u32>,
}

impl CudaIds {
    pub(crate) fn new(dev: CudaSlice<u32>, host: Vec<u32>) -> Self {
        assert_eq!(dev.len(), host.len(), "cuda ids: device and host copies differ in length");
        CudaIds { dev, host }
    }
    /// The ids as uploaded.
    pub fn host(&self) -> &[u32] {
        &self.host
    }
}

/// Kernels take the device slice.
impl Deref for CudaIds {
    type Target = CudaSlice<u32>;
    fn deref(&self) -> &CudaSlice<u32> {
        &self.dev
    }
}
