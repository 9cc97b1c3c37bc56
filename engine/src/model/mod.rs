//! Transformer models, each written once against `Backend`.

pub mod attention_maps;
pub mod bert;
pub mod bert_config;
mod config_checks;
mod flat_params;
mod blocks;
pub mod gpt;
pub mod gpt_config;
pub mod objectives;
pub mod padded_head;
pub mod rotary;
pub mod t5;
pub mod t5_config;
pub mod heads;

pub use bert::{Bert, BertBatch, BertLosses};
pub use bert_config::{BertConfig, Pooling, Positions};
pub use gpt::{Decoder, Gpt};
pub use t5::{T5Attention, T5Batch, T5};
pub use t5_config::T5Config;
pub use gpt_config::{GptConfig, GptPositions, LayerNormPlacement};
