//! `smelt bench coordinator` as a user runs it: a line a person reads (the JSON with `--json`),
//! and no coordinator left running when the reader of its output goes away (`| head`: SIGPIPE
//! ended the bench before it stopped the coordinator it started). Speed is reported, never asserted.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Processes whose command line mentions `needle` (the bench's coordinator has its database
/// under the bench's TMPDIR).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn a_bench_whose_reader_goes_away_leaves_no_coordinator_running() {
    let tmp = tempfile::tempdir().unwrap();
    let needle = tmp.path().display().to_string();
    let args = ["bench", "coordinator", "--workers", "3", "--seconds", "1", "--heartbeat-ms", "200"];

    let o = Command::new(env!("CARGO_BIN_EXE_smelt")).args(args).env("TMPDIR", tmp.path()).env("RUST_LOG", "warn").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("3 workers") && out.contains("heartbeat round trip p50") && out.contains("assigned"), "{out}");
    assert!(!out.trim_start().starts_with('{'), "without --json a line a person reads:\n{out}");

    // stdout a pipe nobody reads: the bench ends by SIGPIPE when it prints
    let mut child = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(args)
        .env("TMPDIR", tmp.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = processes_mentioning(&needle);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the bench's coordinator outlived it: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
