//! BERT and T5 behaviour that the golden fixtures do not pin: padding is invisible to real
//! positions, bad batches and configs are errors naming the problem, batch shapes can change.

use smelt_engine::model::{Bert, BertBatch, BertConfig, T5Batch, T5Config, T5};
use smelt_engine::{CpuBackend, EngineError};

fn bert_cfg() -> BertConfig {
    let mut cfg = BertConfig::preset("bert-test").unwrap();
    cfg.num_labels = 3;
    cfg
}

fn batch_error(r: Result<Option<f32>, EngineError>) -> String {
    match r {
        Err(EngineError::Batch(m)) => m,
        other => panic!("expected a batch error, got {other:?}"),
    }
}

#[test]
fn bert_padding_is_invisible_to_real_positions() {
    let mut model = Bert::new(CpuBackend::new(), bert_cfg(), 1).unwrap();
    let (b, t, c) = (2, 8, 32);
    let mut x = BertBatch::new((0..16).map(|i| (i * 7 % 60) as u32).collect(), b, t);
    x.lens = Some(vec![5, 8]);
    model.forward(&x).unwrap();
    let h0 = model.hidden();
    x.tokens[5..8].copy_from_slice(&[61, 62, 63]);
    model.forward(&x).unwrap();
    let h1 = model.hidden();
    assert_eq!(h0[..5 * c], h1[..5 * c], "padded tokens changed real positions");
    assert_eq!(h0[t * c..], h1[t * c..], "another sequence changed");
    assert_ne!(h0[5 * c..t * c], h1[5 * c..t * c], "the padded positions themselves do change");
}

#[test]
fn bert_bad_batches_name_the_problem() {
    let mut model = Bert::new(CpuBackend::new(), bert_cfg(), 1).unwrap();
    let ok = BertBatch::new(vec![4; 8], 2, 4);
    let cases: Vec<(BertBatch, &str)> = vec![
        (BertBatch { lens: Some(vec![0, 4]), ..ok.clone() }, "sequence length 0"),
        (BertBatch { tokens: vec![64; 8], ..ok.clone() }, "token id 64 outside the vocabulary of 64"),
        (BertBatch { segments: Some(vec![2; 8]), ..ok.clone() }, "segment id 2"),
        (BertBatch { labels: Some(vec![3, 0]), ..ok.clone() }, "classification label 3 outside 0..3"),
        (BertBatch { nsp_labels: Some(vec![0]), ..ok.clone() }, "1 next-sentence labels for a batch of 2"),
        (BertBatch { paired: true, ..ok.clone() }, "at least 4"),
        (BertBatch::new(vec![4; 66], 2, 33), "exceeds the model's max_positions 32"),
    ];
    for (x, want) in cases {
        let m = batch_error(model.forward(&x));
        assert!(m.contains(want), "{m:?} should mention {want:?}");
    }
    let mut no_cls = bert_cfg();
    no_cls.num_labels = 0;
    let mut model = Bert::new(CpuBackend::new(), no_cls, 1).unwrap();
    let m = batch_error(model.forward(&BertBatch { labels: Some(vec![0, 1]), ..ok.clone() }));
    assert!(m.contains("no classification head"), "{m}");
    // no targets: logits only, and backward says why it cannot run
    assert_eq!(model.forward(&ok).unwrap(), None);
    assert_eq!(model.logits().len(), 8 * 64);
    assert!(matches!(model.backward(1.0), Err(EngineError::Batch(m)) if m.contains("needs a batch with targets")));
}

#[test]
fn configs_name_the_bad_field() {
    let mut cfg = bert_cfg();
    cfg.n_embd = 31;
    assert_eq!(cfg.validate().unwrap_err().field, "n_embd");
    let mut cfg = bert_cfg();
    cfg.num_labels = 1;
    assert_eq!(cfg.validate().unwrap_err().field, "num_labels");
    let mut cfg = bert_cfg();
    cfg.temperature = 0.0;
    assert_eq!(cfg.validate().unwrap_err().field, "temperature");
    let mut cfg = T5Config::preset("t5-test").unwrap();
    cfg.n_decoder_layer = 0;
    assert_eq!(cfg.validate().unwrap_err().field, "n_decoder_layer");
    assert_eq!(BertConfig::preset("bert-huge").unwrap_err().field, "preset");
    assert!(T5Config::preset("t5-small").is_ok());
    // serde: unknown fields refused, options by name
    let json = r#"{"vocab_size": 10, "max_positions": 8, "n_layer": 1, "n_head": 1, "n_embd": 4, "n_inner": 8, "scores": "additive", "positions": "sinusoidal", "ln_placement": "pre"}"#;
    let cfg: BertConfig = serde_json::from_str(json).unwrap();
    cfg.validate().unwrap();
    assert!(serde_json::from_str::<BertConfig>(&json.replace("\"n_inner\"", "\"n_inne\"")).is_err());
}

#[test]
fn t5_shapes_change_between_calls_and_padding_is_masked() {
    let mut model = T5::new(CpuBackend::new(), T5Config::preset("t5-test").unwrap(), 2).unwrap();
    let pairs = vec![(vec![5, 6, 7, 8, 9], vec![10, 11, 12]), (vec![5, 6], vec![13])];
    let x = T5Batch::from_pairs(&pairs, 0, 0);
    assert_eq!((x.enc_len, x.dec_len), (5, 3));
    assert_eq!(x.dec_tokens, vec![0, 10, 11, 0, 13, 0]);
    let loss = model.forward(&x).unwrap().unwrap();
    // the second pair alone: its padding in the batch above must not have mattered
    let alone = T5Batch::from_pairs(&pairs[1..], 0, 0);
    model.forward(&alone).unwrap();
    let l_alone = model.logits();
    model.forward(&x).unwrap();
    let v = 64;
    let l_batch = model.logits();
    let (row, want) = (&l_batch[3 * v..4 * v], &l_alone[..v]);
    for i in 0..v {
        assert!((row[i] - want[i]).abs() < 1e-5, "logit {i} of the padded pair differs: {} vs {}", row[i], want[i]);
    }
    assert!(loss.is_finite() && loss > 0.0);
    let m = batch_error(model.forward(&T5Batch { enc_lens: Some(vec![6, 2]), ..x.clone() }));
    assert!(m.contains("encoder length 6 outside 1..=5"), "{m}");
}

/// A new T5's tied head reads the decoder output times C^-0.5, so it starts near the uniform
/// loss (it started at about twice it); a config written before `scaled_head` existed reads as
/// false and computes the unscaled head its weights were trained with.
#[test]
fn t5_scales_its_tied_head_and_an_older_config_does_not() {
    let new = T5Config::preset("t5-tiny").unwrap();
    assert!(new.scaled_head);
    let mut json = serde_json::to_value(&new).unwrap();
    json.as_object_mut().unwrap().remove("scaled_head");
    let old: T5Config = serde_json::from_value(json).unwrap();
    assert!(!old.scaled_head);

    let mut scaled = T5::new(CpuBackend::new(), new.clone(), 5).unwrap();
    let mut unscaled = T5::from_params(CpuBackend::new(), old, &scaled.params_host()).unwrap();
    let pairs = vec![(vec![5, 6, 7, 8, 9, 10, 11, 12], vec![10, 11, 12, 13]), (vec![20, 21, 22], vec![30, 31])];
    let x = T5Batch::from_pairs(&pairs, 0, 0);
    let loss = scaled.forward(&x).unwrap().unwrap();
    unscaled.forward(&x).unwrap();
    let s = (new.n_embd as f32).powf(-0.5);
    for (a, b) in scaled.logits().iter().zip(unscaled.logits()) {
        assert!((a - s * b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {s} x {b}");
    }
    // at initialisation: within a few tenths of ln V (256 ids), where the unscaled head sat near 2 ln V
    let uniform = (new.vocab_size as f32).ln();
    assert!((loss - uniform).abs() < 0.5, "a new T5 starts at {loss}, ln V is {uniform}");
}
