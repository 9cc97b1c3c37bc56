//! MANIFEST.json (what a committed checkpoint holds, checked on every read) and trainer.json
//! (where training stands and where the checkpoint came from).

use serde::{Deserialize, Serialize};
use smelt_corpus::Tokenizer;
use smelt_engine::train::TrainerState;

use crate::model_config::ModelConfig;

/// Bumped when a reader of the old format could not read the new one.
pub const FORMAT: &str = "smelt-checkpoint/1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub job_id: String,
    /// Milliseconds since the Unix epoch, when the manifest was written.
    pub created_at_ms: i64,
    pub files: Vec<FileEntry>,
}

/// Where a checkpoint came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// The checkpoint this job started from (`--resume-from`, `init_from`, or a restart's).
    pub parent_checkpoint: Option<String>,
    /// The job that wrote that checkpoint.
    pub parent_job: Option<String>,
}

/// Samples consumed: step s with global batch G consumed global indices [0, s*G) of the seeded
/// sample order, whatever the world size, so (seed, global_batch, step) is the whole position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPosition {
    pub samples_consumed: u64,
    pub global_batch: u64,
    pub seed: u64,
}

/// A GPT fine-tuning job's classification head: its tensors (`score.weight`) follow the GPT's in
/// model.safetensors and optimizer.safetensors, and its parameters follow the GPT's in
/// `Snapshot::params` (and the moments likewise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    pub num_labels: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerJson {
    pub format: String,
    /// Steps completed: a resume starts at this step.
    pub step: u64,
    pub job_id: String,
    pub attempt: u32,
    pub data: DataPosition,
    /// Step counter, AdamW's update count, the data generator.
    pub trainer: TrainerState,
    /// The model (GPT, BERT or T5). A BERT's own classifier is part of its config.
    pub model: ModelConfig,
    /// A classification head trained on top of a GPT (fine-tuning); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadConfig>,
    pub tokenizer: Tokenizer,
    /// The job spec (TOML) as submitted.
    pub spec_toml: String,
    pub lineage: Lineage,
    pub smelt_version: String,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
