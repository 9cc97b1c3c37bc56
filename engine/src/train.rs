//! The training loop: micro-batches with gradient accumulation, clipping, AdamW, scheduled
//! learning rate, periodic evaluation. `train_step` draws its own random windows (single
//! process); `train_step_batches` takes the micro-batches a data plan assigned to this rank and
//! averages gradients across ranks through a [`Collective`]. No I/O here: callers report
//! progress.

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::collective::Collective;
use crate::grad_buckets::{self, DEFAULT_BUCKET_FLOATS};
use crate::data::{Batch, TokenWindows};
use crate::error::{ConfigError, EngineError};
use crate::model::Gpt;
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub steps: u64,
    pub schedule: LrSchedule,
    pub optim: AdamWConfig,
    /// Evaluate every this many steps (0: never during training).
    pub eval_interval: u64,
    pub eval_batches: usize,
    /// Seeds the data order (the model's init has its own seed).
    pub seed: u64,
}

impl TrainConfig {
    pub fn validate(&self, block_size: usize) -> Result<(), ConfigError> {
        if self.batch_size == 0 {
            return Err(ConfigError::new("batch_size", "must be at least 1"));
        }
        if self.seq_len == 0 || self.seq_len > block_size {
            return Err(ConfigError::new("seq_len", format!("must be in 1..={block_size} (the model's block_size)")));
        }
        if self.grad_accum == 0 {
            return Err(ConfigError::new("grad_accum", "must be at least 1"));
        }
        if self.steps == 0 {
            return Err(ConfigError::new("steps", "must be at least 1"));
        }
        self.schedule.validate()?;
        self.optim.validate()
    }

    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.seq_len * self.grad_accum
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// 0-based index of the step just taken.
    pub step: u64,
    /// Mean training loss over the step's micro-batches.
    pub loss: f32,
    pub grad_norm: f32,
    pub lr: f32,
    pub tokens: usize,
}

pub struct Trainer<B: Backend> {
    pub model: Gpt<B>,
    opt: AdamW<B>,
    cfg: TrainConfig,
    step: u64,
    data_rng: Rng,
    /// Smallest gradient bucket averaged during the backward pass, in f32 values (0: average
    /// the whole buffer after it); used with collectives that overlap.
    bucket_floats: usize,
}

impl<B: Backend> Trainer<B> {
    pub fn new(model: Gpt<B>, cfg: TrainConfig) -> Result<Self, EngineError> {
        cfg.validate(model.config().block_size)?;
        let opt = AdamW::new(model.backend(), model.table(), cfg.optim.clone())?;
        let data_rng = Rng::derive(cfg.seed, "data-order");
        Ok(Trainer { model, opt, cfg, step: 0, data_rng, bucket_floats: DEFAULT_BUCKET_FLOATS })
    }

    /// Sets the smallest gradient bucket averaged while the backward pass runs, in f32 values
    /// (default [`DEFAULT_BUCKET_FLOATS`], 25 MiB as PyTorch DDP); 0 averages the whole buffer
    /// after the pass. Only the bucketing changes, not the result's values (up to the ring's
    /// summation order over the chunks of each bucket).
    pub fn set_bucket_floats(&mut self, floats: usize) {
        self.bucket_floats = floats;
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    pub fn model(&self) -> &Gpt<B> {
        &self.model
    }
    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// One optimizer step over `grad_accum` random micro-batches of `train`.
    pub fn train_step(&mut self, train: &TokenWindows) -> Result<StepStats, EngineError> {
        let (b, t, k) = (self.cfg.batch_size, self.cfg.seq_len, self.cfg.grad_accum);
        if train.starts(t) == 0 {
            return Err(EngineError::Batch(format!("the training text is shorter than seq_len + 1 = {} tokens", t + 1)));
        }
        self.model.zero_grad();
        let mut loss_sum = 0.0f64;
        for _ in 0..k {
            let batch = train.random_batch(&mut self.data_rng, b, t);
            // the loss and, in the same pass over the logits, their gradient for backward below
            let loss = self.model.forward_train(&batch.inputs, &batch.targets, b, t, 1.0 / k as f32)?;
            // A device error makes the loss meaningless: report it first (no-op on CPU).
            self.model.backend().synchronize()?;
            if !loss.is_finite() {
                return Err(EngineError::NonFiniteLoss { step: self.step, loss });
            }
            loss_sum += loss as f64;
            self.model.backward(1.0 / k as f32)?;
        }
        let lr = self.cfg.schedule.lr_at(self.step);
        let (be, _, params, grads) = self.model.params_and_grads();
        let report = self.opt.step(be, params, grads, lr, self.step)?;
        let stats = StepStats { step: self.step, loss: (loss_sum / k as f64) as f32, grad_norm: report.grad_norm, lr, tokens: b * t * k };
        self.step += 1;
        Ok(stats)
    }

    /// One data-parallel optimizer step over the given micro-batches (this rank's share of the
    /// global batch): zero the gradients, forward + backward each micro-batch with loss scale
    /// `1 / micro_batches.len()`, average the gradients over all ranks with `collective`, then
    /// one AdamW step, identical on every rank since the averaged gradients are bitwise equal.
    ///
    /// Every rank must call this with the same number of micro-batches of the same shape (so
    /// that the mean of rank means is the global mean). The reported loss is the mean over this
    /// rank's micro-batches averaged over the ranks (a 1-value all-reduce done first), so every
    /// rank reports the global mean loss, and a non-finite loss on any rank makes every rank
    /// return `NonFiniteLoss` before the gradient exchange; `tokens` counts the whole global
    /// batch (this rank's tokens times the world size). `TrainConfig::batch_size` and
    /// `grad_accum` are not used here: the batches define the step. On an error from the model
    /// (a malformed batch) the peers are left waiting in the collective until the caller
    /// aborts or drops it.
    pub fn train_step_batches(&mut self, micro_batches: &[Batch], collective: &mut dyn Collective<B>) -> Result<StepStats, EngineError> {
        let k = micro_batches.len();
        if k == 0 {
            return Err(EngineError::Batch("a step needs at least one micro-batch".into()));
        }
        self.model.zero_grad();
        let mut loss_sum = 0.0f64;
        let mut tokens = 0;
        // All micro-batches but the last: forward and backward, no communication.
        let mut finite = true;
        for batch in &micro_batches[..k - 1] {
            let loss = self.forward_batch(batch, 1.0 / k as f32)?;
            tokens += batch.batch * batch.seq_len;
            loss_sum += loss as f64;
            if !loss.is_finite() {
                // The other ranks learn about it through the loss all-reduce below.
                finite = false;
                break;
            }
            self.model.backward(1.0 / k as f32)?;
        }
        if finite {
            let last = &micro_batches[k - 1];
            loss_sum += self.forward_batch(last, 1.0 / k as f32)? as f64;
            tokens += last.batch * last.seq_len;
        }
        // The mean loss over every rank's micro-batches, before any gradient moves: a
        // non-finite loss anywhere stops every rank here, with the same error.
        let local_loss = (loss_sum / k as f64) as f32;
        let loss = {
            let be = self.model.backend();
            let mut buf = be.upload(&[local_loss]);
            collective.all_reduce_mean(be, be.view_mut(&mut buf, 0..1))?;
            be.download(be.view(&buf, 0..1))[0]
        };
        if !loss.is_finite() {
            return Err(EngineError::NonFiniteLoss { step: self.step, loss });
        }
        self.backward_and_average(1.0 / k as f32, collective)?;
        let lr = self.cfg.schedule.lr_at(self.step);
        let (be, _, params, grads) = self.model.params_and_grads();
        let report = self.opt.step(be, params, grads, lr, self.step)?;
        let stats = StepStats { step: self.step, loss, grad_norm: report.grad_norm, lr, tokens: tokens * collective.world_size() };
        self.step += 1;
        Ok(stats)
    }

    /// Forward of one micro-batch (`Gpt::forward_train`: the logits' gradient for a backward
    /// pass with `loss_scale` comes with it); its loss, after any device error was reported.
    fn forward_batch(&mut self, batch: &Batch, loss_scale: f32) -> Result<f32, EngineError> {
        let loss = self.model.forward_train(&batch.inputs, &batch.targets, batch.batch, batch.seq_len, loss_scale)?;
        self.model.backend().synchronize()?;
        Ok(loss)
    }

    /// The last micro-batch's backward pass, then the gradients averaged over the ranks. When
    /// the collective overlaps (`Collective::overlaps_backward`), each bucket of final
    /// gradients (grad_buckets.rs) starts averaging while the pass computes the next; else one
    /// all-reduce of the whole buffer follows the pass.
    fn backward_and_average(&mut self, loss_scale: f32, collective: &mut dyn Collective<B>) -> Result<(), EngineError> {
        let total = self.model.table().total();
        grad_buckets::backward_and_average(
            &mut self.model,
            collective,
            self.bucket_floats,
            |m, ready| m.backward_overlapped(loss_scale, ready),
            |m| m.backend_and_grads_mut(),
            total,
        )
    }

    /// Mean loss over the fixed evaluation windows of `val`: `eval_batches` batches, or as
    /// many as it takes to cover the validation tokens once when that is fewer (more would
    /// evaluate the same tokens again: an eval_batches of 2^64 - 1 never finished).
    pub fn evaluate(&mut self, val: &TokenWindows) -> Result<f32, EngineError> {
        let (b, t) = (self.cfg.batch_size, self.cfg.seq_len);
        if val.starts(t) == 0 {
            return Err(EngineError::Batch(format!("the validation text is shorter than seq_len + 1 = {} tokens", t + 1)));
        }
        let n = eval_batches_over(self.cfg.eval_batches, val.starts(t), b, t);
        let mut sum = 0.0f64;
        for i in 0..n {
            let batch = val.eval_batch(i, n, b, t);
            sum += self.model.forward(&batch.inputs, Some(&batch.targets), b, t)?.expect("targets given") as f64;
        }
        Ok((sum / n as f64) as f32)
    }
}

/// The evaluation batches of `batch` windows of `seq_len` over a stream with `starts` window
/// starts: `asked`, at most enough windows side by side to cover the stream once (the
/// batches spread their windows evenly, so those are about `seq_len` apart), at least one.
pub fn eval_batches_over(asked: usize, starts: usize, batch: usize, seq_len: usize) -> usize {
    asked.min(starts.div_ceil(seq_len.max(1)).div_ceil(batch.max(1))).max(1)
}

/// Everything a resumed `Trainer` needs besides the weights and the AdamW moments: where the
/// step counter, the optimizer's update count and the random data order stand.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps taken (the next step's 0-based index).
    pub step: u64,
    /// AdamW updates applied (its bias correction's `t`).
    pub optimizer_steps: u64,
    /// The generator `train_step` draws its random windows from.
    pub data_rng: Rng,
}

impl<B: Backend> Trainer<B> {
    /// The counters and generator a checkpoint records.
    pub fn state(&self) -> TrainerState {
        TrainerState { step: self.step, optimizer_steps: self.opt.steps_done(), data_rng: self.data_rng.clone() }
    }

    /// AdamW's first and second moments on the host (same layout as the parameters).
    pub fn moments_host(&self) -> (Vec<f32>, Vec<f32>) {
        self.opt.moments_host(self.model.backend())
    }

    /// Puts the trainer back exactly where a checkpoint left it: weights, moments, counters.
    pub fn restore(&mut self, params: &[f32], m: &[f32], v: &[f32], state: &TrainerState) -> Result<(), EngineError> {
        let n = self.model.table().total();
        if params.len() != n || m.len() != n || v.len() != n {
            return Err(EngineError::Batch(format!(
                "checkpoint holds {} parameters and {}/{} moments, the model has {n}",
                params.len(),
                m.len(),
                v.len()
            )));
        }
        self.model.set_params_host(params);
        self.opt.restore(self.model.backend(), m, v, state.optimizer_steps);
        self.step = state.step;
        self.data_rng = state.data_rng.clone();
        Ok(())
    }
}
