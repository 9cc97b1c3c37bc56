//! `smelt import hf`: Hugging Face GPT-2 directories read into smelt model files.
//!
//! The golden values are transformers' own: `tools/hf/make_import_fixture.py` saved a tiny random
//! GPT2LMHeadModel three ways (`save_pretrained` in float32 and in bfloat16, and the Hub's `gpt2`
//! layout: no `transformer.` prefix, mask buffers beside the weights) with the logits
//! transformers computes from it; the imported model's logits (`smelt export logits`) must be
//! those. A GPT-2 vocab.json is checked token by token against smelt's BPE, through the byte to
//! character map transformers uses (fixture `gpt2_bytes_to_unicode.json`). What smelt's GPT
//! would compute differently is refused naming the field or tensor. Continued pretraining from
//! an imported or trained model (`[model] init_from`) runs through a real coordinator and worker.

mod harness;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use harness::Cluster;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use smelt_proto::v1::JobState;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

fn smelt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smelt")).args(args).env("RUST_LOG", "warn").output().expect("run smelt")
}

fn text_of(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `smelt import hf DIR OUT [extra]`; panics unless it succeeds.
fn import(dir: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["import", "hf", dir.to_str().unwrap(), out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = smelt(&args);
    assert!(o.status.success(), "import of {} failed: {}", dir.display(), text_of(&o));
}

/// `smelt import hf DIR OUT [extra]`, which must fail; returns what it printed.
fn import_fails(dir: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["import", "hf", dir.to_str().unwrap(), out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = smelt(&args);
    assert!(!o.status.success(), "import of {} should have failed: {}", dir.display(), text_of(&o));
    assert!(!out.exists(), "a refused import wrote {}", out.display());
    text_of(&o)
}

/// The float32 values of a NumPy file `smelt export logits` wrote.
fn read_npy(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let n = u16::from_le_bytes([b[8], b[9]]) as usize;
    b[10 + n..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The ids the fixture's logits are for.
fn fixture_ids() -> Vec<u32> {
    let bytes = std::fs::read(fixtures().join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("ids").unwrap();
    assert_eq!(t.dtype(), Dtype::I64);
    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
}

fn expected_logits(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixtures().join("expected.safetensors")).unwrap();
    f32s(&SafeTensors::deserialize(&bytes).unwrap(), name)
}

fn logits_of(model: &Path, ids: &[u32]) -> Vec<f32> {
    let npy = model.with_extension("npy");
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    let o = smelt(&["export", "logits", model.to_str().unwrap(), npy.to_str().unwrap(), "--ids", &ids.join(",")]);
    assert!(o.status.success(), "export logits: {}", text_of(&o));
    read_npy(&npy)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn metadata(model: &Path) -> HashMap<String, String> {
    smelt_engine::weights::metadata(&std::fs::read(model).unwrap(), "model").unwrap()
}

#[test]
fn imported_models_give_the_logits_transformers_computes() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = fixture_ids();
    for (dir, expected, tol) in [("saved", "logits_f32", 1e-5), ("hub", "logits_f32", 1e-5), ("bf16", "logits_bf16", 1e-5)] {
        let out = tmp.path().join(format!("{dir}.safetensors"));
        import(&fixtures().join(dir), &out, &["--tokenizer", "byte"]);
        let want = expected_logits(expected);
        let got = logits_of(&out, &ids);
        assert_eq!(got.len(), ids.len() * 300, "{dir}: (T, V) logits");
        let diff = max_abs_diff(&got, &want);
        assert!(diff < tol, "{dir}: logits differ from transformers' by up to {diff}");
        let meta = metadata(&out);
        assert_eq!(meta["smelt.format"], "gpt/1");
        assert!(meta["smelt.tokenizer"].contains("byte"), "{:?}", meta["smelt.tokenizer"]);
        assert!(meta["smelt.imported_from"].ends_with(dir), "{:?}", meta["smelt.imported_from"]);
        let cfg: serde_json::Value = serde_json::from_str(&meta["smelt.config"]).unwrap();
        assert_eq!(
            (cfg["vocab_size"].as_u64(), cfg["block_size"].as_u64(), cfg["n_layer"].as_u64(), cfg["n_head"].as_u64(), cfg["n_embd"].as_u64()),
            (Some(300), Some(32), Some(2), Some(2), Some(16))
        );
    }
    // bf16 weights are not the f32 ones: the bf16 comparison above is not the f32 one again
    assert!(max_abs_diff(&expected_logits("logits_f32"), &expected_logits("logits_bf16")) > 1e-3);

    // The imported model is a smelt model like any other: it samples.
    let o = smelt(&["sample", "--model", tmp.path().join("hub.safetensors").to_str().unwrap(), "--prompt", "hi", "--tokens", "8", "--seed", "1"]);
    assert!(o.status.success(), "sample: {}", text_of(&o));
    // The Hugging Face directory itself is not a smelt model: the error says how to import it.
    let o = smelt(&["sample", "--model", fixtures().join("saved").to_str().unwrap(), "--prompt", "hi"]);
    assert!(!o.status.success() && text_of(&o).contains("imported first: `smelt import hf DIR OUT.safetensors`"), "{}", text_of(&o));
    // An output that is a directory: the OS error, said once.
    let o = smelt(&["import", "hf", fixtures().join("saved").to_str().unwrap(), tmp.path().to_str().unwrap(), "--tokenizer", "byte"]);
    let err = text_of(&o);
    assert!(!o.status.success());
    assert_eq!(err.matches("Is a directory").count(), 1, "{err}");
}

/// A copy of fixture directory `name` in `tmp`, with config.json changed by `edit`.
fn copy_with_config(tmp: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp.join(format!("{name}-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures().join(name).join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join(name).join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    dir
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The fixture's saved tensors (name -> (dtype, shape, bytes)).
fn saved_tensors() -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixtures().join("saved/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect()
}

fn write_tensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A copy of the saved fixture whose tensors `edit` changed.
fn copy_with_tensors(tmp: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let dir = copy_with_config(tmp, "saved", |_| {});
    let mut t = saved_tensors();
    edit(&mut t);
    write_tensors(&dir.join("model.safetensors"), &t);
    dir
}

#[test]
fn what_smelt_would_compute_differently_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let byte = ["--tokenizer", "byte"];
    let config_cases: Vec<(&str, Box<dyn FnOnce(&mut serde_json::Value)>, &str)> = vec![
        ("erf gelu", Box::new(|c| c["activation_function"] = "gelu".into()), "activation_function is \"gelu\""),
        ("relu", Box::new(|c| c["activation_function"] = "relu".into()), "activation_function"),
        ("eps", Box::new(|c| c["layer_norm_epsilon"] = 1e-6.into()), "layer_norm_epsilon"),
        ("inner", Box::new(|c| c["n_inner"] = 40.into()), "n_inner"),
        ("model type", Box::new(|c| c["model_type"] = "llama".into()), "model_type is \"llama\""),
        ("untied", Box::new(|c| c["tie_word_embeddings"] = false.into()), "tie_word_embeddings"),
        ("layer scaling", Box::new(|c| c["scale_attn_by_inverse_layer_idx"] = true.into()), "scale_attn_by_inverse_layer_idx"),
        ("cross-attention", Box::new(|c| c["add_cross_attention"] = true.into()), "add_cross_attention"),
        ("classifier", Box::new(|c| c["architectures"] = serde_json::json!(["GPT2ForSequenceClassification"])), "GPT2ForSequenceClassification"),
        ("no sizes", Box::new(|c| c.as_object_mut().unwrap().remove("n_embd").map(|_| ()).unwrap()), "n_embd"),
        ("positions", Box::new(|c| c["n_positions"] = 64.into()), "transformer.wpe.weight has shape [32, 16]"),
    ];
    for (what, edit, says) in config_cases {
        let dir = copy_with_config(tmp.path(), "saved", edit);
        let msg = import_fails(&dir, &out, &byte);
        assert!(msg.contains(says), "{what}: {msg}");
    }
    // A config that says it is the tanh approximation under another name is accepted.
    let dir = copy_with_config(tmp.path(), "saved", |c| c["activation_function"] = "gelu_pytorch_tanh".into());
    import(&dir, &out, &byte);
    std::fs::remove_file(&out).unwrap();

    // An untied head stored beside wte is refused; a stored copy of wte is accepted.
    let wte = saved_tensors().into_iter().find(|t| t.0 == "transformer.wte.weight").unwrap();
    let dir = copy_with_tensors(tmp.path(), |t| {
        let mut head = wte.clone();
        head.0 = "lm_head.weight".into();
        head.3[0] ^= 1;
        t.push(head);
    });
    let msg = import_fails(&dir, &out, &byte);
    assert!(msg.contains("lm_head.weight differs from the token embeddings"), "{msg}");
    let dir = copy_with_tensors(tmp.path(), |t| {
        let mut head = wte.clone();
        head.0 = "lm_head.weight".into();
        t.push(head);
    });
    import(&dir, &out, &byte);
    std::fs::remove_file(&out).unwrap();

    // A missing tensor, a NaN, an unexpected tensor, an integer dtype.
    let dir = copy_with_tensors(tmp.path(), |t| t.retain(|x| x.0 != "transformer.ln_f.bias"));
    assert!(import_fails(&dir, &out, &byte).contains("missing tensors transformer.ln_f.bias"));
    let dir = copy_with_tensors(tmp.path(), |t| {
        let x = t.iter_mut().find(|x| x.0 == "transformer.h.1.mlp.c_fc.bias").unwrap();
        x.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let msg = import_fails(&dir, &out, &byte);
    assert!(msg.contains("transformer.h.1.mlp.c_fc.bias holds a non-finite value"), "{msg}");
    let dir = copy_with_tensors(tmp.path(), |t| {
        let mut extra = t[0].clone();
        extra.0 = "transformer.h.2.ln_1.weight".into();
        t.push(extra);
    });
    let msg = import_fails(&dir, &out, &byte);
    assert!(msg.contains("tensor transformer.h.2.ln_1.weight is not part of the model as smelt builds it (2 layers"), "{msg}");
    let dir = copy_with_tensors(tmp.path(), |t| {
        let x = t.iter_mut().find(|x| x.0 == "transformer.ln_f.weight").unwrap();
        x.1 = Dtype::I32;
    });
    assert!(import_fails(&dir, &out, &byte).contains("dtype I32"));

    // Weights only as a pickle; no weights at all; no tokenizer.
    let dir = copy_with_config(tmp.path(), "saved", |_| {});
    std::fs::rename(dir.join("model.safetensors"), dir.join("pytorch_model.bin")).unwrap();
    let msg = import_fails(&dir, &out, &byte);
    assert!(msg.contains("only pytorch_model.bin") && msg.contains("safe_serialization=True"), "{msg}");
    std::fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
    assert!(import_fails(&dir, &out, &byte).contains("no model.safetensors"));
    let msg = import_fails(&fixtures().join("saved"), &out, &[]);
    assert!(msg.contains("no tokenizer files") && msg.contains("--tokenizer"), "{msg}");
    // A tokenizer with more ids than the model has.
    let msg = import_fails(&fixtures().join("saved"), &out, &["--tokenizer", "gpt2"]);
    assert!(msg.contains("vocab_size is 300, fewer than the 50257 ids of the gpt2 tokenizer"), "{msg}");
}

#[test]
fn sharded_float16_weights_are_read_through_their_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_with_config(tmp.path(), "saved", |_| {});
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    // two shards, float16, named by an index as transformers writes large models
    let tensors: Vec<_> = saved_tensors()
        .into_iter()
        .map(|(n, _, s, b)| {
            let h: Vec<u8> = b.chunks_exact(4).flat_map(|c| half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()).collect();
            (n, Dtype::F16, s, h)
        })
        .collect();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write_tensors(&dir.join("model-00001-of-00002.safetensors"), a);
    write_tensors(&dir.join("model-00002-of-00002.safetensors"), b);
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.0.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(b.iter().map(|t| (t.0.clone(), "model-00002-of-00002.safetensors".into())))
        .collect();
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    let out = tmp.path().join("f16.safetensors");
    import(&dir, &out, &["--tokenizer", "byte"]);
    // float16 rounding of the weights moves the logits a little from the float32 model's
    let diff = max_abs_diff(&logits_of(&out, &fixture_ids()), &expected_logits("logits_f32"));
    assert!(diff > 0.0 && diff < 2e-2, "float16 weights: logits differ by {diff}");
    // a shard named outside the directory is refused
    let index = std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), index.replacen("model-00002-of-00002", "../model-00002-of-00002", 1)).unwrap();
    let msg = import_fails(&dir, &tmp.path().join("outside.safetensors"), &["--tokenizer", "byte"]);
    assert!(msg.contains("is not a file name in the directory"), "{msg}");
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    // without the second shard the import names what is missing
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let msg = import_fails(&dir, &tmp.path().join("none.safetensors"), &["--tokenizer", "byte"]);
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

/// GPT-2's vocab.json as transformers writes it: each token's bytes spelled with the fixture's
/// byte -> character map, the ids from tiktoken's r50k ranks (which tests of smelt's encoder
/// hold to Python tiktoken).
fn gpt2_vocab() -> serde_json::Map<String, serde_json::Value> {
    let chars: HashMap<String, String> = serde_json::from_slice(&std::fs::read(fixtures().join("gpt2_bytes_to_unicode.json")).unwrap()).unwrap();
    let spell = |bytes: &[u8]| -> String { bytes.iter().map(|b| chars[&b.to_string()].as_str()).collect() };
    let bpe = smelt_corpus::gpt2::core();
    let mut vocab: serde_json::Map<String, serde_json::Value> =
        (0..50256u32).map(|id| (spell(&bpe.decode_bytes(&[id]).unwrap()), id.into())).collect();
    vocab.insert("<|endoftext|>".into(), 50256.into());
    assert_eq!(vocab.len(), 50257);
    vocab
}

/// A one-layer GPT-2 of GPT-2's vocabulary (8 wide) with random weights, as HF names them.
fn gpt2_vocab_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (v, p, c) = (50257usize, 16usize, 8usize);
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("wte.weight", vec![v, c]),
        ("wpe.weight", vec![p, c]),
        ("h.0.ln_1.weight", vec![c]),
        ("h.0.ln_1.bias", vec![c]),
        ("h.0.attn.c_attn.weight", vec![c, 3 * c]),
        ("h.0.attn.c_attn.bias", vec![3 * c]),
        ("h.0.attn.c_proj.weight", vec![c, c]),
        ("h.0.attn.c_proj.bias", vec![c]),
        ("h.0.ln_2.weight", vec![c]),
        ("h.0.ln_2.bias", vec![c]),
        ("h.0.mlp.c_fc.weight", vec![c, 4 * c]),
        ("h.0.mlp.c_fc.bias", vec![4 * c]),
        ("h.0.mlp.c_proj.weight", vec![4 * c, c]),
        ("h.0.mlp.c_proj.bias", vec![c]),
        ("ln_f.weight", vec![c]),
        ("ln_f.bias", vec![c]),
    ];
    let mut seed = 12345u64;
    let tensors: Vec<_> = shapes
        .into_iter()
        .map(|(n, s)| {
            let numel: usize = s.iter().product();
            let bytes: Vec<u8> = (0..numel)
                .flat_map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2).to_le_bytes()
                })
                .collect();
            (n.to_string(), Dtype::F32, s, bytes)
        })
        .collect();
    write_tensors(&dir.join("model.safetensors"), &tensors);
    let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": v, "n_positions": p, "n_embd": c, "n_layer": 1, "n_head": 2,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "architectures": ["GPT2LMHeadModel"]});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn a_gpt2_vocabulary_is_checked_token_by_token() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = gpt2_vocab();
    let dir = tmp.path().join("gpt2-like");
    gpt2_vocab_model(&dir);
    std::fs::write(dir.join("vocab.json"), serde_json::to_vec(&vocab).unwrap()).unwrap();
    let out = tmp.path().join("gpt2.safetensors");
    import(&dir, &out, &[]);
    assert!(metadata(&out)["smelt.tokenizer"].contains("gpt2"));
    let o = smelt(&["sample", "--model", out.to_str().unwrap(), "--prompt", "Hello, world", "--tokens", "4", "--seed", "3"]);
    assert!(o.status.success(), "sample: {}", text_of(&o));

    // tokenizer.json (a fast tokenizer) holds the same vocabulary under model.vocab
    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    let fast = |kind: &str| serde_json::json!({"version": "1.0", "model": {"type": kind, "vocab": vocab}}).to_string();
    std::fs::write(dir.join("tokenizer.json"), fast("BPE")).unwrap();
    let out2 = tmp.path().join("gpt2-fast.safetensors");
    import(&dir, &out2, &[]);
    std::fs::write(dir.join("tokenizer.json"), fast("WordPiece")).unwrap();
    let msg = import_fails(&dir, &tmp.path().join("wp.safetensors"), &[]);
    assert!(msg.contains("a \"WordPiece\" tokenizer"), "{msg}");
    // ... and is checked even when --tokenizer gpt2 is given
    let msg = import_fails(&dir, &tmp.path().join("wp.safetensors"), &["--tokenizer", "gpt2"]);
    assert!(msg.contains("WordPiece"), "{msg}");
    // another tokenizer cannot be forced over the directory's own
    std::fs::write(dir.join("tokenizer.json"), fast("BPE")).unwrap();
    let msg = import_fails(&dir, &tmp.path().join("forced.safetensors"), &["--tokenizer", "byte"]);
    assert!(msg.contains("--tokenizer byte") && msg.contains("tokenizer.json holds the model's tokenizer"), "{msg}");
    // tokens added beyond GPT-2's are said (smelt's GPT-2 tokenizer never produces them)
    let with_added = serde_json::json!({"model": {"type": "BPE", "vocab": vocab},
        "added_tokens": [{"id": 50256, "content": "<|endoftext|>"}, {"id": 50257, "content": "<|pad|>"}]});
    std::fs::write(dir.join("tokenizer.json"), with_added.to_string()).unwrap();
    let o = smelt(&["import", "hf", dir.to_str().unwrap(), tmp.path().join("added.safetensors").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text_of(&o));
    let said = text_of(&o);
    assert!(said.contains("adds tokens") && said.contains("50257 \"<|pad|>\"") && said.contains("count=1"), "{said}");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();

    // Two tokens' ids swapped: another tokenizer, whose ids would mean other text.
    let mut swapped = vocab.clone();
    let (a, b) = ("Ġthe", "Ġand");
    let (ia, ib) = (swapped[a].clone(), swapped[b].clone());
    swapped.insert(a.into(), ib);
    swapped.insert(b.into(), ia);
    std::fs::write(dir.join("vocab.json"), serde_json::to_vec(&swapped).unwrap()).unwrap();
    let msg = import_fails(&dir, &tmp.path().join("swapped.safetensors"), &[]);
    assert!(msg.contains("not GPT-2's tokenizer"), "{msg}");
    assert!(msg.contains("Ġthe") || msg.contains("Ġand"), "{msg}");
    // A vocabulary of another size.
    let mut small = vocab.clone();
    small.remove("Ġthe");
    std::fs::write(dir.join("vocab.json"), serde_json::to_vec(&small).unwrap()).unwrap();
    let msg = import_fails(&dir, &tmp.path().join("small.safetensors"), &[]);
    assert!(msg.contains("50256 tokens; GPT-2's BPE has 50257"), "{msg}");
}

const TEXT: &str = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";

/// Trains a char model of the `test` preset on TEXT; returns its model.safetensors.
fn train_parent(dir: &Path, steps: &str) -> PathBuf {
    let text = dir.join("text.txt");
    std::fs::write(&text, TEXT.repeat(40)).unwrap();
    let out = dir.join("parent");
    // five steps of warm-up, or every step of a shorter run
    let warmup = steps.parse::<u64>().unwrap().min(5).to_string();
    let o = smelt(&[
        "--threads", "2", "train", "--text", text.to_str().unwrap(), "--preset", "test", "--steps", steps, "--batch", "8", "--seq", "16",
        "--lr", "3e-3", "--warmup", &warmup, "--eval-interval", "0", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "train: {}", text_of(&o));
    out.join("model.safetensors")
}

#[test]
fn an_export_imports_back_to_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = train_parent(tmp.path(), "3");
    let hf = tmp.path().join("hf");
    let o = smelt(&["export", "hf", model.to_str().unwrap(), hf.to_str().unwrap()]);
    assert!(o.status.success(), "export: {}", text_of(&o));
    let back = tmp.path().join("back.safetensors");
    import(&hf, &back, &[]); // smelt_tokenizer.json says which tokenizer
    let (a, b) = (std::fs::read(&model).unwrap(), std::fs::read(&back).unwrap());
    let (sa, sb) = (SafeTensors::deserialize(&a).unwrap(), SafeTensors::deserialize(&b).unwrap());
    let mut names = sa.names();
    names.sort();
    let mut names_b = sb.names();
    names_b.sort();
    assert_eq!(names, names_b);
    for n in names {
        assert_eq!(sa.tensor(n).unwrap().data(), sb.tensor(n).unwrap().data(), "{n}");
    }
    let (ma, mb) = (metadata(&model), metadata(&back));
    assert_eq!(ma["smelt.config"], mb["smelt.config"]);
    assert_eq!(ma["smelt.tokenizer"], mb["smelt.tokenizer"]);
    // a char tokenizer with no characters, or one twice, is refused (every later sample failed)
    for (chars, why) in [("[]", "no characters"), ("[\"a\",\"b\",\"a\"]", "a character twice")] {
        std::fs::write(hf.join("smelt_tokenizer.json"), format!("{{\"kind\":\"char\",\"chars\":{chars}}}")).unwrap();
        let said = import_fails(&hf, &tmp.path().join("bad.safetensors"), &[]);
        assert!(said.contains(why), "{said}");
    }
}

/// A pretraining job spec over `text` continuing from `init` (or, with None, a fresh `test` model).
fn continue_spec(name: &str, text: &Path, init: Option<&Path>, extra_data: &str, seq: usize) -> String {
    let model = match init {
        Some(p) => format!("init_from = {:?}", p.to_str().unwrap()),
        None => "preset = \"test\"".to_string(),
    };
    format!(
        "name = {name:?}\n[model]\n{model}\n[data]\ntext = {:?}\n{extra_data}\n[train]\nsteps = 4\nglobal_batch = 8\nmicro_batch = 8\nseq_len = {seq}\n\
         lr = 1e-4\nwarmup_steps = 0\neval_interval = 0\n[checkpoint]\nevery = 2\n",
        text.to_str().unwrap()
    )
}

#[test]
fn a_pretraining_job_continues_from_init_from() {
    let c = Cluster::with_workers(1);
    let parent = train_parent(c.dir.path(), "150");
    let text = c.dir.path().join("text.txt");

    // The parent's weights seed step 0: its first loss is the trained model's, far below a
    // fresh model's on the same data.
    let cont = c.submit(&continue_spec("continue", &text, Some(&parent), "", 16), "");
    let (state, metrics) = c.follow(&cont.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&cont.id).error, c.logs());
    let fresh = c.submit(&continue_spec("fresh", &text, None, "", 16), "");
    let (state, fresh_metrics) = c.follow(&fresh.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&fresh.id).error, c.logs());
    let (first, first_fresh) = (metrics[0].loss, fresh_metrics[0].loss);
    assert!(first < 1.0 && first_fresh > 2.5, "first loss from the parent {first}, from a fresh model {first_fresh}");
    // the result is the parent's model continued: same config and tokenizer
    let (mp, mc) = (metadata(&parent), metadata(&c.model_path(&cont.id)));
    assert_eq!(mp["smelt.config"], mc["smelt.config"]);
    assert_eq!(mp["smelt.tokenizer"], mc["smelt.tokenizer"]);
    // its file names the parent as a fine-tuned model's does (it had no trace of it)
    assert_eq!(mc.get("smelt.parent").map(String::as_str), Some(parent.to_str().unwrap()), "{mc:?}");
    assert_eq!(mc.get("smelt.parent_file").map(String::as_str), Some(parent.to_str().unwrap()), "{mc:?}");
    assert!(!mp.contains_key("smelt.parent"), "{mp:?}");
    // its checkpoints name the parent (trainer.json's lineage)
    let ckpt = c.dir.path().join(format!("worker-0/jobs/{}/ckpt", cont.id));
    let states: Vec<serde_json::Value> = std::fs::read_dir(&ckpt)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", ckpt.display(), c.logs()))
        .map(|d| serde_json::from_slice(&std::fs::read(d.unwrap().path().join("trainer.json")).unwrap()).unwrap())
        .collect();
    assert!(!states.is_empty());
    for s in &states {
        assert_eq!(s["lineage"]["parent_checkpoint"].as_str(), Some(parent.to_str().unwrap()), "{s}");
    }

    // The data must be tokenized as the parent was.
    let bad = c.submit(&continue_spec("bytes", &text, Some(&parent), "tokenizer = \"byte\"", 16), "");
    let (state, _) = c.follow(&bad.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&bad.id).error;
    assert!(error.contains("data.tokenizer") && error.contains("set data.tokenizer = \"char\""), "{error}");
    // A sequence longer than the parent's block size (the `test` preset's 32).
    let long = c.submit(&continue_spec("long", &text, Some(&parent), "", 64), "");
    let (state, _) = c.follow(&long.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&long.id).error;
    assert!(error.contains("train.seq_len") && error.contains("block_size 32"), "{error}");
    // A text with a character the parent's vocabulary lacks.
    let other = c.dir.path().join("other.txt");
    std::fs::write(&other, "QXZ! ".repeat(200)).unwrap();
    let unknown = c.submit(&continue_spec("unknown", &other, Some(&parent), "", 16), "");
    let (state, _) = c.follow(&unknown.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&unknown.id).error;
    assert!(error.contains("data.text") && error.contains("'Q'"), "{error}");

    // A corpus must have been prepared with the parent's tokenizer.
    let corpus = c.dir.path().join("bytes-corpus");
    let o = smelt(&["corpus", "prepare", "--input", text.to_str().unwrap(), "--out", corpus.to_str().unwrap(), "--tokenizer", "byte", "--txt-docs", "line"]);
    assert!(o.status.success(), "prepare: {}", text_of(&o));
    let spec = continue_spec("corpus", &text, Some(&parent), "", 16).replace(&format!("text = {:?}", text.to_str().unwrap()), &format!("corpus = {:?}", corpus.to_str().unwrap()));
    let on_corpus = c.submit(&spec, "");
    let (state, _) = c.follow(&on_corpus.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&on_corpus.id).error;
    assert!(error.contains("data.corpus") && error.contains("tokenized with byte, but the model in model.init_from was trained with char"), "{error}");

    // A checkpoint is resumed only by data tokenized as it was: a text of as many characters,
    // other ones, makes the same model config but other ids.
    let shifted: String = TEXT.repeat(40).chars().map(|ch| if ch.is_ascii_lowercase() { ch.to_ascii_uppercase() } else { ch }).collect();
    let shifted_path = c.dir.path().join("shifted.txt");
    std::fs::write(&shifted_path, shifted).unwrap();
    let fresh_ckpt = std::fs::read_dir(c.dir.path().join(format!("worker-0/jobs/{}/ckpt", fresh.id))).unwrap().map(|d| d.unwrap().path()).min().unwrap();
    let other_chars = c.submit(&continue_spec("other-chars", &shifted_path, None, "", 16), fresh_ckpt.to_str().unwrap());
    let (state, _) = c.follow(&other_chars.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&other_chars.id).error;
    assert!(error.contains("only the checkpoint has 'a'") && error.contains("only the data has 'A'") && error.contains("ids would mean other text"), "{error}");

    // Once the job has a checkpoint the parent's file is no longer needed: a resumed attempt
    // takes the model from the checkpoint. A fresh start without the file fails naming it.
    let step2 = std::fs::read_dir(&ckpt).unwrap().map(|d| d.unwrap().path()).min().unwrap();
    let moved = parent.with_extension("moved");
    std::fs::rename(&parent, &moved).unwrap();
    let resumed = c.submit(&continue_spec("resumed", &text, Some(&parent), "", 16), step2.to_str().unwrap());
    let (state, resumed_metrics) = c.follow(&resumed.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&resumed.id).error, c.logs());
    assert_eq!(resumed_metrics.first().map(|m| m.step), Some(3), "resumed after the step-2 checkpoint");
    let (mr, mc) = (metadata(&c.model_path(&resumed.id)), metadata(&c.model_path(&cont.id)));
    assert_eq!(mr["smelt.config"], mc["smelt.config"]);
    let gone = c.submit(&continue_spec("gone", &text, Some(&parent), "", 16), "");
    let (state, _) = c.follow(&gone.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&gone.id).error;
    assert!(error.contains("model.init_from"), "{error}");
}

#[test]
fn ranks_that_read_different_parents_refuse_to_train() {
    let c = Cluster::with_workers(2);
    let text = c.dir.path().join("text.txt");
    // Two models of one config: the same job id names a different file on each worker's host.
    for d in ["a", "b"] {
        std::fs::create_dir_all(c.dir.path().join(d)).unwrap();
    }
    let a = train_parent(&c.dir.path().join("a"), "3");
    let b = train_parent(&c.dir.path().join("b"), "5");
    std::fs::copy(c.dir.path().join("a/text.txt"), &text).unwrap();
    let job_spec = |name: &str| continue_spec(name, &text, Some(Path::new("job-000777")), "", 16).replace(
        "[train]\nsteps = 4\nglobal_batch = 8\nmicro_batch = 8",
        "[train]\nsteps = 4\nglobal_batch = 8\nmicro_batch = 4",
    ) + "[cluster]\nworld_size = 2\n";
    for (w, model) in [(0, &a), (1, &b)] {
        let dir = c.dir.path().join(format!("worker-{w}/jobs/job-000777"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(model, dir.join("model.safetensors")).unwrap();
    }
    let apart = c.submit(&job_spec("apart"), "");
    let (state, _) = c.follow(&apart.id);
    assert_eq!(state, JobState::Failed, "{}", c.logs());
    let error = c.job(&apart.id).error;
    assert!(error.contains("ranks start from different weights"), "{error}");
    // a fine-tuning job checks its parent the same way
    let sft = c.dir.path().join("sft.jsonl");
    std::fs::write(&sft, "{\"prompt\": \"the quick\", \"response\": \" brown fox\"}\n".repeat(16)).unwrap();
    let ft = format!(
        "name = \"ft-apart\"\nkind = \"finetune\"\n[finetune]\ninit_from = \"job-000777\"\nhead = \"sft\"\ndata = {:?}\nval_fraction = 0.25\n\
         [train]\nsteps = 2\nglobal_batch = 4\nmicro_batch = 2\nseq_len = 16\nlr = 1e-3\n[cluster]\nworld_size = 2\n",
        sft.to_str().unwrap()
    );
    let ft_apart = c.submit(&ft, "");
    let (state, _) = c.follow(&ft_apart.id);
    assert_eq!(state, JobState::Failed, "{}", c.logs());
    let error = c.job(&ft_apart.id).error;
    assert!(error.contains("ranks start from different weights"), "{error}");

    // the same file on both hosts: the two ranks train together
    std::fs::copy(&a, c.dir.path().join("worker-1/jobs/job-000777/model.safetensors")).unwrap();
    let together = c.submit(&job_spec("together"), "");
    let (state, _) = c.follow(&together.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&together.id).error, c.logs());
    let ft_together = c.submit(&ft.replace("ft-apart", "ft-together"), "");
    let (state, _) = c.follow(&ft_together.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&ft_together.id).error, c.logs());
}

#[test]
fn a_gpt_neox_imports_as_a_rotary_gpt_with_transformers_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("neox.safetensors");
    import(&fixtures().join("neox"), &out, &["--tokenizer", "byte"]);
    let cfg: serde_json::Value = serde_json::from_str(&metadata(&out)["smelt.config"]).unwrap();
    assert_eq!(cfg["positions"], "rotary");
    let diff = max_abs_diff(&logits_of(&out, &fixture_ids()), &expected_logits("logits_neox"));
    assert!(diff < 1e-5, "logits differ from transformers' GPT-NeoX by up to {diff}");

    // what smelt's rotary GPT would compute differently is refused naming it
    let cases: Vec<(Box<dyn FnOnce(&mut serde_json::Value)>, &str)> = vec![
        (Box::new(|c| c["use_parallel_residual"] = true.into()), "use_parallel_residual is true"),
        (Box::new(|c| c["rope_parameters"]["partial_rotary_factor"] = 0.25.into()), "partial_rotary_factor (rotary_pct) is 0.25"),
        (Box::new(|c| c["rope_parameters"]["rope_theta"] = 1e6.into()), "rope_theta (rotary_emb_base) is 1000000"),
        (Box::new(|c| c["rope_parameters"]["rope_type"] = "linear".into()), "rope_type is \"linear\""),
        (Box::new(|c| c["hidden_act"] = "gelu".into()), "hidden_act is \"gelu\""),
        (Box::new(|c| c["intermediate_size"] = 48.into()), "intermediate_size is 48"),
        (Box::new(|c| c["attention_bias"] = false.into()), "attention_bias is false"),
        (Box::new(|c| c["architectures"] = serde_json::json!(["GPTNeoXForSequenceClassification"])), "GPTNeoXForSequenceClassification"),
        // transformers takes rope_scaling in place of rope_parameters, and `type` for rope_type
        (Box::new(|c| c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 4.0, "partial_rotary_factor": 1.0})), "rope_type is \"linear\""),
        (Box::new(|c| c["rope_parameters"]["factor"] = 4.0.into()), "factor is 4.0"),
        // no stored head and not declared tied: transformers would draw a fresh one
        (Box::new(|c| { c.as_object_mut().unwrap().remove("tie_word_embeddings"); }), "tie_word_embeddings is not true"),
    ];
    for (edit, says) in cases {
        let dir = copy_with_config(tmp.path(), "neox", edit);
        let msg = import_fails(&dir, &tmp.path().join("refused.safetensors"), &["--tokenizer", "byte"]);
        assert!(msg.contains(says), "{says}: {msg}");
    }
    // older files' BOOL causal-mask buffers are skipped; a transposed query_key_value is refused
    let neox_tensors = || -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
        let bytes = std::fs::read(fixtures().join("neox/model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect()
    };
    let dir = copy_with_config(tmp.path(), "neox", |_| {});
    let mut t = neox_tensors();
    t.push(("gpt_neox.layers.0.attention.bias".into(), Dtype::BOOL, vec![1, 1, 32, 32], vec![1u8; 32 * 32]));
    write_tensors(&dir.join("model.safetensors"), &t);
    let with_buffer = tmp.path().join("with-buffer.safetensors");
    import(&dir, &with_buffer, &["--tokenizer", "byte"]);
    assert!(max_abs_diff(&logits_of(&with_buffer, &fixture_ids()), &expected_logits("logits_neox")) < 1e-5);
    let dir = copy_with_config(tmp.path(), "neox", |_| {});
    let mut t = neox_tensors();
    let qkv = t.iter_mut().find(|x| x.0 == "gpt_neox.layers.1.attention.query_key_value.weight").unwrap();
    qkv.2 = vec![16, 48];
    write_tensors(&dir.join("model.safetensors"), &t);
    let msg = import_fails(&dir, &tmp.path().join("transposed.safetensors"), &["--tokenizer", "byte"]);
    assert!(msg.contains("query_key_value.weight has shape [16, 48]") && msg.contains("[48, 16]"), "{msg}");

    // transformers 4.x's names for the rotation are read too
    let dir = copy_with_config(tmp.path(), "neox", |c| {
        c.as_object_mut().unwrap().remove("rope_parameters");
        c["rotary_pct"] = 1.0.into();
        c["rotary_emb_base"] = 10000.into();
    });
    import(&dir, &tmp.path().join("v4.safetensors"), &["--tokenizer", "byte"]);
}

#[test]
fn an_imported_gpt2_vocabulary_model_fine_tunes_and_continues_through_the_cluster() {
    let c = Cluster::with_workers(1);
    let dir = c.dir.path().join("gpt2-like");
    gpt2_vocab_model(&dir);
    std::fs::write(dir.join("vocab.json"), serde_json::to_vec(&gpt2_vocab()).unwrap()).unwrap();
    let model = c.dir.path().join("gpt2.safetensors");
    import(&dir, &model, &[]);

    // SFT on GPT-2's tokens: each response ends with <|endoftext|>, which the model has
    let data = c.dir.path().join("sft.jsonl");
    let lines: String = (0..24)
        .map(|i| serde_json::json!({"prompt": format!("Question {i}: what is {i} plus one?"), "response": format!(" It is {}.", i + 1)}).to_string() + "\n")
        .collect();
    std::fs::write(&data, lines).unwrap();
    let ft = format!(
        "name = \"sft-gpt2\"\nkind = \"finetune\"\n[finetune]\ninit_from = {:?}\nhead = \"sft\"\ndata = {:?}\nval_fraction = 0.25\n\
         [train]\nsteps = 3\nglobal_batch = 4\nmicro_batch = 4\nseq_len = 16\nlr = 1e-3\neval_interval = 3\n",
        model.to_str().unwrap(),
        data.to_str().unwrap()
    );
    let job = c.submit(&ft, "");
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&job.id).error, c.logs());
    assert!(metrics.iter().any(|m| m.val_loss.is_some_and(f32::is_finite)));
    let tuned = c.model_path(&job.id);
    assert!(metadata(&tuned)["smelt.tokenizer"].contains("gpt2"));
    let o = smelt(&["sample", "--model", tuned.to_str().unwrap(), "--prompt", "Question 3: what is 3 plus one?", "--tokens", "6", "--seed", "1"]);
    assert!(o.status.success(), "sample: {}", text_of(&o));

    // continued pretraining on a text encoded with GPT-2's BPE
    let text = c.dir.path().join("text.txt");
    std::fs::write(&text, "Continued pretraining reads ordinary English text. ".repeat(60)).unwrap();
    let spec = format!(
        "name = \"continue-gpt2\"\n[model]\ninit_from = {:?}\n[data]\ntext = {:?}\ntokenizer = \"gpt2\"\n\
         [train]\nsteps = 3\nglobal_batch = 4\nmicro_batch = 4\nseq_len = 16\nlr = 1e-3\neval_interval = 3\n",
        model.to_str().unwrap(),
        text.to_str().unwrap()
    );
    let job = c.submit(&spec, "");
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&job.id).error, c.logs());
    // a random model over 50,257 ids starts near ln(50257) = 10.8
    assert!((metrics[0].loss - 50257f32.ln()).abs() < 1.0, "first loss {}", metrics[0].loss);
}

/// The ids of a greedy generation in the fixture (int64).
fn expected_ids(name: &str) -> Vec<u32> {
    let bytes = std::fs::read(fixtures().join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
}

/// smelt's key/value-cache decoder (what `smelt sample` runs) against transformers' `generate`
/// (its own cache) on the imported GPT-2 and GPT-NeoX: from the same 5-id prompt, every step's
/// logits within 1e-5 and the same greedy picks up to the models' 32 positions.
#[test]
fn the_cached_decoder_generates_what_transformers_generates() {
    let tmp = tempfile::tempdir().unwrap();
    for (dir, name) in [("hub", "gpt2"), ("neox", "neox")] {
        let out = tmp.path().join(format!("{name}.safetensors"));
        import(&fixtures().join(dir), &out, &["--tokenizer", "byte"]);
        let saved = smelt_worker::model_file::load(&out).unwrap();
        let v = saved.config.vocab_size;
        let model = smelt_engine::model::Gpt::from_params(smelt_engine::CpuBackend::new(), saved.config, &saved.params).unwrap();
        let (want_ids, want_logits) = (expected_ids(&format!("greedy_{name}")), expected_logits(&format!("greedy_{name}_logits")));
        assert_eq!((want_ids.len(), want_logits.len()), (32, 27 * v));
        let mut dec = model.decoder();
        let mut ids = want_ids[..5].to_vec();
        let mut logits = dec.feed(&ids).unwrap();
        for step in 0..27 {
            let diff = max_abs_diff(&logits, &want_logits[step * v..][..v]);
            assert!(diff < 1e-5, "{name}: step {step}'s logits differ from transformers' by {diff}");
            let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
            ids.push(next);
            if ids.len() < 32 {
                logits = dec.feed(&[next]).unwrap();
            }
        }
        assert_eq!(ids, want_ids, "{name}: greedy ids");
    }
}
