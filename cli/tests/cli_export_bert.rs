//! `smelt export hf` on BERT models: config.json fields, and every tensor's name, shape and dtype
//! against the state dict transformers' `BertForPreTraining`, `BertForMaskedLM` and
//! `BertForSequenceClassification` save (written out here from transformers' BERT modules, not
//! from smelt's parameter table), read back by parsing the safetensors header by hand; the values
//! are the model's own; a BERT checkpoint exports like a model file; what transformers' BERT
//! cannot express (pre-LN, sinusoidal positions, general / additive scores) and T5 are refused
//! with messages naming why; `smelt export logits` writes the MLM logits. The logits comparison
//! with transformers itself is `tools/hf/check_bert_export.py` (needs torch and transformers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use smelt_checkpoint::manifest::{DataPosition, FORMAT};
use smelt_checkpoint::{commit, Lineage, ModelConfig, Snapshot, TrainerJson, UploadOptions};
use smelt_corpus::{StoreDir, Tokenizer};
use smelt_engine::backend::ScoreKind;
use smelt_engine::model::{Bert, BertConfig, LayerNormPlacement, Positions, T5Config, T5};
use smelt_engine::rng::Rng;
use smelt_engine::train::TrainerState;
use smelt_engine::CpuBackend;
use smelt_jobspec::{BertSpecials, T5Specials};
use smelt_worker::model_file::{save_family, FamilyModel};

fn smelt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smelt")).args(args).env("RUST_LOG", "warn").output().expect("run smelt")
}

fn text_of(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The char tokenizer's text: 6 ids, so the BERT vocabulary is 6 + [PAD] [CLS] [SEP] [MASK].
const TEXT: &str = "abcdef";
const BASE: usize = 6;
const VOCAB: usize = BASE + 4;

/// `bert-test` (2 layers, 2 heads, 32 wide, 32 positions) with the char vocabulary, changed by
/// `edit`.
fn config(edit: impl Fn(&mut BertConfig)) -> BertConfig {
    let mut c = BertConfig::preset("bert-test").unwrap();
    c.vocab_size = VOCAB;
    edit(&mut c);
    c
}

/// Writes a freshly initialised BERT model file (`bert/1`); returns its path.
fn write_bert(dir: &Path, name: &str, cfg: &BertConfig) -> PathBuf {
    let tok = Tokenizer::fit("char", TEXT).unwrap();
    let params = Bert::new(CpuBackend::new(), cfg.clone(), 5).unwrap().params_host();
    let path = dir.join(format!("{name}.safetensors"));
    let model = FamilyModel::Bert { config: cfg.clone(), specials: BertSpecials::new(BASE as u32) };
    save_family(&path, &model, &tok, &params, &[("objective", "mlm".into())]).unwrap();
    path
}

/// One tensor as the safetensors header describes it.
#[derive(Debug, PartialEq)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    offsets: (usize, usize),
}

/// The header of a safetensors file, parsed by hand (u64 little-endian length, then JSON):
/// (tensors by name, metadata, byte offset where the data starts).
fn header(bytes: &[u8]) -> (BTreeMap<String, Entry>, BTreeMap<String, String>, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let json: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut tensors = BTreeMap::new();
    let mut meta = BTreeMap::new();
    for (k, v) in json.as_object().unwrap() {
        if k == "__metadata__" {
            for (mk, mv) in v.as_object().unwrap() {
                meta.insert(mk.clone(), mv.as_str().unwrap().to_string());
            }
            continue;
        }
        let shape = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let o = v["data_offsets"].as_array().unwrap();
        let offsets = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
        tensors.insert(k.clone(), Entry { dtype: v["dtype"].as_str().unwrap().to_string(), shape, offsets });
    }
    (tensors, meta, 8 + n)
}

/// Which transformers class, and so which heads.
#[derive(Clone, Copy, PartialEq)]
enum Class {
    PreTraining,
    MaskedLm,
    SequenceClassification(usize),
}

/// The state dict transformers' `save_pretrained` writes for these sizes: `nn.Linear` weights
/// (out, in); the MLM decoder (`cls.predictions.decoder.{weight,bias}`) is tied to the word
/// embeddings and `cls.predictions.bias`, so it is not stored; BertForMaskedLM has no pooler;
/// BertForSequenceClassification has no MLM head.
fn bert_layout(class: Class, v: usize, positions: usize, types: usize, c: usize, inner: usize, layers: usize) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>| assert!(m.insert(name, shape).is_none());
    put("bert.embeddings.word_embeddings.weight".into(), vec![v, c]);
    put("bert.embeddings.position_embeddings.weight".into(), vec![positions, c]);
    put("bert.embeddings.token_type_embeddings.weight".into(), vec![types, c]);
    put("bert.embeddings.LayerNorm.weight".into(), vec![c]);
    put("bert.embeddings.LayerNorm.bias".into(), vec![c]);
    for i in 0..layers {
        for (name, shape) in [
            ("attention.self.query.weight", vec![c, c]),
            ("attention.self.query.bias", vec![c]),
            ("attention.self.key.weight", vec![c, c]),
            ("attention.self.key.bias", vec![c]),
            ("attention.self.value.weight", vec![c, c]),
            ("attention.self.value.bias", vec![c]),
            ("attention.output.dense.weight", vec![c, c]),
            ("attention.output.dense.bias", vec![c]),
            ("attention.output.LayerNorm.weight", vec![c]),
            ("attention.output.LayerNorm.bias", vec![c]),
            ("intermediate.dense.weight", vec![inner, c]),
            ("intermediate.dense.bias", vec![inner]),
            ("output.dense.weight", vec![c, inner]),
            ("output.dense.bias", vec![c]),
            ("output.LayerNorm.weight", vec![c]),
            ("output.LayerNorm.bias", vec![c]),
        ] {
            put(format!("bert.encoder.layer.{i}.{name}"), shape);
        }
    }
    if class != Class::MaskedLm {
        put("bert.pooler.dense.weight".into(), vec![c, c]);
        put("bert.pooler.dense.bias".into(), vec![c]);
    }
    if !matches!(class, Class::SequenceClassification(_)) {
        put("cls.predictions.transform.dense.weight".into(), vec![c, c]);
        put("cls.predictions.transform.dense.bias".into(), vec![c]);
        put("cls.predictions.transform.LayerNorm.weight".into(), vec![c]);
        put("cls.predictions.transform.LayerNorm.bias".into(), vec![c]);
        put("cls.predictions.bias".into(), vec![v]);
    }
    match class {
        Class::PreTraining => {
            put("cls.seq_relationship.weight".into(), vec![2, c]);
            put("cls.seq_relationship.bias".into(), vec![2]);
        }
        Class::SequenceClassification(labels) => {
            put("classifier.weight".into(), vec![labels, c]);
            put("classifier.bias".into(), vec![labels]);
        }
        Class::MaskedLm => {}
    }
    m
}

/// Exports `model` into `out`, asserting success; returns (config.json, safetensors bytes).
fn export(model: &str, out: &Path) -> (serde_json::Value, Vec<u8>) {
    let o = smelt(&["export", "hf", model, out.to_str().unwrap()]);
    assert!(o.status.success(), "export failed: {}", text_of(&o));
    let cfg = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    (cfg, std::fs::read(out.join("model.safetensors")).unwrap())
}

/// Names, shapes and dtypes against `want`; offsets tile the data; every value is the source
/// file's own, bit for bit.
fn check_tensors(bytes: &[u8], want: &BTreeMap<String, Vec<usize>>, src: &[u8]) {
    let (tensors, meta, data_start) = header(bytes);
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"), "transformers needs format = pt");
    let got: BTreeMap<String, Vec<usize>> = tensors.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect();
    assert_eq!(&got, want, "tensor names and shapes against transformers' BERT layout");
    assert!(tensors.values().all(|e| e.dtype == "F32"), "every tensor is F32");
    let mut spans: Vec<(usize, usize, usize)> = tensors.values().map(|e| (e.offsets.0, e.offsets.1, e.shape.iter().product::<usize>() * 4)).collect();
    spans.sort();
    let mut at = 0;
    for (a, b, n) in spans {
        assert_eq!((a, b - a), (at, n));
        at = b;
    }
    assert_eq!(data_start + at, bytes.len());
    let (src_tensors, _, src_start) = header(src);
    for (name, e) in &tensors {
        let s = &src_tensors[name];
        assert_eq!(&bytes[data_start + e.offsets.0..data_start + e.offsets.1], &src[src_start + s.offsets.0..src_start + s.offsets.1], "values of {name}");
    }
}

/// The config fields every BERT export has, for `bert-test` with the char vocabulary.
fn check_common_config(cfg: &serde_json::Value) {
    assert_eq!(cfg["model_type"], "bert");
    assert_eq!(cfg["hidden_act"], "gelu_new", "smelt's GELU is the tanh approximation");
    assert_eq!(cfg["layer_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(cfg["position_embedding_type"], "absolute");
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["attention_probs_dropout_prob"].as_f64(), Some(0.0));
    let sizes = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings", "type_vocab_size"]
        .map(|k| cfg[k].as_u64().unwrap_or_else(|| panic!("config.json lacks {k}")) as usize);
    assert_eq!(sizes, [VOCAB, 32, 2, 2, 128, 32, 2]);
    // [PAD] [CLS] [SEP] [MASK] sit right above the tokenizer's ids.
    assert_eq!(cfg["pad_token_id"].as_u64(), Some(BASE as u64));
    assert_eq!(cfg["smelt_specials"], serde_json::json!({"base_vocab": 6, "pad": 6, "cls": 7, "sep": 8, "mask": 9}));
}

#[test]
fn mlm_nsp_bert_exports_as_bert_for_pretraining() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_bert(dir.path(), "bert", &config(|_| {}));
    let (cfg, bytes) = export(model.to_str().unwrap(), &dir.path().join("hf"));
    check_common_config(&cfg);
    assert_eq!(cfg["architectures"], serde_json::json!(["BertForPreTraining"]));
    assert_eq!(cfg["hidden_dropout_prob"].as_f64(), Some(0.0));
    check_tensors(&bytes, &bert_layout(Class::PreTraining, VOCAB, 32, 2, 32, 128, 2), &std::fs::read(&model).unwrap());
    assert!(dir.path().join("hf/smelt_tokenizer.json").exists());
}

#[test]
fn mlm_only_bert_with_dropout_exports_as_bert_for_masked_lm() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_bert(dir.path(), "mlm", &config(|c| {
        c.nsp = false;
        c.dropout = 0.1;
    }));
    let (cfg, bytes) = export(model.to_str().unwrap(), &dir.path().join("hf"));
    check_common_config(&cfg);
    assert_eq!(cfg["architectures"], serde_json::json!(["BertForMaskedLM"]));
    assert!((cfg["hidden_dropout_prob"].as_f64().unwrap() - 0.1).abs() < 1e-6, "{}", cfg["hidden_dropout_prob"]);
    check_tensors(&bytes, &bert_layout(Class::MaskedLm, VOCAB, 32, 2, 32, 128, 2), &std::fs::read(&model).unwrap());
}

#[test]
fn classifier_bert_exports_as_bert_for_sequence_classification() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_bert(dir.path(), "cls", &config(|c| {
        c.nsp = false;
        c.num_labels = 3;
    }));
    let (cfg, bytes) = export(model.to_str().unwrap(), &dir.path().join("hf"));
    check_common_config(&cfg);
    assert_eq!(cfg["architectures"], serde_json::json!(["BertForSequenceClassification"]));
    assert_eq!(cfg["num_labels"].as_u64(), Some(3));
    assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}));
    assert_eq!(cfg["label2id"], serde_json::json!({"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}));
    // smelt applies no dropout to the pooled output before the classifier.
    assert_eq!(cfg["classifier_dropout"].as_f64(), Some(0.0));
    check_tensors(&bytes, &bert_layout(Class::SequenceClassification(3), VOCAB, 32, 2, 32, 128, 2), &std::fs::read(&model).unwrap());
}

/// A committed BERT checkpoint (the checkpoint crate's own writer): exported after verification,
/// like a model file.
#[test]
fn bert_checkpoint_exports_like_a_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(|_| {});
    let params = Bert::new(CpuBackend::new(), cfg.clone(), 9).unwrap().params_host();
    let n = params.len();
    let snapshot = Snapshot {
        m: vec![0.0; n],
        v: vec![0.0; n],
        params,
        trainer: TrainerJson {
            format: FORMAT.into(),
            step: 10,
            job_id: "job-000003".into(),
            attempt: 1,
            data: DataPosition { samples_consumed: 40, global_batch: 4, seed: 1 },
            trainer: TrainerState { step: 10, optimizer_steps: 10, data_rng: Rng::new(1) },
            model: ModelConfig::Bert { bert: cfg, specials: BertSpecials::new(BASE as u32) },
            head: None,
            tokenizer: Tokenizer::fit("char", TEXT).unwrap(),
            spec_toml: String::new(),
            lineage: Lineage::default(),
            smelt_version: "test".into(),
        },
    };
    let store = dir.path().join("store");
    let root = StoreDir::open(store.join("jobs/job-000003/ckpt").to_str().unwrap()).unwrap();
    commit(&root, &snapshot, &UploadOptions::default()).unwrap();
    let step_dir = store.join("jobs/job-000003/ckpt/00000010");
    let (cfg, bytes) = export(step_dir.to_str().unwrap(), &dir.path().join("hf"));
    check_common_config(&cfg);
    assert_eq!(cfg["architectures"], serde_json::json!(["BertForPreTraining"]));
    check_tensors(&bytes, &bert_layout(Class::PreTraining, VOCAB, 32, 2, 32, 128, 2), &std::fs::read(step_dir.join("model.safetensors")).unwrap());
}

/// Exports `model` expecting a refusal; returns its message, having checked nothing was written.
fn refused(model: &Path, out: &Path) -> String {
    let o = smelt(&["export", "hf", model.to_str().unwrap(), out.to_str().unwrap()]);
    let e = text_of(&o);
    assert!(!o.status.success(), "exported a model it should refuse: {e}");
    assert!(!out.join("model.safetensors").exists() && !out.join("config.json").exists(), "files written for a refused export");
    e
}

#[test]
fn export_refuses_what_transformers_bert_cannot_express() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let e = refused(&write_bert(dir.path(), "pre", &config(|c| c.ln_placement = LayerNormPlacement::Pre)), &out);
    assert!(e.contains("ln_placement = \"pre\"") && e.contains("post-LN"), "{e}");
    let e = refused(&write_bert(dir.path(), "sin", &config(|c| c.positions = Positions::Sinusoidal)), &out);
    assert!(e.contains("positions = \"sinusoidal\"") && e.contains("learned position"), "{e}");
    let e = refused(&write_bert(dir.path(), "add", &config(|c| c.scores = ScoreKind::Additive)), &out);
    assert!(e.contains("scores = \"additive\"") && e.contains("dot product"), "{e}");
    let e = refused(&write_bert(dir.path(), "gen", &config(|c| c.scores = ScoreKind::General)), &out);
    assert!(e.contains("scores = \"general\""), "{e}");
    // Every reason at once, so one attempt tells all.
    let e = refused(
        &write_bert(dir.path(), "all", &config(|c| {
            c.ln_placement = LayerNormPlacement::Pre;
            c.scores = ScoreKind::Additive;
        })),
        &out,
    );
    assert!(e.contains("ln_placement") && e.contains("additive"), "{e}");

    // T5: named, with why it is not transformers' T5.
    let mut t5 = T5Config::preset("t5-test").unwrap();
    let specials = T5Specials { base_vocab: BASE as u32, pad: BASE as u32, sentinels: 4 };
    t5.vocab_size = BASE + 1 + 4;
    let params = T5::new(CpuBackend::new(), t5.clone(), 1).unwrap().params_host();
    let path = dir.path().join("t5.safetensors");
    save_family(&path, &FamilyModel::T5 { config: t5, specials }, &Tokenizer::fit("char", TEXT).unwrap(), &params, &[]).unwrap();
    let e = refused(&path, &out);
    assert!(e.contains("T5") && e.contains("RMSNorm") && e.contains("relative position"), "{e}");
}

#[test]
fn export_logits_of_a_bert_are_the_mlm_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_bert(dir.path(), "bert", &config(|_| {}));
    let npy = dir.path().join("logits.npy");
    // [CLS] a b [MASK] c [SEP]
    let o = smelt(&["export", "logits", model.to_str().unwrap(), npy.to_str().unwrap(), "--ids", "7,0,1,9,2,8"]);
    assert!(o.status.success(), "{}", text_of(&o));
    let b = std::fs::read(&npy).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let h = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(h.contains("'descr': '<f4'") && h.contains(&format!("'shape': (6, {VOCAB})")), "{h}");
    assert_eq!(b.len() - 10 - hlen, 6 * VOCAB * 4);
    let logits: Vec<f32> = b[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(logits.iter().all(|x| x.is_finite()) && logits.iter().any(|&x| x != 0.0));

    // An id outside the vocabulary is named.
    let o = smelt(&["export", "logits", model.to_str().unwrap(), npy.to_str().unwrap(), "--ids", "7,10"]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains("token id 10"), "{}", text_of(&o));
}

/// `export logits --classifier` on a BERT fine-tuned as a classifier: its class logits (1, 3) of
/// `[CLS] ids [SEP]`, as its fine-tuning framed each example; without the flag its masked-LM
/// logits, with a note that fine-tuning did not train that head; on a BERT without a
/// classification head the flag is refused saying so.
#[test]
fn export_logits_of_a_bert_classifier_are_its_class_logits_with_the_flag() {
    use smelt_engine::model::BertBatch;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(|c| {
        c.nsp = false;
        c.num_labels = 3;
    });
    let model = write_bert(dir.path(), "cls", &cfg);
    let npy = dir.path().join("class.npy");
    let o = smelt(&["export", "logits", model.to_str().unwrap(), npy.to_str().unwrap(), "--ids", "0,1,2", "--classifier"]);
    assert!(o.status.success(), "{}", text_of(&o));
    let b = std::fs::read(&npy).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let h = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(h.contains("'shape': (1, 3)"), "{h}");
    let got: Vec<f32> = b[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    // the same weights run by the engine on [CLS] 0 1 2 [SEP]
    let s = BertSpecials::new(BASE as u32);
    let params = Bert::new(CpuBackend::new(), cfg.clone(), 5).unwrap().params_host();
    let mut m = Bert::from_params(CpuBackend::new(), cfg.clone(), &params).unwrap();
    m.forward(&BertBatch::new(vec![s.cls, 0, 1, 2, s.sep], 1, 5)).unwrap();
    let want = m.class_logits();
    assert_eq!(got.len(), 3);
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{got:?} vs {want:?}");
    // unframed, the logits differ: the framing is what fine-tuning saw
    m.forward(&BertBatch::new(vec![0, 1, 2], 1, 3)).unwrap();
    assert!(m.class_logits().iter().zip(&got).any(|(a, b)| (a - b).abs() > 1e-4));

    // without the flag: the masked-LM logits, and a note saying that head was not fine-tuned
    let o = smelt(&["export", "logits", model.to_str().unwrap(), npy.to_str().unwrap(), "--ids", "0,1,2"]);
    assert!(o.status.success() && text_of(&o).contains("was fine-tuned as a classifier"), "{}", text_of(&o));
    // a BERT without a classification head refuses the flag, naming why
    let plain = write_bert(dir.path(), "plain", &config(|_| {}));
    let o = smelt(&["export", "logits", plain.to_str().unwrap(), npy.to_str().unwrap(), "--ids", "0,1", "--classifier"]);
    assert!(!o.status.success() && text_of(&o).contains("this BERT has no classification head"), "{}", text_of(&o));
}
