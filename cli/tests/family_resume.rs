//! BERT and T5 jobs checkpoint and resume exactly, like GPT ones, with real processes: a BERT
//! worker killed with SIGKILL mid-job is restarted from its last checkpoint and ends with
//! weights bitwise identical to an uninterrupted run's; a cancelled T5 job resumed with
//! `--resume-from` likewise. Their checkpoints name the architecture, and a checkpoint of the
//! other architecture, or of another character vocabulary, is refused with an error saying so.

mod harness;

use harness::Cluster;
use smelt_proto::v1::{CancelJobRequest, JobState};
use smelt_worker::model_file::{self, AnyModel};

const STEPS: u64 = 120;
const EVERY: u64 = 10;

/// Every checkpoint is kept (`keep_every`): the test reads the one a restart resumed from after
/// the job ends, and the resumed attempt checkpoints beside it (one directory per job), where
/// `keep_last` alone would have pruned it.
fn spec(c: &Cluster, name: &str, model: &str, max_restarts: u32) -> String {
    let text = c.dir.path().join("corpus.txt");
    if !text.exists() {
        let line = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";
        std::fs::write(&text, line.repeat(40)).unwrap();
    }
    format!(
        "name = {name:?}\nmax_restarts = {max_restarts}\nseed = 7\n[model]\n{model}\n[data]\ntext = {:?}\n\
         [train]\nsteps = {STEPS}\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 24\nlr = 2e-3\nwarmup_steps = 5\neval_interval = 40\neval_batches = 2\n\
         [cluster]\nworld_size = 1\n[checkpoint]\nevery = {EVERY}\nkeep_last = 2\nkeep_every = {EVERY}\n",
        text.to_str().unwrap()
    )
}

const BERT: &str = "arch = \"bert\"\npreset = \"bert-test\"\nobjective = \"mlm+nsp\"";
const T5: &str = "arch = \"t5\"\npreset = \"t5-test\"\nsentinels = 8";

fn weights(c: &Cluster, job: &str) -> Vec<f32> {
    let p = c.model_file(job).unwrap_or_else(|| panic!("no final weights for {job}\n{}", c.logs()));
    match model_file::load_any(&p).unwrap() {
        AnyModel::Family(m) => m.params,
        AnyModel::Gpt(_) => panic!("{job} saved a GPT"),
    }
}

fn assert_bitwise(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differ, 0, "{what}: {differ} of {} weights differ from the uninterrupted run's", a.len());
}

#[test]
fn a_bert_job_killed_with_sigkill_resumes_from_its_checkpoint_and_ends_bitwise_identical() {
    let mut c = Cluster::new();
    c.start_worker();
    let killed = c.submit(&spec(&c, "bert-killed", BERT, 1), "");
    c.wait_job(&killed.id, "a checkpoint at step 20", |j| j.last_checkpoint_step >= 20);
    c.workers[0] = None; // SIGKILL
    assert!(c.job(&killed.id).last_step < STEPS, "the job finished before the kill");
    c.start_worker();
    let done = c.wait_succeeded(&killed.id);
    assert_eq!(done.restarts, 1, "{done:?}");
    let from = smelt_checkpoint::step_of_uri(&done.resume_from).unwrap_or_else(|| panic!("no checkpoint resumed: {done:?}"));
    assert!(from >= 20 && from < STEPS, "resumed from step {from}");

    // The checkpoint is a BERT's, and its weights are a BERT model file.
    let ck = smelt_checkpoint::load_verified(&done.resume_from).unwrap();
    assert_eq!(ck.trainer.model.arch(), "bert");
    assert_eq!(ck.trainer.trainer.optimizer_steps, from);
    let m = model_file::family_from_bytes(&std::fs::read(format!("{}/model.safetensors", done.resume_from)).unwrap(), "ckpt").unwrap();
    assert_eq!(m.model.model_config(), ck.trainer.model);

    let whole = c.submit(&spec(&c, "bert-whole", BERT, 0), "");
    c.wait_succeeded(&whole.id);
    assert_bitwise(&weights(&c, &killed.id), &weights(&c, &whole.id), &format!("bert killed and resumed from step {from}"));

    // A T5 job cannot resume from a BERT checkpoint: the error names both.
    let wrong = c.submit(&spec(&c, "t5-from-bert", T5, 0), &killed.id);
    let (state, _) = c.follow(&wrong.id);
    assert_eq!(state, JobState::Failed);
    let e = c.job(&wrong.id).error;
    assert!(e.contains("holds a BERT (vocab ") && e.contains("makes a T5 (vocab ") && !e.contains("Config {"), "{e}");

    // Nor a BERT over a text of as many other characters (the same model config, other ids).
    let upper = c.dir.path().join("upper.txt");
    std::fs::write(&upper, std::fs::read_to_string(c.dir.path().join("corpus.txt")).unwrap().to_uppercase()).unwrap();
    let shifted = spec(&c, "bert-upper", BERT, 0).replace(
        c.dir.path().join("corpus.txt").to_str().unwrap(),
        upper.to_str().unwrap(),
    );
    let other = c.submit(&shifted, &killed.id);
    let (state, _) = c.follow(&other.id);
    assert_eq!(state, JobState::Failed);
    let e = c.job(&other.id).error;
    assert!(e.contains("only the checkpoint has 'a'") && e.contains("only the data has 'A'"), "{e}");
}

#[test]
fn a_cancelled_t5_job_resumed_from_its_checkpoint_ends_bitwise_identical() {
    let mut c = Cluster::new();
    c.start_worker();
    let first = c.submit(&spec(&c, "t5-first", T5, 0), "");
    c.wait_job(&first.id, "a checkpoint at step 30", |j| j.last_checkpoint_step >= 30);
    let mut client = c.client();
    c.rt.block_on(client.cancel_job(CancelJobRequest { job_id: first.id.clone() })).unwrap();
    c.workers_idle();
    let second = c.submit(&spec(&c, "t5-resumed", T5, 0), &first.id);
    let (state, metrics) = c.follow(&second.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&second.id).error, c.logs());
    // where it started: the first job's newest checkpoint when placed (a rescue checkpoint its
    // rank 0 saved at the cancel, if it landed after the submission)
    let start = smelt_checkpoint::step_of_uri(&c.job(&second.id).resume_from).expect("the resumed job names its checkpoint");
    assert!(start >= 30 && start < STEPS, "resumed at step {start}");
    assert_eq!(metrics.first().map(|m| m.step), Some(start + 1), "the resumed job starts after its checkpoint's step");
    let ck = smelt_checkpoint::load_verified(&c.job(&second.id).resume_from).unwrap();
    assert_eq!(ck.trainer.model.arch(), "t5");

    let whole = c.submit(&spec(&c, "t5-whole", T5, 0), "");
    c.wait_succeeded(&whole.id);
    assert_bitwise(&weights(&c, &second.id), &weights(&c, &whole.id), &format!("t5 cancelled and resumed from step {start}"));
}
