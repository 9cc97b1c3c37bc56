//! The single-process training loop: micro-batches with gradient accumulation, clipping, AdamW,
//! scheduled learning rate, periodic evaluation. No I/O here: callers report progress.

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::TokenWindows;
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
}

impl<B: Backend> Trainer<B> {
    pub fn new(model: Gpt<B>, cfg: TrainConfig) -> Result<Self, EngineError> {
        cfg.validate(model.config().block_size)?;
        let opt = AdamW::new(model.backend(), model.table(), cfg.optim.clone())?;
        let data_rng = Rng::derive(cfg.seed, "data-order");
        Ok(Trainer { model, opt, cfg, step: 0, data_rng })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
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
            let batch = self.data_rng_batch(train, b, t);
            let loss = self.model.forward(&batch.inputs, Some(&batch.targets), b, t)?.expect("targets given");
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

    fn data_rng_batch(&mut self, train: &TokenWindows, b: usize, t: usize) -> crate::data::Batch {
        train.random_batch(&mut self.data_rng, b, t)
    }

    /// Mean loss over the fixed evaluation windows of `val`.
    pub fn evaluate(&mut self, val: &TokenWindows) -> Result<f32, EngineError> {
        let (b, t, n) = (self.cfg.batch_size, self.cfg.seq_len, self.cfg.eval_batches.max(1));
        if val.starts(t) == 0 {
            return Err(EngineError::Batch(format!("the validation text is shorter than seq_len + 1 = {} tokens", t + 1)));
        }
        let mut sum = 0.0f64;
        for i in 0..n {
            let batch = val.eval_batch(i, n, b, t);
            sum += self.model.forward(&batch.inputs, Some(&batch.targets), b, t)?.expect("targets given") as f64;
        }
        Ok((sum / n as f64) as f32)
    }
}
