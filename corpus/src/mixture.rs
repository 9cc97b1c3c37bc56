//! The sample order of a data mixture: several corpora drawn in fixed proportions
//! (`[[data.mix]]` with weights), still a pure function of (corpora, weights, seed, global
//! batch), so a resume from step `s` alone is exact, with any world size.
//!
//! Step `s` takes `G` samples. After `s` steps source `j` has given
//! `C_j(s) = floor(s G w_j) + [j < R(s)]` of them, where `w` are the normalised weights and
//! `R(s) = s G - sum_j floor(s G w_j)` (fewer than the number of sources) hands the rounding
//! remainder to the first sources. So every step takes exactly `G`, each source's share never
//! drifts by more than one sample from `s G w_j`, and `C_j` never decreases as long as
//! `G w_j >= 1` (checked: a source must give at least one sample per step on average). The
//! shares are computed exactly, in integers: `w_j = q_j / Q` with `Q = G 2^32` and
//! `sum q_j = Q` (the weights' cumulative sums rounded), so one sample per step is exactly
//! `q_j = 2^32`; a share within 1e-9 below that counts as exactly one (the difference taken from
//! the largest source), so the bound holds for every step and no rounding decides a boundary
//! case. In step `s`
//! source `j` gives its draws `C_j(s) .. C_j(s+1)` of its own endless shuffled stream
//! ([`SampleOrder`]: a new permutation each time it is used up, so a small source weighted up
//! repeats epoch after epoch); the step's samples are laid out source after source and then
//! permuted by a seeded per-step permutation, so every rank's slice mixes the sources.
//!
//! A sample is named by one u64: its source in the top 16 bits, its sequence in that source
//! below ([`MixtureOrder::encode`]).

use crate::sample_order::{SampleOrder, SampleOrderError};

/// Bits of a sample id that hold the sequence index within its source.
const LOCAL_BITS: u32 = 48;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MixtureError {
    #[error("a mixture needs at least one source")]
    Empty,
    #[error("source {index}: weight {weight} is not a positive finite number")]
    BadWeight { index: usize, weight: f64 },
    #[error("source {index}: weight {weight} of {total} gives {per_step:.3} of the {global_batch} sequences of a step; each source needs at least 1 per step (raise its weight or the global batch)")]
    TooSmall { index: usize, weight: f64, total: f64, per_step: f64, global_batch: u64 },
    #[error("source {index}: {error}")]
    Order { index: usize, error: SampleOrderError },
    #[error("source {index}: {n} sequences do not fit in a sample id ({LOCAL_BITS} bits)")]
    TooLarge { index: usize, n: u64 },
    #[error("at most {max} sources", max = 1u32 << (64 - LOCAL_BITS))]
    TooMany,
    #[error("global batch must be at least 1")]
    ZeroBatch,
}

/// The denominator of the integer shares per sample of a step: `Q = G * UNIT`.
const UNIT: u128 = 1 << 32;
/// A share this close below one sample per step counts as one (f64 rounding of the weights).
const PER_STEP_SLACK: f64 = 1e-9;

#[derive(Clone, Debug)]
pub struct MixtureOrder {
    orders: Vec<SampleOrder>,
    /// Integer shares of `G * UNIT`, summing to it.
    shares: Vec<u128>,
    global_batch: u64,
    seed: u64,
}

impl MixtureOrder {
    /// Sources of `n_sequences[j]` sequences with `weights[j]` (any positive scale).
    pub fn new(n_sequences: &[u64], weights: &[f64], seed: u64, global_batch: u64) -> Result<Self, MixtureError> {
        if n_sequences.is_empty() {
            return Err(MixtureError::Empty);
        }
        if n_sequences.len() > 1 << (64 - LOCAL_BITS) {
            return Err(MixtureError::TooMany);
        }
        if global_batch == 0 {
            return Err(MixtureError::ZeroBatch);
        }
        assert_eq!(n_sequences.len(), weights.len(), "one weight per source");
        if let Some((index, &weight)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w > 0.0)) {
            return Err(MixtureError::BadWeight { index, weight });
        }
        let total: f64 = weights.iter().sum();
        for (index, &weight) in weights.iter().enumerate() {
            let per_step = weight / total * global_batch as f64;
            if per_step < 1.0 - PER_STEP_SLACK {
                return Err(MixtureError::TooSmall { index, weight, total, per_step, global_batch });
            }
        }
        let shares = integer_shares(weights, global_batch);
        let orders = n_sequences
            .iter()
            .enumerate()
            .map(|(index, &n)| {
                if n >= 1 << LOCAL_BITS {
                    return Err(MixtureError::TooLarge { index, n });
                }
                // each source its own stream: the seed mixed with the source's position
                SampleOrder::try_new(n, seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).map_err(|error| MixtureError::Order { index, error })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MixtureOrder { orders, shares, global_batch, seed })
    }

    pub fn sources(&self) -> usize {
        self.orders.len()
    }

    /// Samples source `j` has given after `steps` steps: `C_j(steps)`, exactly.
    pub fn drawn(&self, j: usize, steps: u64) -> u64 {
        self.drawn_all(steps)[j]
    }

    /// `C_j(steps)` of every source: `floor(s G q_j / (G UNIT)) = floor(s q_j / UNIT)` plus the
    /// remainder's share.
    fn drawn_all(&self, steps: u64) -> Vec<u64> {
        let n = steps as u128 * self.global_batch as u128;
        let mut c: Vec<u128> = self.shares.iter().map(|&q| steps as u128 * q / UNIT).collect();
        let remainder = n - c.iter().sum::<u128>();
        for (j, x) in c.iter_mut().enumerate() {
            *x += u128::from((j as u128) < remainder);
        }
        c.into_iter().map(|x| x as u64).collect()
    }

    /// The sample at global position `k` (step `k / G`, position `k % G` in it) as an id.
    pub fn sequence_at(&self, k: u64) -> u64 {
        let g = self.global_batch;
        let (step, p) = (k / g, k % g);
        // the position in the step's source-after-source layout
        let q = SampleOrder::new(g, self.seed ^ 0x6d69_7874_7572_6521).epoch(step).apply(p);
        let (before, after) = (self.drawn_all(step), self.drawn_all(step + 1));
        let mut offset = 0;
        for j in 0..self.orders.len() {
            let (from, to) = (before[j], after[j]);
            let count = to - from;
            if q < offset + count {
                return Self::encode(j, self.orders[j].sequence_at(from + (q - offset)));
            }
            offset += count;
        }
        unreachable!("a step's counts add up to the global batch")
    }

    /// A sample id: `source` in the top bits, `local` (its sequence index) below.
    pub fn encode(source: usize, local: u64) -> u64 {
        debug_assert!(local < 1 << LOCAL_BITS);
        ((source as u64) << LOCAL_BITS) | local
    }

    /// (source, sequence index) of a sample id.
    pub fn decode(id: u64) -> (usize, u64) {
        ((id >> LOCAL_BITS) as usize, id & ((1 << LOCAL_BITS) - 1))
    }
}

/// The weights as integer shares of `Q = G * UNIT` summing to `Q` (cumulative sums rounded),
/// each at least `UNIT`, i.e. one sample per step: a share the f64 check let through at most
/// `PER_STEP_SLACK` below that is raised to it, the difference taken from the largest share.
fn integer_shares(weights: &[f64], global_batch: u64) -> Vec<u128> {
    #[allow(non_snake_case)]
    let Q = global_batch as u128 * UNIT;
    let total: f64 = weights.iter().sum();
    let mut cumulative = 0.0;
    let mut previous = 0u128;
    let mut shares: Vec<u128> = weights
        .iter()
        .enumerate()
        .map(|(j, w)| {
            cumulative += w / total;
            let bound = if j + 1 == weights.len() { Q } else { ((cumulative * Q as f64).round() as u128).clamp(previous, Q) };
            let q = bound - previous;
            previous = bound;
            q
        })
        .collect();
    // raise every share below one sample per step to it, taking the difference from the
    // shares above it (they hold at least that much: the shares sum to G samples' worth, and
    // there are at most G sources, each owed at most one)
    let mut lack: u128 = shares.iter().map(|&q| UNIT.saturating_sub(q)).sum();
    for q in shares.iter_mut() {
        *q = (*q).max(UNIT);
    }
    while lack > 0 {
        let largest = (0..shares.len()).max_by_key(|&i| shares[i]).expect("sources");
        let spare = shares[largest] - UNIT;
        assert!(spare > 0, "the shares sum to G samples per step, so one is above one sample");
        let take = spare.min(lack);
        shares[largest] -= take;
        lack -= take;
    }
    debug_assert_eq!(shares.iter().sum::<u128>(), Q);
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_takes_the_global_batch_in_the_weights_proportions() {
        let m = MixtureOrder::new(&[1000, 37, 500], &[5.0, 2.0, 3.0], 42, 16).unwrap();
        let mut counts = [0u64; 3];
        for step in 0..200u64 {
            let mut in_step = [0u64; 3];
            for k in step * 16..(step + 1) * 16 {
                in_step[MixtureOrder::decode(m.sequence_at(k)).0] += 1;
            }
            assert_eq!(in_step.iter().sum::<u64>(), 16);
            for j in 0..3 {
                counts[j] += in_step[j];
                assert_eq!(counts[j], m.drawn(j, step + 1), "source {j} after step {step}");
                // never more than one sample from the exact share
                let exact = (step + 1) as f64 * 16.0 * [0.5, 0.2, 0.3][j];
                assert!((counts[j] as f64 - exact).abs() <= 1.0 + 1e-9, "source {j}: {} vs {exact}", counts[j]);
            }
        }
    }

    #[test]
    fn each_source_draws_its_own_stream_without_repeats_within_an_epoch() {
        let (n0, n1) = (300u64, 20u64);
        let m = MixtureOrder::new(&[n0, n1], &[1.0, 1.0], 7, 8).unwrap();
        let mut seen: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
        for k in 0..8 * 60 {
            let (j, local) = MixtureOrder::decode(m.sequence_at(k));
            seen[j].push(local);
        }
        // source 1 (20 sequences, half the mixture) ran through 12 epochs: each a permutation
        assert_eq!(seen[1].len(), 240);
        let mut per_step_order: Vec<u64> = Vec::new();
        for step in 0..60u64 {
            // within a step the layout is permuted, so compare as sets per step
            let mut s: Vec<u64> = (step * 8..(step + 1) * 8)
                .map(|k| MixtureOrder::decode(m.sequence_at(k)))
                .filter(|(j, _)| *j == 1)
                .map(|(_, l)| l)
                .collect();
            s.sort();
            let order = SampleOrder::new(n1, 7 ^ 0x9E37_79B9_7F4A_7C15);
            let from = m.drawn(1, step);
            let mut want: Vec<u64> = (from..m.drawn(1, step + 1)).map(|d| order.sequence_at(d)).collect();
            want.sort();
            assert_eq!(s, want, "step {step}");
            per_step_order.extend(s);
        }
        for epoch in seen[1].chunks(20) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, (0..20).collect::<Vec<_>>());
        }
        let mut first: Vec<u64> = seen[0].clone();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), seen[0].len(), "240 draws of 300 sequences: no repeat in the first epoch");
    }

    #[test]
    fn the_order_is_a_pure_function_and_mixes_every_slice() {
        let a = MixtureOrder::new(&[100, 100], &[0.75, 0.25], 3, 32).unwrap();
        let b = MixtureOrder::new(&[100, 100], &[3.0, 1.0], 3, 32).unwrap();
        for k in (0..32 * 50).step_by(7) {
            assert_eq!(a.sequence_at(k), b.sequence_at(k), "weights are proportions");
        }
        // a rank's quarter of a step holds both sources in most steps (not one block each)
        let mixed = (0..50u64)
            .filter(|s| {
                let srcs: std::collections::HashSet<usize> = (s * 32..s * 32 + 8).map(|k| MixtureOrder::decode(a.sequence_at(k)).0).collect();
                srcs.len() == 2
            })
            .count();
        assert!(mixed > 35, "{mixed} of 50 first-rank slices mix both sources");
        let other_seed = MixtureOrder::new(&[100, 100], &[0.75, 0.25], 4, 32).unwrap();
        assert!((0..64).any(|k| other_seed.sequence_at(k) != a.sequence_at(k)));
    }

    #[test]
    fn bad_mixtures_are_refused_naming_the_source() {
        assert_eq!(MixtureOrder::new(&[], &[], 0, 8).unwrap_err(), MixtureError::Empty);
        assert!(matches!(MixtureOrder::new(&[5, 5], &[1.0, 0.0], 0, 8).unwrap_err(), MixtureError::BadWeight { index: 1, .. }));
        assert!(matches!(MixtureOrder::new(&[5, 5], &[1.0, f64::NAN], 0, 8).unwrap_err(), MixtureError::BadWeight { index: 1, .. }));
        let e = MixtureOrder::new(&[5, 5], &[0.95, 0.05], 0, 8).unwrap_err();
        assert!(matches!(e, MixtureError::TooSmall { index: 1, .. }), "{e:?}");
        assert!(e.to_string().contains("0.400 of the 8 sequences"), "{e}");
        assert!(matches!(MixtureOrder::new(&[5, 0], &[1.0, 1.0], 0, 8).unwrap_err(), MixtureError::Order { index: 1, .. }));
    }

    #[test]
    fn shares_of_exactly_one_sample_per_step_are_accepted_and_exact() {
        // each of these gives some source exactly one sequence per step in real numbers, which
        // f64 may round either side of 1
        for (weights, g) in [
            (vec![0.3; 5], 5u64),
            (vec![0.1; 16], 16),
            (vec![0.62, 0.03, 0.05, 0.26], 32),
            (vec![1.0, 2.0, 7.0], 10),
        ] {
            let n = vec![50u64; weights.len()];
            let m = MixtureOrder::new(&n, &weights, 1, g).unwrap_or_else(|e| panic!("{weights:?} G={g}: {e}"));
            let total: f64 = weights.iter().sum();
            for step in [0u64, 1, 2, 3, 1000, 123_456_789, 1 << 40] {
                let counts: Vec<u64> = (0..weights.len()).map(|j| m.drawn(j, step + 1) - m.drawn(j, step)).collect();
                assert_eq!(counts.iter().sum::<u64>(), g, "{weights:?} step {step}");
                for (j, w) in weights.iter().enumerate() {
                    // a step's count is the difference of two running totals each within one of
                    // exact: within two of the share (and never negative: `drawn` never decreases)
                    let share = w / total * g as f64;
                    assert!((counts[j] as f64 - share).abs() < 2.0, "{weights:?} step {step}: {counts:?}");
                    // C_j(s) stays within one sample of s G w_j
                    let exact = (step + 1) as f64 * g as f64 * w / total;
                    assert!((m.drawn(j, step + 1) as f64 - exact).abs() <= 1.0 + exact * 1e-9, "{weights:?} step {step} source {j}");
                }
            }
            for k in (0..g * 40).step_by(3) {
                let (j, _) = MixtureOrder::decode(m.sequence_at(k));
                assert!(j < weights.len());
            }
        }
        // as many sources as sequences per step, weights equal but for f64 noise: every share is
        // one sample, none may be taken from another
        for (weights, g) in [(vec![1.0, 1.0, 0.999999999], 3u64), (vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.9999999995], 8)] {
            let n = vec![10u64; weights.len()];
            let m = MixtureOrder::new(&n, &weights, 2, g).unwrap_or_else(|e| panic!("{weights:?}: {e}"));
            for step in 0..50u64 {
                for j in 0..weights.len() {
                    assert_eq!(m.drawn(j, step + 1) - m.drawn(j, step), 1, "{weights:?} step {step} source {j}");
                }
            }
        }
        // a share clearly below one per step is refused
        assert!(MixtureOrder::new(&[5, 5, 5], &[0.62, 0.029, 0.351], 0, 32).is_err());
    }

    #[test]
    fn ids_round_trip() {
        for (j, l) in [(0usize, 0u64), (3, 12345), (65535, (1 << 48) - 1)] {
            assert_eq!(MixtureOrder::decode(MixtureOrder::encode(j, l)), (j, l));
        }
    }
}
