//! Checkpoints in a run: every rank's resume from the assignment's checkpoint, and rank 0's
//! snapshots at checkpoint steps, uploaded by `smelt_checkpoint`'s background thread while
//! training goes on. A commit is reported to the coordinator only once its manifest has landed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use smelt_checkpoint::layout::parent_uri;
use smelt_checkpoint::manifest::{DataPosition, FORMAT};
use smelt_checkpoint::{
    checkpoints_root, load_or_fall_back, AsyncCheckpointer, Checkpoint, HeadConfig, Lineage, ModelConfig, Outcome, Retention, Snapshot,
    Submitted, TrainerJson, UploadOptions,
};
use smelt_corpus::{StoreDir, Tokenizer};
use smelt_engine::collective::Collective;
use smelt_engine::model::GptConfig;
use smelt_engine::train::{Trainer, TrainerState};
use smelt_engine::Backend;
use smelt_jobspec::JobSpec;
use smelt_proto::v1::{Assignment, CheckpointReport, JobNote};
use tracing::{info, warn};

use crate::runner::RunEvent;

/// Where a run starts.
#[derive(Clone, Debug, Default)]
pub struct Resumed {
    pub start_step: u64,
    pub lineage: Lineage,
}

fn note(a: &Assignment, text: String) -> RunEvent {
    RunEvent::Note(JobNote { job_id: a.job_id.clone(), attempt: a.attempt, text, ..Default::default() })
}

/// Every rank: the assignment's checkpoint (or the newest good one before it, when it does not
/// verify; rank 0 records an event for each one skipped), or `None` when starting afresh.
pub fn load_resume(a: &Assignment, events: &dyn Fn(RunEvent)) -> Result<Option<Checkpoint>> {
    if a.resume_from.is_empty() {
        return Ok(None);
    }
    // The coordinator assigns the newest checkpoint it heard of; the job may have committed
    // newer ones it never heard of (it was down while they were reported), and retention may
    // have deleted the assigned one since. This job's own newer checkpoints are its progress.
    let newer = newer_own_checkpoint(a);
    let from = newer.as_deref().unwrap_or(&a.resume_from);
    let r = load_or_fall_back(from).with_context(|| format!("resuming from {from}"))?;
    let ck = r.checkpoint;
    if let (Some(uri), 0) = (&newer, a.rank) {
        events(note(a, format!("resuming from {uri}, this job's newest committed checkpoint, rather than {} (the newest the coordinator had recorded)", a.resume_from)));
    }
    if a.rank == 0 {
        // this job's own damaged checkpoints are uncommitted (their manifest kept beside them):
        // left committed, one kept its step from being written again and counted among the
        // checkpoints retention keeps, which then deleted the good one resumed from
        let own = format!("/jobs/{}/ckpt/", a.job_id);
        for s in &r.skipped {
            let set_aside = s.corrupt
                && s.uri.contains(&own)
                && match smelt_checkpoint::set_aside(&s.uri, &UploadOptions::default()) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(uri = %s.uri, error = %e, "could not set the corrupt checkpoint aside");
                        false
                    }
                };
            let aside = if set_aside { format!("; its manifest is now {} (uncommitted: that step is written again)", smelt_checkpoint::SET_ASIDE_MANIFEST) } else { String::new() };
            events(note(a, format!("checkpoint {} skipped: {}; resuming from {} instead{aside}", s.uri, s.reason, ck.uri)));
        }
    }
    if ck.step() != a.start_step {
        info!(uri = %ck.uri, step = ck.step(), assigned_step = a.start_step, "resuming at the checkpoint's step");
    }
    if a.rank == 0 && ck.uri != a.resume_from {
        events(RunEvent::Note(JobNote {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            text: format!("attempt {} resumes from step {} ({})", a.attempt, ck.step(), ck.uri),
            resumed_from: ck.uri.clone(),
            resumed_step: ck.step(),
        }));
    }
    info!(job_id = %a.job_id, rank = a.rank, uri = %ck.uri, step = ck.step(), "resumed from checkpoint");
    Ok(Some(ck))
}

/// How far a worker's clock may trail the coordinator's when a checkpoint's time is compared
/// with the job's submission.
const CLOCK_SKEW_MS: i64 = 10 * 60 * 1000;

/// The newest committed checkpoint after the assigned one in its directory that this job wrote
/// (its manifest names the job, and was written after the job was submitted: a `--resume-from`
/// of another job's checkpoint never moves on to that job's later ones, nor does a job take a
/// checkpoint of an earlier job of the same id, from another coordinator database). `None` when there is none, or the directory cannot be listed (the
/// assigned one is then loaded as before, and says what is wrong).
fn newer_own_checkpoint(a: &Assignment) -> Option<String> {
    let assigned = smelt_checkpoint::step_of_uri(&a.resume_from)?;
    let root = StoreDir::open(&smelt_checkpoint::layout::parent_uri(&a.resume_from)?).ok()?;
    let committed = smelt_checkpoint::list_committed(&root).ok()?;
    committed.into_iter().rev().take_while(|(step, _)| *step > assigned).find_map(|(_, uri)| written_by_this_job(a, &uri).then_some(uri))
}

/// Whether the committed checkpoint at `uri` is one this job wrote: its manifest names the job,
/// and was written after the job was submitted.
fn written_by_this_job(a: &Assignment, uri: &str) -> bool {
    let Ok(dir) = StoreDir::open(uri) else { return false };
    // (the worker's clock and the coordinator's may differ a little)
    smelt_checkpoint::read::read_manifest(&dir).is_ok_and(|m| m.job_id == a.job_id && m.created_at_ms + CLOCK_SKEW_MS >= a.job_created_at_ms)
}

/// For a restarted attempt the coordinator gave no checkpoint to resume from: the newest one
/// this job committed in its own `ckpt/` directory, and its step. The coordinator hears of a
/// checkpoint from rank 0 after the commit; a rank 0 lost in between (SIGKILL, a dead machine)
/// leaves one it never heard of, and without this the attempt trained again from step 0 and
/// could not write that step ("already committed"). `None` for a first attempt, one given a
/// checkpoint (`load_resume` looks past it), or when the directory holds none or cannot be
/// listed. Every rank must find the same one: only when the ranks look in one directory, the
/// job's `checkpoint.store` or (its default, each rank 0's output directory) when every rank's
/// worker is on one machine (`smelt up`'s share one output directory); `peers` are the ranks'
/// data addresses. Ranks on several machines without a `checkpoint.store` start as assigned:
/// one of them alone finding the checkpoint would fail the agreement on the starting step.
pub fn unrecorded_checkpoint(a: &Assignment, spec: &JobSpec, out_dir: &Path, peers: &[String]) -> Option<(String, u64)> {
    if !a.resume_from.is_empty() || a.attempt <= 1 {
        return None;
    }
    let host = |addr: &String| addr.rsplit_once(':').map_or(addr.clone(), |(h, _)| h.to_string());
    let one_machine = peers.windows(2).all(|w| host(&w[0]) == host(&w[1]));
    if spec.checkpoint.store.is_none() && !one_machine {
        return None;
    }
    let root = checkpoints_dir(a, spec, out_dir).ok()?;
    let committed = smelt_checkpoint::list_committed(&root).ok()?;
    committed.into_iter().rev().find_map(|(step, uri)| written_by_this_job(a, &uri).then_some((uri, step)))
}

/// `value`, read back from the device, once the device reports no error since: a failed
/// download records the error and returns zeros, which must never pass for a loss, an
/// agreement, a checkpoint or the final weights.
pub(crate) fn device_checked<B: Backend, T>(be: &B, value: T) -> Result<T> {
    be.synchronize()?;
    Ok(value)
}

/// With several ranks, checks before the first gradient is exchanged that they all start at
/// `start`, from the same weights, and all exchange gradients the same way
/// (`Collective::overlaps_backward`: bucket all-reduces during the backward pass, or one after
/// it; on GPUs it is the worker's `SMELT_NCCL_OVERLAP`, so two hosts set up differently would
/// issue different collectives and hang or corrupt the gradients). `weights` is the
/// [`fingerprint`] of the weights every rank read from a file (a checkpoint, `init_from`), 0
/// for a seeded initialisation (computed alike from the seed; not compared, since the platform's
/// math library may round the last bit of a draw differently on another host): ranks that each
/// read a file themselves could read different ones (a relative path on different hosts, a
/// job's newest checkpoint that changed in between) and would otherwise train apart without a
/// word. Every rank sees any disagreement (see [`agreement_bits`]) and fails naming it.
pub fn agree_on_start<B: Backend>(a: &Assignment, start: u64, be: &B, ring: &mut dyn Collective<B>, weights: u64) -> Result<()> {
    if a.world_size <= 1 {
        return Ok(());
    }
    let values = [start, u64::from(ring.overlaps_backward()), weights];
    let mine = agreement_bits(&values);
    let mut buf = be.upload(&mine);
    ring.all_reduce_mean(be, be.view_mut(&mut buf, 0..mine.len()))?;
    let mean = device_checked(be, be.download(be.view(&buf, 0..mine.len())))?;
    match first_disagreement(&mean, &values, a.world_size as usize) {
        None => Ok(()),
        Some(0) => Err(anyhow!("ranks resumed at different steps (rank {} at step {start})", a.rank)),
        Some(1) => Err(anyhow!(
            "ranks exchange gradients differently (rank {} {} the all-reduce with the backward pass): \
             SMELT_NCCL_OVERLAP must be the same on every gpu worker of a job",
            a.rank,
            if values[1] == 1 { "overlaps" } else { "does not overlap" }
        )),
        Some(_) => Err(anyhow!(
            "ranks start from different weights (rank {}'s fingerprint {weights:016x}): every rank must read the same model \
             (an init_from path that names one file on every host, or a checkpoint or job id in a shared store)",
            a.rank
        )),
    }
}

/// [`fingerprint`] of `weights` when the job has several ranks (0 otherwise: nothing to
/// compare, nothing to spend).
pub fn fingerprint_if_shared(a: &Assignment, weights: &[f32]) -> u64 {
    if a.world_size > 1 {
        fingerprint(weights)
    } else {
        0
    }
}

/// A 64-bit fingerprint of weights: FNV-1a over every value's bits (equal weights, bit for bit,
/// give equal fingerprints; one changed bit changes it).
pub fn fingerprint(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| (h ^ u64::from(v.to_bits())).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Bits per agreed value (a u64).
const BITS: usize = 64;

/// Each value's 64 bits as f32 zeros and ones: what the ranks average. A rank whose bit is 0
/// sees a mean of exactly 0 only if every rank's is 0 (any 1 adds a positive share), and one
/// whose bit is 1 sees `mean * world` round to `world` only if every rank's is 1 (one 0 takes
/// 1/world off the mean, far above f32's rounding for any world below ~2,900 ranks; NCCL's
/// f32 average multiplies each rank's value by 1/world first, so the mean of equal values
/// that are not 0 or 1 is not always exactly that value, which is why a plain mean of the step
/// cannot be compared). So every rank sees every disagreement.
fn agreement_bits(values: &[u64]) -> Vec<f32> {
    values.iter().flat_map(|&v| (0..BITS).map(move |k| ((v >> k) & 1) as f32)).collect()
}

/// Index of the first value some rank disagrees on, given the mean of every rank's
/// [`agreement_bits`] over `world` ranks.
fn first_disagreement(mean: &[f32], values: &[u64], world: usize) -> Option<usize> {
    let mine = agreement_bits(values);
    let agrees = |i: usize| match mine[i] == 1.0 {
        false => mean[i] == 0.0,
        true => (mean[i] as f64 * world as f64).round() == world as f64,
    };
    (0..values.len()).find(|&v| (0..BITS).any(|k| !agrees(v * BITS + k)))
}

/// A checkpoint resumes only over data tokenized as it was (another character vocabulary
/// of the same size would make the same model config, and other ids).
pub fn check_tokenizer(ck: &Checkpoint, tokenizer: &Tokenizer) -> Result<()> {
    if ck.trainer.tokenizer != *tokenizer {
        return Err(anyhow!(
            "checkpoint {} was trained with the {} tokenizer{}, the job's data is tokenized with {}: its ids would mean other text",
            ck.uri,
            ck.trainer.tokenizer.kind(),
            ck.trainer.tokenizer.char_difference("the checkpoint", tokenizer, "the data").map(|d| format!(" ({d})")).unwrap_or_default(),
            tokenizer.kind()
        ));
    }
    Ok(())
}

/// Lineage of a run's checkpoints when it resumed from `ck`.
pub fn lineage_of(ck: &Checkpoint) -> Lineage {
    Lineage { parent_checkpoint: Some(ck.uri.clone()), parent_job: Some(ck.trainer.job_id.clone()) }
}

/// Every rank: restores the trainer from the assignment's checkpoint (see [`load_resume`]) and
/// returns the step to start at, agreed by all ranks.
pub fn resume<B: Backend>(
    a: &Assignment,
    spec: &JobSpec,
    cfg: &GptConfig,
    tokenizer: &Tokenizer,
    trainer: &mut Trainer<B>,
    ring: &mut dyn Collective<B>,
    events: &dyn Fn(RunEvent),
    init_print: u64,
) -> Result<Resumed> {
    let mut resumed = Resumed::default();
    let mut print = init_print;
    if let Some(ck) = load_resume(a, events)? {
        print = fingerprint_if_shared(a, &ck.params);
        if ck.trainer.model.gpt() != Some(cfg) || ck.trainer.head.is_some() {
            let expected = ModelConfig::Gpt(cfg.clone());
            let head = if ck.trainer.head.is_some() { " with a classification head" } else { "" };
            let how = ck.trainer.model.differences(&expected);
            let how = if how.is_empty() { String::new() } else { format!(": {how}") };
            return Err(anyhow!("checkpoint {} holds a {}{head}, the job's spec makes a {expected}{how}", ck.uri, ck.trainer.model));
        }
        check_tokenizer(&ck, tokenizer)?;
        crate::resume_warnings::warn_if_data_order_changes(&ck, spec);
        trainer.restore(&ck.params, &ck.m, &ck.v, &ck.trainer.trainer).with_context(|| format!("restoring {}", ck.uri))?;
        resumed = Resumed { start_step: ck.step(), lineage: lineage_of(&ck) };
    }
    agree_on_start(a, resumed.start_step, trainer.model.backend(), ring, print)?;
    Ok(resumed)
}

/// Where a job's checkpoints go: `checkpoint.store`, else rank 0's output directory.
pub fn store_uri(spec: &JobSpec, out_dir: &Path) -> Result<String> {
    match &spec.checkpoint.store {
        Some(s) => Ok(s.clone()),
        None => Ok(std::path::absolute(out_dir).with_context(|| format!("output directory {}", out_dir.display()))?.display().to_string()),
    }
}

/// The `ckpt/` directory a job's checkpoints go to: `jobs/<job>/ckpt` under `store_uri`, except
/// that a job without a `checkpoint.store` that resumes from a checkpoint of its own keeps
/// writing beside it. Its default store is its rank 0's output directory, and a restart can
/// place rank 0 on another worker: the job's checkpoints would then be split between two
/// directories (listed from the newer only, the older never pruned).
pub fn checkpoints_dir(a: &Assignment, spec: &JobSpec, out_dir: &Path) -> Result<StoreDir> {
    let own = format!("jobs/{}/ckpt", a.job_id);
    let resumed_dir = parent_uri(&a.resume_from).filter(|p| spec.checkpoint.store.is_none() && p.trim_end_matches('/').ends_with(&own));
    match resumed_dir {
        Some(dir) => Ok(StoreDir::open(&dir)?),
        None => Ok(checkpoints_root(&StoreDir::open(&store_uri(spec, out_dir)?)?, &a.job_id)),
    }
}

/// Host copies of what a checkpoint holds besides its metadata: weights and AdamW moments (a
/// fine-tuning head's after the GPT's), and the trainer's counters.
pub struct HostState {
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub state: TrainerState,
}

/// A pretraining trainer's [`HostState`] (on a GPU, device-to-host downloads, checked).
pub fn host_state_of<B: Backend>(trainer: &Trainer<B>) -> Result<HostState> {
    let (m, v) = trainer.moments_host();
    let params = device_checked(trainer.model.backend(), trainer.model.params_host())?;
    Ok(HostState { params, m, v, state: trainer.state() })
}

/// `host`, once its optimizer has taken `expected` steps: a rescue's copies must be those of
/// the last completed step (the BERT/T5 and fine-tuning loops name the step themselves, so
/// the optimizer's own count is what shows an update that was applied after all).
pub fn optimizer_at(host: HostState, expected: u64) -> Result<HostState> {
    match host.state.optimizer_steps == expected {
        true => Ok(host),
        false => Err(anyhow!("the optimizer has taken {} steps, not the {expected} of the last completed step", host.state.optimizer_steps)),
    }
}

/// Whether a training step that failed with `e` left the weights and optimizer state as the
/// step before it left them, readable now: its collective failed (a peer lost, the run
/// aborted), which every step's collectives do before its update. On the CPU only: after an
/// aborted NCCL collective the GPU stream may still hold its kernel, and the host copies would
/// wait on it (not yet checked on a card); a GPU run rescues when it is stopped between steps.
pub fn failed_before_update<B: Backend>(be: &B, e: &anyhow::Error) -> bool {
    be.name() == "cpu" && e.chain().any(|c| c.is::<smelt_engine::collective::CollectiveError>())
}

/// Fails, naming the store and why, when the checkpoints' root cannot be written (a bucket that
/// does not exist, missing credentials, a read-only directory): a job that asked for checkpoints
/// must not train for hours without any, to lose it all to the first failure. One small object
/// written and deleted again, with the uploads' retries.
fn probe_writable(root: &StoreDir, every: u64) -> Result<()> {
    let name = crate::write_probe::probe_name();
    let policy = UploadOptions::default().retry;
    let written = smelt_checkpoint::upload::with_retry(&policy, &root.uri_of(&name), || root.put(&name, &b"smelt"[..]))
        .and_then(|()| root.delete(&name));
    written.map_err(|e| {
        // the probe's name is unique per call; the error names the place, so that the next
        // attempt's failure reads the same and the job is not restarted into it again and again
        let transient = e.is_transient();
        let e = e.to_string().replace(&name, ".write-probe");
        let message = format!(
            "the checkpoint store cannot be written: {e} (the job checkpoints every {every} steps, and a job that cannot would lose \
             its work to the first failure: fix [checkpoint] store or its credentials, or set [checkpoint] every = 0)"
        );
        // a store that could not be reached is an outage (restarted after a back-off), in the
        // same words
        if transient {
            anyhow::Error::new(crate::transient::Outage(message))
        } else {
            anyhow!(message)
        }
    })
}

/// Rank 0's checkpointing during a run.
pub struct Checkpointer {
    uploader: AsyncCheckpointer,
    every: u64,
    final_wait: Duration,
    template: TrainerJson,
    /// Time the training loop spent taking snapshots (the only stall checkpoints cause).
    pub stall: Duration,
    pub snapshots: u64,
    /// The step of the newest checkpoint committed by this run.
    last_committed: Option<u64>,
}

impl Checkpointer {
    /// `None` when the job does not checkpoint.
    pub fn new(a: &Assignment, spec: &JobSpec, model: ModelConfig, tokenizer: &Tokenizer, out_dir: &Path, lineage: Lineage) -> Result<Option<Self>> {
        let c = &spec.checkpoint;
        if c.every == 0 {
            return Ok(None);
        }
        let root = checkpoints_dir(a, spec, out_dir)?;
        info!(job_id = %a.job_id, uri = %root.uri(), every = c.every, keep_last = c.keep_last, keep_every = c.keep_every, "checkpointing");
        probe_writable(&root, c.every)?;
        let retention = Retention { keep_last: c.keep_last, keep_every: c.keep_every, ..Retention::default() };
        let template = TrainerJson {
            format: FORMAT.to_string(),
            step: 0,
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            data: DataPosition { samples_consumed: 0, global_batch: spec.train.global_batch as u64, seed: spec.seed },
            trainer: smelt_engine::train::TrainerState { step: 0, optimizer_steps: 0, data_rng: smelt_engine::rng::Rng::new(0) },
            model,
            head: None,
            tokenizer: tokenizer.clone(),
            spec_toml: a.spec_toml.clone(),
            lineage,
            smelt_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        Ok(Some(Checkpointer {
            uploader: AsyncCheckpointer::new(root, retention, UploadOptions::default()),
            every: c.every,
            final_wait: Duration::from_secs(c.final_wait_s),
            template,
            stall: Duration::ZERO,
            snapshots: 0,
            last_committed: None,
        }))
    }

    fn report(&mut self, outcomes: Vec<Outcome>, events: &dyn Fn(RunEvent)) {
        for o in &outcomes {
            if let Outcome::Committed(c) = o {
                self.last_committed = self.last_committed.max(Some(c.step));
            }
        }
        report(&self.template, outcomes, events)
    }

    /// A fine-tuning job's checkpoints also hold its classification head.
    pub fn with_head(mut self, head: Option<HeadConfig>) -> Self {
        self.template.head = head;
        self
    }

    /// After step `done` (steps completed) of `total` of a pretraining run: see
    /// [`Self::after_step_with`]. The host copies are, on a GPU, device-to-host downloads
    /// through the backend.
    pub fn after_step<B: Backend>(&mut self, done: u64, total: u64, trainer: &Trainer<B>, events: &dyn Fn(RunEvent)) -> anyhow::Result<()> {
        self.after_step_with(done, total, events, &mut || host_state_of(trainer))
    }

    /// After step `done` (steps completed) of `total`: reports uploads that ended, and when a
    /// checkpoint is due, takes host copies with `take` (the only part of a checkpoint the
    /// training loop waits for) and hands them to the uploader. The last step always
    /// checkpoints, waiting (at most `final_wait`) for an upload still in flight.
    /// `take` must fail rather than hand back copies a device error left unwritten (a failed
    /// download records the error and returns zeros, and a checkpoint of zeros, once committed,
    /// is what a restart would resume from): its error ends the run, and nothing is uploaded.
    pub fn after_step_with(
        &mut self,
        done: u64,
        total: u64,
        events: &dyn Fn(RunEvent),
        take: &mut dyn FnMut() -> anyhow::Result<HostState>,
    ) -> anyhow::Result<()> {
        self.report(self.uploader.poll(), events);
        let last = done == total;
        if !(last || done % self.every == 0) {
            return Ok(());
        }
        if last && self.uploader.busy() {
            let (out, _) = self.uploader.wait(self.final_wait);
            self.report(out, events);
        }
        if self.uploader.busy() {
            warn!(step = done, "checkpoint skipped: the previous upload is still in flight (training never waits on storage)");
            return Ok(());
        }
        let t0 = Instant::now();
        let host = match take() {
            Ok(host) => host,
            Err(e) => {
                // an upload that ended since the poll above is still reported (the coordinator
                // must hear of every checkpoint that exists), then the run ends
                self.report(self.uploader.poll(), events);
                return Err(e.context(format!("taking the step-{done} checkpoint's host copies")));
            }
        };
        let mut meta = self.template.clone();
        meta.step = host.state.step;
        meta.data.samples_consumed = host.state.step * meta.data.global_batch;
        meta.trainer = host.state;
        self.stall += t0.elapsed();
        self.snapshots += 1;
        let s = Snapshot { params: host.params, m: host.m, v: host.v, trainer: meta };
        if let Submitted::Busy { in_flight } = self.uploader.submit(s) {
            warn!(step = done, in_flight, "checkpoint skipped: the previous upload is still in flight");
        }
        Ok(())
    }

    /// A run ending early at the top of step `step` (this run began at `start`): when `whole`
    /// (its weights are still those of step `step`: it was stopped between steps, or the step's
    /// collective failed before its update, see [`failed_before_update`]) and a step completed
    /// in this run, a rescue checkpoint of it ([`Self::rescue_with`]); else the end of the run
    /// ([`Self::finish`]: an upload in flight still lands and is reported).
    pub fn end_early(self, step: u64, start: u64, whole: bool, why: &str, events: &dyn Fn(RunEvent), take: &mut dyn FnMut() -> anyhow::Result<HostState>) {
        match whole && step > start {
            true => self.rescue_with(step, why, events, take),
            false => self.finish(events),
        }
    }

    /// A run about to end early (a peer lost, the run stopped) after `done` completed steps, its
    /// weights and optimizer state still those of step `done` (a step that fails before its
    /// update leaves them so; see [`failed_before_update`]): writes them, taken by `take`, as a
    /// checkpoint now, waiting (at most `final_wait` for the upload before it and for this one),
    /// so that the restart resumes here instead of at the last periodic checkpoint. Nothing when
    /// step `done` is already committed, when no step completed, when the copies cannot be
    /// taken or are of another step; an event says what was committed.
    pub fn rescue_with(mut self, done: u64, why: &str, events: &dyn Fn(RunEvent), take: &mut dyn FnMut() -> anyhow::Result<HostState>) {
        // the whole rescue, the upload before it included, within what the coordinator waits
        // for it (twice final_wait, and two leases to spare)
        let until = Instant::now() + self.final_wait * 2;
        let left = || until.saturating_duration_since(Instant::now());
        if done == 0 {
            return self.finish_within(left(), events);
        }
        let (out, idle) = self.uploader.wait(self.final_wait.min(left()));
        self.report(out, events);
        if !idle || self.last_committed == Some(done) {
            return self.finish_within(left(), events);
        }
        // as the run's last step: always due
        let mut of_step_done = || {
            let host = take()?;
            match host.state.step == done {
                true => Ok(host),
                false => Err(anyhow!("the trainer holds step {}, not step {done}", host.state.step)),
            }
        };
        if let Err(e) = self.after_step_with(done, done, events, &mut of_step_done) {
            warn!(step = done, error = %format!("{e:#}"), "rescue checkpoint not taken");
            return self.finish_within(left(), events);
        }
        let (out, _) = self.uploader.wait(left());
        self.report(out, events);
        if self.last_committed == Some(done) {
            info!(job_id = %self.template.job_id, step = done, why, "rescue checkpoint: the run ended early; its last completed step is committed");
            events(RunEvent::Note(JobNote {
                job_id: self.template.job_id.clone(),
                attempt: self.template.attempt,
                text: format!("rescue checkpoint at step {done}: the run ended early ({why}), so its last completed step is committed"),
                ..Default::default()
            }));
        }
        self.finish_within(left(), events)
    }

    /// End of the run: waits (at most `final_wait`) for the last upload and reports it; an
    /// upload still running then (a store that is down or slow) is abandoned with an event
    /// saying so, and the run ends without that checkpoint.
    pub fn finish(self, events: &dyn Fn(RunEvent)) {
        let wait = self.final_wait;
        self.finish_within(wait, events)
    }

    /// [`Self::finish`], waiting at most `wait`.
    fn finish_within(mut self, wait: Duration, events: &dyn Fn(RunEvent)) {
        let (stall, n) = (self.stall, self.snapshots);
        let (out, idle) = self.uploader.wait(wait);
        self.report(out, events);
        if !idle {
            let step = self.uploader.in_flight().unwrap_or_default();
            events(RunEvent::Note(JobNote {
                job_id: self.template.job_id.clone(),
                attempt: self.template.attempt,
                text: format!(
                    "checkpoint at step {step} not committed when the run ended: its upload to {} was still running after \
                     checkpoint.final_wait_s = {} s (is the store reachable?); the run does not wait for it (it may still commit; a \
                     partial one is never read)",
                    self.uploader.root().uri(),
                    self.final_wait.as_secs()
                ),
                ..Default::default()
            }));
        }
        let out = self.uploader.finish(Duration::ZERO);
        report(&self.template, out, events);
        info!(snapshots = n, stall_ms = %format!("{:.1}", stall.as_secs_f64() * 1e3), "checkpointing: time the training loop spent on snapshots");
    }
}

/// Commits go to the coordinator; failures become events of the job.
fn report(t: &TrainerJson, outcomes: Vec<Outcome>, events: &dyn Fn(RunEvent)) {
    for o in outcomes {
        match o {
            Outcome::Committed(c) => events(RunEvent::Checkpoint(CheckpointReport {
                job_id: t.job_id.clone(),
                attempt: t.attempt,
                step: c.step,
                uri: c.uri,
                manifest_sha256: c.manifest_sha256,
            })),
            Outcome::Failed { step, error } => events(RunEvent::Note(JobNote {
                job_id: t.job_id.clone(),
                attempt: t.attempt,
                text: format!("checkpoint at step {step} not written: {error}"),
                ..Default::default()
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_checkpoint::list_committed;

    /// The f32 mean NCCL computes for `ncclAvg`: every rank's value times 1/world (rounded),
    /// summed in rank order (rounded at each addition).
    fn nccl_f32_mean(per_rank: &[Vec<f32>]) -> Vec<f32> {
        let inv = 1.0f32 / per_rank.len() as f32;
        (0..per_rank[0].len()).map(|i| per_rank.iter().fold(0.0f32, |acc, r| acc + r[i] * inv)).collect()
    }

    #[test]
    fn ranks_that_agree_pass_whatever_the_world_size() {
        // step 7 on 3 ranks: the plain f32 mean of 7.0 under ncclAvg is not 7.0, which made a
        // 3-rank resume at step 7 fail as "ranks resumed at different steps"
        let plain = nccl_f32_mean(&vec![vec![7.0f32]; 3])[0];
        assert_ne!(plain, 7.0, "the premultiplied mean this check must not depend on");
        for world in [2, 3, 5, 7, 12, 64, 1000, 2048] {
            for start in [0u64, 3, 7, 4095, 123_456, 9_999_999, u64::MAX] {
                for overlaps in [0, 1] {
                    let values = [start, overlaps];
                    let mean = nccl_f32_mean(&vec![agreement_bits(&values); world]);
                    assert_eq!(first_disagreement(&mean, &values, world), None, "world {world}, start {start}");
                }
            }
        }
    }

    #[test]
    fn the_fingerprint_sees_every_value() {
        let w: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.37).sin()).collect();
        let base = fingerprint(&w);
        assert_eq!(fingerprint(&w.clone()), base);
        for i in [0, 1, 4_999, 9_998, 9_999] {
            let mut v = w.clone();
            v[i] = f32::from_bits(v[i].to_bits() ^ 1); // the last bit of one value
            assert_ne!(fingerprint(&v), base, "value {i}");
        }
        // two values swapped
        let mut v = w.clone();
        v.swap(10, 11);
        assert_ne!(fingerprint(&v), base);
        assert_ne!(fingerprint(&w[..9_999]), base, "a shorter buffer");
    }

    #[test]
    fn every_rank_sees_a_disagreement_even_when_the_mean_hides_it() {
        // starts 3, 4 and 5: the mean is the middle rank's own start, so a check of the mean
        // alone passes there; the bits catch it on every rank
        let starts = [3u64, 4, 5];
        let per_rank: Vec<Vec<f32>> = starts.iter().map(|&s| agreement_bits(&[s, 0])).collect();
        let mean = nccl_f32_mean(&per_rank);
        for &s in &starts {
            assert_eq!(first_disagreement(&mean, &[s, 0], 3), Some(0), "rank at step {s}");
        }
        // one host with SMELT_NCCL_OVERLAP=1 among four: every rank names the overlap
        let per_rank: Vec<Vec<f32>> = [0u64, 0, 1, 0].iter().map(|&o| agreement_bits(&[500, o])).collect();
        let mean = nccl_f32_mean(&per_rank);
        for o in [0, 1] {
            assert_eq!(first_disagreement(&mean, &[500, o], 4), Some(1));
        }
        // one dissenter among 2,048 ranks: the others' mean is 1 - 1/2048, still seen
        let mut per_rank = vec![agreement_bits(&[9, 1]); 2048];
        per_rank[1234] = agreement_bits(&[9, 0]);
        let mean = nccl_f32_mean(&per_rank);
        assert_eq!(first_disagreement(&mean, &[9, 1], 2048), Some(1));
        assert_eq!(first_disagreement(&mean, &[9, 0], 2048), Some(1));
        // a large start that differs in its top bit only
        let (a, b) = (1u64 << 60, (1u64 << 60) + (1u64 << 63));
        let mean = nccl_f32_mean(&[agreement_bits(&[a, 0]), agreement_bits(&[b, 0])]);
        assert_eq!(first_disagreement(&mean, &[a, 0], 2), Some(0));
        assert_eq!(first_disagreement(&mean, &[b, 0], 2), Some(0));
    }

    /// A one-step GPT job that checkpoints every step into `store`, and its checkpointer.
    /// A tiny GPT job checkpointing every step into `store`.
    fn spec_toml(store: &Path) -> String {
        format!(
            "name = \"ck\"\nseed = 1\n[model]\npreset = \"tiny\"\n[data]\ntext = \"x.txt\"\ntokenizer = \"char\"\n\
             [train]\nsteps = 1\nglobal_batch = 1\nmicro_batch = 1\nseq_len = 8\nlr = 1e-3\n[checkpoint]\nevery = 1\nstore = \"{}\"\n",
            store.display()
        )
    }

    /// Commits step 1 through `c` from host copies that succeed.
    fn commit_step_1(mut c: Checkpointer) {
        let n = GptConfig::preset("tiny").unwrap().num_params();
        let state = TrainerState { step: 1, optimizer_steps: 1, data_rng: smelt_engine::rng::Rng::new(1) };
        c.after_step_with(1, 1, &|_| {}, &mut || Ok(HostState { params: vec![0.5; n], m: vec![0.0; n], v: vec![0.0; n], state: state.clone() }))
            .unwrap();
        c.finish(&|_| {});
    }

    fn checkpointer(store: &Path) -> (Checkpointer, StoreDir) {
        let spec_toml = spec_toml(store);
        let spec = JobSpec::parse(&spec_toml).expect("the test's spec parses");
        let a = Assignment { job_id: "job-000001".into(), rank: 0, world_size: 1, spec_toml, ..Default::default() };
        let tokenizer = Tokenizer::fit("char", "abc").unwrap();
        let model = ModelConfig::Gpt(GptConfig::preset("tiny").unwrap());
        let c = Checkpointer::new(&a, &spec, model, &tokenizer, store, Lineage::default()).unwrap().expect("every = 1 checkpoints");
        let root = checkpoints_root(&StoreDir::open(&store.display().to_string()).unwrap(), "job-000001");
        (c, root)
    }

    #[test]
    fn a_job_resuming_from_its_own_checkpoint_keeps_its_checkpoints_beside_it() {
        let spec_of = |store: &str| {
            let toml = format!(
                "name = \"ck\"\n[model]\npreset = \"tiny\"\n[data]\ntext = \"x.txt\"\n[train]\nsteps = 1\nglobal_batch = 1\n\
                 micro_batch = 1\nseq_len = 8\nlr = 1e-3\n[checkpoint]\nevery = 1\n{store}"
            );
            JobSpec::parse(&toml).expect("the test's spec parses")
        };
        let a = |resume_from: &str| Assignment { job_id: "job-000007".into(), resume_from: resume_from.into(), ..Default::default() };
        let (w1, w5) = (Path::new("/runs/w1"), Path::new("/runs/w5"));
        let uri = |a: &Assignment, spec: &JobSpec| checkpoints_dir(a, spec, w5).unwrap().uri().to_string();
        let default_store = spec_of("");
        // a fresh start: rank 0's output directory
        assert_eq!(uri(&a(""), &default_store), "/runs/w5/jobs/job-000007/ckpt");
        // resumed from its own checkpoint in the first rank 0's directory: stays there
        let earlier = checkpoints_root(&StoreDir::open("/runs/w1").unwrap(), "job-000007").join("00000060");
        assert!(earlier.uri().starts_with(&w1.display().to_string()));
        assert_eq!(uri(&a(earlier.uri()), &default_store), "/runs/w1/jobs/job-000007/ckpt");
        // resumed from another job's checkpoint (submit --resume-from): its own directory
        assert_eq!(uri(&a("/runs/w1/jobs/job-000003/ckpt/00000060"), &default_store), "/runs/w5/jobs/job-000007/ckpt");
        // a store named in the spec is where checkpoints go, whatever was resumed
        let named = spec_of("store = \"/data/store\"\n");
        assert_eq!(uri(&a(earlier.uri()), &named), "/data/store/jobs/job-000007/ckpt");
    }

    #[test]
    fn host_copies_that_failed_end_the_run_and_commit_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, root) = checkpointer(dir.path());
        let e = c
            .after_step_with(1, 1, &|_| {}, &mut || Err(anyhow!("cuda:0 memcpy_dtoh: an illegal memory access was encountered")))
            .expect_err("a failed take must fail the step");
        let e = format!("{e:#}");
        assert!(e.contains("step-1 checkpoint") && e.contains("illegal memory access"), "{e}");
        c.finish(&|_| {});
        assert!(list_committed(&root).unwrap().is_empty(), "nothing may be committed from failed host copies");
    }

    #[test]
    fn a_rescue_refuses_copies_whose_optimizer_is_not_at_the_last_completed_step() {
        let host = |steps: u64| HostState {
            params: vec![1.0],
            m: vec![0.0],
            v: vec![0.0],
            state: TrainerState { step: 7, optimizer_steps: steps, data_rng: smelt_engine::rng::Rng::new(1) },
        };
        assert!(optimizer_at(host(7), 7).is_ok());
        let e = optimizer_at(host(8), 7).err().expect("an update applied after all").to_string();
        assert!(e.contains("8 steps") && e.contains("the 7 of the last completed step"), "{e}");
    }

    #[test]
    fn a_store_that_cannot_be_written_fails_in_the_same_words_each_time() {
        // (a path under a file: "not a directory" even for root, whom permissions do not stop)
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let root = StoreDir::open(&dir.path().join("file/ckpt").display().to_string()).unwrap();
        let first = probe_writable(&root, 10).unwrap_err().to_string();
        let second = probe_writable(&root, 10).unwrap_err().to_string();
        assert!(first.starts_with("the checkpoint store cannot be written") && first.contains(".write-probe"), "{first}");
        assert_eq!(first, second, "the coordinator tells a repeated failure by its words");
        // a path that cannot be written is no outage: the repeat rule ends the job
        assert!(!crate::transient::is_transient(&probe_writable(&root, 10).unwrap_err()));
    }

    #[test]
    fn host_copies_that_succeed_are_committed() {
        // the control for the test above: the same checkpointer with a take that works commits
        let dir = tempfile::tempdir().unwrap();
        let (c, root) = checkpointer(dir.path());
        commit_step_1(c);
        assert_eq!(list_committed(&root).unwrap().len(), 1);
    }

    #[test]
    fn a_restarted_attempt_finds_the_checkpoint_its_coordinator_never_heard_of() {
        // attempt 1's rank 0 committed step 1 and was lost before reporting it: attempt 2 is
        // assigned no checkpoint
        let dir = tempfile::tempdir().unwrap();
        let (c, root) = checkpointer(dir.path());
        commit_step_1(c);
        let committed = list_committed(&root).unwrap();
        let (_, uri) = committed.last().expect("step 1 committed").clone();
        let spec_toml = spec_toml(dir.path());
        let spec = JobSpec::parse(&spec_toml).unwrap();
        let a = |attempt: u32, created: i64| Assignment {
            job_id: "job-000001".into(),
            attempt,
            world_size: 1,
            spec_toml: spec_toml.clone(),
            job_created_at_ms: created,
            ..Default::default()
        };
        let out = Path::new("/nonexistent-out");
        let one = vec!["127.0.0.1:9000".to_string()];
        assert_eq!(unrecorded_checkpoint(&a(2, 0), &spec, out, &one), Some((uri.clone(), 1)));
        // a first attempt has nothing of its own to find
        assert_eq!(unrecorded_checkpoint(&a(1, 0), &spec, out, &one), None);
        // one given a checkpoint is not second-guessed here (load_resume looks past it)
        let given = Assignment { resume_from: uri.clone(), ..a(2, 0) };
        assert_eq!(unrecorded_checkpoint(&given, &spec, out, &one), None);
        // a job of the same id submitted after it was written (another coordinator database)
        let later = smelt_checkpoint::manifest::now_ms() + 2 * CLOCK_SKEW_MS;
        assert_eq!(unrecorded_checkpoint(&a(2, later), &spec, out, &one), None);
        // ranks on two machines: with the spec's store (one directory) they look; with the
        // default store (each rank 0's own output directory) only one of them could find it
        let two = vec!["10.0.0.1:9000".to_string(), "10.0.0.2:9000".to_string()];
        assert_eq!(unrecorded_checkpoint(&a(2, 0), &spec, out, &two), Some((uri.clone(), 1)));
        let default_store = JobSpec::parse(&spec_toml.replace(&format!("store = \"{}\"\n", dir.path().display()), "")).unwrap();
        assert!(default_store.checkpoint.store.is_none());
        assert_eq!(unrecorded_checkpoint(&a(2, 0), &default_store, dir.path(), &two), None);
        assert_eq!(unrecorded_checkpoint(&a(2, 0), &default_store, dir.path(), &one), Some((uri.clone(), 1)));
    }
}
