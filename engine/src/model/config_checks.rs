//! Checks every model config shares (BERT's and T5's; GPT's predates them and keeps its own
//! wording): sizes at least 1, heads dividing the width, ids fitting u32, and the error for an
//! unknown preset.

use crate::error::ConfigError;

/// The largest value a size field takes: far above any model trained today (GPT-3 175B: 96
/// layers, 96 heads, 12,288 wide), low enough that a typo (`n_embd = 4294967296`) is refused
/// here, naming the field, rather than overflowing the parameter count or aborting the worker
/// on an allocation no machine has.
pub fn max_size(field: &str) -> Option<usize> {
    Some(match field {
        "n_layer" | "n_decoder_layer" | "n_head" | "type_vocab_size" => 1 << 10,
        "n_embd" => 1 << 16,
        "n_inner" | "block_size" | "max_positions" => 1 << 20,
        _ => return None,
    })
}

/// `v` of `field` within 1..=[`max_size`].
pub(crate) fn check_size(field: &'static str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::new(field, "must be at least 1"));
    }
    match max_size(field) {
        Some(max) if v > max => Err(ConfigError::new(field, format!("{v} is more than {max}, the most this accepts"))),
        _ => Ok(()),
    }
}

/// Each `(field, value)` must be at least 1 (and at most [`max_size`]); `n_embd` must split into
/// `n_head` heads; the vocabulary must fit u32 token ids (with `u32::MAX` kept for IGNORE_INDEX).
pub(crate) fn check_sizes(sizes: &[(&'static str, usize)], n_embd: usize, n_head: usize, vocab_size: usize) -> Result<(), ConfigError> {
    for &(field, v) in sizes {
        check_size(field, v)?;
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
