//! BERT's masked-LM corruption: each non-special token is chosen with probability `mask_prob`
//! (independently, as Hugging Face's collator does, rather than exactly 15% per sequence); a
//! chosen token becomes [MASK] 80% of the time, a random non-special token 10%, and stays itself
//! 10%; its target is the original token. Every other target is `IGNORE_INDEX`. Seeded.

use crate::backend::IGNORE_INDEX;
use crate::error::ConfigError;
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct MaskingConfig {
    pub vocab_size: u32,
    pub mask_id: u32,
    /// Never chosen and never drawn as a random replacement: [CLS], [SEP], [PAD], [MASK], ...
    pub special_ids: Vec<u32>,
    /// Share of eligible tokens chosen (BERT: 0.15).
    pub mask_prob: f64,
    /// Of the chosen: share replaced by [MASK] (0.8) and by a random token (0.1); the rest stay.
    pub mask_share: f64,
    pub random_share: f64,
}

impl MaskingConfig {
    /// BERT's 15% with 80/10/10.
    pub fn bert(vocab_size: u32, mask_id: u32, special_ids: Vec<u32>) -> Self {
        MaskingConfig { vocab_size, mask_id, special_ids, mask_prob: 0.15, mask_share: 0.8, random_share: 0.1 }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.mask_prob) {
            return Err(ConfigError::new("mask_prob", format!("{} is outside [0, 1]", self.mask_prob)));
        }
        if !(self.mask_share >= 0.0 && self.random_share >= 0.0 && self.mask_share + self.random_share <= 1.0) {
            return Err(ConfigError::new("mask_share", "mask_share and random_share must be >= 0 and sum to at most 1"));
        }
        if self.mask_id >= self.vocab_size {
            return Err(ConfigError::new("mask_id", format!("{} is outside the vocabulary of {}", self.mask_id, self.vocab_size)));
        }
        if self.special_ids.len() >= self.vocab_size as usize {
            return Err(ConfigError::new("special_ids", "leave at least one ordinary token to draw replacements from"));
        }
        Ok(())
    }

    fn is_special(&self, id: u32) -> bool {
        id == self.mask_id || self.special_ids.contains(&id)
    }
}

/// Model inputs and MLM targets, both shaped like the tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masked {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

pub fn mask_tokens(tokens: &[u32], cfg: &MaskingConfig, rng: &mut Rng) -> Masked {
    let mut inputs = tokens.to_vec();
    let mut targets = vec![IGNORE_INDEX; tokens.len()];
    for (i, &tok) in tokens.iter().enumerate() {
        if cfg.is_special(tok) || rng.next_f64() >= cfg.mask_prob {
            continue;
        }
        targets[i] = tok;
        let r = rng.next_f64();
        if r < cfg.mask_share {
            inputs[i] = cfg.mask_id;
        } else if r < cfg.mask_share + cfg.random_share {
            // rejection keeps the draw uniform over ordinary tokens
            inputs[i] = loop {
                let id = rng.below(cfg.vocab_size as u64) as u32;
                if !cfg.is_special(id) {
                    break id;
                }
            };
        }
    }
    Masked { inputs, targets }
}
