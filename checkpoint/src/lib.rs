//! Checkpoints in object storage: a format, an atomic commit, verified reads, retention and an
//! uploader thread that keeps storage off the training loop.
//!
//! ```text
//! <store>/jobs/<job>/ckpt/<step:08>/model.safetensors      fp32 weights, Hugging Face names
//!                                   optimizer.safetensors  AdamW moments: exp_avg.<name>, exp_avg_sq.<name>
//!                                   trainer.json           step, data position, RNG, spec, lineage
//!                                   MANIFEST.json          size + sha256 of each file; written LAST,
//!                                                          create-only: without it, no checkpoint
//! ```
//!
//! - `layout`: names and paths; `manifest`: MANIFEST.json and trainer.json.
//! - `model_config`: what the weights are (GPT, BERT, T5) and the model-file metadata.
//! - `tensors`: the two safetensors files to and from flat host buffers.
//! - `upload`: one object up, multipart when large, transient errors retried with backoff.
//! - `write`: a snapshot to a committed checkpoint; `read`: verified loads, listing, fallback.
//! - `retention`: keep the last N and every M-th; `uploader`: the background thread.
//! - `source`: a model to start from (a checkpoint, a model file, or a job id), verified.
//!
//! Every call blocks the calling thread (object-store I/O runs on `smelt_corpus::store`'s
//! runtime), so this crate is usable from the training thread and from plain tests alike.

pub mod error;
pub mod layout;
pub mod manifest;
pub mod model_config;
pub mod read;
pub mod retention;
pub mod source;
pub mod tensors;
pub mod upload;
pub mod uploader;
pub mod write;

pub use error::CheckpointError;
pub use layout::{checkpoints_root, step_dir_name, step_of_uri};
pub use manifest::{FileEntry, Lineage, Manifest, TrainerJson};
pub use manifest::HeadConfig;
pub use model_config::ModelConfig;
pub use read::{
    list_committed, load_latest_good, load_model_verified, load_or_fall_back, load_verified, load_verified_dir, verify, Checkpoint,
    Resumed, Skipped, VerifiedModel,
};
pub use source::{looks_like_job_id, resolve_model, JobLocations, ModelSource};
pub use retention::{plan_deletions, Retention};
pub use upload::{RetryPolicy, UploadOptions};
pub use uploader::{AsyncCheckpointer, Outcome, Submitted};
pub use write::{commit, set_aside, Committed, Snapshot, SET_ASIDE_MANIFEST};
