//! Task heads on a GPT's final hidden states (after `ln_f`), for fine-tuning.
//!
//! - Sequence classification ([`ClassificationHead`]): pool the hidden state of each sequence's
//!   last real (non-pad) token (the only position a causal model lets see the whole text), a
//!   linear map C -> num_labels, softmax cross-entropy against the label. Named and laid out as
//!   Hugging Face's `GPT2ForSequenceClassification` (`score.weight` (num_labels, C), no bias),
//!   so such a model exports as a copy too.
//! - Causal SFT ([`sft_example`]): the model's own LM head; only the response tokens are
//!   targets, every prompt and padding position is `IGNORE_INDEX`, so neither counts in the loss
//!   or in the gradient.
//!
//! The head keeps its own flat parameter and gradient buffers (one tensor), so the GPT and its
//! parameter table are unchanged; the fine-tuning driver steps both.

use crate::backend::{Backend, MatmulShape, WeightLayout, IGNORE_INDEX};
use crate::error::{ConfigError, EngineError};
use crate::params::{Init, ParamKind, ParamTable};

/// Hugging Face's name for the classification matrix.
pub const SCORE_WEIGHT: &str = "score.weight";

/// Batch-sized buffers of the head, allocated for a capacity of sequences and of hidden rows.
struct HeadActs<B: Backend> {
    seqs_cap: usize,
    rows_cap: usize,
    pooled: B::Buf,   // (B, C) hidden state of each sequence's last real token
    logits: B::Buf,   // (B, L); their gradient after the backward pass
    lse: B::Buf,      // (B)
    losses: B::Buf,   // (B)
    dpooled: B::Buf,  // (B, C)
    dhidden: B::Buf,  // (BT, C) gradient handed back to the GPT
}

/// The batch of the last forward pass.
struct HeadBatch<B: Backend> {
    b: usize,
    t: usize,
    /// Row of each sequence's last real token in the (BT, C) hidden states: `n * T + last[n]`.
    pool_rows: B::Ids,
    labels: Option<B::Ids>,
}

/// The most likely class of each row of `(rows, classes)` logits (ties: the lowest class).
pub fn row_argmax(logits: &[f32], classes: usize) -> Vec<u32> {
    logits
        .chunks(classes)
        .map(|row| row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0 as u32)
        .collect()
}

/// Linear classifier over the pooled last-token hidden state.
pub struct ClassificationHead<B: Backend> {
    num_labels: usize,
    channels: usize,
    table: ParamTable,
    params: B::Buf,
    grads: B::Buf,
    acts: Option<HeadActs<B>>,
    batch: Option<HeadBatch<B>>,
}

impl<B: Backend> ClassificationHead<B> {
    /// The head's parameter table: `score.weight` (num_labels, C), N(0, 0.02) like GPT-2's init.
    pub fn param_table(num_labels: usize, channels: usize) -> ParamTable {
        let mut t = ParamTable::new();
        t.push(SCORE_WEIGHT, &[num_labels, channels], ParamKind::Weight, Init::Normal { std: 0.02 });
        t
    }

    /// A freshly initialised head (seeded, per-tensor stream like the GPT's).
    pub fn new(be: &B, num_labels: usize, channels: usize, seed: u64) -> Result<Self, EngineError> {
        let host = Self::param_table(num_labels.max(1), channels.max(1)).init(seed);
        Self::from_params(be, num_labels, channels, &host)
    }

    /// A head holding the given parameters (`score.weight`, row-major (num_labels, C)).
    pub fn from_params(be: &B, num_labels: usize, channels: usize, host: &[f32]) -> Result<Self, EngineError> {
        if num_labels < 2 {
            return Err(ConfigError::new("num_labels", format!("{num_labels}: a classifier needs at least 2 labels")).into());
        }
        if channels == 0 {
            return Err(ConfigError::new("n_embd", "must be at least 1").into());
        }
        let table = Self::param_table(num_labels, channels);
        if host.len() != table.total() {
            return Err(EngineError::Batch(format!(
                "classification head: {} values given, {SCORE_WEIGHT} ({num_labels}, {channels}) needs {}",
                host.len(),
                table.total()
            )));
        }
        Ok(ClassificationHead {
            num_labels,
            channels,
            params: be.upload(host),
            grads: be.zeros(table.total()),
            table,
            acts: None,
            batch: None,
        })
    }

    pub fn num_labels(&self) -> usize {
        self.num_labels
    }
    pub fn table(&self) -> &ParamTable {
        &self.table
    }
    pub fn params_host(&self, be: &B) -> Vec<f32> {
        be.download(be.view(&self.params, 0..self.table.total()))
    }
    pub fn grads_host(&self, be: &B) -> Vec<f32> {
        be.download(be.view(&self.grads, 0..self.table.total()))
    }
    pub fn set_params_host(&mut self, be: &B, host: &[f32]) {
        assert_eq!(host.len(), self.table.total(), "head parameter count");
        be.write(be.view_mut(&mut self.params, 0..host.len()), host);
    }
    pub fn zero_grad(&mut self, be: &B) {
        let n = self.table.total();
        be.fill(be.view_mut(&mut self.grads, 0..n), 0.0);
    }
    /// Parameters (mutable, for the optimizer) and gradients together.
    pub fn params_and_grads(&mut self) -> (&ParamTable, &mut B::Buf, &mut B::Buf) {
        (&self.table, &mut self.params, &mut self.grads)
    }

    fn ensure_acts(&mut self, be: &B, seqs: usize, rows: usize) {
        if self.acts.as_ref().is_some_and(|a| a.seqs_cap >= seqs && a.rows_cap >= rows) {
            return;
        }
        let (seqs, rows) = match &self.acts {
            Some(a) => (seqs.max(a.seqs_cap), rows.max(a.rows_cap)),
            None => (seqs, rows),
        };
        let (c, l) = (self.channels, self.num_labels);
        self.acts = Some(HeadActs {
            seqs_cap: seqs,
            rows_cap: rows,
            pooled: be.zeros(seqs * c),
            logits: be.zeros(seqs * l),
            lse: be.zeros(seqs),
            losses: be.zeros(seqs),
            dpooled: be.zeros(seqs * c),
            dhidden: be.zeros(rows * c),
        });
    }

    /// Forward over the final hidden states `hidden` (B*T, C) of a batch of `b` sequences of
    /// length `t`; `last[n]` is the position of sequence n's last real token, `labels` (B) its
    /// class. With labels, returns the mean cross-entropy; the logits stay available.
    pub fn forward(
        &mut self,
        be: &B,
        hidden: B::View<'_>,
        last: &[usize],
        labels: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>, EngineError> {
        let (c, l) = (self.channels, self.num_labels);
        if b == 0 || t == 0 || last.len() != b {
            return Err(EngineError::Batch(format!("classification head: {} last positions for a {b} x {t} batch", last.len())));
        }
        if let Some(&bad) = last.iter().find(|&&p| p >= t) {
            return Err(EngineError::Batch(format!("classification head: last position {bad} outside a sequence of {t}")));
        }
        if let Some(lb) = labels {
            if lb.len() != b {
                return Err(EngineError::Batch(format!("classification head: {} labels for {b} sequences", lb.len())));
            }
            if let Some(&bad) = lb.iter().find(|&&x| x as usize >= l) {
                return Err(EngineError::Batch(format!("label {bad} outside 0..{l} (num_labels = {l})")));
            }
        }
        let pool_rows: Vec<u32> = last.iter().enumerate().map(|(n, &p)| (n * t + p) as u32).collect();
        self.ensure_acts(be, b, b * t);
        let batch = HeadBatch { b, t, pool_rows: be.upload_ids(&pool_rows), labels: labels.map(|x| be.upload_ids(x)) };
        let a = self.acts.as_mut().unwrap();

        // pooled[n] = hidden[n*T + last[n]]                         // (B, C)
        be.embedding_forward(be.view_mut(&mut a.pooled, 0..b * c), &batch.pool_rows, hidden, c, false);
        // logits = pooled @ score^T                                 // (B, L)
        let shape = MatmulShape { rows: b, in_features: c, out_features: l, layout: WeightLayout::OutIn };
        be.matmul_forward(be.view_mut(&mut a.logits, 0..b * l), be.view(&a.pooled, 0..b * c), be.view(&self.params, 0..l * c), None, shape);

        let loss = match &batch.labels {
            None => None,
            Some(labels) => {
                // losses[n] = lse(logits[n]) - logits[n, label[n]]  // (B)
                be.cross_entropy_forward(be.view_mut(&mut a.losses, 0..b), be.view_mut(&mut a.lse, 0..b), be.view(&a.logits, 0..b * l), labels, l);
                let losses = be.download(be.view(&a.losses, 0..b));
                Some((losses.iter().map(|&x| x as f64).sum::<f64>() / b as f64) as f32)
            }
        };
        self.batch = Some(batch);
        Ok(loss)
    }

    /// Logits of the last forward, (B, L) on the host; after a backward pass, their gradient.
    pub fn logits(&self, be: &B) -> Vec<f32> {
        let (a, batch) = (self.acts.as_ref().expect("forward first"), self.batch.as_ref().expect("forward first"));
        be.download(be.view(&a.logits, 0..batch.b * self.num_labels))
    }

    /// The most likely label of each sequence of the last forward (ties: the lowest label); read
    /// before the backward pass, which writes the logits' gradient over them.
    pub fn predictions(&self, be: &B) -> Vec<u32> {
        row_argmax(&self.logits(be), self.num_labels)
    }

    /// Backward of the last forward (which must have had labels): accumulates the gradient of
    /// `loss_scale * mean loss` into the head's gradient, and returns the gradient of the hidden
    /// states (B*T, C) for `Gpt::backward_hidden` (zero except at the pooled rows).
    pub fn backward(&mut self, be: &B, loss_scale: f32) -> Result<B::View<'_>, EngineError> {
        let (c, l) = (self.channels, self.num_labels);
        let batch = self.batch.as_ref().ok_or_else(|| EngineError::Batch("classification head: backward before forward".into()))?;
        let labels = batch.labels.as_ref().ok_or_else(|| EngineError::Batch("classification head: backward needs labels".into()))?;
        let (b, rows) = (batch.b, batch.b * batch.t);
        let a = self.acts.as_mut().unwrap();

        // dlogits = dloss * (softmax - onehot(label)), written over the logits  // (B, L)
        be.cross_entropy_backward_in_place(be.view_mut(&mut a.logits, 0..b * l), be.view(&a.lse, 0..b), labels, loss_scale / b as f32, l);
        // dpooled = dlogits @ score (written over); dscore += dlogits^T @ pooled
        let shape = MatmulShape { rows: b, in_features: c, out_features: l, layout: WeightLayout::OutIn };
        be.matmul_backward_set_dinp(
            be.view_mut(&mut a.dpooled, 0..b * c),
            be.view_mut(&mut self.grads, 0..l * c),
            None,
            be.view(&a.logits, 0..b * l),
            be.view(&a.pooled, 0..b * c),
            be.view(&self.params, 0..l * c),
            shape,
        );
        // dhidden[n*T + last[n]] += dpooled[n]; every other row 0 (the scatter only adds, so
        // the one fill left)                                        // (BT, C)
        be.fill(be.view_mut(&mut a.dhidden, 0..rows * c), 0.0);
        be.embedding_backward(be.view_mut(&mut a.dhidden, 0..rows * c), be.view(&a.dpooled, 0..b * c), &batch.pool_rows, c);
        Ok(be.view(&a.dhidden, 0..rows * c))
    }
}

/// One SFT example as (inputs, targets) of length `seq_len`: the tokens `prompt ++ response`,
/// targets shifted by one, every target that is not a response token `IGNORE_INDEX`, padded
/// with `pad` inputs and ignored targets. Too long: the response's end is cut first (at least
/// one response token is kept), then the prompt's start. Returns `None` for an empty response
/// (nothing to learn).
pub fn sft_example(prompt: &[u32], response: &[u32], seq_len: usize, pad: u32) -> Option<(Vec<u32>, Vec<u32>)> {
    if response.is_empty() || seq_len == 0 {
        return None;
    }
    // A window of seq_len inputs holds seq_len + 1 tokens.
    let room = seq_len + 1;
    let r_keep = response.len().min(room.saturating_sub(prompt.len()).max(1));
    let p_keep = prompt.len().min(room - r_keep);
    let prompt = &prompt[prompt.len() - p_keep..];
    let tokens: Vec<u32> = prompt.iter().chain(&response[..r_keep]).copied().collect();
    let n = tokens.len() - 1; // real input positions
    let mut inputs = Vec::with_capacity(seq_len);
    let mut targets = Vec::with_capacity(seq_len);
    for i in 0..n {
        inputs.push(tokens[i]);
        // Position i predicts token i+1: a target only when that token belongs to the response.
        targets.push(if i + 1 >= p_keep { tokens[i + 1] } else { IGNORE_INDEX });
    }
    inputs.resize(seq_len, pad);
    targets.resize(seq_len, IGNORE_INDEX);
    Some((inputs, targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: u32 = IGNORE_INDEX;

    #[test]
    fn sft_targets_only_the_response() {
        // prompt [1 2 3], response [7 8]: tokens 1 2 3 7 8
        let (x, y) = sft_example(&[1, 2, 3], &[7, 8], 6, 0).unwrap();
        assert_eq!(x, vec![1, 2, 3, 7, 0, 0]);
        assert_eq!(y, vec![I, I, 7, 8, I, I]);
    }

    #[test]
    fn sft_cuts_the_response_then_the_prompt() {
        let (x, y) = sft_example(&[1, 2, 3], &[7, 8, 9], 4, 0).unwrap();
        assert_eq!((x, y), (vec![1, 2, 3, 7], vec![I, I, 7, 8]));
        // The prompt alone overflows: its start goes, one response token stays.
        let (x, y) = sft_example(&[1, 2, 3, 4, 5, 6], &[7, 8], 3, 0).unwrap();
        assert_eq!((x, y), (vec![4, 5, 6], vec![I, I, 7]));
        assert!(sft_example(&[1, 2], &[], 4, 0).is_none());
    }
}
