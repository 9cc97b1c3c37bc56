//! Dropout: the op's statistics and contract (kept fraction within a binomial bound, p = 0 is the
//! identity, p outside [0, 1) refused, the mask a pure function of (seed, counter)), and BERT's
//! use of it (training batches only, replayable from the seed, two dropout views of one input
//! differ, the model's gradient through every dropout site matches finite differences, and with
//! dropout off everything is bit-identical to a model without it).
//! (The op's gradient check on every backend is in op_gradcheck.rs.)

use smelt_engine::backend::{Backend, Dropout};
use smelt_engine::cpu::dropout::check_probability;
use smelt_engine::model::{Bert, BertBatch, BertConfig, LayerNormPlacement};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn dropout(x: &[f32], mask: Dropout) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len()];
    CpuBackend::new().dropout_forward(&mut out, x, mask);
    out
}

fn panic_message(f: impl FnOnce()) -> String {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let e = r.err().expect("the call must panic");
    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

// ---- the op -----------------------------------------------------------------------------------

#[test]
fn kept_fraction_is_one_minus_p_within_six_sigma() {
    let n = 1usize << 20;
    let ones = vec![1.0f32; n];
    for (p, seed) in [(0.1f32, 1u64), (0.5, 2), (0.9, 3)] {
        let out = dropout(&ones, Dropout { p, seed, offset: 0 });
        let scale = 1.0 / (1.0 - p);
        assert!(out.iter().all(|&y| y == 0.0 || y == scale), "p = {p}: kept values are 1 / (1 - p) = {scale}, dropped ones 0");
        let kept = out.iter().filter(|&&y| y != 0.0).count() as f64;
        // Binomial(n, 1 - p): mean n (1 - p), std sqrt(n p (1 - p))
        let (mean, std) = (n as f64 * (1.0 - p as f64), (n as f64 * p as f64 * (1.0 - p as f64)).sqrt());
        assert!((kept - mean).abs() <= 6.0 * std, "p = {p}: kept {kept} of {n}, expected {mean} +- 6 x {std:.1}");
        // the mean of the output stays the input's (inverted dropout)
        let m = out.iter().map(|&y| y as f64).sum::<f64>() / n as f64;
        assert!((m - 1.0).abs() <= 6.0 * std / (n as f64 * (1.0 - p as f64)), "p = {p}: output mean {m}");
    }
}

#[test]
fn p_zero_is_the_identity_bit_for_bit() {
    let mut rng = Rng::new(5);
    let mut x = randn(&mut rng, 50_000);
    x.extend([0.0, -0.0, f32::MAX, f32::MIN_POSITIVE, 1e-40, f32::INFINITY]);
    let mask = Dropout { p: 0.0, seed: 9, offset: 3 };
    let out = dropout(&x, mask);
    assert!(out.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()), "p = 0 changed a value");
    let be = CpuBackend::new();
    let mut dinp = vec![0.5f32; x.len() - 6];
    let dout = randn(&mut rng, dinp.len());
    be.dropout_backward(&mut dinp, &dout, mask);
    assert!(dinp.iter().zip(&dout).all(|(g, d)| g.to_bits() == (0.5 + d).to_bits()), "p = 0 backward is dinp += dout");
}

#[test]
fn probabilities_outside_zero_one_are_refused() {
    for p in [1.0f32, 1.5, -0.1, f32::NAN, f32::INFINITY] {
        let e = check_probability(p).expect_err("an invalid probability");
        assert_eq!(e.field, "dropout");
        assert!(e.message.contains("[0, 1)"), "{e}");
        let msg = panic_message(|| {
            dropout(&[1.0; 4], Dropout { p, seed: 0, offset: 0 });
        });
        assert!(msg.contains("dropout") && msg.contains("outside [0, 1)"), "p = {p}: unclear panic {msg:?}");
        let msg = panic_message(|| CpuBackend::new().dropout_backward(&mut [0.0; 4], &[1.0; 4], Dropout { p, seed: 0, offset: 0 }));
        assert!(msg.contains("outside [0, 1)"), "backward, p = {p}: unclear panic {msg:?}");
    }
    for p in [0.0f32, 0.5, 0.999_999_94] {
        check_probability(p).unwrap_or_else(|e| panic!("p = {p} is valid: {e}"));
    }
}

#[test]
fn the_mask_is_a_function_of_seed_and_counter() {
    let n = 40_000; // several of the CPU's parallel chunks
    let ones = vec![1.0f32; n];
    let m = Dropout { p: 0.5, seed: 11, offset: 0 };
    let a = dropout(&ones, m);
    assert_eq!(a, dropout(&ones, m), "the same seed and offset draw the same mask");
    // another seed: about half of the decisions change (2 p (1 - p) of them)
    let b = dropout(&ones, Dropout { seed: 12, ..m });
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count() as f64;
    let std = (n as f64 * 0.25).sqrt();
    assert!((differ - n as f64 * 0.5).abs() <= 6.0 * std, "seeds 11 and 12 differ in {differ} of {n} decisions");
    // a window at offset k is the same counters as elements k.. of the whole call
    for k in [1usize, 16_383, 20_000] {
        let w = dropout(&ones[k..], Dropout { offset: k as u64, ..m });
        assert_eq!(w, a[k..], "window at offset {k}");
    }
    assert_ne!(dropout(&ones[..1000], Dropout { offset: 1000, ..m }), a[..1000], "another offset, another mask");
}

// ---- BERT -------------------------------------------------------------------------------------

fn cfg(dropout: f32, placement: LayerNormPlacement) -> BertConfig {
    let mut c = BertConfig::preset("bert-test").unwrap();
    c.nsp = false;
    c.dropout = dropout;
    c.ln_placement = placement;
    c
}

/// A paired batch of `pairs` random sequences of length 8, row i + pairs repeating row i, with
/// MLM targets on every third position.
fn batch(pairs: usize, seed: u64) -> BertBatch {
    let (t, mut rng) = (8, Rng::new(seed));
    let half: Vec<u32> = (0..pairs * t).map(|_| 4 + rng.below(60) as u32).collect();
    let mut x = BertBatch::new([half.clone(), half].concat(), 2 * pairs, t);
    x.mlm_targets = Some((0..2 * pairs * t).map(|i| if i % 3 == 0 { 4 + (i as u32 * 7) % 60 } else { u32::MAX }).collect());
    x.paired = true;
    x
}

fn training(mut x: BertBatch, seed: u64) -> BertBatch {
    x.train = true;
    x.dropout_seed = seed;
    x
}

#[test]
fn bert_with_dropout_off_is_bit_identical_to_a_model_without_it() {
    for placement in [LayerNormPlacement::Post, LayerNormPlacement::Pre] {
        let mut plain = Bert::new(CpuBackend::new(), cfg(0.0, placement), 4).unwrap();
        let mut dropped = Bert::new(CpuBackend::new(), cfg(0.3, placement), 4).unwrap();
        let x = batch(3, 1);
        let run = |m: &mut Bert<CpuBackend>, x: &BertBatch| {
            m.zero_grad();
            let loss = m.forward(x).unwrap().unwrap();
            m.backward(1.0).unwrap();
            (loss.to_bits(), m.logits(), m.embeddings(), m.grads_host())
        };
        let want = run(&mut plain, &x);
        // an evaluation batch through a model with dropout, a training batch through one with p = 0
        assert!(run(&mut dropped, &x) == want, "{placement:?}: evaluation with dropout = 0.3 differs");
        assert!(run(&mut plain, &training(x.clone(), 7)) == want, "{placement:?}: training with dropout = 0 differs");
        assert!(run(&mut dropped, &training(x.clone(), 7)) != want, "{placement:?}: training with dropout = 0.3 changed nothing");
    }
}

#[test]
fn bert_training_passes_replay_from_their_seed() {
    let mut m = Bert::new(CpuBackend::new(), cfg(0.1, LayerNormPlacement::Post), 4).unwrap();
    let x = batch(3, 2);
    let a = m.forward(&training(x.clone(), 5)).unwrap().unwrap();
    let a2 = m.forward(&training(x.clone(), 5)).unwrap().unwrap();
    let b = m.forward(&training(x.clone(), 6)).unwrap().unwrap();
    assert_eq!(a.to_bits(), a2.to_bits(), "the same seed replays the same pass");
    assert_ne!(a, b, "another seed, other masks");
}

#[test]
fn two_dropout_views_of_one_input_differ_and_coincide_in_evaluation() {
    let (pairs, c) = (3, 32);
    let mut m = Bert::new(CpuBackend::new(), cfg(0.1, LayerNormPlacement::Post), 4).unwrap();
    let mut x = batch(pairs, 3);
    x.mlm_targets = None;
    let dist = |z: &[f32], i: usize| -> f32 { (0..c).map(|j| (z[i * c + j] - z[(i + pairs) * c + j]).powi(2)).sum::<f32>().sqrt() };

    let eval_loss = m.forward(&x).unwrap().unwrap();
    let z = m.embeddings();
    for i in 0..pairs {
        assert_eq!(z[i * c..(i + 1) * c], z[(i + pairs) * c..(i + pairs + 1) * c], "evaluation: rows {i} and {} are one input", i + pairs);
    }
    m.forward(&training(x.clone(), 9)).unwrap();
    let z = m.embeddings();
    for i in 0..pairs {
        let norm = (0..c).map(|j| z[i * c + j].powi(2)).sum::<f32>().sqrt();
        assert!(dist(&z, i) > 1e-3 * norm, "training: rows {i} and {} are two views, yet equal", i + pairs);
    }
    // identical views make the easiest case: its accuracy is perfect
    m.forward(&x).unwrap();
    assert_eq!(m.losses().contrastive_accuracy, Some(1.0), "evaluation loss {eval_loss}");
}

#[test]
fn bert_gradient_through_every_dropout_site_matches_finite_differences() {
    // The loss of a training pass is a deterministic function of the parameters (fixed seed):
    // its gradient must match central differences, which it cannot unless the backward drops
    // exactly what the forward dropped at every site.
    for placement in [LayerNormPlacement::Post, LayerNormPlacement::Pre] {
        let mut m = Bert::new(CpuBackend::new(), cfg(0.25, placement), 6).unwrap();
        let x = training(batch(2, 4), 13);
        m.zero_grad();
        m.forward(&x).unwrap();
        m.backward(1.0).unwrap();
        let grads = m.grads_host();
        let params = m.params_host();
        let specs = m.table().specs().to_vec();
        let h = 1e-2f32;
        for spec in specs {
            // the entry with the largest gradient of each tensor, where a wrong mask shows most
            let r = spec.range();
            let i = r.clone().max_by(|&a, &b| grads[a].abs().total_cmp(&grads[b].abs())).unwrap();
            let mut loss_at = |v: f32| {
                let mut p = params.clone();
                p[i] = v;
                m.set_params_host(&p);
                m.forward(&x).unwrap().unwrap() as f64
            };
            let numeric = (loss_at(params[i] + h) - loss_at(params[i] - h)) / (2.0 * h as f64);
            let analytic = grads[i] as f64;
            assert!(
                (analytic - numeric).abs() <= 3e-2 * analytic.abs().max(numeric.abs()) + 2e-4,
                "{placement:?} {}[{}]: analytic {analytic:e} vs numeric {numeric:e}",
                spec.name,
                i - r.start
            );
        }
        m.set_params_host(&params);
    }
}
