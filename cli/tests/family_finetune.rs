//! Fine-tuning BERT and T5 through the cluster for real (a coordinator and worker processes on
//! loopback): a pretrained BERT learns a classification task on two ranks and reports its
//! validation accuracy; a pretrained T5 learns prompt -> response as sequence to sequence, is
//! killed with SIGKILL mid-job and resumes from its checkpoint to the same weights as an
//! uninterrupted run; both record their parents; a head that does not suit the parent fails
//! with an error naming `finetune.head`.

mod harness;

use harness::Cluster;
use smelt_engine::rng::Rng;
use smelt_proto::v1::{JobState, StepMetrics};
use smelt_worker::model_file::{self, AnyModel, FamilyModel};

/// A random word over a..h, with an `x` somewhere when `with_x`.
fn word(rng: &mut Rng, with_x: bool) -> String {
    let n = 4 + rng.below(6) as usize;
    let mut w: Vec<u8> = (0..n).map(|_| b'a' + rng.below(8) as u8).collect();
    if with_x {
        w[rng.below(n as u64) as usize] = b'x';
    }
    String::from_utf8(w).unwrap()
}

/// Pretrains a model; returns (job id, its final model file).
fn pretrain(c: &Cluster, name: &str, model: &str) -> (String, String) {
    let text = c.dir.path().join("words.txt");
    if !text.exists() {
        let mut rng = Rng::new(3);
        let words: String = (0..600).map(|i| word(&mut rng, i % 3 == 0) + " ").collect();
        std::fs::write(&text, words).unwrap();
    }
    let spec = format!(
        "name = {name:?}\nseed = 2\n[model]\n{model}\n[data]\ntext = {:?}\n\
         [train]\nsteps = 40\nglobal_batch = 8\nmicro_batch = 8\nseq_len = 24\nlr = 2e-3\nwarmup_steps = 5\n[cluster]\nworld_size = 1\n",
        text.to_str().unwrap()
    );
    let job = c.submit(&spec, "");
    let (state, _) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "pretraining {name} failed: {}\n{}", c.job(&job.id).error, c.logs());
    let file = c.model_path(&job.id).display().to_string();
    (job.id, file)
}

fn finetune_spec(name: &str, init: &str, head: &str, data: &std::path::Path, steps: u64, world: u32, max_restarts: u32) -> String {
    // T5 must learn to copy through cross-attention: a higher rate gets there in fewer steps.
    let lr = if head == "sft" { 5e-3 } else { 2e-3 };
    format!(
        "name = {name:?}\nkind = \"finetune\"\nseed = 4\nmax_restarts = {max_restarts}\n[finetune]\ninit_from = {init:?}\nhead = {head:?}\n{labels}data = {:?}\nval_fraction = 0.25\n\
         [train]\nsteps = {steps}\nglobal_batch = 16\nmicro_batch = 8\nseq_len = 16\nlr = {lr}\nwarmup_steps = 10\neval_interval = {}\n\
         [cluster]\nworld_size = {world}\n[checkpoint]\nevery = 10\nkeep_last = 2\n",
        data.to_str().unwrap(),
        steps / 2,
        labels = if head == "classification" { "num_labels = 2\n" } else { "" },
    )
}

fn run(c: &Cluster, spec: &str) -> (String, Vec<StepMetrics>) {
    let job = c.submit(spec, "");
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "fine-tuning failed: {}\n{}", c.job(&job.id).error, c.logs());
    (job.id, metrics)
}

fn family_model(c: &Cluster, job: &str) -> model_file::SavedFamilyModel {
    match model_file::load_any(&c.model_path(job)).unwrap() {
        AnyModel::Family(m) => m,
        AnyModel::Gpt(_) => panic!("{job} saved a GPT"),
    }
}

#[test]
fn a_pretrained_bert_fine_tunes_a_classifier_on_two_ranks() {
    let c = Cluster::with_workers(2);
    // (The parent is named by its file: the fine-tuning job's rank 0 may be the other worker.)
    let (parent, file) = pretrain(&c, "bert-parent", "arch = \"bert\"\npreset = \"bert-test\"\nobjective = \"mlm\"");
    // "Does the word hold an x?"
    let mut rng = Rng::new(9);
    let data = c.dir.path().join("labels.jsonl");
    let lines: String = (0..256)
        .map(|i| {
            let x = i % 2 == 0;
            serde_json::json!({"text": word(&mut rng, x), "label": x as u32}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&data, lines).unwrap();

    let (job, metrics) = run(&c, &finetune_spec("bert-classify", &file, "classification", &data, 120, 2, 0));
    let acc: Vec<(u64, f32)> = metrics.iter().filter_map(|m| m.val_accuracy.map(|a| (m.step, a))).collect();
    assert_eq!(acc.iter().map(|a| a.0).collect::<Vec<_>>(), vec![60, 120], "{metrics:?}");
    let last = acc[1].1;
    eprintln!("bert classification: validation accuracy {acc:?}");
    assert!(last >= 0.9, "validation accuracy {last} on a task a bidirectional encoder solves");

    let m = family_model(&c, &job);
    let FamilyModel::Bert { config, .. } = &m.model else { panic!("not a BERT") };
    assert_eq!((config.num_labels, config.nsp), (2, false));
    assert_eq!(m.metadata["smelt.parent_job"], parent);
    assert_eq!(m.metadata["smelt.kind"], "finetune");
    assert!(m.metadata["smelt.val_accuracy"].parse::<f32>().unwrap() >= 0.9);
    // Its checkpoints hold the fine-tuned BERT and name the parent.
    let last = c.job(&job);
    assert_eq!(last.last_checkpoint_step, 120);
    let ck = smelt_checkpoint::load_verified(&last.last_checkpoint_uri).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(ck.trainer.model, m.model.model_config());
    assert_eq!(ck.trainer.lineage.parent_job.as_deref(), Some(parent.as_str()));

    // A BERT does not generate: `smelt sample` says so, and head = "sft" is refused, naming the field.
    let (ok, out) = c.smelt(&["sample", "--model", &file, "--prompt", "ab"]);
    assert!(!ok && out.contains("BERT does not generate"), "{out}");
    let bad = c.submit(&finetune_spec("bert-sft", &file, "sft", &data, 10, 1, 0), "");
    let (state, _) = c.follow(&bad.id);
    assert_eq!(state, JobState::Failed);
    let e = c.job(&bad.id).error;
    assert!(e.contains("finetune.head") && e.contains("BERT"), "{e}");
}

#[test]
fn a_pretrained_t5_fine_tunes_seq2seq_and_resumes_exactly_after_sigkill() {
    let mut c = Cluster::new();
    c.start_worker();
    // (Named by its file: the restarted attempt runs on the other worker, whose output
    // directory does not hold the parent job's files.)
    let (parent, file) = pretrain(&c, "t5-parent", "arch = \"t5\"\npreset = \"t5-test\"\nsentinels = 8");
    // Copy the first three letters of the word.
    let mut rng = Rng::new(11);
    let data = c.dir.path().join("pairs.jsonl");
    let lines: String = (0..200)
        .map(|_| {
            let w = word(&mut rng, false);
            serde_json::json!({"prompt": w, "response": &w[..3]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&data, lines).unwrap();

    let killed = c.submit(&finetune_spec("t5-killed", &file, "sft", &data, 800, 1, 1), "");
    c.wait_job(&killed.id, "a checkpoint at step 20", |j| j.last_checkpoint_step >= 20);
    c.workers[0] = None; // SIGKILL
    assert!(c.job(&killed.id).last_step < 800, "the job finished before the kill");
    c.start_worker();
    let done = c.wait_succeeded(&killed.id);
    assert_eq!(done.restarts, 1, "{done:?}");
    let from = smelt_checkpoint::step_of_uri(&done.resume_from).unwrap_or_else(|| panic!("no checkpoint resumed: {done:?}"));

    let (whole, metrics) = run(&c, &finetune_spec("t5-whole", &file, "sft", &data, 800, 1, 0));
    let vals: Vec<f32> = metrics.iter().filter_map(|m| m.val_loss).collect();
    eprintln!("t5 seq2seq: validation loss {vals:?}, killed run resumed from step {from}");
    assert_eq!(vals.len(), 2);
    // Not reading the prompt, the best a model does is the letters' marginal, ln 8 = 2.08.
    assert!(vals[1] < 0.8 * 8f32.ln(), "validation loss {vals:?}: the model did not learn to copy from the prompt");
    let (a, b) = (family_model(&c, &killed.id), family_model(&c, &whole));
    let differ = a.params.iter().zip(&b.params).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differ, 0, "{differ} weights differ after a kill and a resume from step {from}");
    assert!(matches!(a.model, FamilyModel::T5 { .. }));
    assert_eq!(a.metadata["smelt.parent_job"], parent);

    // `smelt sample` on the fine-tuned T5: greedy responses to prompts it was trained on are
    // their first three letters (the corpus has no end-of-text id, so it writes --tokens): at
    // least half exactly (by chance: 1 in 512), and the first letter almost always (16 and 20
    // of 20 when written; chance: 1 in 8).
    let model = c.model_path(&whole);
    let (mut right, mut first, mut asked) = (0, 0, 0);
    let mut shown = Vec::new();
    for line in std::fs::read_to_string(&data).unwrap().lines().take(20) {
        let pair: serde_json::Value = serde_json::from_str(line).unwrap();
        let (prompt, want) = (pair["prompt"].as_str().unwrap(), pair["response"].as_str().unwrap());
        let (ok, out) = c.smelt(&["sample", "--model", model.to_str().unwrap(), "--prompt", prompt, "--tokens", "3", "--temperature", "0"]);
        assert!(ok, "sample failed: {out}");
        let got = out.lines().next().unwrap_or_default().to_string();
        right += (got == want) as usize;
        first += (got.chars().next() == want.chars().next()) as usize;
        asked += 1;
        shown.push(format!("{prompt} -> {got} (want {want})"));
    }
    eprintln!("t5 responses: {right}/{asked} right, {first} with the right first letter: {shown:?}");
    assert!(right * 2 >= asked && first * 10 >= asked * 9, "{right}/{asked} right, {first} first letters: {shown:?}");
    // more --tokens than the decoder has positions: it stops at them, and says so
    let first_line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&data).unwrap().lines().next().unwrap()).unwrap();
    let prompt = first_line["prompt"].as_str().unwrap();
    let (ok, out) = c.smelt(&["sample", "--model", model.to_str().unwrap(), "--prompt", prompt, "--tokens", "100000", "--temperature", "0"]);
    assert!(ok && out.contains("note: stopped at") && out.contains("--tokens asked for 100000"), "{out}");
    // a GPT's option is refused, not ignored
    let (ok, out) = c.smelt(&["sample", "--model", model.to_str().unwrap(), "--prompt", prompt, "--no-kv-cache"]);
    assert!(!ok && out.contains("--no-kv-cache is for a GPT"), "{out}");

    // A T5 is not a classifier here: head = "classification" is refused, naming the field.
    let bad = c.submit(&finetune_spec("t5-classify", &file, "classification", &data, 10, 1, 0), "");
    let (state, _) = c.follow(&bad.id);
    assert_eq!(state, JobState::Failed);
    let e = c.job(&bad.id).error;
    assert!(e.contains("finetune.head") && e.contains("T5"), "{e}");
}
