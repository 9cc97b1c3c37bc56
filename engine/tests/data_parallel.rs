//! Data-parallel training in one process: the same global batches of 8 sequences trained on one
//! rank (micro-batch 8), on two ranks joined by a TCP ring (micro-batch 4 each), and on two
//! ranks with two accumulated micro-batches of 2 each. Every rank of a run ends with bitwise
//! identical weights, and the runs agree with the single-rank run within float tolerance.

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use smelt_corpus::{rank_slice, SampleOrder, Sequences};
use smelt_engine::background_ring::BackgroundRing;
use smelt_engine::collective::{Collective, Local, TcpRing};
use smelt_engine::data::{Batch, TokenWindows};
use smelt_engine::model::{Gpt, GptConfig, LayerNormPlacement};
use smelt_engine::optim::{AdamWConfig, LrSchedule};
use smelt_engine::train::{StepStats, TrainConfig, Trainer};
use smelt_engine::CpuBackend;

const SEQ: usize = 16;
const GLOBAL_BATCH: u64 = 8;
const STEPS: u64 = 5;
const N_SEQUENCES: usize = 30; // 5 steps x 8 = 40 samples: the run crosses an epoch boundary
const DATA_SEED: u64 = 1234;

fn model_config() -> GptConfig {
    GptConfig { vocab_size: 50, block_size: SEQ, n_layer: 2, n_head: 2, n_embd: 32, ln_placement: LayerNormPlacement::Pre, positions: Default::default() }
}

fn train_config() -> TrainConfig {
    TrainConfig {
        batch_size: 1, // unused by train_step_batches
        seq_len: SEQ,
        grad_accum: 1,
        steps: STEPS,
        schedule: LrSchedule::cosine(3e-3, 3e-4, 2, STEPS),
        optim: AdamWConfig::default(),
        eval_interval: 0,
        eval_batches: 1,
        seed: 0,
    }
}

/// A token stream with some structure to learn (a noisy repeating pattern).
fn tokens() -> Vec<u32> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..N_SEQUENCES * SEQ + 1)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 4 == 0 {
                (x % 50) as u32
            } else {
                ((i * 7) % 50) as u32
            }
        })
        .collect()
}

/// Trains one rank of `world` for `STEPS` steps with micro-batches of `micro` sequences; returns
/// its final parameters and the stats of every step.
fn train_rank(rank: usize, world: usize, micro: usize, collective: &mut dyn Collective<CpuBackend>) -> (Vec<f32>, Vec<StepStats>) {
    train_rank_bucketed(rank, world, micro, collective, None)
}

/// [`train_rank`] with the trainer's gradient bucket size set (None: its default).
fn train_rank_bucketed(
    rank: usize,
    world: usize,
    micro: usize,
    collective: &mut dyn Collective<CpuBackend>,
    bucket_floats: Option<usize>,
) -> (Vec<f32>, Vec<StepStats>) {
    let toks = tokens();
    let seqs = Sequences::new(&toks, SEQ);
    assert_eq!(seqs.count(), N_SEQUENCES as u64);
    let order = SampleOrder::new(seqs.count(), DATA_SEED);
    let model = Gpt::new(CpuBackend, model_config(), 7).unwrap();
    let mut trainer = Trainer::new(model, train_config()).unwrap();
    if let Some(b) = bucket_floats {
        trainer.set_bucket_floats(b);
    }
    let mut stats = Vec::new();
    for step in 0..STEPS {
        let slice = rank_slice(step, GLOBAL_BATCH, rank as u64, world as u64).unwrap();
        let indices: Vec<u64> = slice.map(|k| order.sequence_at(k)).collect();
        assert_eq!(indices.len() % micro, 0);
        let micro_batches: Vec<Batch> = indices
            .chunks(micro)
            .map(|c| {
                let (inputs, targets) = seqs.batch(c.iter().copied());
                Batch { inputs, targets, batch: c.len(), seq_len: SEQ }
            })
            .collect();
        stats.push(trainer.train_step_batches(&micro_batches, collective).unwrap());
    }
    (trainer.model.params_host(), stats)
}

/// Runs `world` ranks as threads joined by a TCP ring on loopback.
fn train_ring(world: usize, micro: usize) -> Vec<(Vec<f32>, Vec<StepStats>)> {
    train_ring_overlapped(world, micro, None).into_iter().map(|(p, s, _)| (p, s)).collect()
}

/// [`train_ring`]; with `Some(bucket_floats)` each ring runs on its own thread
/// ([`BackgroundRing`]) and gradient buckets of that size are averaged during the backward
/// pass. Also returns how many reductions each rank started.
fn train_ring_overlapped(world: usize, micro: usize, bucket_floats: Option<usize>) -> Vec<(Vec<f32>, Vec<StepStats>, u64)> {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            thread::spawn(move || {
                let ring = TcpRing::connect(rank, &addrs, l, Duration::from_secs(30)).unwrap();
                match bucket_floats {
                    None => {
                        let mut ring = ring;
                        let (p, s) = train_rank(rank, world, micro, &mut ring);
                        (p, s, 0)
                    }
                    Some(b) => {
                        let mut ring = BackgroundRing::new(ring);
                        let (p, s) = train_rank_bucketed(rank, world, micro, &mut ring, Some(b));
                        (p, s, ring.reductions_started())
                    }
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn bitwise_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn two_ranks_match_one_rank() {
    let (single, single_stats) = train_rank(0, 1, 8, &mut Local);
    let init = Gpt::new(CpuBackend, model_config(), 7).unwrap().params_host();
    let moved = max_abs_diff(&single, &init);
    assert!(moved > 1e-3, "training changed the weights (max change {moved})");
    let first = single_stats[0].loss;
    let last = single_stats.last().unwrap().loss;
    println!("1 rank: loss {first:.4} -> {last:.4}, weights moved up to {moved:.3e}");

    for (name, world, micro) in [("2 ranks x micro-batch 4", 2, 4), ("2 ranks x 2 micro-batches of 2", 2, 2)] {
        let ranks = train_ring(world, micro);
        for (r, (params, stats)) in ranks.iter().enumerate().skip(1) {
            assert!(bitwise_eq(params, &ranks[0].0), "{name}: rank {r}'s weights differ from rank 0's");
            for (a, b) in stats.iter().zip(&ranks[0].1) {
                assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{name}: every rank reports the same (global) loss");
                assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits(), "{name}: same gradient norm");
            }
        }
        let diff = max_abs_diff(&ranks[0].0, &single);
        println!("{name}: max |w - w_1rank| = {diff:.3e} (bitwise equal across ranks)");
        assert!(diff < 2e-5, "{name}: weights differ from the single-rank run by up to {diff:e}");
        for (s, (a, b)) in ranks[0].1.iter().zip(&single_stats).enumerate() {
            assert!((a.loss - b.loss).abs() < 1e-5, "{name} step {s}: loss {} vs {} on one rank", a.loss, b.loss);
            assert!(
                (a.grad_norm - b.grad_norm).abs() <= 1e-4 * b.grad_norm.max(1.0),
                "{name} step {s}: grad norm {} vs {}",
                a.grad_norm,
                b.grad_norm
            );
            assert_eq!(a.tokens, b.tokens, "{name}: tokens count the global batch");
            assert_eq!(a.tokens, GLOBAL_BATCH as usize * SEQ);
        }
    }
}

#[test]
fn no_micro_batches_is_an_error() {
    let model = Gpt::new(CpuBackend, model_config(), 7).unwrap();
    let mut trainer = Trainer::new(model, train_config()).unwrap();
    assert!(trainer.train_step_batches(&[], &mut Local).is_err());
    assert_eq!(trainer.step(), 0);
}

/// Averaging gradient buckets on the ring's own thread while the backward pass runs gives the
/// same weights, bit for bit, as one all-reduce of the whole buffer after it (two ranks: each
/// value is the same sum of two terms whatever the chunking), and really runs in buckets.
#[test]
fn overlapped_buckets_match_the_whole_buffer_bitwise() {
    let plain = train_ring(2, 4);
    let accum_plain = train_ring(2, 2);
    // ln_f + block 1, block 0, then the embeddings: several buckets per step at 2,000 floats
    // (a block holds 12,704), and one bucket per step at the default 25 MiB.
    for (bucket, min_per_step) in [(2_000usize, 3u64), (smelt_engine::grad_buckets::DEFAULT_BUCKET_FLOATS, 1)] {
        for (name, micro, reference) in [("micro-batch 4", 4, &plain), ("2 micro-batches of 2", 2, &accum_plain)] {
            let ranks = train_ring_overlapped(2, micro, Some(bucket));
            for (r, (params, stats, started)) in ranks.iter().enumerate() {
                assert!(bitwise_eq(params, &reference[r].0), "bucket {bucket}, {name}: rank {r}'s weights differ from the plain ring's");
                for (a, b) in stats.iter().zip(&reference[r].1) {
                    assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "bucket {bucket}, {name}: same loss");
                    assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits(), "bucket {bucket}, {name}: same gradient norm");
                }
                // one loss all-reduce per step, then the gradient buckets
                let buckets = started - STEPS;
                assert!(buckets >= min_per_step * STEPS, "bucket {bucket}, {name}: rank {r} started {buckets} gradient buckets in {STEPS} steps");
                println!("bucket {bucket}, {name}: rank {r}: {} gradient buckets per step, weights bitwise equal", buckets / STEPS);
            }
        }
    }
}

/// A peer that leaves while buckets are in flight makes the step fail with an error naming
/// the collective, instead of hanging, and the ring thread is joined cleanly afterwards.
#[test]
fn a_vanished_peer_fails_an_overlapped_step() {
    let listeners: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let mut listeners = listeners.into_iter();
    let (l0, l1) = (listeners.next().unwrap(), listeners.next().unwrap());
    let a1 = addrs.clone();
    let peer = thread::spawn(move || {
        let ring = TcpRing::connect(1, &a1, l1, Duration::from_secs(30)).unwrap();
        drop(ring); // joins, then vanishes before the first step
    });
    let ring = TcpRing::connect(0, &addrs, l0, Duration::from_secs(30)).unwrap();
    peer.join().unwrap();
    let mut ring = BackgroundRing::new(ring);
    let toks = tokens();
    let seqs = Sequences::new(&toks, SEQ);
    let (inputs, targets) = seqs.batch(0..4);
    let batch = Batch { inputs, targets, batch: 4, seq_len: SEQ };
    let mut trainer = Trainer::new(Gpt::new(CpuBackend, model_config(), 7).unwrap(), train_config()).unwrap();
    trainer.set_bucket_floats(2_000);
    let e = trainer.train_step_batches(&[batch], &mut ring).unwrap_err();
    // the collective's own error is the source: the message says only where it failed
    let err = format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
    assert!(err.starts_with("collective: ") && err.matches("collective:").count() == 1, "{err}");
    assert!(err.contains("rank 1") || err.contains("closed") || err.contains("broken"), "{err}");
    assert_eq!(trainer.step(), 0, "no optimizer step after a failed exchange");
    drop(ring);
}

/// An evaluation asks for at most the batches that cover the validation tokens once: an
/// eval_batches of usize::MAX gives the loss of those batches (it looped for ever).
#[test]
fn evaluation_batches_stop_at_the_validation_windows() {
    let val = tokens();
    let windows = TokenWindows::new(&val).starts(SEQ);
    let loss_with = |eval_batches: usize| {
        let cfg = TrainConfig { batch_size: 4, eval_batches, ..train_config() };
        let mut trainer = Trainer::new(Gpt::new(CpuBackend, model_config(), 7).unwrap(), cfg).unwrap();
        trainer.evaluate(&TokenWindows::new(&val)).unwrap()
    };
    let cover = windows.div_ceil(SEQ).div_ceil(4);
    assert!(cover > 2, "{cover}");
    assert_eq!(smelt_engine::train::eval_batches_over(usize::MAX, windows, 4, SEQ), cover);
    assert_eq!(smelt_engine::train::eval_batches_over(2, windows, 4, SEQ), 2);
    assert_eq!(loss_with(usize::MAX).to_bits(), loss_with(cover).to_bits());
    assert_ne!(loss_with(1).to_bits(), loss_with(cover).to_bits());
}
