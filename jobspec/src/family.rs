//! The transformer family in a job spec: `[model] arch = "gpt" | "bert" | "t5"` and the options
//! of BERT and T5 (attention score, positions, objective and its parameters). Every error names
//! the spec field at fault.
//!
//! Special tokens are reserved at the top of the vocabulary, above the tokenizer's (or the
//! corpus's) ids, so a tokenizer needs no change: BERT adds `[PAD] [CLS] [SEP] [MASK]`; T5 adds a
//! pad id (also the decoder's start token) and `sentinels` sentinel ids, the k-th span's sentinel
//! being `vocab_size - 1 - k` as in T5.
//!
//! ```toml
//! [model]
//! arch = "bert"
//! preset = "bert-tiny"         # or n_layer, n_head, n_embd, block_size (= max positions)
//! objective = "mlm+nsp"        # mlm | mlm+nsp | contrastive
//! dropout = 0.1                # training passes only (default 0)
//! views = "mask"               # contrastive: mask (two maskings) | dropout (SimCSE)
//! scores = "dot"               # dot | general | additive (additive_width = A: default the head width)
//! positions = "learned"        # learned | sinusoidal
//! ln_placement = "post"
//! ```

use serde::{Deserialize, Serialize};
use smelt_engine::backend::ScoreKind;
use smelt_engine::model::objectives::SpanCorruptionConfig;
use smelt_engine::model::{BertConfig, Positions, T5Config};

use crate::{err, JobSpec, SpecError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Gpt,
    Bert,
    T5,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt => "gpt",
            Arch::Bert => "bert",
            Arch::T5 => "t5",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BertObjective {
    /// Masked LM on `[CLS] window [SEP]`.
    #[serde(rename = "mlm")]
    Mlm,
    /// Masked LM plus next-sentence prediction on `[CLS] a [SEP] b [SEP]`.
    #[serde(rename = "mlm+nsp")]
    MlmNsp,
    /// In-batch InfoNCE between two independently masked views of each window.
    #[serde(rename = "contrastive")]
    Contrastive,
}

impl BertObjective {
    pub fn name(self) -> &'static str {
        match self {
            BertObjective::Mlm => "mlm",
            BertObjective::MlmNsp => "mlm+nsp",
            BertObjective::Contrastive => "contrastive",
        }
    }
}

/// How the two views of a window differ in the contrastive objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContrastiveViews {
    /// Two independent maskings of the window.
    #[default]
    Mask,
    /// The window twice, unmasked: the model's dropout makes the two views (SimCSE).
    Dropout,
}

/// BERT's special ids, the four above the tokenizer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BertSpecials {
    /// The tokenizer's (or corpus's) vocabulary size: ids below it are text.
    pub base_vocab: u32,
    pub pad: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

impl BertSpecials {
    pub fn new(base_vocab: u32) -> Self {
        BertSpecials { base_vocab, pad: base_vocab, cls: base_vocab + 1, sep: base_vocab + 2, mask: base_vocab + 3 }
    }
    pub const COUNT: u32 = 4;
}

/// Most sentinel ids a T5 spec may reserve: far more than any window's spans need (a window of
/// n tokens has at most n spans), few enough that a typo does not add a huge vocabulary.
pub const MAX_SENTINELS: u32 = 32_768;

/// T5's reserved ids: pad (= decoder start) right above the text, sentinels at the very top.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct T5Specials {
    pub base_vocab: u32,
    pub pad: u32,
    pub sentinels: u32,
}

/// A BERT or T5 model and objective, as the spec makes them for a given text vocabulary.
#[derive(Clone, Debug, PartialEq)]
pub enum FamilyConfig {
    Bert { config: BertConfig, objective: BertObjective, mask_prob: f64, specials: BertSpecials, views: ContrastiveViews },
    T5 { config: T5Config, span: SpanCorruptionConfig, specials: T5Specials },
}

impl FamilyConfig {
    pub fn max_positions(&self) -> usize {
        match self {
            FamilyConfig::Bert { config, .. } => config.max_positions,
            FamilyConfig::T5 { config, .. } => config.max_positions,
        }
    }
}

/// A model config's field under the spec's name for it.
fn model_field(f: &str) -> String {
    match f {
        "max_positions" => "model.block_size".into(),
        f => format!("model.{f}"),
    }
}

/// Options that only some architectures read: (field, set, the architectures that take it).
fn family_fields(m: &crate::ModelSpec) -> [(&'static str, bool, &'static [Arch]); 13] {
    const BOTH: &[Arch] = &[Arch::Bert, Arch::T5];
    [
        ("model.scores", m.scores.is_some(), BOTH),
        ("model.additive_width", m.additive_width.is_some(), BOTH),
        ("model.positions", m.positions.is_some(), &[Arch::Gpt, Arch::Bert, Arch::T5]),
        ("model.n_inner", m.n_inner.is_some(), BOTH),
        ("model.objective", m.objective.is_some(), BOTH),
        ("model.n_decoder_layer", m.n_decoder_layer.is_some(), &[Arch::T5]),
        ("model.mask_prob", m.mask_prob.is_some(), &[Arch::Bert]),
        ("model.temperature", m.temperature.is_some(), &[Arch::Bert]),
        ("model.dropout", m.dropout.is_some(), &[Arch::Bert]),
        ("model.views", m.views.is_some(), &[Arch::Bert]),
        ("model.noise_density", m.noise_density.is_some(), &[Arch::T5]),
        ("model.mean_span", m.mean_span.is_some(), &[Arch::T5]),
        ("model.sentinels", m.sentinels.is_some(), &[Arch::T5]),
    ]
}

/// The additive score's width: only with `scores = "additive"`, and at least 1.
fn parse_additive_width(m: &crate::ModelSpec, scores: ScoreKind) -> Result<usize, SpecError> {
    match m.additive_width {
        None => Ok(0),
        Some(_) if scores != ScoreKind::Additive => Err(err("model.additive_width", "only for scores = \"additive\"")),
        Some(0) => Err(err("model.additive_width", "must be at least 1")),
        Some(a) => Ok(a),
    }
}

fn parse_scores(s: &Option<String>) -> Result<ScoreKind, SpecError> {
    match s.as_deref() {
        None | Some("dot") => Ok(ScoreKind::Dot),
        Some("general") => Ok(ScoreKind::General),
        Some("additive") => Ok(ScoreKind::Additive),
        Some(o) => Err(err("model.scores", format!("{o:?} is not one of: dot, general, additive"))),
    }
}

fn parse_positions(s: &Option<String>, default: Positions) -> Result<Positions, SpecError> {
    match s.as_deref() {
        None => Ok(default),
        Some("learned") => Ok(Positions::Learned),
        Some("sinusoidal") => Ok(Positions::Sinusoidal),
        Some(o) => Err(err("model.positions", format!("{o:?} is not one of: learned, sinusoidal"))),
    }
}

impl JobSpec {
    /// The job's architecture (`model.arch`, default gpt).
    pub fn arch(&self) -> Result<Arch, SpecError> {
        match self.model.arch.as_deref() {
            None | Some("gpt") => Ok(Arch::Gpt),
            Some("bert") => Ok(Arch::Bert),
            Some("t5") => Ok(Arch::T5),
            Some(o) => Err(err("model.arch", format!("{o:?} is not one of: gpt, bert, t5"))),
        }
    }

    /// A GPT spec must not carry BERT/T5 options (they would be silently ignored).
    pub(crate) fn check_family_fields_absent(&self) -> Result<(), SpecError> {
        self.check_fields_for(Arch::Gpt)
    }

    fn check_fields_for(&self, arch: Arch) -> Result<(), SpecError> {
        for (field, set, archs) in family_fields(&self.model) {
            if set && !archs.contains(&arch) {
                let names: Vec<&str> = archs.iter().map(|a| a.name()).collect();
                return Err(err(field, format!("only for arch = {} (this job's arch is {:?})", names.join(" or "), arch.name())));
            }
        }
        Ok(())
    }

    /// The BERT or T5 model and objective for a text vocabulary of `base_vocab` ids (the
    /// tokenizer's or the corpus's); the model's vocabulary adds the special ids. An error for
    /// `arch = "gpt"`, which `model_config` makes.
    pub fn family_config(&self, base_vocab: usize) -> Result<FamilyConfig, SpecError> {
        let arch = self.arch()?;
        self.check_fields_for(arch)?;
        let m = &self.model;
        let need = |v: Option<usize>, f: &str| v.ok_or_else(|| err(&format!("model.{f}"), "required when model.preset is not given"));
        let base = u32::try_from(base_vocab).map_err(|_| err("model.vocab_size", "must fit in u32 token ids"))?;
        let seq = self.train.seq_len;
        match arch {
            Arch::Gpt => Err(err("model.arch", "\"gpt\" is not a BERT/T5 architecture")),
            Arch::Bert => {
                let mut c = match &m.preset {
                    Some(p) => BertConfig::preset(p).map_err(|e| err("model.preset", e.message))?,
                    None => {
                        let n_embd = need(m.n_embd, "n_embd")?;
                        let mut c = BertConfig::preset("bert-test").expect("a known preset");
                        (c.n_layer, c.n_head, c.n_embd, c.n_inner) = (need(m.n_layer, "n_layer")?, need(m.n_head, "n_head")?, n_embd, 4 * n_embd);
                        c.max_positions = need(m.block_size, "block_size")?;
                        c
                    }
                };
                apply_sizes(m, &mut c.n_layer, &mut c.n_head, &mut c.n_embd, &mut c.max_positions, &mut c.n_inner);
                let objective = match m.objective.as_deref() {
                    None | Some("mlm") => BertObjective::Mlm,
                    Some("mlm+nsp") => BertObjective::MlmNsp,
                    Some("contrastive") => BertObjective::Contrastive,
                    Some(o) => return Err(err("model.objective", format!("{o:?} is not one of: mlm, mlm+nsp, contrastive (arch = \"bert\")"))),
                };
                if m.temperature.is_some() && objective != BertObjective::Contrastive {
                    return Err(err("model.temperature", "only for objective = \"contrastive\""));
                }
                let views = match m.views.as_deref() {
                    None | Some("mask") => ContrastiveViews::Mask,
                    Some("dropout") => ContrastiveViews::Dropout,
                    Some(o) => return Err(err("model.views", format!("{o:?} is not one of: mask, dropout"))),
                };
                if m.views.is_some() && objective != BertObjective::Contrastive {
                    return Err(err("model.views", "only for objective = \"contrastive\""));
                }
                if views == ContrastiveViews::Dropout && m.mask_prob.is_some() {
                    return Err(err("model.mask_prob", "views = \"dropout\" does not mask (the views are the same tokens)"));
                }
                let specials = BertSpecials::new(base);
                c.vocab_size = (base + BertSpecials::COUNT) as usize;
                if let Some(p) = m.ln_placement {
                    c.ln_placement = p;
                }
                c.scores = parse_scores(&m.scores)?;
                c.additive_width = parse_additive_width(m, c.scores)?;
                c.positions = parse_positions(&m.positions, Positions::Learned)?;
                c.nsp = objective == BertObjective::MlmNsp;
                c.num_labels = 0;
                if let Some(t) = m.temperature {
                    c.temperature = t;
                }
                if let Some(p) = m.dropout {
                    c.dropout = p;
                }
                c.validate().map_err(|e| err(&model_field(&e.field), e.message))?;
                if views == ContrastiveViews::Dropout && c.dropout == 0.0 {
                    return Err(err("model.dropout", "views = \"dropout\" needs a dropout probability above 0: without it the two views of a window are identical"));
                }
                let mask_prob = m.mask_prob.unwrap_or(0.15);
                if !(mask_prob > 0.0 && mask_prob <= 1.0) {
                    return Err(err("model.mask_prob", format!("{mask_prob} is outside (0, 1]")));
                }
                // [CLS] text [SEP], and a second [SEP] between the halves for next-sentence pairs.
                let min = if objective == BertObjective::MlmNsp { 5 } else { 3 };
                if seq < min {
                    return Err(err("train.seq_len", format!("{seq} is too short for objective {:?} (at least {min}: the special tokens take {})", objective.name(), min - 1)));
                }
                Ok(FamilyConfig::Bert { config: c, objective, mask_prob, specials, views })
            }
            Arch::T5 => {
                let mut c = match &m.preset {
                    Some(p) => T5Config::preset(p).map_err(|e| err("model.preset", e.message))?,
                    None => {
                        let n_embd = need(m.n_embd, "n_embd")?;
                        let mut c = T5Config::preset("t5-test").expect("a known preset");
                        (c.n_layer, c.n_head, c.n_embd, c.n_inner) = (need(m.n_layer, "n_layer")?, need(m.n_head, "n_head")?, n_embd, 4 * n_embd);
                        c.n_decoder_layer = c.n_layer;
                        c.max_positions = need(m.block_size, "block_size")?;
                        c
                    }
                };
                apply_sizes(m, &mut c.n_layer, &mut c.n_head, &mut c.n_embd, &mut c.max_positions, &mut c.n_inner);
                if m.n_layer.is_some() && m.preset.is_some() {
                    c.n_decoder_layer = c.n_layer;
                }
                if let Some(v) = m.n_decoder_layer {
                    c.n_decoder_layer = v;
                }
                match m.objective.as_deref() {
                    None | Some("span") => {}
                    Some(o) => return Err(err("model.objective", format!("{o:?} is not one of: span (arch = \"t5\")"))),
                }
                let sentinels = m.sentinels.unwrap_or(100);
                if !(1..=MAX_SENTINELS).contains(&sentinels) {
                    return Err(err("model.sentinels", format!("{sentinels} must be in 1..={MAX_SENTINELS} (T5 uses 100; each is a row of the vocabulary)")));
                }
                let vocab = base as u64 + 1 + sentinels as u64;
                if vocab > u32::MAX as u64 - 1 {
                    return Err(err("model.sentinels", format!("{sentinels} sentinels overflow the u32 token ids")));
                }
                c.vocab_size = vocab as usize;
                if let Some(p) = m.ln_placement {
                    c.ln_placement = p;
                }
                c.scores = parse_scores(&m.scores)?;
                c.additive_width = parse_additive_width(m, c.scores)?;
                c.positions = parse_positions(&m.positions, Positions::Sinusoidal)?;
                c.validate().map_err(|e| err(&model_field(&e.field), e.message))?;
                let span = SpanCorruptionConfig {
                    vocab_size: vocab as u32,
                    noise_density: m.noise_density.unwrap_or(0.15),
                    mean_span: m.mean_span.unwrap_or(3.0),
                    sentinels,
                };
                span.validate().map_err(|e| err(&model_field(&e.field), e.message))?;
                // The spans of one training window (as `corrupt_spans` counts them) need a
                // sentinel each plus the closing one, and the target must fit the decoder.
                let (noise, spans) = span_counts(seq, span.noise_density, span.mean_span);
                if spans as u64 >= sentinels as u64 {
                    return Err(err("model.sentinels", format!("{sentinels} is too few: a window of train.seq_len = {seq} tokens has {spans} spans and needs {} sentinels", spans + 1)));
                }
                if noise + spans + 1 > c.max_positions {
                    return Err(err("model.noise_density", format!("the targets ({} tokens) would exceed the model's {} positions", noise + spans + 1, c.max_positions)));
                }
                Ok(FamilyConfig::T5 { config: c, span, specials: T5Specials { base_vocab: base, pad: base, sentinels } })
            }
        }
    }
}

/// Explicit sizes override a preset's.
fn apply_sizes(m: &crate::ModelSpec, n_layer: &mut usize, n_head: &mut usize, n_embd: &mut usize, max_positions: &mut usize, n_inner: &mut usize) {
    for (dst, src) in [(n_layer, m.n_layer), (n_head, m.n_head), (max_positions, m.block_size), (n_inner, m.n_inner)] {
        if let Some(v) = src {
            *dst = v;
        }
    }
    if let Some(v) = m.n_embd {
        *n_embd = v;
        if m.n_inner.is_none() {
            *n_inner = 4 * v;
        }
    }
}

/// (noise tokens, spans) of a window of `len` tokens, as T5's `random_spans_noise_mask` (and
/// `corrupt_spans`) count them.
fn span_counts(len: usize, density: f64, mean_span: f64) -> (usize, usize) {
    if len < 2 {
        return (0, 0);
    }
    let noise = ((len as f64 * density).round() as usize).clamp(1, len - 1);
    let spans = ((noise as f64 / mean_span).round() as usize).clamp(1, noise.min(len - noise));
    (noise, spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BERT: &str = r#"
name = "bert"

[model]
arch = "bert"
preset = "bert-test"
objective = "mlm+nsp"

[data]
text = "t.txt"

[train]
steps = 10
global_batch = 8
micro_batch = 4
seq_len = 24
lr = 1e-3

[cluster]
world_size = 2
"#;

    fn t5() -> String {
        BERT.replace("arch = \"bert\"", "arch = \"t5\"").replace("bert-test", "t5-test").replace("objective = \"mlm+nsp\"", "sentinels = 8")
    }

    #[test]
    fn bert_spec_makes_its_model_and_objective() {
        let s = JobSpec::parse(BERT).unwrap();
        assert_eq!(s.arch().unwrap(), Arch::Bert);
        let FamilyConfig::Bert { config, objective, mask_prob, specials, views } = s.family_config(30).unwrap() else { panic!("not bert") };
        assert_eq!((objective, mask_prob, views, config.dropout), (BertObjective::MlmNsp, 0.15, ContrastiveViews::Mask, 0.0));
        assert_eq!(config.vocab_size, 34);
        assert_eq!((specials.pad, specials.cls, specials.sep, specials.mask), (30, 31, 32, 33));
        assert!(config.nsp);
        // Unset, the placement is each architecture's own: BERT post-LN, T5 (and GPT-2) pre-LN.
        assert_eq!(config.ln_placement, smelt_engine::model::LayerNormPlacement::Post);
        let FamilyConfig::T5 { config: t5c, .. } = JobSpec::parse(&t5()).unwrap().family_config(30).unwrap() else { panic!("not t5") };
        assert_eq!(t5c.ln_placement, smelt_engine::model::LayerNormPlacement::Pre);
        let pre = BERT.replace("objective = \"mlm+nsp\"", "objective = \"mlm+nsp\"\nln_placement = \"pre\"");
        let FamilyConfig::Bert { config: prec, .. } = JobSpec::parse(&pre).unwrap().family_config(30).unwrap() else { panic!() };
        assert_eq!(prec.ln_placement, smelt_engine::model::LayerNormPlacement::Pre);
        assert_eq!(JobSpec::parse(&s.to_toml()).unwrap(), s);
        let opts = BERT.replace("objective = \"mlm+nsp\"", "objective = \"contrastive\"\nscores = \"additive\"\npositions = \"sinusoidal\"\ntemperature = 0.1");
        let FamilyConfig::Bert { config, objective, .. } = JobSpec::parse(&opts).unwrap().family_config(30).unwrap() else { panic!() };
        assert_eq!((objective, config.scores, config.positions, config.temperature, config.nsp), (BertObjective::Contrastive, ScoreKind::Additive, Positions::Sinusoidal, 0.1, false));
        // the additive score's width: the head width unless given, and only for additive scores
        assert_eq!(config.additive_width(), config.head_dim());
        let wide = JobSpec::parse(&opts.replace("scores = \"additive\"", "scores = \"additive\"\nadditive_width = 24")).unwrap();
        let FamilyConfig::Bert { config, .. } = wide.family_config(30).unwrap() else { panic!() };
        assert_eq!(config.additive_width(), 24);
        let FamilyConfig::T5 { config: t5w, .. } = JobSpec::parse(&t5().replace("sentinels = 8", "sentinels = 8\nscores = \"additive\"\nadditive_width = 8")).unwrap().family_config(30).unwrap() else { panic!() };
        assert_eq!(t5w.additive_width(), 8);
        for bad in ["additive_width = 24", "scores = \"additive\"\nadditive_width = 0"] {
            let e = JobSpec::parse(&BERT.replace("objective = \"mlm+nsp\"", &format!("objective = \"mlm+nsp\"\n{bad}"))).and_then(|s| s.family_config(30).map(|_| ())).unwrap_err();
            assert_eq!(e.field, "model.additive_width", "{bad}: {e}");
        }
    }

    #[test]
    fn bert_dropout_and_dropout_views() {
        let with = |extra: &str| BERT.replace("objective = \"mlm+nsp\"", extra);
        let s = JobSpec::parse(&with("objective = \"mlm+nsp\"\ndropout = 0.1")).unwrap();
        let FamilyConfig::Bert { config, views, .. } = s.family_config(30).unwrap() else { panic!() };
        assert_eq!((config.dropout, views), (0.1, ContrastiveViews::Mask));
        let s = JobSpec::parse(&with("objective = \"contrastive\"\nviews = \"dropout\"\ndropout = 0.1")).unwrap();
        let FamilyConfig::Bert { config, objective, views, .. } = s.family_config(30).unwrap() else { panic!() };
        assert_eq!((objective, views, config.dropout), (BertObjective::Contrastive, ContrastiveViews::Dropout, 0.1));
        assert_eq!(JobSpec::parse(&s.to_toml()).unwrap(), s, "the new fields survive a round trip");
        let s = JobSpec::parse(&with("objective = \"contrastive\"\nviews = \"mask\"")).unwrap();
        let FamilyConfig::Bert { views, .. } = s.family_config(30).unwrap() else { panic!() };
        assert_eq!(views, ContrastiveViews::Mask);
    }

    #[test]
    fn dropout_errors_name_the_field() {
        let error = |extra: &str| JobSpec::parse(&BERT.replace("objective = \"mlm+nsp\"", extra)).unwrap_err();
        let field = |extra: &str| error(extra).field;
        let e = error("objective = \"contrastive\"\nviews = \"dropout\"");
        assert_eq!(e.field, "model.dropout");
        assert!(e.to_string().contains("views = \"dropout\""), "{e}");
        assert_eq!(field("objective = \"contrastive\"\nviews = \"dropout\"\ndropout = 0.0"), "model.dropout");
        for bad in ["1.0", "1.5", "-0.1"] {
            let e = error(&format!("dropout = {bad}"));
            assert_eq!(e.field, "model.dropout", "dropout = {bad}");
            assert!(e.to_string().contains("[0, 1)"), "{e}");
        }
        assert_eq!(field("objective = \"contrastive\"\nviews = \"noise\"\ndropout = 0.1"), "model.views");
        assert_eq!(field("objective = \"mlm\"\nviews = \"mask\""), "model.views");
        assert_eq!(field("objective = \"contrastive\"\nviews = \"dropout\"\ndropout = 0.1\nmask_prob = 0.2"), "model.mask_prob");
        // only BERT has dropout so far
        assert_eq!(JobSpec::parse(&t5().replace("sentinels = 8", "sentinels = 8\ndropout = 0.1")).unwrap_err().field, "model.dropout");
        let gpt = BERT.replace("arch = \"bert\"\n", "").replace("bert-test", "test").replace("objective = \"mlm+nsp\"", "dropout = 0.1");
        assert_eq!(JobSpec::parse(&gpt).unwrap_err().field, "model.dropout");
    }

    #[test]
    fn t5_spec_reserves_pad_and_sentinels() {
        let s = JobSpec::parse(&t5()).unwrap();
        let FamilyConfig::T5 { config, span, specials } = s.family_config(30).unwrap() else { panic!("not t5") };
        assert_eq!(config.vocab_size, 30 + 1 + 8);
        assert_eq!((specials.pad, span.sentinel(0), span.sentinel(7)), (30, 38, 31));
        assert_eq!(config.positions, Positions::Sinusoidal);
    }

    #[test]
    fn family_errors_name_the_field() {
        let field = |text: String| JobSpec::parse(&text).unwrap_err().field;
        assert_eq!(field(BERT.replace("\"mlm+nsp\"", "\"clm\"")), "model.objective");
        assert_eq!(field(BERT.replace("arch = \"bert\"", "arch = \"bart\"")), "model.arch");
        assert_eq!(field(BERT.replace("objective = \"mlm+nsp\"", "scores = \"cosine\"")), "model.scores");
        assert_eq!(field(BERT.replace("objective = \"mlm+nsp\"", "positions = \"rotary\"")), "model.positions");
        assert_eq!(field(BERT.replace("objective = \"mlm+nsp\"", "mask_prob = 1.5")), "model.mask_prob");
        assert_eq!(field(BERT.replace("objective = \"mlm+nsp\"", "noise_density = 0.2")), "model.noise_density");
        assert_eq!(field(BERT.replace("objective = \"mlm+nsp\"", "temperature = 0.1")), "model.temperature");
        assert_eq!(field(BERT.replace("bert-test", "tiny")), "model.preset");
        assert_eq!(field(BERT.replace("seq_len = 24", "seq_len = 64")), "train.seq_len");
        assert_eq!(field(BERT.replace("seq_len = 24", "seq_len = 4")), "train.seq_len");
        assert!(JobSpec::parse(&format!("{BERT}\n[checkpoint]\nevery = 5\n")).is_ok(), "BERT jobs checkpoint like GPT ones");
        let contrastive_one = BERT.replace("\"mlm+nsp\"", "\"contrastive\"").replace("global_batch = 8\nmicro_batch = 4", "global_batch = 2\nmicro_batch = 1");
        assert_eq!(field(contrastive_one), "train.micro_batch");
        assert_eq!(field(t5().replace("sentinels = 8", "sentinels = 8\nobjective = \"mlm\"")), "model.objective");
        assert_eq!(field(t5().replace("sentinels = 8", "sentinels = 1")), "model.sentinels");
        for n in [0, 32_769, 70_000] {
            let e = JobSpec::parse(&t5().replace("sentinels = 8", &format!("sentinels = {n}"))).unwrap_err();
            assert_eq!(e.field, "model.sentinels");
            assert!(e.message.contains(&format!("{n} must be in 1..=32768")), "{}", e.message);
        }
        assert_eq!(field(t5().replace("sentinels = 8", "sentinels = 8\nmean_span = 0.5")), "model.mean_span");
        assert_eq!(field(t5().replace("sentinels = 8", "sentinels = 8\nmask_prob = 0.2")), "model.mask_prob");
        // GPT specs refuse the family's options rather than ignore them.
        let gpt = BERT.replace("arch = \"bert\"\n", "").replace("bert-test", "test");
        assert_eq!(field(gpt.clone()), "model.objective");
        assert!(JobSpec::parse(&gpt.replace("objective = \"mlm+nsp\"", "")).is_ok());
    }

    #[test]
    fn the_family_examples_parse() {
        for (name, text) in [("bert-mlm", include_str!("../../examples/bert-mlm.toml")), ("t5-span", include_str!("../../examples/t5-span.toml"))] {
            let s = JobSpec::parse(text).unwrap_or_else(|e| panic!("examples/{name}.toml: {e}"));
            s.family_config(65).unwrap_or_else(|e| panic!("examples/{name}.toml: {e}"));
        }
    }
}
