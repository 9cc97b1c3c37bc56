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
use std::sync::atomic::{AtomicU64, Ordering};

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
///
/// `id` (unique per process, never reused: device addresses are reused after a free) and `gen`
/// (bumped by every path that can write the buffer, all of which need `&mut self`) let the
/// backend cache a bf16 copy of the whole buffer for the matmuls (shadow.rs): a read-only view
/// made from `&CudaBuf` carries both, and the borrow proves nothing writes the buffer while it
/// lives. Hence `data` is private: storage for writing is only handed out by the `*_for_write`
/// accessors, which bump `gen`.
pub struct CudaBuf {
    data: CudaSlice<f32>,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    id: u64,
    gen: u64,
}

/// Ids of buffers, from 1 (0 is never a buffer's).
static NEXT_BUF_ID: AtomicU64 = AtomicU64::new(1);

impl CudaBuf {
    pub(crate) fn f32(data: CudaSlice<f32>) -> Self {
        let len = data.len();
        Self::new(data, len, Dtype::F32)
    }
    /// `len` bf16 values in `data` (at least `len / 2` words, rounded up).
    pub(crate) fn bf16(data: CudaSlice<f32>, len: usize) -> Self {
        assert!(data.len() * 2 >= len, "bf16 buffer of {len} values in {} words", data.len());
        Self::new(data, len, Dtype::Bf16)
    }
    fn new(data: CudaSlice<f32>, len: usize, dtype: Dtype) -> Self {
        CudaBuf { data, len, dtype, id: NEXT_BUF_ID.fetch_add(1, Ordering::Relaxed), gen: 0 }
    }
    /// The storage, to read (views, downloads).
    pub(crate) fn storage(&self) -> &CudaSlice<f32> {
        &self.data
    }
    /// The storage, to write through (a new write generation starts).
    pub(crate) fn storage_for_write(&mut self) -> &CudaSlice<f32> {
        self.gen += 1;
        &self.data
    }
    /// The f32 storage of an f32 buffer; panics on a bf16 one (an op that does not accept them).
    #[track_caller]
    pub(crate) fn f32_data(&self) -> &CudaSlice<f32> {
        assert_eq!(self.dtype, Dtype::F32, "a bf16 buffer was passed where only f32 is accepted");
        &self.data
    }
    /// [`f32_data`](Self::f32_data) to write through (a new write generation starts).
    #[track_caller]
    pub(crate) fn f32_data_for_write(&mut self) -> &CudaSlice<f32> {
        assert_eq!(self.dtype, Dtype::F32, "a bf16 buffer was passed where only f32 is accepted");
        self.storage_for_write()
    }
    /// Unique per process (see the type's doc).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
    /// Write generation: changes whenever the buffer may have been written.
    pub(crate) fn gen(&self) -> u64 {
        self.gen
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

/// Which buffer a read-only view was made from, and at which write generation (see
/// [`CudaBuf`]); `offset` is the view's first element in the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ViewSource {
    pub id: u64,
    pub gen: u64,
    pub offset: usize,
    pub buf_len: usize,
}

/// A read-only range of a device buffer.
#[derive(Clone, Copy, Debug)]
pub struct CudaView<'a> {
    /// `CUdeviceptr` of element 0.
    addr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    /// Set only by `Backend::view` (memory.rs); views made any other way carry none.
    src: Option<ViewSource>,
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
        CudaView { addr: ptr, len, dtype, src: None, _l: PhantomData }
    }
    /// A view of `buf` (borrowed for 'a) at `ptr`, recording where it comes from.
    ///
    /// # Safety
    /// As [`from_raw_typed`](Self::from_raw_typed); `ptr` is element `offset` of `buf`.
    pub(crate) unsafe fn from_buf(buf: &'a CudaBuf, ptr: u64, offset: usize, len: usize) -> Self {
        let src = ViewSource { id: buf.id(), gen: buf.gen(), offset, buf_len: buf.len };
        CudaView { addr: ptr, len, dtype: buf.dtype, src: Some(src), _l: PhantomData }
    }
    /// The buffer and write generation this view reads, when it was made by `Backend::view`.
    pub(crate) fn source(&self) -> Option<ViewSource> {
        self.src
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
        CudaView { addr: self.addr, len: self.len, dtype: self.dtype, src: None, _l: PhantomData }
    }
}
