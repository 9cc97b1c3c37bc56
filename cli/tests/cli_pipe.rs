//! A command piped into a reader that goes away (`smelt jobs list | head -0`) ends as Unix tools
//! do, by SIGPIPE, without a panic.

mod harness;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use harness::start_coordinator;

#[test]
fn a_listing_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, addr) = start_coordinator(dir.path(), &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["jobs", "list", "--coordinator", &format!("http://{addr}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the reader goes before the listing is written (reaching the coordinator takes longer)
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
}
