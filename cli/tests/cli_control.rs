//! The control-plane client commands against a real `smelt coordinator` process: what a person
//! types and reads (no workers needed).

use std::process::{Child, Command, Output, Stdio};

mod harness;

struct Coordinator(Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn smelt(args: &[&str], url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(args)
        .env("SMELT_COORDINATOR", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn start(dir: &std::path::Path) -> (Coordinator, String) {
    let log_path = dir.join("coordinator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--db", dir.join("c.db").to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr = harness::listening_addr(&log_path, &mut child, 0);
    (Coordinator(child), format!("http://{addr}"))
}

const SPEC: &str = r#"
name = "cli"
priority = 2

[model]
preset = "tiny"

[data]
text = "data/tinyshakespeare.txt"

[train]
steps = 50
global_batch = 8
micro_batch = 4
seq_len = 32
lr = 1e-3

[cluster]
world_size = 2
"#;

#[test]
fn submit_list_get_cancel_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = start(dir.path());
    let spec = dir.path().join("job.toml");
    std::fs::write(&spec, SPEC).unwrap();

    let out = smelt(&["submit", spec.to_str().unwrap()], &url);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "job-000001");

    let out = smelt(&["jobs", "list"], &url);
    let list = text(&out.stdout);
    assert!(list.starts_with("ID"), "{list}");
    assert!(list.contains("job-000001") && list.contains("queued") && list.contains("0/50"), "{list}");

    // `smelt jobs` alone lists them; `ls` and `show` are aliases
    // (compared as JSON: the tables' ages may tick between two calls)
    let alone = text(&smelt(&["jobs"], &url).stdout);
    assert!(alone.starts_with("ID") && alone.contains("job-000001"), "{alone}");
    let listed = text(&smelt(&["jobs", "list", "--json"], &url).stdout);
    assert!(listed.contains("job-000001"), "{listed}");
    assert_eq!(text(&smelt(&["jobs", "--json"], &url).stdout), listed);
    assert_eq!(text(&smelt(&["jobs", "ls", "--json"], &url).stdout), listed);
    let got = text(&smelt(&["jobs", "get", "job-000001", "--json"], &url).stdout);
    assert!(got.contains("job-000001"), "{got}");
    assert_eq!(text(&smelt(&["jobs", "show", "job-000001", "--json"], &url).stdout), got);

    let out = smelt(&["jobs", "get", "job-000001", "--json"], &url);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["priority"].as_i64(), v["world_size"].as_u64()),
        (Some("queued"), Some(2), Some(2))
    );
    // no step yet: no loss (it read 0.0)
    assert!(v["last_loss"].is_null() && v["last_val_loss"].is_null(), "{v}");

    let out = smelt(&["workers", "--json"], &url);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]));

    let out = smelt(&["jobs", "cancel", "job-000001"], &url);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), "job-000001 cancelled");

    // gRPC errors: `error: <message>`, non-zero exit.
    let out = smelt(&["jobs", "cancel", "job-000001"], &url);
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).trim(),
        "error: job job-000001 has already ended (cancelled); only queued, scheduled, running or restarting jobs can be cancelled"
    );
    // following a cancelled job ends with its own exit status
    let out = smelt(&["jobs", "follow", "job-000001"], &url);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let out = smelt(&["jobs", "get", "job-000099"], &url);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr).trim(), "error: job job-000099 not found");
    std::fs::write(&spec, SPEC.replace("micro_batch = 4", "micro_batch = 3")).unwrap();
    let out = smelt(&["submit", spec.to_str().unwrap(), "--follow"], &url);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.starts_with("error: job spec: `train.global_batch`"), "{err}");
    // a name with a terminal escape, and a file no spec is as long as: refused, nothing queued
    std::fs::write(&spec, SPEC.replacen("name = ", "name = \"a\\u001b[31mRED\"\n# was: ", 1)).unwrap();
    let out = smelt(&["submit", spec.to_str().unwrap()], &url);
    assert!(!out.status.success() && text(&out.stderr).contains("control character"), "{}", text(&out.stderr));
    std::fs::write(&spec, format!("{SPEC}\n# {}\n", "x".repeat(2 << 20))).unwrap();
    let out = smelt(&["submit", spec.to_str().unwrap()], &url);
    assert!(!out.status.success() && text(&out.stderr).contains("more than a spec takes"), "{}", text(&out.stderr));

    // A checkpoint to resume from that is not there: refused before anything is submitted.
    std::fs::write(&spec, SPEC).unwrap();
    let missing = dir.path().join("nope/ckpt/00000010");
    let out = smelt(&["submit", spec.to_str().unwrap(), "--resume-from", missing.to_str().unwrap()], &url);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--resume-from") && err.contains("no MANIFEST.json there"), "{err}");
    let out = smelt(&["jobs", "list"], &url);
    assert!(!text(&out.stdout).contains("job-000002"), "{}", text(&out.stdout));

    // Resumed from a checkpoint and no step since: its progress is the checkpoint's step, with
    // no loss (a committed checkpoint of a tiny model: it verifies, and no worker runs here).
    let root = smelt_corpus::StoreDir::open(dir.path().join("store/jobs/job-000009/ckpt").to_str().unwrap()).unwrap();
    smelt_checkpoint::commit(&root, &harness::tiny_snapshot(10, "job-000009"), &smelt_checkpoint::UploadOptions::default()).unwrap();
    let ckpt = dir.path().join("store/jobs/job-000009/ckpt/00000010");
    let out = smelt(&["submit", spec.to_str().unwrap(), "--resume-from", ckpt.to_str().unwrap()], &url);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = smelt(&["jobs", "list"], &url);
    let list = text(&out.stdout);
    let row: Vec<&str> = list.lines().find(|l| l.starts_with("job-000002")).unwrap_or_else(|| panic!("{list}")).split_whitespace().collect();
    let at = row.iter().position(|c| *c == "10/50").unwrap_or_else(|| panic!("{list}"));
    assert_eq!(row[at + 1], "-", "{list}");
    let out = smelt(&["jobs", "get", "job-000002"], &url);
    let got = text(&out.stdout);
    // still queued: it will resume from there (not "resumed")
    assert!(got.contains("10/50 (resumes from the checkpoint at step 10 once placed)") && !got.lines().any(|l| l.starts_with("loss")), "{got}");

    // No coordinator there.
    let out = smelt(&["jobs", "list", "--coordinator", "http://127.0.0.1:1"], &url);
    assert_eq!(out.status.code(), Some(5), "unreachable: its own exit status");
    assert!(
        text(&out.stderr).starts_with("error: cannot reach the coordinator at http://127.0.0.1:1"),
        "{}",
        text(&out.stderr)
    );
    // `checkpoints` of a job id asks the coordinator too: the same status, with its hint
    let out = smelt(&["checkpoints", "list", "job-000001", "--coordinator", "http://127.0.0.1:1"], &url);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("without the coordinator: --store"), "{}", text(&out.stderr));
    // a model tool given a job id its --store does not hold asks the coordinator: the same
    let empty = dir.path().join("empty-store");
    std::fs::create_dir_all(&empty).unwrap();
    let out = smelt(&["sample", "--model", "job-000001", "--store", empty.to_str().unwrap(), "--coordinator", "http://127.0.0.1:1"], &url);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));

    // the spec from standard input (`-`), as a script's here-document gives it
    let mut child = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["submit", "-"])
        .env("SMELT_COORDINATOR", &url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), SPEC.replace("name = ", "name = \"from-stdin\"\n#").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let listed = text(&smelt(&["jobs", "list"], &url).stdout);
    assert!(listed.lines().any(|l| l.starts_with(&id) && l.contains("from-stdin")), "{id}: {listed}");
}

/// `smelt workers` leaves out the workers lost more than an hour ago (the coordinator keeps
/// every worker it has known); `--all` lists them. The rows are written into the coordinator's
/// real SQLite file between two runs of it, as an earlier run would have left them.
#[test]
fn workers_lost_long_ago_are_listed_only_with_all() {
    let dir = tempfile::tempdir().unwrap();
    drop(start(dir.path())); // creates the schema
    let now = smelt_coordinator::state::now_ms();
    let db = rusqlite::Connection::open(dir.path().join("c.db")).unwrap();
    for (id, state, seen) in [("w-000001", "lost", now - 2 * 3600 * 1000), ("w-000002", "lost", now - 60 * 1000), ("w-000003", "lost", now - 3 * 3600 * 1000)] {
        db.execute(
            "INSERT INTO workers (id, hostname, device_class, device_index, data_addr, state, job_id, attempt, rank, last_seen_ms) \
             VALUES (?1, 'h', 'cpu', 0, '', ?2, '', 0, 0, ?3)",
            rusqlite::params![id, state, seen],
        )
        .unwrap();
    }
    drop(db);
    let (_coord, url) = start(dir.path());
    let out = smelt(&["workers"], &url);
    let list = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(list.contains("w-000002") && !list.contains("w-000001") && !list.contains("w-000003"), "{list}");
    assert!(list.contains("(2 workers lost more than an hour ago not shown; --all lists them)"), "{list}");
    let out = smelt(&["workers", "--all"], &url);
    let list = text(&out.stdout);
    assert!(["w-000001", "w-000002", "w-000003"].iter().all(|w| list.contains(w)) && !list.contains("not shown"), "{list}");
}

/// A worker whose --out-dir cannot be written exits before registering, naming the directory
/// (it used to take jobs, train them to the end and fail at the final save).
#[test]
fn a_worker_with_an_unwritable_out_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = start(dir.path());
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let out_dir = file.join("out");
    let out = smelt(&["worker", "--device", "cpu", "--out-dir", out_dir.to_str().unwrap()], &url);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(&format!("--out-dir {}: cannot be written", out_dir.display())), "{err}");
    let out = smelt(&["workers", "--json"], &url);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]));
}

/// A coordinator that cannot listen (the port is taken) says so and leaves no database behind.
#[test]
fn a_coordinator_whose_port_is_taken_creates_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db = dir.path().join("new.db");
    let out = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["coordinator", "--listen", &addr, "--db", db.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(&format!("cannot listen on {addr}")), "{}", text(&out.stderr));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}
