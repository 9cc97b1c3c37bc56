//! deploy/k8s and deploy/docker/compose.yaml, checked as far as a machine without a cluster or
//! a container runtime allows: every container's command is run as the file gives it, only
//! its paths moved into a temporary directory and the coordinator's address onto loopback.
//! The coordinator serves; CPU workers train a job through it (with the token from the mounted
//! file, for Kubernetes); the GPU worker's arguments parse up to the missing GPU. And the files
//! agree with each other: the Service's port is the one the coordinator listens on and the one
//! the workers dial, every pod mounts the token Secret where `--token-file` reads it, and each
//! GPU pod asks for the one GPU it uses.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{listening_addr, log_file, Proc};
use serde_yaml::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

/// Every YAML document of a file.
fn docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().unwrap_or_else(|| panic!("not a list: {v:?}")).iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// The one document of `kind` in `path`.
fn one(path: &str, kind: &str) -> Value {
    let mut found: Vec<Value> = docs(path).into_iter().filter(|d| d["kind"].as_str() == Some(kind)).collect();
    assert_eq!(found.len(), 1, "{path}: one {kind}");
    found.remove(0)
}

/// A workload's pod spec and its single container.
fn pod(workload: &Value) -> (&Value, &Value) {
    let spec = &workload["spec"]["template"]["spec"];
    let containers = spec["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    (spec, &containers[0])
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} in {args:?}"));
    &args[i + 1]
}

/// `args` with each (from, to) replaced inside every argument.
fn mapped(args: &[String], map: &[(String, String)]) -> Vec<String> {
    args.iter().map(|a| map.iter().fold(a.clone(), |a, (from, to)| a.replace(from.as_str(), to))).collect()
}

/// (from, to) pairs for [`mapped`].
fn pairs(p: &[(&str, String)]) -> Vec<(String, String)> {
    p.iter().map(|(a, b)| (a.to_string(), b.clone())).collect()
}

fn spawn(args: &[String], log: &Path, env: &[(&str, &str)]) -> Proc {
    let f = log_file(log.parent().unwrap(), log.file_stem().unwrap().to_str().unwrap());
    Proc(
        Command::new(env!("CARGO_BIN_EXE_smelt"))
            .args(args)
            .envs(env.iter().copied())
            .env_remove("SMELT_COORDINATOR")
            .env_remove("SMELT_TOKEN")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap(),
    )
}

/// Submits a two-rank job on a small text to `url` and follows it; panics with `logs` unless it
/// succeeds.
fn train_through(url: &str, dir: &Path, token: Option<&str>, logs: &dyn Fn() -> String) {
    let text = dir.join("text.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(200)).unwrap();
    let spec = dir.join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"deploy-check\"\n[model]\npreset = \"test\"\n[data]\ntext = {:?}\n[train]\nsteps = 4\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\nlr = 1e-3\n[cluster]\nworld_size = 2\n",
            text.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smelt"));
    cmd.args(["submit", spec.to_str().unwrap(), "--follow", "--coordinator", url]).env("RUST_LOG", "warn").env_remove("SMELT_TOKEN");
    if let Some(t) = token {
        cmd.env("SMELT_TOKEN", t);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "the job failed: {}{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr), logs());
}

fn read_logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            out += &format!("--- {}\n{}\n", e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

#[test]
fn the_kubernetes_manifests_agree_and_their_commands_run() {
    // the Service the workers dial (the other one is the StatefulSet's headless one)
    let service = docs("k8s/coordinator.yaml")
        .into_iter()
        .find(|d| d["kind"].as_str() == Some("Service") && d["spec"]["clusterIP"].as_str() != Some("None"))
        .expect("the coordinator's Service");
    let coordinator = one("k8s/coordinator.yaml", "StatefulSet");
    let cpu = one("k8s/workers-cpu.yaml", "StatefulSet");
    let gpu = one("k8s/workers-gpu.yaml", "StatefulSet");
    let kustomization = one("k8s/kustomization.yaml", "Kustomization");
    for r in strings(&kustomization["resources"]) {
        assert!(deploy(&format!("k8s/{r}")).exists(), "kustomization names {r}");
    }
    assert_eq!(strings(&kustomization["resources"]).len(), 3);

    // The Service, the coordinator's listen address and the workers' URL agree.
    let (cspec, ccont) = pod(&coordinator);
    let cargs = strings(&ccont["args"]);
    assert_eq!(cargs[0], "coordinator");
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(flag(&cargs, "--listen"), format!("0.0.0.0:{port}"));
    assert_eq!(ccont["ports"][0]["containerPort"].as_u64(), Some(port));
    assert_eq!(service["spec"]["selector"], coordinator["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(coordinator["spec"]["replicas"].as_u64(), Some(1), "one coordinator: one SQLite writer");
    let url = format!("http://{}:{port}", service["metadata"]["name"].as_str().unwrap());
    // Every pod mounts the token Secret where its --token-file reads it.
    for (what, spec, container) in [("coordinator", cspec, ccont), ("cpu worker", pod(&cpu).0, pod(&cpu).1), ("gpu worker", pod(&gpu).0, pod(&gpu).1)] {
        let args = strings(&container["args"]);
        let token_file = Path::new(flag(&args, "--token-file"));
        let mount = container["volumeMounts"].as_sequence().unwrap().iter().find(|m| Path::new(m["mountPath"].as_str().unwrap()) == token_file.parent().unwrap());
        let mount = mount.unwrap_or_else(|| panic!("{what}: nothing mounted at {}", token_file.parent().unwrap().display()));
        let volume = spec["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert_eq!(volume["secret"]["secretName"].as_str(), Some("smelt-token"), "{what}");
        assert_eq!(token_file.file_name().unwrap(), "token", "{what}: the Secret's key is `token`");
        if what != "coordinator" {
            assert_eq!(flag(&args, "--coordinator"), url, "{what} dials the Service");
        }
    }
    // Each StatefulSet is governed by a headless Service of its file that selects its pods.
    for (file, set) in [("k8s/coordinator.yaml", &coordinator), ("k8s/workers-cpu.yaml", &cpu), ("k8s/workers-gpu.yaml", &gpu)] {
        let name = set["spec"]["serviceName"].as_str().unwrap();
        let governing = docs(file).into_iter().find(|d| d["kind"].as_str() == Some("Service") && d["metadata"]["name"].as_str() == Some(name));
        let governing = governing.unwrap_or_else(|| panic!("{file}: no Service {name}"));
        assert_eq!(governing["spec"]["clusterIP"].as_str(), Some("None"), "{file}: {name} is headless");
        assert_eq!(governing["spec"]["selector"], set["spec"]["template"]["metadata"]["labels"], "{file}");
        assert_eq!(set["spec"]["selector"]["matchLabels"], set["spec"]["template"]["metadata"]["labels"], "{file}");
    }
    // Pods of the non-root image run as its user (the Dockerfile's fixed uid), and fsGroup makes
    // the mounted token (group-readable) and volumes theirs.
    let dockerfile = std::fs::read_to_string(deploy("docker/Dockerfile")).unwrap();
    let uid: u64 = dockerfile.lines().find_map(|l| l.strip_prefix("USER ")).and_then(|u| u.split(':').next()).unwrap().parse().unwrap();
    assert!(dockerfile.contains(&format!("--uid {uid}")), "the image creates user {uid}");
    for (what, set) in [("coordinator", &coordinator), ("cpu worker", &cpu)] {
        let (spec, container) = pod(set);
        assert_eq!(container["image"].as_str(), Some("smelt:latest"), "{what}");
        let sc = &spec["securityContext"];
        assert_eq!((sc["runAsUser"].as_u64(), sc["fsGroup"].as_u64()), (Some(uid), Some(uid)), "{what}");
    }
    for (what, set) in [("coordinator", &coordinator), ("cpu worker", &cpu), ("gpu worker", &gpu)] {
        let token = pod(set).0["volumes"].as_sequence().unwrap().iter().find(|v| v["secret"]["secretName"].as_str() == Some("smelt-token")).unwrap().clone();
        let mode = token["secret"]["defaultMode"].as_u64().unwrap();
        assert_eq!(mode & 0o040, 0o040, "{what}: the token is readable by the pod's group (mode {mode:o})");
    }
    let (gspec, gcont) = pod(&gpu);
    assert_eq!(gcont["resources"]["limits"]["nvidia.com/gpu"].as_u64(), Some(1), "one GPU per worker pod");
    assert_eq!(flag(&strings(&gcont["args"]), "--device"), "cuda:0", "the pod's one GPU");
    assert!(gspec["volumes"].as_sequence().unwrap().iter().any(|v| v["emptyDir"]["medium"].as_str() == Some("Memory")), "/dev/shm for NCCL");

    // Run the commands: the coordinator with its token file, two CPU workers, a job.
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::create_dir_all(t.join("etc")).unwrap();
    let token = "k8s-test-token";
    std::fs::write(t.join("etc/token"), token).unwrap();
    let state = t.join("state");
    let cmap = vec![
        ("0.0.0.0:7070", "127.0.0.1:0".to_string()),
        ("/var/lib/smelt", state.display().to_string()),
        ("/etc/smelt", t.join("etc").display().to_string()),
    ];
    std::fs::create_dir_all(&state).unwrap();
    let log = t.join("coordinator.log");
    let mut c = spawn(&mapped(&cargs, &pairs(&cmap)), &log, &[]);
    let addr = listening_addr(&log, &mut c.0, 0);
    assert!(state.join("coordinator.db").exists(), "the state is on the volume");
    let real_url = format!("http://{addr}");
    let mut workers = Vec::new();
    for i in 0..2 {
        let wmap = vec![
            (url.as_str(), real_url.clone()),
            ("/var/lib/smelt", t.join(format!("pod-{i}")).display().to_string()),
            ("/etc/smelt", t.join("etc").display().to_string()),
        ];
        let args = mapped(&strings(&pod(&cpu).1["args"]), &pairs(&wmap));
        workers.push(spawn(&args, &t.join(format!("worker-{i}.log")), &[("RUST_LOG", "info")]));
    }
    train_through(&real_url, t, Some(token), &|| read_logs(t));
    assert!((0..2).any(|i| t.join(format!("pod-{i}/worker/jobs")).exists()), "a worker wrote under its --out-dir\n{}", read_logs(t));

    // The GPU worker's arguments parse; it stops at the GPU this machine does not have.
    let gmap = vec![
        (url.as_str(), real_url.clone()),
        ("/var/lib/smelt", t.join("gpu-pod").display().to_string()),
        ("/etc/smelt", t.join("etc").display().to_string()),
    ];
    let gargs = mapped(&strings(&gcont["args"]), &pairs(&gmap));
    let mut g = Command::new(env!("CARGO_BIN_EXE_smelt")).args(&gargs).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while g.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = g.kill();
            // a GPU is here after all: the worker started on it, which is what the manifest asks
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = g.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success());
    assert!(!said.contains("Usage:") && !said.contains("unexpected argument"), "the arguments did not parse: {said}");
    assert!(said.to_lowercase().contains("cuda"), "it stops at the GPU: {said}");
    drop(workers);
    drop(c);
}

#[test]
fn the_compose_services_run_as_written() {
    let compose: Value = serde_yaml::from_str(&std::fs::read_to_string(deploy("docker/compose.yaml")).unwrap()).unwrap();
    let services = &compose["services"];
    let cargs = strings(&services["coordinator"]["command"]);
    let wargs = strings(&services["worker"]["command"]);
    let port = flag(&cargs, "--listen").rsplit(':').next().unwrap().to_string();
    assert_eq!(strings(&services["coordinator"]["ports"])[0], format!("{port}:{port}"));
    let url = format!("http://coordinator:{port}");
    assert_eq!(flag(&wargs, "--coordinator"), url, "the worker dials the coordinator service");
    let replicas = services["worker"]["deploy"]["replicas"].as_u64().unwrap();
    assert!(replicas >= 2);

    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let state = t.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let log = t.join("coordinator.log");
    let cmap = vec![(format!("0.0.0.0:{port}"), "127.0.0.1:0".to_string()), ("/var/lib/smelt".to_string(), state.display().to_string())];
    let mut c = spawn(&mapped(&cargs, &cmap), &log, &[]);
    let addr = listening_addr(&log, &mut c.0, 0);
    let real_url = format!("http://{addr}");
    let workers: Vec<Proc> = (0..replicas)
        .map(|i| {
            let wmap = vec![(url.as_str(), real_url.clone()), ("/outputs", t.join(format!("outputs-{i}")).display().to_string())];
            spawn(&mapped(&wargs, &pairs(&wmap)), &t.join(format!("worker-{i}.log")), &[])
        })
        .collect();
    train_through(&real_url, t, None, &|| read_logs(t));
    drop(workers);
    drop(c);
}
