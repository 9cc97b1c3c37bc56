//! Two hosts: Linux network namespaces joined by a veth pair, each with its own address and
//! loopback, so "127.0.0.1" on one is not the other. A coordinator and a worker on host A, a
//! worker on host B, a data-parallel job over the TCP ring between them. Before the ring
//! listener learned to bind the address toward the coordinator, B's worker registered
//! 127.0.0.1 and A's ring could never reach it. Needs root and iproute2; skipped without them
//! unless SMELT_REQUIRE_NETNS=1 (CI sets it when it runs as root).

mod harness;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use harness::{listening_addr, Proc};

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces on one link (10.77.N.1 and 10.77.N.2), deleted when dropped.
struct TwoHosts {
    a: String,
    b: String,
    ip_a: String,
    ip_b: String,
}

impl TwoHosts {
    /// None (the test skipped) when this machine will not make namespaces (root in an
    /// unprivileged container), unless SMELT_REQUIRE_NETNS=1.
    fn new() -> Option<Self> {
        let id = std::process::id();
        let (a, b) = (format!("smelt-a-{id}"), format!("smelt-b-{id}"));
        let net = id % 200 + 20;
        let hosts = TwoHosts { a: a.clone(), b: b.clone(), ip_a: format!("10.77.{net}.1"), ip_b: format!("10.77.{net}.2") };
        let made = ip(&["netns", "add", &a]);
        if !made.status.success() {
            assert!(
                std::env::var("SMELT_REQUIRE_NETNS").as_deref() != Ok("1"),
                "SMELT_REQUIRE_NETNS=1 but ip netns add failed: {}",
                String::from_utf8_lossy(&made.stderr)
            );
            eprintln!("skipping: ip netns add failed here: {}", String::from_utf8_lossy(&made.stderr));
            return None;
        }
        ip_ok(&["netns", "add", &b]);
        let (va, vb) = (format!("sv{id}a"), format!("sv{id}b"));
        ip_ok(&["link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b]);
        for (ns, dev, addr) in [(&a, &va, &hosts.ip_a), (&b, &vb, &hosts.ip_b)] {
            ip_ok(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip_ok(&["-n", ns, "link", "set", dev, "up"]);
            ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Some(hosts)
    }

    /// `smelt args...` on host `ns`, output appended to `log`.
    fn smelt(&self, ns: &str, log: &Path, args: &[&str]) -> Proc {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_smelt")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Proc(child)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

fn netns_or_skip(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let has_ip = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
    if root && has_ip {
        return true;
    }
    assert!(
        std::env::var("SMELT_REQUIRE_NETNS").as_deref() != Ok("1"),
        "SMELT_REQUIRE_NETNS=1 but network namespaces cannot be made here (root: {root}, iproute2: {has_ip})"
    );
    eprintln!("skipping {test}: needs root and iproute2 for network namespaces");
    false
}

#[test]
fn a_job_trains_across_two_hosts_over_the_ring() {
    if !netns_or_skip("a_job_trains_across_two_hosts_over_the_ring") {
        return;
    }
    let Some(hosts) = TwoHosts::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    std::fs::write(&text, "a stitch in time saves nine; ".repeat(300)).unwrap();
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        format!(
            r#"
name = "two-hosts"
max_restarts = 0
seed = 3

[model]
preset = "test"

[data]
text = "{}"
tokenizer = "char"

[train]
steps = 10
global_batch = 2
micro_batch = 1
seq_len = 16
lr = 1e-3

[cluster]
world_size = 2
device = "cpu"
"#,
            text.display()
        ),
    )
    .unwrap();

    let coord_log = dir.path().join("coordinator.log");
    let mut coord = hosts.smelt(
        &hosts.a,
        &coord_log,
        &["coordinator", "--listen", &format!("{}:0", hosts.ip_a), "--db", dir.path().join("c.db").to_str().unwrap()],
    );
    let addr = listening_addr(&coord_log, &mut coord.0, 0);
    let url = format!("http://{addr}");
    let out = dir.path().join("out");
    let mut workers = Vec::new();
    for (ns, name) in [(&hosts.a, "worker-a"), (&hosts.b, "worker-b")] {
        let log = dir.path().join(format!("{name}.log"));
        workers.push(hosts.smelt(ns, &log, &["--threads", "1", "worker", "--device", "cpu", "--coordinator", &url, "--out-dir", out.to_str().unwrap()]));
    }

    // Host B submits and follows (a client on another host, too).
    // `timeout`: a ring that never forms fails the test instead of hanging it.
    let submit = Command::new("timeout")
        .args(["300", "ip", "netns", "exec", &hosts.b, env!("CARGO_BIN_EXE_smelt"), "submit", spec.to_str().unwrap(), "--follow", "--coordinator", &url])
        .output()
        .unwrap();
    let logs = || {
        ["coordinator", "worker-a", "worker-b"]
            .iter()
            .map(|n| format!("--- {n}\n{}", std::fs::read_to_string(dir.path().join(format!("{n}.log"))).unwrap_or_default()))
            .collect::<String>()
    };
    let printed = String::from_utf8_lossy(&submit.stdout).into_owned() + &String::from_utf8_lossy(&submit.stderr);
    assert!(submit.status.success() && printed.contains("succeeded at step 10"), "{printed}\n{}", logs());

    // Each worker registered the address of its own host: the ring crossed the link.
    let listed = Command::new("ip")
        .args(["netns", "exec", &hosts.a, env!("CARGO_BIN_EXE_smelt"), "workers", "--coordinator", &url])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&listed.stdout);
    for host_ip in [&hosts.ip_a, &hosts.ip_b] {
        assert!(table.contains(&format!("{host_ip}:")), "no worker registered at {host_ip}:\n{table}");
    }
    assert!(!table.contains("127.0.0.1") && !table.contains("0.0.0.0"), "{table}");
    assert!(out.join("jobs/job-000001/model.safetensors").is_file());
}
