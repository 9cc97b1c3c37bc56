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
