//! Priority preemption, for real (a coordinator and two worker processes on loopback): a job of
//! higher priority that does not fit takes the workers of a running lower-priority job that
//! checkpoints; that job's rank 0 saves its last completed step as it stops, the high one runs,
//! and the low one resumes from the saved step once the workers are free — using none of its
//! restarts and ending with exactly the weights of an uninterrupted run. A job that does not
//! checkpoint is never preempted: the high one waits for it. A job backfilled behind a head that
//! could not start gives its worker back to it the same way.

mod harness;

use harness::Cluster;
use smelt_proto::v1::JobState;

const GPT: &str = "preset = \"test\"";
const BERT: &str = "arch = \"bert\"\npreset = \"bert-test\"\nobjective = \"mlm+nsp\"";

fn spec(c: &Cluster, name: &str, priority: i32, steps: u64, checkpoint: bool) -> String {
    spec_with(c, name, priority, steps, checkpoint, 2, "", GPT)
}

/// A job of `world` ranks; `cluster` goes into the `[cluster]` table, `model` is the `[model]`
/// table.
#[allow(clippy::too_many_arguments)]
fn spec_with(c: &Cluster, name: &str, priority: i32, steps: u64, checkpoint: bool, world: u32, cluster: &str, model: &str) -> String {
    let text = c.dir.path().join("corpus.txt");
    if !text.exists() {
        std::fs::write(&text, "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n".repeat(40)).unwrap();
    }
    format!(
        "name = {name:?}\npriority = {priority}\nmax_restarts = 0\nseed = 11\n[model]\n{model}\n[data]\ntext = {:?}\ntokenizer = \"char\"\n\
         [train]\nsteps = {steps}\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\nlr = 3e-3\nwarmup_steps = 2\neval_interval = 0\neval_batches = 2\n\
         [cluster]\nworld_size = {world}\n{cluster}{}",
        text.to_str().unwrap(),
        if checkpoint { "[checkpoint]\nevery = 100000\n" } else { "" }
    )
}

#[test]
fn a_higher_priority_job_preempts_one_that_checkpoints_which_resumes_exactly() {
    preempted_job_resumes_exactly(GPT);
}

#[test]
fn a_preempted_bert_job_resumes_exactly_too() {
    // the BERT/T5 training loop's own rescue when its run is stopped
    preempted_job_resumes_exactly(BERT);
}

/// A low-priority job of `model` preempted after 20 steps by a priority-5 GPT job.
fn preempted_job_resumes_exactly(model: &str) {
    let c = Cluster::with_workers(2);
    let low_spec = spec_with(&c, "low", 0, 400, true, 2, "", model);
    let low = c.submit(&low_spec, "");
    c.wait_job(&low.id, "20 steps", |j| j.last_step >= 20);
    let high = c.submit(&spec(&c, "high", 5, 30, false), "");
    let (state, _) = c.follow(&high.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&high.id).error, c.logs());
    let (state, _) = c.follow(&low.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&low.id).error, c.logs());

    // preempted once, resumed once, no restart used (max_restarts = 0 would have failed it)
    let done = c.job(&low.id);
    assert_eq!((done.attempt, done.restarts), (2, 0), "{done:?}");
    let events = c.events(&low.id).join("\n");
    assert!(events.contains(&format!("preempted by {} (priority 5 > 0)", high.id)), "{events}");
    let at = c.rescued_step(&low.id);
    let low_steps = c.reported_steps(&low.id);
    let first_of_2 = low_steps.iter().filter(|s| s.0 == 2).map(|s| s.1).min();
    assert_eq!(first_of_2, Some(at + 1), "the preempted job did not resume after its rescued step");
    // the high job ran between the low job's attempts
    let high_steps = c.reported_steps(&high.id);
    let last_of_1 = low_steps.iter().filter(|s| s.0 == 1).map(|s| s.2).max().unwrap();
    let resumed = low_steps.iter().filter(|s| s.0 == 2).map(|s| s.2).min().unwrap();
    assert!(high_steps.iter().all(|s| s.2 >= last_of_1 && s.2 <= resumed), "high {high_steps:?} not between low's attempts ({last_of_1}, {resumed})");
    assert_eq!(high_steps.len(), 30);

    // exact: the weights of the same job never preempted
    let plain = c.submit(&low_spec, "");
    let (state, _) = c.follow(&plain.id);
    assert_eq!(state, JobState::Succeeded, "{}", c.logs());
    assert!(c.weights_of(&low.id) == c.weights_of(&plain.id), "the preempted job's weights differ from an uninterrupted run's");
}

/// `low` runs 20 steps, then a priority-5 job arrives: it must wait for `low` to end.
fn the_higher_job_waits_for(c: &Cluster, low: &str) {
    let low = c.submit(low, "");
    c.wait_job(&low.id, "20 steps", |j| j.last_step >= 20);
    let high = c.submit(&spec(c, "high", 5, 30, false), "");
    let (state, _) = c.follow(&high.id);
    assert_eq!(state, JobState::Succeeded, "{}", c.logs());
    let done = c.job(&low.id);
    assert_eq!((done.state, done.attempt), (JobState::Succeeded as i32, 1), "{done:?}\n{}", c.events(&low.id).join("\n"));
    assert!(!c.events(&low.id).join("\n").contains("preempted"));
    let low_last = c.reported_steps(&low.id).iter().map(|s| s.2).max().unwrap();
    let high_first = c.reported_steps(&high.id).iter().map(|s| s.2).min().unwrap();
    assert!(high_first >= low_last, "the high job ran before the low one ended ({high_first} < {low_last})");
}

#[test]
fn a_job_that_does_not_checkpoint_is_not_preempted_and_the_higher_one_waits() {
    let c = Cluster::with_workers(2);
    the_higher_job_waits_for(&c, &spec(&c, "low-no-checkpoints", 0, 400, false));
}

#[test]
fn a_job_that_says_it_is_not_preemptible_is_not_preempted() {
    let c = Cluster::with_workers(2);
    the_higher_job_waits_for(&c, &spec_with(&c, "low-not-preemptible", 0, 400, true, 2, "preemptible = false\n", GPT));
}

/// Two workers: a one-rank job that does not checkpoint runs; a two-rank job of the same
/// priority cannot start, nor preempt it; a one-rank job that checkpoints, behind it, backfills
/// the idle worker. When the first job ends, the backfilled one gives way: its rank 0 saves its
/// step, the two-rank job runs, and the backfilled one resumes after it, exactly.
#[test]
fn a_backfilled_job_gives_its_worker_to_the_head_and_resumes_exactly() {
    let c = Cluster::with_workers(2);
    // the filler must still be running when the runner ends (same step cost): 200 vs 600 steps
    let runner = c.submit(&spec_with(&c, "runner", 0, 200, false, 1, "", GPT), "");
    c.wait_job(&runner.id, "a first step", |j| j.last_step >= 1);
    let head = c.submit(&spec(&c, "head", 0, 30, false), "");
    let filler_spec = spec_with(&c, "filler", 0, 600, true, 1, "", GPT);
    let filler = c.submit(&filler_spec, "");
    c.wait_job(&filler.id, "10 backfilled steps", |j| j.last_step >= 10);
    assert!(c.job(&filler.id).backfilled);
    assert_eq!(c.job(&head.id).state, JobState::Queued as i32, "the head started before the runner ended");
    for id in [&runner.id, &head.id, &filler.id] {
        let (state, _) = c.follow(id);
        assert_eq!(state, JobState::Succeeded, "{id}: {}\n{}", c.job(id).error, c.logs());
    }
    assert_eq!(c.job(&runner.id).attempt, 1, "the runner (no checkpoints) was never preempted");
    let done = c.job(&filler.id);
    assert_eq!((done.attempt, done.restarts), (2, 0), "{done:?}");
    let events = c.events(&filler.id);
    // attempt 1 backfilled behind the head, attempt 2 placed in queue order
    let placed: Vec<&String> = events.iter().filter(|e| e.contains(" placed on ")).collect();
    assert_eq!(placed.len(), 2, "{events:?}");
    assert!(placed[0].contains("attempt 1 placed") && placed[0].contains(&format!("backfilled behind {}", head.id)), "{events:?}");
    assert!(placed[1].contains("attempt 2 placed") && !placed[1].contains("backfilled"), "{events:?}");
    let events = events.join("\n");
    assert!(events.contains(&format!("preempted by {}, which is ahead of it in the queue (it was backfilled)", head.id)), "{events}");
    // resumed after its rescued step, with the head's steps between its attempts
    let at = c.rescued_step(&filler.id);
    let steps = c.reported_steps(&filler.id);
    assert_eq!(steps.iter().filter(|s| s.0 == 2).map(|s| s.1).min(), Some(at + 1));
    let last_of_1 = steps.iter().filter(|s| s.0 == 1).map(|s| s.2).max().unwrap();
    let resumed = steps.iter().filter(|s| s.0 == 2).map(|s| s.2).min().unwrap();
    let head_steps = c.reported_steps(&head.id);
    assert!(head_steps.iter().all(|s| s.2 >= last_of_1 && s.2 <= resumed), "head {head_steps:?} not between the filler's attempts");
    // exact: the weights of the same job run without interruption
    let plain = c.submit(&filler_spec, "");
    let (state, _) = c.follow(&plain.id);
    assert_eq!(state, JobState::Succeeded, "{}", c.logs());
    assert!(c.weights_of(&filler.id) == c.weights_of(&plain.id), "the backfilled job's weights differ from an uninterrupted run's");
}
