//! What a checkpoint's weights are (a GPT, a BERT or a T5 with its reserved ids), and the
//! metadata that makes a `model.safetensors` a smelt model file: format, config, tokenizer and,
//! for BERT and T5, the special tokens. The worker's model files use the same keys, so a
//! checkpoint's weights are also a model file `smelt sample`, `smelt attention` and a
//! fine-tuning job read.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use smelt_corpus::Tokenizer;
use smelt_engine::model::{Bert, BertConfig, Gpt, GptConfig, T5Config, T5};
use smelt_engine::params::ParamTable;
use smelt_engine::CpuBackend;
use smelt_jobspec::{BertSpecials, T5Specials};

pub const KEY_FORMAT: &str = "smelt.format";
pub const KEY_CONFIG: &str = "smelt.config";
pub const KEY_TOKENIZER: &str = "smelt.tokenizer";
pub const KEY_SPECIALS: &str = "smelt.special_tokens";
pub const FORMAT_GPT: &str = "gpt/1";
pub const FORMAT_BERT: &str = "bert/1";
pub const FORMAT_T5: &str = "t5/1";

/// The model of a checkpoint. In trainer.json a GPT is its bare config (the format's first
/// shape, kept so older checkpoints read); BERT and T5 are `{"bert"|"t5": config, "specials"}`.
/// Their configs refuse unknown fields, so the shapes cannot be mistaken for one another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelConfig {
    Bert { bert: BertConfig, specials: BertSpecials },
    T5 { t5: T5Config, specials: T5Specials },
    Gpt(GptConfig),
}

impl From<GptConfig> for ModelConfig {
    fn from(c: GptConfig) -> Self {
        ModelConfig::Gpt(c)
    }
}

/// "GPT (vocab 59, 2 layers, 2 heads, 32 wide, 32 positions)": the shape a person compares (a
/// T5's layers are encoder + decoder); [`ModelConfig::differences`] names every other setting.
impl fmt::Display for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelConfig::Gpt(c) => write!(
                f,
                "GPT (vocab {}, {} layers, {} heads, {} wide, {} positions)",
                c.vocab_size, c.n_layer, c.n_head, c.n_embd, c.block_size
            ),
            ModelConfig::Bert { bert: c, .. } => write!(
                f,
                "BERT (vocab {}, {} layers, {} heads, {} wide, {} positions)",
                c.vocab_size, c.n_layer, c.n_head, c.n_embd, c.max_positions
            ),
            ModelConfig::T5 { t5: c, .. } => write!(
                f,
                "T5 (vocab {}, {} + {} layers, {} heads, {} wide, {} positions)",
                c.vocab_size, c.n_layer, c.n_decoder_layer, c.n_head, c.n_embd, c.max_positions
            ),
        }
    }
}

impl ModelConfig {
    /// The settings in which `self` and `other` differ, named as in the config ("vocab_size 59
    /// vs 65, ln_placement \"pre\" vs \"post\""); empty when they are the same or of other
    /// architectures (their descriptions already differ).
    pub fn differences(&self, other: &ModelConfig) -> String {
        if self.arch() != other.arch() {
            return String::new();
        }
        let (Ok(a), Ok(b)) = (serde_json::to_value(self), serde_json::to_value(other)) else { return String::new() };
        let mut out = Vec::new();
        diff("", &a, &b, &mut out);
        // a BERT's and a T5's own settings sit under "bert." and "t5.": named without it
        let nested = format!("{}.", self.arch());
        out.iter().map(|d| d.strip_prefix(nested.as_str()).unwrap_or(d.as_str())).collect::<Vec<&str>>().join(", ")
    }

    pub fn arch(&self) -> &'static str {
        match self {
            ModelConfig::Gpt(_) => "gpt",
            ModelConfig::Bert { .. } => "bert",
            ModelConfig::T5 { .. } => "t5",
        }
    }

    /// The model-file format its weights are written in.
    pub fn format(&self) -> &'static str {
        match self {
            ModelConfig::Gpt(_) => FORMAT_GPT,
            ModelConfig::Bert { .. } => FORMAT_BERT,
            ModelConfig::T5 { .. } => FORMAT_T5,
        }
    }

    pub fn gpt(&self) -> Option<&GptConfig> {
        match self {
            ModelConfig::Gpt(c) => Some(c),
            _ => None,
        }
    }

    /// The model's width (what a classification head on top of it takes).
    pub fn n_embd(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.n_embd,
            ModelConfig::Bert { bert, .. } => bert.n_embd,
            ModelConfig::T5 { t5, .. } => t5.n_embd,
        }
    }

    /// The vocabulary, special ids included.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.vocab_size,
            ModelConfig::Bert { bert, .. } => bert.vocab_size,
            ModelConfig::T5 { t5, .. } => t5.vocab_size,
        }
    }

    /// The config's own checks, and that the special ids add up to the vocabulary.
    pub fn validate(&self) -> Result<(), String> {
        let (vocab, expected) = match self {
            ModelConfig::Gpt(c) => return c.validate().map_err(|e| e.to_string()),
            ModelConfig::Bert { bert, specials } => {
                bert.validate().map_err(|e| e.to_string())?;
                (bert.vocab_size, (specials.base_vocab + BertSpecials::COUNT) as usize)
            }
            ModelConfig::T5 { t5, specials } => {
                t5.validate().map_err(|e| e.to_string())?;
                (t5.vocab_size, specials.base_vocab as usize + 1 + specials.sentinels as usize)
            }
        };
        if vocab != expected {
            return Err(format!("vocab_size {vocab} does not match the special tokens (they make {expected})"));
        }
        Ok(())
    }

    /// The model's tensors, in flat-buffer order, under their Hugging Face names.
    pub fn param_table(&self) -> ParamTable {
        match self {
            ModelConfig::Gpt(c) => Gpt::<CpuBackend>::param_table(c),
            ModelConfig::Bert { bert, .. } => Bert::<CpuBackend>::param_table(bert),
            ModelConfig::T5 { t5, .. } => T5::<CpuBackend>::param_table(t5),
        }
    }

    /// A model file's metadata: format, config, tokenizer, special tokens (BERT, T5) and
    /// `smelt.<key>` for each extra.
    pub fn metadata(&self, tokenizer: &Tokenizer, extra: &[(&str, String)]) -> HashMap<String, String> {
        let mut meta = HashMap::new();
        meta.insert(KEY_FORMAT.to_string(), self.format().to_string());
        match self {
            ModelConfig::Gpt(c) => {
                meta.insert(KEY_CONFIG.to_string(), json(c));
            }
            ModelConfig::Bert { bert, specials } => {
                meta.insert(KEY_CONFIG.to_string(), json(bert));
                meta.insert(KEY_SPECIALS.to_string(), json(specials));
            }
            ModelConfig::T5 { t5, specials } => {
                meta.insert(KEY_CONFIG.to_string(), json(t5));
                meta.insert(KEY_SPECIALS.to_string(), json(specials));
            }
        }
        meta.insert(KEY_TOKENIZER.to_string(), json(tokenizer));
        for (k, v) in extra {
            meta.insert(format!("smelt.{k}"), v.clone());
        }
        meta
    }
}

/// Each setting (a dotted path) in which `a` and `b` differ, as "path a vs b"; one left out of
/// a config (a default not written) shows as unset.
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let at = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                diff(&at, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
            }
        }
        _ if a != b => {
            let shown = |v: &Value| if v.is_null() { "unset".to_string() } else { v.to_string() };
            out.push(format!("{path} {} vs {}", shown(a), shown(b)));
        }
        _ => {}
    }
}

/// Metadata values are plain data: serializing them cannot fail.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("model metadata serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_shapes_read_back_as_themselves() {
        let mut bert = BertConfig::preset("bert-test").unwrap();
        bert.vocab_size = 10;
        let mut t5 = T5Config::preset("t5-test").unwrap();
        t5.vocab_size = 6 + 1 + 3;
        let all = [
            ModelConfig::Gpt(GptConfig::preset("test").unwrap()),
            ModelConfig::Bert { bert, specials: BertSpecials::new(6) },
            ModelConfig::T5 { t5, specials: T5Specials { base_vocab: 6, pad: 6, sentinels: 3 } },
        ];
        for m in all {
            let text = serde_json::to_string(&m).unwrap();
            let back: ModelConfig = serde_json::from_str(&text).unwrap();
            assert_eq!(back, m, "{text}");
            m.validate().unwrap();
        }
    }

    #[test]
    fn a_config_reads_as_its_shape_and_its_differences_by_name() {
        let gpt = GptConfig::preset("test").unwrap();
        let (a, b) = (ModelConfig::Gpt(gpt.clone()), ModelConfig::Gpt(GptConfig { vocab_size: 59, n_layer: 4, ..gpt }));
        assert_eq!(b.to_string(), "GPT (vocab 59, 4 layers, 2 heads, 32 wide, 32 positions)");
        assert_eq!(a.differences(&b), format!("n_layer 2 vs 4, vocab_size {} vs 59", a.gpt().unwrap().vocab_size));
        assert_eq!(a.differences(&a), "");
        let t5 = ModelConfig::T5 { t5: T5Config::preset("t5-test").unwrap(), specials: T5Specials { base_vocab: 6, pad: 6, sentinels: 3 } };
        assert!(t5.to_string().starts_with("T5 (vocab ") && t5.to_string().contains("2 + 2 layers"), "{t5}");
    }

    #[test]
    fn special_tokens_that_do_not_add_up_are_refused() {
        let mut bert = BertConfig::preset("bert-test").unwrap();
        bert.vocab_size = 11;
        let e = ModelConfig::Bert { bert, specials: BertSpecials::new(6) }.validate().unwrap_err();
        assert!(e.contains("vocab_size 11") && e.contains("10"), "{e}");
    }
}
