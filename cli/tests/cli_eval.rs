//! `smelt eval`: a GPT's loss on a text or a corpus split. The golden value is transformers':
//! the tiny GPT-2 of `tools/hf/make_import_fixture.py`, imported, must give on
//! `eval_text.txt` the mean loss transformers computes over the same windows (`labels=`), and
//! on `choices.jsonl` (HellaSwag's fields) every ending's loss transformers computes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

fn smelt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smelt")).args(args).env("RUST_LOG", "warn").output().expect("run smelt")
}

fn text_of(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `smelt eval --json` on the CPU (the golden values are f32's; a GPU's are bf16's).
fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["eval", "--json", "--device", "cpu"];
    all.extend_from_slice(args);
    let o = smelt(&all);
    assert!(o.status.success(), "eval {args:?}: {}", text_of(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text_of(&o)))
}

fn eval_fails(args: &[&str]) -> String {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    let o = smelt(&all);
    assert!(!o.status.success(), "eval {args:?} should fail: {}", text_of(&o));
    text_of(&o)
}

fn imported(dir: &Path) -> PathBuf {
    let out = dir.join("tiny.safetensors");
    let o = smelt(&["import", "hf", fixtures().join("saved").to_str().unwrap(), out.to_str().unwrap(), "--tokenizer", "byte"]);
    assert!(o.status.success(), "import: {}", text_of(&o));
    out
}

fn transformers_loss() -> f64 {
    let bytes = std::fs::read(fixtures().join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    f32::from_le_bytes(st.tensor("eval_loss_w10").unwrap().data()[..4].try_into().unwrap()) as f64
}

#[test]
fn the_loss_on_a_text_is_transformers_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let model = imported(tmp.path());
    let text = fixtures().join("eval_text.txt");
    let r = eval_json(&["--model", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--seq", "10", "--batch", "2"]);
    // options of --choices given with a text are refused, not ignored
    for extra in [["--log-samples", "x.jsonl"], ["--max-examples", "3"]] {
        let mut args = vec!["--model", model.to_str().unwrap(), "--text", text.to_str().unwrap()];
        args.extend_from_slice(&extra);
        assert!(eval_fails(&args).contains("--log-samples and --max-examples are for --choices"), "{extra:?}");
    }
    let loss = r["loss"].as_f64().unwrap();
    let want = transformers_loss();
    assert!((loss - want).abs() < 1e-5, "loss {loss}, transformers {want}");
    assert_eq!((r["windows"].as_u64(), r["tokens"].as_u64(), r["seq_len"].as_u64()), (Some(5), Some(50), Some(10)));
    // 58 bytes: 57 predictions, 7 after the fifth window, which no window makes (said)
    assert_eq!(r["left_out_tokens"].as_u64(), Some(7));
    assert!((r["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-3);
    // one byte per token: bits per byte is the loss in bits
    assert!((r["bits_per_byte"].as_f64().unwrap() - want / std::f64::consts::LN_2).abs() < 1e-5);
    // the batch size does not change the result
    let r1 = eval_json(&["--model", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--seq", "10", "--batch", "5"]);
    assert!((r1["loss"].as_f64().unwrap() - loss).abs() < 1e-6);
    // --max-tokens keeps the first windows only
    let r2 = eval_json(&["--model", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--seq", "10", "--max-tokens", "20"]);
    assert_eq!(r2["windows"].as_u64(), Some(2));
    assert!((r2["loss"].as_f64().unwrap() - loss).abs() > 1e-4, "two windows are not five");

    // the plain output says the same
    let o = smelt(&["eval", "--model", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--seq", "10"]);
    assert!(o.status.success());
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(line.contains(&format!("loss {want:.4}")) && line.contains("5 windows of 10; the last 7 tokens, less than a window, left out)"), "{line}");

    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--seq", "64"]);
    assert!(msg.contains("--seq 64: must be in 1..=32"), "{msg}");
    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--seq", "30", "--max-tokens", "12"]);
    assert!(msg.contains("--max-tokens 12: fewer predictions than one window of --seq 30"), "{msg}");
    // one window is one (not "1 windows")
    let o = smelt(&["eval", "--model", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--seq", "10", "--max-tokens", "10"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("(1 window of 10)"), "{}", text_of(&o));
    let msg = eval_fails(&["--model", model.to_str().unwrap()]);
    assert!(msg.contains("--text") || msg.contains("--corpus"), "{msg}");
    // --split is for a corpus; a huge --max-tokens is all of them
    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--split", "train"]);
    assert!(msg.contains("--corpus"), "{msg}");
    let all = eval_json(&["--model", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--seq", "10", "--max-tokens", "18446744073709551615"]);
    assert_eq!(all["windows"].as_u64(), Some(5));
}

#[test]
fn a_corpus_split_is_evaluated_when_its_tokenizer_is_the_models() {
    let tmp = tempfile::tempdir().unwrap();
    let model = imported(tmp.path());
    let input = tmp.path().join("docs.txt");
    std::fs::write(&input, "first document about foxes\nsecond one, about dogs\nthird: cats and mice\nfourth and last\n").unwrap();
    let prep = |tok: &str| {
        let out = tmp.path().join(format!("corpus-{tok}"));
        let o = smelt(&["corpus", "prepare", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--tokenizer", tok, "--txt-docs", "line", "--val-docs", "2"]);
        assert!(o.status.success(), "prepare: {}", text_of(&o));
        out
    };
    let bytes = prep("byte");
    let val = eval_json(&["--model", model.to_str().unwrap(), "--corpus", bytes.to_str().unwrap(), "--seq", "8"]);
    let train = eval_json(&["--model", model.to_str().unwrap(), "--corpus", bytes.to_str().unwrap(), "--split", "train", "--seq", "8"]);
    assert!(val["data"].as_str().unwrap().ends_with("(val)") && train["data"].as_str().unwrap().ends_with("(train)"));
    assert_ne!(val["tokens"], train["tokens"]);
    // windows read batch by batch through the reader (one window a batch here, eight by default): the same result
    let train_b1 = eval_json(&["--model", model.to_str().unwrap(), "--corpus", bytes.to_str().unwrap(), "--split", "train", "--seq", "8", "--batch", "1"]);
    assert!((train_b1["loss"].as_f64().unwrap() - train["loss"].as_f64().unwrap()).abs() < 1e-6);
    // --max-tokens reads only the first tokens of a split
    let first = eval_json(&["--model", model.to_str().unwrap(), "--corpus", bytes.to_str().unwrap(), "--split", "train", "--seq", "8", "--max-tokens", "16"]);
    assert_eq!(first["windows"].as_u64(), Some(2));
    // end-of-text ids (256) stand for no bytes: fewer bytes than tokens, so more bits per byte
    // than the loss in bits
    for r in [&val, &train] {
        let bits = r["loss"].as_f64().unwrap() / std::f64::consts::LN_2;
        assert!(r["bits_per_byte"].as_f64().unwrap() > bits, "{r}");
    }
    let chars = prep("char");
    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--corpus", chars.to_str().unwrap(), "--seq", "8"]);
    assert!(msg.contains("tokenized with char, but the model uses byte"), "{msg}");
    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--corpus", bytes.to_str().unwrap(), "--split", "test"]);
    assert!(msg.contains("--split \"test\""), "{msg}");
}

fn expected_f64(name: &str) -> Vec<f64> {
    let bytes = std::fs::read(fixtures().join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name).unwrap().data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// `--choices`: HellaSwag's scoring against transformers' losses of every ending (the fixture's
/// `choices_sum_loss` / `choices_mean_loss`, one example cut to the model's positions), and
/// acc / acc_norm from the picks those losses make.
#[test]
fn multiple_choice_scores_are_transformers_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let model = imported(tmp.path());
    let choices = fixtures().join("choices.jsonl");
    let log = tmp.path().join("samples.jsonl");
    let r = eval_json(&["--model", model.to_str().unwrap(), "--choices", choices.to_str().unwrap(), "--log-samples", log.to_str().unwrap()]);
    let (want_sum, want_mean) = (expected_f64("choices_sum_loss"), expected_f64("choices_mean_loss"));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 6);
    let argmin = |x: &[f64]| x.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let (mut right, mut right_norm) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let got = |k: &str| row[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>();
        let (sum, mean) = (got("sum_loss"), got("mean_loss"));
        let n = sum.len();
        assert_eq!(n, if i == 5 { 3 } else { 4 }, "example {i}'s endings");
        let (ws, wm) = (&want_sum[i * 4..i * 4 + n], &want_mean[i * 4..i * 4 + n]);
        for k in 0..n {
            assert!((mean[k] - wm[k]).abs() < 1e-5, "example {i} ending {k}: mean loss {} vs transformers {}", mean[k], wm[k]);
            assert!((sum[k] - ws[k]).abs() < 1e-4 * ws[k], "example {i} ending {k}: summed loss {} vs transformers {}", sum[k], ws[k]);
        }
        let label = row["label"].as_u64().unwrap() as usize;
        assert_eq!((row["pred"].as_u64(), row["pred_norm"].as_u64()), (Some(argmin(ws) as u64), Some(argmin(wm) as u64)), "example {i}");
        right += usize::from(argmin(ws) == label);
        right_norm += usize::from(argmin(wm) == label);
    }
    // the fixture's labels make the two accuracies differ (3/6 and 4/6)
    assert_eq!((right, right_norm), (3, 4));
    assert_eq!((r["right"].as_u64(), r["right_norm"].as_u64(), r["examples"].as_u64()), (Some(3), Some(4), Some(6)));
    assert!((r["acc"].as_f64().unwrap() - 0.5).abs() < 1e-12 && (r["acc_norm"].as_f64().unwrap() - 4.0 / 6.0).abs() < 1e-12);
    // --max-examples: the first two
    let r = eval_json(&["--model", model.to_str().unwrap(), "--choices", choices.to_str().unwrap(), "--max-examples", "2"]);
    assert_eq!((r["examples"].as_u64(), r["right"].as_u64(), r["right_norm"].as_u64()), (Some(2), Some(1), Some(1)));

    // bad files are refused naming the line and what is wrong
    let bad = |name: &str, body: &str, want: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, body).unwrap();
        let msg = eval_fails(&["--model", model.to_str().unwrap(), "--choices", path.to_str().unwrap()]);
        assert!(msg.contains(want), "{name}: {msg}");
    };
    let ok = r#"{"ctx": "a", "endings": ["b", "c"], "label": 0}"#;
    bad("label.jsonl", &format!("{ok}\n{}", r#"{"ctx": "a", "endings": ["b", "c"], "label": 2}"#), "line 2: label 2 is not an index of its 2 endings");
    bad("one.jsonl", r#"{"ctx": "a", "endings": ["b"], "label": 0}"#, "line 1: 1 endings");
    bad("nojson.jsonl", "{\"ctx\": ", "line 1: not JSON");
    bad("noctx.jsonl", r#"{"context": "a", "endings": ["b", "c"], "label": 0}"#, "no string field \"ctx\"");
    bad("empty.jsonl", "\n\n", "no examples");
    bad("long.jsonl", &format!(r#"{{"ctx": "a", "endings": ["{}", "c"], "label": 0}}"#, "x".repeat(40)), "ending 0 is 41 tokens: more than the 32 positions scored");
    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--choices", choices.to_str().unwrap(), "--seq", "8"]);
    assert!(msg.contains("--choices scores whole examples"), "{msg}");

    // --device: a GPU that is not there (or a binary without the cuda feature) is refused
    // naming it, never a silent CPU run
    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--choices", choices.to_str().unwrap(), "--device", "cuda:9999"]);
    assert!(msg.contains("--device cuda:9999: "), "{msg}");
    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--choices", choices.to_str().unwrap(), "--device", "tpu"]);
    assert!(msg.contains("expected auto, cpu or cuda:N"), "{msg}");
}

/// A char model trained on a text has no end-of-text id; a char corpus of the same text's
/// documents has one. The corpus is evaluated as the documents joined without it: the same
/// windows, the same loss as the joined text's.
#[test]
fn a_text_trained_char_model_is_evaluated_on_a_char_corpus_of_its_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    let parts = ["the quick brown fox jumps over the lazy dog.\n", "pack my box with five dozen liquor jugs; ", "how vexingly quick daft zebras jump!\n"];
    for (i, p) in parts.iter().enumerate() {
        std::fs::write(docs.join(format!("{i}.txt")), p.repeat(4)).unwrap();
    }
    let joined = tmp.path().join("joined.txt");
    std::fs::write(&joined, parts.iter().map(|p| p.repeat(4)).collect::<String>()).unwrap();
    let run = tmp.path().join("run");
    let o = smelt(&[
        "--threads", "2", "train", "--text", joined.to_str().unwrap(), "--preset", "test", "--steps", "2", "--batch", "4", "--seq", "16",
        "--out", run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "train: {}", text_of(&o));
    let corpus = tmp.path().join("corpus");
    let o = smelt(&["corpus", "prepare", "--input", docs.to_str().unwrap(), "--out", corpus.to_str().unwrap(), "--tokenizer", "char", "--val-docs", "0"]);
    assert!(o.status.success(), "prepare: {}", text_of(&o));
    let model = run.join("model.safetensors");
    let on_text = eval_json(&["--model", model.to_str().unwrap(), "--text", joined.to_str().unwrap(), "--seq", "16", "--batch", "3"]);
    let on_corpus = eval_json(&["--model", model.to_str().unwrap(), "--corpus", corpus.to_str().unwrap(), "--split", "train", "--seq", "16", "--batch", "3"]);
    assert_eq!((on_corpus["windows"].as_u64(), on_corpus["tokens"].as_u64()), (on_text["windows"].as_u64(), on_text["tokens"].as_u64()));
    let (a, b) = (on_text["loss"].as_f64().unwrap(), on_corpus["loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-6, "text {a}, corpus {b}");
    // a byte corpus is still another tokenizer's
    let bytes = tmp.path().join("bytes");
    assert!(smelt(&["corpus", "prepare", "--input", docs.to_str().unwrap(), "--out", bytes.to_str().unwrap(), "--tokenizer", "byte", "--val-docs", "0"]).status.success());
    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--corpus", bytes.to_str().unwrap(), "--split", "train"]);
    assert!(msg.contains("tokenized with byte, but the model uses char"), "{msg}");
    // and a char corpus of other characters says which
    let upper_docs = tmp.path().join("upper-docs");
    std::fs::create_dir(&upper_docs).unwrap();
    std::fs::write(upper_docs.join("0.txt"), parts.concat().to_uppercase().repeat(4)).unwrap();
    let upper = tmp.path().join("upper");
    assert!(smelt(&["corpus", "prepare", "--input", upper_docs.to_str().unwrap(), "--out", upper.to_str().unwrap(), "--tokenizer", "char", "--val-docs", "0"]).status.success());
    let msg = eval_fails(&["--model", model.to_str().unwrap(), "--corpus", upper.to_str().unwrap(), "--split", "train"]);
    assert!(msg.contains("another character vocabulary") && msg.contains("only the corpus has 'A'") && msg.contains("only the model has 'a'"), "{msg}");
}
