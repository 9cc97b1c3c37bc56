//! BERT and T5 with sinusoidal positions, where the token lookup is multiplied by sqrt(C): the
//! whole backward (the token table's gradient carrying the same factor, the segment table's not)
//! against central finite differences of the forward, and the token tables' starting scale.

use smelt_engine::model::{Bert, BertBatch, BertConfig, LayerNormPlacement, Positions, T5Batch, T5Config, T5};
use smelt_engine::params::{Init, ParamTable};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

/// Checks the analytic gradient against central differences (step `h`) at the largest-gradient
/// entry of every tensor, and at `extra` random entries of the tensor named `token_table`.
fn gradcheck(what: &str, table: &ParamTable, params: &[f32], grads: &[f32], token_table: &str, extra: usize, mut loss_at: impl FnMut(&[f32]) -> f64) {
    let h = 1e-2f32;
    let mut rng = Rng::new(17);
    let mut entries = Vec::new();
    for s in table.specs() {
        let r = s.range();
        entries.push((s.name.clone(), r.clone().max_by(|&a, &b| grads[a].abs().total_cmp(&grads[b].abs())).unwrap(), r.start));
        if s.name == token_table {
            entries.extend((0..extra).map(|_| (s.name.clone(), r.start + rng.below(r.len() as u64) as usize, r.start)));
        }
    }
    let mut p = params.to_vec();
    for (name, i, start) in entries {
        p[i] = params[i] + h;
        let up = loss_at(&p);
        p[i] = params[i] - h;
        let down = loss_at(&p);
        p[i] = params[i];
        let numeric = (up - down) / (2.0 * h as f64);
        let analytic = grads[i] as f64;
        assert!(
            (analytic - numeric).abs() <= 3e-2 * analytic.abs().max(numeric.abs()) + 2e-4,
            "{what}: {name}[{}]: analytic {analytic:e} vs numeric {numeric:e}",
            i - start
        );
    }
}

fn bert_sinusoidal() -> BertConfig {
    let mut cfg = BertConfig::preset("bert-test").unwrap();
    cfg.positions = Positions::Sinusoidal;
    cfg.num_labels = 3;
    cfg
}

/// A padded batch with both segments, MLM targets on every third token, NSP and class labels.
fn bert_batch() -> BertBatch {
    let (b, t, mut rng) = (4, 8, Rng::new(3));
    let mut x = BertBatch::new((0..b * t).map(|_| 4 + rng.below(60) as u32).collect(), b, t);
    x.segments = Some((0..b * t).map(|i| (i % t >= 4) as u32).collect());
    x.lens = Some(vec![8, 6, 7, 5]);
    x.mlm_targets = Some((0..b * t).map(|i| if i % 3 == 0 { 4 + rng.below(60) as u32 } else { u32::MAX }).collect());
    x.nsp_labels = Some(vec![0, 1, 1, 0]);
    x.labels = Some(vec![2, 0, 1, 2]);
    x
}

#[test]
fn bert_sinusoidal_gradient_matches_finite_differences() {
    for placement in [LayerNormPlacement::Post, LayerNormPlacement::Pre] {
        let mut cfg = bert_sinusoidal();
        cfg.ln_placement = placement;
        let mut m = Bert::new(CpuBackend::new(), cfg, 7).unwrap();
        let x = bert_batch();
        m.zero_grad();
        m.forward(&x).unwrap();
        m.backward(1.0).unwrap();
        let (table, params, grads) = (m.table().clone(), m.params_host(), m.grads_host());
        gradcheck(&format!("bert {placement:?}"), &table, &params, &grads, "bert.embeddings.word_embeddings.weight", 8, |p| {
            m.set_params_host(p);
            m.forward(&x).unwrap().unwrap() as f64
        });
    }
}

#[test]
fn t5_sinusoidal_gradient_matches_finite_differences() {
    // `shared` gets gradient from the tied head (unscaled) and both input lookups (scaled)
    for placement in [LayerNormPlacement::Pre, LayerNormPlacement::Post] {
        let mut cfg = T5Config::preset("t5-test").unwrap();
        cfg.ln_placement = placement;
        assert_eq!(cfg.positions, Positions::Sinusoidal);
        let mut m = T5::new(CpuBackend::new(), cfg, 8).unwrap();
        let mut rng = Rng::new(4);
        let mut word = |n: usize| (0..n).map(|_| 1 + rng.below(63) as u32).collect::<Vec<u32>>();
        let pairs = vec![(word(7), word(4)), (word(4), word(2)), (word(6), word(5))];
        let x = T5Batch::from_pairs(&pairs, 0, 0);
        m.zero_grad();
        m.forward(&x).unwrap();
        m.backward(1.0).unwrap();
        let (table, params, grads) = (m.table().clone(), m.params_host(), m.grads_host());
        gradcheck(&format!("t5 {placement:?}"), &table, &params, &grads, "shared.weight", 8, |p| {
            m.set_params_host(p);
            m.forward(&x).unwrap().unwrap() as f64
        });
    }
}

#[test]
fn token_tables_start_at_c_to_the_minus_half_beside_sinusoidal_positions() {
    // C^-0.5 with sinusoidal positions (unit scale once times sqrt(C)), BERT's 0.02 otherwise;
    // the segment table is never scaled and keeps 0.02
    let std_of = |t: &ParamTable, name: &str| match t.spec(t.id(name).unwrap_or_else(|| panic!("no {name}"))).init {
        Init::Normal { std } => std,
        other => panic!("{name} starts {other:?}"),
    };
    let sin = Bert::<CpuBackend>::param_table(&bert_sinusoidal());
    assert_eq!(std_of(&sin, "bert.embeddings.word_embeddings.weight"), 32f32.powf(-0.5));
    assert_eq!(std_of(&sin, "bert.embeddings.token_type_embeddings.weight"), 0.02);
    let learned = Bert::<CpuBackend>::param_table(&BertConfig::preset("bert-test").unwrap());
    assert_eq!(std_of(&learned, "bert.embeddings.word_embeddings.weight"), 0.02);
    let mut t5 = T5Config::preset("t5-test").unwrap();
    assert_eq!(std_of(&T5::<CpuBackend>::param_table(&t5), "shared.weight"), 32f32.powf(-0.5));
    t5.positions = Positions::Learned;
    let t = T5::<CpuBackend>::param_table(&t5);
    assert_eq!(std_of(&t, "shared.weight"), 0.02);
    assert_eq!(std_of(&t, "encoder.embed_positions.weight"), 0.02);

    // and the drawn values have that scale: 64 x 32 entries, sample std within 5%
    let m = T5::new(CpuBackend::new(), T5Config::preset("t5-test").unwrap(), 1).unwrap();
    let r = m.table().range(m.table().id("shared.weight").unwrap());
    let p = &m.params_host()[r];
    let std = (p.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / p.len() as f64).sqrt();
    assert!((std - 32f64.powf(-0.5)).abs() < 0.05 * 32f64.powf(-0.5), "shared.weight drawn with std {std}");
}
