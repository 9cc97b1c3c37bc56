//! Checkpoint faults in a real cluster (a coordinator and worker processes on loopback): a
//! corrupt newest checkpoint when a SIGKILLed job restarts (skipped, with an event saying which
//! and why); a checkpoint store that cannot be written when the job starts (the job fails,
//! naming it, rather than train without checkpoints); a fine-tuning job killed with SIGKILL resumes from its checkpoint
//! and ends bitwise identical to an uninterrupted one, its validation accuracy recorded.

mod harness;

use std::path::Path;

use harness::Cluster;

fn pretrain_spec(c: &Cluster, name: &str, steps: u64, max_restarts: u32, checkpoint: &str) -> String {
    let text = c.dir.path().join("corpus.txt");
    if !text.exists() {
        std::fs::write(&text, "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n".repeat(40)).unwrap();
    }
    format!(
        "name = {name:?}\nmax_restarts = {max_restarts}\nseed = 7\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\n\
         [train]\nsteps = {steps}\nglobal_batch = 8\nmicro_batch = 8\nseq_len = 16\nlr = 3e-3\nwarmup_steps = 2\n[checkpoint]\n{checkpoint}\n",
        text.to_str().unwrap()
    )
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_on_restart_with_an_event_saying_why() {
    let mut c = Cluster::new();
    c.start_worker();
    let job = c.submit(&pretrain_spec(&c, "corrupt", 300, 1, "every = 10\nkeep_last = 3"), "");
    c.wait_job(&job.id, "a checkpoint at step 20", |j| j.last_checkpoint_step >= 20);
    c.workers[0] = None; // SIGKILL
    let at_kill = c.job(&job.id);
    let bad = at_kill.last_checkpoint_uri.clone();
    // the recorded one, and any the worker committed after it whose report the kill cut off
    // (a restart would take that newer one and never look at the recorded one)
    let recorded = smelt_checkpoint::step_of_uri(&bad).unwrap();
    let ckpt_dir = Path::new(bad.trim_start_matches("file://")).parent().unwrap().to_path_buf();
    for entry in std::fs::read_dir(&ckpt_dir).unwrap().flatten() {
        let step = entry.file_name().to_string_lossy().parse::<u64>().ok();
        if step.is_some_and(|s| s >= recorded) && entry.path().join("MANIFEST.json").exists() {
            flip_byte(&entry.path().join("model.safetensors"));
        }
    }

    // The listing by job id already tells.
    let (ok, listing) = c.smelt(&["checkpoints", "list", &job.id]);
    // every checkpoint listed, and a failing exit: some do not verify
    assert!(!ok && listing.contains("checkpoints do not verify (listed above)"), "{listing}");
    let row = listing.lines().find(|l| l.contains(&bad)).unwrap_or_else(|| panic!("{bad} not listed:\n{listing}"));
    assert!(row.contains(" corrupt "), "{listing}");
    assert!(listing.lines().any(|l| l.starts_with(&format!("{} step ", job.id)) && l.contains(": corrupt: ") && l.contains("sha256")), "{listing}");
    assert!(listing.lines().filter(|l| l.contains(" ok ")).count() >= 1, "{listing}");
    // named to resume from, it is refused when submitted: nothing is queued
    let resume = c.dir.path().join("resume.toml");
    std::fs::write(&resume, pretrain_spec(&c, "resume-bad", 300, 0, "every = 10")).unwrap();
    let (ok, out) = c.smelt(&["submit", resume.to_str().unwrap(), "--resume-from", &bad]);
    assert!(!ok, "{out}");
    assert!(out.contains("the checkpoint does not verify") && out.contains("sha256") && out.contains("smelt checkpoints list"), "{out}");
    // named by its job (resume from its latest checkpoint), likewise
    let (ok, out) = c.smelt(&["submit", resume.to_str().unwrap(), "--resume-from", &job.id]);
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("{}'s latest checkpoint {bad}", job.id)) && out.contains("the checkpoint does not verify") && out.contains("sha256"), "{out}");
    // a manifest that does not parse, likewise (it was a warning, and the workers failed)
    let mangled = c.dir.path().join("mangled/00000010");
    std::fs::create_dir_all(&mangled).unwrap();
    std::fs::write(mangled.join("MANIFEST.json"), "{\"step\": 10,,}").unwrap();
    let (ok, out) = c.smelt(&["submit", resume.to_str().unwrap(), "--resume-from", mangled.to_str().unwrap()]);
    assert!(!ok && out.contains("the checkpoint does not verify") && out.contains("not a valid manifest"), "{out}");
    let (_, jobs) = c.smelt(&["jobs", "list"]);
    assert!(!jobs.contains("resume-bad"), "{jobs}");

    c.start_worker();
    let done = c.wait_succeeded(&job.id);
    assert_eq!(done.restarts, 1, "{done:?}");
    let events = c.events(&job.id).join("\n");
    let line = events.lines().find(|l| l.contains(&format!("checkpoint {bad} skipped"))).unwrap_or_else(|| panic!("no event names the skipped checkpoint:\n{events}"));
    assert!(line.contains("model.safetensors") && line.contains("sha256"), "{line}");
    let instead = line.split("resuming from ").nth(1).unwrap().split(" instead").next().unwrap();
    // set aside (uncommitted), so that the job writes that step again when it gets there rather
    // than fail to ("already committed") and count the corrupt one among those retention keeps
    assert!(line.contains("its manifest is now MANIFEST.json.corrupt"), "{line}");
    assert!(!events.contains("is already committed"), "{events}");
    let (bad_step, used) = (smelt_checkpoint::step_of_uri(&bad).unwrap(), smelt_checkpoint::step_of_uri(instead).unwrap());
    assert!(used < bad_step, "resumed from step {used}, the corrupt one was {bad_step}: {line}");
    // the job records where its attempt started: the checkpoint used, not the one assigned
    assert_eq!(done.resume_from, instead, "{done:?}");
    assert!(events.contains(&format!("attempt 2 resumes from step {used} ({instead})")), "{events}");
}

#[test]
fn a_job_whose_checkpoint_store_cannot_be_written_at_start_fails_naming_it() {
    let mut c = Cluster::new();
    // An S3 endpoint nobody listens on. (A store that goes down during a run only delays
    // checkpoints: checkpoint/tests/s3.rs.)
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    c.start_worker_with(&[
        ("AWS_ACCESS_KEY_ID", "key".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_string()),
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ]);
    let job = c.submit(&pretrain_spec(&c, "store-down", 30, 0, "every = 10\nstore = \"s3://bucket/down\"\nfinal_wait_s = 1"), "");
    let failed = c.wait_job(&job.id, "failed", |j| j.state == smelt_proto::v1::JobState::Failed as i32);
    assert_eq!(failed.last_step, 0, "it trained without checkpoints: {failed:?}");
    assert!(
        failed.error.contains("the checkpoint store cannot be written") && failed.error.contains("s3://bucket/down") && failed.error.contains("every = 0"),
        "{}",
        failed.error
    );
}

#[test]
fn a_finetune_job_killed_with_sigkill_resumes_from_its_checkpoint_bitwise() {
    let mut c = Cluster::new();
    c.start_worker();
    let parent = c.submit(&pretrain_spec(&c, "parent", 10, 0, ""), "");
    c.wait_succeeded(&parent.id);
    let parent_file = c.dir.path().join(format!("worker-0/jobs/{}/model.safetensors", parent.id));
    let line = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.";
    let words: Vec<&str> = line.split(|ch: char| !ch.is_alphabetic()).filter(|w| !w.is_empty()).collect();
    let data = c.dir.path().join("labels.jsonl");
    let lines: String = (0..64)
        .map(|i| serde_json::json!({"text": words[i % words.len()], "label": words[i % words.len()].contains('o') as u32}).to_string() + "\n")
        .collect();
    std::fs::write(&data, lines).unwrap();
    let spec = |name: &str, max_restarts: u32| {
        format!(
            "name = {name:?}\nkind = \"finetune\"\nmax_restarts = {max_restarts}\nseed = 3\n[finetune]\ninit_from = {:?}\nhead = \"classification\"\n\
             num_labels = 2\ndata = {:?}\nval_fraction = 0.25\n[train]\nsteps = 300\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\n\
             lr = 3e-3\neval_interval = 100\n[checkpoint]\nevery = 10\nkeep_last = 2\n",
            parent_file.to_str().unwrap(),
            data.to_str().unwrap()
        )
    };
    let killed = c.submit(&spec("ft-killed", 1), "");
    c.wait_job(&killed.id, "a checkpoint at step 20", |j| j.last_checkpoint_step >= 20);
    c.workers[0] = None; // SIGKILL
    let at_kill = c.job(&killed.id);
    assert!(at_kill.last_step < 300, "the job finished before the kill: {at_kill:?}");
    c.start_worker();
    let done = c.wait_succeeded(&killed.id);
    assert_eq!(done.restarts, 1, "{done:?}");
    assert!(done.resume_from.contains(&format!("jobs/{}/ckpt/", killed.id)), "the restart did not resume from a checkpoint: {done:?}");
    let from = smelt_checkpoint::step_of_uri(&done.resume_from).unwrap();
    assert!((20..300).contains(&from), "resumed from step {from}");
    let acc = done.last_val_accuracy.expect("the coordinator recorded the validation accuracy");
    assert!((0.0..=1.0).contains(&acc));
    let (ok, shown) = c.smelt(&["jobs", "get", &killed.id]);
    assert!(ok && shown.contains(&format!("val acc   {acc:.4}")), "{shown}");
    // where its weights come from: the parent, the checkpoint its attempt resumed from
    assert!(shown.contains(&format!("resumed   {}\n", done.resume_from)) && shown.contains(&format!("parent    {}\n", parent_file.display())), "{shown}");

    let whole = c.submit(&spec("ft-whole", 0), "");
    c.wait_succeeded(&whole.id);
    let (a, b) = (c.weights_of(&killed.id), c.weights_of(&whole.id));
    assert_eq!(a.len(), b.len());
    let differ = a.chunks_exact(4).zip(b.chunks_exact(4)).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{differ} weights differ after a kill at step ~{} and a resume from step {from}", at_kill.last_step);
}
