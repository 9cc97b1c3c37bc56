//! GPT configuration: named presets, explicit sizes, validation.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Where LayerNorm sits relative to the residual add.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LayerNormPlacement {
    /// `x + f(LN(x))`, GPT-2 and later: stable without warm-up tricks.
    #[default]
    Pre,
    /// `LN(x + f(x))`, the original Transformer.
    Post,
}

/// How a GPT knows where each token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GptPositions {
    /// A learned (block_size, C) table added to the token embeddings (GPT-2).
    #[default]
    Learned,
    /// Rotary embeddings (RoPE, base 10,000, "rotate half" as GPT-NeoX and Llama) turning q and
    /// k in every attention layer: no position table, relative positions in the scores.
    Rotary,
}

impl GptPositions {
    fn is_learned(&self) -> bool {
        *self == GptPositions::Learned
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Longest sequence; rows of the learned position table.
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    #[serde(default)]
    pub ln_placement: LayerNormPlacement,
    /// Learned table (default, and what model files before this field hold) or rotary. Left
    /// out of files when learned, so that earlier versions still read them.
    #[serde(default, skip_serializing_if = "GptPositions::is_learned")]
    pub positions: GptPositions,
}

/// Preset names and what they are, for help texts and errors.
pub const PRESETS: &[(&str, &str)] = &[
    ("gpt2-124m", "GPT-2 small: 12 layers, 12 heads, 768 wide, 1024 positions, 50257 tokens"),
    ("gpt2-350m", "GPT-2 medium: 24 layers, 16 heads, 1024 wide"),
    ("gpt2-774m", "GPT-2 large: 36 layers, 20 heads, 1280 wide"),
    ("gpt2-1558m", "GPT-2 XL: 48 layers, 25 heads, 1600 wide"),
    ("char-small", "nanoGPT's Shakespeare-char model: 6 layers, 6 heads, 384 wide, 256 positions"),
    ("tiny", "4 layers, 4 heads, 128 wide, 128 positions: quick CPU runs"),
    ("test", "2 layers, 2 heads, 32 wide, 32 positions: unit tests"),
];

impl GptConfig {
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let gpt2 = |n_layer, n_head, n_embd| GptConfig {
            vocab_size: 50257,
            block_size: 1024,
            n_layer,
            n_head,
            n_embd,
            ln_placement: LayerNormPlacement::Pre,
            positions: Default::default(),
        };
        let small = |n_layer, n_head, n_embd, block_size| GptConfig {
            vocab_size: 256,
            block_size,
            n_layer,
            n_head,
            n_embd,
            ln_placement: LayerNormPlacement::Pre,
            positions: Default::default(),
        };
        Ok(match name {
            "gpt2-124m" => gpt2(12, 12, 768),
            "gpt2-350m" => gpt2(24, 16, 1024),
            "gpt2-774m" => gpt2(36, 20, 1280),
            "gpt2-1558m" => gpt2(48, 25, 1600),
            "char-small" => small(6, 6, 384, 256),
            "tiny" => small(4, 4, 128, 128),
            "test" => small(2, 2, 32, 32),
            _ => {
                return Err(ConfigError::new(
                    "preset",
                    format!(
                        "unknown preset {name:?}; known presets: {}",
                        PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ];
        for (field, v) in positive {
            super::config_checks::check_size(field, v)?;
        }
        if self.n_embd % self.n_head != 0 {
            return Err(ConfigError::new(
                "n_embd",
                format!("{} is not divisible by n_head = {}", self.n_embd, self.n_head),
            ));
        }
        if self.positions == GptPositions::Rotary && (self.n_embd / self.n_head) % 2 != 0 {
            return Err(ConfigError::new(
                "n_embd",
                format!("rotary positions turn pairs of channels: the head width n_embd / n_head = {} must be even", self.n_embd / self.n_head),
            ));
        }
        if self.vocab_size > u32::MAX as usize - 1 {
            return Err(ConfigError::new("vocab_size", "must fit in u32 token ids"));
        }
        Ok(())
    }

    /// Rows of the LM head's GEMMs: the vocabulary rounded up (GPT-2's 50,257 -> 50,304, what
    /// llm.c and the PyTorch peer train with; model/padded_head.rs).
    pub fn head_rows(&self) -> usize {
        super::padded_head::head_rows(self.vocab_size)
    }

    /// Parameter count (the LM head is tied to `wte` and not counted twice).
    pub fn num_params(&self) -> usize {
        let (c, l) = (self.n_embd, self.n_layer);
        let per_layer = 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c);
        self.vocab_size * c + self.position_params() + l * per_layer + 2 * c
    }

    /// Values in the learned position table (none with rotary positions).
    pub fn position_params(&self) -> usize {
        match self.positions {
            GptPositions::Learned => self.block_size * self.n_embd,
            GptPositions::Rotary => 0,
        }
    }

    /// Training FLOPs per token: 6 per parameter that touches every token (all but the position
    /// table) plus attention's scores and weighted sum, 6 * 2 * L * C * T forward and backward
    /// for a full T x T map (PaLM appendix B; the causal half is not subtracted, as is customary).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let n = (self.num_params() - self.position_params()) as f64;
        6.0 * n + 12.0 * (self.n_layer * self.n_embd * seq_len) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_positions_stay_out_of_files_so_earlier_versions_read_them() {
        let learned = GptConfig::preset("test").unwrap();
        let json = serde_json::to_string(&learned).unwrap();
        assert!(!json.contains("positions"), "{json}");
        assert_eq!(serde_json::from_str::<GptConfig>(&json).unwrap(), learned);
        let rotary = GptConfig { positions: GptPositions::Rotary, ..learned };
        let json = serde_json::to_string(&rotary).unwrap();
        assert!(json.contains(r#""positions":"rotary""#), "{json}");
        assert_eq!(serde_json::from_str::<GptConfig>(&json).unwrap(), rotary);
        let odd = GptConfig { n_embd: 6, n_head: 2, ..rotary };
        assert_eq!(odd.validate().unwrap_err().field, "n_embd", "a head width of 3 has no pairs to turn");
    }
}
