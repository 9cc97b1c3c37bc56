//! A rotary GPT as Hugging Face's GPT-NeoX (`GPTNeoXForCausalLM`), both ways: `smelt export hf`
//! of a model with `positions = "rotary"` writes one, `smelt import hf` reads one back.
//!
//! GPT-NeoX computes what smelt's rotary GPT computes when its residuals are sequential
//! (`use_parallel_residual = false`; Pythia's are parallel and are refused), its rotation covers
//! the whole head (`partial_rotary_factor = 1`) with theta 10,000 and "rotate half" pairs, its
//! activation is the tanh GELU, and its layers have biases. What differs is layout:
//! - `nn.Linear` weights are (out, in): smelt's `Conv1D` (in, out) transposed;
//! - `query_key_value` holds per head `[q_h | k_h | v_h]` (rows `h 3D + p D + d`), where smelt's
//!   `c_attn` columns are `[q | k | v]` with heads inside (`p C + h D + d`);
//! - the LM head is `lm_head.weight` (older files: `embed_out.weight`), tied or a copy of
//!   `embed_in` (smelt's head is tied).

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use smelt_engine::model::{GptConfig, GptPositions, LayerNormPlacement};

use super::import_hf::{LN_EPS, TANH_GELU};

/// smelt's rotary base.
const THETA: f64 = 10_000.0;

/// The NeoX row of smelt's `c_attn` output column `o` (C wide, heads of D).
fn neox_row(o: usize, c: usize, d: usize) -> usize {
    let (part, h, k) = (o / c, (o % c) / d, o % d);
    h * 3 * d + part * d + k
}

/// (in, out) row-major -> (out, in) row-major.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// GPTNeoXConfig -> a rotary GptConfig, refusing what smelt's GPT would compute differently.
pub fn gpt_config(hf: &Value) -> Result<GptConfig> {
    let usize_field = |k: &str| -> Result<usize> {
        hf.get(k).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| anyhow!("{k}: missing or not a positive integer"))
    };
    let (c, layers, heads, vocab, positions) = (
        usize_field("hidden_size")?,
        usize_field("num_hidden_layers")?,
        usize_field("num_attention_heads")?,
        usize_field("vocab_size")?,
        usize_field("max_position_embeddings")?,
    );
    if hf.get("use_parallel_residual").and_then(Value::as_bool).unwrap_or(true) {
        bail!("use_parallel_residual is true (Pythia's layout: attention and feed-forward side by side); smelt's blocks are sequential");
    }
    // transformers 5 takes `rope_scaling` in place of `rope_parameters` when it is given
    let rope = hf.get("rope_scaling").filter(|v| !v.is_null()).or_else(|| hf.get("rope_parameters"));
    let partial = rope.and_then(|r| r.get("partial_rotary_factor")).or_else(|| hf.get("rotary_pct")).and_then(Value::as_f64).unwrap_or(0.25);
    if (partial - 1.0).abs() > 1e-12 {
        bail!("partial_rotary_factor (rotary_pct) is {partial}: smelt turns the whole head (1.0)");
    }
    let theta = rope.and_then(|r| r.get("rope_theta")).or_else(|| hf.get("rotary_emb_base")).or_else(|| hf.get("rope_theta")).and_then(Value::as_f64).unwrap_or(THETA);
    if (theta - THETA).abs() > 1e-9 {
        bail!("rope_theta (rotary_emb_base) is {theta}: smelt's rotary base is {THETA}");
    }
    if let Some(kind) = rope.and_then(|r| r.get("rope_type").or_else(|| r.get("type"))).and_then(Value::as_str).filter(|k| *k != "default") {
        bail!("rope_type is {kind:?}: smelt's rotation is the default one (no scaling)");
    }
    if let Some(factor) = rope.and_then(|r| r.get("factor")).filter(|f| f.as_f64() != Some(1.0)) {
        bail!("the rotation's factor is {factor}: smelt's rotation is not scaled");
    }
    let act = hf.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu");
    if !TANH_GELU.contains(&act) {
        bail!("hidden_act is {act:?}: smelt's feed-forward uses the tanh approximation of GELU ({})", TANH_GELU.join(", "));
    }
    let eps = hf.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(LN_EPS);
    if (eps - LN_EPS).abs() > LN_EPS * 1e-6 {
        bail!("layer_norm_eps is {eps}: smelt's LayerNorm uses {LN_EPS}");
    }
    if usize_field("intermediate_size")? != 4 * c {
        bail!("intermediate_size is {}: smelt's feed-forward is 4 x hidden_size = {} wide", usize_field("intermediate_size")?, 4 * c);
    }
    if !hf.get("attention_bias").and_then(Value::as_bool).unwrap_or(true) {
        bail!("attention_bias is false: smelt's attention projections have biases");
    }
    let config = GptConfig {
        vocab_size: vocab,
        block_size: positions,
        n_layer: layers,
        n_head: heads,
        n_embd: c,
        ln_placement: LayerNormPlacement::Pre,
        positions: GptPositions::Rotary,
    };
    config.validate().map_err(|e| anyhow!("{e}"))?;
    Ok(config)
}

/// Tensors of a NeoX file that are not weights (rotary tables, causal-mask buffers of older
/// files, stored as BOOL or F32): skipped before their values are read.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq") || name.ends_with(".attention.bias") || name.ends_with(".attention.masked_bias")
}

/// The shape transformers gives NeoX tensor `name` for `cfg` (None: not a weight it knows).
pub fn hf_shape(name: &str, cfg: &GptConfig) -> Option<Vec<usize>> {
    let c = cfg.n_embd;
    let name = name.strip_prefix("gpt_neox.").unwrap_or(name);
    Some(match name {
        "embed_in.weight" | "lm_head.weight" | "embed_out.weight" => vec![cfg.vocab_size, c],
        "final_layer_norm.weight" | "final_layer_norm.bias" => vec![c],
        _ => {
            let (_, part) = name.strip_prefix("layers.")?.split_once('.')?;
            match part {
                "attention.query_key_value.weight" => vec![3 * c, c],
                "attention.query_key_value.bias" => vec![3 * c],
                "attention.dense.weight" => vec![c, c],
                "mlp.dense_h_to_4h.weight" => vec![4 * c, c],
                "mlp.dense_h_to_4h.bias" => vec![4 * c],
                "mlp.dense_4h_to_h.weight" => vec![c, 4 * c],
                _ => vec![c],
            }
        }
    })
}

/// A NeoX tensor as smelt's: its name and values (None: not a weight smelt keeps, e.g. the
/// rotary buffers some files carry). `lm_head.weight` / `embed_out.weight` come back under
/// `lm_head.weight` for the caller's tie check.
pub fn to_smelt(name: &str, values: Vec<f32>, cfg: &GptConfig) -> Result<Option<(String, Vec<f32>)>> {
    let (c, d) = (cfg.n_embd, cfg.n_embd / cfg.n_head);
    let name = name.strip_prefix("gpt_neox.").unwrap_or(name);
    if name == "lm_head.weight" || name == "embed_out.weight" {
        return Ok(Some(("lm_head.weight".into(), values)));
    }
    if name.ends_with(".rotary_emb.inv_freq") || name.ends_with(".attention.bias") || name.ends_with(".attention.masked_bias") {
        return Ok(None);
    }
    let simple = |n: &str| Ok(Some((format!("transformer.{n}"), values.clone())));
    match name {
        "embed_in.weight" => return simple("wte.weight"),
        "final_layer_norm.weight" => return simple("ln_f.weight"),
        "final_layer_norm.bias" => return simple("ln_f.bias"),
        _ => {}
    }
    let Some(rest) = name.strip_prefix("layers.") else { bail!("tensor {name} is not part of GPT-NeoX as smelt reads it") };
    let (layer, part) = rest.split_once('.').ok_or_else(|| anyhow!("tensor {name}"))?;
    let p = |s: &str| format!("transformer.h.{layer}.{s}");
    let out = match part {
        "input_layernorm.weight" => (p("ln_1.weight"), values),
        "input_layernorm.bias" => (p("ln_1.bias"), values),
        "post_attention_layernorm.weight" => (p("ln_2.weight"), values),
        "post_attention_layernorm.bias" => (p("ln_2.bias"), values),
        "attention.query_key_value.weight" => {
            // NeoX (3C, C) rows per head -> smelt (C, 3C) columns [q | k | v] (shapes checked by
            // the caller against `hf_shape`)
            let mut w = vec![0.0; 3 * c * c];
            for o in 0..3 * c {
                let r = neox_row(o, c, d);
                for i in 0..c {
                    w[i * 3 * c + o] = values[r * c + i];
                }
            }
            (p("attn.c_attn.weight"), w)
        }
        "attention.query_key_value.bias" => (p("attn.c_attn.bias"), (0..3 * c).map(|o| values[neox_row(o, c, d)]).collect()),
        "attention.dense.weight" => (p("attn.c_proj.weight"), transpose(&values, c, c)),
        "attention.dense.bias" => (p("attn.c_proj.bias"), values),
        "mlp.dense_h_to_4h.weight" => (p("mlp.c_fc.weight"), transpose(&values, 4 * c, c)),
        "mlp.dense_h_to_4h.bias" => (p("mlp.c_fc.bias"), values),
        "mlp.dense_4h_to_h.weight" => (p("mlp.c_proj.weight"), transpose(&values, c, 4 * c)),
        "mlp.dense_4h_to_h.bias" => (p("mlp.c_proj.bias"), values),
        _ if part.contains("rotary_emb") => return Ok(None),
        _ => bail!("tensor {name} is not part of GPT-NeoX as smelt reads it"),
    };
    Ok(Some(out))
}

/// smelt's tensor `name` (values in smelt's layout) as GPT-NeoX's: its name, shape and values.
/// `transformer.wte.weight` gives `gpt_neox.embed_in.weight` (the head is tied and not stored).
pub fn from_smelt(name: &str, values: &[f32], cfg: &GptConfig) -> Result<(String, Vec<usize>, Vec<f32>)> {
    let (c, d) = (cfg.n_embd, cfg.n_embd / cfg.n_head);
    let name = name.strip_prefix("transformer.").ok_or_else(|| anyhow!("tensor {name}"))?;
    let g = |n: &str| format!("gpt_neox.{n}");
    Ok(match name {
        "wte.weight" => (g("embed_in.weight"), vec![cfg.vocab_size, c], values.to_vec()),
        "ln_f.weight" => (g("final_layer_norm.weight"), vec![c], values.to_vec()),
        "ln_f.bias" => (g("final_layer_norm.bias"), vec![c], values.to_vec()),
        _ => {
            let rest = name.strip_prefix("h.").ok_or_else(|| anyhow!("tensor {name} has no GPT-NeoX counterpart"))?;
            let (layer, part) = rest.split_once('.').ok_or_else(|| anyhow!("tensor {name}"))?;
            let l = |s: &str| format!("gpt_neox.layers.{layer}.{s}");
            match part {
                "ln_1.weight" => (l("input_layernorm.weight"), vec![c], values.to_vec()),
                "ln_1.bias" => (l("input_layernorm.bias"), vec![c], values.to_vec()),
                "ln_2.weight" => (l("post_attention_layernorm.weight"), vec![c], values.to_vec()),
                "ln_2.bias" => (l("post_attention_layernorm.bias"), vec![c], values.to_vec()),
                "attn.c_attn.weight" => {
                    let mut w = vec![0.0; 3 * c * c];
                    for o in 0..3 * c {
                        let r = neox_row(o, c, d);
                        for i in 0..c {
                            w[r * c + i] = values[i * 3 * c + o];
                        }
                    }
                    (l("attention.query_key_value.weight"), vec![3 * c, c], w)
                }
                "attn.c_attn.bias" => {
                    let mut b = vec![0.0; 3 * c];
                    for o in 0..3 * c {
                        b[neox_row(o, c, d)] = values[o];
                    }
                    (l("attention.query_key_value.bias"), vec![3 * c], b)
                }
                "attn.c_proj.weight" => (l("attention.dense.weight"), vec![c, c], transpose(values, c, c)),
                "attn.c_proj.bias" => (l("attention.dense.bias"), vec![c], values.to_vec()),
                "mlp.c_fc.weight" => (l("mlp.dense_h_to_4h.weight"), vec![4 * c, c], transpose(values, c, 4 * c)),
                "mlp.c_fc.bias" => (l("mlp.dense_h_to_4h.bias"), vec![4 * c], values.to_vec()),
                "mlp.c_proj.weight" => (l("mlp.dense_4h_to_h.weight"), vec![c, 4 * c], transpose(values, 4 * c, c)),
                "mlp.c_proj.bias" => (l("mlp.dense_4h_to_h.bias"), vec![c], values.to_vec()),
                _ => bail!("tensor {name} has no GPT-NeoX counterpart"),
            }
        }
    })
}

/// GPTNeoXConfig of a rotary smelt GPT.
pub fn hf_config(cfg: &GptConfig, eos: Option<u32>, tokenizer_kind: &str) -> Value {
    serde_json::json!({
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": 4 * cfg.n_embd,
        "max_position_embeddings": cfg.block_size,
        "hidden_act": "gelu_new",
        "layer_norm_eps": LN_EPS,
        "use_parallel_residual": false,
        "attention_bias": true,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "tie_word_embeddings": true,
        "rope_parameters": {"rope_theta": THETA, "partial_rotary_factor": 1.0, "rope_type": "default"},
        // transformers 4.x read these names
        "rotary_pct": 1.0,
        "rotary_emb_base": THETA,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "use_cache": true,
        "torch_dtype": "float32",
        "smelt_tokenizer": tokenizer_kind,
    })
}
