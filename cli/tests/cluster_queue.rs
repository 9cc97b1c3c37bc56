//! A job that cannot start says why, through the CLI: `smelt submit` at once (on stderr, the id
//! alone on stdout), `smelt jobs get` while it waits.

mod harness;

use harness::Cluster;

#[test]
fn submit_and_jobs_get_say_what_a_waiting_job_waits_for() {
    let mut c = Cluster::new(); // no worker yet
    let spec = c.dir.path().join("job.toml");
    std::fs::write(
        &spec,
        "name = \"pair\"\n[model]\npreset = \"test\"\n[data]\ntext = \"corpus.txt\"\ntokenizer = \"char\"\n[train]\nsteps = 10\nglobal_batch = 4\nmicro_batch = 2\nseq_len = 16\nlr = 1e-3\n[cluster]\nworld_size = 2\n",
    )
    .unwrap();
    let (ok, out) = c.smelt(&["submit", spec.to_str().unwrap()]);
    assert!(ok, "{out}");
    // the worker command to start names this coordinator (not the default one)
    let hint = format!("queued: waits for 2 cpu workers: 0 connected (start more with `smelt worker --coordinator http://{} --device cpu`)", c.addr);
    assert!(out.contains("job-000001") && out.contains(&hint), "{out}");
    let (ok, out) = c.smelt(&["jobs", "get", "job-000001"]);
    assert!(ok, "{out}");
    assert!(out.contains("waits for 2 cpu workers: 0 connected"), "{out}");
    // following it says it too, once (then waits: stopped here by a timeout)
    let o = std::process::Command::new("timeout")
        .args(["3", env!("CARGO_BIN_EXE_smelt"), "jobs", "follow", "job-000001"])
        .env("SMELT_COORDINATOR", format!("http://{}", c.addr))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("queued: waits for 2 cpu workers: 0 connected").count(), 1, "{err}");
    // ... after the event that it was submitted, as things happened
    let (submitted, waits) = (err.find("queued: submitted").expect(&err), err.find("queued: waits for").unwrap());
    assert!(submitted < waits, "{err}");
    // as JSON too
    let (ok, out) = c.smelt(&["jobs", "get", "job-000001", "--json"]);
    assert!(ok && out.contains("\"waiting_for\": \"2 cpu workers: 0 connected"), "{out}");
    // a follower is told again when what it waits for changes: one worker connects
    let follow = std::process::Command::new("timeout")
        .args(["9", env!("CARGO_BIN_EXE_smelt"), "jobs", "follow", "job-000001"])
        .env("SMELT_COORDINATOR", format!("http://{}", c.addr))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    c.start_worker();
    let o = follow.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let (none, one) = (err.find("waits for 2 cpu workers: 0 connected"), err.find("waits for 2 cpu workers: 1 connected"));
    assert!(none.is_some() && one.is_some() && none < one, "{err}");
}
