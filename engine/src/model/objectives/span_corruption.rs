//! T5's span corruption: about `noise_density` of a sequence's tokens, in spans of mean length
//! `mean_span`, are cut out. The encoder input keeps the rest with one sentinel per span; the
//! target lists each sentinel followed by the tokens it replaced, then a closing sentinel.
//! Sentinels come from the top of the vocabulary (the k-th span gets `vocab_size - 1 - k`).
//! As in T5's `random_spans_noise_mask`: `round(len * density)` noise tokens in
//! `round(noise / mean_span)` spans; noise and kept tokens are each split into that many
//! non-empty runs at uniformly random cut points, alternating kept/noise, kept first.

use crate::error::ConfigError;
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SpanCorruptionConfig {
    pub vocab_size: u32,
    pub noise_density: f64,
    pub mean_span: f64,
    /// How many sentinel ids the top of the vocabulary reserves; more spans is an error.
    pub sentinels: u32,
}

impl SpanCorruptionConfig {
    /// T5's defaults: 15% noise, mean span 3, 100 sentinels.
    pub fn t5(vocab_size: u32) -> Self {
        SpanCorruptionConfig { vocab_size, noise_density: 0.15, mean_span: 3.0, sentinels: 100 }
    }

    pub fn sentinel(&self, k: u32) -> u32 {
        self.vocab_size - 1 - k
    }
    pub fn is_sentinel(&self, id: u32) -> bool {
        id < self.vocab_size && id >= self.vocab_size - self.sentinels
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.noise_density > 0.0 && self.noise_density < 1.0) {
            return Err(ConfigError::new("noise_density", format!("{} is outside (0, 1)", self.noise_density)));
        }
        if !(self.mean_span >= 1.0) {
            return Err(ConfigError::new("mean_span", format!("{} must be at least 1", self.mean_span)));
        }
        if self.sentinels == 0 || self.sentinels >= self.vocab_size {
            return Err(ConfigError::new("sentinels", format!("{} must be in 1..{}", self.sentinels, self.vocab_size)));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanCorruption {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// Which original tokens were noise.
    pub noise: Vec<bool>,
}

/// Cut `n` items into `m` non-empty runs at uniformly random points: run lengths.
fn random_segmentation(n: usize, m: usize, rng: &mut Rng) -> Vec<usize> {
    debug_assert!(m >= 1 && m <= n);
    // choose m - 1 distinct cut positions among the n - 1 gaps (partial Fisher-Yates)
    let mut gaps: Vec<usize> = (1..n).collect();
    for i in 0..m - 1 {
        let j = i + rng.below((gaps.len() - i) as u64) as usize;
        gaps.swap(i, j);
    }
    let mut cuts: Vec<usize> = gaps[..m - 1].to_vec();
    cuts.sort_unstable();
    cuts.push(n);
    let mut prev = 0;
    let mut runs = Vec::with_capacity(m);
    for &c in &cuts {
        runs.push(c - prev);
        prev = c;
    }
    runs
}

/// Corrupts one sequence (no padding in it). Sequences too short for one noise token and one
/// kept token come back unchanged with an empty-span target (just the closing sentinel).
pub fn corrupt_spans(tokens: &[u32], cfg: &SpanCorruptionConfig, rng: &mut Rng) -> Result<SpanCorruption, ConfigError> {
    let len = tokens.len();
    if let Some(&bad) = tokens.iter().find(|&&t| cfg.is_sentinel(t)) {
        return Err(ConfigError::new("tokens", format!("token {bad} is a sentinel id; sentinels are the top {} ids", cfg.sentinels)));
    }
    let num_noise = ((len as f64 * cfg.noise_density).round() as usize).clamp(1, len.saturating_sub(1).max(1));
    if len < 2 {
        return Ok(SpanCorruption { inputs: tokens.to_vec(), targets: vec![cfg.sentinel(0)], noise: vec![false; len] });
    }
    let num_spans = ((num_noise as f64 / cfg.mean_span).round() as usize).clamp(1, num_noise.min(len - num_noise));
    if num_spans as u32 >= cfg.sentinels {
        return Err(ConfigError::new("sentinels", format!("a sequence of {len} tokens needs {} sentinels, only {} reserved", num_spans + 1, cfg.sentinels)));
    }
    let noise_runs = random_segmentation(num_noise, num_spans, rng);
    let kept_runs = random_segmentation(len - num_noise, num_spans, rng);
    let mut noise = Vec::with_capacity(len);
    for (k, n) in kept_runs.iter().zip(&noise_runs) {
        noise.extend(std::iter::repeat_n(false, *k));
        noise.extend(std::iter::repeat_n(true, *n));
    }
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut span = 0u32;
    for i in 0..len {
        if noise[i] {
            if i == 0 || !noise[i - 1] {
                inputs.push(cfg.sentinel(span));
                targets.push(cfg.sentinel(span));
                span += 1;
            }
            targets.push(tokens[i]);
        } else {
            inputs.push(tokens[i]);
        }
    }
    targets.push(cfg.sentinel(span));
    Ok(SpanCorruption { inputs, targets, noise })
}

/// The original sequence from an input and its target: each sentinel in the input is replaced
/// by what follows the same sentinel in the target. `None` if they do not fit together.
pub fn reconstruct(inputs: &[u32], targets: &[u32], cfg: &SpanCorruptionConfig) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for &t in inputs {
        if !cfg.is_sentinel(t) {
            out.push(t);
            continue;
        }
        let at = targets.iter().position(|&x| x == t)?;
        out.extend(targets[at + 1..].iter().take_while(|&&x| !cfg.is_sentinel(x)));
    }
    Some(out)
}
