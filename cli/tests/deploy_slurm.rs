//! deploy/slurm/smelt.sbatch under real Slurm: a one-node Slurm (Debian's slurmctld, slurmd and
//! munge, started by deploy/slurm/local_slurm.sh in a tempdir) runs the script with `sbatch
//! --wait`; the script starts the coordinator and the workers as Slurm steps, submits a job,
//! follows it and stops everything. Needs root and the packages; skipped without them unless
//! SMELT_REQUIRE_SLURM=1 (CI installs them and sets it).

use std::path::{Path, PathBuf};

#[path = "../../coordinator/tests/common/certs.rs"]
mod certs;
use std::process::Command;

/// A Slurm of our own, stopped when dropped.
struct LocalSlurm {
    dir: tempfile::TempDir,
    conf: String,
}

impl Drop for LocalSlurm {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script("local_slurm.sh")).arg("stop").arg(self.dir.path()).status();
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm").join(name)
}

fn start_slurm(test: &str) -> Option<LocalSlurm> {
    let required = std::env::var("SMELT_REQUIRE_SLURM").as_deref() == Ok("1");
    let root = unsafe { libc::geteuid() } == 0;
    let installed = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/sbatch"].iter().all(|p| Path::new(p).exists());
    if !(root && installed) {
        assert!(!required, "SMELT_REQUIRE_SLURM=1 but Slurm cannot run here (root: {root}; packages installed: {installed})");
        eprintln!("skipping {test}: needs root and Debian's slurmd, slurmctld, slurm-client and munge");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash").arg(script("local_slurm.sh")).arg("start").arg(dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let conf = stdout.lines().find_map(|l| l.strip_prefix("export SLURM_CONF=")).map(str::to_string);
    let slurm = LocalSlurm { dir, conf: conf.clone().unwrap_or_default() };
    if !(out.status.success() && conf.is_some()) {
        // Root in a container that will not run the daemons: a skip, unless required.
        let why = format!("local Slurm did not start: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
        assert!(!required, "SMELT_REQUIRE_SLURM=1 but {why}");
        eprintln!("skipping {test}: {why}");
        return None;
    }
    Some(slurm)
}

/// A data-parallel job on two CPU ranks over a text of its own (absolute path: the steps run
/// in the submission directory).
fn job_spec(dir: &Path, world_size: u32, text: &Path) -> PathBuf {
    let spec = dir.join(format!("job-{world_size}.toml"));
    std::fs::write(
        &spec,
        format!(
            r#"
name = "slurm-test"
max_restarts = 0
seed = 5

[model]
preset = "test"

[data]
text = "{text}"
tokenizer = "char"
val_fraction = 0.1

[train]
steps = 12
global_batch = {world_size}
micro_batch = 1
seq_len = 16
lr = 1e-3

[cluster]
world_size = {world_size}
device = "cpu"
"#,
            text = text.display()
        ),
    )
    .unwrap();
    spec
}

struct Outcome {
    ok: bool,
    code: Option<i32>,
    /// What the batch script printed (its --output file).
    printed: String,
    state: PathBuf,
}

/// `sbatch --wait smelt.sbatch spec` with `workers_per_node` CPU workers.
fn sbatch(slurm: &LocalSlurm, work: &Path, spec: &Path, workers_per_node: u32, name: &str) -> Outcome {
    sbatch_with(slurm, work, spec, workers_per_node, name, &[])
}

/// `sbatch` with `env` added to the script's environment.
fn sbatch_with(slurm: &LocalSlurm, work: &Path, spec: &Path, workers_per_node: u32, name: &str, env: &[(&str, &Path)]) -> Outcome {
    let state = work.join(format!("state-{name}"));
    let output = work.join(format!("{name}.out"));
    let status = Command::new("sbatch")
        // --time: a job that never ends fails the test instead of hanging it.
        .args(["--wait", "--quiet", "--time=5"])
        .arg(format!("--output={}", output.display()))
        .arg(script("smelt.sbatch"))
        .arg(spec)
        .current_dir(work)
        .env("SLURM_CONF", &slurm.conf)
        .env("SMELT_BIN", env!("CARGO_BIN_EXE_smelt"))
        .env("SMELT_PORT", "0")
        .env("SMELT_WORKERS_PER_NODE", workers_per_node.to_string())
        .env("SMELT_STATE_DIR", &state)
        .env_remove("SMELT_TOKEN")
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .status()
        .expect("run sbatch");
    let printed = std::fs::read_to_string(&output).unwrap_or_default();
    Outcome { ok: status.success(), code: status.code(), printed, state }
}

fn log(state: &Path, name: &str) -> String {
    std::fs::read_to_string(state.join("logs").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_sbatch_script_runs_a_job_on_slurm_steps_and_stops_them() {
    let Some(slurm) = start_slurm("the_sbatch_script_runs_a_job_on_slurm_steps_and_stops_them") else { return };
    let work = tempfile::tempdir().unwrap();
    let text = work.path().join("corpus.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(200)).unwrap();

    // A job that runs: two workers, one coordinator, each a Slurm step, the job followed to its
    // end and the steps stopped gracefully.
    let run = sbatch(&slurm, work.path(), &job_spec(work.path(), 2, &text), 2, "ok");
    assert!(run.ok, "sbatch failed ({:?}):\n{}", run.code, run.printed);
    assert!(run.printed.contains("succeeded at step 12"), "{}", run.printed);
    assert!(run.state.join("out/jobs/job-000001/model.safetensors").is_file(), "no final weights:\n{}", run.printed);
    assert!(log(&run.state, "coordinator.log").contains("coordinator stopped"), "the coordinator was not stopped gracefully");
    for w in ["worker-0.log", "worker-1.log"] {
        assert!(log(&run.state, w).contains("drained; exiting"), "{w} was not stopped gracefully:\n{}", log(&run.state, w));
    }
    // A requeued allocation (same job id, so the same state directory) follows the job it
    // submitted instead of submitting it again.
    let again = sbatch(&slurm, work.path(), &job_spec(work.path(), 2, &text), 2, "ok");
    assert!(again.ok, "{}", again.printed);
    assert!(again.printed.contains("following job-000001, submitted by an earlier run"), "{}", again.printed);
    assert!(again.printed.contains("succeeded at step 12") && !again.printed.contains("submitted job-000002"), "{}", again.printed);
    // The token the script made is private to its user.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(run.state.join("token")).unwrap().permissions().mode() & 0o777, 0o600);

    // A job that fails: the script says so and exits non-zero, and still stops everything.
    let bad = sbatch(&slurm, work.path(), &job_spec(work.path(), 2, &work.path().join("missing.txt")), 2, "bad");
    assert!(!bad.ok, "{}", bad.printed);
    assert!(bad.printed.contains("missing.txt") && bad.printed.contains("did not succeed"), "{}", bad.printed);
    assert!(log(&bad.state, "coordinator.log").contains("coordinator stopped"));

    // A job asking for more ranks than the allocation starts is refused before anything runs
    // (the coordinator would keep it queued for good).
    let big = sbatch(&slurm, work.path(), &job_spec(work.path(), 3, &text), 2, "big");
    assert_eq!(big.code, Some(2), "{}", big.printed);
    assert!(big.printed.contains("asks for [cluster] world_size = 3, but this allocation starts 2 worker(s)"), "{}", big.printed);
    assert!(!big.state.join("coordinator.db").exists(), "nothing should have started");

    // Over TLS: a certificate naming the node, signed by a CA the workers and client are given.
    let host = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout).unwrap().trim().to_string();
    let tls = certs::make_for(work.path(), "slurm", &[host.as_str()]);
    let env = [("SMELT_TLS_CERT", tls.cert.as_path()), ("SMELT_TLS_KEY", tls.key.as_path()), ("SMELT_TLS_CA", tls.ca.as_path())];
    let secure = sbatch_with(&slurm, work.path(), &job_spec(work.path(), 2, &text), 2, "tls", &env);
    assert!(secure.ok, "sbatch over TLS failed ({:?}):\n{}\n{}", secure.code, secure.printed, log(&secure.state, "coordinator.log"));
    assert!(secure.printed.contains(&format!("coordinator at https://{host}:")), "{}", secure.printed);
    assert!(secure.printed.contains("succeeded at step 12"), "{}", secure.printed);
    assert!(log(&secure.state, "coordinator.log").contains("tls=true"));

    // Nothing of ours is left in the queue.
    let q = Command::new("squeue").args(["--noheader"]).env("SLURM_CONF", &slurm.conf).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&q.stdout).trim(), "", "jobs left in the queue");
}
