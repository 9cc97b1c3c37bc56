//! Rescue checkpoints, for real (a coordinator and worker processes on loopback, SIGKILL): a
//! job that checkpoints rarely loses a worker mid-run; rank 0's step fails without its update,
//! so rank 0 saves the step it completed last before it ends; the restart resumes there (its
//! first step is the one after), not at the start, and ends with exactly the weights of the same
//! job run without a fault. For every training loop a worker runs: GPT pretraining, BERT
//! pretraining (the BERT/T5 loop), a GPT fine-tuned with a classification head, and a BERT
//! classifier (the BERT/T5 fine-tuning loop).

mod harness;

use std::path::Path;

use harness::Cluster;
use smelt_proto::v1::JobState;

const LINE: &str = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";

/// A two-rank pretraining job over a small text that checkpoints too rarely to matter.
fn pretrain_spec(c: &Cluster, name: &str, model: &str, steps: u64) -> String {
    let text = c.dir.path().join("corpus.txt");
    if !text.exists() {
        std::fs::write(&text, LINE.repeat(40)).unwrap();
    }
    format!(
        "name = {name:?}\nmax_restarts = 1\nseed = 7\n[model]\n{model}\n[data]\ntext = {:?}\ntokenizer = \"char\"\n\
         [train]\nsteps = {steps}\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\nlr = 3e-3\nwarmup_steps = 2\neval_interval = 0\neval_batches = 2\n\
         [cluster]\nworld_size = 2\n[checkpoint]\nevery = 100000\n",
        text.to_str().unwrap()
    )
}

/// A two-rank classification fine-tuning job of `parent` (does a word hold an 'o'?).
fn finetune_spec(c: &Cluster, name: &str, parent: &Path, steps: u64) -> String {
    let data = c.dir.path().join("labels.jsonl");
    if !data.exists() {
        let words: Vec<&str> = LINE.split(|ch: char| !ch.is_alphabetic()).filter(|w| !w.is_empty()).collect();
        let lines: String =
            (0..96).map(|i| serde_json::json!({"text": words[i % words.len()], "label": words[i % words.len()].contains('o') as u32}).to_string() + "\n").collect();
        std::fs::write(&data, lines).unwrap();
    }
    format!(
        "name = {name:?}\nkind = \"finetune\"\nmax_restarts = 1\nseed = 5\n[finetune]\ninit_from = {:?}\nhead = \"classification\"\nnum_labels = 2\ndata = {:?}\nval_fraction = 0.25\n\
         [train]\nsteps = {steps}\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\nlr = 1e-3\nwarmup_steps = 2\neval_interval = 0\n\
         [cluster]\nworld_size = 2\n[checkpoint]\nevery = 100000\n",
        parent.to_str().unwrap(),
        data.to_str().unwrap()
    )
}

/// The live worker whose log says it trains `job` as rank 0.
fn rank0_worker(c: &Cluster, job: &str) -> Option<usize> {
    (0..c.workers.len()).filter(|&i| c.workers[i].is_some()).find(|i| {
        let log = std::fs::read_to_string(c.dir.path().join(format!("worker-{i}.log"))).unwrap_or_default();
        log.lines().any(|l| (l.contains("training started") || l.contains("fine-tuning started")) && l.contains(job) && l.contains("rank=0"))
    })
}

/// Runs `spec("rescued")` and SIGKILLs its rank 1 after 20 steps, then checks the rescue (the
/// event, the restart's first step) and that its weights are those of `spec("plain")` run
/// without a fault. Returns the rescued job's id.
fn rescued_job_matches_an_uninterrupted_one(c: &mut Cluster, spec: &dyn Fn(&Cluster, &str) -> String, steps: u64) -> String {
    let job = c.submit(&spec(c, "rescued"), "");
    c.wait_job(&job.id, "20 steps", |j| j.last_step >= 20);
    let rank0 = rank0_worker(c, &job.id).unwrap_or_else(|| panic!("no worker logged rank 0 of {}\n{}", job.id, c.logs()));
    // SIGKILL the job's other rank: the other live worker (dropping its process handle kills it)
    let other = (0..c.workers.len()).find(|&i| i != rank0 && c.workers[i].is_some()).expect("a second live worker");
    c.workers[other] = None;
    c.start_worker();
    let (state, _) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&job.id).error, c.logs());
    let done = c.job(&job.id);
    assert_eq!(done.restarts, 1, "{done:?}");

    // the event names the step saved, and the second attempt's first step is the one after it
    let at = c.rescued_step(&job.id);
    assert!((20..steps).contains(&at), "rescued at step {at}");
    let first_of_2 = c.reported_steps(&job.id).iter().filter(|s| s.0 == 2).map(|s| s.1).min();
    assert_eq!(first_of_2, Some(at + 1), "the restart did not resume at the rescued step");

    // the surviving rank 0's account of it is in the job's logs, under attempt 1
    let (ok, logs) = c.smelt(&["jobs", "logs", &job.id, "--attempt", "1", "--rank", "0"]);
    assert!(ok && logs.lines().any(|l| l.contains(" a1 r0 ") && l.contains("rescue checkpoint") && l.contains(&format!("step={at}"))), "{logs}");

    // exact: the same weights as the job run without a fault
    let plain = c.submit(&spec(c, "plain"), "");
    let (state, _) = c.follow(&plain.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&plain.id).error, c.logs());
    assert!(c.weights_of(&job.id) == c.weights_of(&plain.id), "the rescued run's weights differ from an uninterrupted run's");
    job.id
}

#[test]
fn a_gpt_pretraining_and_fine_tuning_that_lose_a_peer_restart_from_their_rescue_checkpoints() {
    let mut c = Cluster::with_workers(2);
    let pre = rescued_job_matches_an_uninterrupted_one(&mut c, &|c, name| pretrain_spec(c, &format!("gpt-{name}"), "preset = \"test\"", 400), 400);
    let parent = c.model_path(&pre);
    rescued_job_matches_an_uninterrupted_one(&mut c, &|c, name| finetune_spec(c, &format!("gpt-classify-{name}"), &parent, 300), 300);
}

#[test]
fn a_bert_pretraining_and_fine_tuning_that_lose_a_peer_restart_from_their_rescue_checkpoints() {
    let mut c = Cluster::with_workers(2);
    let bert = "arch = \"bert\"\npreset = \"bert-test\"\nobjective = \"mlm+nsp\"";
    let pre = rescued_job_matches_an_uninterrupted_one(&mut c, &|c, name| pretrain_spec(c, &format!("bert-{name}"), bert, 300), 300);
    let parent = c.model_path(&pre);
    rescued_job_matches_an_uninterrupted_one(&mut c, &|c, name| finetune_spec(c, &format!("bert-classify-{name}"), &parent, 300), 300);
}
