//! A trained model on disk: safetensors with Hugging Face tensor names, plus smelt's metadata
//! (model config, tokenizer, training step) so `smelt sample` needs nothing else.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use smelt_corpus::Tokenizer;
use smelt_engine::model::{Gpt, GptConfig};
use smelt_engine::weights;
use smelt_engine::CpuBackend;

const KEY_FORMAT: &str = "smelt.format";
const KEY_CONFIG: &str = "smelt.config";
const KEY_TOKENIZER: &str = "smelt.tokenizer";
const FORMAT: &str = "gpt/1";

pub struct SavedModel {
    pub config: GptConfig,
    pub tokenizer: Tokenizer,
    pub params: Vec<f32>,
    pub metadata: HashMap<String, String>,
}

pub fn save(path: &Path, config: &GptConfig, tokenizer: &Tokenizer, params: &[f32], extra: &[(&str, String)]) -> Result<()> {
    let table = Gpt::<CpuBackend>::param_table(config);
    let bytes = weights::to_bytes(&table, params, metadata(config, tokenizer, extra)?)?;
    weights::write_atomic(path, &bytes)?;
    Ok(())
}

/// The metadata of a smelt model file: format, config, tokenizer, and `smelt.<key>` extras.
pub fn metadata(config: &GptConfig, tokenizer: &Tokenizer, extra: &[(&str, String)]) -> Result<HashMap<String, String>> {
    let mut meta = HashMap::new();
    meta.insert(KEY_FORMAT.to_string(), FORMAT.to_string());
    meta.insert(KEY_CONFIG.to_string(), serde_json::to_string(config)?);
    meta.insert(KEY_TOKENIZER.to_string(), serde_json::to_string(tokenizer)?);
    for (k, v) in extra {
        meta.insert(format!("smelt.{k}"), v.clone());
    }
    Ok(meta)
}

pub fn load(path: &Path) -> Result<SavedModel> {
    let bytes = weights::read_file(path)?;
    from_bytes(&bytes, &path.display().to_string())
}

/// A model file's contents read from anywhere (`shown` names it in errors).
pub fn from_bytes(bytes: &[u8], shown: &str) -> Result<SavedModel> {
    let shown = shown.to_string();
    let meta = weights::metadata(bytes, &shown)?;
    let field = |k: &str| meta.get(k).ok_or_else(|| anyhow!("{shown}: not a smelt model (metadata lacks {k:?})"));
    let format = field(KEY_FORMAT)?;
    if format != FORMAT {
        return Err(anyhow!("{shown}: model format {format:?}, this smelt reads {FORMAT:?}"));
    }
    let config: GptConfig = serde_json::from_str(field(KEY_CONFIG)?).with_context(|| format!("{shown}: bad {KEY_CONFIG}"))?;
    config.validate().with_context(|| format!("{shown}: bad model config"))?;
    let tokenizer: Tokenizer = serde_json::from_str(field(KEY_TOKENIZER)?).with_context(|| format!("{shown}: bad {KEY_TOKENIZER}"))?;
    // A model trained on a prepared corpus has one more id than its tokenizer: end-of-text.
    if tokenizer.vocab_size() != config.vocab_size && tokenizer.corpus_vocab_size() != config.vocab_size {
        return Err(anyhow!(
            "{shown}: tokenizer has {} tokens but the model's vocab_size is {}",
            tokenizer.vocab_size(),
            config.vocab_size
        ));
    }
    let table = Gpt::<CpuBackend>::param_table(&config);
    let (params, metadata) = weights::from_bytes(&table, bytes, &shown)?;
    Ok(SavedModel { config, tokenizer, params, metadata })
}
