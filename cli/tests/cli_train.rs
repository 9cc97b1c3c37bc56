//! The `smelt` binary end to end: train on a small text, sample, and clear errors on bad input.

use std::path::Path;
use std::process::{Command, Output};

fn smelt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smelt")).args(args).env("RUST_LOG", "warn").output().expect("run smelt")
}

fn text_of(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn write_text(dir: &Path) -> std::path::PathBuf {
    let line = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!\n";
    let path = dir.join("corpus.txt");
    std::fs::write(&path, line.repeat(60)).unwrap();
    path
}

#[test]
fn train_then_sample() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let out = dir.path().join("run");
    let o = smelt(&[
        "--threads", "2", "train", "--text", text.to_str().unwrap(), "--preset", "test", "--steps", "40",
        "--batch", "8", "--seq", "24", "--lr", "3e-3", "--warmup", "5", "--eval-interval", "20",
        "--eval-batches", "4", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "train failed: {}", text_of(&o));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 40);
    let vals: Vec<f64> = rows.iter().filter_map(|r| r["val_loss"].as_f64()).collect();
    assert_eq!(vals.len(), 2, "evaluations at steps 20 and 40");
    let first = rows[0]["loss"].as_f64().unwrap();
    assert!(vals[1] < first * 0.8, "validation loss {} did not fall from the first training loss {first}", vals[1]);

    let model = out.join("model.safetensors");
    let o = smelt(&["sample", "--model", model.to_str().unwrap(), "--prompt", "the ", "--tokens", "50", "--seed", "3"]);
    assert!(o.status.success(), "sample failed: {}", text_of(&o));
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.starts_with("the "));
    assert_eq!(s.trim_end_matches('\n').chars().count(), 4 + 50);
    // Same seed, same text.
    let again = smelt(&["sample", "--model", model.to_str().unwrap(), "--prompt", "the ", "--tokens", "50", "--seed", "3"]);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), s);
    // The key/value cache reads one token a step where --no-kv-cache runs the whole text
    // through the model: within the model's 32 positions, greedy picks are the same.
    let greedy = |extra: &[&str]| {
        let mut args = vec!["sample", "--model", model.to_str().unwrap(), "--prompt", "the quick ", "--tokens", "22", "--temperature", "0", "--device", "cpu"];
        args.extend_from_slice(extra);
        let o = smelt(&args);
        assert!(o.status.success(), "sample {extra:?}: {}", text_of(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    // a negative value is our range error, not clap's "unexpected argument '-1'"
    for (opt, want) in [("--temperature", "--temperature -1 must be >= 0"), ("--top-p", "--top-p -1 must be in (0, 1]"), ("--repetition-penalty", "--repetition-penalty -1 must be positive")] {
        let o = smelt(&["sample", "--model", model.to_str().unwrap(), "--prompt", "the ", opt, "-1"]);
        assert!(!o.status.success() && text_of(&o).contains(want), "{opt}: {}", text_of(&o));
    }
    let cached = greedy(&[]);
    assert_eq!(cached.trim_end_matches('\n').chars().count(), 10 + 22);
    assert_eq!(cached, greedy(&["--no-kv-cache"]));

    // Attention maps of the trained model: one PNG per layer and head, weights in JSON.
    let att = dir.path().join("att");
    // a cell too large for a sane image is refused before anything is drawn (it once aborted
    // the process allocating 750 GB)
    let o = smelt(&["attention", model.to_str().unwrap(), "--text", "the quick fox", "--out", att.to_str().unwrap(), "--cell", "100000"]);
    assert!(!o.status.success() && text_of(&o).contains("--cell 100000: a map of 13 tokens would be 1300000 pixels wide"), "{}", text_of(&o));
    let o = smelt(&["attention", model.to_str().unwrap(), "--text", "the quick fox", "--out", att.to_str().unwrap(), "--cell", "3"]);
    assert!(o.status.success(), "attention failed: {}", text_of(&o));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(att.join("attention.json")).unwrap()).unwrap();
    let (layers, heads) = (doc["layers"].as_u64().unwrap() as usize, doc["heads"].as_u64().unwrap() as usize);
    assert!(layers >= 1 && heads >= 1);
    let t = "the quick fox".chars().count();
    assert_eq!(doc["tokens"].as_array().unwrap().len(), t);
    for l in 0..layers {
        for h in 0..heads {
            let rows = doc["weights"][l][h].as_array().unwrap();
            assert_eq!(rows.len(), t);
            for (i, row) in rows.iter().enumerate() {
                let w: Vec<f64> = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-4, "layer {l} head {h} row {i} is not a distribution");
                assert!(w[i + 1..].iter().all(|&x| x == 0.0), "layer {l} head {h}: query {i} attends to the future");
            }
            let png = std::fs::File::open(att.join(format!("layer{l}_head{h}.png"))).unwrap();
            let info = png::Decoder::new(std::io::BufReader::new(png)).read_info().unwrap().info().clone();
            assert_eq!((info.width, info.height), (3 * t as u32, 3 * t as u32));
        }
    }
}

/// Rotary positions (`--rotary`): no position table in the model file, which `sample` and
/// `attention` read back as rotary; `export hf` refuses it (GPT-2 has a position table).
#[test]
fn a_rotary_model_trains_samples_and_exports_as_gpt_neox() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let out = dir.path().join("rotary");
    let o = smelt(&[
        "--threads", "2", "train", "--text", text.to_str().unwrap(), "--preset", "test", "--rotary", "--steps", "40",
        "--batch", "8", "--seq", "24", "--lr", "3e-3", "--warmup", "5", "--eval-interval", "20",
        "--eval-batches", "4", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "train failed: {}", text_of(&o));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let last_val = rows.iter().filter_map(|r| r["val_loss"].as_f64()).last().unwrap();
    assert!(last_val < rows[0]["loss"].as_f64().unwrap() * 0.8, "validation loss {last_val} did not fall");

    let model = out.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().iter().all(|n| !n.contains("wpe")), "a rotary model has no position table: {:?}", st.names());
    let o = smelt(&["sample", "--model", model.to_str().unwrap(), "--prompt", "the ", "--tokens", "20", "--seed", "3"]);
    assert!(o.status.success(), "sample failed: {}", text_of(&o));
    let att = dir.path().join("att");
    std::fs::create_dir_all(&att).unwrap();
    std::fs::write(att.join("layer9_head9.png"), b"an earlier model's map").unwrap();
    std::fs::write(att.join("notes.txt"), b"the user's").unwrap();
    let o = smelt(&["attention", model.to_str().unwrap(), "--text", "the quick fox", "--out", att.to_str().unwrap()]);
    assert!(o.status.success(), "attention failed: {}", text_of(&o));
    assert!(text_of(&o).contains("(2 layers x 2 heads, 13 tokens)"), "{}", text_of(&o));
    assert!(!att.join("layer9_head9.png").exists() && att.join("notes.txt").exists(), "only the earlier maps are deleted");
    let by_text: serde_json::Value = serde_json::from_slice(&std::fs::read(att.join("attention.json")).unwrap()).unwrap();
    assert_eq!(by_text["arch"], "gpt");
    // --text is the text itself: a file's name there is refused, --text-file reads it
    let file = dir.path().join("fox.txt");
    std::fs::write(&file, "the quick fox\n").unwrap();
    let o = smelt(&["attention", model.to_str().unwrap(), "--text", file.to_str().unwrap(), "--out", att.to_str().unwrap()]);
    assert!(!o.status.success() && text_of(&o).contains("--text-file"), "{}", text_of(&o));
    let o = smelt(&["attention", model.to_str().unwrap(), "--text-file", file.to_str().unwrap(), "--out", att.to_str().unwrap()]);
    assert!(o.status.success(), "attention failed: {}", text_of(&o));
    let by_file: serde_json::Value = serde_json::from_slice(&std::fs::read(att.join("attention.json")).unwrap()).unwrap();
    assert_eq!(by_file["tokens"], by_text["tokens"]);
    assert_eq!(by_file["weights"], by_text["weights"]);
    // GPT-2 has no rotary variant: the export is GPT-NeoX's layout (transformers' names and
    // shapes written out here), and imports back to the same tensors, bit for bit
    let hf = dir.path().join("hf");
    let o = smelt(&["export", "hf", model.to_str().unwrap(), hf.to_str().unwrap()]);
    assert!(o.status.success(), "export failed: {}", text_of(&o));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gpt_neox");
    assert_eq!(cfg["architectures"][0], "GPTNeoXForCausalLM");
    assert_eq!((cfg["use_parallel_residual"].as_bool(), cfg["rope_parameters"]["partial_rotary_factor"].as_f64()), (Some(false), Some(1.0)));
    let exported = std::fs::read(hf.join("model.safetensors")).unwrap();
    let st_hf = safetensors::SafeTensors::deserialize(&exported).unwrap();
    let (v, c) = (cfg["vocab_size"].as_u64().unwrap() as usize, 32usize);
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("gpt_neox.embed_in.weight".into(), vec![v, c]),
        ("gpt_neox.final_layer_norm.weight".into(), vec![c]),
        ("gpt_neox.final_layer_norm.bias".into(), vec![c]),
    ];
    for l in 0..2 {
        for (n, shape) in [
            ("input_layernorm.weight", vec![c]),
            ("input_layernorm.bias", vec![c]),
            ("post_attention_layernorm.weight", vec![c]),
            ("post_attention_layernorm.bias", vec![c]),
            ("attention.query_key_value.weight", vec![3 * c, c]),
            ("attention.query_key_value.bias", vec![3 * c]),
            ("attention.dense.weight", vec![c, c]),
            ("attention.dense.bias", vec![c]),
            ("mlp.dense_h_to_4h.weight", vec![4 * c, c]),
            ("mlp.dense_h_to_4h.bias", vec![4 * c]),
            ("mlp.dense_4h_to_h.weight", vec![c, 4 * c]),
            ("mlp.dense_4h_to_h.bias", vec![c]),
        ] {
            want.push((format!("gpt_neox.layers.{l}.{n}"), shape));
        }
    }
    let mut got: Vec<(String, Vec<usize>)> = st_hf.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // query_key_value is per head [q_h | k_h | v_h]: its row h*3D + p*D + d is c_attn's column p*C + h*D + d
    let (qkv, c_attn) = (st_hf.tensor("gpt_neox.layers.1.attention.query_key_value.weight").unwrap(), st.tensor("transformer.h.1.attn.c_attn.weight").unwrap());
    let f = |b: &[u8], i: usize| f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
    let d = c / 2; // the test preset's two heads
    for (h, p, k, i) in [(0, 0, 0, 0), (1, 0, 3, 5), (0, 1, 7, 31), (1, 2, 15, 17)] {
        assert_eq!(f(qkv.data(), (h * 3 * d + p * d + k) * c + i), f(c_attn.data(), i * 3 * c + p * c + h * d + k), "head {h} part {p}");
    }
    let back = dir.path().join("back.safetensors");
    let o = smelt(&["import", "hf", hf.to_str().unwrap(), back.to_str().unwrap()]);
    assert!(o.status.success(), "import failed: {}", text_of(&o));
    let back_bytes = std::fs::read(&back).unwrap();
    let st_back = safetensors::SafeTensors::deserialize(&back_bytes).unwrap();
    for n in st.names() {
        assert_eq!(st.tensor(n).unwrap().data(), st_back.tensor(n).unwrap().data(), "{n}");
    }
}

#[test]
fn missing_text_names_the_file() {
    let o = smelt(&["train", "--text", "/nonexistent/shakespeare.txt", "--steps", "1"]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains("/nonexistent/shakespeare.txt"), "{}", text_of(&o));
}

#[test]
fn unknown_preset_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let o = smelt(&["train", "--text", text.to_str().unwrap(), "--preset", "gpt5", "--steps", "1"]);
    assert!(!o.status.success());
    let msg = text_of(&o);
    assert!(msg.contains("gpt5") && msg.contains("gpt2-124m"), "{msg}");
}

#[test]
fn seq_longer_than_block_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let o = smelt(&["train", "--text", text.to_str().unwrap(), "--preset", "test", "--seq", "64", "--steps", "1"]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains("--seq 64 is more than the model's block size (32"), "{}", text_of(&o));
    // longer than the text too: the block size is still what is wrong
    let o = smelt(&["train", "--text", text.to_str().unwrap(), "--preset", "test", "--seq", "10000", "--steps", "1"]);
    assert!(!o.status.success());
    let e = text_of(&o);
    assert!(e.contains("block size (32") && !e.contains("tokens cannot fill"), "{e}");
}

#[test]
fn corrupt_model_file_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("model.safetensors");
    std::fs::write(&bad, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let o = smelt(&["sample", "--model", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let msg = text_of(&o);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn prompt_with_unseen_character_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let out = dir.path().join("run");
    let o = smelt(&[
        "train", "--text", text.to_str().unwrap(), "--preset", "test", "--steps", "2", "--batch", "2",
        "--seq", "16", "--eval-interval", "0", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text_of(&o));
    let o = smelt(&["sample", "--model", out.join("model.safetensors").to_str().unwrap(), "--prompt", "ZEBRA"]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains("'Z'"), "{}", text_of(&o));
}

#[test]
fn init_from_continues_a_trained_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let train = |out: &str, extra: &[&str]| -> Output {
        let out = dir.path().join(out);
        let mut args = vec![
            "--threads", "2", "train", "--text", text.to_str().unwrap(), "--batch", "8", "--seq", "16", "--eval-interval", "0",
            "--out", out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        if !extra.contains(&"--steps") {
            args.extend_from_slice(&["--steps", "3", "--lr", "1e-4", "--warmup", "0"]);
        }
        smelt(&args)
    };
    let first_loss = |out: &str| -> f64 {
        let metrics = std::fs::read_to_string(dir.path().join(out).join("metrics.jsonl")).unwrap();
        serde_json::from_str::<serde_json::Value>(metrics.lines().next().unwrap()).unwrap()["loss"].as_f64().unwrap()
    };
    // a parent trained well, then continued: its first loss is the parent's, not a fresh model's
    let o = train("parent", &["--preset", "test", "--steps", "150", "--lr", "3e-3", "--warmup", "5"]);
    assert!(o.status.success(), "{}", text_of(&o));
    let parent = dir.path().join("parent/model.safetensors");
    let o = train("continued", &["--init-from", parent.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text_of(&o));
    let o = train("fresh", &["--preset", "test"]);
    assert!(o.status.success(), "{}", text_of(&o));
    let (cont, fresh) = (first_loss("continued"), first_loss("fresh"));
    assert!(cont < 1.0 && fresh > 2.5, "first loss continued {cont}, fresh {fresh}");
    let meta = |p: &Path| smelt_engine::weights::metadata(&std::fs::read(p).unwrap(), "m").unwrap();
    let (mp, mc) = (meta(&parent), meta(&dir.path().join("continued/model.safetensors")));
    assert_eq!((&mp["smelt.config"], &mp["smelt.tokenizer"]), (&mc["smelt.config"], &mc["smelt.tokenizer"]));

    // the model decides sizes and tokenizer
    let o = train("bad", &["--init-from", parent.to_str().unwrap(), "--n-layer", "3"]);
    assert!(!o.status.success() && text_of(&o).contains("--n-layer"), "{}", text_of(&o));
    let o = train("bad", &["--init-from", parent.to_str().unwrap(), "--tokenizer", "byte"]);
    assert!(!o.status.success() && text_of(&o).contains("uses the char tokenizer"), "{}", text_of(&o));
    let o = train("bad", &["--init-from", dir.path().join("nowhere.safetensors").to_str().unwrap()]);
    assert!(!o.status.success() && text_of(&o).contains("--init-from"), "{}", text_of(&o));
}

#[test]
fn the_schedule_reaches_the_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let out = dir.path().join("wsd");
    let o = smelt(&[
        "--threads", "2", "train", "--text", text.to_str().unwrap(), "--preset", "test", "--steps", "20", "--batch", "4", "--seq", "16",
        "--lr", "1e-3", "--min-lr", "0", "--warmup", "0", "--schedule", "wsd", "--cooldown", "5", "--eval-interval", "0",
        "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text_of(&o));
    let lrs: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"].as_f64().unwrap())
        .collect();
    // steps 1..=15 at the peak, then five steps down a straight line towards 0
    assert!(lrs[..15].iter().all(|&lr| (lr - 1e-3).abs() < 1e-9), "{lrs:?}");
    for (k, want) in [(15, 1e-3), (16, 8e-4), (17, 6e-4), (18, 4e-4), (19, 2e-4)] {
        assert!((lrs[k] - want).abs() < 1e-9, "step {}: {} vs {want} ({lrs:?})", k + 1, lrs[k]);
    }
    assert!(!text_of(&o).contains("every step is warm-up"), "{}", text_of(&o));
    let o = smelt(&["train", "--text", text.to_str().unwrap(), "--schedule", "step", "--steps", "1"]);
    assert!(!o.status.success() && text_of(&o).contains("cosine, linear, constant, wsd"), "{}", text_of(&o));
    // A run that is all warm-up never reaches its schedule: said, not silently ignored.
    let o = smelt(&[
        "--threads", "2", "train", "--text", text.to_str().unwrap(), "--preset", "test", "--steps", "3", "--batch", "2", "--seq", "8",
        "--schedule", "linear", "--eval-interval", "0", "--out", dir.path().join("short").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text_of(&o));
    assert!(text_of(&o).contains("every step is warm-up") && text_of(&o).contains("--schedule linear never applies"), "{}", text_of(&o));
    // on the defaults a short run warms up throughout, as its help says, without a warning
    let o = smelt(&[
        "--threads", "2", "train", "--text", text.to_str().unwrap(), "--preset", "test", "--steps", "3", "--batch", "2", "--seq", "8",
        "--eval-interval", "0", "--out", dir.path().join("short-default").to_str().unwrap(),
    ]);
    assert!(o.status.success() && !text_of(&o).contains("every step is warm-up"), "{}", text_of(&o));
}

/// `--choices`: multiple choice at every evaluation, into metrics.jsonl; the last one is what
/// `smelt eval --choices` gives the saved model (the same scoring, the same weights).
#[test]
fn train_scores_multiple_choice_at_each_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let out = dir.path().join("run");
    let choices = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/choices.jsonl");
    let o = smelt(&[
        "--threads", "2", "train", "--text", text.to_str().unwrap(), "--preset", "test", "--tokenizer", "byte", "--steps", "20",
        "--batch", "4", "--seq", "32", "--eval-interval", "10", "--eval-batches", "2", "--choices", choices.to_str().unwrap(),
        "--choices-max", "5", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "train failed: {}", text_of(&o));
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let scored: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("acc_norm").is_some()).collect();
    assert_eq!(scored.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![10, 20]);
    for r in &scored {
        let (acc, norm) = (r["acc"].as_f64().unwrap(), r["acc_norm"].as_f64().unwrap());
        // 5 examples: a multiple of 1/5
        assert!(((acc * 5.0).round() - acc * 5.0).abs() < 1e-9 && ((norm * 5.0).round() - norm * 5.0).abs() < 1e-9, "{r}");
    }
    let model = out.join("model.safetensors");
    let o = smelt(&["eval", "--json", "--device", "cpu", "--model", model.to_str().unwrap(), "--choices", choices.to_str().unwrap(), "--max-examples", "5"]);
    assert!(o.status.success(), "eval failed: {}", text_of(&o));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((e["acc"].as_f64(), e["acc_norm"].as_f64()), (scored[1]["acc"].as_f64(), scored[1]["acc_norm"].as_f64()));

    // a bad file stops the run before it trains, naming the line
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"ctx\": \"a\", \"endings\": [\"b\"], \"label\": 0}\n").unwrap();
    let o = smelt(&["train", "--text", text.to_str().unwrap(), "--preset", "test", "--steps", "2", "--choices", bad.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains("line 1: 1 endings"), "{}", text_of(&o));
}

/// A model no machine holds is refused before anything is allocated, naming what it needs and
/// what the machine has (the process aborted on the allocation, exit 134); a size past the
/// configs' bounds names the option; a grad clip or eval batch count the spec refuses is
/// refused here too (they ran silently as no clipping and one batch).
#[test]
fn a_model_larger_than_the_machine_is_refused_before_it_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let t = text.to_str().unwrap();
    // 1,024 layers 65,536 wide: about 5e13 parameters, 850 TB of f32 state
    let o = smelt(&["train", "--text", t, "--n-layer", "1024", "--n-head", "64", "--n-embd", "65536", "--block-size", "32", "--steps", "1"]);
    let e = text_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("needs at least") && e.contains(" TB of memory") && e.contains("available"), "{e}");
    let o = smelt(&["train", "--text", t, "--n-layer", "2", "--n-head", "1", "--n-embd", "4294967296", "--block-size", "32", "--steps", "1"]);
    let e = text_of(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("n_embd") && e.contains("4294967296 is more than 65536"), "{e}");
    for (arg, says) in [("--grad-clip=-1", "--grad-clip -1: a gradient norm"), ("--grad-clip=NaN", "--grad-clip NaN"), ("--eval-batches=0", "--eval-batches must be at least 1")] {
        let o = smelt(&["train", "--text", t, "--preset", "test", "--steps", "1", arg]);
        assert!(!o.status.success() && text_of(&o).contains(says), "{arg}: {}", text_of(&o));
    }
}
