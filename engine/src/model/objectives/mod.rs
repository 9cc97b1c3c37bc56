//! Pretraining objectives on the host: what the data pipeline does to a batch before the model
//! sees it (BERT masking, T5 span corruption) and the contrastive loss over pooled embeddings
//! (a few rows per batch, so computed on the host in f64 for any backend).

pub mod infonce;
pub mod masking;
pub mod span_corruption;

pub use infonce::{info_nce, InfoNce};
pub use masking::{mask_tokens, Masked, MaskingConfig};
pub use span_corruption::{corrupt_spans, reconstruct, SpanCorruption, SpanCorruptionConfig};
