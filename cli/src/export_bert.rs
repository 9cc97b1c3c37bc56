//! `smelt export` for the encoder families: a `bert/1` model (or BERT checkpoint) as a directory
//! Hugging Face transformers loads, and its masked-LM logits as a NumPy file.
//!
//! The engine already names BERT's tensors as transformers' `BertForPreTraining` does, in PyTorch
//! `nn.Linear` layout (out, in), so tensors are copied, never transposed. The architecture
//! follows the heads: `BertForPreTraining` with a next-sentence head, else
//! `BertForSequenceClassification` with a classifier, else `BertForMaskedLM`; only the tensors
//! that architecture has are written (transformers reports any other as an unexpected key). The
//! MLM decoder is tied to the word embeddings in both, and, as transformers' own `save_pretrained`
//! does, `cls.predictions.decoder.{weight,bias}` are not stored (the loader ties them to
//! `bert.embeddings.word_embeddings.weight` and `cls.predictions.bias`).
//!
//! Differences from transformers' defaults that the config spells out: GELU is the tanh
//! approximation (`hidden_act = "gelu_new"`), LayerNorm eps is 1e-5, no dropout on attention
//! probabilities nor before the classifier; the vocabulary is the tokenizer's plus [PAD] [CLS]
//! [SEP] [MASK] above it (`pad_token_id` and the `smelt_specials` entry say which ids).
//!
//! What transformers' BERT cannot express is refused: pre-LN (and its final LayerNorm),
//! sinusoidal positions (and the sqrt(C) word-embedding scale that comes with them), general or
//! additive attention scores; and every T5 (see `refuse_t5`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use smelt_engine::backend::ScoreKind;
use smelt_engine::model::{Bert, BertBatch, BertConfig, LayerNormPlacement, Positions};
use smelt_engine::params::ParamTable;
use smelt_engine::{weights, CpuBackend};
use smelt_jobspec::BertSpecials;
use smelt_worker::model_file::{FamilyModel, SavedFamilyModel};
use tracing::info;

/// The transformers class an export loads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    PreTraining,
    SequenceClassification,
    MaskedLm,
}

impl Arch {
    fn of(c: &BertConfig) -> Arch {
        if c.nsp {
            Arch::PreTraining
        } else if c.num_labels > 0 {
            Arch::SequenceClassification
        } else {
            Arch::MaskedLm
        }
    }
    fn name(self) -> &'static str {
        match self {
            Arch::PreTraining => "BertForPreTraining",
            Arch::SequenceClassification => "BertForSequenceClassification",
            Arch::MaskedLm => "BertForMaskedLM",
        }
    }
    /// Whether the class has the tensor `name` (given that the smelt model has it too).
    /// BertForMaskedLM builds no pooler, and smelt builds one only with a pooled head, so the
    /// pooler needs no rule here.
    fn keeps(self, name: &str) -> bool {
        let mlm = name.starts_with("cls.predictions.");
        match self {
            Arch::PreTraining => name != "classifier.weight" && name != "classifier.bias",
            Arch::SequenceClassification => !mlm && !name.starts_with("cls.seq_relationship."),
            Arch::MaskedLm => !name.starts_with("cls.seq_relationship.") && !name.starts_with("classifier."),
        }
    }
}

/// A BERT's config and special ids, or an error saying why the model has no transformers
/// equivalent (`shown` names the model).
fn exportable<'a>(model: &'a FamilyModel, shown: &str) -> Result<(&'a BertConfig, &'a BertSpecials)> {
    let (config, specials) = match model {
        FamilyModel::Bert { config, specials } => (config, specials),
        FamilyModel::T5 { .. } => refuse_t5(shown)?,
    };
    let mut why = Vec::new();
    if config.ln_placement == LayerNormPlacement::Pre {
        why.push("ln_placement = \"pre\": transformers' BERT is post-LN (LayerNorm after each residual add) and has no final LayerNorm");
    }
    if config.positions == Positions::Sinusoidal {
        why.push("positions = \"sinusoidal\": transformers' BERT has a learned position table only, and does not scale the word embeddings by sqrt(C)");
    }
    match config.scores {
        ScoreKind::Dot => {}
        ScoreKind::General => why.push("scores = \"general\": transformers' BERT scores attention by scaled dot products q.k / sqrt(d) only"),
        ScoreKind::Additive => why.push("scores = \"additive\": transformers' BERT scores attention by scaled dot products q.k / sqrt(d) only"),
    }
    if !why.is_empty() {
        bail!("{shown}: this BERT has no Hugging Face transformers equivalent: {}", why.join("; "));
    }
    Ok((config, specials))
}

fn refuse_t5<T>(shown: &str) -> Result<T> {
    bail!(
        "{shown}: a T5 model (t5/1) cannot be exported for Hugging Face transformers: smelt's T5 uses LayerNorm with biases, \
         GELU and absolute (sinusoidal or learned) positions, and linear layers with biases; transformers' T5 uses RMSNorm, \
         ReLU or gated GELU, relative position buckets and no biases: not the same model"
    )
}

/// transformers' BertConfig for a smelt BERT.
fn hf_config(saved: &SavedFamilyModel, c: &BertConfig, s: &BertSpecials, arch: Arch) -> serde_json::Value {
    let mut cfg = serde_json::json!({
        "architectures": [arch.name()],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.n_inner,
        "max_position_embeddings": c.max_positions,
        "type_vocab_size": c.type_vocab_size,
        "position_embedding_type": "absolute",
        "hidden_act": "gelu_new",
        "layer_norm_eps": 1e-5,
        // smelt's dropout acts where HF's hidden dropout does; it has none on attention
        // probabilities nor on the pooled output before the classifier.
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": 0.0,
        "initializer_range": 0.02,
        "pad_token_id": s.pad,
        "bos_token_id": null,
        "eos_token_id": null,
        "is_decoder": false,
        "add_cross_attention": false,
        "tie_word_embeddings": true,
        "use_cache": false,
        "dtype": "float32",
        "smelt_tokenizer": saved.tokenizer.kind(),
        "smelt_specials": { "base_vocab": s.base_vocab, "pad": s.pad, "cls": s.cls, "sep": s.sep, "mask": s.mask },
    });
    if arch == Arch::SequenceClassification {
        let labels = 0..c.num_labels;
        cfg["num_labels"] = c.num_labels.into();
        cfg["id2label"] = labels.clone().map(|i| (i.to_string(), format!("LABEL_{i}").into())).collect::<serde_json::Map<_, _>>().into();
        cfg["label2id"] = labels.map(|i| (format!("LABEL_{i}"), i.into())).collect::<serde_json::Map<_, _>>().into();
        // smelt trains the classifier with softmax cross-entropy.
        cfg["problem_type"] = "single_label_classification".into();
    }
    cfg
}

/// The tensors `arch` has, copied out of the model's flat buffer: (table, values).
fn select(table: &ParamTable, params: &[f32], arch: Arch) -> (ParamTable, Vec<f32>) {
    let mut out = ParamTable::new();
    let mut values = Vec::with_capacity(params.len());
    for s in table.specs().iter().filter(|s| arch.keeps(&s.name)) {
        out.push(&s.name, &s.shape, s.kind, s.init);
        values.extend_from_slice(&params[s.range()]);
    }
    (out, values)
}

/// Class logits (1, num_labels) of a BERT fine-tuned as a classifier, for the text `ids` framed
/// as its fine-tuning framed each example: `[CLS] ids [SEP]`, evaluation mode.
pub fn class_logits(saved: SavedFamilyModel, shown: &str, ids: &[u32]) -> Result<(usize, Vec<f32>)> {
    let (config, specials) = match saved.model {
        FamilyModel::Bert { config, specials } if config.num_labels > 0 => (config, specials),
        FamilyModel::Bert { .. } => bail!("{shown}: --classifier needs a model fine-tuned as a classifier (head = \"classification\"); this BERT has no classification head"),
        FamilyModel::T5 { .. } => bail!("{shown}: --classifier needs a model fine-tuned as a classifier; this is a T5 (t5/1), which has none"),
    };
    if ids.len() + 2 > config.max_positions {
        bail!("--ids: {} token ids and [CLS] [SEP] exceed the model's {} positions", ids.len(), config.max_positions);
    }
    let n = config.num_labels;
    let tokens: Vec<u32> = std::iter::once(specials.cls).chain(ids.iter().copied()).chain([specials.sep]).collect();
    let t = tokens.len();
    let mut model = Bert::from_params(CpuBackend::new(), config, &saved.params)?;
    model.forward(&BertBatch::new(tokens, 1, t))?;
    Ok((n, model.class_logits()))
}

/// `smelt export hf` for a BERT (or the refusal of a T5 or an inexpressible BERT).
pub fn export_hf(saved: &SavedFamilyModel, shown: &str, out: &Path) -> Result<()> {
    let (config, specials) = exportable(&saved.model, shown)?;
    let arch = Arch::of(config);
    if arch == Arch::MaskedLm && saved.metadata.get("smelt.objective").is_some_and(|o| o == "contrastive") {
        eprintln!(
            "note: {shown} was trained with the contrastive objective: its encoder is what it learned (sentence embeddings by \
             {} pooling, temperature {}); the {} head (cls.predictions) was never trained",
            format!("{:?}", config.pooling).to_lowercase(),
            config.temperature,
            arch.name()
        );
    }
    let table = Bert::<CpuBackend>::param_table(config);
    let (kept, values) = select(&table, &saved.params, arch);
    let dropped: Vec<&str> = table.specs().iter().map(|s| s.name.as_str()).filter(|n| !arch.keeps(n)).collect();
    if !dropped.is_empty() {
        info!(model = shown, arch = arch.name(), dropped = %dropped.join(","), "tensors the transformers class has no place for are not exported");
    }
    // transformers refuses a safetensors file whose metadata does not name its framework.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = weights::to_bytes(&kept, &values, meta)?;
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    weights::write_atomic(&out.join("model.safetensors"), &bytes)?;
    weights::write_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&hf_config(saved, config, specials, arch))?)?;
    // The tokenizer as smelt knows it, so the export is self-describing (transformers does not
    // read it: smelt's ids are its tokenizer's plus the specials above them).
    weights::write_atomic(&out.join("smelt_tokenizer.json"), &serde_json::to_vec(&saved.tokenizer)?)?;
    info!(model = shown, out = %out.display(), arch = arch.name(), tensors = kept.specs().len(), params = kept.total(), "exported for hugging face transformers");
    Ok(())
}

/// Masked-LM logits (T, V) of one unpadded sequence in segment 0, evaluation mode (no dropout).
pub fn mlm_logits(saved: SavedFamilyModel, shown: &str, ids: &[u32]) -> Result<(usize, Vec<f32>)> {
    let config = match saved.model {
        FamilyModel::Bert { config, .. } => config,
        FamilyModel::T5 { .. } => bail!("{shown}: `export logits` reads GPT and BERT models; this is a T5 (t5/1)"),
    };
    if config.num_labels > 0 {
        eprintln!(
            "note: {shown} was fine-tuned as a classifier (head = \"classification\"); these are its masked-LM logits, a head that \
             fine-tuning did not train (its class logits: smelt export logits --classifier)"
        );
    } else if saved.metadata.get("smelt.objective").is_some_and(|o| o == "contrastive") {
        eprintln!("note: {shown} was trained with the contrastive objective: its masked-LM head was never trained");
    }
    let v = config.vocab_size;
    let mut model = Bert::from_params(CpuBackend::new(), config, &saved.params)?;
    // No targets: the forward computes the MLM logits (and any pooled heads).
    model.forward(&BertBatch::new(ids.to_vec(), 1, ids.len()))?;
    Ok((v, model.logits()))
}
