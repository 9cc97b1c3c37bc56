//! GPT against golden values from an independent implementation (JAX, float64):
//! `tools/golden/gpt_jax.py` wrote `fixtures/gpt_tiny_{preln,postln,rotary}.safetensors`.
//! Checks logits, loss, every parameter's gradient, and three clipped AdamW steps.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors};
use smelt_engine::backend::Backend;
use smelt_engine::model::{Gpt, GptConfig, GptPositions, LayerNormPlacement};
use smelt_engine::optim::{AdamW, AdamWConfig};
use smelt_engine::CpuBackend;

struct Fixture {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    ints: HashMap<String, Vec<u32>>,
}

fn load(name: &str) -> Fixture {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut f = Fixture { tensors: HashMap::new(), ints: HashMap::new() };
    for (name, t) in st.tensors() {
        let data = t.data();
        match t.dtype() {
            Dtype::F32 => {
                let v = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                f.tensors.insert(name, (t.shape().to_vec(), v));
            }
            Dtype::I32 => {
                let v = data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect();
                f.ints.insert(name, v);
            }
            d => panic!("unexpected dtype {d:?}"),
        }
    }
    f
}

impl Fixture {
    fn get(&self, name: &str) -> &[f32] {
        &self.tensors.get(name).unwrap_or_else(|| panic!("fixture lacks {name}")).1
    }
    /// The flat buffer for `cfg`'s table from tensors named `prefix.<hf name>`.
    fn flat(&self, cfg: &GptConfig, prefix: &str) -> Vec<f32> {
        let table = Gpt::<CpuBackend>::param_table(cfg);
        let mut out = vec![0.0; table.total()];
        for s in table.specs() {
            let (shape, v) = &self.tensors[&format!("{prefix}.{}", s.name)];
            assert_eq!(shape, &s.shape, "{}", s.name);
            out[s.range()].copy_from_slice(v);
        }
        out
    }
}

fn config(placement: LayerNormPlacement, positions: GptPositions) -> GptConfig {
    GptConfig { vocab_size: 37, block_size: 16, n_layer: 2, n_head: 3, n_embd: 24, ln_placement: placement, positions }
}

/// max |a - b| / max(max |b|, floor): one scale for a whole tensor, so tiny entries do not
/// dominate.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check(fixture: &str, placement: LayerNormPlacement, positions: GptPositions) {
    let f = load(fixture);
    let cfg = config(placement, positions);
    let (b, t) = (3, 11);
    let tokens = &f.ints["tokens"];
    let targets = &f.ints["targets"];
    let mut model = Gpt::from_params(CpuBackend::new(), cfg.clone(), &f.flat(&cfg, "param")).unwrap();

    let loss = model.forward(tokens, Some(targets), b, t).unwrap().unwrap();
    let want_loss = f.get("loss")[0];
    assert!((loss - want_loss).abs() < 1e-5, "loss {loss} vs golden {want_loss}");
    let e = rel_err(&model.logits(), f.get("logits"));
    assert!(e < 1e-5, "logits relative error {e}");

    model.zero_grad();
    model.backward(1.0).unwrap();
    let grads = model.grads_host();
    let want = f.flat(&cfg, "grad");
    for s in model.table().specs() {
        let e = rel_err(&grads[s.range()], &want[s.range()]);
        assert!(e < 1e-4, "gradient of {} off by {e} (relative to its largest entry)", s.name);
    }

    // Three full-batch steps: clip to norm 1, AdamW lr 1e-2, betas (0.9, 0.95), wd 0.1 on the
    // matmul weights only.
    let hp = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, decay_embeddings: false, grad_clip: Some(1.0) };
    let mut opt = AdamW::new(model.backend(), model.table(), hp).unwrap();
    for step in 0..3 {
        let loss = model.forward(tokens, Some(targets), b, t).unwrap().unwrap();
        let want = f.get("step_loss")[step];
        assert!((loss - want).abs() < 1e-4 * want.abs().max(1.0), "step {step}: loss {loss} vs golden {want}");
        model.zero_grad();
        model.backward(1.0).unwrap();
        let (be, _, params, grads) = model.params_and_grads();
        let report = opt.step(be, params, grads, 1e-2, step as u64).unwrap();
        let want = f.get("step_grad_norm")[step];
        assert!((report.grad_norm - want).abs() < 1e-4 * want, "step {step}: grad norm {} vs golden {want}", report.grad_norm);
    }
    let got = model.params_host();
    let want = f.flat(&cfg, "final");
    let c = cfg.n_embd;
    for s in model.table().specs() {
        let (got, want) = (&got[s.range()], &want[s.range()]);
        if s.name.ends_with("attn.c_attn.bias") {
            // The key bias adds q.b_k to every score of a row, which softmax ignores: its true
            // gradient is 0 (JAX: ~1e-18). Adam divides that by its own magnitude, so in f32 the
            // rounding noise of a zero gradient moves it by up to lr per step; in float64 it stays
            // put. Compare the query and value parts, where the gradient is real.
            let (q, v) = (0..c, 2 * c..3 * c);
            for (part, r) in [("query", q), ("value", v)] {
                let e = rel_err(&got[r.clone()], &want[r]);
                assert!(e < 1e-4, "after 3 AdamW steps {} ({part} part) off by {e}", s.name);
            }
            continue;
        }
        let e = rel_err(got, want);
        assert!(e < 1e-4, "after 3 AdamW steps {} off by {e}", s.name);
    }
    let _ = model.backend().name();
}

#[test]
fn pre_ln_gpt_matches_jax() {
    check("gpt_tiny_preln.safetensors", LayerNormPlacement::Pre, GptPositions::Learned);
}

#[test]
fn post_ln_gpt_matches_jax() {
    check("gpt_tiny_postln.safetensors", LayerNormPlacement::Post, GptPositions::Learned);
}

/// Rotary positions (RoPE) in every layer instead of the position table: q and k turned in
/// the forward pass, dq and dk turned back in the backward pass.
#[test]
fn rotary_gpt_matches_jax() {
    check("gpt_tiny_rotary.safetensors", LayerNormPlacement::Pre, GptPositions::Rotary);
}
