//! `--device` as a user meets it, through the real binary: a malformed device, and a GPU the
//! binary or the machine cannot use, are refused at startup (before the worker registers or
//! `smelt up` starts anything) with an error naming the device.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Hang guard (not a performance threshold): a worker that accepted its device would run until
/// killed, trying to reach a coordinator that is not there.
const PATIENCE: Duration = Duration::from_secs(120);

fn smelt(args: &[&str], dir: &std::path::Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start smelt");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("smelt {args:?} did not exit; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn worker(device: &str, dir: &std::path::Path) -> Output {
    // Port 1: nothing listens there, so a worker that started would only retry.
    smelt(&["worker", "--device", device, "--coordinator", "http://127.0.0.1:1", "--out-dir", "out"], dir)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_gpu_that_cannot_be_used_is_refused_at_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // No machine has 10000 GPUs: refused with every build, for the reason that applies.
    let o = worker("cuda:9999", dir.path());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--device cuda:9999"), "{e}");
    assert!(!e.contains("registered"), "the worker must not register: {e}");
    if !cfg!(feature = "cuda") {
        let o = worker("cuda:0", dir.path());
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("--device cuda:0") && e.contains("built without the `cuda` feature"), "{e}");
        // `cuda` alone means GPU 0, as in PyTorch.
        assert!(stderr(&worker("cuda", dir.path())).contains("--device cuda:0"));
    }
    assert!(!dir.path().join("out").exists(), "nothing is written before the device is settled");
}

#[test]
fn a_malformed_device_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["gpu", "cuda:x", "cuda:-1"] {
        let o = worker(bad, dir.path());
        assert_eq!(o.status.code(), Some(2), "clap's usage error");
        let e = stderr(&o);
        assert!(e.contains(&format!("{bad:?}")) && e.contains("expected auto, cpu or cuda:N"), "{e}");
    }
}

#[test]
fn up_asked_for_gpus_without_any_starts_nothing() {
    if cfg!(feature = "cuda") {
        // With the feature, whether this machine has a GPU decides; the no-GPU case is the
        // plan's unit test (`cmd_up::tests`).
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = smelt(&["up", "--device", "cuda", "--data-dir", "state", "--listen", "127.0.0.1:1"], dir.path());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--device cuda: no usable GPU") && e.contains("built without the `cuda` feature"), "{e}");
    assert!(!dir.path().join("state").exists(), "no coordinator or worker was started");
}
