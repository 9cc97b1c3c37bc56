//! A worker or client aimed at something that is not a smelt coordinator says what answers there
//! and stops, rather than retrying "register refused" forever: a web server on the port, a TLS
//! coordinator reached by http://. A real coordinator is never taken for one. Real processes.

mod harness;
#[path = "../../coordinator/tests/common/certs.rs"]
mod certs;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::start_coordinator;

/// A web server on loopback: every connection gets "404 Not Found" and is closed.
fn web_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    addr
}

/// `smelt <args>` run to its end (at most 60 s: a worker that retried forever fails the test).
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("SMELT_TLS_CA")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("smelt {args:?} still running after 60 s: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn worker(url: &str, dir: &std::path::Path) -> Output {
    run(&["--threads", "1", "worker", "--device", "cpu", "--coordinator", url, "--out-dir", dir.to_str().unwrap()])
}

#[test]
fn a_web_server_on_the_port_is_named_by_worker_and_client() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{}", web_server());
    let want = format!("an HTTP/1 server answers at {url} (\"HTTP/1.1 404 Not Found\"), not a smelt coordinator");
    let out = worker(&url, dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&want), "{err}");
    // the client too, with an error and exit status 1 (its connection breaking is no SIGPIPE)
    for _ in 0..3 {
        let out = run(&["jobs", "list", "--coordinator", &url]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{:?}: {err}", out.status);
        assert!(err.contains(&want), "{err}");
    }
}

#[test]
fn a_tls_coordinator_reached_by_http_is_told_to_use_https() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs::make(dir.path(), "cluster");
    let (_coordinator, addr) =
        start_coordinator(dir.path(), &["--tls-cert".as_ref(), tls.cert.as_os_str(), "--tls-key".as_ref(), tls.key.as_os_str()]);
    let url = format!("http://{addr}");
    let out = worker(&url, &dir.path().join("w"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("the server at {url} speaks TLS: use an https:// URL")), "{err}");
    let out = run(&["jobs", "list", "--coordinator", &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("speaks TLS: use an https:// URL"), "{err}");
}

/// A plain coordinator reached by https:// will not start speaking TLS: the idle worker exits
/// saying to use http:// (it retried every 5 s for ever, each warning saying so).
#[test]
fn a_plain_coordinator_reached_by_https_is_told_to_use_http() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, addr) = start_coordinator(dir.path(), &[]);
    let out = worker(&format!("https://{addr}"), &dir.path().join("w"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("does not serve TLS: use http://"), "{err}");
}

/// The probe asks a real coordinator's port what answers there: its dashboard, which names it,
/// so a failed call to it is never taken for the wrong server.
#[test]
fn a_real_coordinator_is_not_taken_for_another_server() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, addr) = start_coordinator(dir.path(), &[]);
    let url = format!("http://{addr}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let failed = tonic::Status::unavailable("transport error");
    assert!(smelt_proto::wrong_server::maybe_wrong_server(&failed));
    assert_eq!(rt.block_on(smelt_proto::wrong_server::wrong_server(&url, &failed)), None);
    // while a web server is named
    let web = format!("http://{}", web_server());
    assert!(rt.block_on(smelt_proto::wrong_server::wrong_server(&web, &failed)).is_some_and(|w| w.contains("HTTP/1 server")));
    // and a job list from the coordinator works
    let out = run(&["jobs", "list", "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
