//! Checks every model config shares (BERT's and T5's; GPT's predates them and keeps its own
//! wording): sizes at least 1, heads dividing the width, ids fitting u32, and the error for an
//! unknown preset.

use crate::error::ConfigError;

/// Each `(field, value)` must be at least 1; `n_embd` must split into `n_head` heads; the
/// vocabulary must fit u32 token ids (with `u32::MAX` kept for IGNORE_INDEX).
pub(crate) fn check_sizes(sizes: &[(&'static str, usize)], n_embd: usize, n_head: usize, vocab_size: usize) -> Result<(), ConfigError> {
    for &(field, v) in sizes {
        if v == 0 {
            return Err(ConfigError::new(field, "must be at least 1"));
        }
    }
    if !n_embd.is_multiple_of(n_head) {
        return Err(ConfigError::new("n_embd", format!("{n_embd} is not divisible by n_head = {n_head}")));
    }
    if vocab_size > u32::MAX as usize - 1 {
        return Err(ConfigError::new("vocab_size", "must fit in u32 token ids"));
    }
    Ok(())
}

/// The error for a preset name no table entry has, listing the known ones.
pub(crate) fn unknown_preset(family: &str, name: &str, presets: &[(&str, &str)]) -> ConfigError {
    ConfigError::new(
        "preset",
        format!("unknown {family} preset {name:?}; known: {}", presets.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")),
    )
}
