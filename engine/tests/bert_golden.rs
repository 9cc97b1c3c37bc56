//! BERT against golden values from an independent implementation (JAX, float64):
//! `tools/golden/bert_jax.py` wrote `fixtures/bert_tiny_<variant>.safetensors`. Each variant is a
//! padded batch; checked: every head's logits, each objective's loss, and the gradient of the
//! summed loss for every parameter.

mod family_fixture;

use family_fixture::{rel_err, Fixture};
use smelt_engine::backend::ScoreKind;
use smelt_engine::model::{Bert, BertBatch, BertConfig, LayerNormPlacement, Pooling, Positions};
use smelt_engine::CpuBackend;

fn config(f: &Fixture) -> BertConfig {
    let m = &f.meta;
    let u = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("fixture config lacks {k}")) as usize;
    let s = |k: &str| m[k].as_str().unwrap_or_else(|| panic!("fixture config lacks {k}")).to_string();
    BertConfig {
        vocab_size: u("vocab_size"),
        max_positions: u("max_positions"),
        n_layer: u("n_layer"),
        n_head: u("n_head"),
        n_embd: u("n_embd"),
        n_inner: u("n_inner"),
        type_vocab_size: u("type_vocab_size"),
        ln_placement: if s("ln") == "pre" { LayerNormPlacement::Pre } else { LayerNormPlacement::Post },
        positions: if s("positions") == "learned" { Positions::Learned } else { Positions::Sinusoidal },
        scores: match s("scores").as_str() {
            "dot" => ScoreKind::Dot,
            "general" => ScoreKind::General,
            _ => ScoreKind::Additive,
        },
        additive_width: u("additive_width"),
        nsp: m["nsp"].as_bool().unwrap(),
        num_labels: u("num_labels"),
        pooling: if s("pooling") == "cls" { Pooling::Cls } else { Pooling::Mean },
        temperature: m["temperature"].as_f64().unwrap() as f32,
        dropout: 0.0,
    }
}

fn check(variant: &str) {
    let f = Fixture::load(&format!("bert_tiny_{variant}.safetensors"));
    let cfg = config(&f);
    let objectives: Vec<String> = f.meta["objectives"].as_array().unwrap().iter().map(|o| o.as_str().unwrap().to_string()).collect();
    let has = |o: &str| objectives.iter().any(|x| x == o);
    let (b, t) = (f.meta["batch"].as_u64().unwrap() as usize, f.meta["seq_len"].as_u64().unwrap() as usize);
    let table = Bert::<CpuBackend>::param_table(&cfg);
    let mut model = Bert::from_params(CpuBackend::new(), cfg.clone(), &f.flat(&table, "param")).unwrap();

    let batch = BertBatch {
        batch: b,
        seq_len: t,
        tokens: f.ints["tokens"].clone(),
        segments: Some(f.ints["segments"].clone()),
        lens: Some(f.ints["lens"].clone()),
        // -1 in the fixture is IGNORE_INDEX (u32::MAX) once read as u32
        mlm_targets: has("mlm").then(|| f.ints["mlm_targets"].clone()),
        nsp_labels: has("nsp").then(|| f.ints["nsp_labels"].clone()),
        labels: has("cls").then(|| f.ints["labels"].clone()),
        paired: has("contrastive"),
        ..Default::default()
    };
    let loss = model.forward(&batch).unwrap().expect("the batch has targets");
    let want = f.get("loss")[0];
    assert!((loss - want).abs() < 2e-5 * want.abs().max(1.0), "{variant}: loss {loss} vs golden {want}");
    let parts = model.losses();
    for (name, got) in [("mlm", parts.mlm), ("nsp", parts.nsp), ("cls", parts.classification), ("contrastive", parts.contrastive)] {
        assert_eq!(got.is_some(), has(name), "{variant}: objective {name} present");
        if let Some(got) = got {
            let want = f.get(&format!("loss.{name}"))[0];
            assert!((got - want).abs() < 2e-5 * want.abs().max(1.0), "{variant}: {name} loss {got} vs golden {want}");
        }
    }
    if has("mlm") {
        let e = rel_err(&model.logits(), f.get("mlm_logits"));
        assert!(e < 2e-5, "{variant}: MLM logits relative error {e}");
    }
    if cfg.nsp {
        let e = rel_err(&model.nsp_logits(), f.get("nsp_logits"));
        assert!(e < 2e-5, "{variant}: NSP logits relative error {e}");
    }
    if cfg.num_labels > 0 {
        let e = rel_err(&model.class_logits(), f.get("class_logits"));
        assert!(e < 2e-5, "{variant}: classification logits relative error {e}");
    }
    if has("contrastive") {
        let e = rel_err(&model.embeddings(), f.get("embeddings"));
        assert!(e < 2e-5, "{variant}: pooled embeddings relative error {e}");
    }

    model.zero_grad();
    model.backward(1.0).unwrap();
    let grads = model.grads_host();
    let want = f.flat(&table, "grad");
    for s in table.specs() {
        if cfg.scores != ScoreKind::Additive && s.name.ends_with("attention.self.key.bias") {
            // The key bias adds q.b_k (or q^T W b_k) to every score of a row, which softmax
            // ignores: its true gradient is 0 (JAX: ~1e-17), so compare it absolutely against the
            // query bias's gradient scale instead of relatively against its own rounding noise.
            let q = table.id(&s.name.replace("key.bias", "query.bias")).unwrap();
            let scale = grads[table.range(q)].iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let worst = grads[s.range()].iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(worst < 1e-4 * scale, "{variant}: {} should have a ~0 gradient, has {worst} (query bias scale {scale})", s.name);
            continue;
        }
        let e = rel_err(&grads[s.range()], &want[s.range()]);
        assert!(e < 1e-4, "{variant}: gradient of {} off by {e} (relative to its largest entry)", s.name);
    }
}

#[test]
fn bert_post_ln_dot_mlm_nsp_classification_matches_jax() {
    check("post_dot");
}

#[test]
fn bert_pre_ln_sinusoidal_additive_mlm_contrastive_matches_jax() {
    check("pre_additive");
}

#[test]
fn bert_post_ln_general_cls_pooling_contrastive_matches_jax() {
    check("post_general");
}
