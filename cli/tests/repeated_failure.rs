//! A failure that would repeat on every restart (here a job text the workers do not have) ends the
//! job at its second occurrence, with restarts left unused, rather than spending them all on the
//! same error. Real coordinator and worker processes.

mod harness;

use harness::Cluster;
use smelt_proto::v1::JobState;

#[test]
fn a_missing_text_fails_the_job_once_it_repeats_not_after_every_restart() {
    let mut c = Cluster::new();
    c.start_worker();
    let missing = c.dir.path().join("no-such-corpus.txt");
    let spec = format!(
        "name = \"missing\"\nmax_restarts = 4\nseed = 7\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\ntokenizer = \"char\"\n\
         [train]\nsteps = 20\nglobal_batch = 4\nmicro_batch = 4\nseq_len = 16\nlr = 3e-3\n",
        missing.to_str().unwrap()
    );
    let job = c.submit(&spec, "");
    let failed = c.wait_job(&job.id, "failed", |j| j.state == JobState::Failed as i32);
    assert!(failed.error.contains("no-such-corpus.txt"), "{}", failed.error);
    assert!(
        failed.error.contains("not restarted: attempt 1 failed the same way at the same step (0), so it would repeat (3 restarts left unused)"),
        "{}",
        failed.error
    );
    assert_eq!((failed.attempt, failed.restarts), (2, 1), "{failed:?}");
}

/// A model larger than the worker's memory fails its job naming what it needs, and the worker
/// lives on to run the next job (it aborted on the allocation, a "lost" worker, and took the
/// job's next attempt's worker with it too).
#[test]
fn a_model_larger_than_the_workers_memory_fails_the_job_not_the_worker() {
    let mut c = Cluster::new();
    c.start_worker();
    let text = c.dir.path().join("corpus.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n".repeat(20)).unwrap();
    let spec = |name: &str, model: &str| {
        format!(
            "name = {name:?}\nseed = 7\n[model]\n{model}\n[data]\ntext = {:?}\ntokenizer = \"char\"\n\
             [train]\nsteps = 5\nglobal_batch = 4\nmicro_batch = 4\nseq_len = 16\nlr = 3e-3\n",
            text.to_str().unwrap()
        )
    };
    let huge = c.submit(&spec("huge", "n_layer = 1024\nn_head = 64\nn_embd = 65536\nblock_size = 32"), "");
    let failed = c.wait_job(&huge.id, "failed", |j| j.state == JobState::Failed as i32);
    assert!(failed.error.contains("needs at least") && failed.error.contains("of memory") && failed.error.contains("available"), "{}", failed.error);
    assert!(!failed.error.contains("lost"), "{}", failed.error);
    let small = c.submit(&spec("small", "preset = \"test\""), "");
    c.wait_job(&small.id, "success on the same worker", |j| j.state == JobState::Succeeded as i32);
}
