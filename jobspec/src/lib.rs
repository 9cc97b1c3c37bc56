//! A job spec in TOML: what to train, on what, with how many workers. Parsing refuses unknown
//! fields; validation names the field at fault and what is allowed. Coordinator (on submit) and
//! worker (on assignment) parse the same text with the same code.
//!
//! ```toml
//! name = "shakespeare"
//! priority = 0
//! max_restarts = 1
//! seed = 1337
//!
//! [model]
//! preset = "tiny"             # or explicit sizes below
//! # positions = "rotary"      # GPT: learned (default) | rotary (RoPE in every attention layer)
//! # arch = "bert" | "t5" and their options: see family.rs
//!
//! [data]
//! text = "data/tinyshakespeare.txt"    # or: corpus = "s3://bucket/corpora/web" (prepared)
//! tokenizer = "char"
//!
//! [train]
//! steps = 200
//! global_batch = 16           # sequences per step = world_size * micro_batch * accumulation
//! micro_batch = 8
//! seq_len = 128
//! lr = 1e-3
//!
//! [cluster]
//! world_size = 2
//! device = "cpu"
//!
//! [checkpoint]                # optional
//! every = 100                 # steps (and the last step); 0: never
//! keep_last = 3
//! keep_every = 1000           # also keep steps that are multiples of this
//! store = "s3://bucket/runs"  # default: rank 0's output directory
//! ```
//!
//! A fine-tuning job starts from a trained model and takes its model config and tokenizer from
//! it, so it has no `[model]` and no `[data]`:
//!
//! ```toml
//! name = "sentiment"
//! kind = "finetune"
//!
//! [finetune]
//! init_from = "job-000003"    # or a model.safetensors path, or a checkpoint directory/URI
//! head = "classification"     # {"text", "label"} JSONL; or "sft": {"prompt", "response"}
//! num_labels = 2
//! data = "data/reviews.jsonl"
//! val_fraction = 0.1          # or: val_data = "data/reviews-val.jsonl"
//!
//! [train]
//! ...
//! ```

mod family;
mod locations;
mod parent_model_checks;
pub use locations::{scheme_of, Location, LocationKind};
mod toml_error;

pub use family::{Arch, BertObjective, BertSpecials, ContrastiveViews, FamilyConfig, T5Specials};

use serde::{Deserialize, Serialize};
use smelt_engine::model::{GptConfig, GptPositions, LayerNormPlacement};
use smelt_engine::optim::{AdamWConfig, LrDecay, LrSchedule};
use smelt_engine::train::TrainConfig;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("job spec: {}{message}", if .field == "toml" { String::new() } else { format!("`{}`: ", .field) })]
pub struct SpecError {
    /// Dotted path of the field at fault (`train.micro_batch`), or `toml` for syntax errors.
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> SpecError {
    SpecError { field: field.to_string(), message: message.into() }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Pretrain,
    /// Starts from `finetune.init_from` and trains a task head on labeled examples.
    Finetune,
}

/// What a fine-tuning job trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinetuneHead {
    /// Linear classifier on the last real token's hidden state; JSONL `{"text", "label"}`.
    Classification,
    /// Causal LM loss on the response tokens only; JSONL `{"prompt", "response"}`.
    Sft,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    #[serde(default)]
    pub kind: JobKind,
    /// Higher runs first; ties go to the older job.
    #[serde(default)]
    pub priority: i32,
    /// Restarts allowed after a worker is lost or fails.
    #[serde(default)]
    pub max_restarts: u32,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Required for pretraining; a fine-tuning job takes its model from `finetune.init_from`.
    #[serde(default)]
    pub model: ModelSpec,
    /// Required for pretraining; a fine-tuning job reads `finetune.data`.
    #[serde(default)]
    pub data: DataSpec,
    pub train: TrainSpec,
    #[serde(default)]
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// Only for `kind = "finetune"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// The starting weights: a `model.safetensors` path, a checkpoint directory or URI (its
    /// `model.safetensors`), or the id of a finished job (`job-000003`).
    pub init_from: String,
    /// `classification` or `sft`.
    pub head: String,
    /// Classes of a classification head (labels are 0..num_labels).
    pub num_labels: Option<usize>,
    /// Labeled examples, JSONL, one object per line.
    pub data: String,
    /// Validation examples; without it, `val_fraction` of `data` (evenly spread) is held out.
    pub val_data: Option<String>,
    /// The share of `data` held out when there is no `val_data` (0.1 unless given; not with
    /// `val_data`). See [`FinetuneSpec::val_fraction`].
    #[serde(default, rename = "val_fraction")]
    pub val_fraction_given: Option<f64>,
}

impl FinetuneSpec {
    /// The share of `data` held out for validation when there is no `val_data`.
    pub fn val_fraction(&self) -> f64 {
        self.val_fraction_given.unwrap_or_else(default_val_fraction)
    }

    pub fn head_kind(&self) -> Result<FinetuneHead, SpecError> {
        match self.head.as_str() {
            "classification" => Ok(FinetuneHead::Classification),
            "sft" => Ok(FinetuneHead::Sft),
            other => Err(err("finetune.head", format!("{other:?} is not one of: classification, sft"))),
        }
    }
}

fn default_seed() -> u64 {
    1337
}

/// The largest `model.pad_vocab_to`: more padding than this only wastes memory.
pub const MAX_VOCAB_PAD: usize = 4096;

/// Most classes a classification head takes (its weight is num_labels x n_embd): a label set
/// larger than this is a vocabulary, not classes.
pub const MAX_LABELS: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// GPT only: continue pretraining from these weights (a `model.safetensors` path, e.g.
    /// one `smelt import hf` made of the Hub's GPT-2, a checkpoint directory or URI, or a job
    /// id). The model's sizes and tokenizer come from the file, so the fields that would set
    /// them are left out; the data must use the file's tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    pub preset: Option<String>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    pub block_size: Option<usize>,
    /// Refused when given: a job's vocabulary is its tokenizer's (kept so that the refusal can
    /// name the field rather than call it unknown).
    pub vocab_size: Option<usize>,
    /// GPT only: rounds the model's vocabulary itself up to a multiple of this (nanoGPT's
    /// 50,257 -> 50,304 with 64): the extra ids become part of the model (their logits learn
    /// to be unlikely; they are never inputs or targets, and sampling never picks them), as in
    /// a nanoGPT checkpoint. Not needed for speed: every model's LM head runs over its
    /// vocabulary rounded up to a multiple of 64 anyway, the padding masked out of the softmax
    /// (engine/src/model/padded_head.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_vocab_to: Option<usize>,
    /// `pre` or `post`; unset: the architecture's own (GPT-2 and T5 pre, BERT post).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ln_placement: Option<LayerNormPlacement>,
    /// `gpt` (default), `bert` (encoder-only) or `t5` (encoder-decoder). Presets are per
    /// architecture (`bert-tiny`, `t5-tiny`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// BERT/T5 attention score: `dot` (default), `general` or `additive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<String>,
    /// BERT/T5 with `scores = "additive"`: the width A of v^T tanh(W q + U k) (default: the
    /// head width).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additive_width: Option<usize>,
    /// Positions: GPT `learned` (default) or `rotary`; BERT/T5 `learned` (BERT's default) or
    /// `sinusoidal` (T5's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<String>,
    /// BERT/T5 feed-forward width (default 4 x n_embd, or the preset's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_inner: Option<usize>,
    /// T5 decoder layers (default: n_layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_decoder_layer: Option<usize>,
    /// BERT: `mlm` (default), `mlm+nsp` or `contrastive`; T5: `span` (span corruption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<String>,
    /// BERT masking rate of `mlm`/`mlm+nsp` (and of the views of `contrastive`); default 0.15.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_prob: Option<f64>,
    /// BERT contrastive: InfoNCE temperature (default 0.05).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// BERT: dropout probability of training passes, in [0, 1) (default 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f32>,
    /// BERT contrastive: how a window's two views differ: `mask` (default; two independent
    /// maskings) or `dropout` (the same tokens twice, the model's dropout makes the views:
    /// SimCSE; needs `dropout` > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<String>,
    /// T5 span corruption: share of tokens cut out (default 0.15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_density: Option<f64>,
    /// T5 span corruption: mean span length (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_span: Option<f64>,
    /// T5 span corruption: sentinel ids reserved at the top of the vocabulary (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinels: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// A UTF-8 text file every worker can read (tokenized by each worker with `tokenizer`).
    pub text: Option<String>,
    /// Or: a corpus prepared by `smelt corpus prepare` (a path or an object-store URI); its
    /// manifest names the tokenizer, and its validation split is used for evaluation.
    pub corpus: Option<String>,
    /// How `text` is tokenized (a prepared corpus names its own: given with one, refused).
    #[serde(default = "default_tokenizer", skip_serializing_if = "is_default_tokenizer")]
    pub tokenizer: String,
    /// Share of the text (its end) held out for validation (a prepared corpus has its own split).
    #[serde(default = "default_val_fraction", skip_serializing_if = "is_default_val_fraction")]
    pub val_fraction: f64,
    /// Or: several prepared corpora drawn in proportion to their weights (`[[data.mix]]`
    /// tables), all made with the same tokenizer. GPT pretraining only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mix: Vec<MixSource>,
}

/// One corpus of a data mixture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixSource {
    /// A corpus prepared by `smelt corpus prepare` (a path or an object-store URI).
    pub corpus: String,
    /// Its share of every step's sequences, relative to the other sources' weights.
    pub weight: f64,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec { text: None, corpus: None, tokenizer: default_tokenizer(), val_fraction: default_val_fraction(), mix: Vec::new() }
    }
}

fn default_tokenizer() -> String {
    "char".into()
}
fn is_default_tokenizer(t: &String) -> bool {
    *t == default_tokenizer()
}
fn is_default_val_fraction(f: &f64) -> bool {
    *f == default_val_fraction()
}

/// `data.tokenizer` and `data.val_fraction` written beside a prepared corpus (`data.corpus` or
/// `data.mix`): refused, as `data.text` beside one is. They apply to a text only, and were
/// otherwise ignored without a word (a char corpus trained as char under `tokenizer = "gpt2"`).
fn given_for_text_only(text: &str) -> Result<(), SpecError> {
    let Ok(raw) = toml::from_str::<toml::Table>(text) else { return Ok(()) };
    let Some(data) = raw.get("data").and_then(|d| d.as_table()) else { return Ok(()) };
    if !(data.contains_key("corpus") || data.contains_key("mix")) {
        return Ok(());
    }
    let why = "a prepared corpus has its own (the tokenizer and validation split `smelt corpus prepare` chose, in its manifest); leave this out";
    match ["tokenizer", "val_fraction"].into_iter().find(|k| data.contains_key(*k)) {
        Some(key) => Err(err(&format!("data.{key}"), why)),
        None => Ok(()),
    }
}
fn default_val_fraction() -> f64 {
    0.1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub steps: u64,
    /// Sequences per optimizer step, over all workers.
    pub global_batch: usize,
    /// Sequences per forward/backward on one worker.
    pub micro_batch: usize,
    pub seq_len: usize,
    pub lr: f32,
    pub min_lr: Option<f32>,
    #[serde(default)]
    pub warmup_steps: u64,
    /// The learning rate after warm-up: `cosine` (default), `linear`, `constant` or `wsd`
    /// (warmup-stable-decay: `lr` until `cooldown_steps` before the end, then linear to `min_lr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// `wsd`: steps of the final decay (default: a fifth of `steps`, at most what warm-up leaves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_steps: Option<u64>,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f32,
    #[serde(default)]
    pub decay_embeddings: bool,
    #[serde(default = "default_beta1")]
    pub beta1: f32,
    #[serde(default = "default_beta2")]
    pub beta2: f32,
    /// Global gradient-norm clip; 0 disables.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f32,
    /// Evaluate every this many steps; 0 never (except at the end).
    #[serde(default)]
    pub eval_interval: u64,
    /// Batches of each pretraining evaluation (default 10), each of `micro_batch` windows of
    /// `seq_len` tokens per worker (another micro_batch scores another sample of the validation
    /// text). A fine-tuning job evaluates its whole
    /// validation set (`finetune.val_data` or `val_fraction`) and does not read this.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Multiple choice at each evaluation (GPT pretraining): JSON lines in HellaSwag's fields
    /// (`ctx`, `endings`, `label`; e.g. hellaswag_val.jsonl), a path on the workers or an
    /// object-store URI, read by rank 0 when the job starts. Its acc_norm (llm.c's figure) is the
    /// step's `val_accuracy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_choices: Option<String>,
    /// Score the first this many examples of `eval_choices` (0: all).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub eval_choices_max: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn default_weight_decay() -> f32 {
    0.1
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.95
}
fn default_grad_clip() -> f32 {
    1.0
}
fn default_eval_batches() -> usize {
    10
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(default = "default_world_size")]
    pub world_size: u32,
    #[serde(default)]
    pub device: Device,
    /// Pretraining and fine-tuning (any model): the smallest bucket of gradients (MiB of f32) averaged across ranks
    /// while the backward pass computes the rest (PyTorch DDP's `bucket_cap_mb`); 0 averages
    /// the whole gradient after the backward pass. Unset: the device's default (GPUs 25 MiB;
    /// CPU workers 0, measured faster when every core computes: bench/NOTES.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_bucket_mb: Option<f64>,
    /// Whether a job of higher priority that cannot start may preempt this one (it must also
    /// checkpoint: rank 0 saves its last step and it resumes there later). false: never.
    #[serde(default = "default_true")]
    pub preemptible: bool,
}

/// `[checkpoint]`: when rank 0 checkpoints, how many it keeps, and where.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Checkpoint every this many steps (and at the last step); 0 never.
    #[serde(default)]
    pub every: u64,
    /// Newest checkpoints kept.
    #[serde(default = "default_keep_last")]
    pub keep_last: u32,
    /// Also keep every checkpoint whose step is a multiple of this; 0 none.
    #[serde(default)]
    pub keep_every: u64,
    /// Object-store URI under which `jobs/<job>/ckpt/<step>/` goes; default: rank 0's output
    /// directory (the job's output store).
    pub store: Option<String>,
    /// How long the end of a run waits for its last checkpoint upload before giving up on it.
    #[serde(default = "default_final_wait_s")]
    pub final_wait_s: u64,
}

/// The largest `cluster.grad_bucket_mb`: one bucket of 4 GiB is already the whole gradient of
/// a billion-parameter model.
const MAX_GRAD_BUCKET_MB: f64 = 4096.0;

fn default_keep_last() -> u32 {
    3
}
fn default_true() -> bool {
    true
}

fn default_final_wait_s() -> u64 {
    600
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec { every: 0, keep_last: default_keep_last(), keep_every: 0, store: None, final_wait_s: default_final_wait_s() }
    }
}

impl CheckpointSpec {
    fn validate(&self) -> Result<(), SpecError> {
        if self.keep_last == 0 {
            return Err(err("checkpoint.keep_last", "must be at least 1 (the newest checkpoint is always kept)"));
        }
        if self.store.as_ref().is_some_and(|s| s.trim().is_empty()) {
            return Err(err("checkpoint.store", "must name an object-store URI or a path (or leave it out)"));
        }
        Ok(())
    }
}

fn default_world_size() -> u32 {
    1
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec { world_size: 1, device: Device::Cpu, grad_bucket_mb: None, preemptible: true }
    }
}

/// An engine training-config error under the spec's name for the field.
fn train_field_err(field: &str, message: String) -> SpecError {
    let field = match field {
        "batch_size" => "train.micro_batch".to_string(),
        "max_lr" => "train.lr".to_string(),
        f => format!("train.{f}"),
    };
    err(&field, message)
}

impl JobSpec {
    /// Parses and validates a spec.
    pub fn parse(text: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| {
            let (field, message) = toml_error::describe(text, &e);
            err(&field, message)
        })?;
        spec.validate()?;
        given_for_text_only(text)?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobSpec always serializes")
    }

    /// `cluster.grad_bucket_mb` in f32 values (0: no buckets; None: unset).
    pub fn grad_bucket_floats(&self) -> Option<usize> {
        self.cluster.grad_bucket_mb.map(|mb| (mb * 1024.0 * 1024.0 / 4.0) as usize)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() {
            return Err(err("name", "must not be empty"));
        }
        locations::check_name(&self.name)?;
        locations::check(self)?;
        self.checkpoint.validate()?;
        if self.cluster.world_size == 0 {
            return Err(err("cluster.world_size", "must be at least 1"));
        }
        if let Some(mb) = self.cluster.grad_bucket_mb {
            if !(0.0..=MAX_GRAD_BUCKET_MB).contains(&mb) {
                return Err(err("cluster.grad_bucket_mb", format!("{mb} is not in 0..={MAX_GRAD_BUCKET_MB} (MiB; 0 averages after the backward pass)")));
            }
        }
        let t = &self.train;
        if t.steps == 0 {
            return Err(err("train.steps", "must be at least 1"));
        }
        if t.micro_batch == 0 {
            return Err(err("train.micro_batch", "must be at least 1"));
        }
        let per_pass = self.cluster.world_size as usize * t.micro_batch;
        if t.global_batch == 0 || t.global_batch % per_pass != 0 {
            return Err(err(
                "train.global_batch",
                format!(
                    "{} is not a positive multiple of cluster.world_size x train.micro_batch = {} x {} = {per_pass}",
                    t.global_batch, self.cluster.world_size, t.micro_batch
                ),
            ));
        }
        if t.eval_batches == 0 {
            return Err(err("train.eval_batches", "must be at least 1"));
        }
        match t.schedule.as_deref().map(|n| (n, LrDecay::parse(n))) {
            Some((n, None)) => return Err(err("train.schedule", format!("{n:?} is not one of: {}", LrDecay::NAMES))),
            Some((_, Some(LrDecay::Wsd))) => {}
            _ if t.cooldown_steps.is_some() => return Err(err("train.cooldown_steps", "only for schedule = \"wsd\"")),
            _ => {}
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            return Err(err("data.val_fraction", format!("{} is outside [0, 1)", self.data.val_fraction)));
        }
        if t.grad_clip < 0.0 || t.grad_clip.is_nan() {
            return Err(err("train.grad_clip", format!("{}: a gradient norm to clip at, or 0 for no clipping", t.grad_clip)));
        }
        match &t.eval_choices {
            Some(c) if c.trim().is_empty() => return Err(err("train.eval_choices", "must name a JSON-lines file (or leave it out)")),
            Some(_) if self.kind == JobKind::Finetune || self.arch()? != Arch::Gpt => {
                return Err(err("train.eval_choices", "only for GPT pretraining (arch = \"gpt\")"))
            }
            None if t.eval_choices_max > 0 => return Err(err("train.eval_choices_max", "only with train.eval_choices")),
            _ => {}
        }
        if self.kind == JobKind::Finetune {
            return self.validate_finetune();
        }
        if self.finetune.is_some() {
            return Err(err("finetune", "only for kind = \"finetune\""));
        }
        if !["char", "byte", "gpt2"].contains(&self.data.tokenizer.as_str()) {
            return Err(err("data.tokenizer", format!("{:?} is not one of: char, byte, gpt2", self.data.tokenizer)));
        }
        if self.data.tokenizer == "gpt2" && self.arch()? != Arch::Gpt {
            return Err(err("data.tokenizer", "\"gpt2\" over a text is for GPT jobs (arch = \"gpt\")"));
        }
        if !self.data.mix.is_empty() {
            self.validate_mix()?;
        }
        match (&self.data.text, &self.data.corpus) {
            (Some(_), Some(_)) => return Err(err("data.corpus", "give either data.text or data.corpus, not both")),
            (None, None) if !self.data.mix.is_empty() => {}
            (None, None) => return Err(err("data.text", "required (a text file), unless data.corpus names a prepared corpus or data.mix several")),
            (Some(t), None) if t.trim().is_empty() => return Err(err("data.text", "must name a text file")),
            (None, Some(c)) if c.trim().is_empty() => return Err(err("data.corpus", "must name a corpus URI")),
            _ => {}
        }
        if let Some(init) = &self.model.init_from {
            return self.validate_init_from(init);
        }
        if let Some(v) = self.model.vocab_size {
            // a job's vocabulary is always its tokenizer's: a value here was never used (a
            // smaller one cannot hold the data's ids, a larger one is what pad_vocab_to is for)
            let pad = if self.arch()? == Arch::Gpt { "; model.pad_vocab_to rounds it up" } else { "" };
            return Err(err(
                "model.vocab_size",
                format!("{v}: the vocabulary is the tokenizer's (data.tokenizer, or the corpus's): leave model.vocab_size out{pad}"),
            ));
        }
        // The model and optimizer configs validate their own fields; prefix them with their table.
        let block_size = match self.arch()? {
            Arch::Gpt => {
                self.check_family_fields_absent()?;
                self.model_config(self.model.vocab_size.unwrap_or(256))?.block_size
            }
            Arch::Bert | Arch::T5 => {
                if self.model.pad_vocab_to.is_some() {
                    return Err(err("model.pad_vocab_to", "only for arch = \"gpt\" (BERT and T5 keep their special ids at the top of the vocabulary)"));
                }
                let fam = self.family_config(self.model.vocab_size.unwrap_or(256))?;
                if matches!(fam, FamilyConfig::Bert { objective: BertObjective::Contrastive, .. }) && self.train.micro_batch < 2 {
                    return Err(err("train.micro_batch", "the contrastive objective needs at least 2 pairs per micro-batch (in-batch negatives)"));
                }
                fam.max_positions()
            }
        };
        self.train_config().validate(block_size).map_err(|e| train_field_err(e.field.as_str(), e.message))?;
        Ok(())
    }

    /// The checks of `[[data.mix]]`: only beside no other data, each corpus named, each weight
    /// giving at least one sequence of every step's global batch (so each source's share of
    /// every step is within one sequence of exact: `smelt_corpus::mixture`).
    fn validate_mix(&self) -> Result<(), SpecError> {
        if self.data.text.is_some() || self.data.corpus.is_some() {
            let field = if self.data.text.is_some() { "data.text" } else { "data.corpus" };
            return Err(err(field, "give either data.mix or a single data.text / data.corpus, not both"));
        }
        if self.arch()? != Arch::Gpt {
            return Err(err("data.mix", "only for GPT pretraining (arch = \"gpt\")"));
        }
        for (i, m) in self.data.mix.iter().enumerate() {
            if m.corpus.trim().is_empty() {
                return Err(err(&format!("data.mix[{i}].corpus"), "must name a prepared corpus"));
            }
            if !(m.weight.is_finite() && m.weight > 0.0) {
                return Err(err(&format!("data.mix[{i}].weight"), format!("{} is not a positive number", m.weight)));
            }
            // a source is named by its corpus (metrics, events): one entry each
            if let Some(j) = self.data.mix[..i].iter().position(|o| o.corpus.trim() == m.corpus.trim()) {
                return Err(err(&format!("data.mix[{i}].corpus"), format!("{:?} is data.mix[{j}]'s too: give one entry the two weights' sum", m.corpus)));
            }
        }
        let total: f64 = self.data.mix.iter().map(|m| m.weight).sum();
        for (i, m) in self.data.mix.iter().enumerate() {
            let per_step = m.weight / total * self.train.global_batch as f64;
            // (the slack of smelt_corpus::mixture: a share of exactly one, rounded below it by f64)
            if per_step < 1.0 - 1e-9 {
                return Err(err(
                    &format!("data.mix[{i}].weight"),
                    format!(
                        "{} of {total} gives {per_step:.3} of the {} sequences of a step; each source needs at least 1 per step \
                         (raise its weight or train.global_batch)",
                        m.weight, self.train.global_batch
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Sequences each worker processes per micro-batch pass times passes per step.
    pub fn grad_accum(&self) -> usize {
        self.train.global_batch / (self.cluster.world_size as usize * self.train.micro_batch)
    }

    /// The model config, with the vocabulary size the tokenizer decided (rounded up to a
    /// multiple of `model.pad_vocab_to` when given).
    pub fn model_config(&self, vocab_size: usize) -> Result<GptConfig, SpecError> {
        let m = &self.model;
        let mut cfg = match &m.preset {
            Some(p) => GptConfig::preset(p).map_err(|e| err("model.preset", e.message))?,
            None => {
                let need = |v: Option<usize>, f: &str| v.ok_or_else(|| err(&format!("model.{f}"), "required when model.preset is not given"));
                GptConfig {
                    vocab_size,
                    block_size: need(m.block_size, "block_size")?,
                    n_layer: need(m.n_layer, "n_layer")?,
                    n_head: need(m.n_head, "n_head")?,
                    n_embd: need(m.n_embd, "n_embd")?,
                    ln_placement: m.ln_placement.unwrap_or_default(),
                    positions: Default::default(),
                }
            }
        };
        cfg.vocab_size = match m.pad_vocab_to {
            None => vocab_size,
            Some(k) if (1..=MAX_VOCAB_PAD).contains(&k) => vocab_size.div_ceil(k) * k,
            Some(k) => return Err(err("model.pad_vocab_to", format!("{k} is not in 1..={MAX_VOCAB_PAD}"))),
        };
        if let Some(v) = m.n_layer {
            cfg.n_layer = v;
        }
        if let Some(v) = m.n_head {
            cfg.n_head = v;
        }
        if let Some(v) = m.n_embd {
            cfg.n_embd = v;
        }
        if let Some(v) = m.block_size {
            cfg.block_size = v;
        }
        cfg.ln_placement = m.ln_placement.unwrap_or_default();
        cfg.positions = match m.positions.as_deref() {
            None | Some("learned") => GptPositions::Learned,
            Some("rotary") => GptPositions::Rotary,
            Some(o) => return Err(err("model.positions", format!("{o:?} is not one of: learned, rotary (a GPT's positions)"))),
        };
        cfg.validate().map_err(|e| err(&format!("model.{}", e.field), e.message))?;
        Ok(cfg)
    }

    /// The engine's training config for one worker.
    pub fn train_config(&self) -> TrainConfig {
        let t = &self.train;
        TrainConfig {
            batch_size: t.micro_batch,
            seq_len: t.seq_len,
            grad_accum: self.grad_accum().max(1),
            steps: t.steps,
            schedule: LrSchedule {
                max_lr: t.lr,
                min_lr: t.min_lr.unwrap_or(t.lr / 10.0),
                warmup_steps: t.warmup_steps,
                decay_steps: t.steps,
                // validated in `validate`: an unknown name never gets here
                decay: t.schedule.as_deref().and_then(LrDecay::parse).unwrap_or_default(),
                // default: a fifth of the steps, never more than warm-up leaves
                cooldown_steps: t.cooldown_steps.unwrap_or((t.steps / 5).min(t.steps.saturating_sub(t.warmup_steps))),
            },
            optim: AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: 1e-8,
                weight_decay: t.weight_decay,
                decay_embeddings: t.decay_embeddings,
                grad_clip: (t.grad_clip > 0.0).then_some(t.grad_clip),
            },
            eval_interval: t.eval_interval,
            eval_batches: t.eval_batches,
            seed: self.seed,
        }
    }
}

#[cfg(test)]
mod tests;
