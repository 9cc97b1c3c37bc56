//! `smelt bench coordinator`: N simulated workers heartbeating against a real coordinator process
//! on this machine. Reports heartbeat round-trip latency (status up, ack down), the coordinator's
//! CPU use, and how long a job needing every worker takes from submit to all assigned.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use smelt_proto::v1::coordinator_message::Body as Down;
use smelt_proto::v1::job_service_client::JobServiceClient;
use smelt_proto::v1::worker_message::Body as Up;
use smelt_proto::v1::worker_service_client::WorkerServiceClient;
use smelt_proto::v1::{CancelJobRequest, DeviceClass, RegisterRequest, SubmitRequest, WorkerMessage, WorkerState, WorkerStatus};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Args, Debug)]
pub struct CoordinatorBenchArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Seconds of steady heartbeating measured.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Heartbeat interval of every simulated worker, ms.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Heartbeat streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    pub streams_per_connection: usize,
    #[arg(long)]
    pub json: bool,
}

struct Coordinator {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("parse /proc stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

const SPEC: &str = r#"
name = "bench-gang"
[model]
preset = "test"
[data]
text = "bench.txt"
[train]
steps = 1
global_batch = WORLD
micro_batch = 1
seq_len = 8
lr = 1e-3
[cluster]
world_size = WORLD
"#;

pub fn run(a: CoordinatorBenchArgs) -> Result<()> {
    if a.workers == 0 || a.streams_per_connection == 0 {
        bail!("--workers and --streams-per-connection must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(bench(a))
}

async fn bench(a: CoordinatorBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let url = format!("http://{addr}");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["coordinator", "--listen", &addr, "--db", dir.path().join("bench.db").to_str().unwrap()])
        .args(["--heartbeat-ms", &a.heartbeat_ms.to_string(), "--lease-timeout-ms", "60000"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // the bench dies however it dies (SIGPIPE from `| head`, SIGKILL): its coordinator with it
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook only makes async-signal-safe calls
        unsafe { cmd.pre_exec(crate::signals::exit_with_parent()) };
    }
    let child = cmd.spawn()?;
    let coord = Coordinator { child, _dir: dir };
    let pid = coord.child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        if Instant::now() > deadline {
            bail!("coordinator did not start on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Connections, each carrying up to `streams_per_connection` heartbeat streams.
    let n_conn = a.workers.div_ceil(a.streams_per_connection);
    let mut channels = Vec::with_capacity(n_conn);
    for _ in 0..n_conn {
        channels.push(Endpoint::from_shared(url.clone())?.tcp_nodelay(true).connect().await?);
    }
    eprintln!("registering {} simulated workers over {} connections ...", a.workers, n_conn);
    let reg_started = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::<f64>::with_capacity(a.workers * (a.seconds as usize + 5))));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (assigned_tx, mut assigned_rx) = mpsc::unbounded_channel::<Instant>();
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut handles = Vec::with_capacity(a.workers);
    for i in 0..a.workers {
        let ch: Channel = channels[i / a.streams_per_connection].clone();
        let (lat, meas, assigned, sem) = (latencies.clone(), measuring.clone(), assigned_tx.clone(), sem.clone());
        let interval = Duration::from_millis(a.heartbeat_ms);
        handles.push(tokio::spawn(async move { simulated_worker(i, ch, interval, lat, meas, assigned, sem).await }));
    }
    // Wait until every worker is registered and streaming (each sends its first ack'd status).
    let wait_until = Instant::now() + Duration::from_secs(600);
    loop {
        let seen = latencies.lock().await.len();
        if seen >= a.workers {
            break;
        }
        if Instant::now() > wait_until {
            bail!("only {seen} of {} workers came up", a.workers);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let registered_s = reg_started.elapsed().as_secs_f64();
    eprintln!("all registered in {registered_s:.1} s; measuring {} s of heartbeats ...", a.seconds);
    tokio::time::sleep(Duration::from_millis(a.heartbeat_ms * 2)).await;
    latencies.lock().await.clear();
    measuring.store(true, std::sync::atomic::Ordering::SeqCst);
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    let cpu = (cpu_seconds(pid)? - cpu0) / t0.elapsed().as_secs_f64();
    measuring.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut lat = std::mem::take(&mut *latencies.lock().await);
    lat.sort_by(|x, y| x.total_cmp(y));

    // A job needing every worker: submit to the last assignment received.
    let mut jobs = JobServiceClient::new(channels[0].clone());
    let spec = SPEC.replace("WORLD", &a.workers.to_string());
    let submitted = Instant::now();
    let job = jobs.submit(SubmitRequest { spec_toml: spec, resume_from: String::new() }).await?.into_inner().job.context("job")?;
    let mut got = 0;
    let mut last = submitted;
    while got < a.workers {
        match tokio::time::timeout(Duration::from_secs(120), assigned_rx.recv()).await {
            Ok(Some(t)) => {
                got += 1;
                last = last.max(t);
            }
            _ => bail!("only {got} of {} workers were assigned within 120 s", a.workers),
        }
    }
    let gang_ms = (last - submitted).as_secs_f64() * 1e3;
    let _ = jobs.cancel_job(CancelJobRequest { job_id: job.id }).await;
    for h in handles {
        h.abort();
    }

    let report = json!({
        "bench": "coordinator",
        "workers": a.workers,
        "heartbeat_interval_ms": a.heartbeat_ms,
        "connections": n_conn,
        "register_all_s": registered_s,
        "heartbeats_measured": lat.len(),
        "heartbeat_rtt_p50_ms": percentile(&lat, 0.50),
        "heartbeat_rtt_p99_ms": percentile(&lat, 0.99),
        "heartbeat_rtt_max_ms": lat.last().copied().unwrap_or(f64::NAN),
        "coordinator_cpu_cores": cpu,
        "submit_to_all_assigned_ms": gang_ms,
        "machine_cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    // the coordinator stopped before anything is printed: a reader that goes away (SIGPIPE)
    // leaves nothing running
    drop(coord);
    if a.json {
        println!("{report}");
    } else {
        let ms = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{} workers (heartbeat every {} ms, {n_conn} connections): registered in {registered_s:.1} s; \
             heartbeat round trip p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} heartbeats",
            a.workers,
            a.heartbeat_ms,
            ms("heartbeat_rtt_p50_ms"),
            ms("heartbeat_rtt_p99_ms"),
            ms("heartbeat_rtt_max_ms"),
            lat.len()
        );
        println!(
            "coordinator CPU {cpu:.3} cores of {}; a job needing every worker assigned {gang_ms:.0} ms after submit",
            report["machine_cores"]
        );
    }
    Ok(())
}

async fn simulated_worker(
    i: usize,
    ch: Channel,
    interval: Duration,
    latencies: Arc<Mutex<Vec<f64>>>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
    assigned: mpsc::UnboundedSender<Instant>,
    sem: Arc<tokio::sync::Semaphore>,
) -> Result<()> {
    let mut client = WorkerServiceClient::new(ch);
    let reg = {
        let _permit = sem.acquire().await?;
        client
            .register(RegisterRequest {
                worker_id: String::new(),
                hostname: format!("sim-{i}"),
                device_class: DeviceClass::Cpu as i32,
                device_index: 0,
                data_addr: format!("127.0.0.1:{}", 10000 + i % 50000),
                running: None,
            })
            .await?
            .into_inner()
    };
    let (tx, rx) = mpsc::channel::<WorkerMessage>(16);
    let mut down = client.heartbeat(ReceiverStream::new(rx)).await?.into_inner();
    let id = reg.worker_id;
    let sent: Arc<std::sync::Mutex<std::collections::HashMap<u64, Instant>>> = Default::default();
    let sender = {
        let (tx, sent, id) = (tx.clone(), sent.clone(), id.clone());
        tokio::spawn(async move {
            // Spread the workers' phases over the interval.
            tokio::time::sleep(interval.mul_f64((i % 1000) as f64 / 1000.0)).await;
            let mut tick = tokio::time::interval(interval);
            let mut seq = 0u64;
            loop {
                tick.tick().await;
                seq += 1;
                sent.lock().unwrap().insert(seq, Instant::now());
                let status = WorkerStatus { state: WorkerState::Idle as i32, job_id: String::new(), attempt: 0, seq, draining: false };
                if tx.send(WorkerMessage { worker_id: id.clone(), body: Some(Up::Status(status)) }).await.is_err() {
                    return;
                }
            }
        })
    };
    // Until the first ack arrives, count this worker once (registration progress).
    let mut first = true;
    while let Some(m) = down.message().await? {
        match m.body {
            Some(Down::Ack(ack)) => {
                let t = sent.lock().unwrap().remove(&ack.seq);
                if let Some(t) = t {
                    if first || measuring.load(std::sync::atomic::Ordering::Relaxed) {
                        latencies.lock().await.push(t.elapsed().as_secs_f64() * 1e3);
                        first = false;
                    }
                }
            }
            Some(Down::Assign(_)) => {
                let _ = assigned.send(Instant::now());
            }
            _ => {}
        }
    }
    sender.abort();
    Ok(())
}
