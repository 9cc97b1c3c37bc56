//! Tokenizers and corpora. Byte and character tokenizers now; GPT-2 BPE and sharded corpora in
//! object storage arrive with the corpus work.

pub mod tokenizer;

pub use tokenizer::{Tokenizer, TokenizerError};
