//! A trained model on disk: safetensors with Hugging Face tensor names, plus smelt's metadata
//! (model config, tokenizer, training step) so `smelt sample` needs nothing else.
//!
//! Formats: `gpt/1` (a `GptConfig`), `bert/1` (a `BertConfig`) and `t5/1` (a `T5Config`). A
//! BERT or T5 file also records its special tokens (`smelt.special_tokens`: the tokenizer's
//! vocabulary size and the ids reserved above it), since its vocabulary is the tokenizer's plus
//! those.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use smelt_corpus::Tokenizer;
use smelt_engine::model::heads::ClassificationHead;
use smelt_engine::model::{BertConfig, Gpt, GptConfig, T5Config};
use smelt_engine::params::ParamTable;
use smelt_engine::weights;
use smelt_engine::CpuBackend;
use smelt_jobspec::{BertSpecials, T5Specials};

use smelt_checkpoint::model_config::{KEY_CONFIG, KEY_FORMAT, KEY_SPECIALS, KEY_TOKENIZER};
pub use smelt_checkpoint::model_config::{FORMAT_BERT, FORMAT_T5};
use smelt_checkpoint::ModelConfig;

const FORMAT: &str = smelt_checkpoint::model_config::FORMAT_GPT;

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
    Ok(ModelConfig::Gpt(config.clone()).metadata(tokenizer, extra))
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
    let Some(format) = meta.get(KEY_FORMAT) else {
        // Most often a Hugging Face checkpoint given as it is.
        return Err(anyhow!(
            "{shown}: not a smelt model (metadata lacks {KEY_FORMAT:?}); a Hugging Face GPT-2 or GPT-NeoX directory is \
             imported first: `smelt import hf DIR OUT.safetensors`"
        ));
    };
    if format == FORMAT_BERT || format == FORMAT_T5 {
        return Err(anyhow!("{shown}: a {format:?} model; this needs a GPT ({FORMAT:?})"));
    }
    if format != FORMAT {
        return Err(anyhow!("{shown}: model format {format:?}, this smelt reads {FORMAT:?}, {FORMAT_BERT:?} and {FORMAT_T5:?}"));
    }
    let config: GptConfig = serde_json::from_str(field(KEY_CONFIG)?).with_context(|| format!("{shown}: bad {KEY_CONFIG}"))?;
    config.validate().with_context(|| format!("{shown}: bad model config"))?;
    let tokenizer: Tokenizer = serde_json::from_str(field(KEY_TOKENIZER)?).with_context(|| format!("{shown}: bad {KEY_TOKENIZER}"))?;
    // A model trained on a prepared corpus has one more id than its tokenizer (end-of-text);
    // a padded vocabulary (`model.pad_vocab_to`) has more ids, never produced by the tokenizer.
    if config.vocab_size < tokenizer.vocab_size() {
        return Err(anyhow!(
            "{shown}: tokenizer has {} tokens but the model's vocab_size is only {}",
            tokenizer.vocab_size(),
            config.vocab_size
        ));
    }
    let table = Gpt::<CpuBackend>::param_table(&config);
    let (params, metadata) = weights::from_bytes(&table, bytes, &shown)?;
    Ok(SavedModel { config, tokenizer, params, metadata })
}

/// The classification head of a GPT fine-tuned as a classifier: its label count and
/// `score.weight` (num_labels, C), read from the same file's bytes. A fine-tuning job's final
/// file says it is one in its metadata (`smelt.head = "classification"`, `smelt.num_labels`); a
/// checkpoint's file in its trainer.json, which `checkpoint_labels` passes on. None for any
/// other GPT.
pub fn classification_head(bytes: &[u8], shown: &str, saved: &SavedModel, checkpoint_labels: Option<usize>) -> Result<Option<(usize, Vec<f32>)>> {
    let n: usize = match checkpoint_labels {
        Some(n) => n,
        None if saved.metadata.get("smelt.head").map(String::as_str) == Some("classification") => saved
            .metadata
            .get("smelt.num_labels")
            .ok_or_else(|| anyhow!("{shown}: a classifier (smelt.head = classification) without smelt.num_labels"))?
            .parse()
            .with_context(|| format!("{shown}: bad smelt.num_labels"))?,
        None => return Ok(None),
    };
    if n == 0 {
        return Err(anyhow!("{shown}: a classifier with smelt.num_labels = 0"));
    }
    let table = ClassificationHead::<CpuBackend>::param_table(n, saved.config.n_embd);
    let (w, _) = weights::from_bytes(&table, bytes, shown)?;
    Ok(Some((n, w)))
}

/// A BERT or T5 model's config with the special ids its vocabulary reserves.
#[derive(Clone, Debug, PartialEq)]
pub enum FamilyModel {
    Bert { config: BertConfig, specials: BertSpecials },
    T5 { config: T5Config, specials: T5Specials },
}

impl FamilyModel {
    /// The same model as a checkpoint records it.
    pub fn model_config(&self) -> ModelConfig {
        match self.clone() {
            FamilyModel::Bert { config, specials } => ModelConfig::Bert { bert: config, specials },
            FamilyModel::T5 { config, specials } => ModelConfig::T5 { t5: config, specials },
        }
    }
    /// The model a checkpoint holds, when it is a BERT or a T5.
    pub fn from_model_config(m: &ModelConfig) -> Option<FamilyModel> {
        match m.clone() {
            ModelConfig::Bert { bert, specials } => Some(FamilyModel::Bert { config: bert, specials }),
            ModelConfig::T5 { t5, specials } => Some(FamilyModel::T5 { config: t5, specials }),
            ModelConfig::Gpt(_) => None,
        }
    }
    fn table(&self) -> ParamTable {
        self.model_config().param_table()
    }
    /// The tokenizer's (or corpus's) vocabulary size: ids below it are text.
    pub fn base_vocab(&self) -> u32 {
        match self {
            FamilyModel::Bert { specials, .. } => specials.base_vocab,
            FamilyModel::T5 { specials, .. } => specials.base_vocab,
        }
    }
}

/// A saved BERT or T5 model.
pub struct SavedFamilyModel {
    pub model: FamilyModel,
    pub tokenizer: Tokenizer,
    pub params: Vec<f32>,
    pub metadata: HashMap<String, String>,
}

/// Any smelt model file.
pub enum AnyModel {
    Gpt(SavedModel),
    Family(SavedFamilyModel),
}

/// Writes a BERT or T5 model: tensors under the engine's (Hugging Face) names, format, config,
/// tokenizer, special tokens and `smelt.<key>` extras.
pub fn save_family(path: &Path, model: &FamilyModel, tokenizer: &Tokenizer, params: &[f32], extra: &[(&str, String)]) -> Result<()> {
    let meta = model.model_config().metadata(tokenizer, extra);
    let bytes = weights::to_bytes(&model.table(), params, meta)?;
    weights::write_atomic(path, &bytes)?;
    Ok(())
}

/// Whether model-file bytes hold a BERT or a T5 (their format says so; `shown` names them).
pub fn is_family(bytes: &[u8], shown: &str) -> Result<bool> {
    let meta = weights::metadata(bytes, shown)?;
    Ok(matches!(meta.get(KEY_FORMAT).map(String::as_str), Some(FORMAT_BERT) | Some(FORMAT_T5)))
}

/// Reads a model of any format.
pub fn load_any(path: &Path) -> Result<AnyModel> {
    let bytes = weights::read_file(path)?;
    any_from_bytes(&bytes, &path.display().to_string())
}

/// A model file's contents of any format (`shown` names it in errors).
pub fn any_from_bytes(bytes: &[u8], shown: &str) -> Result<AnyModel> {
    let meta = weights::metadata(bytes, shown)?;
    match meta.get(KEY_FORMAT).map(String::as_str) {
        Some(FORMAT_BERT) | Some(FORMAT_T5) => Ok(AnyModel::Family(family_from_bytes(bytes, shown)?)),
        _ => Ok(AnyModel::Gpt(from_bytes(bytes, shown)?)),
    }
}

/// A BERT or T5 model file's contents (`shown` names it in errors).
pub fn family_from_bytes(bytes: &[u8], shown: &str) -> Result<SavedFamilyModel> {
    let meta = weights::metadata(bytes, shown)?;
    let field = |k: &str| meta.get(k).ok_or_else(|| anyhow!("{shown}: not a smelt BERT/T5 model (metadata lacks {k:?})"));
    let config = field(KEY_CONFIG)?;
    let specials = field(KEY_SPECIALS)?;
    let bad = |k: &str| format!("{shown}: bad {k}");
    let model = match field(KEY_FORMAT)?.as_str() {
        FORMAT_BERT => {
            let config: BertConfig = serde_json::from_str(config).with_context(|| bad(KEY_CONFIG))?;
            FamilyModel::Bert { config, specials: serde_json::from_str(specials).with_context(|| bad(KEY_SPECIALS))? }
        }
        FORMAT_T5 => {
            let config: T5Config = serde_json::from_str(config).with_context(|| bad(KEY_CONFIG))?;
            FamilyModel::T5 { config, specials: serde_json::from_str(specials).with_context(|| bad(KEY_SPECIALS))? }
        }
        other => return Err(anyhow!("{shown}: model format {other:?} is not {FORMAT_BERT:?} or {FORMAT_T5:?}")),
    };
    // The config's own checks, and that the special ids add up to its vocabulary.
    model.model_config().validate().map_err(|e| anyhow!("{shown}: bad model config: {e}"))?;
    let tokenizer: Tokenizer = serde_json::from_str(field(KEY_TOKENIZER)?).with_context(|| bad(KEY_TOKENIZER))?;
    let base = model.base_vocab() as usize;
    if tokenizer.vocab_size() != base && tokenizer.corpus_vocab_size() != base {
        return Err(anyhow!("{shown}: tokenizer has {} tokens but the model's text vocabulary is {base}", tokenizer.vocab_size()));
    }
    let (params, metadata) = weights::from_bytes(&model.table(), bytes, shown)?;
    Ok(SavedFamilyModel { model, tokenizer, params, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_engine::model::Bert;

    #[test]
    fn family_models_round_trip_and_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::fit("char", "abcdef").unwrap();
        let mut config = BertConfig::preset("bert-test").unwrap();
        config.vocab_size = 6 + 4;
        let model = FamilyModel::Bert { config: config.clone(), specials: BertSpecials::new(6) };
        let params = Bert::new(CpuBackend::new(), config.clone(), 3).unwrap().params_host();
        let path = dir.path().join("bert.safetensors");
        save_family(&path, &model, &tok, &params, &[("objective", "mlm".into())]).unwrap();
        let AnyModel::Family(back) = load_any(&path).unwrap() else { panic!("read as a GPT") };
        assert_eq!((back.model, back.params == params), (model, true));
        assert_eq!(back.metadata["smelt.objective"], "mlm");
        // A GPT reader names what it found.
        let e = load(&path).err().unwrap().to_string();
        assert!(e.contains("bert/1") && e.contains("gpt/1"), "{e}");
        // Special tokens that do not add up to the vocabulary are refused.
        let wrong = FamilyModel::Bert { config, specials: BertSpecials::new(5) };
        save_family(&path, &wrong, &tok, &params, &[]).unwrap();
        let e = load_any(&path).err().unwrap().to_string();
        assert!(e.contains("vocab_size 10"), "{e}");
    }
}
