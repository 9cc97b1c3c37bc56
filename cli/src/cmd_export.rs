//! `smelt export`: a model in other tools' formats.
//!
//! - `hf <model> <dir>`: `config.json` + `model.safetensors` that Hugging Face transformers loads:
//!   a GPT as `GPT2LMHeadModel` (one with rotary positions as `GPTNeoXForCausalLM`, hf_neox.rs) (a GPT fine-tuned as a classifier as
//!   `GPT2ForSequenceClassification`, its `score.weight` as it is), a BERT as `BertForPreTraining`, `BertForSequenceClassification`
//!   or `BertForMaskedLM` (`export_bert.rs`; a T5 is refused there). For a GPT: The engine already stores GPT-2's tensor names and layouts (`Conv1D`
//!   weights (in, out)), so the tensors are copied; the LM head is tied to `wte` and, as
//!   transformers' own `save_pretrained` does for tied weights, `lm_head.weight` is not stored
//!   (`tie_word_embeddings` makes the loader tie it).
//! - `logits <model> <out.npy> --ids ...`: the model's logits (T, V) for one sequence, as a
//!   NumPy file, to compare against another implementation (`tools/hf/check_export.py`); for a
//!   BERT the masked-LM logits of the unpadded sequence in segment 0; with `--classifier`, a
//!   classifier's class logits (1, num_labels): a GPT's of the sequence (its last token pooled),
//!   a BERT's of `[CLS] ids [SEP]`.
//!
//! `<model>` is a checkpoint (`<store>/jobs/<job>/ckpt/<step>/`, verified against its manifest
//! before anything is exported), a `model.safetensors` or a directory holding one, as a local
//! path or an object-store URI; or a job id: that job's newest checkpoint that verifies under
//! `--store`, else its final weights there (`smelt_checkpoint::resolve_model`), else the
//! checkpoint the coordinator recorded (job_model.rs).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use smelt_engine::model::heads::ClassificationHead;
use smelt_engine::model::{Gpt, GptPositions, LayerNormPlacement};
use smelt_engine::{weights, CpuBackend};
use smelt_checkpoint::ModelSource;
use smelt_worker::model_file::{self, SavedFamilyModel, SavedModel};
use tracing::info;

// Lives beside this file (cli/src/export_bert.rs), declared here so main.rs needs no entry.
#[path = "export_bert.rs"]
mod export_bert;

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// Hugging Face transformers: config.json + model.safetensors (GPT2LMHeadModel or, for a GPT
    /// classifier, GPT2ForSequenceClassification; a rotary GPT as GPTNeoXForCausalLM; BERT's
    /// BertForPreTraining / BertForSequenceClassification / BertForMaskedLM). Refused: a post-LN
    /// GPT and T5 (no transformers class computes them as smelt does).
    Hf(HfArgs),
    /// Logits of one token sequence as a .npy file (T, V), float32.
    Logits(LogitsArgs),
}

#[derive(Args, Debug)]
pub struct HfArgs {
    /// A checkpoint, a model.safetensors (or a directory holding one), or a job id.
    pub model: String,
    /// Output directory (created; existing files of the same names are replaced).
    pub out: PathBuf,
    #[command(flatten)]
    pub store: StoreArg,
}

#[derive(Args, Debug)]
pub struct StoreArg {
    /// Where a job id's checkpoints (`jobs/<job>/ckpt/`) and final weights (`jobs/<job>/`) are.
    #[arg(long, env = "SMELT_STORE", default_value = ".smelt")]
    pub store: String,
    #[command(flatten)]
    pub coordinator: crate::job_model::JobCoordinator,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// A checkpoint, a model.safetensors (or a directory holding one), or a job id.
    pub model: String,
    /// Output .npy file.
    pub out: PathBuf,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    /// A model fine-tuned as a classifier: its class logits (1, num_labels) instead of the LM's
    /// (a GPT's with its last token pooled; a BERT's of `[CLS] ids [SEP]`, as fine-tuning framed
    /// each example).
    #[arg(long)]
    pub classifier: bool,
    #[command(flatten)]
    pub store: StoreArg,
}

pub fn run(c: ExportCommand) -> Result<()> {
    match c {
        // one line on success (the log's line is below the export's default level): what was
        // written and as what
        ExportCommand::Hf(a) => {
            a.store.coordinator.install();
            export_hf(&a)?;
            let arch = std::fs::read(a.out.join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|c| c["architectures"][0].as_str().map(String::from))
                .unwrap_or_else(|| "a model".into());
            println!("{}: {arch} for Hugging Face transformers (`from_pretrained`), from {}", a.out.display(), a.model);
            Ok(())
        }
        ExportCommand::Logits(a) => {
            a.store.coordinator.install();
            export_logits(&a)?;
            println!("{}: logits of {} for {} token ids", a.out.display(), a.model, a.ids.len());
            Ok(())
        }
    }
}

/// A model of either kind: a GPT (with its classification head, if fine-tuned as a
/// classifier: label count and `score.weight`), or a BERT / T5.
enum Loaded {
    Gpt(SavedModel, Option<(usize, Vec<f32>)>),
    Family(SavedFamilyModel),
}

/// Reads `<model>`'s bytes, verified when it is a checkpoint (see the module docs).
fn read(model: &str, store: &StoreArg) -> Result<ModelSource> {
    read_in(model, &store.store, "reading the model")
}

/// `model` (a file, a directory holding one, a checkpoint, or a job id under `store`), its
/// bytes verified when a checkpoint; errors say `what` and the model. Also `smelt eval`'s and
/// `smelt train --init-from`'s.
pub(crate) fn read_in(model: &str, store: &str, what: &str) -> Result<ModelSource> {
    let src = crate::job_model::resolve(model, store).with_context(|| format!("{what} {model}"))?;
    // each checkpoint skipped was warned of by the checkpoint reader, with its error
    info!(model, file = %src.file, verified = src.checkpoint.is_some(), "model read");
    Ok(src)
}

/// Whether a GPT read from `src` was fine-tuned as a classifier: a checkpoint's trainer state
/// or a final model file's metadata says so.
pub(crate) fn is_classifier(src: &ModelSource, saved: &SavedModel) -> bool {
    src.head.is_some() || saved.metadata.get("smelt.head").map(String::as_str) == Some("classification")
}

/// A note (stderr) that `what` reads a classifier's language-model head, which its fine-tuning
/// did not train, when the model is one.
pub(crate) fn note_if_classifier(src: &ModelSource, saved: &SavedModel, what: &str) {
    if is_classifier(src, saved) {
        eprintln!(
            "note: {} was fine-tuned as a classifier (head = \"classification\"); {what} uses its language-model head, \
             which that fine-tuning did not train (its class logits: smelt export logits --classifier)",
            src.file
        );
    }
}

/// `model` read as in [`read_in`], which must be a GPT: a BERT or T5 is refused, saying that
/// `purpose` needs a GPT. Returns the model and the file it was read from.
pub(crate) fn read_gpt(model: &str, store: &str, what: &str, purpose: &str) -> Result<(SavedModel, String)> {
    let src = read_in(model, store, what)?;
    if model_file::is_family(&src.bytes, &src.file)? {
        let arch = match model_file::family_from_bytes(&src.bytes, &src.file).map(|m| m.model) {
            Ok(smelt_worker::model_file::FamilyModel::Bert { .. }) => "a BERT",
            Ok(smelt_worker::model_file::FamilyModel::T5 { .. }) => "a T5",
            Err(_) => "a BERT or T5",
        };
        bail!("{what} {model}: {arch} model; {purpose}");
    }
    let saved = model_file::from_bytes(&src.bytes, &src.file).with_context(|| format!("{what} {model}"))?;
    note_if_classifier(&src, &saved, "this");
    Ok((saved, src.file))
}

/// Reads `<model>` as whichever family its format names.
fn load(model: &str, store: &StoreArg) -> Result<Loaded> {
    let src = read(model, store)?;
    Ok(if model_file::is_family(&src.bytes, &src.file)? {
        Loaded::Family(model_file::family_from_bytes(&src.bytes, &src.file)?)
    } else {
        let saved = model_file::from_bytes(&src.bytes, &src.file)?;
        let head = model_file::classification_head(&src.bytes, &src.file, &saved, src.head.map(|h| h.num_labels))?;
        Loaded::Gpt(saved, head)
    })
}

/// GPT2Config of a smelt GPT. Dropout is 0: smelt trains without it, so the export behaves as
/// trained even in train mode.
fn hf_config(saved: &SavedModel) -> serde_json::Value {
    let c = &saved.config;
    let mut cfg = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "tie_word_embeddings": true,
        "use_cache": true,
        "torch_dtype": "float32",
        "smelt_tokenizer": saved.tokenizer.kind(),
    });
    // End-of-text doubles as GPT-2's bos/eos when the model has that id; otherwise say "none"
    // explicitly, or GPT2Config would default them to 50256.
    let eot = saved.tokenizer.eot_token();
    let special = if (eot as usize) < c.vocab_size { serde_json::json!(eot) } else { serde_json::Value::Null };
    cfg["bos_token_id"] = special.clone();
    cfg["eos_token_id"] = special;
    cfg
}

/// GPT2Config of a smelt GPT classifier, for `GPT2ForSequenceClassification`. Transformers pools
/// each sequence's last token that is not `pad_token_id` (smelt pools the last real token of
/// right-padded batches): the end-of-text id when the model has one (text never encodes to it),
/// else none, which transformers accepts for a batch of one sequence (or unpadded ones).
fn hf_classifier_config(saved: &SavedModel, num_labels: usize) -> serde_json::Value {
    let mut cfg = hf_config(saved);
    cfg["architectures"] = serde_json::json!(["GPT2ForSequenceClassification"]);
    cfg["num_labels"] = num_labels.into();
    cfg["id2label"] = (0..num_labels).map(|i| (i.to_string(), serde_json::json!(format!("LABEL_{i}")))).collect::<serde_json::Map<_, _>>().into();
    cfg["label2id"] = (0..num_labels).map(|i| (format!("LABEL_{i}"), serde_json::json!(i))).collect::<serde_json::Map<_, _>>().into();
    cfg["problem_type"] = "single_label_classification".into();
    cfg["pad_token_id"] = cfg["eos_token_id"].clone();
    cfg
}

/// An export writes `model.safetensors` into OUT: refused where that would replace a smelt model,
/// OUT being a checkpoint's directory or a smelt model's own (`smelt export hf runs/x runs/x`
/// wrote over the model it read, and into a committed checkpoint broke it against its
/// manifest). A directory of an earlier export may be written over.
fn refuse_to_replace_a_smelt_model(out: &Path) -> Result<()> {
    if out.join("MANIFEST.json").exists() {
        bail!(
            "{}: a checkpoint directory (it holds MANIFEST.json): exporting into it would replace its model.safetensors \
             and break the checkpoint; choose another output directory",
            out.display()
        );
    }
    let model = out.join("model.safetensors");
    if smelt_model_file(&model) {
        bail!(
            "{}: a smelt model file (its metadata has {}); exporting would replace it with the Hugging Face \
             format; choose another output directory",
            model.display(),
            smelt_checkpoint::model_config::KEY_FORMAT
        );
    }
    Ok(())
}

/// Whether `path` is a safetensors file whose metadata names a smelt format (read from its
/// header only; anything unreadable counts as not).
fn smelt_model_file(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let mut len = [0u8; 8];
    if f.read_exact(&mut len).is_err() {
        return false;
    }
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return false;
    }
    let mut header = vec![0u8; n as usize];
    if f.read_exact(&mut header).is_err() {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(&header).is_ok_and(|h| h["__metadata__"].get(smelt_checkpoint::model_config::KEY_FORMAT).is_some())
}

fn export_hf(a: &HfArgs) -> Result<()> {
    refuse_to_replace_a_smelt_model(&a.out)?;
    let (saved, head) = match load(&a.model, &a.store)? {
        Loaded::Gpt(s, head) => (s, head),
        Loaded::Family(s) => return export_bert::export_hf(&s, &a.model, &a.out),
    };
    if saved.config.ln_placement == LayerNormPlacement::Post {
        bail!(
            "{}: a post-LN model (ln_placement = post) has no Hugging Face GPT-2 equivalent: GPT-2 normalises before each \
             residual branch (pre-LN); only pre-LN models can be exported",
            a.model
        );
    }
    if saved.config.positions == GptPositions::Rotary {
        if head.is_some() {
            bail!("{}: a classifier with rotary positions: smelt exports rotary models as GPTNeoXForCausalLM only", a.model);
        }
        return export_neox(&saved, &a.model, &a.out);
    }
    let mut table = Gpt::<CpuBackend>::param_table(&saved.config);
    let mut params = saved.params.clone();
    let config = match &head {
        None => hf_config(&saved),
        Some((num_labels, w)) => {
            // GPT2ForSequenceClassification: the GPT's tensors, then `score.weight`, whose name
            // and (num_labels, C) layout smelt's head already has.
            for s in ClassificationHead::<CpuBackend>::param_table(*num_labels, saved.config.n_embd).specs() {
                table.push_like(s);
            }
            params.extend_from_slice(w);
            hf_classifier_config(&saved, *num_labels)
        }
    };
    // transformers refuses a safetensors file whose metadata does not name its framework.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = weights::to_bytes(&table, &params, meta)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    weights::write_atomic(&a.out.join("model.safetensors"), &bytes)?;
    weights::write_atomic(&a.out.join("config.json"), &serde_json::to_vec_pretty(&config)?)?;
    // The tokenizer as smelt knows it, so the export is self-describing (transformers does not
    // read it; a GPT-2 BPE model uses transformers' own "gpt2" tokenizer).
    weights::write_atomic(&a.out.join("smelt_tokenizer.json"), &serde_json::to_vec(&saved.tokenizer)?)?;
    info!(model = %a.model, out = %a.out.display(), tensors = table.specs().len(), params = table.numel(), "exported for hugging face transformers");
    Ok(())
}

/// A rotary GPT as `GPTNeoXForCausalLM` (`hf_neox.rs`: GPT-2 has no rotary variant; GPT-NeoX
/// with sequential residuals and full-head rotation computes what smelt's rotary GPT does).
fn export_neox(saved: &SavedModel, model: &str, out: &Path) -> Result<()> {
    use crate::cmd_import::hf_neox;
    let cfg = &saved.config;
    let table = Gpt::<CpuBackend>::param_table(cfg);
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        table.specs().iter().map(|s| hf_neox::from_smelt(&s.name, &saved.params[s.range()], cfg)).collect::<Result<_>>()?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, shape, v)| (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views = bytes
        .iter()
        .map(|(n, shape, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors::serialize(views, Some(meta))?;
    let eot = saved.tokenizer.eot_token();
    let eos = ((eot as usize) < cfg.vocab_size).then_some(eot);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    weights::write_atomic(&out.join("model.safetensors"), &st)?;
    weights::write_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&hf_neox::hf_config(cfg, eos, saved.tokenizer.kind()))?)?;
    weights::write_atomic(&out.join("smelt_tokenizer.json"), &serde_json::to_vec(&saved.tokenizer)?)?;
    info!(model, out = %out.display(), tensors = table.specs().len(), "exported for hugging face transformers as gpt-neox (rotary positions)");
    Ok(())
}

fn export_logits(a: &LogitsArgs) -> Result<()> {
    let (saved, head) = match load(&a.model, &a.store)? {
        Loaded::Gpt(s, head) => (s, head),
        Loaded::Family(s) if a.classifier => {
            let (n, logits) = export_bert::class_logits(s, &a.model, &a.ids)?;
            return write_npy(&a.out, &[1, n], &logits);
        }
        Loaded::Family(s) => {
            let (v, logits) = export_bert::mlm_logits(s, &a.model, &a.ids)?;
            return write_npy(&a.out, &[a.ids.len(), v], &logits);
        }
    };
    let (t, v) = (a.ids.len(), saved.config.vocab_size);
    if t == 0 {
        bail!("--ids: at least one token id");
    }
    if let Some((i, id)) = a.ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        bail!("--ids: token id {id} (number {} of {t}) is outside the model's vocabulary of {v} (ids 0 to {})", i + 1, v - 1);
    }
    if t > saved.config.block_size {
        bail!("--ids: {t} token ids, more than the model's block_size {}", saved.config.block_size);
    }
    let be = CpuBackend::new();
    if a.classifier {
        let Some((num_labels, w)) = head else {
            bail!("{}: --classifier needs a GPT fine-tuned as a classifier (smelt.head = classification)", a.model);
        };
        let mut model = Gpt::from_params(be, saved.config, &saved.params)?;
        let mut head = ClassificationHead::from_params(&be, num_labels, model.config().n_embd, &w)?;
        model.forward_hidden(&a.ids, 1, t)?;
        head.forward(&be, model.hidden(), &[t - 1], None, 1, t)?;
        return write_npy(&a.out, &[1, num_labels], &head.logits(&be));
    }
    if head.is_some() {
        eprintln!(
            "note: {} was fine-tuned as a classifier (head = \"classification\"); these are its language-model logits, a head \
             that fine-tuning did not train (its class logits: --classifier)",
            a.model
        );
    }
    let mut model = Gpt::from_params(be, saved.config, &saved.params)?;
    model.forward(&a.ids, None, 1, t)?;
    write_npy(&a.out, &[t, v], &model.logits())
}

/// A NumPy `.npy` (format 1.0) of little-endian float32 in C order.
fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    // magic (6) + version (2) + header length (2) + header, padded with spaces and a newline to
    // a multiple of 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    // its directory made as `export hf` makes its own
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&out).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
