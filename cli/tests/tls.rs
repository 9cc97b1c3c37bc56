//! The coordinator over TLS, for real: `smelt coordinator --tls-cert --tls-key`, a worker and
//! the client at its `https://` URL trusting the test CA through `SMELT_TLS_CA`, a job trained to
//! the end; a worker and a client that do not trust that CA are refused, saying why.

mod harness;
#[path = "../../coordinator/tests/common/certs.rs"]
mod certs;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{log_file, one_rank_spec, start_coordinator, Proc};

fn smelt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smelt"))
}

#[test]
fn a_job_runs_end_to_end_over_tls_and_untrusting_processes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs::make(dir.path(), "cluster");
    // the system's roots stand for one made here: another test CA, so that the refusals hold on
    // a machine without any
    let other = certs::make(dir.path(), "other");
    let (_coordinator, addr) =
        start_coordinator(dir.path(), &["--tls-cert".as_ref(), tls.cert.as_os_str(), "--tls-key".as_ref(), tls.key.as_os_str()]);
    let url = format!("https://{addr}");
    let worker = |name: &str, ca: Option<&std::path::Path>| {
        let log = log_file(dir.path(), name);
        let mut cmd = smelt();
        cmd.args(["--threads", "1", "worker", "--device", "cpu", "--coordinator", &url])
            .arg("--out-dir")
            .arg(dir.path().join(name))
            .env_remove("SMELT_TLS_CA")
            .env("SSL_CERT_FILE", &other.ca)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(ca) = ca {
            cmd.env("SMELT_TLS_CA", ca);
        }
        Proc(cmd.spawn().unwrap())
    };

    // a worker that trusts only the system's roots cannot register, and says why
    let untrusting = worker("untrusting", None);
    let untrusting_log = dir.path().join("untrusting.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&untrusting_log).unwrap_or_default().contains("invalid peer certificate") {
        assert!(Instant::now() < deadline, "no certificate error in the untrusting worker's log:\n{}", std::fs::read_to_string(&untrusting_log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(untrusting);

    let _trusting = worker("trusting", Some(&tls.ca));
    let spec = one_rank_spec(dir.path(), "over-tls", 12, 4, "");
    let submit = |ca: Option<&std::path::Path>| {
        let mut cmd = smelt();
        cmd.arg("submit").arg(&spec).arg("--follow").env("SMELT_COORDINATOR", &url).env("RUST_LOG", "warn").env_remove("SMELT_TLS_CA").env("SSL_CERT_FILE", &other.ca);
        if let Some(ca) = ca {
            cmd.env("SMELT_TLS_CA", ca);
        }
        let o = cmd.output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    // a client that speaks plain text to the TLS port is told to use https://
    let o = smelt().args(["jobs", "list", "--coordinator", &format!("http://{addr}")]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("use an https:// URL"), "{err}");
    // a client that does not trust the CA is refused before it submits anything
    let (ok, out) = submit(None);
    assert!(!ok && out.contains("invalid peer certificate"), "{out}");
    // one that does: the job is trained to the end through the TLS coordinator
    let (ok, out) = submit(Some(&tls.ca));
    assert!(ok, "{out}\n{}", std::fs::read_to_string(dir.path().join("trusting.log")).unwrap_or_default());
    println!("{out}");
    assert!(out.contains("job-000001") && out.contains("succeeded"), "{out}");
}

#[test]
fn with_mutual_tls_only_workers_and_clients_with_a_certificate_get_in_and_the_others_are_told_why() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs::make(dir.path(), "cluster");
    let other = certs::make(dir.path(), "other");
    let (_coordinator, addr) = start_coordinator(
        dir.path(),
        &["--tls-cert".as_ref(), tls.cert.as_os_str(), "--tls-key".as_ref(), tls.key.as_os_str(), "--tls-client-ca".as_ref(), tls.ca.as_os_str()],
    );
    let url = format!("https://{addr}");
    let with_identity = |cmd: &mut Command, identity: Option<(&std::path::Path, &std::path::Path)>| {
        cmd.env("SMELT_TLS_CA", &tls.ca).env_remove("SMELT_TLS_CERT").env_remove("SMELT_TLS_KEY");
        if let Some((cert, key)) = identity {
            cmd.env("SMELT_TLS_CERT", cert).env("SMELT_TLS_KEY", key);
        }
    };
    let worker = |name: &str, identity: Option<(&std::path::Path, &std::path::Path)>| {
        let log = log_file(dir.path(), name);
        let mut cmd = smelt();
        cmd.args(["--threads", "1", "worker", "--device", "cpu", "--coordinator", &url])
            .arg("--out-dir")
            .arg(dir.path().join(name))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        with_identity(&mut cmd, identity);
        Proc(cmd.spawn().unwrap())
    };
    let wait_exit = |p: &mut Proc, name: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = p.0.try_wait().unwrap() {
                return (status.success(), std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "{name} kept running");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // a worker without a certificate, or with one another CA signed, exits at once saying why
    let mut anonymous = worker("anonymous", None);
    let (ok, log) = wait_exit(&mut anonymous, "anonymous");
    assert!(!ok && log.contains("refused this worker's TLS connection") && log.contains("set SMELT_TLS_CERT and SMELT_TLS_KEY"), "{log}");
    let mut stranger = worker("stranger", Some((&other.client_cert, &other.client_key)));
    let (ok, log) = wait_exit(&mut stranger, "stranger");
    assert!(!ok && log.contains("does not accept this client certificate"), "{log}");

    // a worker and a client presenting certificates the CA signed: a job trained to the end
    let _member = worker("member", Some((&tls.client_cert, &tls.client_key)));
    let spec = one_rank_spec(dir.path(), "mutual", 8, 4, "");
    let submit = |identity: Option<(&std::path::Path, &std::path::Path)>| {
        let mut cmd = smelt();
        cmd.arg("submit").arg(&spec).arg("--follow").env("SMELT_COORDINATOR", &url).env("RUST_LOG", "warn");
        with_identity(&mut cmd, identity);
        let o = cmd.output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    let (ok, out) = submit(None);
    assert!(!ok && out.contains("refused this client's TLS connection") && out.contains("requires a client certificate"), "{out}");
    let (ok, out) = submit(Some((&tls.client_cert, &tls.client_key)));
    assert!(ok && out.contains("succeeded"), "{out}\n{}", std::fs::read_to_string(dir.path().join("member.log")).unwrap_or_default());
}

#[test]
fn an_expired_certificate_is_said_in_the_coordinators_log_and_to_clients() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs::make_expired(dir.path(), "old");
    let (_coordinator, addr) =
        start_coordinator(dir.path(), &["--tls-cert".as_ref(), tls.cert.as_os_str(), "--tls-key".as_ref(), tls.key.as_os_str()]);
    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(log.contains("tls certificate: it expired") && log.contains("renew it"), "{log}");
    let o = smelt().args(["jobs", "list", "--coordinator", &format!("https://{addr}")]).env("SMELT_TLS_CA", &tls.ca).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("has expired: renew it"), "{err}");
}
