//! AdamW with decoupled weight decay, warm-up + cosine learning rate, global-norm clipping.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::backend::{AdamWStep, Backend, DecayRuns};
use crate::error::{ConfigError, EngineError};
use crate::params::{ParamKind, ParamTable};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled decay on matmul weights; never on biases or LayerNorm.
    pub weight_decay: f32,
    /// Decay the embedding tables (and so the tied LM head) too.
    pub decay_embeddings: bool,
    /// Clip the global gradient norm to this; `None` disables clipping.
    pub grad_clip: Option<f32>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_embeddings: false, grad_clip: Some(1.0) }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(ConfigError::new(field, format!("{b} is outside [0, 1)")));
            }
        }
        if !(self.eps > 0.0) {
            return Err(ConfigError::new("eps", "must be positive"));
        }
        if !(self.weight_decay >= 0.0) {
            return Err(ConfigError::new("weight_decay", "must be >= 0"));
        }
        if let Some(c) = self.grad_clip {
            if !(c > 0.0) {
                return Err(ConfigError::new("grad_clip", "must be positive (omit it to disable clipping)"));
            }
        }
        Ok(())
    }
}

/// The learning rate's shape after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrDecay {
    /// Cosine from `max_lr` to `min_lr` at `decay_steps` (GPT-2, nanoGPT, most pretraining).
    #[default]
    Cosine,
    /// Linear from `max_lr` to `min_lr` at `decay_steps`.
    Linear,
    /// `max_lr` throughout (after warm-up).
    Constant,
    /// Warmup-stable-decay: `max_lr` until `cooldown_steps` before `decay_steps`, then linear
    /// to `min_lr` (so a run can be continued from any stable-phase checkpoint and cooled down
    /// when wanted).
    Wsd,
}

impl LrDecay {
    pub const NAMES: &'static str = "cosine, linear, constant, wsd";

    pub fn parse(name: &str) -> Option<LrDecay> {
        Some(match name {
            "cosine" => LrDecay::Cosine,
            "linear" => LrDecay::Linear,
            "constant" => LrDecay::Constant,
            "wsd" => LrDecay::Wsd,
            _ => return None,
        })
    }
}

/// Linear warm-up to `max_lr`, then `decay` down to `min_lr` at `decay_steps`, flat after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    pub max_lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub decay_steps: u64,
    #[serde(default)]
    pub decay: LrDecay,
    /// `Wsd`: the steps of the final linear decay.
    #[serde(default)]
    pub cooldown_steps: u64,
}

impl LrSchedule {
    /// Warm-up then cosine decay, as every schedule was before `decay` (the default).
    pub fn cosine(max_lr: f32, min_lr: f32, warmup_steps: u64, decay_steps: u64) -> Self {
        LrSchedule { max_lr, min_lr, warmup_steps, decay_steps, decay: LrDecay::Cosine, cooldown_steps: 0 }
    }

    pub fn constant(lr: f32) -> Self {
        LrSchedule { max_lr: lr, min_lr: lr, warmup_steps: 0, decay_steps: 0, decay: LrDecay::Constant, cooldown_steps: 0 }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.max_lr > 0.0) || !self.max_lr.is_finite() {
            return Err(ConfigError::new("lr", "must be a positive number"));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.max_lr) {
            return Err(ConfigError::new("min_lr", format!("must be in [0, lr = {}]", self.max_lr)));
        }
        // A warm-up longer than the run never reaches `lr`: the user asked for a schedule the run
        // does not have (decay_steps 0 means no decay is scheduled at all, as in `constant`).
        if self.decay_steps > 0 && self.warmup_steps > self.decay_steps {
            return Err(ConfigError::new(
                "warmup_steps",
                format!("{} is more than the run's {} steps (the learning rate would never reach lr)", self.warmup_steps, self.decay_steps),
            ));
        }
        if self.decay == LrDecay::Wsd && self.cooldown_steps > self.decay_steps.saturating_sub(self.warmup_steps) {
            return Err(ConfigError::new(
                "cooldown_steps",
                format!(
                    "{} is more than the {} steps after warm-up",
                    self.cooldown_steps,
                    self.decay_steps.saturating_sub(self.warmup_steps)
                ),
            ));
        }
        Ok(())
    }

    /// Learning rate for 0-based step `step`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.max_lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        // where the decay starts: after warm-up, or (WSD) after the stable phase
        let start = match self.decay {
            LrDecay::Constant => return self.max_lr,
            LrDecay::Wsd => self.decay_steps.saturating_sub(self.cooldown_steps).max(self.warmup_steps),
            LrDecay::Cosine | LrDecay::Linear => self.warmup_steps,
        };
        if self.decay_steps == 0 || step < start {
            return self.max_lr;
        }
        if step >= self.decay_steps || self.decay_steps <= start {
            return self.min_lr;
        }
        let progress = (step - start) as f64 / (self.decay_steps - start) as f64;
        let left = match self.decay {
            LrDecay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            _ => 1.0 - progress,
        };
        (self.min_lr as f64 + left * (self.max_lr - self.min_lr) as f64) as f32
    }
}

/// Runs of tensors that share one weight decay, merged so one update call covers each run.
fn decay_runs(table: &ParamTable, cfg: &AdamWConfig) -> Vec<(Range<usize>, f32)> {
    let mut runs: Vec<(Range<usize>, f32)> = Vec::new();
    for s in table.specs() {
        let wd = match s.kind {
            ParamKind::Weight => cfg.weight_decay,
            ParamKind::Embedding if cfg.decay_embeddings => cfg.weight_decay,
            _ => 0.0,
        };
        match runs.last_mut() {
            // a tensor's spare values (zero, zero gradients) ride with it: they stay zero
            Some((r, w)) if *w == wd && r.end == s.offset => r.end = s.reserved_range().end,
            _ => runs.push((s.reserved_range(), wd)),
        }
    }
    runs
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f32,
}

pub struct AdamW<B: Backend> {
    cfg: AdamWConfig,
    runs: DecayRuns<B::Ids, B::Buf>,
    m: B::Buf,
    v: B::Buf,
    /// Updates applied so far.
    t: u64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(be: &B, table: &ParamTable, cfg: AdamWConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(AdamW { runs: DecayRuns::new(be, decay_runs(table, &cfg)), m: be.zeros(table.total()), v: be.zeros(table.total()), t: 0, cfg })
    }

    pub fn steps_done(&self) -> u64 {
        self.t
    }

    /// First and second moments on the host (for checkpoints).
    pub fn moments_host(&self, be: &B) -> (Vec<f32>, Vec<f32>) {
        let n = be.len(&self.m);
        (be.download(be.view(&self.m, 0..n)), be.download(be.view(&self.v, 0..n)))
    }

    pub fn restore(&mut self, be: &B, m: &[f32], v: &[f32], t: u64) {
        let n = be.len(&self.m);
        assert!(m.len() == n && v.len() == n, "optimizer state size");
        be.write(be.view_mut(&mut self.m, 0..n), m);
        be.write(be.view_mut(&mut self.v, 0..n), v);
        self.t = t;
    }

    /// One update. Refuses (and changes nothing) when the gradient is not finite.
    pub fn step(&mut self, be: &B, params: &mut B::Buf, grads: &B::Buf, lr: f32, step: u64) -> Result<StepReport, EngineError> {
        let n = be.len(grads);
        let norm = be.sum_squares(be.view(grads, 0..n)).sqrt() as f32;
        if !norm.is_finite() {
            return Err(EngineError::NonFiniteGrad { step, norm });
        }
        let grad_scale = match self.cfg.grad_clip {
            Some(clip) if norm > clip => clip / (norm + 1e-6),
            _ => 1.0,
        };
        self.t += 1;
        let hp = AdamWStep { lr, beta1: self.cfg.beta1, beta2: self.cfg.beta2, eps: self.cfg.eps, weight_decay: 0.0, t: self.t, grad_scale };
        be.adamw_update_runs(params, grads, &mut self.m, &mut self.v, &self.runs, hp);
        Ok(StepReport { grad_norm: norm, lr })
    }
}
