//! A fine-tuning job (`kind = "finetune"`) of a GPT (a BERT or T5 parent goes to
//! `finetune_family`): start from the weights `finetune.init_from` names,
//! train a classification head or causal SFT on labeled JSONL, report validation loss (and
//! accuracy for classification), save the result with its parent recorded.
//!
//! It runs on the worker's device, as pretraining does: the CPU backend and the TCP ring, or a
//! GPU (`gpu::finetune_gpt`) and NCCL. Data parallelism is pretraining's: every rank derives
//! the same example order from the seed and takes its slice of each step's global batch; the
//! GPT's and the head's gradients are averaged over the collective, clipped by their joint
//! norm, and stepped by AdamW on every rank.
//!
//! `init_from` is read through `smelt_checkpoint::resolve_model`: a checkpoint is verified
//! against its manifest before its weights are used. Rank 0 checkpoints the GPT, the head and
//! both optimizers as pretraining does (`checkpointing`), so a restarted job resumes exactly
//! where its last checkpoint left it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use smelt_checkpoint::{Checkpoint, HeadConfig, Lineage, ModelConfig, ModelSource, Skipped};
use smelt_corpus::sample_order::{rank_slice, SampleOrder};
use smelt_corpus::Tokenizer;
use smelt_engine::backend::{Backend, IGNORE_INDEX};
use smelt_engine::collective::Collective;
use smelt_engine::grad_buckets;
use smelt_engine::model::gpt::ReadyFn;
use smelt_engine::model::heads::ClassificationHead;
use smelt_engine::model::{Gpt, GptConfig};
use smelt_engine::optim::{AdamW, AdamWConfig, LrSchedule};
use smelt_engine::params::ParamTable;
use smelt_engine::train::TrainerState;
use smelt_engine::{weights, EngineError};
use smelt_jobspec::{FinetuneHead, FinetuneSpec, JobSpec};
use smelt_proto::v1::{JobNote, StepMetrics};
use tracing::info;

use crate::checkpointing::{self, Checkpointer, HostState};
use crate::device::Device;
use crate::finetune_data::{self, ClassExample, SftExample};
use crate::model_file;
use crate::runner::{RunControl, RunEvent, RunRequest};

/// The examples of a job, by head.
enum Examples {
    Classification { num_labels: usize, train: Vec<ClassExample>, val: Vec<ClassExample> },
    Sft { train: Vec<SftExample>, val: Vec<SftExample> },
}

impl Examples {
    fn n_train(&self) -> usize {
        match self {
            Examples::Classification { train, .. } => train.len(),
            Examples::Sft { train, .. } => train.len(),
        }
    }
    fn n_val(&self) -> usize {
        match self {
            Examples::Classification { val, .. } => val.len(),
            Examples::Sft { val, .. } => val.len(),
        }
    }
}

/// A fine-tuning job with its parent model and examples loaded, ready to train.
pub struct FinetuneJob {
    spec: JobSpec,
    config: GptConfig,
    tokenizer: Tokenizer,
    init_params: Vec<f32>,
    /// `finetune.init_from` as given, and the file it resolved to.
    parent: String,
    parent_file: String,
    parent_job: Option<String>,
    /// Checkpoints of the parent job passed over (they did not verify), and why.
    pub skipped: Vec<Skipped>,
    /// The parent's own classification head (`score.weight`, (num_labels, C)) when it is a
    /// classifier with this job's label count: the head starts from it, not from the seed.
    init_head: Option<Vec<f32>>,
    /// What became of a parent's head, for the job's events (rank 0 records them).
    pub head_notes: Vec<String>,
    examples: Examples,
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct FinetuneOutcome {
    pub steps: u64,
    pub val_loss: Option<f32>,
    /// Classification only.
    pub val_accuracy: Option<f32>,
    /// Where rank 0 saved the result.
    pub model_path: Option<PathBuf>,
}

/// `finetune.init_from`, read and verified (`crate::init_from::resolve`).
pub fn resolve_init_from(spec: &JobSpec, init_from: &str, at: &crate::init_from::Lookup) -> Result<ModelSource> {
    crate::init_from::resolve(spec, "finetune.init_from", init_from, at)
}

impl FinetuneJob {
    /// Resolves and reads the parent model, then loads and splits the examples with its
    /// tokenizer. Every error names the spec field or the file and line at fault.
    pub fn prepare(spec: &JobSpec, out_dir: &Path) -> Result<FinetuneJob> {
        let f: &FinetuneSpec = spec.finetune.as_ref().ok_or_else(|| anyhow!("job spec: `finetune`: required for kind = \"finetune\""))?;
        Self::prepare_from(spec, resolve_init_from(spec, &f.init_from, &crate::init_from::Lookup::local(out_dir))?)
    }

    /// [`Self::prepare`] with `init_from` already resolved to `src`.
    pub fn prepare_from(spec: &JobSpec, src: ModelSource) -> Result<FinetuneJob> {
        let f: &FinetuneSpec = spec.finetune.as_ref().ok_or_else(|| anyhow!("job spec: `finetune`: required for kind = \"finetune\""))?;
        let head = f.head_kind()?;
        let parent_file = src.file.clone();
        let saved = model_file::from_bytes(&src.bytes, &parent_file).with_context(|| format!("finetune.init_from {:?}", f.init_from))?;
        let cfg = saved.config.clone();
        let seq = spec.train.seq_len;
        if seq > cfg.block_size {
            bail!("job spec: `train.seq_len`: {seq} exceeds the block_size {} of the model in finetune.init_from", cfg.block_size);
        }
        let tok = saved.tokenizer.clone();
        let examples = match head {
            FinetuneHead::Classification => {
                let num_labels = f.num_labels.ok_or_else(|| anyhow!("job spec: `finetune.num_labels`: required for head = \"classification\""))?;
                let (train, val) = load_split(f, |p| finetune_data::load_classification(p, &tok, num_labels, seq))?;
                finetune_data::warn_if_one_class(&train, num_labels);
                Examples::Classification { num_labels, train, val }
            }
            FinetuneHead::Sft => {
                // The end-of-text id ends each response when the model knows it (trained on a corpus).
                let eot = Some(tok.eot_token()).filter(|&e| (e as usize) < cfg.vocab_size);
                let (train, val) = load_split(f, |p| finetune_data::load_sft(p, &tok, seq, eot))?;
                Examples::Sft { train, val }
            }
        };
        if examples.n_train() == 0 {
            bail!("finetune.data {}: no training examples left after holding out the validation split", f.data);
        }
        // A parent that is itself a classifier: continuing to fine-tune it keeps its trained
        // head (it was drawn afresh from the seed, so the parent's accuracy was lost at step 0)
        let parent_head = model_file::classification_head(&src.bytes, &parent_file, &saved, src.head.map(|h| h.num_labels))?;
        let (mut init_head, mut head_notes) = (None, Vec::new());
        match (parent_head, &examples) {
            (Some((n, w)), Examples::Classification { num_labels, .. }) if n == *num_labels => {
                head_notes.push(format!("the classification head starts from the parent's ({n} labels, {parent_file})"));
                init_head = Some(w);
            }
            (Some((n, _)), Examples::Classification { num_labels, .. }) => head_notes.push(format!(
                "the parent's {n}-label classification head is not used: this job has {num_labels} labels, so its head is drawn from the job's seed"
            )),
            (Some((n, _)), Examples::Sft { .. }) => {
                head_notes.push(format!("the parent's {n}-label classification head is left out: supervised fine-tuning trains the language-model head"))
            }
            (None, _) => {}
        }
        for note in &head_notes {
            tracing::info!(note = %note, "fine-tuning head");
        }
        Ok(FinetuneJob {
            spec: spec.clone(),
            config: cfg,
            tokenizer: tok,
            init_params: saved.params,
            parent: f.init_from.clone(),
            parent_file,
            parent_job: saved.metadata.get("smelt.job").cloned().or(src.job),
            skipped: src.skipped,
            init_head,
            head_notes,
            examples,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The classification head checkpoints hold (none for SFT).
    pub fn head_config(&self) -> Option<HeadConfig> {
        match &self.examples {
            Examples::Classification { num_labels, .. } => Some(HeadConfig { num_labels: *num_labels }),
            Examples::Sft { .. } => None,
        }
    }

    /// Where this job's weights came from, as its checkpoints record it.
    pub fn lineage(&self) -> Lineage {
        Lineage { parent_checkpoint: Some(self.parent_file.clone()), parent_job: self.parent_job.clone() }
    }

    /// Trains on backend `be` as `rank` of the collective's world; rank 0 evaluates, reports
    /// metrics and saves `<out_dir>/jobs/<job_id>/model.safetensors`. `stopped` is polled at
    /// every step.
    pub fn train<B: Backend>(
        &self,
        be: B,
        job_id: &str,
        out_dir: &Path,
        collective: &mut dyn Collective<B>,
        stopped: &dyn Fn() -> Option<String>,
        metrics: &mut dyn FnMut(StepMetrics),
    ) -> Result<FinetuneOutcome> {
        self.train_from(be, job_id, out_dir, collective, stopped, metrics, None, None)
    }

    /// [`Self::train`], starting from checkpoint `from` (every rank the same) when given, and
    /// checkpointing through `checkpoints` (rank 0) when given.
    #[allow(clippy::too_many_arguments)]
    pub fn train_from<B: Backend>(
        &self,
        be: B,
        job_id: &str,
        out_dir: &Path,
        collective: &mut dyn Collective<B>,
        stopped: &dyn Fn() -> Option<String>,
        metrics: &mut dyn FnMut(StepMetrics),
        from: Option<&Checkpoint>,
        mut checkpoints: Option<(Checkpointer, &dyn Fn(RunEvent))>,
    ) -> Result<FinetuneOutcome> {
        let (rank, world) = (collective.rank(), collective.world_size());
        let spec = &self.spec;
        let tc = spec.train_config();
        let backend = be.name().to_string();
        let mut st = State::new(be, self, &tc.optim, tc.schedule.clone())?;
        let start = match from {
            Some(ck) => {
                st.restore(self, ck)?;
                ck.step()
            }
            None => 0,
        };
        let order = SampleOrder::new(self.examples.n_train() as u64, spec.seed);
        let global = spec.train.global_batch as u64;
        info!(
            job_id,
            rank,
            world,
            backend = %backend,
            head = %spec.finetune.as_ref().map(|f| f.head.as_str()).unwrap_or_default(),
            parent = %self.parent,
            start,
            train_examples = self.examples.n_train(),
            val_examples = self.examples.n_val(),
            "fine-tuning started"
        );
        let started = Instant::now();
        let (mut tokens, mut last_val) = (0usize, (None, None));
        // one optimizer step per training step: a rescue at step s holds opt_start + s - start
        let opt_start = st.opt_model.steps_done();
        for step in start..tc.steps {
            if let Some(reason) = stopped() {
                // rank 0 saves the steps done since the last checkpoint before it goes
                if let Some((c, events)) = checkpoints.take() {
                    c.end_early(step, start, true, &reason, events, &mut || checkpointing::optimizer_at(st.host_state(step)?, opt_start + step - start));
                }
                bail!("stopped at step {step}: {reason}");
            }
            let slice = rank_slice(step, global, rank as u64, world as u64).map_err(|e| anyhow!("{e}"))?;
            let indices: Vec<usize> = slice.map(|k| order.sequence_at(k) as usize).collect();
            let micro: Vec<&[usize]> = indices.chunks(tc.batch_size).collect();
            let (loss, grad_norm, n_tokens) = match st.step(self, &micro, collective, step, crate::runner::bucket_floats(spec)) {
                Ok(out) => out,
                Err(e) => {
                    // a peer lost mid-step: the update was not applied, rank 0 saves step `step`
                    if let Some((c, events)) = checkpoints.take() {
                        let whole = checkpointing::failed_before_update(st.model.backend(), &e);
                        c.end_early(step, start, whole, &stopped().unwrap_or_else(|| format!("{e:#}")), events, &mut || checkpointing::optimizer_at(st.host_state(step)?, opt_start + step - start));
                    }
                    return Err(e);
                }
            };
            tokens += n_tokens * world;
            let done = step + 1;
            let mut val = (None, None);
            if rank == 0 && self.examples.n_val() > 0 && (done == tc.steps || (tc.eval_interval > 0 && done % tc.eval_interval == 0)) {
                val = st.evaluate(self, tc.batch_size)?;
                val = checkpointing::device_checked(st.model.backend(), val)?;
                last_val = val;
                info!(job_id, step = done, val_loss = val.0, val_accuracy = val.1, "evaluated");
            }
            if rank == 0 {
                metrics(StepMetrics {
                    job_id: job_id.to_string(),
                    attempt: 0,
                    rank: 0,
                    step: done,
                    loss,
                    grad_norm,
                    lr: tc.schedule.lr_at(step),
                    tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
                    val_loss: val.0,
                    val_accuracy: val.1,
                    mfu: None,
                    val_sources: Vec::new(),
                });
            }
            if let Some((c, events)) = checkpoints.as_mut() {
                c.after_step_with(done, tc.steps, *events, &mut || st.host_state(done))?;
            }
        }
        if let Some((c, events)) = checkpoints {
            c.finish(events);
        }
        let mut model_path = None;
        if rank == 0 {
            let path = out_dir.join("jobs").join(job_id).join("model.safetensors");
            self.save(&st, &path, job_id, tc.steps, last_val)?;
            info!(job_id, path = %path.display(), parent = %self.parent, val_loss = last_val.0, val_accuracy = last_val.1, "fine-tuned weights saved");
            model_path = Some(path);
        }
        Ok(FinetuneOutcome { steps: tc.steps, val_loss: last_val.0, val_accuracy: last_val.1, model_path })
    }

    /// The GPT's tensors and the head's in one safetensors file, with the parent recorded.
    fn save<B: Backend>(&self, st: &State<B>, path: &Path, job_id: &str, steps: u64, val: (Option<f32>, Option<f32>)) -> Result<()> {
        let mut table = ParamTable::new();
        for s in st.model.table().specs().iter().chain(st.head.iter().flat_map(|h| h.table().specs())) {
            table.push_like(s);
        }
        let mut params = st.model.params_host();
        if let Some(h) = &st.head {
            params.extend(h.params_host(st.model.backend()));
        }
        let params = checkpointing::device_checked(st.model.backend(), params)?;
        let f = self.spec.finetune.as_ref().expect("prepared from a finetune spec");
        let mut extra = vec![
            ("kind", "finetune".to_string()),
            ("head", f.head.clone()),
            ("parent", self.parent.clone()),
            ("parent_file", self.parent_file.clone()),
            ("step", steps.to_string()),
            ("job", job_id.to_string()),
        ];
        if let Some(j) = &self.parent_job {
            extra.push(("parent_job", j.clone()));
        }
        if let Examples::Classification { num_labels, .. } = &self.examples {
            extra.push(("num_labels", num_labels.to_string()));
        }
        if let Some(v) = val.0 {
            extra.push(("val_loss", v.to_string()));
        }
        if let Some(a) = val.1 {
            extra.push(("val_accuracy", a.to_string()));
        }
        let meta = model_file::metadata(&self.config, &self.tokenizer, &extra)?;
        weights::write_atomic(path, &weights::to_bytes(&table, &params, meta)?)?;
        Ok(())
    }
}

/// Training and validation examples: `finetune.val_data` when given, else `val_fraction` of
/// `finetune.data` held out.
pub(crate) fn load_split<T>(f: &FinetuneSpec, load: impl Fn(&str) -> Result<Vec<T>>) -> Result<(Vec<T>, Vec<T>)> {
    let all = load(&f.data).context("finetune.data")?;
    Ok(match &f.val_data {
        Some(v) => {
            if v.trim_end_matches('/') == f.data.trim_end_matches('/') {
                tracing::warn!(target: smelt_proto::JOB_WARNING_TARGET, "finetune.val_data is finetune.data ({v}): the validation loss and accuracy are measured on training examples");
            }
            (all, load(v).context("finetune.val_data")?)
        }
        None => finetune_data::split(all, f.val_fraction()),
    })
}

/// Model, head and their optimizers, on one backend.
struct State<B: Backend> {
    model: Gpt<B>,
    head: Option<ClassificationHead<B>>,
    opt_model: AdamW<B>,
    opt_head: Option<AdamW<B>>,
    clip: Option<f32>,
    schedule: LrSchedule,
}

impl<B: Backend> State<B> {
    fn new(be: B, job: &FinetuneJob, optim: &AdamWConfig, schedule: LrSchedule) -> Result<State<B>> {
        // a lower bound of the logits: one predicted position per example
        let params = job.config.num_params();
        let logits = job.spec.train.micro_batch as u128 * job.config.vocab_size as u128;
        crate::memory_check::ensure_fits(&be, params, logits, || format!("fine-tuning the model ({params} parameters)"))?;
        let model = Gpt::from_params(be, job.config.clone(), &job.init_params)?;
        // Clipping is by the joint norm of the GPT's and the head's gradients, done here; the
        // optimizers themselves do not clip.
        let unclipped = AdamWConfig { grad_clip: None, ..optim.clone() };
        let opt_model = AdamW::new(model.backend(), model.table(), unclipped.clone())?;
        let (head, opt_head) = match &job.examples {
            Examples::Classification { num_labels, .. } => {
                let mut h = ClassificationHead::new(model.backend(), *num_labels, job.config.n_embd, job.spec.seed)?;
                if let Some(w) = &job.init_head {
                    h.set_params_host(model.backend(), w);
                }
                let o = AdamW::new(model.backend(), h.table(), unclipped)?;
                (Some(h), Some(o))
            }
            Examples::Sft { .. } => (None, None),
        };
        Ok(State { model, head, opt_model, opt_head, clip: optim.grad_clip, schedule })
    }

    /// Puts the model, the head and both optimizers back where checkpoint `ck` left them.
    fn restore(&mut self, job: &FinetuneJob, ck: &Checkpoint) -> Result<()> {
        if ck.trainer.model.gpt() != Some(&job.config) || ck.trainer.head != job.head_config() {
            let expected = ModelConfig::Gpt(job.config.clone());
            let head = |h: Option<HeadConfig>| h.map_or("no head".to_string(), |h| format!("a {}-label classification head", h.num_labels));
            let how = ck.trainer.model.differences(&expected);
            let how = if how.is_empty() { String::new() } else { format!(": {how}") };
            bail!(
                "checkpoint {} holds a {} with {}; this job makes a {} with {}{how}",
                ck.uri,
                ck.trainer.model,
                head(ck.trainer.head),
                expected,
                head(job.head_config())
            );
        }
        crate::resume_warnings::warn_if_data_order_changes(ck, &job.spec);
        let n = self.model.table().total();
        let hn = self.head.as_ref().map_or(0, |h| h.table().total());
        if ck.params.len() != n + hn {
            bail!("checkpoint {} holds {} parameters, the model and head have {}", ck.uri, ck.params.len(), n + hn);
        }
        let t = ck.trainer.trainer.optimizer_steps;
        self.model.set_params_host(&ck.params[..n]);
        let (be, _, _, _) = self.model.params_and_grads();
        self.opt_model.restore(be, &ck.m[..n], &ck.v[..n], t);
        if let (Some(h), Some(o)) = (&mut self.head, &mut self.opt_head) {
            let be = self.model.backend();
            h.set_params_host(be, &ck.params[n..]);
            o.restore(be, &ck.m[n..], &ck.v[n..], t);
        }
        Ok(())
    }

    /// Host copies of everything a checkpoint after `step` steps holds: the GPT's values, then
    /// the head's.
    fn host_state(&self, step: u64) -> Result<HostState> {
        let be = self.model.backend();
        let mut params = self.model.params_host();
        let (mut m, mut v) = self.opt_model.moments_host(be);
        if let (Some(h), Some(o)) = (&self.head, &self.opt_head) {
            params.extend(h.params_host(be));
            let (hm, hv) = o.moments_host(be);
            m.extend(hm);
            v.extend(hv);
        }
        let (params, m, v) = checkpointing::device_checked(be, (params, m, v))?;
        // The example order is a function of (seed, step): no generator state to carry.
        let state = TrainerState { step, optimizer_steps: self.opt_model.steps_done(), data_rng: smelt_engine::rng::Rng::new(0) };
        Ok(HostState { params, m, v, state })
    }

    /// Forward of one micro-batch with loss scale `scale` (SFT: the logits' gradient comes with
    /// it): (mean loss, real tokens), after any device error was reported (as pretraining's
    /// `forward_batch`: a failed kernel is named here, not later as a broken all-reduce).
    fn forward(&mut self, job: &FinetuneJob, idx: &[usize], scale: f32) -> Result<(f32, usize)> {
        let out = self.forward_unchecked(job, idx, scale)?;
        self.model.backend().synchronize()?;
        Ok(out)
    }

    fn forward_unchecked(&mut self, job: &FinetuneJob, idx: &[usize], scale: f32) -> Result<(f32, usize)> {
        match &job.examples {
            Examples::Classification { train, .. } => {
                let b = class_batch(idx.iter().map(|&i| &train[i]));
                let head = self.head.as_mut().expect("classification has a head");
                self.model.forward_hidden(&b.tokens, b.b, b.t)?;
                let loss = head.forward(self.model.backend(), self.model.hidden(), &b.last, Some(&b.labels), b.b, b.t)?.expect("labels given");
                Ok((loss, b.real_tokens))
            }
            Examples::Sft { train, .. } => {
                let b = sft_batch(idx.iter().map(|&i| &train[i]));
                Ok((self.model.forward_train(&b.inputs, &b.targets, b.b, b.t, scale)?, b.real_tokens))
            }
        }
    }

    /// The backward pass of the last forward (the head's first, then the GPT's), the GPT's
    /// final gradient ranges reported to `ready` as they come.
    fn backward(&mut self, scale: f32, ready: &mut ReadyFn<'_, B>) -> Result<(), EngineError> {
        match &mut self.head {
            Some(head) => {
                let dh = head.backward(self.model.backend(), scale)?;
                self.model.backward_hidden_overlapped(dh, ready)
            }
            None => self.model.backward_overlapped(scale, ready),
        }
    }

    /// One optimizer step over this rank's micro-batches: (global mean loss, gradient norm,
    /// this rank's real tokens). As pretraining's: the loss all-reduce follows the last
    /// micro-batch's forward (a non-finite loss stops every rank before any gradient moves),
    /// and its backward pass averages the GPT's gradient in buckets as it goes when the
    /// collective overlaps; the head's (small) gradient is averaged after it.
    fn step(&mut self, job: &FinetuneJob, micro: &[&[usize]], collective: &mut dyn Collective<B>, step: u64, bucket_floats: usize) -> Result<(f32, f32, usize)> {
        let k = micro.len();
        let Some((last, rest)) = micro.split_last() else {
            bail!("step {step}: this rank has no examples (train.global_batch is smaller than the world size?)");
        };
        let scale = 1.0 / k as f32;
        self.model.zero_grad();
        if let Some(h) = &mut self.head {
            h.zero_grad(self.model.backend());
        }
        let (mut loss_sum, mut tokens, mut finite) = (0.0f64, 0usize, true);
        for idx in rest {
            let (loss, n) = self.forward(job, idx, scale)?;
            tokens += n;
            loss_sum += loss as f64;
            if !loss.is_finite() {
                // Every rank learns of it through the loss all-reduce.
                finite = false;
                break;
            }
            self.backward(scale, &mut |_, _, _| {})?;
        }
        if finite {
            let (loss, n) = self.forward(job, last, scale)?;
            tokens += n;
            loss_sum += loss as f64;
        }
        let be = self.model.backend();
        let mut buf = be.upload(&[(loss_sum / k as f64) as f32]);
        collective.all_reduce_mean(be, be.view_mut(&mut buf, 0..1))?;
        let loss = be.download(be.view(&buf, 0..1))[0];
        if !loss.is_finite() {
            return Err(EngineError::NonFiniteLoss { step, loss }.into());
        }
        // The last backward pass with the GPT's gradient averaged, then the head's (the same
        // order on every rank).
        let n = self.model.table().total();
        grad_buckets::backward_and_average(self, collective, bucket_floats, |st, ready| st.backward(scale, ready), |st| st.model.backend_and_grads_mut(), n)?;
        let (be, grads) = self.model.backend_and_grads_mut();
        let mut sq = be.sum_squares(be.view(grads, 0..n));
        if let Some(h) = &mut self.head {
            let (table, _, hg) = h.params_and_grads();
            let hn = table.total();
            collective.all_reduce_mean(be, be.view_mut(hg, 0..hn))?;
            sq += be.sum_squares(be.view(hg, 0..hn));
        }
        let norm = sq.sqrt() as f32;
        if !norm.is_finite() {
            return Err(EngineError::NonFiniteGrad { step, norm }.into());
        }
        if let Some(clip) = self.clip.filter(|&c| norm > c) {
            let s = clip / (norm + 1e-6);
            be.scale(be.view_mut(grads, 0..n), s);
            if let Some(h) = &mut self.head {
                let (table, _, hg) = h.params_and_grads();
                let hn = table.total();
                be.scale(be.view_mut(hg, 0..hn), s);
            }
        }
        let lr = self.schedule.lr_at(step);
        let (be, _, params, grads) = self.model.params_and_grads();
        self.opt_model.step(be, params, grads, lr, step)?;
        if let (Some(h), Some(o)) = (&mut self.head, &mut self.opt_head) {
            let (_, p, g) = h.params_and_grads();
            o.step(self.model.backend(), p, g, lr, step)?;
        }
        // A device error (a GPU backend's are sticky until read) fails this step, not a later one.
        self.model.backend().synchronize()?;
        Ok((loss, norm, tokens))
    }

    /// Validation (loss, accuracy) over every validation example, in batches of `batch`.
    fn evaluate(&mut self, job: &FinetuneJob, batch: usize) -> Result<(Option<f32>, Option<f32>)> {
        match &job.examples {
            Examples::Classification { val, .. } => {
                let head = self.head.as_mut().expect("classification has a head");
                let (mut loss_sum, mut correct) = (0.0f64, 0usize);
                for chunk in val.chunks(batch.max(1)) {
                    let b = class_batch(chunk.iter());
                    self.model.forward_hidden(&b.tokens, b.b, b.t)?;
                    let loss = head.forward(self.model.backend(), self.model.hidden(), &b.last, Some(&b.labels), b.b, b.t)?.expect("labels");
                    loss_sum += loss as f64 * b.b as f64;
                    correct += head.predictions(self.model.backend()).iter().zip(&b.labels).filter(|(p, l)| p == l).count();
                }
                Ok((Some((loss_sum / val.len() as f64) as f32), Some(correct as f32 / val.len() as f32)))
            }
            Examples::Sft { val, .. } => {
                let (mut loss_sum, mut counted) = (0.0f64, 0usize);
                for chunk in val.chunks(batch.max(1)) {
                    let b = sft_batch(chunk.iter());
                    let n = b.targets.iter().filter(|&&x| x != IGNORE_INDEX).count();
                    let loss = self.model.forward(&b.inputs, Some(&b.targets), b.b, b.t)?.expect("targets");
                    loss_sum += loss as f64 * n as f64;
                    counted += n;
                }
                Ok((Some((loss_sum / counted.max(1) as f64) as f32), None))
            }
        }
    }
}

/// A classification micro-batch, right-padded to its longest text (pad id 0: a causal model's
/// last real token never sees the padding after it).
struct ClassBatch {
    tokens: Vec<u32>,
    last: Vec<usize>,
    labels: Vec<u32>,
    b: usize,
    t: usize,
    real_tokens: usize,
}

fn class_batch<'a>(examples: impl Iterator<Item = &'a ClassExample> + Clone) -> ClassBatch {
    let t = examples.clone().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut out = ClassBatch { tokens: Vec::new(), last: Vec::new(), labels: Vec::new(), b: 0, t, real_tokens: 0 };
    for e in examples {
        out.tokens.extend(&e.ids);
        out.tokens.resize((out.b + 1) * t, 0);
        out.last.push(e.ids.len() - 1);
        out.labels.push(e.label);
        out.real_tokens += e.ids.len();
        out.b += 1;
    }
    out
}

/// An SFT micro-batch, right-padded to its longest window with pad inputs and ignored targets.
struct SftBatch {
    inputs: Vec<u32>,
    targets: Vec<u32>,
    b: usize,
    t: usize,
    real_tokens: usize,
}

fn sft_batch<'a>(examples: impl Iterator<Item = &'a SftExample> + Clone) -> SftBatch {
    let t = examples.clone().map(|e| e.inputs.len()).max().unwrap_or(1);
    let mut out = SftBatch { inputs: Vec::new(), targets: Vec::new(), b: 0, t, real_tokens: 0 };
    for e in examples {
        out.inputs.extend(&e.inputs);
        out.inputs.resize((out.b + 1) * t, 0);
        out.targets.extend(&e.targets);
        out.targets.resize((out.b + 1) * t, IGNORE_INDEX);
        out.real_tokens += e.inputs.len();
        out.b += 1;
    }
    out
}

/// The training thread of a fine-tuning assignment (the runner dispatches here on the job's
/// kind): load, then train on the worker's device (a BERT or T5 parent goes to
/// `finetune_family`). Returns the final step.
pub(crate) fn run(req: RunRequest, spec: JobSpec, control: &RunControl, events: &dyn Fn(RunEvent)) -> Result<u64> {
    let a = &req.assignment;
    let f = spec.finetune.as_ref().ok_or_else(|| anyhow!("job spec: `finetune`: required for kind = \"finetune\""))?;
    let src = resolve_init_from(&spec, &f.init_from, &crate::init_from::Lookup::of(a, &req.out_dir))?;
    if model_file::is_family(&src.bytes, &src.file)? {
        return crate::finetune_family::run(req, spec, src, control, events);
    }
    let job = FinetuneJob::prepare_from(&spec, src)?;
    if a.rank == 0 {
        for s in &job.skipped {
            let text = format!("finetune.init_from: checkpoint {} skipped: {}; starting from {} instead", s.uri, s.reason, job.parent_file);
            events(RunEvent::Note(JobNote { job_id: a.job_id.clone(), attempt: a.attempt, text, ..Default::default() }));
        }
        for text in &job.head_notes {
            events(RunEvent::Note(JobNote { job_id: a.job_id.clone(), attempt: a.attempt, text: text.clone(), ..Default::default() }));
        }
    }
    match req.device {
        Device::Cpu => crate::runner::with_cpu_ring(&req, control, spec.grad_bucket_floats(), |be, ring| train_assignment(be, ring, &job, &req, control, events)),
        Device::Cuda(ordinal) => crate::gpu::finetune_gpt(ordinal, &job, &req, control, events),
    }
}

/// A prepared fine-tuning job on any backend, the collective already joined: resume from the
/// assignment's checkpoint if it names one, train with checkpoints, save. Returns the final step.
pub(crate) fn train_assignment<B: Backend>(
    be: B,
    collective: &mut dyn Collective<B>,
    job: &FinetuneJob,
    req: &RunRequest,
    control: &RunControl,
    events: &dyn Fn(RunEvent),
) -> Result<u64> {
    let a = &req.assignment;
    let rank = a.rank as usize;
    let resumed = checkpointing::load_resume(a, events)?;
    let start = resumed.as_ref().map_or(0, |c| c.step());
    // the parent's weights (from its file) or the checkpoint's; the head is seeded
    let print = checkpointing::fingerprint_if_shared(a, resumed.as_ref().map_or(&job.init_params, |c| &c.params));
    checkpointing::agree_on_start(a, start, &be, collective, print)?;
    let checkpointer = match rank {
        0 => {
            let lineage = resumed.as_ref().map_or_else(|| job.lineage(), checkpointing::lineage_of);
            Checkpointer::new(a, &job.spec, job.config.clone().into(), &job.tokenizer, &req.out_dir, lineage)?.map(|c| c.with_head(job.head_config()))
        }
        _ => None,
    };
    let (job_id, attempt) = (a.job_id.clone(), a.attempt);
    let mut metrics = |m: StepMetrics| events(RunEvent::Metrics(StepMetrics { job_id: job_id.clone(), attempt, rank: rank as u32, ..m }));
    let out = job.train_from(
        be,
        &a.job_id,
        &req.out_dir,
        collective,
        &|| control.stopped(),
        &mut metrics,
        resumed.as_ref(),
        checkpointer.map(|c| (c, events)),
    )?;
    Ok(out.steps)
}
