//! `train.eval_choices` through the cluster for real (a coordinator and two worker processes on
//! loopback): a GPT pretraining job scores multiple choice at each evaluation; the steps' metrics
//! carry its acc_norm as `val_accuracy` (each rank scoring its share, the counts summed), the
//! final model file records the last, and `smelt eval --choices` on that file gives the same
//! figure; the weights are those of the same job without it, bit for bit; an example that
//! cannot be scored fails the job before it trains, naming the field, the file and the line.

mod harness;

use std::path::Path;

use harness::Cluster;
use smelt_proto::v1::JobState;

fn spec(name: &str, text: &Path, choices: &Path, extra: &str) -> String {
    format!(
        "name = {name:?}\nseed = 5\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\ntokenizer = \"byte\"\n\
         [train]\nsteps = 8\nglobal_batch = 4\nmicro_batch = 2\nseq_len = 32\nlr = 1e-3\neval_interval = 4\neval_batches = 2\n\
         eval_choices = {:?}\n{extra}[cluster]\nworld_size = 2\n",
        text.to_str().unwrap(),
        choices.to_str().unwrap(),
    )
}

#[test]
fn a_pretraining_job_scores_multiple_choice_at_each_evaluation() {
    let c = Cluster::with_workers(2);
    let dir = c.dir.path();
    let text = dir.join("corpus.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. 1 2 3 4 5.\n".repeat(40)).unwrap();
    let choices = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/choices.jsonl");

    let job = c.submit(&spec("choices", &text, &choices, ""), "");
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&job.id).error, c.logs());
    let scored: Vec<(u64, f32)> = metrics.iter().filter_map(|m| m.val_accuracy.map(|a| (m.step, a))).collect();
    assert_eq!(scored.iter().map(|s| s.0).collect::<Vec<_>>(), vec![4, 8], "{metrics:?}");
    for (step, acc) in &scored {
        // 6 examples: a multiple of 1/6
        assert!(((acc * 6.0).round() - acc * 6.0).abs() < 1e-5, "step {step}: {acc}");
    }
    let model = c.model_path(&job.id);
    let meta = smelt_engine::weights::metadata(&std::fs::read(&model).unwrap(), "model").unwrap();
    let recorded: f32 = meta["smelt.val_acc_norm"].parse().unwrap();
    assert_eq!(recorded, scored[1].1);
    let (ok, out) = c.smelt(&["eval", "--json", "--device", "cpu", "--model", model.to_str().unwrap(), "--choices", choices.to_str().unwrap()]);
    assert!(ok, "{out}");
    let e: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(e["acc_norm"].as_f64().unwrap() as f32, recorded);
    // `smelt sample` finds the job's weights by its id, as `smelt eval` does
    let store = model.ancestors().nth(3).unwrap(); // <store>/jobs/<job>/model.safetensors
    let greedy = |m: &str| c.smelt(&["sample", "--model", m, "--store", store.to_str().unwrap(), "--prompt", "the ", "--tokens", "12", "--temperature", "0", "--device", "cpu"]);
    let (ok, by_id) = greedy(&job.id);
    assert!(ok, "{by_id}");
    assert_eq!(by_id, greedy(model.to_str().unwrap()).1);
    assert!(by_id.starts_with("the ") && by_id.trim_end_matches('\n').chars().count() == 16, "{by_id:?}");

    // scoring between steps leaves training alone: the same job without it ends with the same
    // weights, bit for bit
    let plain = c.submit(&spec("plain", &text, &choices, "").replace(&format!("eval_choices = {:?}\n", choices.to_str().unwrap()), ""), "");
    let (state, metrics) = c.follow(&plain.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&plain.id).error, c.logs());
    assert!(metrics.iter().all(|m| m.val_accuracy.is_none()));
    assert!(c.weights_of(&plain.id) == c.weights_of(&job.id), "the weights differ with and without eval_choices");

    // an example that cannot be scored (an empty context): the job fails before its first step,
    // naming the field, the file and the line
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"ctx\": \"a\", \"endings\": [\"b\", \"c\"], \"label\": 0}\n{\"ctx\": \"\", \"endings\": [\"b\", \"c\"], \"label\": 1}\n").unwrap();
    let failed = c.submit(&format!("max_restarts = 0\n{}", spec("bad-choices", &text, &bad, "")), "");
    let (state, metrics) = c.follow(&failed.id);
    assert_eq!(state, JobState::Failed, "{}", c.logs());
    assert!(metrics.is_empty(), "trained before failing: {metrics:?}");
    let error = c.job(&failed.id).error;
    assert!(error.contains("train.eval_choices") && error.contains("bad.jsonl, line 2: the context is empty"), "{error}");
}
