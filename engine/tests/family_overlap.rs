//! `Bert::backward_overlapped` and `T5::backward_overlapped`, the ground for averaging gradient
//! buckets while the backward pass runs: every value of the flat gradient is reported in
//! exactly one range, a range is reported only once nothing later in the pass writes it (its
//! values when reported are the final gradient's, bit for bit), the layers are reported before
//! the pass ends (so there is something to overlap), and the gradient is the plain
//! `backward`'s. BERT pre-training (MLM + next sentence, padded, dropout on), classification,
//! and T5 span corruption, pre- and post-LN, with dot and learned attention scores.

use std::ops::Range;

use smelt_engine::backend::{Backend, ScoreKind, IGNORE_INDEX};
use smelt_engine::model::objectives::{corrupt_spans, SpanCorruptionConfig};
use smelt_engine::model::gpt::ReadyFn;
use smelt_engine::model::{Bert, BertBatch, BertConfig, LayerNormPlacement, T5Batch, T5Config, T5};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

/// What a run of `backward_overlapped` reported: each range with its values at that moment,
/// in order, and the final gradient.
struct Reports {
    ranges: Vec<(Range<usize>, Vec<f32>)>,
    grads: Vec<f32>,
}

/// Checks the contract against the plain backward's gradient `plain`.
fn check(what: &str, r: &Reports, plain: &[f32]) {
    let n = r.grads.len();
    assert!(r.grads.iter().zip(plain).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: the gradient differs from backward()'s");
    let mut seen = vec![0u8; n];
    for (range, values) in &r.ranges {
        assert!(!range.is_empty(), "{what}: an empty range was reported");
        for i in range.clone() {
            seen[i] += 1;
        }
        let fin = &r.grads[range.clone()];
        let same = values.iter().zip(fin).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: range {range:?} was reported before its last write");
    }
    assert!(seen.iter().all(|&k| k == 1), "{what}: {} values reported other than once", seen.iter().filter(|&&k| k != 1).count());
    // the layers come first, the rest last: more than one report, and the first before the end
    assert!(r.ranges.len() > 2, "{what}: {} reports: nothing to overlap", r.ranges.len());
}

/// The ranges `run` reports through its ready callback, each with its values at that moment.
fn reports<B: Backend>(run: impl FnOnce(&mut ReadyFn<'_, B>)) -> Vec<(Range<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    run(&mut |be: &B, g: &mut B::Buf, r: Range<usize>| out.push((r.clone(), be.download(be.view(g, r)))));
    out
}

fn bert_cfg(placement: LayerNormPlacement, scores: ScoreKind) -> BertConfig {
    let mut cfg = BertConfig::preset("bert-test").unwrap();
    cfg.vocab_size = 60;
    cfg.ln_placement = placement;
    cfg.scores = scores;
    cfg.additive_width = 6;
    cfg
}

fn bert_batch(cfg: &BertConfig, classify: bool) -> BertBatch {
    let (b, t) = (3, 12);
    let lens = vec![12u32, 7, 3];
    let mut rng = Rng::new(5);
    let mut x = BertBatch::new(Vec::new(), b, t);
    let (mut segments, mut mlm) = (Vec::new(), Vec::new());
    for &len in &lens {
        for i in 0..t {
            let real = i < len as usize;
            x.tokens.push(if real { 1 + rng.below(cfg.vocab_size as u64 - 1) as u32 } else { 0 });
            segments.push((real && i >= len as usize / 2) as u32);
            mlm.push(if real && rng.below(100) < 30 { rng.below(cfg.vocab_size as u64) as u32 } else { IGNORE_INDEX });
        }
    }
    x.lens = Some(lens);
    x.segments = Some(segments);
    if classify {
        x.labels = Some(vec![1, 0, 2]);
    } else {
        x.mlm_targets = Some(mlm);
        x.nsp_labels = Some(vec![0, 1, 1]);
        x.train = true;
        x.dropout_seed = 9;
    }
    x
}

fn bert_case(what: &str, mut cfg: BertConfig, classify: bool) {
    if classify {
        cfg.nsp = false;
        cfg.num_labels = 3;
    } else {
        cfg.dropout = 0.1;
    }
    let x = bert_batch(&cfg, classify);
    let forwarded = || {
        let mut m = Bert::new(CpuBackend::new(), cfg.clone(), 3).unwrap();
        m.forward(&x).unwrap().expect("targets");
        m
    };
    let mut plain = forwarded();
    plain.backward(0.5).unwrap();
    let mut m = forwarded();
    let ranges = reports(|f| m.backward_overlapped(0.5, f).unwrap());
    check(what, &Reports { ranges, grads: m.grads_host() }, &plain.grads_host());
}

#[test]
fn bert_reports_each_gradient_range_once_and_only_when_final() {
    for placement in [LayerNormPlacement::Post, LayerNormPlacement::Pre] {
        for scores in [ScoreKind::Dot, ScoreKind::General, ScoreKind::Additive] {
            let what = format!("bert pretraining {placement:?} {scores:?}");
            bert_case(&what, bert_cfg(placement, scores), false);
        }
    }
    bert_case("bert classification", bert_cfg(LayerNormPlacement::Post, ScoreKind::Dot), true);
}

fn t5_case(what: &str, placement: LayerNormPlacement, scores: ScoreKind) {
    let mut cfg = T5Config::preset("t5-test").unwrap();
    cfg.vocab_size = 70;
    cfg.ln_placement = placement;
    cfg.scores = scores;
    cfg.additive_width = 5;
    let mut rng = Rng::new(8);
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = [(20usize, 0.15), (9, 0.3)]
        .iter()
        .map(|&(len, density)| {
            let text: Vec<u32> = (0..len).map(|_| 1 + rng.below(60) as u32).collect();
            let sc = SpanCorruptionConfig { vocab_size: 70, noise_density: density, mean_span: 2.0, sentinels: 8 };
            let c = corrupt_spans(&text, &sc, &mut rng).unwrap();
            (c.inputs, c.targets)
        })
        .collect();
    let x = T5Batch::from_pairs(&pairs, 0, 0);
    let forwarded = || {
        let mut m = T5::new(CpuBackend::new(), cfg.clone(), 4).unwrap();
        m.forward(&x).unwrap().expect("targets");
        m
    };
    let mut plain = forwarded();
    plain.backward(0.5).unwrap();
    let mut m = forwarded();
    let ranges = reports(|f| m.backward_overlapped(0.5, f).unwrap());
    check(what, &Reports { ranges, grads: m.grads_host() }, &plain.grads_host());
}

#[test]
fn t5_reports_each_gradient_range_once_and_only_when_final() {
    for placement in [LayerNormPlacement::Pre, LayerNormPlacement::Post] {
        for scores in [ScoreKind::Dot, ScoreKind::General, ScoreKind::Additive] {
            t5_case(&format!("t5 {placement:?} {scores:?}"), placement, scores);
        }
    }
}
