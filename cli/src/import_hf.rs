//! Reading a Hugging Face GPT-2 (or, through `hf_neox.rs`, GPT-NeoX) directory (`config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, and its tokenizer files) into a smelt GPT: config, tokenizer
//! and the flat parameter buffer. `cmd_import.rs` writes the result as a smelt model file.
//!
//! smelt's GPT already uses GPT-2's tensor names and `Conv1D` (in, out) layouts, so every tensor
//! is copied by name. What differs is accepted or refused here, never guessed:
//! - names with or without `transformer.` (`save_pretrained` of `GPT2LMHeadModel` writes the
//!   prefix; the Hub's `gpt2` repository publishes `GPT2Model`'s names without it);
//! - `h.N.attn.bias` / `h.N.attn.masked_bias` are causal-mask buffers, not weights: skipped;
//! - `lm_head.weight`, when stored, must equal `wte` (smelt's head is tied);
//! - float32, float16, bfloat16 or float64 tensors, widened to float32 (smelt's master weights);
//! - config fields smelt's GPT cannot honour (another activation, LayerNorm epsilon, inner
//!   width, attention scaling, cross-attention, untied head) are refused naming the field.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;
use smelt_corpus::Tokenizer;
use smelt_engine::model::{Gpt, GptConfig, GptPositions, LayerNormPlacement};
use smelt_engine::CpuBackend;

/// smelt's LayerNorm epsilon, GPT-2's `layer_norm_epsilon`.
pub(super) const LN_EPS: f64 = smelt_engine::cpu::LAYER_NORM_EPS as f64;
/// Activations that are the tanh approximation of GELU smelt computes (`gelu_new` in GPT-2).
pub(super) const TANH_GELU: &[&str] = &["gelu_new", "gelu_pytorch_tanh", "gelu_fast"];

/// A GPT-2 read from a Hugging Face directory.
pub struct Imported {
    pub config: GptConfig,
    pub tokenizer: Tokenizer,
    /// Where the tokenizer came from, for the log and the model file's metadata.
    pub tokenizer_source: String,
    pub params: Vec<f32>,
    /// Tensors of each source dtype, for the log (`F32: 26`, `BF16: 26`).
    pub dtypes: BTreeMap<String, usize>,
}

/// Reads `dir`. `tokenizer` overrides what the directory's files say (`gpt2`, `byte`).
pub fn read_gpt2(dir: &Path, tokenizer: Option<&str>) -> Result<Imported> {
    let shown = dir.display().to_string();
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let hf: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", config_path.display()))?;
    // GPT-2 as is, or GPT-NeoX as a rotary GPT (hf_neox.rs)
    let neox = hf.get("model_type").and_then(Value::as_str) == Some("gpt_neox");
    let config = if neox {
        if let Some(archs) = hf.get("architectures").and_then(Value::as_array) {
            let known = ["GPTNeoXForCausalLM", "GPTNeoXModel"];
            if let Some(other) = archs.iter().filter_map(Value::as_str).find(|a| !known.contains(a)) {
                bail!("{}: architectures names {other:?}: smelt imports {} (the language model's weights)", config_path.display(), known.join(" or "));
            }
        }
        super::hf_neox::gpt_config(&hf)
    } else {
        gpt_config(&hf)
    }
    .with_context(|| format!("{}", config_path.display()))?;
    let (tokenizer, tokenizer_source) = pick_tokenizer(dir, tokenizer, config.vocab_size)?;
    let files = weight_files(dir)?;
    let table = Gpt::<CpuBackend>::param_table(&config);
    let mut params = vec![0.0f32; table.total()];
    let mut filled = vec![false; table.specs().len()];
    let mut wte_copy: Option<(String, Vec<f32>)> = None;
    let mut dtypes = BTreeMap::new();
    for file in &files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: not a safetensors file: {e}", file.display()))?;
        for (name, view) in st.tensors() {
            let gpt2_name = name.strip_prefix("transformer.").unwrap_or(&name);
            if (!neox && is_mask_buffer(gpt2_name)) || (neox && super::hf_neox::is_buffer(&name)) {
                continue;
            }
            if neox {
                // the layout is NeoX's (transposed, per-head qkv): check its own shape
                if let Some(want) = super::hf_neox::hf_shape(&name, &config).filter(|w| view.shape() != w.as_slice()) {
                    bail!("{}: tensor {name} has shape {:?}; config.json's sizes give {want:?}", file.display(), view.shape());
                }
            }
            let values = widen(view.dtype(), view.data()).with_context(|| format!("{}: tensor {name}", file.display()))?;
            // smelt's name and layout: GPT-2's are smelt's own; NeoX's are renamed and re-laid
            let (canonical, values) = if neox {
                match super::hf_neox::to_smelt(&name, values, &config).with_context(|| format!("{}", file.display()))? {
                    Some((n, v)) => (n.strip_prefix("transformer.").map(str::to_string).unwrap_or(n), v),
                    None => continue,
                }
            } else {
                (gpt2_name.to_string(), values)
            };
            let canonical = canonical.as_str();
            *dtypes.entry(format!("{:?}", view.dtype())).or_insert(0) += 1;
            if canonical == "lm_head.weight" {
                if wte_copy.is_some() {
                    bail!("{shown}: lm_head.weight is stored twice");
                }
                wte_copy = Some((name.clone(), values));
                continue;
            }
            let smelt_name = format!("transformer.{canonical}");
            let Some(id) = table.id(&smelt_name) else {
                bail!(
                    "{}: tensor {name} is not part of the model as smelt builds it ({} layers); \
                     is this a GPT2LMHeadModel or GPTNeoXForCausalLM?",
                    file.display(),
                    config.n_layer
                );
            };
            let spec = table.spec(id);
            // GPT-2's layouts are smelt's; NeoX's matrices are transposed (checked by size)
            let fits = if neox { values.len() == spec.numel() } else { view.shape() == spec.shape.as_slice() };
            if !fits {
                bail!("{}: tensor {name} has shape {:?}; config.json's sizes give {:?}", file.display(), view.shape(), spec.shape);
            }
            if filled[id] {
                bail!("{shown}: tensor {canonical} is stored twice (with and without the transformer. prefix?)");
            }
            params[table.range(id)].copy_from_slice(&values);
            filled[id] = true;
        }
    }
    let missing: Vec<&str> = table.specs().iter().zip(&filled).filter(|(_, f)| !**f).map(|(s, _)| s.name.as_str()).collect();
    if !missing.is_empty() {
        bail!("{shown}: missing tensors {} (of {})", missing.join(", "), table.specs().len());
    }
    if neox && wte_copy.is_none() && !hf.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false) {
        bail!(
            "{shown}: no lm_head.weight and tie_word_embeddings is not true: transformers would give this model an untied, \
             freshly drawn head (GPTNeoXConfig's default), which smelt's tied GPT cannot reproduce"
        );
    }
    if let Some((name, head)) = wte_copy {
        let wte = &params[table.range(table.id("transformer.wte.weight").expect("wte"))];
        if head.len() != wte.len() || head.iter().zip(wte).any(|(a, b)| a.to_bits() != b.to_bits()) {
            bail!(
                "{shown}: {name} differs from the token embeddings (wte): an untied LM head, which smelt's GPT \
                 (its head tied to wte, as GPT-2's) cannot hold"
            );
        }
    }
    if let Some(bad) = params.iter().position(|x| !x.is_finite()) {
        let spec = table.specs().iter().find(|s| s.range().contains(&bad)).map(|s| s.name.clone()).unwrap_or_default();
        bail!("{shown}: tensor {spec} holds a non-finite value ({})", params[bad]);
    }
    Ok(Imported { config, tokenizer, tokenizer_source, params, dtypes })
}

/// GPT2Config -> GptConfig, refusing what smelt's GPT would compute differently.
fn gpt_config(hf: &Value) -> Result<GptConfig> {
    let model_type = hf.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "gpt2" {
        bail!("model_type is {model_type:?}: smelt imports GPT-2 models (model_type \"gpt2\")");
    }
    let usize_field = |k: &str| -> Result<usize> {
        hf.get(k).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| anyhow!("{k}: missing or not a positive integer"))
    };
    let bool_field = |k: &str, default: bool| hf.get(k).and_then(Value::as_bool).unwrap_or(default);
    let (vocab_size, n_embd, n_layer, n_head) =
        (usize_field("vocab_size")?, usize_field("n_embd")?, usize_field("n_layer")?, usize_field("n_head")?);
    let block_size = usize_field("n_positions")?;
    let act = hf.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
    if !TANH_GELU.contains(&act) {
        bail!(
            "activation_function is {act:?}: smelt's feed-forward uses the tanh approximation of GELU \
             ({}); importing would change what the model computes",
            TANH_GELU.join(", ")
        );
    }
    let eps = hf.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(LN_EPS);
    if (eps - LN_EPS).abs() > LN_EPS * 1e-6 {
        bail!("layer_norm_epsilon is {eps}: smelt's LayerNorm uses {LN_EPS}");
    }
    if let Some(inner) = hf.get("n_inner").filter(|v| !v.is_null()) {
        if inner.as_u64() != Some(4 * n_embd as u64) {
            bail!("n_inner is {inner}: smelt's feed-forward is 4 x n_embd = {} wide", 4 * n_embd);
        }
    }
    if !bool_field("scale_attn_weights", true) {
        bail!("scale_attn_weights is false: smelt scales attention scores by 1/sqrt(head width)");
    }
    if bool_field("scale_attn_by_inverse_layer_idx", false) {
        bail!("scale_attn_by_inverse_layer_idx is true: smelt does not scale scores by layer");
    }
    if bool_field("add_cross_attention", false) {
        bail!("add_cross_attention is true: smelt's GPT is decoder-only without cross-attention");
    }
    if !bool_field("tie_word_embeddings", true) {
        bail!("tie_word_embeddings is false: smelt's GPT ties its LM head to the token embeddings");
    }
    if let Some(archs) = hf.get("architectures").and_then(Value::as_array) {
        let known = ["GPT2LMHeadModel", "GPT2Model"];
        if let Some(other) = archs.iter().filter_map(Value::as_str).find(|a| !known.contains(a)) {
            bail!("architectures names {other:?}: smelt imports {} (the language model's weights)", known.join(" or "));
        }
    }
    let config = GptConfig {
        vocab_size,
        block_size,
        n_layer,
        n_head,
        n_embd,
        ln_placement: LayerNormPlacement::Pre,
        positions: GptPositions::Learned,
    };
    config.validate().map_err(|e| anyhow!("{e}"))?;
    Ok(config)
}

/// `h.N.attn.bias` (the causal mask GPT-2 keeps as a buffer) and `h.N.attn.masked_bias`.
fn is_mask_buffer(name: &str) -> bool {
    name.starts_with("h.") && (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"))
}

/// The safetensors files holding the weights: `model.safetensors`, or the shards an index names.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: Value = serde_json::from_slice(&std::fs::read(&index).with_context(|| format!("reading {}", index.display()))?)
            .with_context(|| format!("{}: not JSON", index.display()))?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
        let mut shards = Vec::new();
        for f in map.values() {
            let f = f.as_str().ok_or_else(|| anyhow!("{}: weight_map values must be file names", index.display()))?;
            // a shard is a file beside the index, never a path elsewhere
            let plain = Path::new(f).components().count() == 1 && matches!(Path::new(f).components().next(), Some(std::path::Component::Normal(_)));
            if !plain {
                bail!("{}: shard {f:?} is not a file name in the directory", index.display());
            }
            shards.push(dir.join(f));
        }
        shards.sort();
        shards.dedup();
        return Ok(shards);
    }
    if dir.join("pytorch_model.bin").is_file() {
        bail!(
            "{}: only pytorch_model.bin (a pickle, which smelt does not execute); save it as safetensors first: \
             python3 -c \"from transformers import GPT2LMHeadModel as M; M.from_pretrained('{0}').save_pretrained('{0}', safe_serialization=True)\"",
            dir.display()
        );
    }
    bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
}

/// Little-endian tensor bytes of `dtype` as f32.
fn widen(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        other => bail!("dtype {other:?}: smelt imports F32, F16, BF16 or F64 weights"),
    })
}

/// The tokenizer: `--tokenizer` if given; else `smelt_tokenizer.json` (a `smelt export hf`
/// directory); else GPT-2's BPE when `vocab.json` or `tokenizer.json` is GPT-2's, checked entry by
/// entry against smelt's. A vocabulary file that is not GPT-2's is refused even with
/// `--tokenizer gpt2`: the ids would mean other text.
fn pick_tokenizer(dir: &Path, forced: Option<&str>, vocab_size: usize) -> Result<(Tokenizer, String)> {
    let vocab_file = [dir.join("vocab.json"), dir.join("tokenizer.json")].into_iter().find(|p| p.is_file());
    let own = dir.join("smelt_tokenizer.json");
    let (tokenizer, source) = match forced {
        Some(kind) if kind == "char" => bail!("--tokenizer char needs its characters: a smelt export's smelt_tokenizer.json has them"),
        Some(kind) if kind != "gpt2" && vocab_file.is_some() => bail!(
            "--tokenizer {kind}: {} holds the model's tokenizer, a BPE vocabulary; the model's ids are its tokens, not {kind}'s",
            vocab_file.as_ref().expect("checked").display()
        ),
        Some(kind) => (Tokenizer::fit(kind, "")?, format!("--tokenizer {kind}")),
        None if own.is_file() => {
            let t: Tokenizer = serde_json::from_slice(&std::fs::read(&own).with_context(|| format!("reading {}", own.display()))?)
                .with_context(|| format!("{}: not a smelt tokenizer", own.display()))?;
            if let Tokenizer::Char { chars } = &t {
                // every later sample or eval would fail on it, far from the cause
                if chars.is_empty() {
                    bail!("{}: a char tokenizer with no characters", own.display());
                }
                let distinct: std::collections::HashSet<&char> = chars.iter().collect();
                if distinct.len() != chars.len() {
                    bail!("{}: a char tokenizer that lists a character twice (two ids for one character)", own.display());
                }
            }
            (t, own.display().to_string())
        }
        None => match &vocab_file {
            Some(f) => (Tokenizer::Gpt2, f.display().to_string()),
            None => bail!(
                "{}: no tokenizer files (vocab.json, tokenizer.json or smelt_tokenizer.json); name one with \
                 --tokenizer gpt2|byte",
                dir.display()
            ),
        },
    };
    if tokenizer == Tokenizer::Gpt2 {
        if let Some(f) = &vocab_file {
            check_gpt2_vocab(f)?;
        }
        warn_added_tokens(dir);
    }
    if vocab_size < tokenizer.vocab_size() {
        bail!(
            "config.json's vocab_size is {vocab_size}, fewer than the {} ids of the {} tokenizer ({source})",
            tokenizer.vocab_size(),
            tokenizer.kind()
        );
    }
    Ok((tokenizer, source))
}

/// Checks that a Hugging Face GPT-2 vocabulary (`vocab.json`, or `tokenizer.json`'s
/// `model.vocab`) gives every one of its tokens the id smelt's GPT-2 BPE gives the same bytes.
pub fn check_gpt2_vocab(path: &Path) -> Result<()> {
    let shown = path.display();
    let v: Value = serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {shown}"))?)
        .with_context(|| format!("{shown}: not JSON"))?;
    let vocab = if path.file_name().is_some_and(|n| n == "tokenizer.json") {
        let model = v.get("model").ok_or_else(|| anyhow!("{shown}: no model"))?;
        let kind = model.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "BPE" {
            bail!("{shown}: a {kind:?} tokenizer; smelt's GPT-2 tokenizer is a byte-level BPE");
        }
        model.get("vocab")
    } else {
        Some(&v)
    };
    let vocab = vocab.and_then(Value::as_object).ok_or_else(|| anyhow!("{shown}: no vocabulary object"))?;
    let gpt2_size = smelt_corpus::gpt2::VOCAB_SIZE as usize;
    if vocab.len() != gpt2_size {
        bail!("{shown}: {} tokens; GPT-2's BPE has {gpt2_size}: not GPT-2's tokenizer (pass --tokenizer to choose)", vocab.len());
    }
    let decoder = byte_decoder();
    let bpe = smelt_corpus::gpt2::core();
    for (piece, id) in vocab {
        let id = id.as_u64().filter(|&i| i < gpt2_size as u64).ok_or_else(|| anyhow!("{shown}: token {piece:?} has id {id}"))? as u32;
        let same = if id == smelt_corpus::gpt2::EOT {
            piece == "<|endoftext|>"
        } else {
            let bytes: Option<Vec<u8>> = piece.chars().map(|c| decoder.get(&c).copied()).collect();
            bytes.is_some_and(|b| bpe.decode_bytes(&[id]).ok().as_deref() == Some(b.as_slice()))
        };
        if !same {
            bail!("{shown}: token {piece:?} has id {id}, which GPT-2's BPE gives other bytes: not GPT-2's tokenizer");
        }
    }
    Ok(())
}

/// Tokens added to GPT-2's vocabulary (`tokenizer.json`'s `added_tokens`, `added_tokens.json`)
/// beyond its own `<|endoftext|>`: smelt's GPT-2 tokenizer never produces them, so their ids
/// stay in the model as rows no text encodes to. Said, not refused: the model still works on
/// GPT-2's own tokens.
fn warn_added_tokens(dir: &Path) {
    let mut added: Vec<(u64, String)> = Vec::new();
    let read = |name: &str| std::fs::read(dir.join(name)).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    if let Some(list) = read("tokenizer.json").as_ref().and_then(|v| v.get("added_tokens")).and_then(Value::as_array) {
        for t in list {
            if let (Some(id), Some(content)) = (t.get("id").and_then(Value::as_u64), t.get("content").and_then(Value::as_str)) {
                added.push((id, content.to_string()));
            }
        }
    }
    if let Some(map) = read("added_tokens.json").as_ref().and_then(Value::as_object) {
        for (content, id) in map {
            if let Some(id) = id.as_u64() {
                added.push((id, content.clone()));
            }
        }
    }
    added.retain(|(id, _)| *id != u64::from(smelt_corpus::gpt2::EOT));
    added.sort();
    added.dedup();
    if !added.is_empty() {
        let shown: Vec<String> = added.iter().take(5).map(|(id, c)| format!("{id} {c:?}")).collect();
        tracing::warn!(
            count = added.len(),
            tokens = %shown.join(", "),
            "the directory adds tokens to gpt-2's vocabulary; smelt's gpt-2 tokenizer never produces them (text containing them is encoded as ordinary text)"
        );
    }
}

/// GPT-2's `bytes_to_unicode` reversed: the printable character standing for each byte in
/// vocab.json (printable Latin-1 bytes stand for themselves, the others for U+0100 upwards).
fn byte_decoder() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256u32;
    let mut map = HashMap::with_capacity(256);
    for b in 0..=255u8 {
        let c = if printable(b) {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        map.insert(char::from_u32(c).expect("below U+0200"), b);
    }
    map
}
