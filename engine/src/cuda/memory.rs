//! Memory ops: allocation, views, host transfers, fill/copy/scale and the sum of squares.

use std::ops::Range;

use cudarc::driver::{result, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};

use super::view::{CudaBuf, CudaView, CudaViewMut};
use super::CudaBackend;

/// Blocks of `sum_squares_partial`: a constant, so the partial sums (and their rounding) are
/// the same on every GPU whatever its SM count.
const SUM_BLOCKS: usize = 1024;

pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(be: &CudaBackend, len: usize) -> CudaSlice<T> {
    be.stream().alloc_zeros::<T>(len).unwrap_or_else(|e| {
        panic!(
            "cuda:{}: cannot allocate {len} elements of {} bytes: {e:?}",
            be.ordinal(),
            std::mem::size_of::<T>()
        )
    })
}

pub(crate) fn upload<T: DeviceRepr>(be: &CudaBackend, host: &[T]) -> CudaSlice<T> {
    be.stream().clone_htod(host).unwrap_or_else(|e| {
        panic!("cuda:{}: cannot upload {} elements: {e:?}", be.ordinal(), host.len())
    })
}

fn check_range(len: usize, range: &Range<usize>) {
    assert!(
        range.start <= range.end && range.end <= len,
        "cuda view {range:?} outside a buffer of {len} elements"
    );
}

/// A read-only view that records its buffer's id and write generation (the matmuls' bf16 weight
/// shadows key on them, shadow.rs).
pub(crate) fn view<'a>(be: &CudaBackend, buf: &'a CudaBuf, range: Range<usize>) -> CudaView<'a> {
    check_range(buf.len, &range);
    let ptr = be.buf_ptr(buf.storage()) + (buf.dtype.size() * range.start) as u64;
    // SAFETY: the range lies inside `buf`, which the view borrows for 'a; ptr is element
    // range.start of it.
    unsafe { CudaView::from_buf(buf, ptr, range.start, range.len()) }
}

/// A writable view; the buffer enters a new write generation (whether or not it is written).
pub(crate) fn view_mut<'a>(be: &CudaBackend, buf: &'a mut CudaBuf, range: Range<usize>) -> CudaViewMut<'a> {
    check_range(buf.len, &range);
    let ptr = be.buf_ptr(buf.storage_for_write()) + (buf.dtype.size() * range.start) as u64;
    // SAFETY: the range lies inside `buf`, which the view borrows mutably for 'a.
    unsafe { CudaViewMut::from_raw_typed(ptr, range.len(), buf.dtype) }
}

/// Several disjoint writable ranges at once; panics if two overlap. The buffer enters a new
/// write generation, as with `view_mut`.
pub(crate) fn split_mut<'a, const K: usize>(
    be: &CudaBackend,
    buf: &'a mut CudaBuf,
    ranges: [Range<usize>; K],
) -> [CudaViewMut<'a>; K] {
    let mut order: Vec<usize> = (0..K).collect();
    order.sort_by_key(|&i| ranges[i].start);
    for w in order.windows(2) {
        assert!(
            ranges[w[0]].end <= ranges[w[1]].start,
            "split_mut: ranges overlap ({:?})",
            ranges
        );
    }
    for r in &ranges {
        check_range(buf.len, r);
    }
    let dtype = buf.dtype;
    let base = be.buf_ptr(buf.storage_for_write());
    // SAFETY: every range lies inside `buf` (borrowed mutably for 'a) and no two overlap.
    ranges.map(|r| unsafe { CudaViewMut::from_raw_typed(base + (dtype.size() * r.start) as u64, r.len(), dtype) })
}

/// A zeroed buffer of `len` bf16 values (two to an f32 word).
pub(crate) fn zeros_bf16(be: &CudaBackend, len: usize) -> CudaBuf {
    CudaBuf::bf16(zeros(be, len.div_ceil(2)), len)
}

/// f32 -> bf16, round to nearest even (NaN stays NaN), as `f32_to_bf16` in convert.cu.
pub(crate) fn f32_to_bf16_bits(f: f32) -> u16 {
    let u = f.to_bits();
    if u & 0x7f80_0000 == 0x7f80_0000 && u & 0x007f_ffff != 0 {
        return ((u >> 16) | 0x40) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

pub(crate) fn download(be: &CudaBackend, view: CudaView<'_>) -> Vec<f32> {
    if view.len == 0 {
        return Vec::new();
    }
    let stream = be.stream();
    be.check(stream.context().bind_to_thread(), "bind context");
    if view.is_bf16() {
        let mut bits = vec![0u16; view.len];
        // SAFETY: `bits` holds view.len bf16 values and the view covers as many on the device;
        // the stream is synchronised before `bits` is read or dropped.
        let r = unsafe { result::memcpy_dtoh_async(&mut bits[..], view.addr(), stream.cu_stream()) };
        be.check(r, "download");
        be.check(stream.synchronize(), "download synchronize");
        return bits.into_iter().map(|b| f32::from_bits((b as u32) << 16)).collect();
    }
    let mut host = vec![0.0f32; view.len];
    // SAFETY: `host` holds view.len floats and the view covers as many on the device; the
    // stream is synchronised before `host` is read or dropped.
    let r = unsafe { result::memcpy_dtoh_async(&mut host[..], view.ptr(), stream.cu_stream()) };
    be.check(r, "download");
    be.check(stream.synchronize(), "download synchronize");
    host
}

pub(crate) fn write(be: &CudaBackend, dst: CudaViewMut<'_>, host: &[f32]) {
    assert_eq!(dst.len, host.len(), "cuda write: view of {} elements, host slice of {}", dst.len, host.len());
    if host.is_empty() {
        return;
    }
    let stream = be.stream();
    be.check(stream.context().bind_to_thread(), "bind context");
    if dst.is_bf16() {
        let bits: Vec<u16> = host.iter().map(|&f| f32_to_bf16_bits(f)).collect();
        // SAFETY: as below; `bits` is staged by the driver before the call returns.
        let r = unsafe { result::memcpy_htod_async(dst.addr(), &bits[..], stream.cu_stream()) };
        be.check(r, "write");
        return;
    }
    // SAFETY: sizes match (asserted). From pageable memory the driver copies `host` into a
    // staging buffer before returning, so `host` may be dropped right after.
    let r = unsafe { result::memcpy_htod_async(dst.ptr(), host, stream.cu_stream()) };
    be.check(r, "write");
}

/// Grid-stride launch over `n` elements: 256 threads, at most 32 blocks per SM.
pub(crate) fn elementwise_cfg(be: &CudaBackend, n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 32 * be.sm_count() as usize);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn fill(be: &CudaBackend, dst: CudaViewMut<'_>, value: f32) {
    if dst.len == 0 {
        return;
    }
    if dst.is_bf16() {
        be.check(be.stream().context().bind_to_thread(), "bind context");
        // SAFETY: the view covers dst.len 16-bit values.
        let r = unsafe {
            cudarc::driver::sys::cuMemsetD16Async(dst.addr(), f32_to_bf16_bits(value), dst.len, be.stream().cu_stream())
        }
        .result();
        be.check(r, "fill bf16");
        return;
    }
    let f = be.func("fill_f32");
    let n = dst.len as u64;
    let mut b = be.stream().launch_builder(&f);
    b.arg(dst.ptr_ref()).arg(&value).arg(&n);
    // SAFETY: fill_f32(float*, float, u64) writes n floats at dst.
    be.check(unsafe { b.launch(elementwise_cfg(be, dst.len)) }.map(|_| ()), "fill_f32");
}

pub(crate) fn copy(be: &CudaBackend, dst: CudaViewMut<'_>, src: CudaView<'_>) {
    assert_eq!(dst.len, src.len, "cuda copy: dst has {} elements, src {}", dst.len, src.len);
    assert_eq!(dst.dtype, src.dtype, "cuda copy between element types");
    if dst.len == 0 {
        return;
    }
    let stream = be.stream();
    be.check(stream.context().bind_to_thread(), "bind context");
    // SAFETY: both ranges hold dst.len elements of one type (asserted); a ViewMut never
    // aliases a live View.
    let r = unsafe { result::memcpy_dtod_async(dst.addr(), src.addr(), dst.dtype.size() * dst.len, stream.cu_stream()) };
    be.check(r, "copy");
}

pub(crate) fn scale(be: &CudaBackend, dst: CudaViewMut<'_>, s: f32) {
    if dst.len == 0 {
        return;
    }
    // an f32 buffer, or a bf16 activation (T5's logits under its tied head's factor)
    let name = if dst.is_bf16() { "scale_bf16" } else { "scale_f32" };
    let f = be.func(name);
    let n = dst.len as u64;
    let mut b = be.stream().launch_builder(&f);
    b.arg(dst.addr_ref()).arg(&s).arg(&n);
    // SAFETY: scale_f32(float*, float, u64) / scale_bf16(unsigned short*, float, u64) rewrite n
    // values of dst's own type.
    be.check(unsafe { b.launch(elementwise_cfg(be, dst.len)) }.map(|_| ()), name);
}

/// Sum of squares in f64: fixed per-block partials on the device, summed in block order here.
pub(crate) fn sum_squares(be: &CudaBackend, src: CudaView<'_>) -> f64 {
    if src.len == 0 {
        return 0.0;
    }
    let mut partial: CudaSlice<f64> = zeros(be, SUM_BLOCKS);
    let partial_ptr = {
        let (p, _s) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut partial, be.stream());
        p
    };
    // four floats per load where the view starts on a 16-byte boundary
    let name = if src.addr().is_multiple_of(16) { "sum_squares_partial_x4" } else { "sum_squares_partial" };
    let f = be.func(name);
    let n = src.len as u64;
    let mut b = be.stream().launch_builder(&f);
    b.arg(src.ptr_ref()).arg(&n).arg(&partial_ptr);
    let cfg = LaunchConfig { grid_dim: (SUM_BLOCKS as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: sum_squares_partial[_x4](const float*, u64, double*) reads n floats (the _x4 one
    // as float4 from a 16-byte aligned start, checked above), writes SUM_BLOCKS doubles.
    be.check(unsafe { b.launch(cfg) }.map(|_| ()), name);
    let host = be.stream().clone_dtoh(&partial).unwrap_or_else(|e| {
        be.fail("sum_squares download", format!("{e:?}"));
        vec![f64::NAN; SUM_BLOCKS]
    });
    be.check(be.stream().synchronize(), "sum_squares synchronize");
    host.iter().sum()
}
