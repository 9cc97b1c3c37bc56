//! `smelt export hf`: every tensor's name, shape and dtype against Hugging Face GPT-2's layout
//! (written out here from the GPT-2 architecture, not from smelt's parameter table), read back
//! by parsing the safetensors header by hand; the values are the model's own; post-LN models are
//! refused; `smelt export logits` writes a NumPy file. A GPT fine-tuned as a classifier exports
//! as `GPT2ForSequenceClassification` with its `score.weight`. The logits comparison with
//! transformers itself is `tools/hf/check_export.py` (`--classifier` for the classifier; needs
//! torch and transformers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn smelt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smelt")).args(args).env("RUST_LOG", "warn").output().expect("run smelt")
}

fn text_of(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

const TEXT: &str = "pack my box with five dozen liquor jugs. the quick brown fox!\n";

/// Distinct characters of the training text: the char tokenizer's vocabulary.
fn char_vocab() -> usize {
    let mut s: Vec<char> = TEXT.chars().collect();
    s.sort();
    s.dedup();
    s.len()
}

/// Trains a small model for a few steps; returns its model.safetensors.
fn train(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let text = dir.join("text.txt");
    std::fs::write(&text, TEXT.repeat(20)).unwrap();
    let out = dir.join(name);
    let mut args = vec![
        "--threads", "2", "train", "--text", text.to_str().unwrap(), "--preset", "test", "--n-layer", "3", "--steps", "3",
        "--batch", "4", "--seq", "16", "--eval-interval", "0", "--out", out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = smelt(&args);
    assert!(o.status.success(), "train failed: {}", text_of(&o));
    out.join("model.safetensors")
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

/// GPT2LMHeadModel's state dict for these sizes, as transformers names and shapes it: Conv1D
/// weights are (in, out); the LM head is tied to wte and not stored.
fn gpt2_layout(vocab: usize, positions: usize, c: usize, layers: usize) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    m.insert("transformer.wte.weight".to_string(), vec![vocab, c]);
    m.insert("transformer.wpe.weight".to_string(), vec![positions, c]);
    for i in 0..layers {
        for (name, shape) in [
            ("ln_1.weight", vec![c]),
            ("ln_1.bias", vec![c]),
            ("attn.c_attn.weight", vec![c, 3 * c]),
            ("attn.c_attn.bias", vec![3 * c]),
            ("attn.c_proj.weight", vec![c, c]),
            ("attn.c_proj.bias", vec![c]),
            ("ln_2.weight", vec![c]),
            ("ln_2.bias", vec![c]),
            ("mlp.c_fc.weight", vec![c, 4 * c]),
            ("mlp.c_fc.bias", vec![4 * c]),
            ("mlp.c_proj.weight", vec![4 * c, c]),
            ("mlp.c_proj.bias", vec![c]),
        ] {
            m.insert(format!("transformer.h.{i}.{name}"), shape);
        }
    }
    m.insert("transformer.ln_f.weight".to_string(), vec![c]);
    m.insert("transformer.ln_f.bias".to_string(), vec![c]);
    m
}

#[test]
fn export_hf_has_gpt2_names_shapes_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let model = train(dir.path(), "run", &[]);
    // A checkpoint-style directory: the command reads <dir>/model.safetensors.
    let out = dir.path().join("hf");
    let o = smelt(&["export", "hf", model.parent().unwrap().to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.status.success(), "export failed: {}", text_of(&o));
    // one line says what was written, as what (the export was silent)
    let said = String::from_utf8_lossy(&o.stdout);
    assert_eq!(said.trim(), format!("{}: GPT2LMHeadModel for Hugging Face transformers (`from_pretrained`), from {}", out.display(), model.parent().unwrap().display()));

    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gpt2");
    assert_eq!(cfg["architectures"], serde_json::json!(["GPT2LMHeadModel"]));
    assert_eq!(cfg["activation_function"], "gelu_new");
    assert_eq!(cfg["layer_norm_epsilon"].as_f64(), Some(1e-5));
    assert_eq!(cfg["tie_word_embeddings"], true);
    let [v, p, c, l, h] = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head"].map(|k| cfg[k].as_u64().unwrap() as usize);
    assert_eq!((v, p, c, l, h), (char_vocab(), 32, 32, 3, 2), "config sizes of the trained `test` preset with 3 layers");
    // A char model has no end-of-text id: no bos/eos (rather than GPT-2's default 50256).
    assert!(cfg["bos_token_id"].is_null() && cfg["eos_token_id"].is_null());

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (tensors, meta, data_start) = header(&bytes);
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"), "transformers needs format = pt");
    let want = gpt2_layout(v, p, c, l);
    let got: BTreeMap<String, Vec<usize>> = tensors.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect();
    assert_eq!(got, want, "tensor names and shapes against GPT-2's layout");
    assert!(tensors.values().all(|e| e.dtype == "F32"), "every tensor is F32");
    // Offsets tile the data section exactly, 4 bytes per value.
    let mut spans: Vec<(usize, usize, usize)> = tensors.values().map(|e| (e.offsets.0, e.offsets.1, e.shape.iter().product::<usize>() * 4)).collect();
    spans.sort();
    let mut at = 0;
    for (a, b, n) in spans {
        assert_eq!((a, b - a), (at, n));
        at = b;
    }
    assert_eq!(data_start + at, bytes.len());

    // The values are the model's own, bit for bit.
    let src = std::fs::read(&model).unwrap();
    let (src_tensors, _, src_start) = header(&src);
    for (name, e) in &tensors {
        let s = &src_tensors[name];
        assert_eq!(
            &bytes[data_start + e.offsets.0..data_start + e.offsets.1],
            &src[src_start + s.offsets.0..src_start + s.offsets.1],
            "values of {name}"
        );
    }
}

#[test]
fn export_refuses_post_ln_and_missing_models() {
    let dir = tempfile::tempdir().unwrap();
    let model = train(dir.path(), "post", &["--post-ln"]);
    let o = smelt(&["export", "hf", model.to_str().unwrap(), dir.path().join("hf").to_str().unwrap()]);
    assert!(!o.status.success());
    let e = text_of(&o);
    assert!(e.contains("post-LN") && e.contains("pre-LN"), "{e}");
    assert!(!dir.path().join("hf/model.safetensors").exists(), "nothing written for a refused export");

    let o = smelt(&["export", "hf", dir.path().join("nothing").to_str().unwrap(), dir.path().join("hf").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains("nothing"), "{}", text_of(&o));
}

#[test]
fn export_refuses_to_replace_a_smelt_model_or_a_checkpoint() {
    // `export hf runs/x runs/x` once wrote the HF file over the model it read (and into a
    // committed checkpoint, over the file its manifest vouches for): refused, the model intact
    let dir = tempfile::tempdir().unwrap();
    let model = train(dir.path(), "run", &[]);
    let run_dir = model.parent().unwrap();
    let before = std::fs::read(&model).unwrap();
    let o = smelt(&["export", "hf", run_dir.to_str().unwrap(), run_dir.to_str().unwrap()]);
    assert!(!o.status.success(), "exported over its own model");
    assert!(text_of(&o).contains("smelt model file") && text_of(&o).contains("another output directory"), "{}", text_of(&o));
    assert_eq!(std::fs::read(&model).unwrap(), before, "the model was changed");
    // a directory with a MANIFEST.json (a checkpoint's)
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("MANIFEST.json"), "{}").unwrap();
    let o = smelt(&["export", "hf", model.to_str().unwrap(), ckpt.to_str().unwrap()]);
    assert!(!o.status.success() && text_of(&o).contains("checkpoint directory"), "{}", text_of(&o));
    assert!(!ckpt.join("model.safetensors").exists());
    // an earlier export's directory is written over
    let hf = dir.path().join("hf");
    for _ in 0..2 {
        let o = smelt(&["export", "hf", model.to_str().unwrap(), hf.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text_of(&o));
    }
}

#[test]
fn a_model_file_with_a_nan_weight_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = train(dir.path(), "run", &[]);
    let mut bytes = std::fs::read(&model).unwrap();
    let (tensors, _, data) = header(&bytes);
    let (name, e) = tensors.iter().next().unwrap();
    let at = data + e.offsets.0 + 4;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let bad = dir.path().join("nan.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    for args in [
        vec!["sample", "--model", bad.to_str().unwrap(), "--prompt", "a", "--tokens", "3"],
        vec!["export", "hf", bad.to_str().unwrap(), dir.path().join("hf").to_str().unwrap()],
    ] {
        let o = smelt(&args);
        assert!(!o.status.success(), "{args:?} accepted a NaN weight");
        let e = text_of(&o);
        assert!(e.contains(name.as_str()) && e.contains("non-finite") && e.contains("element 1"), "{args:?}: {e}");
    }
}

#[test]
fn export_logits_writes_npy() {
    let dir = tempfile::tempdir().unwrap();
    let model = train(dir.path(), "run", &[]);
    let npy = dir.path().join("not/made/yet/logits.npy"); // its directories are made
    let o = smelt(&["export", "logits", model.to_str().unwrap(), npy.to_str().unwrap(), "--ids", "1,2,3,4,5"]);
    assert!(o.status.success(), "{}", text_of(&o));
    let b = std::fs::read(&npy).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0, "npy header is padded to 64 bytes");
    let h = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    let v = char_vocab();
    assert!(h.contains("'descr': '<f4'") && h.contains(&format!("'shape': (5, {v})")), "{h}");
    assert_eq!(b.len() - 10 - hlen, 5 * v * 4);
    let logits: Vec<f32> = b[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(logits.iter().all(|x| x.is_finite()) && logits.iter().any(|&x| x != 0.0));
}

/// `model` as a fine-tuned classifier's file: its tensors and metadata, plus `score.weight`
/// (labels, C) holding `score` and the head's metadata (what a fine-tuning job saves); without
/// `score` the metadata says classifier but the tensor is missing.
fn classifier_of(model: &Path, path: &Path, labels: usize, score: Option<&[f32]>) {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes = std::fs::read(model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    meta.insert("smelt.head".into(), "classification".into());
    meta.insert("smelt.num_labels".into(), labels.to_string());
    let score_bytes: Vec<u8> = score.unwrap_or_default().iter().flat_map(|x| x.to_le_bytes()).collect();
    let c = st.tensor("transformer.wte.weight").unwrap().shape()[1];
    let mut views: Vec<(String, TensorView)> = st.tensors();
    if score.is_some() {
        views.push(("score.weight".into(), TensorView::new(Dtype::F32, vec![labels, c], &score_bytes).unwrap()));
    }
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

#[test]
fn a_gpt_classifier_exports_as_gpt2_for_sequence_classification() {
    let dir = tempfile::tempdir().unwrap();
    let model = train(dir.path(), "run", &[]);
    let c = 32;
    let score: Vec<f32> = (0..3 * c).map(|i| (i as f32 * 0.37).sin()).collect();
    let classifier = dir.path().join("classifier.safetensors");
    classifier_of(&model, &classifier, 3, Some(&score));

    let out = dir.path().join("hf");
    let o = smelt(&["export", "hf", classifier.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.status.success(), "export failed: {}", text_of(&o));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], serde_json::json!(["GPT2ForSequenceClassification"]));
    assert_eq!(cfg["num_labels"], 3);
    assert_eq!(cfg["id2label"]["2"], "LABEL_2");
    // a char model has no end-of-text id: no pad id (transformers then takes one sequence at a time)
    assert!(cfg["pad_token_id"].is_null(), "{cfg}");

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (tensors, _, start) = header(&bytes);
    let mut want = gpt2_layout(char_vocab(), 32, c, 3);
    want.insert("score.weight".into(), vec![3, c]);
    let got: BTreeMap<String, Vec<usize>> = tensors.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect();
    assert_eq!(got, want, "GPT-2's tensors and the head's");
    let e = &tensors["score.weight"];
    let values: Vec<f32> = bytes[start + e.offsets.0..start + e.offsets.1].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(values, score, "score.weight's values are the head's own");

    // its class logits (1, 3); the LM's logits stay the default
    let npy = dir.path().join("class.npy");
    let o = smelt(&["export", "logits", classifier.to_str().unwrap(), npy.to_str().unwrap(), "--ids", "1,2,3", "--classifier"]);
    assert!(o.status.success(), "{}", text_of(&o));
    let b = std::fs::read(&npy).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert!(std::str::from_utf8(&b[10..10 + hlen]).unwrap().contains("'shape': (1, 3)"));
    let logits: Vec<f32> = b[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(logits.len() == 3 && logits.iter().all(|x| x.is_finite()) && logits.iter().any(|&x| x != 0.0), "{logits:?}");

    // sampling from a classifier (its LM head, untouched by the fine-tuning) says so; a plain
    // GPT samples without the note
    for (m, noted) in [(&classifier, true), (&model, false)] {
        let o = smelt(&["sample", "--model", m.to_str().unwrap(), "--prompt", "ab", "--tokens", "3"]);
        assert!(o.status.success(), "{}", text_of(&o));
        assert_eq!(String::from_utf8_lossy(&o.stderr).contains("was fine-tuned as a classifier"), noted, "{}", text_of(&o));
    }

    // an id outside the vocabulary is named with its place among --ids
    let o = smelt(&["export", "logits", model.to_str().unwrap(), npy.to_str().unwrap(), "--ids", "1,99999"]);
    assert!(!o.status.success() && text_of(&o).contains("--ids: token id 99999 (number 2 of 2) is outside the model's vocabulary"), "{}", text_of(&o));

    // --classifier on a plain GPT, and a classifier file without its head, are clear errors
    let o = smelt(&["export", "logits", model.to_str().unwrap(), npy.to_str().unwrap(), "--ids", "1,2", "--classifier"]);
    assert!(!o.status.success() && text_of(&o).contains("fine-tuned as a classifier"), "{}", text_of(&o));
    let headless = dir.path().join("headless.safetensors");
    classifier_of(&model, &headless, 3, None);
    let o = smelt(&["export", "hf", headless.to_str().unwrap(), dir.path().join("hf2").to_str().unwrap()]);
    assert!(!o.status.success() && text_of(&o).contains("score.weight"), "{}", text_of(&o));
}
