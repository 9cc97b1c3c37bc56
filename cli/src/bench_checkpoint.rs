//! `smelt bench checkpoint`: checkpoint write and read speed to a local store and to an S3
//! server on loopback (s3s-fs, started in this process), and the training stall a checkpoint
//! causes: the time rank 0's step loop is blocked taking the host snapshot (the upload runs on
//! its own thread), as a share of a training step measured in the same command.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use smelt_checkpoint::manifest::{DataPosition, FORMAT};
use smelt_checkpoint::{commit, load_verified_dir, Lineage, Snapshot, TrainerJson, UploadOptions};
use smelt_corpus::loopback::S3Loopback;
use smelt_corpus::{StoreDir, Tokenizer};
use smelt_engine::data::TokenWindows;
use smelt_engine::model::{Gpt, GptConfig};
use smelt_engine::optim::{AdamWConfig, LrSchedule};
use smelt_engine::rng::Rng;
use smelt_engine::train::{TrainConfig, Trainer};
use smelt_engine::CpuBackend;

#[derive(Args, Debug)]
pub struct CheckpointArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    #[arg(long, default_value = "gpt2-124m")]
    pub preset: String,
    /// Micro-batch and sequence length of the training steps timed for the stall share.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Timed training steps (after one untimed).
    #[arg(long, default_value_t = 2)]
    pub steps: u64,
    /// Checkpoint interval the amortized stall is given for.
    #[arg(long, default_value_t = 100)]
    pub every: u64,
    /// Timed write + read rounds per store (best is reported).
    #[arg(long, default_value_t = 2)]
    pub repeat: usize,
    #[arg(long)]
    pub json: bool,
}

fn snapshot_of(trainer: &Trainer<CpuBackend>, cfg: &GptConfig) -> Snapshot {
    let state = trainer.state();
    let (m, v) = trainer.moments_host();
    let params = trainer.model.params_host();
    Snapshot {
        params,
        m,
        v,
        trainer: TrainerJson {
            format: FORMAT.into(),
            step: state.step,
            job_id: "bench".into(),
            attempt: 1,
            data: DataPosition { samples_consumed: 0, global_batch: 1, seed: 0 },
            trainer: state,
            model: cfg.clone().into(),
            head: None,
            tokenizer: Tokenizer::Gpt2,
            spec_toml: String::new(),
            lineage: Lineage::default(),
            smelt_version: env!("CARGO_PKG_VERSION").into(),
        },
    }
}

/// Best write and read time of `repeat` rounds, each round a new step under `root`.
fn time_store(root: &StoreDir, snap: &mut Snapshot, repeat: usize) -> Result<(u64, Duration, Duration)> {
    let (mut best_w, mut best_r, mut bytes) = (Duration::MAX, Duration::MAX, 0);
    for _ in 0..repeat.max(1) {
        snap.trainer.step += 1;
        let t = Instant::now();
        let c = commit(root, snap, &UploadOptions::default())?;
        best_w = best_w.min(t.elapsed());
        bytes = c.bytes;
        let dir = root.join(&smelt_checkpoint::step_dir_name(c.step));
        let t = Instant::now();
        let back = load_verified_dir(&dir)?;
        best_r = best_r.min(t.elapsed());
        if back.params != snap.params || back.m != snap.m {
            bail!("{}: read back other values than written", c.uri);
        }
    }
    Ok((bytes, best_w, best_r))
}

pub fn run(a: CheckpointArgs) -> Result<()> {
    if a.steps == 0 || a.every == 0 {
        bail!("--steps and --every must be at least 1");
    }
    let cfg = GptConfig::preset(&a.preset)?;
    let be = CpuBackend::new();
    let mut rng = Rng::new(0);
    let stream: Vec<u32> = (0..a.batch * (a.seq + 1) * 8).map(|_| rng.below(cfg.vocab_size as u64) as u32).collect();
    let windows = TokenWindows::new(&stream);
    let tc = TrainConfig {
        batch_size: a.batch,
        seq_len: a.seq,
        grad_accum: 1,
        steps: 1 + a.steps,
        schedule: LrSchedule::constant(1e-4),
        optim: AdamWConfig::default(),
        eval_interval: 0,
        eval_batches: 1,
        seed: 0,
    };
    let mut trainer = Trainer::new(Gpt::new(be, cfg.clone(), 0)?, tc)?;
    trainer.train_step(&windows)?;
    let t = Instant::now();
    for _ in 0..a.steps {
        trainer.train_step(&windows)?;
    }
    let step_s = t.elapsed().as_secs_f64() / a.steps as f64;

    // The stall: what the loop waits for before handing the snapshot to the upload thread.
    let mut stall = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let s = snapshot_of(&trainer, &cfg);
        stall = stall.min(t.elapsed());
        drop(s);
    }
    let mut snap = snapshot_of(&trainer, &cfg);

    let tmp = tempfile::tempdir()?;
    let local = StoreDir::open(&format!("file://{}/ckpt", tmp.path().display()))?;
    let (bytes, lw, lr) = time_store(&local, &mut snap, a.repeat)?;
    let server = S3Loopback::start(&tmp.path().join("s3"))?;
    server.create_bucket("bench")?;
    let s3 = server.dir("bench", "ckpt")?;
    let (_, sw, sr) = time_store(&s3, &mut snap, a.repeat)?;

    let gbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
    let stall_ms = stall.as_secs_f64() * 1e3;
    let share = stall.as_secs_f64() / step_s;
    let amortized = share / a.every as f64;
    let report = json!({
        "bench": "checkpoint",
        "preset": a.preset,
        "params": cfg.num_params(),
        "checkpoint_bytes": bytes,
        "file_write_gb_per_s": gbps(lw),
        "file_read_gb_per_s": gbps(lr),
        "s3_loopback_write_gb_per_s": gbps(sw),
        "s3_loopback_read_gb_per_s": gbps(sr),
        "step_ms": step_s * 1e3,
        "batch": a.batch,
        "seq": a.seq,
        "stall_ms": stall_ms,
        "stall_share_of_one_step": share,
        "every": a.every,
        "stall_share_amortized": amortized,
        "threads": rayon::current_num_threads(),
    });
    if a.json {
        println!("{report}");
    } else {
        println!("{}: {} parameters, checkpoint {:.2} GB (weights, AdamW moments, trainer.json, manifest)", a.preset, cfg.num_params(), bytes as f64 / 1e9);
        println!("file://          write {:.3} GB/s ({:.2} s)  read+verify {:.3} GB/s ({:.2} s)", gbps(lw), lw.as_secs_f64(), gbps(lr), lr.as_secs_f64());
        println!("s3:// loopback   write {:.3} GB/s ({:.2} s)  read+verify {:.3} GB/s ({:.2} s)", gbps(sw), sw.as_secs_f64(), gbps(sr), sr.as_secs_f64());
        println!(
            "stall: {stall_ms:.1} ms per checkpoint = {:.2}% of one step ({:.0} ms, batch {} x seq {}); at one checkpoint per {} steps {:.4}% of training time",
            100.0 * share,
            step_s * 1e3,
            a.batch,
            a.seq,
            a.every,
            100.0 * amortized
        );
    }
    Ok(())
}
