//! A BERT or T5 pretraining job (`[model] arch = "bert" | "t5"`): the runner dispatches here on
//! the architecture. Data parallelism is GPT's: every rank derives the same window order from
//! the seed and takes its slice of each step's global batch; the objective turns each window
//! into a sample (masked LM, next-sentence pairs, two masked views, span corruption) seeded by
//! (seed, step, global sample index); gradients are averaged over the ring and every rank steps
//! AdamW (clipping by the global norm). Rank 0 evaluates on fixed validation windows, streams
//! metrics and saves `jobs/<id>/model.safetensors` (format `bert/1` or `t5/1`).
//!
//! Not yet: checkpoints (the spec refuses `checkpoint.every` for these architectures; a
//! restarted attempt starts again at step 0) and the CUDA backend.

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use smelt_corpus::sample_order::{rank_slice, SampleOrder};
use smelt_engine::backend::Backend;
use smelt_engine::collective::{Collective, TcpRing};
use smelt_engine::model::{Bert, T5};
use smelt_engine::optim::AdamW;
use smelt_engine::params::ParamTable;
use smelt_engine::{CpuBackend, EngineError};
use smelt_jobspec::{Device, FamilyConfig, JobSpec};
use smelt_proto::v1::StepMetrics;
use tracing::{info, warn};

use crate::family_data::{self, FamilyBatch, Objective, Source};
use crate::model_file::{self, FamilyModel};
use crate::runner::{RunControl, RunEvent, RunRequest, RING_CONNECT_TIMEOUT};

/// Marks the evaluation samples' generators apart from any training step's.
const EVAL_STEP: u64 = u64::MAX;

/// The model being trained (one per run, so the variants' size difference costs nothing).
#[allow(clippy::large_enum_variant)]
enum Model {
    Bert(Bert<CpuBackend>),
    T5(T5<CpuBackend>),
}

impl Model {
    fn new(fam: &FamilyConfig, seed: u64) -> Result<Model> {
        Ok(match fam {
            FamilyConfig::Bert { config, .. } => Model::Bert(Bert::new(CpuBackend::new(), config.clone(), seed)?),
            FamilyConfig::T5 { config, .. } => Model::T5(T5::new(CpuBackend::new(), config.clone(), seed)?),
        })
    }
    fn backend(&self) -> &CpuBackend {
        match self {
            Model::Bert(m) => m.backend(),
            Model::T5(m) => m.backend(),
        }
    }
    fn table(&self) -> &ParamTable {
        match self {
            Model::Bert(m) => m.table(),
            Model::T5(m) => m.table(),
        }
    }
    fn zero_grad(&mut self) {
        match self {
            Model::Bert(m) => m.zero_grad(),
            Model::T5(m) => m.zero_grad(),
        }
    }
    fn forward(&mut self, x: &FamilyBatch) -> Result<f32> {
        let loss = match (self, x) {
            (Model::Bert(m), FamilyBatch::Bert(x)) => m.forward(x)?,
            (Model::T5(m), FamilyBatch::T5(x)) => m.forward(x)?,
            _ => unreachable!("the objective makes batches for its own model"),
        };
        loss.ok_or_else(|| anyhow!("the batch carries no targets"))
    }
    fn backward(&mut self, scale: f32) -> Result<(), EngineError> {
        match self {
            Model::Bert(m) => m.backward(scale),
            Model::T5(m) => m.backward(scale),
        }
    }
    fn backend_and_grads_mut(&mut self) -> (&CpuBackend, &mut <CpuBackend as Backend>::Buf) {
        match self {
            Model::Bert(m) => m.backend_and_grads_mut(),
            Model::T5(m) => m.backend_and_grads_mut(),
        }
    }
    fn params_and_grads(&mut self) -> (&CpuBackend, &ParamTable, &mut <CpuBackend as Backend>::Buf, &<CpuBackend as Backend>::Buf) {
        match self {
            Model::Bert(m) => m.params_and_grads(),
            Model::T5(m) => m.params_and_grads(),
        }
    }
    fn params_host(&self) -> Vec<f32> {
        match self {
            Model::Bert(m) => m.params_host(),
            Model::T5(m) => m.params_host(),
        }
    }
}

/// Tokens a batch puts through the model (encoder and decoder for T5).
fn batch_tokens(x: &FamilyBatch) -> usize {
    match x {
        FamilyBatch::Bert(x) => x.batch * x.seq_len,
        FamilyBatch::T5(x) => x.batch * (x.enc_len + x.dec_len),
    }
}

/// The mean of one value over the ring.
fn all_reduce_scalar(ring: &mut dyn Collective<CpuBackend>, x: f32) -> Result<f32> {
    let be = CpuBackend::new();
    let mut buf = be.upload(&[x]);
    ring.all_reduce_mean(&be, be.view_mut(&mut buf, 0..1))?;
    Ok(be.download(be.view(&buf, 0..1))[0])
}

/// Fixed validation batches: the first windows of the validation tokens, with their own
/// generators, so every evaluation of a run sees the same samples.
fn eval_batches(objective: &Objective, val: &Source, seed: u64, micro: usize, max_batches: usize) -> Result<Vec<FamilyBatch>> {
    let n = val.n_windows(objective.window_len());
    let take = n.min((micro * max_batches) as u64);
    let idx: Vec<u64> = (0..take).collect();
    // a contrastive batch needs two pairs (one pair has no negative)
    idx.chunks(micro).filter(|c| c.len() >= objective.min_batch()).map(|c| objective.read_batch(val, seed, EVAL_STEP, c, c, n)).collect()
}

/// The training thread of a BERT or T5 assignment. Returns the final step.
pub(crate) fn run(req: RunRequest, spec: JobSpec, control: &RunControl, events: &dyn Fn(RunEvent)) -> Result<u64> {
    let a = &req.assignment;
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let arch = spec.arch()?;
    if spec.cluster.device == Device::Cuda {
        bail!("arch = {:?} trains on the CPU backend only so far (cluster.device = \"cuda\")", arch.name());
    }
    if a.start_step > 0 || !a.resume_from.is_empty() {
        warn!(job_id = %a.job_id, start_step = a.start_step, "bert/t5 jobs restart from step 0: they are not checkpointed yet");
    }
    let data = family_data::open(&spec, &req.out_dir)?;
    let fam = spec.family_config(data.base_vocab)?;
    let tc = spec.train_config();
    let objective = Objective::new(&fam, tc.seq_len);
    let wlen = objective.window_len();
    let n_windows = data.train.n_windows(wlen);
    if n_windows == 0 {
        bail!("the job's training data holds no window of {} tokens", wlen + 1);
    }
    let order = SampleOrder::new(n_windows, spec.seed);
    let global = spec.train.global_batch as u64;

    let mut ring = TcpRing::connect(rank, &req.peer_addrs, req.listener, RING_CONNECT_TIMEOUT)
        .with_context(|| format!("connecting the ring as rank {rank} of {world}"))?;
    *control.ring_abort.lock().unwrap() = Some(ring.abort_handle());

    let mut model = Model::new(&fam, spec.seed)?;
    let mut opt = AdamW::new(model.backend(), model.table(), tc.optim.clone())?;
    let val = if rank == 0 { eval_batches(&objective, &data.val, spec.seed, tc.batch_size, tc.eval_batches)? } else { Vec::new() };
    info!(job_id = %a.job_id, attempt = a.attempt, rank, world, arch = arch.name(), params = model.table().total(), windows = n_windows, "training started");

    let started = Instant::now();
    let (mut tokens, mut last_val) = (0usize, None);
    for step in 0..tc.steps {
        if let Some(reason) = control.stopped() {
            bail!("stopped at step {step}: {reason}");
        }
        let slice_of = |step: u64| -> Result<(Vec<u64>, Vec<u64>)> {
            let ks: Vec<u64> = rank_slice(step, global, rank as u64, world as u64).map_err(|e| anyhow!("{e}"))?.collect();
            let idx = ks.iter().map(|&k| order.sequence_at(k)).collect();
            Ok((ks, idx))
        };
        let (ks, idx) = slice_of(step)?;
        if step + 1 < tc.steps {
            data.train.prefetch(wlen, &slice_of(step + 1)?.1);
        }
        let micro = idx
            .chunks(tc.batch_size)
            .zip(ks.chunks(tc.batch_size))
            .map(|(i, k)| objective.read_batch(&data.train, spec.seed, step, i, k, n_windows))
            .collect::<Result<Vec<_>>>()?;
        let k = micro.len();
        if k == 0 {
            bail!("step {step}: this rank has no samples (train.global_batch is smaller than the world size?)");
        }

        // forward + backward per micro-batch, the mean loss and gradient over the ring
        model.zero_grad();
        let mut loss_sum = 0.0f64;
        for x in &micro {
            let loss = model.forward(x)?;
            tokens += batch_tokens(x) * world;
            if !loss.is_finite() {
                // the other ranks learn of it through the loss all-reduce
                loss_sum = loss as f64;
                break;
            }
            loss_sum += loss as f64;
            model.backward(1.0 / k as f32)?;
        }
        let loss = all_reduce_scalar(&mut ring, (loss_sum / k as f64) as f32)?;
        if !loss.is_finite() {
            return Err(EngineError::NonFiniteLoss { step, loss }.into());
        }
        let n = model.table().total();
        let (be, grads) = model.backend_and_grads_mut();
        ring.all_reduce_mean(be, be.view_mut(grads, 0..n))?;
        let lr = tc.schedule.lr_at(step);
        let (be, _, params, grads) = model.params_and_grads();
        let report = opt.step(be, params, grads, lr, step)?;

        let done = step + 1;
        let mut val_loss = None;
        if rank == 0 && !val.is_empty() && (done == tc.steps || (tc.eval_interval > 0 && done % tc.eval_interval == 0)) {
            let mut sum = 0.0f64;
            for x in &val {
                sum += model.forward(x)? as f64;
            }
            let v = (sum / val.len() as f64) as f32;
            info!(job_id = %a.job_id, step = done, val_loss = v, "evaluated");
            val_loss = Some(v);
            last_val = Some(v);
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
                val_loss,
                val_accuracy: None,
            }));
        }
    }
    if rank == 0 {
        let path = req.out_dir.join("jobs").join(&a.job_id).join("model.safetensors");
        let (saved, objective_name) = match &fam {
            FamilyConfig::Bert { config, objective, specials, .. } => (FamilyModel::Bert { config: config.clone(), specials: *specials }, objective.name()),
            FamilyConfig::T5 { config, specials, .. } => (FamilyModel::T5 { config: config.clone(), specials: *specials }, "span"),
        };
        let mut extra = vec![("step", tc.steps.to_string()), ("job", a.job_id.clone()), ("objective", objective_name.to_string())];
        if let Some(v) = last_val {
            extra.push(("val_loss", v.to_string()));
        }
        model_file::save_family(&path, &saved, &data.tokenizer, &model.params_host(), &extra)?;
        info!(job_id = %a.job_id, path = %path.display(), arch = arch.name(), "final weights saved");
    }
    Ok(tc.steps)
}
