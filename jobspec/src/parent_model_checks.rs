//! The checks of a job whose model comes from a file rather than from its `[model]` table: a GPT
//! pretraining job continuing from `model.init_from`, and a fine-tuning job (`[finetune]`). The
//! file decides the model, so the fields that would size or shape one are refused, named, rather
//! than accepted and ignored.

use crate::{err, train_field_err, Arch, FinetuneHead, JobSpec, ModelSpec, SpecError, MAX_LABELS};

/// The `[model]` fields that size a model, each with whether the spec gives it: a model read
/// from a file (`model.init_from`, a fine-tuning job's `finetune.init_from`) takes them from
/// there instead.
fn sizing_fields(m: &ModelSpec) -> [(&'static str, bool); 9] {
    [
        ("model.preset", m.preset.is_some()),
        ("model.n_layer", m.n_layer.is_some()),
        ("model.n_head", m.n_head.is_some()),
        ("model.n_embd", m.n_embd.is_some()),
        ("model.block_size", m.block_size.is_some()),
        ("model.vocab_size", m.vocab_size.is_some()),
        ("model.pad_vocab_to", m.pad_vocab_to.is_some()),
        ("model.positions", m.positions.is_some()),
        ("model.ln_placement", m.ln_placement.is_some()),
    ]
}

impl JobSpec {
    /// The checks of a GPT pretraining job that continues from `model.init_from`: the file
    /// decides the model, so no field that sizes it may be given (the worker, which reads the
    /// file, checks the sequence length against its block size and the data's tokenizer).
    pub(crate) fn validate_init_from(&self, init: &str) -> Result<(), SpecError> {
        if init.trim().is_empty() {
            return Err(err("model.init_from", "must name a model file, a checkpoint or a job id"));
        }
        if self.arch()? != Arch::Gpt {
            return Err(err("model.init_from", "only for arch = \"gpt\" (a BERT or T5 is fine-tuned from with kind = \"finetune\")"));
        }
        let given = sizing_fields(&self.model);
        if let Some((field, _)) = given.iter().find(|(_, set)| *set) {
            return Err(err(field, "the model comes from model.init_from (its sizes, vocabulary and positions); leave this out"));
        }
        self.check_family_fields_absent()?;
        self.train_config().validate(usize::MAX).map_err(|e| train_field_err(e.field.as_str(), e.message))
    }

    /// The checks of a fine-tuning job: its `[finetune]` table, no `[model]` or `[data]` of its
    /// own, and the training settings (the sequence length against the model's block size is
    /// checked by the worker, which reads the model).
    pub(crate) fn validate_finetune(&self) -> Result<(), SpecError> {
        let f = self.finetune.as_ref().ok_or_else(|| err("finetune", "required for kind = \"finetune\" (init_from, head, data)"))?;
        if f.init_from.trim().is_empty() {
            return Err(err("finetune.init_from", "must name a model file, a checkpoint or a job id"));
        }
        if f.data.trim().is_empty() {
            return Err(err("finetune.data", "must name a JSONL file of examples"));
        }
        if f.val_data.as_ref().is_some_and(|v| v.trim().is_empty()) {
            return Err(err("finetune.val_data", "must name a JSONL file (or leave it out)"));
        }
        if !(0.0..1.0).contains(&f.val_fraction()) {
            return Err(err("finetune.val_fraction", format!("{} is outside [0, 1)", f.val_fraction())));
        }
        if f.val_data.is_some() && f.val_fraction_given.is_some() {
            return Err(err("finetune.val_fraction", "not with finetune.val_data, whose examples are the validation set: leave one of the two out"));
        }
        match (f.head_kind()?, f.num_labels) {
            (FinetuneHead::Classification, None) => return Err(err("finetune.num_labels", "required for head = \"classification\"")),
            (FinetuneHead::Classification, Some(n)) if n < 2 => {
                return Err(err("finetune.num_labels", format!("{n}: a classifier needs at least 2 labels")))
            }
            (FinetuneHead::Classification, Some(n)) if n > MAX_LABELS => {
                return Err(err("finetune.num_labels", format!("{n} is more than {MAX_LABELS}, the most a classification head takes")))
            }
            (FinetuneHead::Sft, Some(_)) => return Err(err("finetune.num_labels", "only for head = \"classification\"")),
            _ => {}
        }
        if self.data.text.is_some() || self.data.corpus.is_some() || !self.data.mix.is_empty() {
            let field = if self.data.text.is_some() {
                "data.text"
            } else if self.data.corpus.is_some() {
                "data.corpus"
            } else {
                "data.mix"
            };
            return Err(err(field, "a finetune job reads its examples from finetune.data"));
        }
        let m = &self.model;
        // every [model] field: a fine-tuning run is its parent's model (a BERT keeps its
        // parent's dropout), so one given here would be accepted and ignored
        let given = sizing_fields(m).into_iter().chain([
            ("model.arch", m.arch.is_some()),
            ("model.init_from", m.init_from.is_some()),
            ("model.scores", m.scores.is_some()),
            ("model.additive_width", m.additive_width.is_some()),
            ("model.n_inner", m.n_inner.is_some()),
            ("model.n_decoder_layer", m.n_decoder_layer.is_some()),
            ("model.objective", m.objective.is_some()),
            ("model.mask_prob", m.mask_prob.is_some()),
            ("model.temperature", m.temperature.is_some()),
            ("model.dropout", m.dropout.is_some()),
            ("model.views", m.views.is_some()),
            ("model.noise_density", m.noise_density.is_some()),
            ("model.mean_span", m.mean_span.is_some()),
            ("model.sentinels", m.sentinels.is_some()),
        ]);
        for (field, set) in given {
            if set {
                let why = if field == "model.dropout" { " (a BERT fine-tunes with its parent's dropout)" } else { "" };
                return Err(err(field, format!("a finetune job takes its model from finetune.init_from{why}")));
            }
        }
        self.train_config().validate(usize::MAX).map_err(|e| train_field_err(e.field.as_str(), e.message))
    }
}
