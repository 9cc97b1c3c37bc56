//! Tokenizers and corpora.
//!
//! - [`tokenizer`]: byte, char and GPT-2 BPE ([`gpt2`]) tokenizers.
//! - [`prepare`]: `smelt corpus prepare` — text and JSONL files (gzip too) to token shards and a
//!   manifest in object storage ([`format`] describes the layout), resumable.
//! - [`reader`]: the streaming loader the workers train from: whole shards or coalesced ranged
//!   GETs, prefetching, checks.
//! - [`ranges`]: merging the byte ranges of many small reads into few large GETs.
//! - [`loopback`]: an S3-protocol server on 127.0.0.1 in process, for benchmarks and tests.
//! - [`sample_order`]: the data plan shared by the coordinator and the workers.
//! - [`store`]: object-store URIs (`file://`, paths, `memory://`, `s3://`, `gs://`, `az://`) with
//!   blocking helpers, reusable by anything that keeps files in object storage.

pub mod error;
pub mod format;
mod bpe_merge;
pub mod gpt2;
pub mod input;
pub mod loopback;
pub mod mixture;
mod out_lock;
mod parquet_input;
mod parquet_object;
mod object_read;
pub mod prepare;
pub mod ranges;
pub mod reader;
pub mod sample_order;
pub mod store;
pub mod tokenizer;

pub use error::CorpusError;
pub use format::{Dtype, Manifest, ShardHeader, ShardInfo, SplitInfo, TxtDocs, ValSplit};
pub use prepare::{prepare, NoProgress, PrepareOptions, PrepareReport, Progress};
pub use reader::{CorpusReader, ReaderOptions, ReaderStats, Split, VerifyReport};
pub use sample_order::{rank_slice, SampleOrder, SampleOrderError, Sequences};
pub use store::{ObjectInfo, StoreDir, StoreError};
pub use tokenizer::{Tokenizer, TokenizerError};
