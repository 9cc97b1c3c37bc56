//! Batches from one token stream: random windows for training, fixed windows for evaluation.

use crate::rng::Rng;

/// A token stream cut into (input, target) windows of `seq_len`, targets shifted by one.
pub struct TokenWindows<'a> {
    tokens: &'a [u32],
}

/// One batch, rows back to back: inputs (B, T) and next-token targets (B, T).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch: usize,
    pub seq_len: usize,
}

impl<'a> TokenWindows<'a> {
    pub fn new(tokens: &'a [u32]) -> Self {
        TokenWindows { tokens }
    }

    /// Number of distinct window starts for this sequence length.
    pub fn starts(&self, seq_len: usize) -> usize {
        self.tokens.len().saturating_sub(seq_len)
    }

    fn window(&self, start: usize, t: usize, b: &mut Batch) {
        b.inputs.extend_from_slice(&self.tokens[start..start + t]);
        b.targets.extend_from_slice(&self.tokens[start + 1..start + t + 1]);
    }

    /// `batch` windows at uniformly random starts drawn from `rng`.
    pub fn random_batch(&self, rng: &mut Rng, batch: usize, seq_len: usize) -> Batch {
        let n = self.starts(seq_len);
        assert!(n > 0, "a stream of {} tokens holds no window of {}", self.tokens.len(), seq_len + 1);
        let mut b = Batch { inputs: Vec::with_capacity(batch * seq_len), targets: Vec::with_capacity(batch * seq_len), batch, seq_len };
        for _ in 0..batch {
            let start = rng.below(n as u64) as usize;
            self.window(start, seq_len, &mut b);
        }
        b
    }

    /// Evaluation batch `i` of a fixed set: windows evenly spread over the stream, the same
    /// for every run so validation losses compare.
    pub fn eval_batch(&self, i: usize, n_batches: usize, batch: usize, seq_len: usize) -> Batch {
        let n = self.starts(seq_len);
        assert!(n > 0, "a stream of {} tokens holds no window of {}", self.tokens.len(), seq_len + 1);
        let total = n_batches * batch;
        let mut b = Batch { inputs: Vec::with_capacity(batch * seq_len), targets: Vec::with_capacity(batch * seq_len), batch, seq_len };
        for r in 0..batch {
            let k = i * batch + r;
            let start = (k * n) / total.max(1);
            self.window(start.min(n - 1), seq_len, &mut b);
        }
        b
    }
}
