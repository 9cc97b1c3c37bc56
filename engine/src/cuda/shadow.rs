//! bf16 copies ("shadows") of whole f32 buffers, read by the bf16 matmuls in place of their
//! weight operands.
//!
//! With `MatmulPrecision::Bf16` every matmul converts its f32 weight to bf16 before its GEMM
//! (matmul.rs), forward and backward, while the parameters only change once per optimizer step.
//! So a buffer that the matmuls read a lot gets one bf16 copy of all of it, kept valid by write
//! generation (view.rs: a read-only view records its buffer's id and generation, and every
//! write path needs `&mut CudaBuf` and bumps the generation): a matmul whose weight view comes
//! from a buffer with a shadow at the view's generation reads the shadow, no conversion. AdamW
//! writes the bf16 value of each parameter it updates into the shadow (adamw.rs), so in steady
//! training no conversion of the weights runs at all.
//!
//! The shadow holds exactly what the per-view conversion produces (`f32_to_bf16_rne`, round to
//! nearest even), so results are bitwise those without it. `SMELT_WEIGHT_SHADOW=0` turns it off
//! (`CudaTuning::weight_shadow`; [`CudaBackend::with_weight_shadow`] per backend).
//!
//! Which buffers get a shadow is [`ShadowCache`]'s decision (plain data, tested on the CPU): one
//! read by at least [`MIN_READS`] matmuls covering at least its length in one write generation
//! (converting it whole then costs no more than the per-view conversions it replaces: the
//! parameters, not an activation read once as a weight), from the first read of its next
//! generation, or from the read that crosses the bar in the current one (a forward-only loop
//! never starts a new generation); at most [`MAX_SHADOWS`], the least recently read evicted.
//! Stale entries cost memory, never correctness: ids are never reused.

use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

use super::memory::elementwise_cfg;
use super::view::{CudaBuf, CudaView, Dtype, ViewSource};
use super::{CudaBackend, MatmulPrecision};

/// Shadows kept at once (GPT-2 124M's is 248 MB).
pub(crate) const MAX_SHADOWS: usize = 4;
/// Buffers whose reads are counted at once (the least recently read forgotten first).
const MAX_TRACKED: usize = 64;
/// Matmul reads in one write generation that make a buffer worth a shadow in the next.
pub(crate) const MIN_READS: u32 = 4;

/// What the weight shadows did, for tests and profiling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Matmul weight reads served from a valid shadow (the one making it included).
    pub hits: u64,
    /// Shadows made (or remade) by a conversion pass over a whole buffer.
    pub made: u64,
    /// Shadows kept valid by the optimizer writing them with the parameters.
    pub fused: u64,
}

/// How a matmul gets the bf16 values of a weight view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The shadow of its buffer is valid at the view's generation: read it.
    Use,
    /// Make the shadow (convert the whole buffer; storage from [`ShadowCache::store`] or a new
    /// one given to [`ShadowCache::insert`]), then report it with [`ShadowCache::made`].
    Make,
    /// Convert the view alone, as without shadows.
    Convert,
}

/// Matmul reads of one buffer: in the generation being read and in the last one before it
/// that was read.
#[derive(Clone, Copy, Debug)]
struct Reads {
    id: u64,
    gen: u64,
    reads: u32,
    elems: usize,
    prev_reads: u32,
    prev_elems: usize,
    last_use: u64,
}

struct Slot<S> {
    id: u64,
    /// Generation whose values the storage holds; `None` while it holds none.
    valid_gen: Option<u64>,
    last_use: u64,
    store: S,
}

/// The shadows' bookkeeping, generic over their storage (`CudaSlice<u16>` on the device, a
/// token in tests).
pub(crate) struct ShadowCache<S> {
    slots: Vec<Slot<S>>,
    reads: Vec<Reads>,
    /// Advances on every read: orders uses for eviction.
    clock: u64,
    stats: ShadowStats,
}

impl<S> Default for ShadowCache<S> {
    fn default() -> Self {
        ShadowCache { slots: Vec::new(), reads: Vec::new(), clock: 0, stats: ShadowStats::default() }
    }
}

impl<S> ShadowCache<S> {
    /// Counts one matmul read of `read_len` elements of buffer `id` (`buf_len` elements) at
    /// write generation `gen`, and says how to get them in bf16.
    pub(crate) fn read(&mut self, id: u64, gen: u64, buf_len: usize, read_len: usize) -> Plan {
        self.clock += 1;
        let now = self.clock;
        let r = self.reads_of(id, gen, now);
        r.reads = r.reads.saturating_add(1);
        r.elems = r.elems.saturating_add(read_len);
        let worth_it = (r.prev_reads >= MIN_READS && r.prev_elems >= buf_len) || (r.reads >= MIN_READS && r.elems >= buf_len);
        if let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) {
            slot.last_use = now;
            if slot.valid_gen == Some(gen) {
                self.stats.hits += 1;
                return Plan::Use;
            }
        }
        if worth_it {
            Plan::Make
        } else {
            Plan::Convert
        }
    }

    /// The read counts of `id`, rolled over to `gen` when that is a new generation.
    fn reads_of(&mut self, id: u64, gen: u64, now: u64) -> &mut Reads {
        let at = match self.reads.iter().position(|r| r.id == id) {
            Some(at) => at,
            None => {
                if self.reads.len() >= MAX_TRACKED {
                    let lru = (0..self.reads.len()).min_by_key(|&i| self.reads[i].last_use).expect("full");
                    self.reads.swap_remove(lru);
                }
                let fresh = Reads { id, gen, reads: 0, elems: 0, prev_reads: 0, prev_elems: 0, last_use: now };
                self.reads.push(fresh);
                self.reads.len() - 1
            }
        };
        let r = &mut self.reads[at];
        if r.gen != gen {
            *r = Reads { id, gen, reads: 0, elems: 0, prev_reads: r.reads, prev_elems: r.elems, last_use: now };
        }
        r.last_use = now;
        r
    }

    /// The storage of `id`'s shadow, valid or not.
    pub(crate) fn store(&self, id: u64) -> Option<&S> {
        self.slots.iter().find(|s| s.id == id).map(|s| &s.store)
    }

    /// Storage for `id`'s shadow (holding no valid values yet); returns the storage of the least
    /// recently read shadow when that had to make room.
    pub(crate) fn insert(&mut self, id: u64, store: S) -> Option<S> {
        assert!(self.store(id).is_none(), "shadow storage for buffer {id} inserted twice");
        let evicted = if self.slots.len() >= MAX_SHADOWS {
            let lru = (0..self.slots.len()).min_by_key(|&i| self.slots[i].last_use).expect("full");
            Some(self.slots.swap_remove(lru).store)
        } else {
            None
        };
        self.slots.push(Slot { id, valid_gen: None, last_use: self.clock, store });
        evicted
    }

    /// `id`'s shadow now holds its buffer's values of generation `gen` (a conversion pass).
    pub(crate) fn made(&mut self, id: u64, gen: u64) {
        if self.set_valid(id, Some(gen)) {
            self.stats.made += 1;
        }
    }

    /// Every element of buffer `id` was rewritten in generation `gen`; `shadow_too` when the
    /// same kernel wrote the shadow (then valid at `gen`, else holding nothing valid).
    pub(crate) fn rewritten(&mut self, id: u64, gen: u64, shadow_too: bool) {
        if self.set_valid(id, shadow_too.then_some(gen)) && shadow_too {
            self.stats.fused += 1;
        }
    }

    /// Drops `id`'s shadow (a failed conversion), returning its storage.
    pub(crate) fn forget(&mut self, id: u64) -> Option<S> {
        let at = self.slots.iter().position(|s| s.id == id)?;
        Some(self.slots.swap_remove(at).store)
    }

    fn set_valid(&mut self, id: u64, gen: Option<u64>) -> bool {
        match self.slots.iter_mut().find(|s| s.id == id) {
            Some(slot) => {
                slot.valid_gen = gen;
                true
            }
            None => false,
        }
    }

    pub(crate) fn stats(&self) -> ShadowStats {
        self.stats
    }
}

/// Device address of shadow storage.
fn store_ptr(be: &CudaBackend, store: &CudaSlice<u16>) -> u64 {
    store.device_ptr(be.stream()).0
}

/// The weight operand of a bf16 matmul as a bf16 view of its buffer's shadow, made first when
/// [`ShadowCache::read`] says so; `weight` itself when it gets no shadow (the caller converts
/// it as before). The shadow view is valid until the next call: a later one may evict the
/// shadow, freed in stream order after the GEMMs queued on it (one stream; the backend is
/// driven from one thread at a time, as its scratch buffers already require).
pub(crate) fn weight_view<'a>(be: &CudaBackend, weight: CudaView<'a>) -> CudaView<'a> {
    if !be.weight_shadow() || be.options().matmul != MatmulPrecision::Bf16 || weight.is_bf16() || weight.is_empty() {
        return weight;
    }
    let Some(src) = weight.source() else { return weight };
    let mut cache = be.shadows();
    let shadowed = match cache.read(src.id, src.gen, src.buf_len, weight.len) {
        Plan::Use => true,
        Plan::Convert => false,
        Plan::Make => make(be, &mut cache, weight, src),
    };
    let Some(store) = cache.store(src.id).filter(|_| shadowed) else { return weight };
    let addr = store_ptr(be, store) + 2 * src.offset as u64;
    // SAFETY: the shadow holds src.buf_len bf16 values of the viewed buffer at src.gen, of which
    // the view's are at src.offset; it lives at least until the next call (see above).
    unsafe { CudaView::from_raw_typed(addr, weight.len, Dtype::Bf16) }
}

/// Converts the whole buffer `weight` is a view of into its shadow (new storage when it has
/// none); false (nothing cached) when the storage or the launch failed.
fn make(be: &CudaBackend, cache: &mut ShadowCache<CudaSlice<u16>>, weight: CudaView<'_>, src: ViewSource) -> bool {
    if cache.store(src.id).is_none() {
        // SAFETY: u16 has no invalid bit patterns, and the conversion below writes every
        // element before anything reads the storage (one stream).
        match unsafe { be.stream().alloc::<u16>(src.buf_len) } {
            Ok(store) => drop(cache.insert(src.id, store)),
            Err(e) => {
                warn_no_memory_once(src.buf_len, &format!("{e:?}"));
                return false;
            }
        }
    }
    let out = store_ptr(be, cache.store(src.id).expect("inserted above"));
    // Element 0 of the buffer: the view is element src.offset of it.
    let input = weight.ptr() - 4 * src.offset as u64;
    let n = src.buf_len as u64;
    let f = be.func("f32_to_bf16");
    let mut b = be.stream().launch_builder(&f);
    b.arg(&out).arg(&input).arg(&n);
    // SAFETY: f32_to_bf16(u16*, const float*, u64) reads the buffer's n floats (the view lies in
    // it and borrows it) and writes the shadow's n values.
    let r = unsafe { b.launch(elementwise_cfg(be, src.buf_len.div_ceil(4))) }.map(|_| ());
    let ok = r.is_ok();
    be.check(r, "f32_to_bf16 (weight shadow)");
    if ok {
        cache.made(src.id, src.gen);
    } else {
        drop(cache.forget(src.id));
    }
    ok
}

/// Says once per process that a shadow could not be allocated (the matmuls then convert their
/// weights per call, as without shadows).
fn warn_no_memory_once(len: usize, e: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| tracing::warn!(elements = len, error = %e, "no memory for a bf16 weight shadow; converting per matmul"));
}

/// For a kernel about to rewrite every element of `buf` (AdamW, after bumping its generation):
/// the address of `buf`'s shadow for it to write the bf16 values into as well, or 0 when there
/// is none. Report the launch with [`rewritten`].
pub(crate) fn rewrite_target(be: &CudaBackend, buf: &CudaBuf) -> u64 {
    if !be.weight_shadow() {
        return 0;
    }
    let cache = be.shadows();
    match cache.store(buf.id()) {
        Some(store) if store.len() >= buf.len => store_ptr(be, store),
        _ => 0,
    }
}

/// After the kernel [`rewrite_target`] prepared for: `shadow_written` when it was launched with
/// the shadow's address (the shadow is then valid at `buf`'s generation, otherwise stale).
pub(crate) fn rewritten(be: &CudaBackend, buf: &CudaBuf, shadow_written: bool) {
    be.shadows().rewritten(buf.id(), buf.gen(), shadow_written);
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = 1000;

    /// One generation of `k` reads of `len` elements each; the plans in order.
    fn reads(c: &mut ShadowCache<u32>, id: u64, gen: u64, k: u32, len: usize) -> Vec<Plan> {
        (0..k).map(|_| c.read(id, gen, LEN, len)).collect()
    }

    /// Reads of a generation after one that qualified, doing what the device code does.
    fn make_if_asked(c: &mut ShadowCache<u32>, id: u64, gen: u64) -> Plan {
        let plan = c.read(id, gen, LEN, LEN);
        if plan == Plan::Make {
            if c.store(id).is_none() {
                c.insert(id, id as u32);
            }
            c.made(id, gen);
        }
        plan
    }

    #[test]
    fn next_generation_makes_at_its_first_read() {
        let mut c = ShadowCache::default();
        // Generation 0 crosses the bar at its 4th read (1200 elements of 1000); not made here
        // (as when there was no memory): generation 1 makes it at its first read.
        assert_eq!(reads(&mut c, 1, 0, 4, 300), vec![Plan::Convert, Plan::Convert, Plan::Convert, Plan::Make]);
        assert_eq!(make_if_asked(&mut c, 1, 1), Plan::Make);
        assert_eq!(reads(&mut c, 1, 1, 3, 300), vec![Plan::Use; 3]);
        assert_eq!(c.stats(), ShadowStats { hits: 3, made: 1, fused: 0 });
    }

    #[test]
    fn too_few_reads_convert() {
        let mut c = ShadowCache::default();
        assert_eq!(reads(&mut c, 1, 0, 3, 400), vec![Plan::Convert; 3]);
        assert_eq!(c.read(1, 1, LEN, 10), Plan::Convert);
        assert_eq!(c.store(1), None);
    }

    #[test]
    fn crossing_the_bar_within_a_generation_makes_at_once() {
        let mut c = ShadowCache::default();
        assert_eq!(reads(&mut c, 1, 0, 3, 300), vec![Plan::Convert; 3]);
        // 4th read, 1200 elements of 1000.
        assert_eq!(make_if_asked(&mut c, 1, 0), Plan::Make);
        assert_eq!(reads(&mut c, 1, 0, 2, 300), vec![Plan::Use; 2]);
    }

    #[test]
    fn new_generation_misses_and_remakes_in_place() {
        let mut c = ShadowCache::default();
        reads(&mut c, 1, 0, 4, LEN / 4);
        make_if_asked(&mut c, 1, 1);
        reads(&mut c, 1, 1, 4, LEN / 4);
        // Written (gen 2) without updating the shadow: stale, made again into the same storage.
        assert_eq!(make_if_asked(&mut c, 1, 2), Plan::Make);
        assert_eq!(c.store(1), Some(&1));
        assert_eq!(c.read(1, 2, LEN, 10), Plan::Use);
        // A generation with no reads in between (several writes) still remakes from the last read one.
        reads(&mut c, 1, 2, 3, LEN);
        assert_eq!(c.read(1, 5, LEN, 10), Plan::Make);
    }

    #[test]
    fn rewrite_with_the_shadow_keeps_it_valid() {
        let mut c = ShadowCache::default();
        reads(&mut c, 1, 0, 4, LEN);
        make_if_asked(&mut c, 1, 1);
        c.rewritten(1, 2, true);
        assert_eq!(c.read(1, 2, LEN, 10), Plan::Use);
        c.rewritten(1, 3, false);
        // Not written by the kernel: stale; gen 2 had one read, so no remake either.
        assert_eq!(c.read(1, 3, LEN, 10), Plan::Convert);
        assert_eq!(c.stats().fused, 1);
        // A rewrite of a buffer without a shadow changes nothing.
        c.rewritten(9, 1, true);
        assert_eq!(c.store(9), None);
        assert_eq!(c.stats().fused, 1);
    }

    #[test]
    fn buffers_read_rarely_or_in_small_parts_get_none() {
        let mut c = ShadowCache::default();
        // Read once per generation (an activation used as a weight).
        for gen in 0..10 {
            assert_eq!(c.read(2, gen, LEN, LEN), Plan::Convert);
        }
        // Read often, but only a small part of it: converting it whole would cost more.
        for gen in 0..10 {
            assert!(reads(&mut c, 3, gen, 8, LEN / 10).iter().all(|&p| p == Plan::Convert));
        }
        assert_eq!(c.store(2), None);
        assert_eq!(c.store(3), None);
    }

    #[test]
    fn least_recently_read_shadow_is_evicted() {
        let mut c = ShadowCache::default();
        let ids: Vec<u64> = (10..10 + MAX_SHADOWS as u64 + 1).collect();
        for &id in &ids {
            reads(&mut c, id, 0, 4, LEN);
        }
        for &id in &ids[..MAX_SHADOWS] {
            assert_eq!(make_if_asked(&mut c, id, 1), Plan::Make);
        }
        // Read the first again: the second is now the least recently read.
        assert_eq!(c.read(ids[0], 1, LEN, 1), Plan::Use);
        let last = *ids.last().unwrap();
        assert_eq!(c.read(last, 1, LEN, LEN), Plan::Make);
        assert_eq!(c.insert(last, last as u32), Some(ids[1] as u32));
        c.made(last, 1);
        assert_eq!(c.store(ids[1]), None);
        assert_eq!(c.read(last, 1, LEN, 1), Plan::Use);
        assert_eq!(c.read(ids[0], 1, LEN, 1), Plan::Use);
        // The evicted one is made again from its counts (stale entries are only memory).
        assert_eq!(c.read(ids[1], 1, LEN, 1), Plan::Make);
    }

    #[test]
    fn read_counts_are_bounded() {
        let mut c: ShadowCache<u32> = ShadowCache::default();
        for id in 0..(3 * MAX_TRACKED as u64) {
            c.read(id, 0, LEN, LEN);
        }
        assert_eq!(c.reads.len(), MAX_TRACKED);
    }

    #[test]
    fn failed_make_leaves_nothing() {
        let mut c = ShadowCache::default();
        reads(&mut c, 1, 0, 4, LEN);
        assert_eq!(c.read(1, 1, LEN, LEN), Plan::Make);
        c.insert(1, 7);
        assert_eq!(c.forget(1), Some(7));
        assert_eq!(c.read(1, 1, LEN, LEN), Plan::Make);
        assert_eq!(c.stats().made, 0);
    }
}
