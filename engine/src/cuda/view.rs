//! Device buffers and views into them: a raw device pointer, a length and an element type,
//! borrowing the buffer.
//!
//! cudarc's own `CudaView` carries stream-synchronisation events; with one stream per backend
//! we need none of that, and a `Copy` view (required by `Backend::View`) is just a pointer.
//! Kernels receive the pointer as a `u64` argument (`float*` or `unsigned short*` on the .cu
//! side).
//!
//! Most buffers hold f32. Activations the model allocates with `Backend::activation_zeros`
//! hold bf16 when the backend runs bf16 matmuls (as PyTorch's autocast stores them): half the
//! memory traffic in every op that reads or writes them, and GEMM operands without a
//! conversion pass. Only the ops that say so accept a bf16 view; every other op reads the
//! pointer through [`CudaView::ptr`], which refuses a bf16 view loudly instead of letting a
//! kernel read half a buffer as floats.

use std::marker::PhantomData;

use cudarc::driver::CudaSlice;

/// Element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// The CUDA backend's `Backend::Buf`: `len` elements of `dtype` (a bf16 buffer keeps its
/// values two to an f32 word of `data`).
pub struct CudaBuf {
    pub(crate) data: CudaSlice<f32>,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
}

impl CudaBuf {
    pub(crate) fn f32(data: CudaSlice<f32>) -> Self {
        let len = data.len();
        CudaBuf { data, len, dtype: Dtype::F32 }
    }
    /// The f32 storage of an f32 buffer; panics on a bf16 one (an op that does not accept them).
    #[track_caller]
    pub(crate) fn f32_data(&self) -> &CudaSlice<f32> {
        assert_eq!(self.dtype, Dtype::F32, "a bf16 buffer was passed where only f32 is accepted");
        &self.data
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
}

/// A read-only range of a device buffer.
#[derive(Clone, Copy, Debug)]
pub struct CudaView<'a> {
    /// `CUdeviceptr` of element 0.
    addr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    _l: PhantomData<&'a f32>,
}

/// A writable range of a device buffer.
#[derive(Debug)]
pub struct CudaViewMut<'a> {
    /// `CUdeviceptr` of element 0.
    addr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    _l: PhantomData<&'a mut f32>,
}

/// The accessors both view types share (written once, expanded in each impl).
macro_rules! view_accessors {
    () => {
        /// The device pointer of an f32 view; panics on a bf16 view (an op that only takes f32).
        #[track_caller]
        pub(crate) fn ptr(&self) -> u64 {
            assert_eq!(self.dtype, Dtype::F32, "a bf16 view was passed to an op that only takes f32");
            self.addr
        }
        /// [`ptr`](Self::ptr) by reference, for a kernel launch's argument list.
        #[track_caller]
        pub(crate) fn ptr_ref(&self) -> &u64 {
            assert_eq!(self.dtype, Dtype::F32, "a bf16 view was passed to an op that only takes f32");
            &self.addr
        }
        /// The device pointer whatever the element type (ops that dispatch on `dtype`).
        pub(crate) fn addr(&self) -> u64 {
            self.addr
        }
        /// [`addr`](Self::addr) by reference, for a kernel launch's argument list.
        pub(crate) fn addr_ref(&self) -> &u64 {
            &self.addr
        }
        pub(crate) fn is_bf16(&self) -> bool {
            self.dtype == Dtype::Bf16
        }
        pub fn len(&self) -> usize {
            self.len
        }
        pub fn is_empty(&self) -> bool {
            self.len == 0
        }
    };
}

impl<'a> CudaView<'a> {
    /// # Safety
    /// `ptr..ptr + dtype.size() * len` must lie in one live allocation that outlives `'a`.
    pub(crate) unsafe fn from_raw_typed(ptr: u64, len: usize, dtype: Dtype) -> Self {
        CudaView { addr: ptr, len, dtype, _l: PhantomData }
    }
    view_accessors!();
}

impl<'a> CudaViewMut<'a> {
    /// # Safety
    /// As [`CudaView::from_raw_typed`], and no other live view may alias the range.
    pub(crate) unsafe fn from_raw_typed(ptr: u64, len: usize, dtype: Dtype) -> Self {
        CudaViewMut { addr: ptr, len, dtype, _l: PhantomData }
    }
    view_accessors!();
    /// A writable view of the same range for one call (`fill` first, then a kernel), borrowing
    /// this one mutably.
    pub fn reborrow(&mut self) -> CudaViewMut<'_> {
        CudaViewMut { addr: self.addr, len: self.len, dtype: self.dtype, _l: PhantomData }
    }
    /// A read-only view of the same range, borrowing this one.
    pub fn as_view(&self) -> CudaView<'_> {
        CudaView { addr: self.addr, len: self.len, dtype: self.dtype, _l: PhantomData }
    }
}
