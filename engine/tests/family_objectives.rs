//! The pretraining objectives on their own: BERT masking statistics, T5 span corruption
//! statistics and round trip, InfoNCE against finite differences and its limiting values.

use smelt_engine::backend::IGNORE_INDEX;
use smelt_engine::model::objectives::{corrupt_spans, info_nce, mask_tokens, reconstruct, MaskingConfig, SpanCorruptionConfig};
use smelt_engine::rng::Rng;

const PAD: u32 = 0;
const CLS: u32 = 1;
const SEP: u32 = 2;
const MASK: u32 = 3;

/// |x - p| within `k` standard deviations of a binomial proportion over n draws.
fn assert_proportion(what: &str, hits: usize, n: usize, p: f64, k: f64) {
    let x = hits as f64 / n as f64;
    let sd = (p * (1.0 - p) / n as f64).sqrt();
    assert!((x - p).abs() <= k * sd, "{what}: {x:.4} over {n} draws, expected {p} +- {:.4}", k * sd);
}

#[test]
fn masking_chooses_15_percent_of_ordinary_tokens_80_10_10() {
    let v = 500u32;
    let cfg = MaskingConfig::bert(v, MASK, vec![PAD, CLS, SEP]);
    cfg.validate().unwrap();
    let mut rng = Rng::new(5);
    let (mut eligible, mut chosen, mut masked, mut random, mut kept) = (0, 0, 0, 0, 0);
    let mut replacement_hist = vec![0usize; v as usize];
    for seq in 0..400 {
        // [CLS] text [SEP] padding, as BERT batches look
        let len = 60 + seq % 60;
        let mut tokens = vec![CLS];
        tokens.extend((0..len).map(|_| 4 + rng.below((v - 4) as u64) as u32));
        tokens.push(SEP);
        tokens.resize(130, PAD);
        let m = mask_tokens(&tokens, &cfg, &mut Rng::new(1000 + seq as u64));
        assert_eq!(m, mask_tokens(&tokens, &cfg, &mut Rng::new(1000 + seq as u64)), "masking is a function of the seed");
        for i in 0..tokens.len() {
            let (t, inp, tg) = (tokens[i], m.inputs[i], m.targets[i]);
            if [PAD, CLS, SEP].contains(&t) {
                assert_eq!((inp, tg), (t, IGNORE_INDEX), "special token {t} at {i} was chosen");
                continue;
            }
            eligible += 1;
            if tg == IGNORE_INDEX {
                assert_eq!(inp, t, "an unchosen token changed");
                continue;
            }
            assert_eq!(tg, t, "the target of a chosen token is the original");
            chosen += 1;
            if inp == MASK {
                masked += 1;
            } else if inp == t {
                kept += 1;
            } else {
                assert!(inp >= 4 && inp < v, "random replacement {inp} is special or outside the vocabulary");
                replacement_hist[inp as usize] += 1;
                random += 1;
            }
        }
    }
    assert_proportion("chosen share", chosen, eligible, 0.15, 5.0);
    assert_proportion("[MASK] share", masked, chosen, 0.8, 5.0);
    // a random draw equal to the original counts as kept: p(random) = 0.1 * (1 - 1/496)
    assert_proportion("random share", random, chosen, 0.1 * (1.0 - 1.0 / 496.0), 5.0);
    assert_proportion("kept share", kept, chosen, 0.1 + 0.1 / 496.0, 5.0);
    // replacements spread over the ordinary vocabulary, not a few ids
    let used = replacement_hist.iter().filter(|&&c| c > 0).count();
    assert!(used > 300, "random replacements used only {used} distinct ids of 496");
    assert!(mask_tokens(&[10; 200], &cfg, &mut Rng::new(1)) != mask_tokens(&[10; 200], &cfg, &mut Rng::new(2)), "seeds differ");
}

#[test]
fn masking_config_validation_names_the_field() {
    let mut cfg = MaskingConfig::bert(100, MASK, vec![PAD]);
    cfg.mask_prob = 1.5;
    assert_eq!(cfg.validate().unwrap_err().field, "mask_prob");
    let mut cfg = MaskingConfig::bert(100, 100, vec![PAD]);
    assert_eq!(cfg.validate().unwrap_err().field, "mask_id");
    cfg.mask_id = MASK;
    cfg.mask_share = 0.95;
    assert_eq!(cfg.validate().unwrap_err().field, "mask_share");
}

#[test]
fn span_corruption_statistics_and_round_trip() {
    let v = 1000u32;
    let cfg = SpanCorruptionConfig::t5(v);
    cfg.validate().unwrap();
    let mut rng = Rng::new(9);
    let (mut tokens_total, mut noise_total) = (0usize, 0usize);
    let mut spans: Vec<usize> = Vec::new();
    for seq in 0..1500 {
        let len = 20 + seq % 180;
        let tokens: Vec<u32> = (0..len).map(|_| rng.below((v - cfg.sentinels) as u64) as u32).collect();
        let sc = corrupt_spans(&tokens, &cfg, &mut rng).unwrap();
        assert_eq!(reconstruct(&sc.inputs, &sc.targets, &cfg).as_deref(), Some(&tokens[..]), "input + target rebuild the sequence");
        assert!(!sc.noise[0], "T5 starts with kept tokens");
        let n_noise = sc.noise.iter().filter(|&&x| x).count();
        assert_eq!(n_noise, ((len as f64) * 0.15).round() as usize, "noise tokens of a length-{len} sequence");
        // runs of noise, and the sentinels numbered 0, 1, ... in both streams
        let mut runs = Vec::new();
        for (i, &n) in sc.noise.iter().enumerate() {
            if n && (i == 0 || !sc.noise[i - 1]) {
                runs.push(0);
            }
            if n {
                *runs.last_mut().unwrap() += 1;
            }
        }
        let sentinels_in: Vec<u32> = sc.inputs.iter().copied().filter(|&t| cfg.is_sentinel(t)).collect();
        let want: Vec<u32> = (0..runs.len() as u32).map(|k| cfg.sentinel(k)).collect();
        assert_eq!(sentinels_in, want, "one sentinel per span, from the top of the vocabulary");
        assert_eq!(sc.inputs.len(), len - n_noise + runs.len());
        assert_eq!(sc.targets.len(), n_noise + runs.len() + 1);
        assert_eq!(*sc.targets.last().unwrap(), cfg.sentinel(runs.len() as u32), "targets end with a closing sentinel");
        tokens_total += len;
        noise_total += n_noise;
        spans.extend(runs);
    }
    let density = noise_total as f64 / tokens_total as f64;
    assert!((density - 0.15).abs() < 0.005, "noise density {density}");
    let mean = spans.iter().sum::<usize>() as f64 / spans.len() as f64;
    assert!((mean - 3.0).abs() < 0.15, "mean span length {mean}");
    // random segmentation: lengths vary (T5's runs are not all 3)
    let ones = spans.iter().filter(|&&s| s == 1).count() as f64 / spans.len() as f64;
    let long = spans.iter().filter(|&&s| s >= 6).count();
    assert!(ones > 0.1 && long > 0, "span lengths do not vary: {ones:.3} of length 1, {long} of length >= 6");
}

#[test]
fn span_corruption_refuses_sentinel_ids_in_the_input() {
    let cfg = SpanCorruptionConfig::t5(300);
    let err = corrupt_spans(&[5, 6, 299, 7], &cfg, &mut Rng::new(1)).unwrap_err();
    assert_eq!(err.field, "tokens");
    assert!(err.message.contains("299"), "{}", err.message);
}

#[test]
fn info_nce_gradient_matches_finite_differences() {
    let (n, c, tau) = (5, 7, 0.3);
    let mut rng = Rng::new(3);
    let za: Vec<f32> = (0..n * c).map(|_| rng.normal() as f32).collect();
    let zb: Vec<f32> = (0..n * c).map(|_| rng.normal() as f32).collect();
    let r = info_nce(&za, &zb, n, c, tau);
    let h = 1e-3f32;
    for (side, analytic) in [(0, &r.dza), (1, &r.dzb)] {
        let scale = analytic.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(scale > 1e-3, "vacuous gradient");
        for i in 0..n * c {
            let bump = |d: f32| {
                let (mut a, mut b) = (za.clone(), zb.clone());
                if side == 0 { a[i] += d } else { b[i] += d }
                info_nce(&a, &b, n, c, tau).loss as f64
            };
            let numeric = (bump(h) - bump(-h)) / (2.0 * h as f64);
            assert!((numeric - analytic[i] as f64).abs() < 2e-3 * scale as f64, "side {side} [{i}]: analytic {}, numeric {numeric}", analytic[i]);
        }
    }
}

#[test]
fn info_nce_limits() {
    // identical, orthogonal pairs at a low temperature: every pair found, loss ~0
    let (n, c) = (4, 4);
    let eye: Vec<f32> = (0..n * c).map(|i| if i / c == i % c { 2.0 } else { 0.0 }).collect();
    let r = info_nce(&eye, &eye, n, c, 0.05);
    assert!(r.loss < 1e-6 && r.accuracy == 1.0, "aligned pairs: loss {} accuracy {}", r.loss, r.accuracy);
    // all rows the same: no pair can be told apart, loss = ln N whatever the temperature
    let same = vec![1.0f32; n * c];
    let r = info_nce(&same, &same, n, c, 0.1);
    assert!((r.loss - (n as f32).ln()).abs() < 1e-5, "indistinguishable pairs: loss {}", r.loss);
    assert!(r.dza.iter().chain(&r.dzb).all(|g| g.abs() < 1e-6), "no gradient when nothing can change the ranking");
}
