//! The coordinator's token with real processes: a coordinator started with `--token-file`
//! serves a worker and a client that carry the token (`SMELT_TOKEN`) — a job runs to the end —
//! and refuses, naming what is wrong, a client without the token, a client with another one,
//! and a worker with another one (which exits instead of retrying forever).

use std::process::{Child, Command, Output, Stdio};

mod harness;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn smelt(args: &[&str], url: &str, token: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smelt"));
    c.args(args).env("SMELT_COORDINATOR", url).env("RUST_LOG", "warn").env_remove("SMELT_TOKEN").stdin(Stdio::null());
    if let Some(t) = token {
        c.env("SMELT_TOKEN", t);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn a_coordinator_with_a_token_serves_only_those_who_carry_it() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "correct-horse-battery-staple\n").unwrap();
    let log_path = dir.path().join("coordinator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut coordinator = Proc(
        Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(["coordinator", "--listen", "127.0.0.1:0", "--db", dir.path().join("c.db").to_str().unwrap(), "--token-file", token_file.to_str().unwrap()])
            .env_remove("SMELT_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr = harness::listening_addr(&log_path, &mut coordinator.0, 0);
    let url = format!("http://{addr}");

    // Clients without the token, or with another one, are refused before anything happens.
    let none = smelt(&["jobs", "list"], &url, None);
    assert!(!none.status.success());
    assert!(text(&none).contains("requires a token") && text(&none).contains("SMELT_TOKEN"), "{}", text(&none));
    let wrong = smelt(&["jobs", "list"], &url, Some("tr0ub4dor"));
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("wrong token"), "{}", text(&wrong));

    // A worker with another token exits, saying why.
    let bad_worker = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["--threads", "1", "worker", "--device", "cpu", "--coordinator", &url, "--out-dir", dir.path().join("w-bad").to_str().unwrap()])
        .env("SMELT_TOKEN", "tr0ub4dor")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!bad_worker.status.success());
    assert!(text(&bad_worker).contains("refused this worker") && text(&bad_worker).contains("wrong token"), "{}", text(&bad_worker));

    // With the token: a worker registers and a job runs to the end.
    let wlog = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let _worker = Proc(
        Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(["--threads", "1", "worker", "--device", "cpu", "--coordinator", &url, "--out-dir", dir.path().join("w").to_str().unwrap()])
            .env("SMELT_TOKEN", "correct-horse-battery-staple")
            .stdin(Stdio::null())
            .stdout(wlog.try_clone().unwrap())
            .stderr(wlog)
            .spawn()
            .unwrap(),
    );
    let corpus = dir.path().join("text.txt");
    std::fs::write(&corpus, "the quick brown fox jumps over the lazy dog\n".repeat(30)).unwrap();
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"authed\"\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\n[train]\nsteps = 5\nglobal_batch = 4\nmicro_batch = 4\nseq_len = 16\nlr = 1e-3\n",
            corpus.to_str().unwrap()
        ),
    )
    .unwrap();
    let submitted = smelt(&["submit", spec.to_str().unwrap(), "--follow"], &url, Some("correct-horse-battery-staple"));
    let out = text(&submitted);
    let logs = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    assert!(submitted.status.success(), "{out}\n{logs}");
    assert!(out.contains("succeeded"), "{out}");
}
