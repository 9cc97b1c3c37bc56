//! T5-style encoder-decoder configuration: sizes, family options, presets, validation.

use serde::{Deserialize, Serialize};

use crate::backend::ScoreKind;
use super::config_checks::{check_sizes, unknown_preset};
use crate::error::ConfigError;
use crate::model::bert_config::Positions;
use crate::model::gpt_config::LayerNormPlacement;

fn sinusoidal() -> Positions {
    Positions::Sinusoidal
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct T5Config {
    pub vocab_size: usize,
    /// Longest encoder or decoder sequence (rows of a learned position table; sinusoidal
    /// positions are computed up to it).
    pub max_positions: usize,
    /// Encoder layers.
    pub n_layer: usize,
    pub n_decoder_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// FFN width.
    pub n_inner: usize,
    /// T5 is pre-LN.
    #[serde(default)]
    pub ln_placement: LayerNormPlacement,
    #[serde(default = "sinusoidal")]
    pub positions: Positions,
    #[serde(default)]
    pub scores: ScoreKind,
    /// Width A of the additive score; 0 means the head width.
    #[serde(default)]
    pub additive_width: usize,
    /// The tied head reads the decoder output times C^-0.5 (Mesh TensorFlow's and Hugging Face's
    /// T5 with tied embeddings). Without it the decoder input's own token got a logit of ~sqrt(C)
    /// at initialisation (the residual stream carries sqrt(C) * its row of `shared`), and a new
    /// model started at about twice the uniform loss. Every new config has it; a checkpoint
    /// written before it existed reads as false and computes what it was trained with.
    #[serde(default)]
    pub scaled_head: bool,
}

pub const PRESETS: &[(&str, &str)] = &[
    ("t5-small", "T5 small: 6 + 6 layers, 8 heads, 512 wide, FFN 2048, 32128 tokens, 512 positions"),
    ("t5-tiny", "2 + 2 layers, 2 heads, 128 wide, 128 positions, 256 tokens: quick CPU runs"),
    ("t5-test", "2 + 2 layers, 2 heads, 32 wide, 32 positions, 64 tokens: unit tests"),
];

impl T5Config {
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let cfg = |vocab_size, max_positions, n_layer, n_head, n_embd: usize, n_inner| T5Config {
            vocab_size,
            max_positions,
            n_layer,
            n_decoder_layer: n_layer,
            n_head,
            n_embd,
            n_inner,
            ln_placement: LayerNormPlacement::Pre,
            positions: Positions::Sinusoidal,
            scores: ScoreKind::Dot,
            additive_width: 0,
            scaled_head: true,
        };
        Ok(match name {
            "t5-small" => cfg(32128, 512, 6, 8, 512, 2048),
            "t5-tiny" => cfg(256, 128, 2, 2, 128, 512),
            "t5-test" => cfg(64, 32, 2, 2, 32, 128),
            _ => return Err(unknown_preset("T5", name, PRESETS)),
        })
    }

    /// Training FLOPs per encoder (input) token, Te encoder and Td decoder positions: the
    /// encoder as BERT's layers; per decoder token causal self-attention (4 C^2 + 2 C Td, the
    /// full map counted), cross-attention's q and o (2 C^2) and scores over Te keys (2 C Te), the
    /// FFN (2 C F) and the tied head (C V); the cross-attention's k and v run on the encoder
    /// output (2 C^2 per encoder token per decoder layer). Decoder work is scaled by Td/Te.
    pub fn flops_per_input_token(&self, te: usize, td: usize) -> f64 {
        let (c, f, v) = (self.n_embd as f64, self.n_inner as f64, self.vocab_size as f64);
        let (le, ld, te_f, td_f) = (self.n_layer as f64, self.n_decoder_layer as f64, te as f64, td as f64);
        let enc = le * (4.0 * c * c + 2.0 * c * f + 2.0 * c * te_f) + ld * 2.0 * c * c;
        let dec = ld * (4.0 * c * c + 2.0 * c * td_f + 2.0 * c * c + 2.0 * c * te_f + 2.0 * c * f) + c * v;
        6.0 * (enc + dec * td_f / te_f)
    }

    /// Rows of the tied LM head's GEMMs: the vocabulary rounded up (model/padded_head.rs).
    pub fn head_rows(&self) -> usize {
        super::padded_head::head_rows(self.vocab_size)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

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
                ("n_decoder_layer", self.n_decoder_layer),
                ("n_head", self.n_head),
                ("n_embd", self.n_embd),
                ("n_inner", self.n_inner),
            ],
            self.n_embd,
            self.n_head,
            self.vocab_size,
        )?;
        Ok(())
    }
}
