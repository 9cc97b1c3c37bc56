//! The two safetensors files of a checkpoint, to and from flat host buffers. The weights keep
//! the engine's Hugging Face names (so `model.safetensors` is also a model file `smelt sample`
//! reads, whatever the architecture); the AdamW moments use the same names behind `exp_avg.` / `exp_avg_sq.` (PyTorch's
//! names for them), in one file, in table order. A fine-tuning job's classification head
//! (`score.weight`, as in transformers' GPT2ForSequenceClassification) follows the GPT's tensors.

use std::collections::HashMap;

use smelt_corpus::Tokenizer;
use smelt_engine::model::heads::ClassificationHead;
use smelt_engine::params::ParamTable;
use smelt_engine::{weights, CpuBackend};

use crate::error::{CheckpointError, Result};
use crate::manifest::TrainerJson;
use crate::model_config::ModelConfig;

const M_PREFIX: &str = "exp_avg.";
const V_PREFIX: &str = "exp_avg_sq.";

/// Every tensor a checkpoint holds, in `Snapshot::params` order: the model's, then a GPT
/// fine-tuning head's.
pub fn table_of(t: &TrainerJson) -> ParamTable {
    let mut table = t.model.param_table();
    if let Some(h) = t.head {
        for s in ClassificationHead::<CpuBackend>::param_table(h.num_labels, t.model.n_embd()).specs() {
            table.push_like(s);
        }
    }
    table
}

/// The moments' table: every tensor twice, `exp_avg.<name>` then `exp_avg_sq.<name>`.
fn moments_table(table: &ParamTable) -> ParamTable {
    let mut t = ParamTable::new();
    for prefix in [M_PREFIX, V_PREFIX] {
        for s in table.specs() {
            // with the tensor's spare values: the moment buffers have the parameters' layout
            t.push_with_spare(&format!("{prefix}{}", s.name), &s.shape, s.kind, s.init, s.spare);
        }
    }
    t
}

fn tensors_err(uri: &str, e: smelt_engine::EngineError) -> CheckpointError {
    CheckpointError::BadTensors { uri: uri.to_string(), message: e.to_string() }
}

/// model.safetensors, with the metadata smelt's model files carry (format, config, tokenizer,
/// special tokens, step).
pub fn model_bytes(table: &ParamTable, model: &ModelConfig, tokenizer: &Tokenizer, params: &[f32], step: u64) -> Result<Vec<u8>> {
    let meta = model.metadata(tokenizer, &[("step", step.to_string())]);
    weights::to_bytes(table, params, meta).map_err(|e| tensors_err("model.safetensors", e))
}

/// optimizer.safetensors from the two moment buffers.
pub fn optimizer_bytes(table: &ParamTable, m: &[f32], v: &[f32]) -> Result<Vec<u8>> {
    let table = moments_table(table);
    let mut both = Vec::with_capacity(m.len() + v.len());
    both.extend_from_slice(m);
    both.extend_from_slice(v);
    let meta = HashMap::from([("smelt.format".to_string(), "adamw-moments/1".to_string())]);
    weights::to_bytes(&table, &both, meta).map_err(|e| tensors_err("optimizer.safetensors", e))
}

pub fn read_model(table: &ParamTable, bytes: &[u8], uri: &str) -> Result<Vec<f32>> {
    Ok(weights::from_bytes(table, bytes, uri).map_err(|e| tensors_err(uri, e))?.0)
}

/// (m, v) from optimizer.safetensors.
pub fn read_optimizer(table: &ParamTable, bytes: &[u8], uri: &str) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut both, _) = weights::from_bytes(&moments_table(table), bytes, uri).map_err(|e| tensors_err(uri, e))?;
    let v = both.split_off(table.total());
    Ok((both, v))
}
