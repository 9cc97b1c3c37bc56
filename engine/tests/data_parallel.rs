//! Data-parallel training in one process: the same global batches of 8 sequences trained on one
//! rank (micro-batch 8), on two ranks joined by a TCP ring (micro-batch 4 each), and on two
//! ranks with two accumulated micro-batches of 2 each. Every rank of a run ends with bitwise
//! identical weights, and the runs agree with the single-rank run within float tolerance.

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use smelt_corpus::{rank_slice, SampleOrder, Sequences};
use smelt_engine::collective::{Collective, Local, TcpRing};
use smelt_engine::data::Batch;
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
    GptConfig { vocab_size: 50, block_size: SEQ, n_layer: 2, n_head: 2, n_embd: 32, ln_placement: LayerNormPlacement::Pre }
}

fn train_config() -> TrainConfig {
    TrainConfig {
        batch_size: 1, // unused by train_step_batches
        seq_len: SEQ,
        grad_accum: 1,
        steps: STEPS,
        schedule: LrSchedule { max_lr: 3e-3, min_lr: 3e-4, warmup_steps: 2, decay_steps: STEPS },
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
    let toks = tokens();
    let seqs = Sequences::new(&toks, SEQ);
    assert_eq!(seqs.count(), N_SEQUENCES as u64);
    let order = SampleOrder::new(seqs.count(), DATA_SEED);
    let model = Gpt::new(CpuBackend, model_config(), 7).unwrap();
    let mut trainer = Trainer::new(model, train_config()).unwrap();
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
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            thread::spawn(move || {
                let mut ring = TcpRing::connect(rank, &addrs, l, Duration::from_secs(30)).unwrap();
                train_rank(rank, world, micro, &mut ring)
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
