//! Checkpoints and exact resume with real processes: a coordinator and workers as `smelt`
//! processes on loopback, SIGKILL mid-job, a resumed job on another world size. Workers record
//! the sample indices of every step (`SMELT_SAMPLE_LOG`), so "the same data" is checked index
//! by index.

mod harness;

use std::collections::BTreeMap;

use harness::Cluster;
use smelt_proto::v1::CancelJobRequest;

fn spec(c: &Cluster, name: &str, world: u32, micro: usize, max_restarts: u32) -> String {
    let text = c.dir.path().join("corpus.txt");
    if !text.exists() {
        let line = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";
        std::fs::write(&text, line.repeat(40)).unwrap();
    }
    format!(
        r#"
name = "{name}"
max_restarts = {max_restarts}
seed = 7

[model]
preset = "test"

[data]
text = "{text}"

[train]
steps = {STEPS}
global_batch = 8
micro_batch = {micro}
seq_len = 16
lr = 3e-3
warmup_steps = 2

[cluster]
world_size = {world}

[checkpoint]
every = {EVERY}
keep_last = 2
"#,
        text = text.display()
    )
}

fn model_of(c: &Cluster, job: &str) -> Vec<f32> {
    let p = c.model_file(job).unwrap_or_else(|| panic!("no final weights for {job}\n{}", c.logs()));
    smelt_worker::model_file::load(&p).unwrap().params
}

/// step -> the sample indices of the step over all ranks (rank order), from the last
/// attempt that ran it.
fn samples(c: &Cluster, job: &str, world: u32) -> BTreeMap<u64, Vec<u64>> {
    let mut per_rank: Vec<BTreeMap<u64, (u32, Vec<u64>)>> = Vec::new();
    for r in 0..world {
        let text = std::fs::read_to_string(c.samples_dir().join(format!("{job}.rank{r}.log"))).unwrap();
        let mut m = BTreeMap::new();
        for line in text.lines() {
            let v: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            let (attempt, step) = (v[0] as u32, v[1]);
            if m.get(&step).is_none_or(|(a, _)| *a <= attempt) {
                m.insert(step, (attempt, v[2..].to_vec()));
            }
        }
        per_rank.push(m);
    }
    // A cancelled job's ranks stop at slightly different steps (each logs a step once it ran
    // it): keep the steps every rank ran.
    let mut out = BTreeMap::new();
    for step in per_rank[0].keys() {
        if per_rank.iter().all(|m| m.contains_key(step)) {
            out.insert(*step, per_rank.iter().flat_map(|m| m[step].1.clone()).collect());
        }
    }
    out
}

const STEPS: u64 = 300;
const EVERY: u64 = 10;

#[test]
fn a_job_killed_with_sigkill_resumes_from_its_checkpoint_and_ends_bitwise_identical() {
    let mut c = Cluster::new();
    c.start_worker();
    let killed = c.submit(&spec(&c, "killed", 1, 8, 1), "");
    c.wait_job(&killed.id, "a checkpoint at step 20", |j| j.last_checkpoint_step >= 20);
    c.workers[0] = None; // SIGKILL
    let at_kill = c.job(&killed.id);
    assert!(at_kill.last_step < STEPS, "the job finished before the kill: {at_kill:?}");
    c.start_worker();
    let done = c.wait_succeeded(&killed.id);
    assert_eq!(done.restarts, 1, "{done:?}");
    assert!(done.resume_from.contains(&format!("jobs/{}/ckpt/", killed.id)), "the restart did not resume from a checkpoint: {done:?}");
    let from = smelt_checkpoint::step_of_uri(&done.resume_from).unwrap();
    assert!(from >= 20 && from < STEPS, "resumed from step {from}");
    let events = c.events(&killed.id).join("\n");
    assert!(events.contains(&format!("from step {from}")), "no restart event names the step:\n{events}");

    let whole = c.submit(&spec(&c, "uninterrupted", 1, 8, 0), "");
    c.wait_succeeded(&whole.id);
    let (a, b) = (model_of(&c, &killed.id), model_of(&c, &whole.id));
    assert_eq!(a.len(), b.len());
    let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} weights differ after a kill at step ~{} and a resume from step {from}", a.len(), at_kill.last_step);
}

#[test]
fn a_job_resumed_on_another_world_size_sees_exactly_the_same_samples() {
    let mut c = Cluster::new();
    c.start_worker();
    c.start_worker();
    // Two ranks of micro-batch 4; cancelled after a checkpoint or two.
    let first = c.submit(&spec(&c, "two-ranks", 2, 4, 0), "");
    c.wait_job(&first.id, "a checkpoint at step 20", |j| j.last_checkpoint_step >= 20);
    let mut client = c.client();
    c.rt.block_on(client.cancel_job(CancelJobRequest { job_id: first.id.clone() })).unwrap();
    c.workers_idle();
    // One rank, micro-batch 4 with 2 accumulation steps, from that job's latest checkpoint.
    let second = c.submit(&spec(&c, "one-rank-resumed", 1, 4, 0), &first.id);
    assert!(second.resume_from.contains(&format!("jobs/{}/ckpt/", first.id)), "{second:?}");
    // where it started: that job's newest checkpoint when placed (its rank 0 may still have
    // been saving a rescue checkpoint at the cancel, which the new job waits for)
    let done = c.wait_succeeded(&second.id);
    let start = smelt_checkpoint::step_of_uri(&done.resume_from).expect("the resumed job names its checkpoint");
    assert!(done.resume_from.contains(&format!("jobs/{}/ckpt/", first.id)), "{done:?}");
    assert!(start >= 20 && start < STEPS, "resumed at step {start}");
    // The reference: one rank, micro-batch 8, never interrupted.
    let whole = c.submit(&spec(&c, "reference", 1, 8, 0), "");
    c.wait_succeeded(&whole.id);

    let (a, b, r) = (samples(&c, &first.id, 2), samples(&c, &second.id, 1), samples(&c, &whole.id, 1));
    assert_eq!(*b.keys().next().unwrap(), start, "the resumed job's first step");
    let mut seen = BTreeMap::new();
    for s in 0..start {
        seen.insert(s, a.get(&s).unwrap_or_else(|| panic!("the first job never ran step {s}")).clone());
    }
    seen.extend(b);
    assert_eq!(seen.len() as u64, STEPS);
    for (s, want) in &r {
        assert_eq!(&seen[s], want, "step {s}: the interrupted and resumed pair saw other samples than the reference");
    }
    assert_eq!(r.len() as u64, STEPS);
}
