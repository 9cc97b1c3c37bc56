//! The data plan: which training sequence every rank reads at every step, as a pure function
//! shared by the coordinator and the workers (no state to ship, nothing to save but the step).
//!
//! - [`SampleOrder`]: the endless stream of sequence indices. Sample `k` belongs to epoch
//!   `e = k / n` at position `p = k % n` and is `perm_e[p]`, where `perm_e` is a seeded
//!   permutation of `0..n` drawn afresh for every epoch. The permutation is never materialised:
//!   `perm_e[p]` is computed from `(seed, e, p)` alone by a keyed Feistel network (see below), so
//!   `sequence_at` costs the same for a thousand sequences or for billions, and any rank can jump
//!   to any step of any epoch.
//! - [`rank_slice`]: the global sample indices rank `r` of `W` consumes at step `s` with a global
//!   batch of `G` sequences: `[s*G + r*G/W, s*G + (r+1)*G/W)`. The slices of all ranks tile
//!   `[s*G, (s+1)*G)`, so the samples seen after `S` steps do not depend on `W`: a run can resume
//!   on a different number of workers and read exactly the data it would have read.
//! - [`Sequences`]: a token stream cut into training sequences of `seq_len` inputs plus the one
//!   token that follows (the last target).
//!
//! ## The permutation
//!
//! Let `b` be the smallest number of bits with `2^b >= n`. A Feistel network over `b`-bit
//! integers is a bijection of `0..2^b` whatever its round function: each round splits `x` into
//! a high part `L` (`b - c` bits) and a low part `R` (`c` bits) and maps it to
//! `R << (b - c) | ((L ^ F(k_i, R)) mod 2^(b - c))`, which is undone by recomputing `F(k_i, R)`.
//! The split alternates between `floor(b/2)` and `ceil(b/2)` low bits, so odd `b` works without
//! padding the domain. The round function is the SplitMix64 finalizer of `R` mixed with a round
//! key; the [`ROUNDS`] round keys are derived from `(seed, epoch)` with the same mixer.
//! Values `>= n` are mapped again until one lands in `0..n` ("cycle walking"), which restricts
//! the bijection of `0..2^b` to a bijection of `0..n`; since `2^b < 2n` fewer than two
//! applications are needed on average.
//!
//! The construction is fixed: changing the mixer, the key schedule or the number of rounds
//! changes every data order, so it is part of the checkpoint format.

use std::ops::Range;

use thiserror::Error;

/// Feistel rounds per application.
pub const ROUNDS: usize = 8;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SampleOrderError {
    #[error("the sample order needs at least one sequence")]
    NoSequences,
    #[error("global batch {global_batch} is not divisible by the world size {world}")]
    Indivisible { global_batch: u64, world: u64 },
    #[error("invalid data plan: {0}")]
    Invalid(String),
}

/// SplitMix64's finalizer: a bijective 64-bit mixer (Stafford variant 13).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// The endless, epoch-by-epoch shuffled stream of sequence indices of a corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleOrder {
    n_sequences: u64,
    seed: u64,
}

impl SampleOrder {
    /// The order of `n_sequences` sequences under `seed`. Panics if `n_sequences` is 0 (see
    /// [`SampleOrder::try_new`]).
    pub fn new(n_sequences: u64, seed: u64) -> Self {
        Self::try_new(n_sequences, seed).expect("SampleOrder::new")
    }

    pub fn try_new(n_sequences: u64, seed: u64) -> Result<Self, SampleOrderError> {
        if n_sequences == 0 {
            return Err(SampleOrderError::NoSequences);
        }
        Ok(SampleOrder { n_sequences, seed })
    }

    pub fn n_sequences(&self) -> u64 {
        self.n_sequences
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The permutation of epoch `epoch`.
    pub fn epoch(&self, epoch: u64) -> EpochPermutation {
        EpochPermutation::new(self.n_sequences, self.seed, epoch)
    }

    /// The sequence index of sample `k` of the stream: `perm_{k / n}[k % n]`.
    pub fn sequence_at(&self, k: u64) -> u64 {
        let n = self.n_sequences;
        self.epoch(k / n).apply(k % n)
    }

    /// See [`rank_slice`].
    pub fn rank_slice(step: u64, global_batch: u64, rank: u64, world: u64) -> Result<Range<u64>, SampleOrderError> {
        rank_slice(step, global_batch, rank, world)
    }
}

/// One epoch's permutation of `0..n`, with its round keys computed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochPermutation {
    n: u64,
    bits: u32,
    keys: [u64; ROUNDS],
}

impl EpochPermutation {
    fn new(n: u64, seed: u64, epoch: u64) -> Self {
        assert!(n > 0, "a permutation of nothing");
        let bits = if n <= 1 { 0 } else { 64 - (n - 1).leading_zeros() };
        let epoch_key = mix64(mix64(seed ^ 0x5EED_0FDA_7A0D_E5ED) ^ mix64(epoch.wrapping_add(GOLDEN)));
        let mut keys = [0u64; ROUNDS];
        for (i, k) in keys.iter_mut().enumerate() {
            *k = mix64(epoch_key.wrapping_add(GOLDEN.wrapping_mul(i as u64 + 1)));
        }
        EpochPermutation { n, bits, keys }
    }

    /// One pass of the Feistel network over `0..2^bits`.
    fn feistel(&self, mut x: u64) -> u64 {
        let b = self.bits;
        let mut c = b / 2; // low ("right") bits this round
        for &k in &self.keys {
            let a = b - c; // high ("left") bits
            let l = x >> c;
            let r = x & mask(c);
            let f = mix64(r ^ k);
            // (L, R) -> (R, L ^ F(R)): R moves to the top, the new low part has `a` bits.
            x = if a == 0 { r } else { (r << a) | ((l ^ f) & mask(a)) };
            c = a;
        }
        x
    }

    /// `perm[p]` for `p < n`.
    pub fn apply(&self, p: u64) -> u64 {
        assert!(p < self.n, "position {p} outside a permutation of {}", self.n);
        if self.bits == 0 {
            return 0;
        }
        let mut x = self.feistel(p);
        while x >= self.n {
            x = self.feistel(x);
        }
        x
    }
}

/// The global sample indices rank `rank` of `world` consumes at step `step` when every step
/// takes `global_batch` samples: `[s*G + r*G/W, s*G + (r+1)*G/W)`. `G` must be a multiple of `W`.
pub fn rank_slice(step: u64, global_batch: u64, rank: u64, world: u64) -> Result<Range<u64>, SampleOrderError> {
    if world == 0 {
        return Err(SampleOrderError::Invalid("world size must be at least 1".into()));
    }
    if rank >= world {
        return Err(SampleOrderError::Invalid(format!("rank {rank} outside a world of {world}")));
    }
    if global_batch == 0 {
        return Err(SampleOrderError::Invalid("global batch must be at least 1".into()));
    }
    if global_batch % world != 0 {
        return Err(SampleOrderError::Indivisible { global_batch, world });
    }
    let per_rank = global_batch / world;
    let start = step
        .checked_mul(global_batch)
        .and_then(|s| s.checked_add(rank * per_rank))
        .ok_or_else(|| SampleOrderError::Invalid(format!("step {step} x global batch {global_batch} overflows u64")))?;
    let end = start
        .checked_add(per_rank)
        .ok_or_else(|| SampleOrderError::Invalid(format!("step {step} x global batch {global_batch} overflows u64")))?;
    Ok(start..end)
}

/// A token stream cut into training sequences: sequence `i` is
/// `tokens[i*seq_len .. i*seq_len + seq_len + 1]`, the first `seq_len` tokens are its inputs and
/// the last `seq_len` its targets (shifted by one). Consecutive sequences share one token.
#[derive(Clone, Copy, Debug)]
pub struct Sequences<'a> {
    tokens: &'a [u32],
    seq_len: usize,
}

impl<'a> Sequences<'a> {
    /// Panics if `seq_len` is 0.
    pub fn new(tokens: &'a [u32], seq_len: usize) -> Self {
        assert!(seq_len > 0, "Sequences: seq_len must be at least 1");
        Sequences { tokens, seq_len }
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of whole sequences: `(len - 1) / seq_len`.
    pub fn count(&self) -> u64 {
        (self.tokens.len().saturating_sub(1) / self.seq_len) as u64
    }

    /// Inputs and targets of sequence `i`. Panics if `i >= count()`.
    pub fn sequence(&self, i: u64) -> (&'a [u32], &'a [u32]) {
        assert!(i < self.count(), "sequence {i} outside a stream of {} sequences", self.count());
        let t = self.seq_len;
        let start = i as usize * t;
        (&self.tokens[start..start + t], &self.tokens[start + 1..start + t + 1])
    }

    /// The sequences `indices`, rows back to back: inputs `(B, T)` and targets `(B, T)`.
    /// Panics if an index is out of range.
    pub fn batch(&self, indices: impl Iterator<Item = u64>) -> (Vec<u32>, Vec<u32>) {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for i in indices {
            let (x, y) = self.sequence(i);
            inputs.extend_from_slice(x);
            targets.extend_from_slice(y);
        }
        (inputs, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashSet};

    fn epoch_values(o: &SampleOrder, e: u64) -> Vec<u64> {
        let n = o.n_sequences();
        (0..n).map(|p| o.sequence_at(e * n + p)).collect()
    }

    #[test]
    fn every_epoch_is_a_permutation() {
        for n in [1u64, 2, 3, 7, 8, 9, 1000, 1024, 1025] {
            for seed in [0u64, 1, 42] {
                let o = SampleOrder::new(n, seed);
                for e in 0..4 {
                    let mut v = epoch_values(&o, e);
                    v.sort_unstable();
                    assert_eq!(v, (0..n).collect::<Vec<_>>(), "n {n} seed {seed} epoch {e}");
                }
            }
        }
    }

    #[test]
    fn epochs_differ_and_orders_are_reproducible() {
        let o = SampleOrder::new(1000, 7);
        let e0 = epoch_values(&o, 0);
        let e1 = epoch_values(&o, 1);
        assert_ne!(e0, e1);
        assert_ne!(e0, (0..1000).collect::<Vec<_>>(), "not shuffled");
        assert_eq!(e0, epoch_values(&SampleOrder::new(1000, 7), 0));
        assert_ne!(e0, epoch_values(&SampleOrder::new(1000, 8), 0), "the seed matters");
        // small n: some epoch among the first few differs from epoch 0
        let o = SampleOrder::new(7, 3);
        let first = epoch_values(&o, 0);
        assert!((1..8).any(|e| epoch_values(&o, e) != first));
    }

    #[test]
    fn positions_are_spread_over_values() {
        // Over many epochs, every value shows up at a given position about equally often
        // (deterministic: the seeds are fixed).
        for n in [2u64, 3, 10] {
            let o = SampleOrder::new(n, 99);
            let epochs = 3000;
            for p in [0, n - 1] {
                let mut counts = vec![0u64; n as usize];
                for e in 0..epochs {
                    counts[o.sequence_at(e * n + p) as usize] += 1;
                }
                let expect = epochs / n;
                assert!(counts.iter().all(|&c| c > expect * 3 / 4 && c < expect * 5 / 4), "n {n} position {p}: {counts:?}");
            }
        }
    }

    #[test]
    fn huge_corpora_need_no_table() {
        let n = 3_000_000_000u64;
        let o = SampleOrder::new(n, 11);
        let vals: HashSet<u64> = (0..1000).map(|k| o.sequence_at(5 * n + k)).collect();
        assert_eq!(vals.len(), 1000);
        assert!(vals.iter().all(|&v| v < n));
        let o = SampleOrder::new(u64::MAX, 1);
        assert!(o.sequence_at(12345) < u64::MAX);
    }

    #[test]
    fn rank_slices_tile_each_step() {
        let g = 8;
        for w in [1u64, 2, 4] {
            for s in 0..5 {
                let mut next = s * g;
                for r in 0..w {
                    let sl = rank_slice(s, g, r, w).unwrap();
                    assert_eq!(sl.start, next);
                    assert_eq!(sl.end - sl.start, g / w);
                    next = sl.end;
                }
                assert_eq!(next, (s + 1) * g);
            }
        }
        assert_eq!(rank_slice(0, 6, 0, 4), Err(SampleOrderError::Indivisible { global_batch: 6, world: 4 }));
        assert!(rank_slice(0, 8, 4, 4).is_err());
        assert!(rank_slice(0, 8, 0, 0).is_err());
        assert!(rank_slice(u64::MAX, 8, 0, 1).is_err());
    }

    #[test]
    fn samples_seen_do_not_depend_on_world_size() {
        let o = SampleOrder::new(37, 5);
        let (g, steps) = (8u64, 11u64);
        let seen = |w: u64| -> Vec<u64> {
            let mut v = Vec::new();
            for s in 0..steps {
                for r in 0..w {
                    v.extend(rank_slice(s, g, r, w).unwrap().map(|k| o.sequence_at(k)));
                }
            }
            v.sort_unstable();
            v
        };
        assert_eq!(seen(1), seen(4));
        assert_eq!(seen(1), seen(2));
        let distinct: BTreeSet<u64> = seen(1).into_iter().collect();
        assert_eq!(distinct.len(), 37, "88 samples of 37 sequences cover all of them");
    }

    #[test]
    fn sequences_cut_the_stream() {
        let tokens: Vec<u32> = (0..23).collect();
        let s = Sequences::new(&tokens, 5);
        assert_eq!(s.count(), 4);
        assert_eq!(s.sequence(1), (&tokens[5..10], &tokens[6..11]));
        assert_eq!(s.sequence(3), (&tokens[15..20], &tokens[16..21]));
        let (x, y) = s.batch([3u64, 0].into_iter());
        assert_eq!(x, [15, 16, 17, 18, 19, 0, 1, 2, 3, 4]);
        assert_eq!(y, [16, 17, 18, 19, 20, 1, 2, 3, 4, 5]);
        assert_eq!(Sequences::new(&tokens[..21], 5).count(), 4);
        assert_eq!(Sequences::new(&tokens[..20], 5).count(), 3);
        assert_eq!(Sequences::new(&[], 5).count(), 0);
    }
}
