//! GPT fine-tuning's own path on CUDA against the CPU: the classification head pools each
//! sequence's last real token from the final hidden states, and its gradient enters the GPT
//! through `backward_hidden` (f32, not the LM head's bf16 activation). Loss, logits, the head's
//! and every GPT tensor's gradient, f32 matmuls tight and bf16 within bf16 tolerance (those of
//! cuda_model.rs), both LayerNorm placements. SFT is the LM loss with ignored targets, which
//! cuda_model.rs covers; BERT classification and T5 seq2seq are cuda_family.rs's. Skips (prints
//! why) without a GPU.
#![cfg(feature = "cuda")]

mod compare;
mod shared_cuda;

use smelt_engine::backend::Backend;
use smelt_engine::cuda::MatmulPrecision;
use smelt_engine::model::heads::ClassificationHead;
use smelt_engine::model::{Gpt, GptConfig, LayerNormPlacement};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

use compare::rel_err;
use shared_cuda::shared;

/// T = 70 crosses the 64-row attention tile; 3 labels; head dim 16.
fn cfg(ln_placement: LayerNormPlacement) -> GptConfig {
    GptConfig { vocab_size: 97, block_size: 80, n_layer: 2, n_head: 4, n_embd: 64, ln_placement, positions: Default::default() }
}

/// One classification micro-batch: right-padded tokens, each sequence's last real position, labels.
struct Batch {
    tokens: Vec<u32>,
    last: Vec<usize>,
    labels: Vec<u32>,
    b: usize,
    t: usize,
}

fn batch(vocab: usize) -> Batch {
    let (b, t) = (3, 70);
    let mut rng = Rng::new(21);
    let last = vec![69, 40, 3];
    let mut tokens: Vec<u32> = (0..b * t).map(|_| 1 + rng.below(vocab as u64 - 1) as u32).collect();
    for (s, &l) in last.iter().enumerate() {
        tokens[s * t + l + 1..(s + 1) * t].fill(0);
    }
    Batch { tokens, last, labels: vec![2, 0, 1], b, t }
}

/// What one forward + backward gives: loss, logits, the GPT's gradient, the head's gradient.
struct Run {
    loss: f32,
    logits: Vec<f32>,
    gpt_grads: Vec<f32>,
    head_grads: Vec<f32>,
}

fn run<B: Backend>(be: B, cfg: &GptConfig, gpt: &[f32], head_w: &[f32], x: &Batch) -> (Run, Gpt<B>) {
    let mut model = Gpt::from_params(be, cfg.clone(), gpt).unwrap();
    let mut head = ClassificationHead::from_params(model.backend(), 3, cfg.n_embd, head_w).unwrap();
    model.zero_grad();
    head.zero_grad(model.backend());
    model.forward_hidden(&x.tokens, x.b, x.t).unwrap();
    let loss = head.forward(model.backend(), model.hidden(), &x.last, Some(&x.labels), x.b, x.t).unwrap().expect("labels given");
    let logits = head.logits(model.backend());
    let dh = head.backward(model.backend(), 0.5).unwrap();
    model.backward_hidden(dh).unwrap();
    model.backend().synchronize().unwrap_or_else(|e| panic!("device error: {e}"));
    let head_grads = head.grads_host(model.backend());
    (Run { loss, logits, gpt_grads: model.grads_host(), head_grads }, model)
}

fn compare_with_cpu(p: MatmulPrecision, placement: LayerNormPlacement, tol: f64) {
    let Some(gpu) = shared(p) else { return };
    let cfg = cfg(placement);
    // Parameters moved away from init so that every path carries signal; a head larger than
    // its init so the pooled features matter for the loss.
    let mut rng = Rng::new(5);
    let mut gpt: Vec<f32> = Gpt::new(CpuBackend::new(), cfg.clone(), 3).unwrap().params_host().iter().map(|&x| x + 0.1 * rng.normal() as f32).collect();
    Gpt::<CpuBackend>::param_table(&cfg).zero_spare(&mut gpt); // the LM head's padding stays zero
    let head_w: Vec<f32> = (0..3 * cfg.n_embd).map(|_| 0.3 * rng.normal() as f32).collect();
    let x = batch(cfg.vocab_size);
    let (want, model) = run(CpuBackend::new(), &cfg, &gpt, &head_w, &x);
    let (got, _) = run(gpu, &cfg, &gpt, &head_w, &x);
    let what = format!("{p:?} {placement:?}");
    let le = ((got.loss - want.loss) / want.loss).abs() as f64;
    println!("{what}: loss cpu {} gpu {} (rel {le:.2e}); logits rel {:.2e}", want.loss, got.loss, rel_err(&got.logits, &want.logits));
    assert!(le <= tol, "{what}: loss {} vs cpu {}", got.loss, want.loss);
    assert!(rel_err(&got.logits, &want.logits) <= tol, "{what}: logits differ");
    let e = rel_err(&got.head_grads, &want.head_grads);
    println!("{what}: grad score.weight rel err {e:.2e}");
    assert!(e <= tol, "{what}: the head's gradient differs, rel err {e:.2e} > {tol:.0e}");
    for spec in model.table().specs() {
        let r = spec.range();
        let e = rel_err(&got.gpt_grads[r.clone()], &want.gpt_grads[r]);
        println!("{what}: grad {:<24} rel err {e:.2e}", spec.name);
        assert!(e <= tol, "{what}: gradient of {} differs, rel err {e:.2e} > {tol:.0e}", spec.name);
    }
}

#[test]
fn classification_f32_matmuls_match_cpu_tightly() {
    compare_with_cpu(MatmulPrecision::F32, LayerNormPlacement::Pre, 1e-4);
    compare_with_cpu(MatmulPrecision::F32, LayerNormPlacement::Post, 1e-4);
}

#[test]
fn classification_bf16_matmuls_match_cpu_within_bf16_tolerance() {
    compare_with_cpu(MatmulPrecision::Bf16, LayerNormPlacement::Pre, 3e-2);
    compare_with_cpu(MatmulPrecision::Bf16, LayerNormPlacement::Post, 3e-2);
}

/// The padding after a sequence's last real token must not change its logits on CUDA either
/// (a causal model; the pooled row is the last real one): a run with the padding replaced by
/// other tokens gives the same logits, bit for bit.
#[test]
fn classification_ignores_the_padding_on_cuda() {
    let Some(gpu) = shared(MatmulPrecision::Bf16) else { return };
    let cfg = cfg(LayerNormPlacement::Pre);
    let gpt = Gpt::new(CpuBackend::new(), cfg.clone(), 4).unwrap().params_host();
    let mut rng = Rng::new(6);
    let head_w: Vec<f32> = (0..3 * cfg.n_embd).map(|_| 0.3 * rng.normal() as f32).collect();
    let x = batch(cfg.vocab_size);
    let mut other = Batch { tokens: x.tokens.clone(), last: x.last.clone(), labels: x.labels.clone(), b: x.b, t: x.t };
    for (s, &l) in x.last.iter().enumerate() {
        for tok in &mut other.tokens[s * x.t + l + 1..(s + 1) * x.t] {
            *tok = 1 + rng.below(cfg.vocab_size as u64 - 1) as u32;
        }
    }
    let (a, _) = run(gpu, &cfg, &gpt, &head_w, &x);
    let (b, _) = run(gpu, &cfg, &gpt, &head_w, &other);
    assert_eq!(a.logits, b.logits, "the padding changed the pooled logits");
}

/// The harness itself, on the CPU (runs everywhere): every GPT tensor and the head get a
/// nonzero gradient from the classification loss, so the comparisons above compare signal.
#[test]
fn harness_runs_on_the_cpu() {
    let cfg = cfg(LayerNormPlacement::Pre);
    let gpt = Gpt::new(CpuBackend::new(), cfg.clone(), 3).unwrap().params_host();
    let mut rng = Rng::new(5);
    let head_w: Vec<f32> = (0..3 * cfg.n_embd).map(|_| 0.3 * rng.normal() as f32).collect();
    let (r, model) = run(CpuBackend::new(), &cfg, &gpt, &head_w, &batch(cfg.vocab_size));
    assert!(r.loss.is_finite() && r.loss > 0.0, "loss {}", r.loss);
    assert!(r.head_grads.iter().any(|&g| g != 0.0), "the head got no gradient");
    for spec in model.table().specs() {
        assert!(r.gpt_grads[spec.range()].iter().any(|&g| g != 0.0), "{} got no gradient", spec.name);
    }
}
