//! Fine-tuning a BERT or a T5 (`kind = "finetune"` whose `init_from` is a `bert/1` or `t5/1`
//! model or checkpoint): a BERT gets a sequence-classification head (`head = "classification"`:
//! pooler + classifier on [CLS], as transformers' BertForSequenceClassification), a T5 learns
//! prompt -> response as sequence to sequence (`head = "sft"`: the prompt is the encoder's
//! input, the response the decoder's target).
//!
//! A BERT fine-tunes with its parent's dropout (`model.dropout` of the pretraining spec), on in
//! training batches and off in validation, as transformers does.
//!
//! The fine-tuned model is the parent's config with the task's head: every tensor the parent
//! has under the same name and shape is copied, the new ones (classifier, and the pooler when
//! the parent had no next-sentence head) are drawn from the job's seed. Data parallelism,
//! checkpoints and resume are pretraining's (`checkpointing`); the run is on the worker's
//! device (the CPU backend and the TCP ring, or a GPU and NCCL), as GPT fine-tuning is.

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use smelt_checkpoint::{ModelConfig, ModelSource};
use smelt_corpus::sample_order::{rank_slice, SampleOrder};
use smelt_corpus::Tokenizer;
use smelt_engine::model::heads::row_argmax;
use smelt_engine::model::{BertBatch, T5Batch};
use smelt_engine::optim::AdamW;
use smelt_engine::params::ParamTable;
use smelt_engine::backend::Backend;
use smelt_engine::collective::Collective;
use smelt_jobspec::{FinetuneHead, FinetuneSpec, JobSpec};
use smelt_proto::v1::{JobNote, StepMetrics};
use tracing::info;

use crate::checkpointing::{self, Checkpointer};
use crate::device::Device;
use crate::family_data::{self, FamilyBatch};
use crate::finetune::load_split;
use crate::finetune_data::{self, ClassExample, PairExample};
use crate::model_file::{self, FamilyModel, SavedFamilyModel};
use crate::runner::{RunControl, RunEvent, RunRequest};

/// The examples of a job, by model.
enum Task {
    /// BERT sequence classification: texts (without [CLS]/[SEP]) and labels.
    Classify { num_labels: usize, train: Vec<ClassExample>, val: Vec<ClassExample> },
    /// T5 sequence to sequence: (prompt, response) token ids.
    Seq2Seq { train: Vec<PairExample>, val: Vec<PairExample> },
}

impl Task {
    fn n_train(&self) -> usize {
        match self {
            Task::Classify { train, .. } => train.len(),
            Task::Seq2Seq { train, .. } => train.len(),
        }
    }
    fn n_val(&self) -> usize {
        match self {
            Task::Classify { val, .. } => val.len(),
            Task::Seq2Seq { val, .. } => val.len(),
        }
    }
}

/// A BERT or T5 fine-tuning job, parent read and examples loaded.
pub struct FamilyFinetune {
    /// The fine-tuned model's config (the parent's with the task's head).
    model: FamilyModel,
    tokenizer: Tokenizer,
    /// The fine-tuned model's initial weights: the parent's where they exist.
    init_params: Vec<f32>,
    parent: String,
    parent_file: String,
    parent_job: Option<String>,
    /// The fingerprint of the parent file's weights (the fine-tuned model's new tensors are
    /// seeded), which every rank must have read alike.
    parent_print: u64,
    task: Task,
    seed: u64,
}

/// Copies every tensor of `from` that `to` has under the same name and shape into `params`
/// (laid out by `to`); returns the names of those `to` has and `from` lacks.
fn copy_by_name(from: &ParamTable, from_params: &[f32], to: &ParamTable, params: &mut [f32]) -> Vec<String> {
    let mut fresh = Vec::new();
    for s in to.specs() {
        match from.id(&s.name).map(|id| from.spec(id)) {
            Some(f) if f.shape == s.shape => params[s.range()].copy_from_slice(&from_params[f.range()]),
            _ => fresh.push(s.name.clone()),
        }
    }
    fresh
}

impl FamilyFinetune {
    /// Reads the parent (already resolved and verified), checks that the head suits it and loads
    /// the examples with its tokenizer. Errors name the spec field or the file and line.
    pub fn prepare(spec: &JobSpec, src: &ModelSource) -> Result<Self> {
        let f: &FinetuneSpec = spec.finetune.as_ref().ok_or_else(|| anyhow!("job spec: `finetune`: required for kind = \"finetune\""))?;
        let head = f.head_kind()?;
        let SavedFamilyModel { model: parent, tokenizer: tok, params: parent_params, metadata } =
            model_file::family_from_bytes(&src.bytes, &src.file).with_context(|| format!("finetune.init_from {:?}", f.init_from))?;
        let seq = spec.train.seq_len;
        let (model, task) = match (parent.clone(), head) {
            (FamilyModel::Bert { mut config, specials }, FinetuneHead::Classification) => {
                let num_labels = f.num_labels.ok_or_else(|| anyhow!("job spec: `finetune.num_labels`: required for head = \"classification\""))?;
                // [CLS] text [SEP] must fit the positions.
                if seq > config.max_positions {
                    bail!("job spec: `train.seq_len`: {seq} exceeds the max_positions {} of the BERT in finetune.init_from", config.max_positions);
                }
                if seq < 3 {
                    bail!("job spec: `train.seq_len`: {seq} leaves no room for text between [CLS] and [SEP]");
                }
                let limit = format!("the {} tokens train.seq_len = {seq} leaves beside [CLS] and [SEP]", seq - 2);
                let (train, val) = load_split(f, |p| finetune_data::load_classification_within(p, &tok, num_labels, seq - 2, &limit))?;
                finetune_data::warn_if_one_class(&train, num_labels);
                config.nsp = false;
                config.num_labels = num_labels;
                (FamilyModel::Bert { config, specials }, Task::Classify { num_labels, train, val })
            }
            (FamilyModel::T5 { config, specials }, FinetuneHead::Sft) => {
                if seq > config.max_positions {
                    bail!("job spec: `train.seq_len`: {seq} exceeds the max_positions {} of the T5 in finetune.init_from", config.max_positions);
                }
                // The end-of-text id ends each response when the model knows it (a corpus's).
                let eot = Some(tok.eot_token()).filter(|&e| e < specials.base_vocab);
                let (train, val) = load_split(f, |p| finetune_data::load_pairs(p, &tok, seq, seq, eot))?;
                (FamilyModel::T5 { config, specials }, Task::Seq2Seq { train, val })
            }
            (FamilyModel::Bert { .. }, FinetuneHead::Sft) => {
                bail!("job spec: `finetune.head`: \"sft\" needs a generative model (a GPT or a T5); the BERT in finetune.init_from fine-tunes with head = \"classification\"")
            }
            (FamilyModel::T5 { .. }, FinetuneHead::Classification) => {
                bail!("job spec: `finetune.head`: \"classification\" is for a GPT or a BERT; the T5 in finetune.init_from fine-tunes with head = \"sft\" (prompt -> response)")
            }
        };
        if task.n_train() == 0 {
            bail!("finetune.data {}: no training examples left after holding out the validation split", f.data);
        }
        let table = model.model_config().param_table();
        let mut init_params = table.init(spec.seed);
        let fresh = copy_by_name(&parent.model_config().param_table(), &parent_params, &table, &mut init_params);
        info!(parent = %src.file, arch = model.model_config().arch(), new_tensors = ?fresh, "fine-tuning from the parent's weights");
        Ok(FamilyFinetune {
            model,
            tokenizer: tok,
            init_params,
            parent: f.init_from.clone(),
            parent_file: src.file.clone(),
            parent_job: metadata.get("smelt.job").cloned().or(src.job.clone()),
            parent_print: checkpointing::fingerprint(&parent_params),
            task,
            seed: spec.seed,
        })
    }
}

type Model<B> = crate::family::Model<B>;

impl FamilyFinetune {
    /// A micro-batch of the given examples: `[CLS] text [SEP]` padded with [PAD] and masked by
    /// length for BERT; (prompt, response) pairs for T5. `step` seeds a BERT's dropout masks
    /// (with the micro-batch's first example, so they do not depend on the world size);
    /// validation batches (`step` = None) run without dropout.
    fn batch(&self, idx: &[usize], step: Option<u64>) -> FamilyBatch {
        let val = step.is_none();
        match (&self.task, &self.model) {
            (Task::Classify { train, val: v, .. }, FamilyModel::Bert { specials: s, .. }) => {
                let ex: Vec<&ClassExample> = idx.iter().map(|&i| if val { &v[i] } else { &train[i] }).collect();
                let t = ex.iter().map(|e| e.ids.len() + 2).max().unwrap_or(2);
                let mut x = BertBatch::new(Vec::with_capacity(ex.len() * t), ex.len(), t);
                let (mut lens, mut labels) = (Vec::new(), Vec::new());
                for e in ex {
                    let row = std::iter::once(s.cls).chain(e.ids.iter().copied()).chain([s.sep]);
                    x.tokens.extend(row.chain(std::iter::repeat(s.pad)).take(t));
                    lens.push(e.ids.len() as u32 + 2);
                    labels.push(e.label);
                }
                x.lens = Some(lens);
                x.labels = Some(labels);
                if let Some(step) = step {
                    x.train = true;
                    x.dropout_seed = family_data::dropout_seed(self.seed, step, idx.first().copied().unwrap_or(0) as u64);
                }
                FamilyBatch::Bert(x)
            }
            (Task::Seq2Seq { train, val: v }, FamilyModel::T5 { specials: s, .. }) => {
                let pairs: Vec<(Vec<u32>, Vec<u32>)> = idx
                    .iter()
                    .map(|&i| if val { &v[i] } else { &train[i] })
                    .map(|e| (e.prompt.clone(), e.response.clone()))
                    .collect();
                FamilyBatch::T5(T5Batch::from_pairs(&pairs, s.pad, s.pad))
            }
            _ => unreachable!("prepare pairs each task with its model"),
        }
    }

    fn batch_tokens(x: &FamilyBatch) -> usize {
        match x {
            FamilyBatch::Bert(x) => x.lens.iter().flatten().map(|&l| l as usize).sum(),
            FamilyBatch::T5(x) => x.enc_lens.iter().flatten().map(|&l| l as usize).sum::<usize>() + x.batch * x.dec_len,
        }
    }

    /// Validation (loss, accuracy) over every validation example, in batches of `batch`; the
    /// loss is the mean over examples (classification) or over response tokens (seq2seq).
    fn evaluate<B: Backend>(&self, model: &mut Model<B>, batch: usize) -> Result<(Option<f32>, Option<f32>)> {
        let n = self.task.n_val();
        if n == 0 {
            return Ok((None, None));
        }
        let (mut loss_sum, mut weight, mut correct) = (0.0f64, 0usize, 0usize);
        let all: Vec<usize> = (0..n).collect();
        for chunk in all.chunks(batch.max(1)) {
            let x = self.batch(chunk, None);
            let loss = model.forward(&x)? as f64;
            match &x {
                FamilyBatch::Bert(b) => {
                    let Task::Classify { num_labels, .. } = &self.task else { unreachable!() };
                    loss_sum += loss * b.batch as f64;
                    weight += b.batch;
                    let labels = b.labels.as_deref().unwrap_or_default();
                    correct += row_argmax(&model.class_logits(), *num_labels).iter().zip(labels).filter(|(p, l)| p == l).count();
                }
                FamilyBatch::T5(b) => {
                    let k = b.targets.iter().flatten().filter(|&&t| t != smelt_engine::backend::IGNORE_INDEX).count();
                    loss_sum += loss * k as f64;
                    weight += k;
                }
            }
        }
        let loss = Some((loss_sum / weight.max(1) as f64) as f32);
        Ok(match self.task {
            Task::Classify { .. } => (loss, Some(correct as f32 / n as f32)),
            Task::Seq2Seq { .. } => (loss, None),
        })
    }
}

/// The training thread of a BERT or T5 fine-tuning assignment (`finetune::run` dispatches here
/// on the parent's format). Returns the final step.
pub(crate) fn run(req: RunRequest, spec: JobSpec, src: ModelSource, control: &RunControl, events: &dyn Fn(RunEvent)) -> Result<u64> {
    let a = &req.assignment;
    let job = FamilyFinetune::prepare(&spec, &src)?;
    if a.rank == 0 {
        for s in &src.skipped {
            let text = format!("finetune.init_from: checkpoint {} skipped: {}; starting from {} instead", s.uri, s.reason, src.file);
            events(RunEvent::Note(JobNote { job_id: a.job_id.clone(), attempt: a.attempt, text, ..Default::default() }));
        }
    }
    match req.device {
        Device::Cpu => crate::runner::with_cpu_ring(&req, control, spec.grad_bucket_floats(), |be, ring| train(be, ring, &job, &spec, &req, control, events)),
        Device::Cuda(ordinal) => crate::gpu::finetune_family(ordinal, &job, &spec, &req, control, events),
    }
}

/// A prepared BERT or T5 fine-tuning job on any backend, the collective already joined: resume
/// from the assignment's checkpoint if it names one, train with checkpoints, save. Returns the
/// final step.
pub(crate) fn train<B: Backend>(
    be: B,
    collective: &mut dyn Collective<B>,
    job: &FamilyFinetune,
    spec: &JobSpec,
    req: &RunRequest,
    control: &RunControl,
    events: &dyn Fn(RunEvent),
) -> Result<u64> {
    let a = &req.assignment;
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let tc = spec.train_config();
    let logits = tc.batch_size as u128 * job.model.model_config().vocab_size() as u128;
    let params = job.init_params.len();
    crate::memory_check::ensure_fits(&be, params, logits, || format!("fine-tuning the model ({params} parameters)"))?;
    let mut model = Model::from_params(be, &job.model, &job.init_params).with_context(|| format!("building the fine-tuned model on {}", req.device))?;
    let mut opt = AdamW::new(model.backend(), model.table(), tc.optim.clone())?;
    let model_config: ModelConfig = job.model.model_config();
    let (mut start, mut lineage) = (0, smelt_checkpoint::Lineage { parent_checkpoint: Some(job.parent_file.clone()), parent_job: job.parent_job.clone() });
    let mut print = job.parent_print;
    if let Some(ck) = checkpointing::load_resume(a, events)? {
        model.restore(&mut opt, &ck, &model_config, spec, "this job fine-tunes")?;
        start = ck.step();
        lineage = checkpointing::lineage_of(&ck);
        print = checkpointing::fingerprint_if_shared(a, &ck.params);
    }
    checkpointing::agree_on_start(a, start, model.backend(), collective, print)?;
    let mut checkpointer = match rank {
        0 => Checkpointer::new(a, spec, model_config.clone(), &job.tokenizer, &req.out_dir, lineage)?,
        _ => None,
    };
    // where this run began, for a rescue's check of the optimizer's count
    let from = (start, opt.steps_done());

    let order = SampleOrder::new(job.task.n_train() as u64, spec.seed);
    let global = spec.train.global_batch as u64;
    info!(job_id = %a.job_id, rank, world, device = %req.device, arch = model_config.arch(), parent = %job.parent, start, train_examples = job.task.n_train(), val_examples = job.task.n_val(), "fine-tuning started");
    let started = Instant::now();
    let (mut tokens, mut last_val) = (0usize, (None, None));
    for step in start..tc.steps {
        if let Some(reason) = control.stopped() {
            // rank 0 saves the steps done since the last checkpoint before it goes
            model.end_early(checkpointer.take(), &opt, from, spec.seed, step, true, &reason, events);
            bail!("stopped at step {step}: {reason}");
        }
        let idx: Vec<usize> = rank_slice(step, global, rank as u64, world as u64).map_err(|e| anyhow!("{e}"))?.map(|k| order.sequence_at(k) as usize).collect();
        let micro: Vec<FamilyBatch> = idx.chunks(tc.batch_size).map(|c| job.batch(c, Some(step))).collect();
        let lr = tc.schedule.lr_at(step);
        let (loss, report) = match model.train_step(&micro, collective, &mut opt, lr, step, crate::runner::bucket_floats(spec)) {
            Ok(out) => out,
            Err(e) => {
                // a peer lost mid-step: the update was not applied, rank 0 saves step `step`
                let whole = checkpointing::failed_before_update(model.backend(), &e);
                model.end_early(checkpointer.take(), &opt, from, spec.seed, step, whole, &control.stopped().unwrap_or_else(|| format!("{e:#}")), events);
                return Err(e);
            }
        };
        tokens += micro.iter().map(FamilyFinetune::batch_tokens).sum::<usize>() * world;

        let done = step + 1;
        let mut val = (None, None);
        if rank == 0 && (done == tc.steps || (tc.eval_interval > 0 && done % tc.eval_interval == 0)) {
            val = job.evaluate(&mut model, tc.batch_size)?;
            val = checkpointing::device_checked(model.backend(), val)?;
            if val.0.is_some() {
                last_val = val;
                info!(job_id = %a.job_id, step = done, val_loss = val.0, val_accuracy = val.1, "evaluated");
            }
        }
        if rank == 0 {
            events(RunEvent::Metrics(StepMetrics {
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                rank: a.rank,
                step: done,
                loss,
                grad_norm: report.grad_norm,
                lr,
                tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
                val_loss: val.0,
                val_accuracy: val.1,
                mfu: None,
                val_sources: Vec::new(),
            }));
        }
        if let Some(c) = checkpointer.as_mut() {
            c.after_step_with(done, tc.steps, events, &mut || model.host_state(&opt, done, spec.seed))?;
        }
    }
    if let Some(c) = checkpointer {
        c.finish(events);
    }
    if rank == 0 {
        let path = req.out_dir.join("jobs").join(&a.job_id).join("model.safetensors");
        let f = spec.finetune.as_ref().expect("prepared from a finetune spec");
        let mut extra = vec![
            ("kind", "finetune".to_string()),
            ("head", f.head.clone()),
            ("parent", job.parent.clone()),
            ("parent_file", job.parent_file.clone()),
            ("step", tc.steps.to_string()),
            ("job", a.job_id.clone()),
        ];
        if let Some(j) = &job.parent_job {
            extra.push(("parent_job", j.clone()));
        }
        if let Some(v) = last_val.0 {
            extra.push(("val_loss", v.to_string()));
        }
        if let Some(acc) = last_val.1 {
            extra.push(("val_accuracy", acc.to_string()));
        }
        let params = checkpointing::device_checked(model.backend(), model.params_host())?;
        model_file::save_family(&path, &job.model, &job.tokenizer, &params, &extra)?;
        info!(job_id = %a.job_id, path = %path.display(), parent = %job.parent, val_loss = last_val.0, val_accuracy = last_val.1, "fine-tuned weights saved");
    }
    Ok(tc.steps)
}
