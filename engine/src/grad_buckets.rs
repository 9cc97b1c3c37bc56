//! Gradient buckets for all-reduce overlapped with the backward pass (PyTorch DDP's idea).
//!
//! The backward pass reports each range of the flat gradient buffer as soon as no later op
//! writes it (a GPT block's parameters once that block's backward is done: the blocks are
//! contiguous in the buffer and finish from the last to the first). Adjacent ranges are merged
//! until a bucket holds at least `min_floats` values; a full bucket is handed to the collective
//! at once, which averages it in the background while the backward pass goes on. Every rank
//! builds the same buckets in the same order, since they follow the model's structure only.

use std::ops::Range;

use crate::backend::Backend;
use crate::collective::{Collective, CollectiveError};
use crate::error::EngineError;
use crate::model::gpt::ReadyFn;

/// DDP's default bucket: 25 MiB of f32.
pub const DEFAULT_BUCKET_FLOATS: usize = 25 * 1024 * 1024 / 4;

#[derive(Debug)]
pub struct GradBuckets {
    min_floats: usize,
    /// Final values not yet in a started bucket (one contiguous range).
    pending: Option<Range<usize>>,
}

impl GradBuckets {
    pub fn new(min_floats: usize) -> GradBuckets {
        GradBuckets { min_floats: min_floats.max(1), pending: None }
    }

    /// `range` is final. Returns the buckets to start now, in order: the pending range when
    /// `range` does not touch it, and the merged range once it is full.
    pub fn ready(&mut self, range: Range<usize>) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        if range.is_empty() {
            return out;
        }
        self.pending = Some(match self.pending.take() {
            None => range,
            Some(p) if range.end == p.start => range.start..p.end,
            Some(p) if p.end == range.start => p.start..range.end,
            Some(p) => {
                out.push(p);
                range
            }
        });
        if self.pending.as_ref().is_some_and(|p| p.len() >= self.min_floats) {
            out.extend(self.pending.take());
        }
        out
    }

    /// The backward pass is over: what is left, as a last bucket.
    pub fn finish(&mut self) -> Option<Range<usize>> {
        self.pending.take()
    }
}

/// A model's backward pass with its gradient averaged over `collective`: when the collective
/// overlaps (`Collective::overlaps_backward`) and `bucket_floats` > 0, `pass` runs with a
/// `ready` callback that starts averaging each bucket of final ranges at once (the model's
/// `backward_overlapped`), the last bucket follows the pass, and every reduction is waited
/// for; otherwise `plain` runs the pass and one all-reduce of the whole buffer follows.
/// `grads` gives the backend and the flat gradient buffer (its first `total` values).
pub fn backward_and_average<B: Backend, M>(
    model: &mut M,
    collective: &mut dyn Collective<B>,
    bucket_floats: usize,
    pass: impl FnOnce(&mut M, &mut ReadyFn<'_, B>) -> Result<(), EngineError>,
    grads: impl Fn(&mut M) -> (&B, &mut B::Buf),
    total: usize,
) -> Result<(), EngineError> {
    if !collective.overlaps_backward() || bucket_floats == 0 {
        pass(model, &mut |_, _, _| {})?;
        let (be, g) = grads(model);
        collective.all_reduce_mean(be, be.view_mut(g, 0..total))?;
        return Ok(());
    }
    let mut buckets = GradBuckets::new(bucket_floats);
    let mut started: Result<(), CollectiveError> = Ok(());
    // Starts one bucket unless an earlier one failed (the ring is broken then).
    let mut start = |be: &B, g: &mut B::Buf, r: Range<usize>| {
        if started.is_ok() {
            // SAFETY: the model reports a range only when no later op of the pass writes it
            // (its `backward_overlapped` contract), nothing else touches the gradients before
            // wait_all below, and the buffer lives in the model, which outlives this call.
            started = unsafe { collective.start_all_reduce_mean(be, be.view_mut(g, r)) };
        }
    };
    let done = pass(model, &mut |be, g, range| {
        for bucket in buckets.ready(range) {
            start(be, g, bucket);
        }
    });
    let (be, g) = grads(model);
    if let Some(bucket) = buckets.finish() {
        start(be, g, bucket);
    }
    // Always wait, even after an error: nothing may still work on the buffer on return.
    let waited = collective.wait_all(be);
    done?;
    started?;
    waited?;
    Ok(())
}

/// What a backward pass has not reported yet once it is over: the parts of `0..total` outside
/// every range in `reported`, from the last to the first (so that they merge into buckets as
/// the reported ones do). A model reports the ranges that become final early (its layers) and
/// the rest (embeddings, heads: written again near the end) through this.
pub fn unreported(total: usize, reported: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut sorted: Vec<Range<usize>> = reported.iter().filter(|r| !r.is_empty()).cloned().collect();
    sorted.sort_by_key(|r| r.start);
    let mut rest = Vec::new();
    let mut at = 0;
    for r in sorted {
        if r.start > at {
            rest.push(at..r.start);
        }
        at = at.max(r.end);
    }
    if at < total {
        rest.push(at..total);
    }
    rest.reverse();
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreported_is_the_complement_from_the_end() {
        assert_eq!(unreported(100, &[40..60, 10..20, 60..70]), vec![70..100, 20..40, 0..10]);
        assert_eq!(unreported(10, &[0..10]), Vec::<Range<usize>>::new());
        assert_eq!(unreported(10, &[]), vec![0..10]);
    }

    #[test]
    fn merges_adjacent_ranges_from_the_end_until_full() {
        let mut b = GradBuckets::new(10);
        assert!(b.ready(94..100).is_empty()); // ln_f: 6 pending
        assert_eq!(b.ready(84..94), vec![84..100]); // the last block fills it: started
        assert!(b.ready(80..84).is_empty());
        assert_eq!(b.finish(), Some(80..84));
        assert_eq!(b.finish(), None);
    }

    #[test]
    fn a_gap_starts_a_new_bucket_and_flushes_the_old_one_first() {
        let mut b = GradBuckets::new(100);
        assert!(b.ready(50..60).is_empty());
        assert_eq!(b.ready(0..10), vec![50..60]);
        assert_eq!(b.ready(10..20), Vec::<Range<usize>>::new());
        assert_eq!(b.finish(), Some(0..20));
    }

    #[test]
    fn every_value_is_in_exactly_one_bucket() {
        // GPT-like: embeddings 0..30, blocks of 17 from 30, ln_f at the end; reported ln_f,
        // blocks last to first, embeddings.
        let blocks: Vec<Range<usize>> = (0..5).map(|i| 30 + 17 * i..30 + 17 * (i + 1)).collect();
        let total = 30 + 17 * 5 + 4;
        for min in [1, 16, 40, 1000] {
            let mut b = GradBuckets::new(min);
            let mut got = b.ready(total - 4..total);
            for r in blocks.iter().rev() {
                got.extend(b.ready(r.clone()));
            }
            got.extend(b.ready(0..30));
            got.extend(b.finish());
            let mut seen = vec![0; total];
            for r in &got {
                assert!(r.len() >= min.min(r.len()));
                for i in r.clone() {
                    seen[i] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "min {min}: {got:?}");
            // every bucket but the last reaches the minimum
            for r in &got[..got.len() - 1] {
                assert!(r.len() >= min, "min {min}: {got:?}");
            }
        }
    }
}
