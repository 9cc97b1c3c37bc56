//! Views into device buffers: a raw device pointer and a length, borrowing the buffer.
//!
//! cudarc's own `CudaView` carries stream-synchronisation events; with one stream per backend
//! we need none of that, and a `Copy` view (required by `Backend::View`) is just a pointer.
//! Kernels receive `ptr` as a `u64` argument (`float*` on the .cu side).

use std::marker::PhantomData;

/// A read-only range of an f32 device buffer.
#[derive(Clone, Copy, Debug)]
pub struct CudaView<'a> {
    /// `CUdeviceptr` of element 0.
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    _l: PhantomData<&'a f32>,
}

/// A writable range of an f32 device buffer.
#[derive(Debug)]
pub struct CudaViewMut<'a> {
    /// `CUdeviceptr` of element 0.
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    _l: PhantomData<&'a mut f32>,
}

impl<'a> CudaView<'a> {
    /// # Safety
    /// `ptr..ptr + 4 * len` must lie in one live f32 allocation that outlives `'a`.
    pub(crate) unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        CudaView { ptr, len, _l: PhantomData }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a> CudaViewMut<'a> {
    /// # Safety
    /// As [`CudaView::from_raw`], and no other live view may alias the range.
    pub(crate) unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        CudaViewMut { ptr, len, _l: PhantomData }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// A read-only view of the same range, borrowing this one.
    pub fn as_view(&self) -> CudaView<'_> {
        CudaView { ptr: self.ptr, len: self.len, _l: PhantomData }
    }
}
