//! A fine-tuning job through the cluster for real: a coordinator process and two worker
//! processes on loopback. A pretraining job makes the parent; a two-rank classification job
//! fine-tunes it, streams its validation accuracy, and saves a model that names its parent; a
//! job with a bad init_from fails with an error naming the field.

mod harness;

use harness::Cluster;
use smelt_proto::v1::JobState;

const LINE: &str = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";

#[test]
fn finetune_job_runs_on_two_workers_and_records_its_parent() {
    let c = Cluster::with_workers(2);
    let text = c.dir.path().join("text.txt");
    std::fs::write(&text, LINE.repeat(40)).unwrap();
    let pre = c.submit(&format!(
        "name = \"parent\"\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\n[train]\nsteps = 10\nglobal_batch = 8\nmicro_batch = 8\nseq_len = 16\nlr = 3e-3\n",
        text.to_str().unwrap()
    ), "");
    let (state, _) = c.follow(&pre.id);
    assert_eq!(state, JobState::Succeeded, "pretraining failed\n{}", c.logs());
    let parent = c.model_path(&pre.id);

    // Words of the text; label: does the word hold an 'o'?
    let words: Vec<&str> = LINE.split(|ch: char| !ch.is_alphabetic()).filter(|w| !w.is_empty()).collect();
    let data = c.dir.path().join("labels.jsonl");
    let lines: String = (0..96)
        .map(|i| {
            let w = words[i % words.len()];
            serde_json::json!({"text": w, "label": w.contains('o') as u32}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let ft = |name: &str, init: &str| {
        format!(
            "name = {name:?}\nkind = \"finetune\"\n[finetune]\ninit_from = {init:?}\nhead = \"classification\"\nnum_labels = 2\ndata = {:?}\nval_fraction = 0.25\n\
             [train]\nsteps = 8\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\nlr = 3e-3\neval_interval = 4\n[cluster]\nworld_size = 2\n",
            data.to_str().unwrap()
        )
    };
    let job = c.submit(&ft("classify", parent.to_str().unwrap()), "");
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "fine-tuning failed: {}\n{}", c.job(&job.id).error, c.logs());
    let evals: Vec<(u64, f32)> = metrics.iter().filter_map(|m| m.val_accuracy.map(|a| (m.step, a))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![4, 8], "accuracy at each evaluation: {metrics:?}");
    assert!(evals.iter().all(|e| (0.0..=1.0).contains(&e.1)));
    assert_eq!(c.job(&job.id).last_step, 8);

    let bytes = std::fs::read(c.model_path(&job.id)).unwrap();
    let meta = smelt_engine::weights::metadata(&bytes, "fine-tuned").unwrap();
    assert_eq!(meta["smelt.parent"], parent.to_str().unwrap());
    assert_eq!(meta["smelt.parent_job"], pre.id);
    assert_eq!(meta["smelt.kind"], "finetune");

    // By job id: the parent's final weights are in the output directory of the worker that was
    // its rank 0 (each worker here has its own); the coordinator, which recorded where, tells
    // both ranks (the other one once failed, looking only in its own directory).
    assert_eq!(c.job(&pre.id).model_uri, parent.to_str().unwrap());
    // The CLI asks the coordinator too: a job id not under --store (here an empty directory) is
    // read where the coordinator recorded its final weights (this job has no checkpoints).
    let empty = c.dir.path().join("empty-store");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, out) = c.smelt(&["export", "logits", &pre.id, c.dir.path().join("l.npy").to_str().unwrap(), "--ids", "1,2,3", "--store", empty.to_str().unwrap()]);
    assert!(ok, "{out}");
    // --coordinator rather than SMELT_COORDINATOR (which names another address here)
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["sample", "--model", &pre.id, "--store", empty.to_str().unwrap(), "--tokens", "5", "--prompt", "a"])
        .args(["--coordinator", &format!("http://{}", c.addr)])
        .env("SMELT_COORDINATOR", "http://127.0.0.1:1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ok, out) = c.smelt(&["checkpoints", "list", &pre.id]);
    assert!(!ok && out.contains(&format!("job {} does not checkpoint", pre.id)) && out.contains(parent.to_str().unwrap()), "{out}");
    let (ok, out) = c.smelt(&["export", "logits", "job-000099", c.dir.path().join("l.npy").to_str().unwrap(), "--ids", "1", "--store", empty.to_str().unwrap()]);
    assert!(!ok && out.contains("knows no job job-000099"), "{out}");
    let by_id = c.submit(&ft("classify-by-id", &pre.id), "");
    let (state, _) = c.follow(&by_id.id);
    assert_eq!(state, JobState::Succeeded, "fine-tuning from a job id failed: {}\n{}", c.job(&by_id.id).error, c.logs());
    let meta = smelt_engine::weights::metadata(&std::fs::read(c.model_path(&by_id.id)).unwrap(), "fine-tuned").unwrap().clone();
    assert_eq!((meta["smelt.parent"].as_str(), meta["smelt.parent_job"].as_str()), (pre.id.as_str(), pre.id.as_str()));

    let bad = c.submit(&ft("bad-init", "/nowhere/model.safetensors"), "");
    let (state, _) = c.follow(&bad.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&bad.id).error;
    assert!(error.contains("finetune.init_from") && error.contains("/nowhere/model.safetensors"), "{error}");

    // A fine-tuning job resumed under a longer schedule and another init_from says both in its
    // events (a GPT fine-tune said neither): the lr does not continue the checkpoint's, and the
    // weights descend from the checkpoint's parent, whatever this spec names.
    let checkpointed = |name: &str, init: &str, steps: u32| {
        ft(name, init).replace("steps = 8", &format!("steps = {steps}")).replace("[cluster]", "[checkpoint]\nevery = 4\n[cluster]")
    };
    let first = c.submit(&checkpointed("first", parent.to_str().unwrap(), 8), "");
    let (state, _) = c.follow(&first.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&first.id).error, c.logs());
    let second = c.submit(&checkpointed("second", &pre.id, 12), &first.id);
    let (state, _) = c.follow(&second.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&second.id).error, c.logs());
    let wanted = ["warning: resuming with another learning-rate schedule", "warning: resuming under another finetune.init_from"];
    let events = c.events_with(&second.id, &wanted);
    for w in wanted {
        assert_eq!(events.iter().filter(|e| e.starts_with(w)).count(), 1, "{w}: {events:#?}");
    }
    assert!(!events.iter().any(|e| e.contains("other examples")), "the same examples: {events:#?}");
}
