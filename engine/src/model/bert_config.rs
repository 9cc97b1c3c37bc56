//! BERT configuration: sizes, the family options (LayerNorm placement, positions, attention
//! score), the heads, dropout, presets and validation.

use serde::{Deserialize, Serialize};

use crate::backend::ScoreKind;
use super::config_checks::{check_sizes, unknown_preset};
use crate::error::ConfigError;
use crate::model::gpt_config::LayerNormPlacement;

/// How positions enter the embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// A learned `(max_positions, C)` table.
    #[default]
    Learned,
    /// The fixed sin/cos table of the original Transformer (no parameters).
    Sinusoidal,
}

/// How a sequence becomes one vector for the contrastive objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean of the final hidden states over the sequence's real (unpadded) tokens.
    #[default]
    Mean,
    /// The final hidden state of the first token ([CLS]).
    Cls,
}

fn default_types() -> usize {
    2
}
fn default_temperature() -> f32 {
    0.05
}
fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertConfig {
    pub vocab_size: usize,
    /// Longest sequence (rows of the learned position table).
    pub max_positions: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// FFN width (BERT: 4 * n_embd).
    pub n_inner: usize,
    /// Segment (token type) count; BERT uses 2 (sentence A / B).
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    /// BERT is post-LN; pre-LN adds a final LayerNorm after the last layer.
    #[serde(default = "post")]
    pub ln_placement: LayerNormPlacement,
    #[serde(default)]
    pub positions: Positions,
    #[serde(default)]
    pub scores: ScoreKind,
    /// Width A of the additive score (ignored by the others); 0 means the head width.
    #[serde(default)]
    pub additive_width: usize,
    /// Pooler + next-sentence-prediction head.
    #[serde(default = "default_true")]
    pub nsp: bool,
    /// Sequence-classification labels (0: no classification head).
    #[serde(default)]
    pub num_labels: usize,
    #[serde(default)]
    pub pooling: Pooling,
    /// InfoNCE temperature.
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Dropout probability in training passes (HF BERT's `hidden_dropout_prob`): after the
    /// embedding LayerNorm and on every sublayer's output before its residual add; none on the
    /// attention probabilities. 0 (the default, left out of the serialized config) disables it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropout: f32,
}

fn is_zero(p: &f32) -> bool {
    *p == 0.0
}

fn post() -> LayerNormPlacement {
    LayerNormPlacement::Post
}

pub const PRESETS: &[(&str, &str)] = &[
    ("bert-base", "BERT base: 12 layers, 12 heads, 768 wide, 512 positions, 30522 tokens"),
    ("bert-large", "BERT large: 24 layers, 16 heads, 1024 wide"),
    ("bert-tiny", "2 layers, 2 heads, 128 wide, 128 positions, 256 tokens: quick CPU runs"),
    ("bert-test", "2 layers, 2 heads, 32 wide, 32 positions, 64 tokens: unit tests"),
];

impl BertConfig {
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let cfg = |vocab_size, max_positions, n_layer, n_head, n_embd: usize| BertConfig {
            vocab_size,
            max_positions,
            n_layer,
            n_head,
            n_embd,
            n_inner: 4 * n_embd,
            type_vocab_size: 2,
            ln_placement: LayerNormPlacement::Post,
            positions: Positions::Learned,
            scores: ScoreKind::Dot,
            additive_width: 0,
            nsp: true,
            num_labels: 0,
            pooling: Pooling::Mean,
            temperature: default_temperature(),
            dropout: 0.0,
        };
        Ok(match name {
            "bert-base" => cfg(30522, 512, 12, 12, 768),
            "bert-large" => cfg(30522, 512, 24, 16, 1024),
            "bert-tiny" => cfg(256, 128, 2, 2, 128),
            "bert-test" => cfg(64, 32, 2, 2, 32),
            _ => return Err(unknown_preset("BERT", name, PRESETS)),
        })
    }

    /// Training FLOPs (3x the forward's matmul FLOPs) per token with the MLM head on every
    /// position (as HF computes it): per layer q, k, v, o (4 C^2) and the FFN (2 C F) per token,
    /// attention's scores and weighted sum over all T keys (2 C T MACs); the head's dense (C^2)
    /// and tied decoder (C V). The convention of `GptConfig::flops_per_token`.
    pub fn flops_per_token(&self, t: usize) -> f64 {
        let (c, f, v, l, t) = (self.n_embd as f64, self.n_inner as f64, self.vocab_size as f64, self.n_layer as f64, t as f64);
        let macs = l * (4.0 * c * c + 2.0 * c * f + 2.0 * c * t) + c * c + c * v;
        6.0 * macs
    }

    /// Rows of the tied LM head's GEMMs: the vocabulary rounded up (model/padded_head.rs).
    pub fn head_rows(&self) -> usize {
        super::padded_head::head_rows(self.vocab_size)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The additive score's width A.
    pub fn additive_width(&self) -> usize {
        if self.additive_width == 0 {
            self.head_dim()
        } else {
            self.additive_width
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_sizes(
            &[
                ("vocab_size", self.vocab_size),
                ("max_positions", self.max_positions),
                ("n_layer", self.n_layer),
                ("n_head", self.n_head),
                ("n_embd", self.n_embd),
                ("n_inner", self.n_inner),
                ("type_vocab_size", self.type_vocab_size),
            ],
            self.n_embd,
            self.n_head,
            self.vocab_size,
        )?;
        if self.num_labels == 1 {
            return Err(ConfigError::new("num_labels", "a classifier needs at least 2 labels (0 disables it)"));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(ConfigError::new("temperature", format!("{} must be a positive number", self.temperature)));
        }
        crate::cpu::dropout::check_probability(self.dropout)?;
        Ok(())
    }
}
