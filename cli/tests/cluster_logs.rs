//! A job's logs in one place, for real (a coordinator and two worker processes on loopback):
//! every rank's lines reach the coordinator's database and `smelt jobs logs` prints them, by
//! rank, attempt and tail, as JSON, and following a job prints its lines until it ends; a job
//! that fails keeps the lines that say why.

mod harness;

use harness::Cluster;
use smelt_proto::v1::JobState;

fn spec(c: &Cluster, name: &str, lr: &str, steps: u64) -> String {
    let text = c.dir.path().join("corpus.txt");
    if !text.exists() {
        std::fs::write(&text, "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n".repeat(40)).unwrap();
    }
    format!(
        "name = {name:?}\nseed = 3\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\ntokenizer = \"char\"\n\
         [train]\nsteps = {steps}\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\nlr = {lr}\nwarmup_steps = 0\neval_interval = 10\neval_batches = 2\n\
         [cluster]\nworld_size = 2\n[checkpoint]\nevery = 10\n",
        text.to_str().unwrap()
    )
}

/// `smelt jobs logs <args>`'s output, which must succeed.
fn logs(c: &Cluster, args: &[&str]) -> String {
    let mut all = vec!["jobs", "logs"];
    all.extend_from_slice(args);
    let (ok, out) = c.smelt(&all);
    assert!(ok, "smelt {all:?} failed: {out}\n{}", c.logs());
    out
}

/// The lines of `out` (in `format_line`'s form) of `rank` whose text holds `what`.
fn lines_of<'a>(out: &'a str, rank: u32, what: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.contains(&format!(" a1 r{rank} ")) && l.contains(what)).collect()
}

#[test]
fn every_ranks_lines_reach_the_coordinator_and_smelt_jobs_logs_prints_them() {
    let c = Cluster::with_workers(2);
    let job = c.submit(&spec(&c, "logged", "3e-3", 30), "");
    // following prints lines as they come and returns once the job has ended
    let followed = logs(&c, &[&job.id, "--follow"]);
    assert_eq!(c.job(&job.id).state, JobState::Succeeded as i32, "{}", c.logs());
    for rank in [0, 1] {
        assert_eq!(lines_of(&followed, rank, "assignment received").len(), 1, "rank {rank}'s first line:\n{followed}");
        assert_eq!(lines_of(&followed, rank, "training started").len(), 1, "rank {rank}:\n{followed}");
        assert_eq!(lines_of(&followed, rank, "assignment finished").len(), 1, "rank {rank}'s last line:\n{followed}");
    }
    // rank 0's own lines: the checkpoints it committed, the evaluations, the final weights
    assert!(!lines_of(&followed, 0, "final weights saved").is_empty(), "{followed}");
    assert!(lines_of(&followed, 1, "final weights saved").is_empty(), "{followed}");
    assert!(!lines_of(&followed, 0, "checkpoint reported").is_empty(), "{followed}");
    // the tokens trained count the global batch once (30 steps x 8 sequences x 16 tokens): each
    // step's count already holds every rank's, and the throughput was twice the real one
    let done = lines_of(&followed, 0, "training done");
    assert!(done.len() == 1 && done[0].contains(" tokens=3840 ") && done[0].contains(" steps=30 "), "{followed}");
    assert!(followed.lines().any(|l| l.contains(" INFO smelt_worker::") && l.contains("job_id=") && l.contains(&job.id)), "{followed}");

    // once ended, a plain read gives the same lines (the follow missed none)
    let all = logs(&c, &[&job.id]);
    assert_eq!(all, followed);
    let rank1 = logs(&c, &[&job.id, "--rank", "1"]);
    assert!(!rank1.is_empty() && rank1.lines().all(|l| l.contains(" a1 r1 ")), "{rank1}");
    assert_eq!(rank1.lines().count(), all.lines().filter(|l| l.contains(" a1 r1 ")).count());
    let tail = logs(&c, &[&job.id, "--tail", "3"]);
    assert_eq!(tail.lines().collect::<Vec<_>>(), all.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>());
    assert_eq!(logs(&c, &[&job.id, "--tail", "0"]), "", "--tail 0 prints no past line");
    // its step metrics, from the coordinator's file (no coordinator asked): one row per step,
    // the loss the coordinator recorded last on the last
    let db = c.dir.path().join("coordinator.db");
    let (ok, out) = c.smelt(&["jobs", "metrics", &job.id, "--db", db.to_str().unwrap(), "--json"]);
    assert!(ok, "{out}");
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(rows.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=30).collect::<Vec<_>>(), "{out}");
    assert_eq!(rows.last().unwrap()["loss"].as_f64().unwrap() as f32, c.job(&job.id).last_loss, "{out}");
    let (ok, table) = c.smelt(&["jobs", "metrics", &job.id, "--db", db.to_str().unwrap(), "--max-points", "5"]);
    assert!(ok && table.lines().next().unwrap().contains("val_loss") && table.contains("of 30 rows"), "{table}");
    let (ok, out) = c.smelt(&["jobs", "metrics", "job-000099", "--db", db.to_str().unwrap()]);
    assert!(!ok && out.contains("no step metrics of job job-000099"), "{out}");

    // an attempt or rank the job never had is an error saying which it has (it printed nothing)
    for (flag, value, want) in [("--attempt", "2", "has had 1 attempt so far"), ("--attempt", "0", "count from 1"), ("--rank", "2", "has ranks 0 to 1")] {
        let (ok, out) = c.smelt(&["jobs", "logs", &job.id, flag, value]);
        assert!(!ok && out.contains(want), "{flag} {value}: {out}");
    }

    // JSON lines, in increasing seq, with the worker that sent each
    let json = logs(&c, &[&job.id, "--json"]);
    let rows: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), all.lines().count());
    assert!(rows.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    let workers: std::collections::BTreeSet<&str> = rows.iter().map(|r| r["worker_id"].as_str().unwrap()).collect();
    assert_eq!(workers.len(), 2, "{workers:?}");

    // the dashboard's API serves the same lines
    let (status, body) = c.http_get(&format!("/api/jobs/{}/logs?rank=0&tail=5", job.id));
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let texts: Vec<&str> = page["lines"].as_array().unwrap().iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(texts.len(), 5);
    assert!(texts.last().unwrap().contains("assignment finished"), "{texts:?}");

    // an unknown job is an error naming it
    let (ok, out) = c.smelt(&["jobs", "logs", "job-999999"]);
    assert!(!ok && out.contains("job-999999"), "{out}");
    let (status, _) = c.http_get("/api/jobs/job-999999/logs");
    assert_eq!(status, 404);
}

#[test]
fn a_failed_jobs_logs_say_why_on_every_rank() {
    let c = Cluster::with_workers(2);
    // a learning rate that makes the loss diverge: the job fails with a non-finite loss
    let job = c.submit(&spec(&c, "diverges", "1e30", 200), "");
    let (state, _) = c.follow(&job.id);
    assert_eq!(state, JobState::Failed, "{}", c.logs());
    let error = c.job(&job.id).error;
    // the rank that failed first sent its lines before its Done; the other one ends when the
    // abort reaches it, after the job has failed: wait for its lines too. Each rank either
    // found the non-finite loss itself ("assignment failed", an error) or was stopped by the
    // abort that names it ("assignment stopped", info): which depends on timing
    fn ended(out: &str, rank: u32) -> Vec<&str> {
        [lines_of(out, rank, "assignment failed"), lines_of(out, rank, "assignment stopped")].concat()
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let out = loop {
        let out = logs(&c, &[&job.id]);
        if [0, 1].iter().all(|&r| !ended(&out, r).is_empty()) || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut failed_ranks = 0;
    for rank in [0, 1] {
        let end = ended(&out, rank);
        assert_eq!(end.len(), 1, "rank {rank}:\n{out}\njob error: {error}");
        assert!(end[0].contains("not finite"), "{}", end[0]);
        if end[0].contains("assignment failed") {
            assert!(end[0].contains(" ERROR "), "{}", end[0]);
            failed_ranks += 1;
        } else {
            assert!(end[0].contains(" INFO ") && end[0].contains("aborted by the coordinator"), "{}", end[0]);
        }
    }
    assert!(failed_ranks >= 1, "no rank reported the failure itself:\n{out}");
    // only the warnings: the failures, and nothing at info
    let warn = logs(&c, &[&job.id, "--level", "warn"]);
    assert!(!warn.is_empty() && warn.lines().all(|l| l.contains(" WARN ") || l.contains(" ERROR ")), "{warn}");
    let warned: usize = [0, 1].iter().map(|&r| lines_of(&warn, r, "assignment failed").len()).sum();
    assert_eq!(warned, failed_ranks, "{warn}");
    // and `--level error` shows why it failed
    let errors = logs(&c, &[&job.id, "--level", "error"]);
    let failed: usize = [0, 1].iter().map(|&r| lines_of(&errors, r, "assignment failed").len()).sum();
    assert_eq!(failed, failed_ranks, "{errors}");
    assert!(errors.lines().all(|l| l.contains(" ERROR ")), "{errors}");
    let (ok, bad) = c.smelt(&["jobs", "logs", &job.id, "--level", "debug"]);
    assert!(!ok && bad.contains("[possible values: info, warn, error]"), "{bad}");
    // following a job that fails shows its last lines after the reason
    let (ok, followed) = c.smelt(&["jobs", "follow", &job.id]);
    assert!(!ok, "{followed}");
    // a failed job's own exit status (3), which a script tells from a cancelled job's (4) or
    // an unreachable coordinator's (5)
    let code = std::process::Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["jobs", "follow", &job.id, "--coordinator", &format!("http://{}", c.addr)])
        .output()
        .unwrap()
        .status
        .code();
    assert_eq!(code, Some(3), "{followed}");
    let shown = followed.split_once(&format!("last lines its workers logged in attempt 1 (all of them: smelt jobs logs {})", job.id));
    let (_, tail) = shown.unwrap_or_else(|| panic!("no log lines after the failure:\n{followed}"));
    assert!(tail.lines().any(|l| l.contains("assignment failed") && l.contains("not finite")), "{followed}");
}

/// A warning about the job itself (here: a validation tail too short to evaluate) is one of its
/// events, where `--follow` shows it, once, though both ranks logged it; and still in the logs.
#[test]
fn a_warning_about_the_job_is_one_of_its_events_once() {
    let c = Cluster::with_workers(2);
    let s = spec(&c, "warned", "3e-3", 10).replace("tokenizer = \"char\"\n", "tokenizer = \"char\"\nval_fraction = 0.001\n");
    let job = c.submit(&s, "");
    c.wait_job(&job.id, "success", |j| j.state == JobState::Succeeded as i32);
    let said = |events: &[String]| events.iter().filter(|e| e.starts_with("warning: data.text ") && e.contains("its validation tail")).count();
    // the lines come up the heartbeat stream, maybe after the job ended
    let deadline = std::time::Instant::now() + harness::LONG;
    let mut events = c.events(&job.id);
    while said(&events) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        events = c.events(&job.id);
    }
    assert_eq!(said(&events), 1, "{events:#?}");
    let all = logs(&c, &[&job.id, "--level", "warn"]);
    for rank in [0, 1] {
        assert_eq!(lines_of(&all, rank, "its validation tail").len(), 1, "rank {rank}:\n{all}");
    }
    let (ok, followed) = c.smelt(&["jobs", "follow", &job.id]);
    assert!(ok && followed.contains("warning: data.text "), "{followed}");
}

/// A job resumed from another's checkpoint under a longer schedule and another seed says both
/// in its events (the lr and the data order do not continue the checkpoint's), once each.
#[test]
fn a_resume_under_another_schedule_or_seed_says_so_in_the_jobs_events() {
    let c = Cluster::with_workers(2);
    let first = c.submit(&spec(&c, "first", "3e-3", 20), "");
    c.wait_job(&first.id, "success", |j| j.state == JobState::Succeeded as i32);
    let longer = spec(&c, "longer", "3e-3", 40).replace("seed = 3", "seed = 4");
    let second = c.submit(&longer, &first.id);
    c.wait_job(&second.id, "success", |j| j.state == JobState::Succeeded as i32);
    let wanted = ["warning: resuming with another learning-rate schedule", "warning: resuming with another seed or global batch"];
    let events = c.events_with(&second.id, &wanted);
    for w in wanted {
        assert_eq!(events.iter().filter(|e| e.starts_with(w)).count(), 1, "{w}: {events:#?}");
    }
    let lr = events.iter().find(|e| e.starts_with(wanted[0])).unwrap();
    assert!(lr.contains("step=20") && lr.contains("lr_then=") && lr.contains("lr_now="), "{lr}");
    // the first job, which resumed from nothing, said neither
    assert!(!c.events(&first.id).iter().any(|e| e.starts_with("warning: ")), "{:#?}", c.events(&first.id));
}
