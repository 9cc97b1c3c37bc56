//! Fine-tuning heads on GPT: the classification head's backward (through the GPT) against finite
//! differences, its pooling against a host reference, and causal SFT's masking of prompt tokens.

use smelt_engine::backend::{Backend, IGNORE_INDEX};
use smelt_engine::model::heads::{sft_example, ClassificationHead};
use smelt_engine::model::{Gpt, GptConfig, LayerNormPlacement};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

fn tiny() -> GptConfig {
    GptConfig { vocab_size: 11, block_size: 8, n_layer: 2, n_head: 2, n_embd: 8, ln_placement: LayerNormPlacement::Pre, positions: Default::default() }
}

/// A tiny model moved away from its init so every path carries a real gradient.
fn perturbed_model(cfg: &GptConfig, seed: u64) -> Gpt<CpuBackend> {
    let mut model = Gpt::new(CpuBackend::new(), cfg.clone(), seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let params: Vec<f32> = model.params_host().iter().map(|&x| x + 0.2 * rng.normal() as f32).collect();
    model.set_params_host(&params);
    model
}

fn random_ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
}

/// Mean cross-entropy over the rows whose target counts, in f64, from f32 logits.
fn loss_f64(logits: &[f32], targets: &[u32], classes: usize) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (row, &t) in logits.chunks(classes).zip(targets) {
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

const SAMPLES: usize = 16;
const STEP: f32 = 1e-2;
/// Allowed error relative to the tensor's largest gradient entry (f32 forward, step 1e-2).
const TOL: f64 = 2e-2;
const FLOOR: f64 = 1e-3;

/// Central differences of `objective` at sampled entries of every tensor (name, flat range of
/// `params`) against the analytic gradient `grads`.
fn check_tensors(
    what: &str,
    tensors: &[(String, std::ops::Range<usize>)],
    params: &[f32],
    grads: &[f32],
    rng: &mut Rng,
    objective: &mut dyn FnMut(&[f32]) -> f64,
) {
    let mut p = params.to_vec();
    for (name, r) in tensors {
        let g = &grads[r.clone()];
        let n = g.len();
        let argmax = (0..n).fold(0, |m, i| if g[i].abs() > g[m].abs() { i } else { m });
        let mut idx = vec![argmax];
        idx.extend((0..SAMPLES.min(n)).map(|_| rng.below(n as u64) as usize));
        let scale = (g.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64).max(FLOOR);
        for &i in &idx {
            let at = r.start + i;
            let x0 = params[at];
            p[at] = x0 + STEP;
            let lp = objective(&p);
            p[at] = x0 - STEP;
            let lm = objective(&p);
            p[at] = x0;
            let numeric = (lp - lm) / ((x0 + STEP) as f64 - (x0 - STEP) as f64);
            let err = (g[i] as f64 - numeric).abs();
            assert!(
                err <= TOL * scale,
                "{what}: d loss / d {name}[{i}]: backward {} vs central difference {numeric} (error {:.2e} of {scale:.2e})",
                g[i],
                err / scale
            );
        }
    }
}

/// The classification loss's gradient, through the head, the pooling and the whole GPT, against
/// finite differences of the loss computed on the host from the head's logits.
#[test]
fn classification_head_gradcheck() {
    let cfg = tiny();
    let (b, t, labels_n) = (3, 6, 3);
    let mut model = perturbed_model(&cfg, 11);
    let be = CpuBackend::new();
    let mut head = ClassificationHead::new(&be, labels_n, cfg.n_embd, 12).unwrap();
    // A larger head than its init, so the pooled features matter for the loss.
    let mut rng = Rng::new(13);
    let w: Vec<f32> = head.params_host(&be).iter().map(|_| 0.5 * rng.normal() as f32).collect();
    head.set_params_host(&be, &w);
    let tokens = random_ids(&mut rng, b * t, cfg.vocab_size);
    // Sequences of different real lengths (the rest is padding).
    let last = vec![5, 2, 0];
    let labels = vec![2u32, 0, 1];

    model.zero_grad();
    head.zero_grad(&be);
    model.forward_hidden(&tokens, b, t).unwrap();
    let loss = head.forward(&be, model.hidden(), &last, Some(&labels), b, t).unwrap().unwrap();
    let want = loss_f64(&head.logits(&be), &labels, labels_n);
    assert!((loss as f64 - want).abs() < 1e-5 * want, "head loss {loss} vs host mean {want}");
    let dh = head.backward(&be, 1.0).unwrap();
    model.backward_hidden(dh).unwrap();

    // One flat vector: the GPT's parameters, then the head's.
    let gpt_n = model.table().total();
    let mut params = model.params_host();
    params.extend(head.params_host(&be));
    let mut grads = model.grads_host();
    grads.extend(head.grads_host(&be));
    let mut tensors: Vec<(String, std::ops::Range<usize>)> = model.table().specs().iter().map(|s| (s.name.clone(), s.range())).collect();
    tensors.push(("score.weight".into(), gpt_n..params.len()));

    let mut objective = |p: &[f32]| {
        model.set_params_host(&p[..gpt_n]);
        head.set_params_host(&be, &p[gpt_n..]);
        model.forward_hidden(&tokens, b, t).unwrap();
        head.forward(&be, model.hidden(), &last, None, b, t).unwrap();
        loss_f64(&head.logits(&be), &labels, labels_n)
    };
    check_tensors("classification", &tensors, &params, &grads, &mut rng, &mut objective);
}

/// The head's logits are the pooled row of the hidden states times `score.weight`ᵀ (a host
/// reference), and padding after a sequence's last real token changes nothing (causal model).
#[test]
fn classification_pools_the_last_real_token() {
    let cfg = tiny();
    let (b, t, l) = (2, 5, 4);
    let mut model = perturbed_model(&cfg, 21);
    let be = CpuBackend::new();
    let mut head = ClassificationHead::new(&be, l, cfg.n_embd, 22).unwrap();
    let mut rng = Rng::new(23);
    let mut tokens = random_ids(&mut rng, b * t, cfg.vocab_size);
    let last = vec![2, 4];
    model.forward_hidden(&tokens, b, t).unwrap();
    let hidden = be.download(model.hidden());
    head.forward(&be, model.hidden(), &last, None, b, t).unwrap();
    let logits = head.logits(&be);
    let w = head.params_host(&be);
    let c = cfg.n_embd;
    for n in 0..b {
        let row = &hidden[(n * t + last[n]) * c..(n * t + last[n] + 1) * c];
        for k in 0..l {
            let want: f64 = row.iter().zip(&w[k * c..(k + 1) * c]).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((logits[n * l + k] as f64 - want).abs() < 1e-5, "logit ({n}, {k}): {} vs {want}", logits[n * l + k]);
        }
    }
    // New pad tokens after sequence 0's last real token (positions 3, 4).
    tokens[3] = (tokens[3] + 1) % cfg.vocab_size as u32;
    tokens[4] = (tokens[4] + 3) % cfg.vocab_size as u32;
    model.forward_hidden(&tokens, b, t).unwrap();
    head.forward(&be, model.hidden(), &last, None, b, t).unwrap();
    assert_eq!(head.logits(&be), logits, "padding after the last real token changed the logits");
}

#[test]
fn classification_errors_name_the_problem() {
    let be = CpuBackend::new();
    let e = ClassificationHead::<CpuBackend>::new(&be, 1, 8, 0).err().unwrap().to_string();
    assert!(e.contains("num_labels"), "{e}");
    let cfg = tiny();
    let mut model = perturbed_model(&cfg, 1);
    let mut head = ClassificationHead::new(&be, 2, cfg.n_embd, 0).unwrap();
    model.forward_hidden(&[1, 2, 3, 4], 2, 2).unwrap();
    let e = head.forward(&be, model.hidden(), &[1, 1], Some(&[0, 5]), 2, 2).unwrap_err().to_string();
    assert!(e.contains("label 5") && e.contains("num_labels = 2"), "{e}");
    let e = head.forward(&be, model.hidden(), &[1, 2], None, 2, 2).unwrap_err().to_string();
    assert!(e.contains("last position 2"), "{e}");
}

/// SFT: the loss is the mean next-token loss over the response tokens only (checked against the
/// full logits of an unmasked forward), and the backward agrees with finite differences of that
/// masked loss (a backward that leaked the prompt positions' gradient would not).
#[test]
fn sft_masks_prompt_tokens() {
    let cfg = tiny();
    let mut model = perturbed_model(&cfg, 31);
    let (prompt, response) = (vec![3u32, 1, 4, 1, 5], vec![9u32, 2]);
    let t = 8;
    let (x, y) = sft_example(&prompt, &response, t, 0).unwrap();
    let loss = model.forward(&x, Some(&y), 1, t).unwrap().unwrap();
    let logits = model.logits();
    // Independent: positions 4 and 5 predict the response tokens 9 and 2; nothing else counts.
    let v = cfg.vocab_size;
    let mut manual = vec![IGNORE_INDEX; t];
    manual[4] = 9;
    manual[5] = 2;
    let want = loss_f64(&logits, &manual, v);
    assert!((loss as f64 - want).abs() < 1e-5 * want, "SFT loss {loss} vs response-only mean {want}");
    // Whatever the prompt continues with does not move the loss: the same sequence scored with
    // every next-token target gives a different number.
    let all: Vec<u32> = (0..t).map(|i| if i + 1 < prompt.len() + response.len() { [&prompt[..], &response[..]].concat()[i + 1] } else { IGNORE_INDEX }).collect();
    assert!((loss_f64(&logits, &all, v) - want).abs() > 1e-3, "test needs prompt targets that would change the loss");

    model.zero_grad();
    model.forward(&x, Some(&y), 1, t).unwrap();
    model.backward(1.0).unwrap();
    let grads = model.grads_host();
    let params = model.params_host();
    let tensors: Vec<(String, std::ops::Range<usize>)> = model.table().specs().iter().map(|s| (s.name.clone(), s.range())).collect();
    let mut rng = Rng::new(32);
    let mut objective = |p: &[f32]| {
        model.set_params_host(p);
        model.forward(&x, None, 1, t).unwrap();
        loss_f64(&model.logits(), &manual, v)
    };
    check_tensors("sft", &tensors, &params, &grads, &mut rng, &mut objective);
}
