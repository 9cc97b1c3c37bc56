//! Tokenizers and corpora. Byte and character tokenizers now; GPT-2 BPE and sharded corpora in
//! object storage arrive with the corpus work. [`sample_order`] is the data plan shared by the
//! coordinator and the workers.

pub mod sample_order;
pub mod tokenizer;

pub use sample_order::{rank_slice, SampleOrder, SampleOrderError, Sequences};
pub use tokenizer::{Tokenizer, TokenizerError};
