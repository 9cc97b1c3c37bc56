//! GPT as a whole: backward against finite differences of the loss for every tensor, gradient
//! accumulation, batch errors, bitwise determinism across thread counts, a loss that falls on a
//! small text, the learning-rate schedule and config validation.

use smelt_engine::backend::IGNORE_INDEX;
use smelt_engine::data::TokenWindows;
use smelt_engine::model::{Gpt, GptConfig, LayerNormPlacement};
use smelt_engine::optim::{AdamWConfig, LrDecay, LrSchedule};
use smelt_engine::rng::Rng;
use smelt_engine::train::{TrainConfig, Trainer};
use smelt_engine::{CpuBackend, EngineError};

fn tiny(ln_placement: LayerNormPlacement) -> GptConfig {
    GptConfig { vocab_size: 11, block_size: 8, n_layer: 2, n_head: 2, n_embd: 8, ln_placement, positions: Default::default() }
}

/// A tiny model moved away from its init (std 0.02 weights, unit gains, zero biases) so that
/// every path carries a real gradient: attention is not uniform, biases and gains matter.
fn perturbed_model(cfg: &GptConfig, seed: u64) -> Gpt<CpuBackend> {
    let mut model = Gpt::new(CpuBackend::new(), cfg.clone(), seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut params = model.params_host();
    // the tensors only: the LM head's padding after wte stays zero
    for s in model.table().specs() {
        params[s.range()].iter_mut().for_each(|x| *x += 0.2 * rng.normal() as f32);
    }
    model.set_params_host(&params);
    model
}

fn random_ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
}

/// Mean cross-entropy over the targets that count, from the model's f32 logits, in f64.
fn loss_f64(logits: &[f32], targets: &[u32], vocab: usize) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (row, &t) in logits.chunks(vocab).zip(targets) {
        if t == IGNORE_INDEX {
            continue;
        }
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        sum += lse - row[t as usize] as f64;
        n += 1;
    }
    sum / n.max(1) as f64
}

// ---- whole-model gradient check ---------------------------------------------------------------

/// Entries checked per tensor (besides its largest-gradient entry).
const SAMPLES: usize = 24;
const STEP: f32 = 1e-2;
/// Allowed error relative to the tensor's largest gradient entry (f32 forward, step 1e-2).
const TOL: f64 = 2e-2;
/// Absolute floor under that scale, for a tensor whose gradient were ~0 everywhere.
const FLOOR: f64 = 1e-3;

fn model_gradcheck(placement: LayerNormPlacement, ignore: &[usize], seed: u64) {
    let cfg = tiny(placement);
    let v = cfg.vocab_size;
    let mut model = perturbed_model(&cfg, seed);
    let (b, t) = (2, 5);
    let mut rng = Rng::new(seed + 1);
    let tokens = random_ids(&mut rng, b * t, v);
    let mut targets = random_ids(&mut rng, b * t, v);
    for &i in ignore {
        targets[i] = IGNORE_INDEX;
    }

    let loss = model.forward(&tokens, Some(&targets), b, t).unwrap().unwrap();
    let want = loss_f64(&model.logits(), &targets, v);
    assert!((loss as f64 - want).abs() < 1e-5 * want, "forward loss {loss} vs mean over counted targets {want}");
    model.zero_grad();
    model.backward(1.0).unwrap();
    let grads = model.grads_host();

    let base = model.params_host();
    let specs = model.table().specs().to_vec();
    let mut params = base.clone();
    let objective = |p: &[f32], model: &mut Gpt<CpuBackend>| {
        model.set_params_host(p);
        model.forward(&tokens, Some(&targets), b, t).unwrap();
        loss_f64(&model.logits(), &targets, v)
    };
    for spec in &specs {
        let r = spec.range();
        let g = &grads[r.clone()];
        let n = g.len();
        // the largest entry, then random ones (all of them for small tensors)
        let argmax = (0..n).fold(0, |m, i| if g[i].abs() > g[m].abs() { i } else { m });
        let mut idx = vec![argmax];
        if n <= SAMPLES {
            idx.extend(0..n);
        } else {
            idx.extend((0..SAMPLES).map(|_| rng.below(n as u64) as usize));
        }
        let scale = (g.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64).max(FLOOR);
        for &i in &idx {
            let at = r.start + i;
            let x0 = base[at];
            let (xp, xm) = (x0 + STEP, x0 - STEP);
            params[at] = xp;
            let lp = objective(&params, &mut model);
            params[at] = xm;
            let lm = objective(&params, &mut model);
            params[at] = x0;
            let numeric = (lp - lm) / (xp as f64 - xm as f64);
            let err = (g[i] as f64 - numeric).abs();
            assert!(
                err <= TOL * scale,
                "{placement:?}, ignoring {ignore:?}: d loss / d {}[{i}]: backward {} vs central difference {numeric} \
                 (error {:.2e} of the tensor's largest gradient {scale:.2e})",
                spec.name,
                g[i],
                err / scale
            );
        }
    }
    // positions past T never enter the forward pass: their rows of wpe get exactly nothing
    let wpe = model.table().range(model.table().id("transformer.wpe.weight").unwrap());
    let c = cfg.n_embd;
    assert!(grads[wpe.start + t * c..wpe.end].iter().all(|&x| x == 0.0), "gradient on unused positions");
}

#[test]
fn gradcheck_pre_ln() {
    model_gradcheck(LayerNormPlacement::Pre, &[], 1);
}

#[test]
fn gradcheck_post_ln() {
    model_gradcheck(LayerNormPlacement::Post, &[], 2);
}

#[test]
fn gradcheck_with_ignored_targets() {
    // several positions of one sequence and one of the other, then the reverse
    model_gradcheck(LayerNormPlacement::Pre, &[0, 1, 4, 7], 3);
    model_gradcheck(LayerNormPlacement::Post, &[2, 5, 6, 9], 4);
}

/// A batch whose every target is ignored has loss 0 and adds nothing to the gradient (rather
/// than dividing by zero).
#[test]
fn all_ignored_targets_give_zero_loss_and_gradient() {
    let cfg = tiny(LayerNormPlacement::Post);
    let mut model = perturbed_model(&cfg, 5);
    let mut rng = Rng::new(6);
    let (b, t) = (2, 5);
    let tokens = random_ids(&mut rng, b * t, cfg.vocab_size);
    let all_ignored = vec![IGNORE_INDEX; b * t];
    let loss = model.forward(&tokens, Some(&all_ignored), b, t).unwrap().unwrap();
    assert_eq!(loss, 0.0, "a batch with every target ignored has loss 0");
    model.zero_grad();
    model.backward(1.0).unwrap();
    let g = model.grads_host();
    assert!(g.iter().all(|&x| x == 0.0), "a batch with every target ignored has gradient 0");
}

// ---- gradient accumulation --------------------------------------------------------------------

#[test]
fn two_half_batches_accumulate_to_the_full_batch() {
    for placement in [LayerNormPlacement::Pre, LayerNormPlacement::Post] {
        let cfg = tiny(placement);
        let mut model = perturbed_model(&cfg, 10);
        let mut rng = Rng::new(11);
        let t = 5;
        let tokens = random_ids(&mut rng, 4 * t, cfg.vocab_size);
        let targets = random_ids(&mut rng, 4 * t, cfg.vocab_size);
        let half = 2 * t;

        model.zero_grad();
        let la = model.forward(&tokens[..half], Some(&targets[..half]), 2, t).unwrap().unwrap();
        model.backward(0.5).unwrap();
        let lb = model.forward(&tokens[half..], Some(&targets[half..]), 2, t).unwrap().unwrap();
        model.backward(0.5).unwrap();
        let micro = model.grads_host();

        model.zero_grad();
        let full_loss = model.forward(&tokens, Some(&targets), 4, t).unwrap().unwrap();
        model.backward(1.0).unwrap();
        let full = model.grads_host();

        assert!(((la + lb) / 2.0 - full_loss).abs() < 1e-6, "{placement:?}: losses {la}, {lb} vs {full_loss}");
        for spec in model.table().specs() {
            let (m, f) = (&micro[spec.range()], &full[spec.range()]);
            let scale = f.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            let err = m.iter().zip(f).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err <= 1e-5 * scale, "{placement:?}: {}: accumulated micro-batches off by {err:e} (largest entry {scale:e})", spec.name);
        }
        // and zero_grad really starts over
        model.zero_grad();
        assert!(model.grads_host().iter().all(|&x| x == 0.0));
    }
}

// ---- errors -----------------------------------------------------------------------------------

fn batch_error(r: Result<Option<f32>, EngineError>) -> String {
    match r {
        Err(EngineError::Batch(msg)) => msg,
        other => panic!("expected EngineError::Batch, got {other:?}"),
    }
}

#[test]
fn bad_batches_are_errors_that_name_the_problem() {
    let cfg = tiny(LayerNormPlacement::Pre);
    let mut model = Gpt::new(CpuBackend::new(), cfg, 1).unwrap();

    // backward with nothing loaded
    match model.backward(1.0) {
        Err(EngineError::Batch(msg)) => assert!(msg.contains("before forward"), "{msg}"),
        other => panic!("backward before forward: expected an error, got {other:?}"),
    }

    let ok: Vec<u32> = (0..10).map(|i| i % 11).collect();
    let msg = batch_error(model.forward(&[0, 1, 11, 2, 3, 4, 5, 6, 7, 8], None, 2, 5));
    assert!(msg.contains("token id 11") && msg.contains("vocabulary"), "{msg}");
    let msg = batch_error(model.forward(&[0; 18], None, 2, 9));
    assert!(msg.contains("sequence length 9") && msg.contains("block_size 8"), "{msg}");
    let msg = batch_error(model.forward(&ok[..9], None, 2, 5));
    assert!(msg.contains("9 tokens") && msg.contains("2 x 5"), "{msg}");
    let msg = batch_error(model.forward(&[], None, 0, 5));
    assert!(msg.contains("empty"), "{msg}");
    let msg = batch_error(model.forward(&ok, Some(&[3, 4, 5, 6, 7, 8, 9, 10, 0, 99]), 2, 5));
    assert!(msg.contains("target id 99") && msg.contains("vocabulary"), "{msg}");
    let msg = batch_error(model.forward(&ok, Some(&ok[..7]), 2, 5));
    assert!(msg.contains("7 targets"), "{msg}");
    // the Display form keeps the message
    let e = model.forward(&ok[..3], None, 2, 5).unwrap_err();
    assert!(e.to_string().contains("3 tokens"), "{e}");

    // the model still works after refusing batches; without targets there is no loss and no
    // backward
    assert_eq!(model.forward(&ok, None, 2, 5).unwrap(), None);
    assert_eq!(model.logits().len(), 10 * 11);
    match model.backward(1.0) {
        Err(EngineError::Batch(msg)) => assert!(msg.contains("targets"), "{msg}"),
        other => panic!("backward without targets: expected an error, got {other:?}"),
    }
    let loss = model.forward(&ok, Some(&ok), 2, 5).unwrap().unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    model.backward(1.0).unwrap();

    // a parameter buffer of the wrong size
    let cfg = tiny(LayerNormPlacement::Pre);
    match Gpt::from_params(CpuBackend::new(), cfg, &[0.0; 5]) {
        Err(EngineError::Batch(msg)) => assert!(msg.contains("5 values"), "{msg}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a 5-value parameter buffer was accepted"),
    }
}

// ---- batch shapes ---------------------------------------------------------------------------

/// One model fed batches of changing shape (activation buffers are reused and grown) gives
/// bitwise the same loss, logits and gradients as a fresh model per shape. In particular a batch
/// with fewer rows but longer sequences (1 x 8 after 4 x 2) needs more attention state than the
/// rows suggest: this used to panic with an out-of-range slice.
#[test]
fn batch_shapes_can_change_between_calls() {
    let cfg = tiny(LayerNormPlacement::Pre);
    let mut rng = Rng::new(31);
    let mut reused = perturbed_model(&cfg, 30);
    let params = reused.params_host();
    for (b, t) in [(4, 2), (1, 8), (2, 3), (4, 2), (1, 1), (3, 8)] {
        let tokens = random_ids(&mut rng, b * t, cfg.vocab_size);
        let targets = random_ids(&mut rng, b * t, cfg.vocab_size);
        let mut fresh = Gpt::from_params(CpuBackend::new(), cfg.clone(), &params).unwrap();
        let want = fresh.forward(&tokens, Some(&targets), b, t).unwrap().unwrap();
        fresh.backward(1.0).unwrap();
        let got = reused.forward(&tokens, Some(&targets), b, t).unwrap().unwrap();
        reused.zero_grad();
        reused.backward(1.0).unwrap();
        assert_eq!(got.to_bits(), want.to_bits(), "{b} x {t}: loss {got} vs fresh model {want}");
        assert_eq!(reused.logits(), fresh.logits(), "{b} x {t}: logits");
        assert_eq!(reused.grads_host(), fresh.grads_host(), "{b} x {t}: gradients");
    }
}

// ---- determinism across thread counts ---------------------------------------------------------

/// Three train steps of a model large enough that gemm splits its work over threads (its
/// threshold is 48*48*256 multiply-adds; the qkv matmul here is 256x128x384).
fn three_steps() -> (Vec<f32>, Vec<u32>) {
    let cfg = GptConfig { vocab_size: 300, block_size: 64, n_layer: 2, n_head: 4, n_embd: 128, ln_placement: LayerNormPlacement::Pre, positions: Default::default() };
    let model = Gpt::new(CpuBackend::new(), cfg, 42).unwrap();
    let tc = TrainConfig {
        batch_size: 4,
        seq_len: 64,
        grad_accum: 1,
        steps: 3,
        schedule: LrSchedule::cosine(1e-3, 1e-4, 1, 3),
        optim: AdamWConfig::default(),
        eval_interval: 0,
        eval_batches: 1,
        seed: 3,
    };
    let mut trainer = Trainer::new(model, tc).unwrap();
    let mut rng = Rng::new(9);
    let stream = random_ids(&mut rng, 4096, 300);
    let data = TokenWindows::new(&stream);
    let mut bits = Vec::new();
    for _ in 0..3 {
        let s = trainer.train_step(&data).unwrap();
        assert!(s.loss.is_finite());
        bits.extend([s.loss.to_bits(), s.grad_norm.to_bits()]);
    }
    (trainer.model.params_host(), bits)
}

#[test]
fn training_is_bitwise_identical_across_thread_counts() {
    let run = |n: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        pool.install(|| {
            assert_eq!(rayon::current_num_threads(), n);
            three_steps()
        })
    };
    let (p1, s1) = run(1);
    let init = Gpt::new(CpuBackend::new(), GptConfig { vocab_size: 300, block_size: 64, n_layer: 2, n_head: 4, n_embd: 128, ln_placement: LayerNormPlacement::Pre, positions: Default::default() }, 42)
        .unwrap()
        .params_host();
    assert!(p1.iter().zip(&init).filter(|(a, b)| a != b).count() > p1.len() / 2, "training did not move the parameters");
    let bits = |p: &[f32]| p.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let b1 = bits(&p1);
    for (n, (p, s)) in [(2, run(2)), (3, run(3)), (3, run(3))] {
        assert_eq!(s, s1, "{n} threads: step losses / gradient norms differ from 1 thread");
        let differing = bits(&p).iter().zip(&b1).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{n} threads: {differing} of {} parameters differ bitwise from 1 thread", p.len());
    }
}

// ---- data windows -----------------------------------------------------------------------------

#[test]
fn token_windows_shift_targets_by_one() {
    let stream: Vec<u32> = (0..100).collect();
    let data = TokenWindows::new(&stream);
    let t = 10;
    assert_eq!(data.starts(t), 90);
    assert_eq!(TokenWindows::new(&stream[..11]).starts(10), 1);
    assert_eq!(TokenWindows::new(&stream[..10]).starts(10), 0);
    let mut rng = Rng::new(1);
    for _ in 0..50 {
        let b = data.random_batch(&mut rng, 3, t);
        assert_eq!((b.batch, b.seq_len, b.inputs.len(), b.targets.len()), (3, t, 30, 30));
        for (inp, tgt) in b.inputs.chunks(t).zip(b.targets.chunks(t)) {
            // consecutive tokens, targets one ahead, the last target inside the stream
            assert!(inp.windows(2).all(|w| w[1] == w[0] + 1), "{inp:?}");
            assert!(inp.iter().zip(tgt).all(|(&i, &g)| g == i + 1), "{inp:?} {tgt:?}");
            assert!(tgt[t - 1] < 100);
        }
    }
    // evaluation windows: fixed, spread from the start to the end of the stream
    let n = 4;
    let first = data.eval_batch(0, n, 2, t);
    assert_eq!(first, data.eval_batch(0, n, 2, t));
    assert_eq!(first.inputs[0], 0);
    let last = data.eval_batch(n - 1, n, 2, t);
    assert!(last.inputs[t] >= 70, "the last window starts at {}", last.inputs[t]);
    assert!(last.targets.iter().all(|&x| x < 100));
    assert!(last.inputs.iter().zip(&last.targets).all(|(&i, &g)| g == i + 1));

    // a stream too short for one window is an error, not a panic
    let cfg = GptConfig { block_size: 16, ..tiny(LayerNormPlacement::Pre) };
    let tc = TrainConfig {
        batch_size: 2,
        seq_len: 16,
        grad_accum: 1,
        steps: 1,
        schedule: LrSchedule::constant(1e-3),
        optim: AdamWConfig::default(),
        eval_interval: 0,
        eval_batches: 1,
        seed: 0,
    };
    let mut trainer = Trainer::new(Gpt::new(CpuBackend::new(), cfg, 0).unwrap(), tc).unwrap();
    let short: Vec<u32> = (0..16).map(|i| i % 11).collect();
    assert!(matches!(trainer.train_step(&TokenWindows::new(&short)), Err(EngineError::Batch(_))));
    assert!(matches!(trainer.evaluate(&TokenWindows::new(&short)), Err(EngineError::Batch(_))));
}

// ---- the loss falls on a small text -----------------------------------------------------------

const PANGRAMS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. ",
    "Pack my box with five dozen liquor jugs. ",
    "How vexingly quick daft zebras jump! ",
    "Sphinx of black quartz, judge my vow. ",
    "The five boxing wizards jump quickly. ",
    "Jackdaws love my big sphinx of quartz. ",
    "Waltz, bad nymph, for quick jigs vex. ",
    "Bright vixens jump; dozy fowl quack. ",
    "Quick zephyrs blow, vexing daft Jim. ",
    "Two driven jocks help fax my big quiz. ",
    "Five quacking zephyrs jolt my wax bed. ",
    "The jay, pig, fox, zebra and my wolves quack! ",
];

/// ~2.5 KB: the pangrams above, 60 of them in a seeded random order.
fn corpus() -> String {
    let mut rng = Rng::new(2024);
    (0..60).map(|_| PANGRAMS[rng.below(PANGRAMS.len() as u64) as usize]).collect()
}

#[test]
fn loss_falls_on_a_small_text() {
    let text = corpus();
    assert!(text.len() > 2000);
    let mut chars: Vec<char> = text.chars().collect();
    chars.sort_unstable();
    chars.dedup();
    let ids: Vec<u32> = text.chars().map(|ch| chars.binary_search(&ch).unwrap() as u32).collect();
    let vocab = chars.len();
    let split = ids.len() * 85 / 100;
    let (train, val) = (TokenWindows::new(&ids[..split]), TokenWindows::new(&ids[split..]));

    let cfg = GptConfig { vocab_size: vocab, block_size: 32, n_layer: 2, n_head: 2, n_embd: 32, ln_placement: LayerNormPlacement::Pre, positions: Default::default() };
    let model = Gpt::new(CpuBackend::new(), cfg, 7).unwrap();
    let tc = TrainConfig {
        batch_size: 8,
        seq_len: 32,
        grad_accum: 1,
        steps: 150,
        schedule: LrSchedule::constant(3e-3),
        optim: AdamWConfig::default(),
        eval_interval: 0,
        eval_batches: 4,
        seed: 1,
    };
    let mut trainer = Trainer::new(model, tc).unwrap();
    let uniform = (vocab as f32).ln();
    let before = trainer.evaluate(&val).unwrap();
    assert!((before - uniform).abs() < 0.1, "an untrained model is ~uniform: {before} vs ln({vocab}) = {uniform}");
    for _ in 0..150 {
        trainer.train_step(&train).unwrap();
    }
    assert_eq!(trainer.step(), 150);
    let after = trainer.evaluate(&val).unwrap();
    assert!(after < 0.6 * uniform, "held-out loss {after} after 150 steps (from {before}); want < 0.6 ln({vocab}) = {}", 0.6 * uniform);
}

// ---- learning-rate schedule -------------------------------------------------------------------

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1e-12)
}

#[test]
fn lr_schedule_warmup_then_cosine() {
    let s = LrSchedule::cosine(1e-3, 1e-4, 10, 110);
    // linear warm-up: step k (0-based) gets max * (k + 1) / warmup
    assert!(close(s.lr_at(0), 1e-4), "{}", s.lr_at(0));
    assert!(close(s.lr_at(4), 5e-4), "{}", s.lr_at(4));
    assert!(close(s.lr_at(9), 1e-3), "{}", s.lr_at(9));
    // cosine from max at the end of warm-up to min at decay_steps, half-way at the midpoint
    assert!(close(s.lr_at(10), 1e-3), "{}", s.lr_at(10));
    assert!(close(s.lr_at(60), 5.5e-4), "{}", s.lr_at(60));
    assert!(close(s.lr_at(110), 1e-4), "{}", s.lr_at(110));
    // a quarter of the way: min + (max - min) * (1 + cos(pi/4)) / 2
    let q = 1e-4 + 9e-4 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
    assert!(close(s.lr_at(35), q as f32), "{} vs {q}", s.lr_at(35));
    // flat after
    assert_eq!(s.lr_at(111), s.min_lr);
    assert_eq!(s.lr_at(1_000_000), s.min_lr);
    for k in 0..9 {
        assert!(s.lr_at(k + 1) > s.lr_at(k), "warm-up not increasing at {k}");
    }
    for k in 10..110 {
        assert!(s.lr_at(k + 1) < s.lr_at(k), "decay not decreasing at {k}");
    }

    let c = LrSchedule::constant(3e-3);
    for k in [0, 1, 100, 1_000_000] {
        assert_eq!(c.lr_at(k), 3e-3);
    }
    // no warm-up: the first step already runs at max
    let s = LrSchedule::cosine(2e-3, 0.0, 0, 100);
    assert_eq!(s.lr_at(0), 2e-3);
    assert!(close(s.lr_at(50), 1e-3), "{}", s.lr_at(50));
    assert_eq!(s.lr_at(100), 0.0);
    // warm-up only: max after it
    let s = LrSchedule::cosine(2e-3, 1e-4, 4, 0);
    assert!(close(s.lr_at(1), 1e-3));
    assert_eq!(s.lr_at(4), 2e-3);
    assert_eq!(s.lr_at(1000), 2e-3);
}

#[test]
fn lr_schedule_linear_constant_and_warmup_stable_decay() {
    let with = |decay, cooldown_steps| LrSchedule { decay, cooldown_steps, ..LrSchedule::cosine(1e-3, 1e-4, 10, 110) };
    // linear: max at the end of warm-up, min at decay_steps, straight between
    let l = with(LrDecay::Linear, 0);
    assert!(close(l.lr_at(9), 1e-3) && close(l.lr_at(10), 1e-3));
    assert!(close(l.lr_at(35), 1e-4 + 9e-4 * 0.75), "{}", l.lr_at(35));
    assert!(close(l.lr_at(60), 5.5e-4), "{}", l.lr_at(60));
    assert_eq!(l.lr_at(110), 1e-4);
    // constant: max after warm-up, forever
    let c = with(LrDecay::Constant, 0);
    assert!(close(c.lr_at(4), 5e-4));
    assert_eq!((c.lr_at(10), c.lr_at(110), c.lr_at(10_000)), (1e-3, 1e-3, 1e-3));
    // WSD: warm-up, max until 20 steps before the end, then linear to min
    let w = with(LrDecay::Wsd, 20);
    assert!(close(w.lr_at(4), 5e-4));
    for k in 10..=90 {
        assert_eq!(w.lr_at(k), 1e-3, "stable at {k}");
    }
    assert!(close(w.lr_at(95), 1e-4 + 9e-4 * 0.75), "{}", w.lr_at(95));
    assert!(close(w.lr_at(100), 5.5e-4), "{}", w.lr_at(100));
    assert_eq!((w.lr_at(110), w.lr_at(500)), (1e-4, 1e-4));
    for k in 90..110 {
        assert!(w.lr_at(k + 1) < w.lr_at(k), "cooldown not decreasing at {k}");
    }
    // a cooldown longer than the steps after warm-up is refused naming it
    assert_eq!(with(LrDecay::Wsd, 101).validate().unwrap_err().field, "cooldown_steps");
    assert!(with(LrDecay::Wsd, 100).validate().is_ok());
    // names
    assert_eq!(LrDecay::parse("wsd"), Some(LrDecay::Wsd));
    assert_eq!(LrDecay::parse("cosine"), Some(LrDecay::Cosine));
    assert_eq!(LrDecay::parse("step"), None);
}

// ---- the optimizer: clipping and weight decay by tensor kind -----------------------------------

/// `AdamW::step` over a hand-made table: the global norm is measured before clipping, the
/// gradient is scaled by clip / norm when the norm is larger, weight decay reaches matmul weights
/// (and embeddings only when asked), never biases or norms; moments carry over to step 2.
#[test]
fn adamw_clips_the_global_norm_and_decays_by_kind() {
    use smelt_engine::backend::Backend;
    use smelt_engine::optim::AdamW;
    use smelt_engine::params::{Init, ParamKind, ParamTable};

    let mut table = ParamTable::new();
    table.push("w", &[3, 4], ParamKind::Weight, Init::Normal { std: 1.0 });
    table.push("b", &[4], ParamKind::Bias, Init::Zeros);
    table.push("e", &[5, 2], ParamKind::Embedding, Init::Normal { std: 1.0 });
    table.push("ln", &[4], ParamKind::Norm, Init::Ones);
    table.push("w2", &[4, 2], ParamKind::Weight, Init::Normal { std: 1.0 });
    let n = table.total();
    let be = CpuBackend::new();
    let mut rng = Rng::new(77);
    for (decay_embeddings, grad_clip) in [(false, Some(0.5f32)), (true, Some(0.5)), (false, None), (false, Some(1e3))] {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.3, decay_embeddings, grad_clip };
        let mut opt = AdamW::new(&be, &table, cfg.clone()).unwrap();
        let p0: Vec<f32> = table.init(5).iter().map(|&x| x + 0.1 * rng.normal() as f32).collect();
        let mut params = be.upload(&p0);
        let mut p_ref: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let (mut m_ref, mut v_ref) = (vec![0.0f64; n], vec![0.0f64; n]);
        let lr = 1e-2f32;
        for step in 0..2u64 {
            let g: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let grads = be.upload(&g);
            let report = opt.step(&be, &mut params, &grads, lr, step).unwrap();
            let norm = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            assert!((report.grad_norm as f64 - norm).abs() < 1e-5 * norm, "grad norm {} vs {norm}", report.grad_norm);
            assert_eq!(report.lr, lr);
            let scale = match grad_clip {
                Some(c) if norm > c as f64 => c as f64 / (norm + 1e-6),
                _ => 1.0,
            };
            let t = (step + 1) as i32;
            let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
            for spec in table.specs() {
                let wd = match spec.kind {
                    ParamKind::Weight => 0.3,
                    ParamKind::Embedding if decay_embeddings => 0.3,
                    _ => 0.0,
                } as f32 as f64;
                for i in spec.range() {
                    let gi = g[i] as f64 * scale;
                    p_ref[i] *= 1.0 - lr as f64 * wd;
                    m_ref[i] = b1 * m_ref[i] + (1.0 - b1) * gi;
                    v_ref[i] = b2 * v_ref[i] + (1.0 - b2) * gi * gi;
                    let (mh, vh) = (m_ref[i] / (1.0 - b1.powi(t)), v_ref[i] / (1.0 - b2.powi(t)));
                    p_ref[i] -= lr as f64 * mh / (vh.sqrt() + 1e-8);
                }
            }
            let got = be.download(be.view(&params, 0..n));
            for spec in table.specs() {
                for i in spec.range() {
                    assert!(
                        (got[i] as f64 - p_ref[i]).abs() < 1e-6,
                        "decay_embeddings {decay_embeddings}, clip {grad_clip:?}, step {step}: {}[{}] = {} vs reference {}",
                        spec.name,
                        i - spec.offset,
                        got[i],
                        p_ref[i]
                    );
                }
            }
        }
        assert_eq!(opt.steps_done(), 2);
        let (m, v) = opt.moments_host(&be);
        for i in 0..n {
            assert!((m[i] as f64 - m_ref[i]).abs() < 1e-6 && (v[i] as f64 - v_ref[i]).abs() < 1e-6, "moments [{i}]");
        }

        // a non-finite gradient is refused and changes nothing
        let before = be.download(be.view(&params, 0..n));
        let mut g = vec![0.1f32; n];
        g[3] = f32::NAN;
        let grads = be.upload(&g);
        match opt.step(&be, &mut params, &grads, lr, 2) {
            Err(EngineError::NonFiniteGrad { step: 2, .. }) => {}
            other => panic!("a NaN gradient gave {other:?}"),
        }
        assert_eq!(be.download(be.view(&params, 0..n)), before);
        assert_eq!(opt.steps_done(), 2);
    }
}

// ---- config validation ------------------------------------------------------------------------

fn field(r: Result<(), smelt_engine::ConfigError>) -> String {
    r.expect_err("the config was accepted").field
}

#[test]
fn adamw_config_validation_names_the_field() {
    let ok = AdamWConfig::default();
    ok.validate().unwrap();
    let with = |f: &dyn Fn(&mut AdamWConfig)| {
        let mut c = ok.clone();
        f(&mut c);
        c.validate()
    };
    assert_eq!(field(with(&|c| c.beta1 = 1.0)), "beta1");
    assert_eq!(field(with(&|c| c.beta1 = -0.1)), "beta1");
    assert_eq!(field(with(&|c| c.beta2 = 1.5)), "beta2");
    assert_eq!(field(with(&|c| c.beta2 = f32::NAN)), "beta2");
    assert_eq!(field(with(&|c| c.eps = 0.0)), "eps");
    assert_eq!(field(with(&|c| c.eps = f32::NAN)), "eps");
    assert_eq!(field(with(&|c| c.weight_decay = -0.01)), "weight_decay");
    assert_eq!(field(with(&|c| c.weight_decay = f32::NAN)), "weight_decay");
    assert_eq!(field(with(&|c| c.grad_clip = Some(0.0))), "grad_clip");
    assert_eq!(field(with(&|c| c.grad_clip = Some(-1.0))), "grad_clip");
    with(&|c| c.grad_clip = None).unwrap();
    with(&|c| c.beta1 = 0.0).unwrap();
    with(&|c| c.weight_decay = 0.0).unwrap();
    // the message says what is wrong
    let e = with(&|c| c.beta1 = 1.0).unwrap_err();
    assert!(e.to_string().contains("beta1"), "{e}");
}

#[test]
fn train_config_validation_names_the_field() {
    let ok = TrainConfig {
        batch_size: 4,
        seq_len: 16,
        grad_accum: 2,
        steps: 10,
        schedule: LrSchedule::cosine(1e-3, 1e-4, 2, 10),
        optim: AdamWConfig::default(),
        eval_interval: 5,
        eval_batches: 2,
        seed: 0,
    };
    let block = 16;
    ok.validate(block).unwrap();
    assert_eq!(ok.tokens_per_step(), 4 * 16 * 2);
    let with = |f: &dyn Fn(&mut TrainConfig)| {
        let mut c = ok.clone();
        f(&mut c);
        c.validate(block)
    };
    assert_eq!(field(with(&|c| c.batch_size = 0)), "batch_size");
    assert_eq!(field(with(&|c| c.seq_len = 0)), "seq_len");
    assert_eq!(field(with(&|c| c.seq_len = block + 1)), "seq_len");
    assert_eq!(field(with(&|c| c.grad_accum = 0)), "grad_accum");
    assert_eq!(field(with(&|c| c.steps = 0)), "steps");
    assert_eq!(field(with(&|c| c.schedule.max_lr = 0.0)), "lr");
    assert_eq!(field(with(&|c| c.schedule.max_lr = f32::INFINITY)), "lr");
    assert_eq!(field(with(&|c| c.schedule.min_lr = 2e-3)), "min_lr");
    assert_eq!(field(with(&|c| c.schedule.min_lr = -1e-5)), "min_lr");
    assert_eq!(field(with(&|c| c.optim.beta2 = 1.0)), "beta2");
    with(&|c| c.seq_len = block).unwrap();

    // Trainer::new refuses it too, as a config error naming the field
    let mut bad = ok.clone();
    bad.seq_len = 64;
    let model = Gpt::new(CpuBackend::new(), GptConfig { block_size: block, ..tiny(LayerNormPlacement::Pre) }, 0).unwrap();
    match Trainer::new(model, bad) {
        Err(EngineError::Config(e)) => assert_eq!(e.field, "seq_len"),
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("seq_len 64 accepted for block_size 16"),
    }
}

#[test]
fn gpt_config_validation_names_the_field() {
    let ok = tiny(LayerNormPlacement::Pre);
    ok.validate().unwrap();
    let with = |f: &dyn Fn(&mut GptConfig)| {
        let mut c = ok.clone();
        f(&mut c);
        c.validate()
    };
    assert_eq!(field(with(&|c| c.vocab_size = 0)), "vocab_size");
    assert_eq!(field(with(&|c| c.n_head = 0)), "n_head");
    assert_eq!(field(with(&|c| c.n_head = 3)), "n_embd");
    match Gpt::new(CpuBackend::new(), GptConfig { n_layer: 0, ..ok.clone() }, 0) {
        Err(EngineError::Config(e)) => assert_eq!(e.field, "n_layer"),
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("n_layer 0 accepted"),
    }
    // the parameter count matches the table the model builds
    assert_eq!(ok.num_params(), Gpt::<CpuBackend>::param_table(&ok).numel());
}

// ---- the LM head over the vocabulary rounded up ----------------------------------------------------

#[test]
fn the_head_rows_are_spare_values_after_wte() {
    assert_eq!(GptConfig::preset("gpt2-124m").unwrap().head_rows(), 50304, "GPT-2's vocabulary, as llm.c and the peer pad it");
    // the table reserves the difference after wte, and only there; the tensors keep HF shapes
    let cfg = tiny(LayerNormPlacement::Pre);
    let table = Gpt::<CpuBackend>::param_table(&cfg);
    let wte = table.id("transformer.wte.weight").unwrap();
    assert_eq!(table.spec(wte).shape, vec![11, 8]);
    assert_eq!(table.reserved_range(wte).len(), 64 * 8);
    assert_eq!(table.total(), table.numel() + 53 * 8);
    assert!(table.specs().iter().filter(|s| s.name != "transformer.wte.weight").all(|s| s.spare == 0));
}

/// The padding's rows are zero, masked out of the softmax, and get exactly zero gradients, so
/// they stay zero through training with weight decay on the embeddings (AdamW, clipping):
/// nothing leaks into the loss, the logits (V wide) or a checkpoint.
#[test]
fn the_head_padding_stays_zero_through_training() {
    let cfg = GptConfig { vocab_size: 37, block_size: 16, n_layer: 2, n_head: 2, n_embd: 16, ln_placement: LayerNormPlacement::Pre, positions: Default::default() };
    let table = Gpt::<CpuBackend>::param_table(&cfg);
    let wte = table.id("transformer.wte.weight").unwrap();
    let spare = table.range(wte).end..table.reserved_range(wte).end;
    assert_eq!(spare.len(), (64 - 37) * 16);
    let model = Gpt::new(CpuBackend::new(), cfg.clone(), 7).unwrap();
    let tc = TrainConfig {
        batch_size: 3,
        seq_len: 16,
        grad_accum: 2,
        steps: 8,
        schedule: LrSchedule::cosine(1e-2, 1e-3, 1, 8),
        optim: AdamWConfig { weight_decay: 0.1, decay_embeddings: true, ..AdamWConfig::default() },
        eval_interval: 0,
        eval_batches: 1,
        seed: 5,
    };
    let mut trainer = Trainer::new(model, tc).unwrap();
    let mut rng = Rng::new(4);
    // a text with something to learn: each id follows from the one before
    let stream: Vec<u32> = (0..2000u32).map(|i| (i * 7) % 37).collect();
    let data = TokenWindows::new(&stream);
    let start = trainer.model.params_host();
    let mut losses = Vec::new();
    for step in 0..8 {
        losses.push(trainer.train_step(&data).unwrap().loss);
        let (p, g) = (trainer.model.params_host(), trainer.model.grads_host());
        assert!(p[spare.clone()].iter().all(|&x| x == 0.0), "step {step}: a padded head row moved");
        assert!(g[spare.clone()].iter().all(|&x| x == 0.0), "step {step}: a padded head row got a gradient");
        assert!(g[table.range(wte)].iter().any(|&x| x != 0.0), "step {step}: wte got no gradient");
    }
    assert!(losses[7] < losses[0] - 0.1, "no learning: {losses:?}");
    let moved = trainer.model.params_host();
    assert!(moved[table.range(wte)].iter().zip(&start[table.range(wte)]).filter(|(a, b)| a != b).count() > 37 * 16 / 2);
    // logits come back V wide and give the model's own loss
    let (b, t) = (2, 9);
    let tokens = random_ids(&mut rng, b * t, 37);
    let targets = random_ids(&mut rng, b * t, 37);
    let loss = trainer.model.forward(&tokens, Some(&targets), b, t).unwrap().unwrap();
    let logits = trainer.model.logits();
    assert_eq!(logits.len(), b * t * 37);
    let want = loss_f64(&logits, &targets, 37);
    assert!((loss as f64 - want).abs() < 1e-5 * want, "loss {loss} vs the softmax over the V real logits {want}");
    assert_eq!(trainer.model.logits_at(1, 3), logits[(9 + 3) * 37..(9 + 4) * 37].to_vec());
}

#[test]
fn parameters_with_a_nonzero_head_padding_are_refused() {
    let cfg = tiny(LayerNormPlacement::Pre);
    let table = Gpt::<CpuBackend>::param_table(&cfg);
    let wte = table.id("transformer.wte.weight").unwrap();
    let mut host = table.init(1);
    host[table.range(wte).end + 5] = 0.25;
    let e = Gpt::from_params(CpuBackend::new(), cfg, &host).err().expect("a nonzero padding was accepted").to_string();
    assert!(e.contains("spare value 5") && e.contains("transformer.wte.weight") && e.contains("0.25"), "{e}");
}

// ---- the fused classifier's training forward ----------------------------------------------------

/// `forward_train` computes the logits' gradient with the loss: the loss and every gradient are
/// those of `forward` + `backward` with the same loss_scale (the CPU backend runs the same two
/// ops, so bitwise), with ignored targets in the batch; a backward with another loss_scale is
/// refused (the logits it would need are gone), and so is reading the logits.
#[test]
fn forward_train_matches_forward_then_backward() {
    for placement in [LayerNormPlacement::Pre, LayerNormPlacement::Post] {
        let cfg = tiny(placement);
        let mut rng = Rng::new(17);
        let (b, t) = (2, 5);
        let tokens = random_ids(&mut rng, b * t, cfg.vocab_size);
        let mut targets = random_ids(&mut rng, b * t, cfg.vocab_size);
        targets[3] = IGNORE_INDEX;
        let mut plain = perturbed_model(&cfg, 5);
        plain.zero_grad();
        let loss_plain = plain.forward(&tokens, Some(&targets), b, t).unwrap().unwrap();
        plain.backward(0.5).unwrap();
        let mut fused = perturbed_model(&cfg, 5);
        fused.zero_grad();
        let loss_fused = fused.forward_train(&tokens, &targets, b, t, 0.5).unwrap();
        fused.backward(0.5).unwrap();
        assert_eq!(loss_plain.to_bits(), loss_fused.to_bits(), "{placement:?}: loss");
        let (gp, gf) = (plain.grads_host(), fused.grads_host());
        assert!(gp.iter().any(|&g| g != 0.0), "{placement:?}: a gradient to compare");
        assert!(gp.iter().zip(&gf).all(|(a, b)| a.to_bits() == b.to_bits()), "{placement:?}: gradients differ");

        fused.forward_train(&tokens, &targets, b, t, 0.5).unwrap();
        let err = fused.backward(0.25).unwrap_err();
        assert!(err.to_string().contains("loss_scale 0.25"), "{err}");
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fused.logits()));
        assert!(read.is_err(), "{placement:?}: logits after forward_train must be refused");
    }
}
