//! Transformer models, each written once against `Backend`.

pub mod gpt;
pub mod gpt_config;

pub use gpt::Gpt;
pub use gpt_config::{GptConfig, LayerNormPlacement};
