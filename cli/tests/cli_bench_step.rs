//! `smelt bench step --arch gpt|bert|t5` on the CPU with tiny presets, as a user runs it: the
//! JSON report has every field, finite, and counts input tokens (B*T; T5: B*Te). A benchmark
//! reports and never asserts speed, so neither does this test.

use std::process::{Command, Output};

fn smelt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smelt")).args(args).env("RUST_LOG", "warn").output().expect("run smelt")
}

fn text_of(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The report of `smelt bench step <args> --json --threads 2 --warmup 1 --steps 2`.
fn step_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bench", "step", "--threads", "2", "--warmup", "1", "--steps", "2", "--json"];
    all.extend_from_slice(args);
    let o = smelt(&all);
    assert!(o.status.success(), "smelt {all:?}: {}", text_of(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text_of(&o)))
}

fn finite(j: &serde_json::Value, field: &str) -> f64 {
    let v = j[field].as_f64().unwrap_or_else(|| panic!("`{field}` missing or not a number in {j}"));
    assert!(v.is_finite(), "`{field}` = {v} in {j}");
    v
}

/// Fields every step report has, finite and positive where they must be.
fn check_common(j: &serde_json::Value, arch: &str, preset: &str, tokens_per_step: f64) {
    assert_eq!(j["bench"], "step", "{j}");
    assert_eq!(j["arch"], arch, "{j}");
    assert_eq!(j["preset"], preset, "{j}");
    assert_eq!(j["backend"], "cpu", "{j}");
    assert_eq!(j["steps"], 2, "{j}");
    assert_eq!(j["warmup_steps"], 1, "{j}");
    assert!(j["params"].as_u64().is_some_and(|p| p > 0), "{j}");
    assert_eq!(finite(j, "tokens_per_step"), tokens_per_step, "input tokens per step: {j}");
    for field in ["ms_per_step", "ms_per_step_min", "ms_per_step_max", "tokens_per_s", "flops_per_token", "gflops_per_s", "sgemm_gflops_per_s"] {
        assert!(finite(j, field) > 0.0, "`{field}` must be positive: {j}");
    }
    assert!(finite(j, "fraction_of_sgemm") >= 0.0, "{j}");
    let (min, med, max) = (finite(j, "ms_per_step_min"), finite(j, "ms_per_step"), finite(j, "ms_per_step_max"));
    assert!(min <= med && med <= max, "median outside [min, max]: {j}");
    // tokens/s is the input tokens of one step over the median step time
    let want = tokens_per_step / (med / 1e3);
    assert!((finite(j, "tokens_per_s") - want).abs() <= 1e-6 * want, "{j}");
}

#[test]
fn bert_masked_lm_step_reports_input_tokens() {
    let j = step_json(&["--arch", "bert", "--preset", "bert-test", "--batch", "3", "--seq", "24"]);
    check_common(&j, "bert", "bert-test", 72.0);
    assert!(j.get("dec_seq").is_none(), "BERT has no decoder: {j}");
}

#[test]
fn t5_step_counts_encoder_tokens_and_reports_the_decoder_length() {
    let j = step_json(&["--arch", "t5", "--preset", "t5-test", "--batch", "2", "--seq", "20", "--dec-seq", "7"]);
    check_common(&j, "t5", "t5-test", 40.0);
    assert_eq!(j["dec_seq"], 7, "{j}");
    // the default decoder length: a quarter of the encoder's, rounded up
    let j = step_json(&["--arch", "t5", "--preset", "t5-test", "--batch", "1", "--seq", "21"]);
    check_common(&j, "t5", "t5-test", 21.0);
    assert_eq!(j["dec_seq"], 6, "{j}");
}

#[test]
fn learned_scores_are_timed_and_reported() {
    for scores in ["general", "additive"] {
        let j = step_json(&["--arch", "bert", "--preset", "bert-test", "--batch", "2", "--seq", "16", "--scores", scores]);
        check_common(&j, "bert", "bert-test", 32.0);
        assert_eq!(j["scores"], scores, "{j}");
        let j = step_json(&["--arch", "t5", "--preset", "t5-test", "--batch", "2", "--seq", "16", "--scores", scores]);
        check_common(&j, "t5", "t5-test", 32.0);
        assert_eq!(j["scores"], scores, "{j}");
    }
    let j = step_json(&["--arch", "bert", "--preset", "bert-test", "--batch", "2", "--seq", "16"]);
    assert_eq!(j["scores"], "dot", "{j}");
}

#[test]
fn gpt_stays_the_default_arch() {
    let j = step_json(&["--preset", "tiny", "--batch", "2", "--seq", "16"]);
    check_common(&j, "gpt", "tiny", 32.0);
}

/// `--profile` and `--timeline` print the per-op table on stderr (the CPU has no device
/// timeline, so `--timeline` times each op as `--profile` does and says so), with the JSON
/// report still on stdout; the two cannot be asked together.
#[test]
fn profiles_print_the_op_table() {
    for flag in ["--profile", "--timeline"] {
        let all = ["bench", "step", "--threads", "2", "--warmup", "1", "--steps", "2", "--json", "--preset", "tiny", "--batch", "2", "--seq", "16", flag];
        let o = smelt(&all);
        assert!(o.status.success(), "smelt {all:?}: {}", text_of(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("each op synchronised"), "{flag}: {err}");
        assert!(err.contains("matmul_forward") && err.contains("all ops"), "{flag}: {err}");
        // the CPU declines the fused ops (its GELU is timed apart): no rows of zero-time calls
        assert!(!err.contains("+gelu") && err.contains("gelu_forward"), "{flag}: {err}");
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text_of(&o)));
        check_common(&j, "gpt", "tiny", 32.0);
    }
    let o = smelt(&["bench", "step", "--preset", "tiny", "--profile", "--timeline"]);
    assert!(!o.status.success());
    assert!(text_of(&o).contains("cannot be used with"), "{}", text_of(&o));
}

#[test]
fn rotary_positions_are_timed_without_a_position_table() {
    let learned = step_json(&["--preset", "tiny", "--batch", "2", "--seq", "16"]);
    let rotary = step_json(&["--preset", "tiny", "--batch", "2", "--seq", "16", "--rotary"]);
    check_common(&rotary, "gpt", "tiny", 32.0);
    assert_eq!((learned["positions"].as_str(), rotary["positions"].as_str()), (Some("learned"), Some("rotary")));
    // tiny: 128 positions x 128 wide fewer parameters
    assert_eq!(learned["params"].as_u64().unwrap() - rotary["params"].as_u64().unwrap(), 128 * 128, "{learned}\n{rotary}");
}

#[test]
fn bad_lengths_are_clear_errors() {
    let cases: [(&[&str], &str); 5] = [
        (&["--arch", "bert", "--preset", "bert-test", "--dec-seq", "4"], "--dec-seq is for --arch t5"),
        (&["--preset", "tiny", "--scores", "general"], "--scores is for --arch bert or t5"),
        (&["--arch", "bert", "--preset", "bert-test", "--scores", "bilinear"], "bilinear"),
        (&["--arch", "bert", "--preset", "bert-test", "--seq", "33"], "exceeds the preset's max_positions 32"),
        (&["--arch", "t5", "--preset", "t5-test", "--seq", "16", "--dec-seq", "40"], "--dec-seq 40 exceeds"),
    ];
    for (args, want) in cases {
        let mut all = vec!["bench", "step", "--steps", "1", "--warmup", "0"];
        all.extend_from_slice(args);
        let o = smelt(&all);
        let text = text_of(&o);
        assert!(!o.status.success(), "smelt {all:?} should fail: {text}");
        assert!(text.contains(want), "smelt {all:?}: expected `{want}` in: {text}");
    }
}
