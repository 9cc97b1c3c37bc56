//! Continued pretraining (`[model] init_from`): a GPT pretraining job that starts from a
//! model file's weights (a model `smelt import hf` made of the Hub's GPT-2, an earlier job's
//! result or checkpoint) instead of a seeded initialisation. The file decides the model's
//! config and tokenizer; the job's data must be tokenized the same way, or its ids would mean
//! other text to the model. A restarted attempt resumes from the job's own checkpoints as
//! always: the parent only seeds step 0, and once the job has a checkpoint it no longer needs
//! the parent's file (a resumed attempt whose parent cannot be read takes the model's config
//! and tokenizer from the checkpoint instead).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use smelt_checkpoint::{load_or_fall_back, resolve_model, JobLocations, Lineage, ModelSource};
use smelt_corpus::Tokenizer;
use smelt_engine::model::GptConfig;
use smelt_jobspec::JobSpec;

use crate::{checkpointing, model_file};

/// Where an `init_from` that names a job is looked for.
#[derive(Clone, Copy, Debug)]
pub struct Lookup<'a> {
    /// This worker's output directory (the default store of checkpoints, and of final weights).
    pub out_dir: &'a Path,
    /// The roots the coordinator knows the named job's checkpoints and final weights under
    /// (`Assignment::parent_checkpoint_store`, `parent_final_models`); empty: this worker's own.
    pub parent_checkpoint_store: &'a str,
    pub parent_final_models: &'a str,
}

impl<'a> Lookup<'a> {
    /// Only this worker's own store and output directory (no coordinator's word).
    pub fn local(out_dir: &'a Path) -> Self {
        Lookup { out_dir, parent_checkpoint_store: "", parent_final_models: "" }
    }

    /// What an assignment says, beside `out_dir`.
    pub fn of(a: &'a smelt_proto::v1::Assignment, out_dir: &'a Path) -> Self {
        Lookup { out_dir, parent_checkpoint_store: &a.parent_checkpoint_store, parent_final_models: &a.parent_final_models }
    }
}

/// The model a spec field (`model.init_from`, `finetune.init_from`) names, read and verified by
/// `smelt_checkpoint::resolve_model`: a checkpoint directory or URI (checked against its
/// manifest), a `.safetensors` file, a directory holding one, or the id of a job, whose
/// checkpoints are looked for where the coordinator recorded them, else in this job's checkpoint
/// store, and whose final weights where its rank 0 saved them, else under this worker's
/// output directory.
pub fn resolve(spec: &JobSpec, field: &str, value: &str, at: &Lookup) -> Result<ModelSource> {
    let out_dir = at.out_dir;
    let out = std::path::absolute(out_dir).with_context(|| format!("output directory {}", out_dir.display()))?;
    let checkpoint_store = match at.parent_checkpoint_store {
        "" => checkpointing::store_uri(spec, out_dir)?,
        known => known.to_string(),
    };
    let final_models = match at.parent_final_models {
        "" => out.display().to_string(),
        known => known.to_string(),
    };
    let jobs = JobLocations { checkpoint_store, final_models: Some(final_models) };
    resolve_model(value, &jobs).with_context(|| format!("{field} {:?}", value.trim()))
}

/// A pretraining job's starting model.
pub(crate) struct Parent {
    pub config: GptConfig,
    pub tokenizer: Tokenizer,
    /// The weights of step 0; None when the attempt resumes from a checkpoint and the parent's
    /// file could not be read (the checkpoint holds the weights).
    pub params: Option<Vec<f32>>,
    /// What the job's checkpoints record as where they came from.
    pub lineage: Lineage,
}

/// The model an attempt of a job with `model.init_from` trains: the parent's file; or, when
/// the attempt resumes from checkpoint `resume_from` and the parent cannot be read (moved,
/// deleted, its store unreachable), the checkpoint's config and tokenizer.
pub(crate) fn read_for_attempt(spec: &JobSpec, init_from: &str, at: &Lookup, resume_from: &str) -> Result<Parent> {
    match read_parent(spec, init_from, at) {
        Ok(p) => Ok(p),
        Err(e) if !resume_from.is_empty() => {
            tracing::warn!(target: smelt_proto::JOB_WARNING_TARGET, error = %format!("{e:#}"), checkpoint = resume_from, "model.init_from unreadable; the resumed attempt takes its model from the checkpoint");
            let ck = load_or_fall_back(resume_from).with_context(|| format!("resuming from {resume_from} (model.init_from unreadable: {e:#})"))?.checkpoint;
            let config = ck.trainer.model.gpt().cloned().ok_or_else(|| anyhow!("checkpoint {} holds a {} model, not a GPT", ck.uri, ck.trainer.model.arch()))?;
            let seq = spec.train.seq_len;
            if seq > config.block_size {
                bail!("job spec: `train.seq_len`: {seq} exceeds the block_size {} of the model in checkpoint {}", config.block_size, ck.uri);
            }
            Ok(Parent { config, tokenizer: ck.trainer.tokenizer.clone(), params: None, lineage: Lineage::default() })
        }
        Err(e) => Err(e),
    }
}

/// Reads `model.init_from` (a GPT's file: a BERT or T5 is refused naming the field).
fn read_parent(spec: &JobSpec, init_from: &str, at: &Lookup) -> Result<Parent> {
    let src = resolve(spec, "model.init_from", init_from, at)?;
    for s in &src.skipped {
        tracing::warn!(target: smelt_proto::JOB_WARNING_TARGET, uri = %s.uri, reason = %s.reason, "model.init_from: checkpoint skipped");
    }
    if model_file::is_family(&src.bytes, &src.file)? {
        bail!("model.init_from {init_from:?}: {} is a BERT or T5 model; continued pretraining starts from a GPT", src.file);
    }
    let saved = model_file::from_bytes(&src.bytes, &src.file).with_context(|| format!("model.init_from {init_from:?}"))?;
    let seq = spec.train.seq_len;
    if seq > saved.config.block_size {
        bail!("job spec: `train.seq_len`: {seq} exceeds the block_size {} of the model in model.init_from", saved.config.block_size);
    }
    // (a malformed head is no concern of continued pretraining, which leaves it out anyway)
    if let Some((n, _)) = model_file::classification_head(&src.bytes, &src.file, &saved, src.head.map(|h| h.num_labels)).ok().flatten() {
        tracing::warn!(target: smelt_proto::JOB_WARNING_TARGET, parent = %src.file, "model.init_from: the parent's {n}-label classification head is left out: continued pretraining trains the language-model head");
    }
    let lineage = Lineage { parent_checkpoint: Some(src.file.clone()), parent_job: saved.metadata.get("smelt.job").cloned().or(src.job) };
    Ok(Parent { config: saved.config, tokenizer: saved.tokenizer, params: Some(saved.params), lineage })
}

/// Checks that a text file is tokenized as the parent was trained: `data.tokenizer` must name
/// the parent's tokenizer (whose own vocabulary, a char model's characters included, is used).
pub(crate) fn check_text_tokenizer(spec: &JobSpec, parent: &Parent) -> Result<()> {
    let (asked, has) = (spec.data.tokenizer.as_str(), parent.tokenizer.kind());
    if asked != has {
        bail!(
            "job spec: `data.tokenizer`: {asked:?}, but the model in model.init_from was trained with the {has} tokenizer; \
             set data.tokenizer = {has:?}"
        );
    }
    Ok(())
}

/// Checks that a prepared corpus (the spec's `field`: `data.corpus`, `data.mix[i].corpus`)
/// speaks the parent's vocabulary: the same tokenizer, and no id beyond the model's vocabulary.
pub(crate) fn check_corpus(field: &str, uri: &str, corpus_tokenizer: &Tokenizer, corpus_vocab: usize, parent: &Parent) -> Result<()> {
    if corpus_tokenizer != &parent.tokenizer {
        if let Some(how) = corpus_tokenizer.char_difference("the corpus", &parent.tokenizer, "the model") {
            bail!("{field} {uri}: tokenized with another character vocabulary than the model in model.init_from was trained with: {how}");
        }
        return Err(anyhow!(
            "{field} {uri}: tokenized with {}, but the model in model.init_from was trained with {}",
            corpus_tokenizer.kind(),
            parent.tokenizer.kind(),
        ));
    }
    if corpus_vocab > parent.config.vocab_size {
        bail!("{field} {uri}: {corpus_vocab} token ids, more than the {} of the model in model.init_from", parent.config.vocab_size);
    }
    Ok(())
}
