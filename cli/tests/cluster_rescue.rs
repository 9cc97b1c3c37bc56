//! A rescue checkpoint, for real (a coordinator and worker processes on loopback, SIGKILL): a
//! job that checkpoints rarely loses a worker mid-run; rank 0's step fails without its update,
//! so rank 0 saves the step it completed last before it ends; the restart resumes there (its
//! first step is the one after), not at the start, and ends with exactly the weights of the same
//! job run without a fault.

mod harness;


use harness::Cluster;
use smelt_proto::v1::JobState;

fn spec(c: &Cluster, name: &str) -> String {
    let text = c.dir.path().join("corpus.txt");
    if !text.exists() {
        std::fs::write(&text, "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n".repeat(40)).unwrap();
    }
    format!(
        "name = {name:?}\nmax_restarts = 1\nseed = 7\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\ntokenizer = \"char\"\n\
         [train]\nsteps = 400\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\nlr = 3e-3\nwarmup_steps = 2\neval_interval = 0\neval_batches = 2\n\
         [cluster]\nworld_size = 2\n[checkpoint]\nevery = 100000\n",
        text.to_str().unwrap()
    )
}

/// The worker whose log says it trains `job` as rank 0 (attempt 1).
fn rank0_worker(c: &Cluster, job: &str) -> Option<usize> {
    (0..c.workers.len()).find(|i| {
        let log = std::fs::read_to_string(c.dir.path().join(format!("worker-{i}.log"))).unwrap_or_default();
        log.lines().any(|l| l.contains("training started") && l.contains(job) && l.contains("rank=0"))
    })
}

#[test]
fn a_lost_peer_leaves_a_rescue_checkpoint_and_the_restart_resumes_there() {
    let mut c = Cluster::with_workers(2);
    let job = c.submit(&spec(&c, "rescued"), "");
    c.wait_job(&job.id, "20 steps", |j| j.last_step >= 20);
    let rank0 = rank0_worker(&c, &job.id).unwrap_or_else(|| panic!("no worker logged rank 0\n{}", c.logs()));
    // SIGKILL the other one (dropping its process handle kills it)
    c.workers[1 - rank0] = None;
    c.start_worker();
    let (state, _) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&job.id).error, c.logs());
    let done = c.job(&job.id);
    assert_eq!(done.restarts, 1, "{done:?}");

    // the event names the step saved, and the second attempt's first step is the one after it
    let events = c.events(&job.id).join("\n");
    let at = events
        .lines()
        .find_map(|l| l.split("rescue checkpoint at step ").nth(1))
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no rescue checkpoint event:\n{events}\n{}", c.logs()));
    assert!((20..400).contains(&at), "rescued at step {at}");
    let (status, body) = c.http_get(&format!("/api/jobs/{}/metrics?max_points=20000", job.id));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let points = v["points"].as_array().or_else(|| v.as_array()).unwrap_or_else(|| panic!("metrics: {body}"));
    let first_of_2 = points.iter().filter(|p| p["attempt"].as_u64() == Some(2)).filter_map(|p| p["step"].as_u64()).min();
    assert_eq!(first_of_2, Some(at + 1), "the restart did not resume at the rescued step");

    // exact: the same weights as the job run without a fault
    let plain = c.submit(&spec(&c, "plain"), "");
    let (state, _) = c.follow(&plain.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&plain.id).error, c.logs());
    assert!(c.weights_of(&job.id) == c.weights_of(&plain.id), "the rescued run's weights differ from an uninterrupted run's");
}
