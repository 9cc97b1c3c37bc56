//! The training thread of one assignment: data plan, collective, model, steps, metrics, final
//! weights.
//!
//! Every rank derives the same sample order from (corpus, seed) and takes its slice of each
//! step's global batch, so ranks never exchange data; only gradients cross the collective. The
//! GPT loop is written once over `Backend`: the CPU backend with the TCP ring here, the CUDA
//! backend with NCCL in `gpu.rs`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use smelt_corpus::sample_order::rank_slice;
use smelt_checkpoint::Lineage;
use smelt_corpus::Tokenizer;
use smelt_engine::background_ring::BackgroundRing;
use smelt_engine::collective::{Collective, CollectiveError, Join, TcpRing};
use smelt_engine::data::{Batch, TokenWindows};
use smelt_engine::grad_buckets::DEFAULT_BUCKET_FLOATS;
use smelt_engine::model::Gpt;
use smelt_engine::model::GptConfig;
use smelt_engine::train::{TrainConfig, Trainer};
use smelt_engine::{Backend, CpuBackend};
use smelt_jobspec::{JobKind, JobSpec};
use smelt_proto::v1::{Assignment, AssignmentDone, JobNote, SourceLoss, StepMetrics};
use tracing::info;

use crate::checkpointing::{self, Checkpointer};
use crate::device::Device;
use crate::init_from;
use crate::train_data::{evaluate_sets, load_data, Order, TrainData, ValSet};
use crate::model_file;
use crate::sample_log::SampleLog;

/// How long ranks wait for each other to connect the ring.
pub(crate) const RING_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a rank whose ring broke waits before reporting, so the peer that broke it is heard
/// first.
const PEER_FAILURE_GRACE: Duration = Duration::from_millis(1500);

fn is_collective_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<smelt_engine::CollectiveError>().is_some()
            || matches!(c.downcast_ref::<smelt_engine::EngineError>(), Some(smelt_engine::EngineError::Collective(_)))
    })
}

/// What the training thread tells the agent.
#[derive(Debug)]
pub enum RunEvent {
    Metrics(StepMetrics),
    Done(AssignmentDone),
    /// A checkpoint whose manifest has landed (rank 0), for the coordinator to record.
    Checkpoint(smelt_proto::v1::CheckpointReport),
    /// Something to record as an event of the job.
    Note(smelt_proto::v1::JobNote),
}

/// How to unblock a run's collective from another thread (a TCP ring's or NCCL's abort).
type AbortHook = Box<dyn Fn() + Send + Sync>;

/// Ways to stop a run from outside the training thread.
#[derive(Clone, Default)]
pub struct RunControl {
    stop: Arc<AtomicBool>,
    reason: Arc<Mutex<String>>,
    abort_hook: Arc<Mutex<Option<AbortHook>>>,
}

impl RunControl {
    /// Stops the run at the next step boundary, and unblocks a pending all-reduce.
    pub fn stop(&self, reason: &str) {
        *self.reason.lock().unwrap() = reason.to_string();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(abort) = self.abort_hook.lock().unwrap().as_ref() {
            abort();
        }
    }
    pub(crate) fn stopped(&self) -> Option<String> {
        self.stop.load(Ordering::SeqCst).then(|| self.reason.lock().unwrap().clone())
    }

    /// Registers how to abort this run's collective. A run stopped before this call has its
    /// collective aborted at once (the hook is set before the flag is read, and `stop` sets the
    /// flag before it reads the hook, so one of the two always calls it; aborts are idempotent).
    pub(crate) fn on_stop(&self, abort: impl Fn() + Send + Sync + 'static) {
        *self.abort_hook.lock().unwrap() = Some(Box::new(abort));
        if self.stop.load(Ordering::SeqCst) {
            if let Some(abort) = self.abort_hook.lock().unwrap().as_ref() {
                abort();
            }
        }
    }
}

pub struct RunRequest {
    pub assignment: Assignment,
    /// data_addr of every rank, in rank order (from the rendezvous).
    pub peer_addrs: Vec<String>,
    /// This worker's ring listener.
    pub listener: TcpListener,
    /// Where rank 0 writes `jobs/<job>/model.safetensors`.
    pub out_dir: PathBuf,
    /// The worker's device (`--device`): the GPT loop's backend and collective.
    pub device: Device,
    /// Rank 0's NCCL unique id, relayed by the rendezvous (empty unless a multi-GPU job).
    pub nccl_unique_id: Vec<u8>,
}

/// Whether this rank must create the NCCL unique id before its rendezvous: rank 0 of a job
/// (pretraining or fine-tuning, any model) on more than one GPU, all of which average over NCCL.
/// A spec that does not parse needs none (its run fails on it). Keep in step with `train`'s
/// dispatch.
pub fn creates_nccl_id(a: &Assignment, device: Device) -> bool {
    let parses = JobSpec::parse(&a.spec_toml).is_ok();
    matches!(device, Device::Cuda(_)) && a.rank == 0 && a.world_size > 1 && parses
}

/// Runs one assignment to the end; always produces exactly one `Done`, a panic included (a
/// device out of memory panics in the backend's allocation; without a `Done` the coordinator
/// would see this rank busy forever and its peers would wait for it in their all-reduces).
pub fn run_assignment(req: RunRequest, control: RunControl, events: &dyn Fn(RunEvent)) {
    let a = req.assignment.clone();
    let out_dir = req.out_dir.clone();
    let result = unless_panicked(|| train(req, &control, events));
    let (ok, error, final_step, transient) = match result {
        Ok(step) => (true, String::new(), step, false),
        Err(e) => {
            let (why, transient) = match control.stopped() {
                Some(reason) => (format!("stopped: {reason}"), false),
                None => (format!("{e:#}"), crate::transient::is_transient(&e)),
            };
            // A broken ring is usually the echo of a peer's own failure (a bad shard, a NaN):
            // let the peer's report reach the coordinator first, so the job's error names the
            // cause rather than the echo.
            if is_collective_failure(&e) {
                std::thread::sleep(PEER_FAILURE_GRACE);
            }
            (false, why, 0, transient)
        }
    };
    // rank 0 saved the final weights under its output directory: said, for a later job whose
    // init_from names this one (it may run on workers with other output directories)
    let saved = out_dir.join("jobs").join(&a.job_id).join("model.safetensors");
    let final_models = match std::path::absolute(&out_dir) {
        Ok(root) if ok && a.rank == 0 && saved.is_file() => root.display().to_string(),
        _ => String::new(),
    };
    events(RunEvent::Done(AssignmentDone { job_id: a.job_id, attempt: a.attempt, ok, error, final_step, draining: false, final_models, transient }));
}

/// `f`'s result, or its panic as an error carrying the panic's message.
pub(crate) fn unless_panicked<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic without a message");
        Err(anyhow!("the training thread panicked: {message}"))
    })
}

/// A GPT pretraining job, its data opened, before a backend is chosen.
pub(crate) struct Pretrain {
    spec: JobSpec,
    tokenizer: Tokenizer,
    data: TrainData,
    val_sets: Vec<ValSet>,
    pub(crate) cfg: GptConfig,
    tc: TrainConfig,
    order: Order,
    /// `model.init_from`'s weights and lineage; None: a seeded initialisation.
    init: Option<(Vec<f32>, Lineage)>,
}

impl Pretrain {
    /// `resume_from`: the checkpoint the attempt resumes from (empty: none).
    fn open(spec: JobSpec, a: &Assignment, out_dir: &std::path::Path) -> Result<Self> {
        let (at, resume_from) = (init_from::Lookup::of(a, out_dir), a.resume_from.as_str());
        let parent = spec.model.init_from.as_deref().map(|i| init_from::read_for_attempt(&spec, i, &at, resume_from)).transpose()?;
        let (tokenizer, vocab, data, val_sets) = load_data(&spec, out_dir, parent.as_ref())?;
        let (cfg, init) = match parent {
            Some(p) => {
                let init = p.params.map(|w| (w, p.lineage));
                (p.config, init)
            }
            None => (spec.model_config(vocab)?, None),
        };
        let tc = spec.train_config();
        let order = data.order(&spec, tc.seq_len)?;
        if a.rank == 0 && tc.eval_interval > 0 {
            for s in &val_sets {
                let windows = TokenWindows::new(&s.tokens).starts(tc.seq_len);
                let n = smelt_engine::train::eval_batches_over(tc.eval_batches, windows, tc.batch_size, tc.seq_len);
                if windows > 0 && n < tc.eval_batches {
                    let batches = if n == 1 { "batch" } else { "batches" };
                    tracing::warn!(target: smelt_proto::JOB_WARNING_TARGET, source = %s.name, "train.eval_batches = {} is more than the validation tokens fill ({} tokens: {n} {batches} of {} sequences of {}): each evaluation takes those {n}", tc.eval_batches, s.tokens.len(), tc.batch_size, tc.seq_len);
                }
            }
        }
        Ok(Pretrain { spec, tokenizer, data, val_sets, cfg, tc, order, init })
    }
}

fn train(mut req: RunRequest, control: &RunControl, events: &dyn Fn(RunEvent)) -> Result<u64> {
    let spec = JobSpec::parse(&req.assignment.spec_toml)?;
    if let Some((uri, step)) = checkpointing::unrecorded_checkpoint(&req.assignment, &spec, &req.out_dir, &req.peer_addrs) {
        let a = &mut req.assignment;
        if a.rank == 0 {
            let text = format!("attempt {} resumes from step {step} ({uri}): this job committed it, but its coordinator had not heard of it (the rank that wrote it was lost before reporting it)", a.attempt);
            events(RunEvent::Note(JobNote { job_id: a.job_id.clone(), attempt: a.attempt, text, resumed_from: uri.clone(), resumed_step: step }));
        }
        a.resume_from = uri;
        a.start_step = step;
    }
    match spec.kind {
        JobKind::Pretrain if spec.arch()? != smelt_jobspec::Arch::Gpt => return crate::family::run(req, spec, control, events),
        JobKind::Pretrain => {}
        JobKind::Finetune => return crate::finetune::run(req, spec, control, events),
    }
    let job = Pretrain::open(spec, &req.assignment, &req.out_dir)?;
    match req.device {
        Device::Cpu => with_cpu_ring(&req, control, job.spec.grad_bucket_floats(), |be, ring| train_gpt(be, ring, job, &req, control, events)),
        Device::Cuda(ordinal) => crate::gpu::train_gpt(ordinal, job, &req, control, events),
    }
}

/// Values per gradient bucket when the collective overlaps the backward pass: the spec's
/// `cluster.grad_bucket_mb`, else DDP's 25 MiB (0: one all-reduce after the pass). Every
/// trainer (GPT, BERT/T5, fine-tuning) takes it from here.
pub(crate) fn bucket_floats(spec: &JobSpec) -> usize {
    spec.grad_bucket_floats().unwrap_or(DEFAULT_BUCKET_FLOATS)
}

/// Joins the assignment's TCP ring and runs `train` with the CPU backend and it: on the ring's
/// own thread (`BackgroundRing`, gradient buckets averaged during the backward pass) when the
/// spec sets `cluster.grad_bucket_mb` > 0 (`grad_bucket_floats`, the spec's), else the plain ring (the CPU default: one all-reduce
/// after the backward pass, measured faster when every core computes; bench/NOTES.md). The
/// CPU counterpart of `gpu::with_gpu`.
pub(crate) fn with_cpu_ring<R>(
    req: &RunRequest,
    control: &RunControl,
    grad_bucket_floats: Option<usize>,
    train: impl FnOnce(CpuBackend, &mut dyn Collective<CpuBackend>) -> Result<R>,
) -> Result<R> {
    let ring = connect_ring(req, control)?;
    match grad_bucket_floats {
        Some(n) if n > 0 => train(CpuBackend::new(), &mut BackgroundRing::new(ring)),
        _ => train(CpuBackend::new(), &mut { ring }),
    }
}

/// Joins the assignment's TCP ring (CPU ranks), aborted when the run is stopped.
pub(crate) fn connect_ring(req: &RunRequest, control: &RunControl) -> Result<TcpRing> {
    let a = &req.assignment;
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    // The session is the job and attempt: a connection an earlier run left in a listener's
    // backlog (its rank gave up joining) is refused rather than taken for this run's peer. A run
    // stopped while it waits for its peers stops waiting.
    let session = ring_session(&a.job_id, a.attempt);
    let cancelled = || control.stop.load(Ordering::SeqCst);
    let listener = req.listener.try_clone().context("cloning the ring listener")?;
    let ring = TcpRing::join(rank, &req.peer_addrs, listener, RING_CONNECT_TIMEOUT, Join { session, cancelled: &cancelled })
        .map_err(|e| match (e, control.stopped()) {
            (CollectiveError::Aborted, Some(reason)) => anyhow!("stopped while joining the ring: {reason}"),
            (e, _) => anyhow::Error::new(e),
        })
        .with_context(|| format!("connecting the ring as rank {rank} of {world}"))?;
    let abort = ring.abort_handle();
    control.on_stop(move || abort.abort());
    if let Some(reason) = control.stopped() {
        return Err(anyhow!("stopped before training: {reason}"));
    }
    Ok(ring)
}

/// The ring session of `attempt` of `job_id` (FNV-1a of both): every rank derives the same.
pub(crate) fn ring_session(job_id: &str, attempt: u32) -> u64 {
    format!("{job_id}/{attempt}").bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The GPT pretraining loop on any backend, the collective already joined.
pub(crate) fn train_gpt<B: Backend>(
    be: B,
    collective: &mut dyn Collective<B>,
    job: Pretrain,
    req: &RunRequest,
    control: &RunControl,
    events: &dyn Fn(RunEvent),
) -> Result<u64> {
    let a = &req.assignment;
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let Pretrain { spec, tokenizer, data, val_sets, cfg, tc, order, init } = job;
    let seq = tc.seq_len;
    let global = spec.train.global_batch as u64;
    let logits = tc.batch_size as u128 * seq as u128 * cfg.vocab_size as u128;
    crate::memory_check::ensure_fits(&be, cfg.num_params(), logits, || {
        format!("the model ({} parameters; train.micro_batch {} x seq_len {seq})", cfg.num_params(), tc.batch_size)
    })?;
    let (model, parent_lineage, init_print) = match init {
        Some((params, lineage)) => {
            let print = checkpointing::fingerprint_if_shared(a, &params);
            (Gpt::from_params(be, cfg.clone(), &params)?, Some(lineage), print)
        }
        None => (Gpt::new(be, cfg.clone(), spec.seed)?, None, 0),
    };
    let mut trainer = Trainer::new(model, tc.clone())?;
    trainer.set_bucket_floats(bucket_floats(&spec));
    let mut resumed = checkpointing::resume(a, &spec, &cfg, &tokenizer, &mut trainer, collective, events, init_print)?;
    // the final model file names model.init_from as fine-tuned ones name theirs (a model that
    // leaves the cluster keeps where it came from); the file and job read only when this
    // attempt started from it (a resumed one was read afresh, and may have moved on to a
    // newer checkpoint of a parent job, or not be readable)
    let fresh_from_parent = resumed.start_step == 0 && resumed.lineage.parent_checkpoint.is_none();
    let parent_record: Vec<(&str, String)> = match (&spec.model.init_from, parent_lineage.as_ref().filter(|_| fresh_from_parent)) {
        (Some(init_from), lineage) => std::iter::once(("parent", init_from.clone()))
            .chain(lineage.into_iter().flat_map(|l| {
                l.parent_checkpoint.iter().map(|f| ("parent_file", f.clone())).chain(l.parent_job.iter().map(|j| ("parent_job", j.clone())))
            }))
            .collect(),
        (None, _) => Vec::new(),
    };
    if resumed.start_step == 0 && resumed.lineage.parent_checkpoint.is_none() {
        // a fresh start from model.init_from: the job's checkpoints name it as their parent
        if let Some(l) = parent_lineage {
            info!(job_id = %a.job_id, parent = ?l.parent_checkpoint, "continuing pretraining from model.init_from");
            resumed.lineage = l;
        }
    }
    let start_step = resumed.start_step;
    let mut checkpointer = match rank {
        0 => Checkpointer::new(a, &spec, cfg.clone().into(), &tokenizer, &req.out_dir, resumed.lineage)?,
        _ => None,
    };
    let mut sample_log = SampleLog::from_env(&a.job_id, a.rank, a.attempt);
    info!(job_id = %a.job_id, attempt = a.attempt, rank, world, device = %req.device, params = cfg.num_params(), start_step, "training started");

    let started = Instant::now();
    let mut tokens = 0usize;
    let mut last_val = None;
    // train.eval_choices: read and encoded by every rank before the first step, so a bad file
    // fails the job before it trains; at each evaluation each rank scores its share (rows of at
    // most seq_len inputs, micro-batch rows a pass) and the counts are summed over the ranks.
    // Its acc_norm is the evaluation's val_accuracy.
    let choices = match &spec.train.eval_choices {
        Some(location) => Some(crate::choices::load("train.eval_choices", location, spec.train.eval_choices_max, &tokenizer, seq)?),
        None => None,
    };
    let mut last_acc_norm = None;
    // a mixture's evaluations report each source's loss (a single source's is the job's own)
    let mixture = matches!(data, TrainData::Mix { .. });
    let (peak, flops_per_token) = (trainer.model.backend().peak_flops(), cfg.flops_per_token(seq));
    for step in start_step..tc.steps {
        if let Some(reason) = control.stopped() {
            // rank 0 saves the steps done since the last checkpoint before it goes
            if let Some(c) = checkpointer.take() {
                c.end_early(step, start_step, true, &reason, events, &mut || checkpointing::host_state_of(&trainer));
            }
            return Err(anyhow!("stopped at step {step}: {reason}"));
        }
        let indices_of = |step: u64| -> Result<Vec<u64>> {
            let slice = rank_slice(step, global, rank as u64, world as u64).map_err(|e| anyhow!("{e}"))?;
            Ok(slice.map(|k| order.sequence_at(k)).collect())
        };
        let indices = indices_of(step)?;
        sample_log.record(step, &indices);
        if step + 1 < tc.steps {
            data.prefetch(seq, &indices_of(step + 1)?);
        }
        let micro = indices
            .chunks(tc.batch_size)
            .map(|chunk| {
                let (inputs, targets) = data.batch(seq, chunk)?;
                Ok(Batch { inputs, targets, batch: chunk.len(), seq_len: seq })
            })
            .collect::<Result<Vec<Batch>>>()?;
        let stats = match trainer.train_step_batches(&micro, collective) {
            Ok(stats) => stats,
            Err(e) => {
                // a peer lost or the run stopped mid-step: the step's update was not applied,
                // so rank 0 still holds step `step` whole, and saves it
                let e = anyhow::Error::from(e);
                if let Some(c) = checkpointer.take() {
                    let whole = checkpointing::failed_before_update(trainer.model.backend(), &e);
                    c.end_early(step, start_step, whole, &control.stopped().unwrap_or_else(|| format!("{e:#}")), events, &mut || checkpointing::host_state_of(&trainer));
                }
                return Err(e);
            }
        };
        // (the step's stats count the whole global batch, every rank's tokens)
        tokens += stats.tokens;
        let done = step + 1;
        let is_last = done == tc.steps;
        let (mut val_loss, mut val_sources, mut val_accuracy) = (None, Vec::new(), None);
        let eval_step = is_last || (tc.eval_interval > 0 && done % tc.eval_interval == 0);
        if let (Some((examples, shown)), true) = (&choices, eval_step) {
            let mine = crate::choices::tally(&mut trainer.model, examples.iter().skip(rank).step_by(world), tc.batch_size, shown)?;
            let t = crate::choices::sum_over_ranks(mine, trainer.model.backend(), collective)?;
            if rank == 0 {
                info!(job_id = %a.job_id, step = done, acc = t.acc(), acc_norm = t.acc_norm(), examples = t.examples, "multiple choice");
                val_accuracy = Some(t.acc_norm() as f32);
                last_acc_norm = val_accuracy;
            }
        }
        if rank == 0 && eval_step {
            if let Some((v, each)) = evaluate_sets(&val_sets, seq, |tokens| Ok(trainer.evaluate(&TokenWindows::new(tokens))?))? {
                if each.len() > 1 {
                    // a mixture: each source's loss also in the job's events, readable beside its state changes
                    info!(job_id = %a.job_id, step = done, val_loss = v, by_source = ?each, "validation loss by source");
                    let parts: Vec<String> = each.iter().map(|(name, l)| format!("{name} {l:.4}")).collect();
                    let text = format!("validation loss at step {done}: {v:.4} weighted; by source: {}", parts.join(", "));
                    events(RunEvent::Note(JobNote { job_id: a.job_id.clone(), attempt: a.attempt, text, ..Default::default() }));
                }
                if mixture {
                    // the metrics carry each source's loss beside the weighted one (stored and plotted)
                    val_sources = each.iter().map(|&(name, loss)| SourceLoss { name: name.to_string(), loss }).collect();
                }
                val_loss = Some(v);
                last_val = Some(v);
            }
        }
        if rank == 0 {
            let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64();
            // Every rank runs the same device, so the job's MFU is this rank's share of the peak.
            let mfu = peak.map(|p| (flops_per_token * tokens_per_s / world as f64 / p) as f32);
            events(RunEvent::Metrics(StepMetrics {
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                rank: a.rank,
                step: done,
                loss: stats.loss,
                grad_norm: stats.grad_norm,
                lr: stats.lr,
                tokens_per_s,
                val_loss,
                val_accuracy,
                mfu,
                val_sources,
            }));
        }
        if let Some(c) = checkpointer.as_mut() {
            c.after_step(done, tc.steps, &trainer, events)?;
        }
    }
    if let Some(c) = checkpointer {
        c.finish(events);
    }
    if rank == 0 {
        let secs = started.elapsed().as_secs_f64();
        info!(job_id = %a.job_id, steps = tc.steps - start_step, tokens, seconds = %format!("{secs:.1}"), tokens_per_s = %format!("{:.0}", tokens as f64 / secs.max(1e-9)), "training done (tokens of every rank)");
    }
    for reader in data.readers() {
        let st = reader.stats();
        let total = started.elapsed().as_secs_f64();
        info!(
            job_id = %a.job_id,
            rank,
            corpus = %reader.uri(),
            data_wait_share = st.wait_seconds / total.max(1e-9),
            sequences = st.sequences,
            ready_when_asked = st.ready,
            bytes_fetched = st.bytes_fetched,
            "data loading: share of training time spent waiting on data"
        );
    }
    if rank == 0 {
        let path = req.out_dir.join("jobs").join(&a.job_id).join("model.safetensors");
        let mut extra = vec![("step", tc.steps.to_string()), ("job", a.job_id.clone())];
        extra.extend(parent_record);
        if let Some(v) = last_val {
            extra.push(("val_loss", v.to_string()));
        }
        if let Some(v) = last_acc_norm {
            extra.push(("val_acc_norm", v.to_string()));
        }
        let params = checkpointing::device_checked(trainer.model.backend(), trainer.model.params_host())?;
        model_file::save(&path, &cfg, &tokenizer, &params, &extra)?;
        info!(job_id = %a.job_id, path = %path.display(), "final weights saved");
    }
    Ok(tc.steps)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn a_panic_in_training_becomes_an_error_carrying_its_message() {
        // what the CUDA backend's allocation panics with when the device is out of memory
        let formatted = unless_panicked::<u64>(|| panic!("cuda:{}: cannot allocate {} elements", 0, 1 << 30));
        let e = format!("{:#}", formatted.expect_err("a panic is an error"));
        assert!(e.contains("panicked") && e.contains("cuda:0: cannot allocate 1073741824 elements"), "{e}");
        let literal = unless_panicked::<u64>(|| panic!("a literal message"));
        assert!(format!("{:#}", literal.unwrap_err()).contains("a literal message"));
        // results pass through untouched
        assert_eq!(unless_panicked(|| Ok(7u64)).unwrap(), 7);
        assert!(format!("{:#}", unless_panicked::<u64>(|| Err(anyhow!("plain error"))).unwrap_err()).contains("plain error"));
    }

    fn counting_hook(control: &RunControl) -> Arc<AtomicUsize> {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        control.on_stop(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        calls
    }

    #[test]
    fn a_stop_aborts_the_collective_whichever_comes_first() {
        let control = RunControl::default();
        let calls = counting_hook(&control);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        control.stop("aborted by the coordinator: peer lost");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(control.stopped().as_deref(), Some("aborted by the coordinator: peer lost"));

        // Stopped while the collective was still being joined: aborted as soon as it exists.
        let control = RunControl::default();
        control.stop("superseded");
        assert_eq!(counting_hook(&control).load(Ordering::SeqCst), 1);
    }

    #[test]
    fn only_rank0_of_a_multi_gpu_job_creates_an_nccl_id() {
        let asg = |spec: &str, rank, world_size| Assignment { spec_toml: spec.into(), rank, world_size, ..Default::default() };
        let gpt = include_str!("../../examples/shakespeare-char.toml");
        let finetune = include_str!("../../examples/finetune-classify.toml");
        let bert = include_str!("../../examples/bert-mlm.toml");
        assert!(creates_nccl_id(&asg(gpt, 0, 2), Device::Cuda(0)));
        assert!(!creates_nccl_id(&asg(gpt, 1, 2), Device::Cuda(1)), "other ranks receive it");
        assert!(!creates_nccl_id(&asg(gpt, 0, 1), Device::Cuda(0)), "one gpu needs no communicator");
        assert!(!creates_nccl_id(&asg(gpt, 0, 2), Device::Cpu), "cpu ranks use the tcp ring");
        assert!(creates_nccl_id(&asg(finetune, 0, 2), Device::Cuda(0)), "fine-tuning runs on the gpus too");
        assert!(!creates_nccl_id(&asg(finetune, 0, 2), Device::Cpu));
        assert!(creates_nccl_id(&asg(bert, 0, 2), Device::Cuda(0)), "bert/t5 pretraining runs on the gpus too");
        assert!(!creates_nccl_id(&asg(bert, 1, 2), Device::Cuda(1)));
        assert!(!creates_nccl_id(&asg("not toml", 0, 2), Device::Cuda(0)));
    }
}
