//! BERT and T5 on CUDA against the same models on the CPU: every objective's loss and every
//! parameter's gradient after one forward + backward (f32 matmuls tight, bf16 within bf16
//! tolerance, the tolerances of cuda_model.rs). The batches carry what real ones do: padded
//! sequences (key padding masks), segments, MLM + next-sentence targets, classification labels,
//! contrastive pairs, and span-corruption pairs for T5 (padded encoder inputs, so the
//! cross-attention is masked too). Lengths are not multiples of 64 (the attention tile) and some
//! exceed it. Learned attention scores (general, additive) run the CUDA learned-score kernels and
//! must match too; an additive width past those kernels' is a ConfigError. One CUDA
//! backend per precision serves every model (shared_cuda: one NVRTC compile each). The GPU tests
//! skip (print why) without a GPU; the CPU fixture check runs everywhere.
#![cfg(feature = "cuda")]

mod shared_cuda;

use smelt_engine::backend::{Backend, ScoreKind, IGNORE_INDEX};
use smelt_engine::cuda::MatmulPrecision;
use smelt_engine::model::objectives::{corrupt_spans, SpanCorruptionConfig};
use smelt_engine::model::{Bert, BertBatch, BertConfig, LayerNormPlacement, Pooling, Positions, T5Batch, T5Config, T5};
use smelt_engine::params::ParamTable;
use smelt_engine::rng::Rng;
use smelt_engine::{CpuBackend, EngineError};

use shared_cuda::shared;

/// f32 matmuls and attention: the CPU's result up to summation order.
const F32_TOL: f64 = 1e-4;
/// bf16 operands (8-bit mantissa) in every matmul and in the attention kernels.
const BF16_TOL: f64 = 3e-2;

/// ‖got − want‖ / ‖want‖ in f64 (the absolute norm when `want` is all zeros).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut d, mut w) = (0.0f64, 0.0f64);
    for (&g, &x) in got.iter().zip(want) {
        d += (g as f64 - x as f64).powi(2);
        w += (x as f64).powi(2);
    }
    if w == 0.0 {
        d.sqrt()
    } else {
        (d / w).sqrt()
    }
}

fn norm(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt()
}

/// Parameters moved away from init (unit gains, zero biases) so that every path carries signal.
/// The LM head's padding (spare values) stays zero.
fn perturb(params: Vec<f32>, table: &ParamTable, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut params: Vec<f32> = params.iter().map(|&x| x + 0.1 * rng.normal() as f32).collect();
    table.zero_spare(&mut params);
    params
}

/// One model run: each objective's loss and the flat gradient.
struct Run {
    losses: Vec<(&'static str, f32)>,
    grads: Vec<f32>,
}

/// Compares two runs: each loss, then each tensor's gradient, within `tol`.
///
/// Adding `q . b_k` to every score of a row leaves the softmax unchanged, so a key bias's
/// gradient is zero up to rounding on both backends; it is measured on the scale of the same
/// attention's query-bias gradient instead of its own (which would be noise over noise).
fn compare(what: &str, table: &ParamTable, cpu: &Run, gpu: &Run, tol: f64) {
    assert_eq!(cpu.losses.len(), gpu.losses.len(), "{what}: objectives differ");
    for ((name, want), (_, got)) in cpu.losses.iter().zip(&gpu.losses) {
        let e = ((got - want) / want).abs() as f64;
        println!("{what}: {name} loss cpu {want} gpu {got} (rel {e:.2e})");
        assert!(got.is_finite() && e <= tol, "{what}: {name} loss {got} vs cpu {want}");
    }
    let mut worst = (0.0f64, String::new());
    for spec in table.specs() {
        let r = spec.range();
        let (g, w) = (&gpu.grads[r.clone()], &cpu.grads[r]);
        assert!(g.iter().all(|x| x.is_finite()), "{what}: non-finite gradient of {}", spec.name);
        let (e, note) = match key_bias_scale(table, &spec.name, &cpu.grads) {
            Some(scale) => {
                let scale = scale.max(norm(w)).max(1e-30);
                (rel_err(g, w) * norm(w) / scale, format!(" (key bias: |cpu| {:.1e}, on the query bias's scale {scale:.1e})", norm(w)))
            }
            None => (rel_err(g, w), String::new()),
        };
        println!("{what}: grad {:<58} rel err {e:.2e}{note}", spec.name);
        assert!(e <= tol, "{what}: gradient of {} differs, rel err {e:.2e} > {tol:.0e}", spec.name);
        if e > worst.0 {
            worst = (e, spec.name.clone());
        }
    }
    println!("{what}: worst gradient rel err {:.2e} ({})", worst.0, worst.1);
}

/// For a key bias (BERT `...key.bias`, T5 `...k.bias`), the norm of the matching query bias's
/// gradient.
fn key_bias_scale(table: &ParamTable, name: &str, grads: &[f32]) -> Option<f64> {
    let query = if let Some(p) = name.strip_suffix(".key.bias") {
        format!("{p}.query.bias")
    } else if let Some(p) = name.strip_suffix(".k.bias") {
        format!("{p}.q.bias")
    } else {
        return None;
    };
    let spec = table.specs().iter().find(|s| s.name == query).unwrap_or_else(|| panic!("{name}: no {query}"));
    Some(norm(&grads[spec.range()]))
}

// ---- BERT ---------------------------------------------------------------------------------------

/// Odd sizes on purpose: V = 300 (no multiple of 8), 4 heads of 16 over 64 channels, FFN 256.
fn bert_cfg(placement: LayerNormPlacement, positions: Positions) -> BertConfig {
    let mut cfg = BertConfig::preset("bert-test").unwrap();
    cfg.vocab_size = 300;
    cfg.max_positions = 96;
    cfg.n_layer = 2;
    cfg.n_head = 4;
    cfg.n_embd = 64;
    cfg.n_inner = 256;
    cfg.ln_placement = placement;
    cfg.positions = positions;
    cfg
}

/// What one BERT batch trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BertTask {
    /// MLM (~15% of the real tokens) + next-sentence, padded, two segments: pre-training.
    Pretrain,
    /// Sequence classification over the pooled [CLS] (tanh pooler), padded.
    Classify,
    /// In-batch InfoNCE over mean-pooled pairs (pooling over real tokens only), padded.
    Contrastive,
}

const BERT_T: usize = 70; // > 64, not a multiple of it

fn bert_batch(task: BertTask, cfg: &BertConfig) -> BertBatch {
    let t = BERT_T;
    let (b, lens): (usize, Vec<u32>) = match task {
        BertTask::Pretrain => (3, vec![70, 45, 13]),
        BertTask::Classify => (4, vec![70, 66, 64, 9]),
        BertTask::Contrastive => (4, vec![70, 50, 65, 20]),
    };
    let v = cfg.vocab_size as u64;
    let mut rng = Rng::new(21 + task as u64);
    let mut x = BertBatch::new(Vec::with_capacity(b * t), b, t);
    let mut segments = Vec::with_capacity(b * t);
    let mut mlm = Vec::with_capacity(b * t);
    for &len in &lens {
        let len = len as usize;
        for i in 0..t {
            // pad id 0 past the length; sentence B in the second half of the real tokens
            x.tokens.push(if i < len { 1 + rng.below(v - 1) as u32 } else { 0 });
            segments.push((i < len && i >= len / 2) as u32);
            let masked = i < len && rng.below(100) < 15;
            mlm.push(if masked { rng.below(v) as u32 } else { IGNORE_INDEX });
        }
    }
    x.lens = Some(lens);
    x.segments = Some(segments);
    match task {
        BertTask::Pretrain => {
            x.mlm_targets = Some(mlm);
            x.nsp_labels = Some(vec![0, 1, 1]);
        }
        BertTask::Classify => x.labels = Some(vec![2, 0, 1, 2]),
        BertTask::Contrastive => x.paired = true,
    }
    x
}

/// The config a task needs: classification adds a 3-label head (and drops next-sentence), the
/// contrastive task pools by mean.
fn bert_task_cfg(task: BertTask, placement: LayerNormPlacement, positions: Positions) -> BertConfig {
    let mut cfg = bert_cfg(placement, positions);
    match task {
        BertTask::Pretrain => {}
        BertTask::Classify => {
            cfg.nsp = false;
            cfg.num_labels = 3;
        }
        BertTask::Contrastive => {
            cfg.nsp = false;
            cfg.pooling = Pooling::Mean;
        }
    }
    cfg
}

fn bert_run<B: Backend>(be: B, cfg: &BertConfig, params: &[f32], x: &BertBatch) -> Run {
    let mut model = Bert::from_params(be, cfg.clone(), params).unwrap();
    model.zero_grad();
    model.forward(x).unwrap().expect("the batch has targets");
    model.backward(0.5).unwrap();
    model.backend().synchronize().unwrap_or_else(|e| panic!("device error: {e}"));
    let l = model.losses();
    let losses = [("mlm", l.mlm), ("nsp", l.nsp), ("classification", l.classification), ("contrastive", l.contrastive)]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
        .collect();
    Run { losses, grads: model.grads_host() }
}

fn bert_vs_cpu(p: MatmulPrecision, task: BertTask, placement: LayerNormPlacement, positions: Positions, tol: f64) {
    bert_cfg_vs_cpu(p, task, bert_task_cfg(task, placement, positions), tol)
}

fn bert_cfg_vs_cpu(p: MatmulPrecision, task: BertTask, cfg: BertConfig, tol: f64) {
    let Some(g) = shared(p) else { return };
    let (placement, positions) = (cfg.ln_placement, cfg.positions);
    let params = perturb(Bert::new(CpuBackend::new(), cfg.clone(), 7).unwrap().params_host(), &Bert::<CpuBackend>::param_table(&cfg), 7);
    let x = bert_batch(task, &cfg);
    let cpu = bert_run(CpuBackend::new(), &cfg, &params, &x);
    let gpu = bert_run(g, &cfg, &params, &x);
    let what = format!("bert {task:?} {p:?} {placement:?} {positions:?} {:?} scores", cfg.scores);
    compare(&what, &Bert::<CpuBackend>::param_table(&cfg), &cpu, &gpu, tol);
}

#[test]
fn bert_pretraining_f32_matches_cpu_tightly() {
    bert_vs_cpu(MatmulPrecision::F32, BertTask::Pretrain, LayerNormPlacement::Post, Positions::Learned, F32_TOL);
    bert_vs_cpu(MatmulPrecision::F32, BertTask::Pretrain, LayerNormPlacement::Pre, Positions::Sinusoidal, F32_TOL);
}

#[test]
fn bert_pretraining_bf16_within_bf16_tolerance() {
    bert_vs_cpu(MatmulPrecision::Bf16, BertTask::Pretrain, LayerNormPlacement::Post, Positions::Learned, BF16_TOL);
}

#[test]
fn bert_classification_matches_cpu() {
    bert_vs_cpu(MatmulPrecision::F32, BertTask::Classify, LayerNormPlacement::Post, Positions::Learned, F32_TOL);
    bert_vs_cpu(MatmulPrecision::Bf16, BertTask::Classify, LayerNormPlacement::Post, Positions::Learned, BF16_TOL);
}

#[test]
fn bert_contrastive_mean_pooling_f32_matches_cpu() {
    // f32 only: the temperature (0.05) multiplies embedding differences by 20 before the
    // softmax, so bf16 rounding would say more about the temperature than about the kernels.
    bert_vs_cpu(MatmulPrecision::F32, BertTask::Contrastive, LayerNormPlacement::Pre, Positions::Learned, F32_TOL);
}

// ---- T5 -----------------------------------------------------------------------------------------

fn t5_cfg(placement: LayerNormPlacement, positions: Positions) -> T5Config {
    let mut cfg = T5Config::preset("t5-test").unwrap();
    cfg.vocab_size = 300;
    cfg.max_positions = 128;
    cfg.n_layer = 2;
    cfg.n_decoder_layer = 2;
    cfg.n_head = 4;
    cfg.n_embd = 64;
    cfg.n_inner = 256;
    cfg.ln_placement = placement;
    cfg.positions = positions;
    cfg
}

/// Span-corruption pairs padded into one batch: three at T5's 15% noise (encoder inputs of
/// different lengths, the longest past 64) and one at 60% noise whose target runs past 64 too.
fn t5_batch(cfg: &T5Config) -> T5Batch {
    let v = cfg.vocab_size as u32;
    let sentinels = 32;
    let mut rng = Rng::new(31);
    let mut pairs = Vec::new();
    for (len, density) in [(90usize, 0.15), (52, 0.15), (14, 0.15), (100, 0.6)] {
        // ids 1.. below the sentinels (0 is the pad and start id)
        let text: Vec<u32> = (0..len).map(|_| 1 + rng.below((v - sentinels - 1) as u64) as u32).collect();
        let sc = SpanCorruptionConfig { vocab_size: v, noise_density: density, mean_span: 3.0, sentinels };
        let c = corrupt_spans(&text, &sc, &mut rng).unwrap();
        pairs.push((c.inputs, c.targets));
    }
    T5Batch::from_pairs(&pairs, 0, 0)
}

fn t5_run<B: Backend>(be: B, cfg: &T5Config, params: &[f32], x: &T5Batch) -> Run {
    let mut model = T5::from_params(be, cfg.clone(), params).unwrap();
    model.zero_grad();
    let loss = model.forward(x).unwrap().expect("the batch has targets");
    model.backward(0.5).unwrap();
    model.backend().synchronize().unwrap_or_else(|e| panic!("device error: {e}"));
    Run { losses: vec![("span corruption", loss)], grads: model.grads_host() }
}

fn t5_vs_cpu(p: MatmulPrecision, placement: LayerNormPlacement, positions: Positions, tol: f64) {
    t5_cfg_vs_cpu(p, t5_cfg(placement, positions), tol)
}

fn t5_cfg_vs_cpu(p: MatmulPrecision, cfg: T5Config, tol: f64) {
    let Some(g) = shared(p) else { return };
    let (placement, positions) = (cfg.ln_placement, cfg.positions);
    let params = perturb(T5::new(CpuBackend::new(), cfg.clone(), 9).unwrap().params_host(), &T5::<CpuBackend>::param_table(&cfg), 9);
    let x = t5_batch(&cfg);
    let cpu = t5_run(CpuBackend::new(), &cfg, &params, &x);
    let gpu = t5_run(g, &cfg, &params, &x);
    let what = format!("t5 {p:?} {placement:?} {positions:?} {:?} scores ({} x {} -> {})", cfg.scores, x.batch, x.enc_len, x.dec_len);
    compare(&what, &T5::<CpuBackend>::param_table(&cfg), &cpu, &gpu, tol);
}

#[test]
fn t5_span_corruption_f32_matches_cpu_tightly() {
    t5_vs_cpu(MatmulPrecision::F32, LayerNormPlacement::Pre, Positions::Sinusoidal, F32_TOL);
    t5_vs_cpu(MatmulPrecision::F32, LayerNormPlacement::Post, Positions::Learned, F32_TOL);
}

#[test]
fn t5_span_corruption_bf16_within_bf16_tolerance() {
    t5_vs_cpu(MatmulPrecision::Bf16, LayerNormPlacement::Pre, Positions::Sinusoidal, BF16_TOL);
}

// ---- learned attention scores ------------------------------------------------------------------

/// BERT pre-training (padded: key masks) with a learned score; the additive one 24 wide (not
/// the head dim 16).
fn bert_scores_vs_cpu(p: MatmulPrecision, kind: ScoreKind, tol: f64) {
    let mut cfg = bert_task_cfg(BertTask::Pretrain, LayerNormPlacement::Post, Positions::Learned);
    cfg.scores = kind;
    cfg.additive_width = 24;
    bert_cfg_vs_cpu(p, BertTask::Pretrain, cfg, tol);
}

/// T5 with a learned score in every attention: encoder self (masked), decoder self (causal) and
/// cross-attention (split source, masked).
fn t5_scores_vs_cpu(p: MatmulPrecision, kind: ScoreKind, tol: f64) {
    let mut cfg = t5_cfg(LayerNormPlacement::Pre, Positions::Sinusoidal);
    cfg.scores = kind;
    cfg.additive_width = 40;
    t5_cfg_vs_cpu(p, cfg, tol);
}

#[test]
fn bert_learned_scores_match_cpu() {
    for kind in [ScoreKind::General, ScoreKind::Additive] {
        bert_scores_vs_cpu(MatmulPrecision::F32, kind, F32_TOL);
        bert_scores_vs_cpu(MatmulPrecision::Bf16, kind, BF16_TOL);
    }
}

#[test]
fn t5_learned_scores_match_cpu() {
    for kind in [ScoreKind::General, ScoreKind::Additive] {
        t5_scores_vs_cpu(MatmulPrecision::F32, kind, F32_TOL);
        t5_scores_vs_cpu(MatmulPrecision::Bf16, kind, BF16_TOL);
    }
}

/// An additive score wider than the CUDA kernels take is a ConfigError naming
/// `additive_width` when the model is built (the CPU builds it).
#[test]
fn too_wide_an_additive_score_is_a_config_error_on_cuda() {
    let mut cfg = bert_cfg(LayerNormPlacement::Post, Positions::Learned);
    cfg.scores = ScoreKind::Additive;
    cfg.additive_width = 129;
    assert!(Bert::new(CpuBackend::new(), cfg.clone(), 1).is_ok(), "the CPU has no width limit");
    let Some(g) = shared(MatmulPrecision::F32) else { return };
    for (what, r) in [("Bert::new", Bert::new(g, cfg.clone(), 1).map(|_| ())), ("T5::new", {
        let mut t = t5_cfg(LayerNormPlacement::Pre, Positions::Sinusoidal);
        t.scores = ScoreKind::Additive;
        t.additive_width = 129;
        T5::new(g, t, 1).map(|_| ())
    })] {
        match r {
            Err(EngineError::Config(e)) => {
                println!("{what} with additive_width 129 on cuda: {e}");
                assert_eq!(e.field, "additive_width", "{what}: {e}");
                assert!(e.message.contains("129") && e.message.contains("128"), "{what}: the message should name the width and the limit: {e}");
            }
            Err(e) => panic!("{what}: expected a ConfigError naming `additive_width`, got {e}"),
            Ok(()) => panic!("{what}: built on cuda with an additive score wider than its kernels take"),
        }
    }
}

// ---- the fixtures themselves (no GPU needed) -----------------------------------------------------

#[test]
fn fixtures_cross_tiles_and_train_on_the_cpu() {
    // The shapes the GPU tests rely on: lengths past one 64-row tile and not a multiple of it,
    // padding in every batch, every objective present and finite.
    for task in [BertTask::Pretrain, BertTask::Classify, BertTask::Contrastive] {
        let cfg = bert_task_cfg(task, LayerNormPlacement::Post, Positions::Learned);
        let x = bert_batch(task, &cfg);
        assert!(x.seq_len > 64 && !x.seq_len.is_multiple_of(64));
        assert!(x.lens.as_ref().unwrap().iter().any(|&l| (l as usize) < x.seq_len), "{task:?}: no padding");
        let params = Bert::new(CpuBackend::new(), cfg.clone(), 7).unwrap().params_host();
        let run = bert_run(CpuBackend::new(), &cfg, &params, &x);
        let want = match task {
            BertTask::Pretrain => 2,
            _ => 1,
        };
        assert_eq!(run.losses.len(), want, "{task:?}: {:?}", run.losses);
        assert!(run.losses.iter().all(|(_, l)| l.is_finite() && *l > 0.0), "{task:?}: {:?}", run.losses);
        assert!(norm(&run.grads) > 0.0, "{task:?}: no gradient");
        // the comparison itself (every tensor name, the key-bias pairing) on two equal runs
        compare(&format!("cpu {task:?}"), &Bert::<CpuBackend>::param_table(&cfg), &run, &run, 0.0);
    }
    if let Some(mlm) = bert_batch(BertTask::Pretrain, &bert_cfg(LayerNormPlacement::Post, Positions::Learned)).mlm_targets {
        let counted = mlm.iter().filter(|&&t| t != IGNORE_INDEX).count();
        assert!(counted > 5, "only {counted} MLM targets");
    }
    let cfg = t5_cfg(LayerNormPlacement::Pre, Positions::Sinusoidal);
    let x = t5_batch(&cfg);
    println!("t5 batch: {} x {} -> {}, encoder lengths {:?}", x.batch, x.enc_len, x.dec_len, x.enc_lens);
    assert!(x.enc_len > 64 && !x.enc_len.is_multiple_of(64) && x.enc_len <= cfg.max_positions, "encoder length {}", x.enc_len);
    assert!(x.dec_len > 64 && !x.dec_len.is_multiple_of(64) && x.dec_len <= cfg.max_positions, "decoder length {}", x.dec_len);
    assert!(x.enc_lens.as_ref().unwrap().iter().any(|&l| (l as usize) < x.enc_len), "no padded encoder input");
    assert!(x.targets.as_ref().unwrap().contains(&IGNORE_INDEX), "no padded target");
    let params = T5::new(CpuBackend::new(), cfg.clone(), 9).unwrap().params_host();
    let run = t5_run(CpuBackend::new(), &cfg, &params, &x);
    assert!(run.losses[0].1.is_finite() && norm(&run.grads) > 0.0);
    compare("cpu t5", &T5::<CpuBackend>::param_table(&cfg), &run, &run, 0.0);
}
