//! The dashboard on a real coordinator (127.0.0.1:0, SQLite in a tempdir): its JSON API read by
//! a plain HTTP/1.1 client on the gRPC port, and its page rendered by headless Chromium (skipped
//! where no Chromium is installed, unless SMELT_REQUIRE_CHROMIUM=1, which CI sets).

mod common;

use std::path::Path;
use std::process::Command;

use common::browser::{chromium_or_skip, playwright_or_skip, rendered_dom};
use common::http::{self, Reply};
use common::*;
use smelt_proto::v1::*;
use tonic::Code;

const STEPS: u64 = 30;
const CKPT_URI: &str = "file:///runs/jobs/job-000001/ckpt/00000020/";

fn loss_at(step: u64) -> f32 {
    3.0 - step as f32 * 0.05
}

/// Rank 0's metrics of `step`: loss `loss_at(step)`, nothing evaluated, no throughput.
fn step_metrics(a: &Assignment, step: u64) -> StepMetrics {
    StepMetrics {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: 0,
        step,
        loss: loss_at(step),
        grad_norm: 0.5,
        lr: 1e-3,
        tokens_per_s: 0.0,
        val_loss: None,
        val_accuracy: None,
        mfu: None,
        val_sources: Vec::new(),
    }
}

/// Rank 0's report of `step` (loss `loss_at(step)`).
async fn report(w: &Worker, a: &Assignment, step: u64, val_loss: Option<f32>, tokens_per_s: f64, mfu: f32) {
    w.send(worker_message::Body::Metrics(StepMetrics { tokens_per_s, val_loss, mfu: Some(mfu), ..step_metrics(a, step) })).await;
}

/// A one-rank job that reports `STEPS` steps (validation at 10 and 20, MFU on every step),
/// records a checkpoint at step 20 and succeeds; returns its id, once the store holds every
/// metric, and its worker (still connected).
async fn a_finished_job(coord: &Coord) -> (String, Worker) {
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("dash", 1, 0, 0)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9001").await;
    let a = w.assignment().await;
    w.set_busy(&a);
    for step in 1..=STEPS {
        let val = (step % 10 == 0 && step <= 20).then_some(loss_at(step) + 0.1);
        report(&w, &a, step, val, 1000.0 + step as f64, 0.25).await;
        if step == 20 {
            w.client
                .clone()
                .report_checkpoint(CheckpointReport {
                    job_id: job.id.clone(),
                    attempt: a.attempt,
                    step: 20,
                    uri: CKPT_URI.into(),
                    manifest_sha256: "ab".repeat(32),
                })
                .await
                .unwrap();
        }
    }
    w.done(&a, true, "", STEPS).await;
    wait_state(&mut jobs, &job.id, JobState::Succeeded).await;
    // The store commits in batches: wait until the history is all there.
    let path = format!("/api/jobs/{}/metrics", job.id);
    within("the metrics committed", async {
        while http::get(coord.addr, &path, None).await.json()["total"] != STEPS {
            tokio::time::sleep(HEARTBEAT).await;
        }
    })
    .await;
    (job.id, w)
}

fn steps_of(series: &serde_json::Value) -> Vec<u64> {
    series["points"].as_array().unwrap().iter().map(|p| p["step"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_jobs_workers_and_each_jobs_history_from_the_database() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let (id, worker) = a_finished_job(&coord).await;
    let worker = worker.id.clone();

    let o = http::get(coord.addr, "/api/overview", None).await;
    assert_eq!(o.status, 200, "{}", o.body);
    assert!(o.header("content-type").unwrap().starts_with("application/json"));
    let o = o.json();
    let j = &o["jobs"][0];
    assert_eq!((j["id"].as_str(), j["name"].as_str(), j["state"].as_str()), (Some(id.as_str()), Some("dash"), Some("succeeded")));
    assert_eq!((j["last_step"].as_u64(), j["total_steps"].as_u64(), j["last_checkpoint_step"].as_u64()), (Some(STEPS), Some(100), Some(20)));
    assert_eq!(j["last_val_loss"].as_f64(), Some((loss_at(20) + 0.1) as f64));
    assert!(j.get("spec_toml").is_none(), "the overview leaves specs out");
    let w = &o["workers"][0];
    assert_eq!((w["id"].as_str(), w["device"].as_str(), w["state"].as_str()), (Some(worker.as_str()), Some("cpu"), Some("idle")));

    let d = http::get(coord.addr, &format!("/api/jobs/{id}"), None).await.json();
    assert!(d["spec_toml"].as_str().unwrap().contains("name = \"dash\""));
    let events: Vec<(&str, &str)> =
        d["events"].as_array().unwrap().iter().map(|e| (e["kind"].as_str().unwrap(), e["text"].as_str().unwrap())).collect();
    assert_eq!(events.first(), Some(&("state", "submitted")), "{events:?}");
    assert!(events.iter().any(|e| e.1.contains("checkpoint at step 20")), "{events:?}");
    assert_eq!(d["events"].as_array().unwrap().last().unwrap()["to"], "succeeded");
    assert_eq!(d["checkpoints"][0]["step"], 20);
    assert_eq!(d["checkpoints"][0]["uri"], CKPT_URI);

    let all = http::get(coord.addr, &format!("/api/jobs/{id}/metrics"), None).await.json();
    assert_eq!((all["total"].as_u64(), all["stride"].as_u64()), (Some(STEPS), Some(1)));
    assert_eq!(steps_of(&all), (1..=STEPS).collect::<Vec<_>>());
    for p in all["points"].as_array().unwrap() {
        let step = p["step"].as_u64().unwrap();
        assert_eq!(p["loss"].as_f64().unwrap() as f32, loss_at(step), "step {step}");
        assert_eq!(p["tokens_per_s"].as_f64(), Some(1000.0 + step as f64));
        assert_eq!((p["attempt"].as_u64(), p["mfu"].as_f64()), (Some(1), Some(0.25)));
        assert_eq!(p["val_loss"].is_null(), step != 10 && step != 20, "step {step}");
    }
    // Thinned to every 5th row: the evaluations and the last step are kept besides.
    let thin = http::get(coord.addr, &format!("/api/jobs/{id}/metrics?max_points=6"), None).await.json();
    assert_eq!(thin["stride"], 5);
    assert_eq!(steps_of(&thin), [1, 6, 10, 11, 16, 20, 21, 26, 30]);

    // Bad requests name what is wrong.
    let r = http::get(coord.addr, &format!("/api/jobs/{id}/metrics?max_points=0"), None).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("max_points must be between 1 and"), "{}", r.body);
    // a value that is no number is an error of the same shape (it was plain text)
    for q in ["metrics?max_points=abc", "logs?tail=-1"] {
        let r = http::get(coord.addr, &format!("/api/jobs/{id}/{q}"), None).await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.json()["error"].as_str().unwrap().contains("query string"), "{q}: {}", r.body);
    }
    for path in ["/api/jobs/job-000404", "/api/jobs/job-000404/metrics"] {
        let r = http::get(coord.addr, path, None).await;
        assert_eq!((r.status, r.json()["error"].as_str()), (404, Some("job job-000404 not found")), "{path}");
    }
    let r = http::get(coord.addr, "/nothing/here", None).await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("nothing at /nothing/here"), "{}", r.body);

    let page = http::get(coord.addr, "/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.body.contains("<title>smelt coordinator</title>"));

    // gRPC on the same port is unchanged, and a method nobody serves is still gRPC's
    // "unimplemented", not the page's 404.
    let mut jobs = coord.jobs().await;
    assert_eq!(get(&mut jobs, &id).await.last_step, STEPS);
    let mut raw = tonic::client::Grpc::new(tonic::transport::Channel::from_shared(coord.url.clone()).unwrap().connect().await.unwrap());
    raw.ready().await.unwrap();
    let unknown: Result<tonic::Response<ListJobsResponse>, tonic::Status> = raw
        .unary(
            tonic::Request::new(ListJobsRequest {}),
            "/smelt.v1.JobService/NoSuchMethod".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(unknown.unwrap_err().code(), Code::Unimplemented);
    // A service nobody serves reaches the router's fallback, which still answers gRPC as gRPC.
    raw.ready().await.unwrap();
    let no_service: Result<tonic::Response<ListJobsResponse>, tonic::Status> = raw
        .unary(
            tonic::Request::new(ListJobsRequest {}),
            "/smelt.v1.NoSuchService/List".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    let e = no_service.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("/smelt.v1.NoSuchService/List"), "{e:?}");

    // The history lives in the SQLite file: a new coordinator on it serves the same.
    coord.stop().await;
    let coord = start(&db).await;
    let again = http::get(coord.addr, &format!("/api/jobs/{id}/metrics"), None).await.json();
    assert_eq!(again["points"], all["points"]);
    assert_eq!(http::get(coord.addr, &format!("/api/jobs/{id}"), None).await.json()["checkpoints"], d["checkpoints"]);
    coord.stop().await;
}

/// Checks the text is Prometheus' exposition format (0.0.4) and returns its samples as
/// (name{labels}, value).
fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_string()), "TYPE given twice: {line}");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "bad name in {line:?}");
        assert!(typed.contains(name), "sample before its TYPE: {line:?}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line:?}");
                for pair in labels[1..labels.len() - 1].split("\",") {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(k.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !v.contains('\n'), "{line:?}");
                }
            }
        }
        samples.push((series.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value: {line:?}"))));
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> Option<f64> {
    samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_workers_jobs_and_each_running_jobs_progress() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("prom\"q", 1, 0, 0).replace("name = \"prom\"q\"", "name = 'prom\"q'")).await;
    let _queued = submit(&mut jobs, &spec("waiting", 2, 0, 0)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9001").await;
    let a = w.assignment().await;
    w.set_busy(&a);
    for step in 1..=5 {
        report(&w, &a, step, None, 2048.0, 0.375).await;
    }
    wait_job(&mut jobs, &job.id, |j| j.last_step == 5).await;

    let r = http::get(coord.addr, "/metrics", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let s = parse_exposition(&r.body);
    assert_eq!(sample(&s, r#"smelt_workers{device="cpu",state="busy"}"#), Some(1.0), "{}", r.body);
    assert_eq!(sample(&s, r#"smelt_workers{device="cuda",state="idle"}"#), Some(0.0));
    assert_eq!(sample(&s, r#"smelt_jobs{state="running"}"#), Some(1.0));
    assert_eq!(sample(&s, r#"smelt_jobs{state="queued"}"#), Some(1.0));
    assert_eq!(sample(&s, r#"smelt_jobs{state="failed"}"#), Some(0.0));
    let labels = r#"{job="job-000001",name="prom\"q"}"#;
    assert_eq!(sample(&s, &format!("smelt_job_step{labels}")), Some(5.0), "{}", r.body);
    assert_eq!(sample(&s, &format!("smelt_job_total_steps{labels}")), Some(100.0));
    assert_eq!(sample(&s, &format!("smelt_job_loss{labels}")), Some(loss_at(5) as f64));
    assert_eq!(sample(&s, &format!("smelt_job_tokens_per_second{labels}")), Some(2048.0));
    assert_eq!(sample(&s, &format!("smelt_job_mfu{labels}")), Some(0.375));
    assert_eq!(sample(&s, &format!("smelt_job_restarts_total{labels}")), Some(0.0));
    // the state is a series of its own, not a label of every other (a restart would start new series)
    assert_eq!(sample(&s, r#"smelt_job_state{job="job-000001",name="prom\"q",state="running"}"#), Some(1.0));
    assert_eq!(sample(&s, r#"smelt_job_state{job="job-000001",name="prom\"q",state="restarting"}"#), Some(0.0));
    assert_eq!(sample(&s, r#"smelt_job_state{job="job-000002",name="waiting",state="queued"}"#), Some(1.0));
    assert_eq!(sample(&s, r#"smelt_job_state{job="job-000001",name="prom\"q",state="succeeded"}"#), None, "ended states are smelt_jobs'");
    assert_eq!(sample(&s, &format!("smelt_job_val_loss{labels}")), None, "no evaluation yet");
    // The waiting job has its series too (step 0, no loss yet).
    assert_eq!(sample(&s, r#"smelt_job_step{job="job-000002",name="waiting"}"#), Some(0.0));
    assert_eq!(sample(&s, r#"smelt_job_loss{job="job-000002",name="waiting"}"#), None);

    // An ended job's series stop; it is counted by state.
    w.done(&a, true, "", 5).await;
    wait_state(&mut jobs, &job.id, JobState::Succeeded).await;
    let s = parse_exposition(&http::get(coord.addr, "/metrics", None).await.body);
    assert_eq!(sample(&s, r#"smelt_jobs{state="succeeded"}"#), Some(1.0));
    assert!(!s.iter().any(|(series, _)| series.contains("job-000001")), "{s:?}");

    // A worker shut down (SIGTERM) that has gone counts as `exited`, one that vanished as `lost`
    // (an alert on lost workers must not fire on every rolling restart).
    let mut drained = Worker::join(&coord.url, "127.0.0.1:9002").await;
    drained.set_draining();
    let id = drained.id.clone();
    let mut watch = jobs.clone();
    within("the worker seen draining", async {
        while !watch.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers.iter().any(|x| x.id == id && x.draining) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    drained.drop_stream();
    w.drop_stream();
    within("both workers let go", async {
        let gone = |ws: Vec<WorkerInfo>| ws.iter().filter(|x| x.state == WorkerState::Lost as i32).count();
        while gone(watch.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers) < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let s = parse_exposition(&http::get(coord.addr, "/metrics", None).await.body);
    assert_eq!(sample(&s, r#"smelt_workers{device="cpu",state="exited"}"#), Some(1.0), "{s:?}");
    assert_eq!(sample(&s, r#"smelt_workers{device="cpu",state="lost"}"#), Some(1.0), "{s:?}");
    assert_eq!(sample(&s, r#"smelt_workers{device="cuda",state="exited"}"#), Some(0.0), "{s:?}");
    coord.stop().await;
}

// ---- a data mixture's per-source validation losses ------------------------------------------

/// The sources of the mixture job below, its weights, and a name with a quote (escaped in
/// Prometheus' labels, text on the page). The coordinator takes sources as reported: it does not
/// read the spec's mixture, so the job itself is a plain one.
const WEB: &str = "s3://bucket/corpora/web";
const CODE: &str = "file:///data/co\"de";
const WEIGHTS: [f32; 2] = [0.7, 0.3];

fn sources_at(step: u64) -> Vec<SourceLoss> {
    vec![
        SourceLoss { name: WEB.into(), loss: 2.0 + step as f32 * 0.01 },
        SourceLoss { name: CODE.into(), loss: 3.0 - step as f32 * 0.01 },
    ]
}

/// The job's validation loss as the worker reports it: its sources' losses by their weights.
fn weighted(sources: &[SourceLoss]) -> f32 {
    sources.iter().zip(WEIGHTS).map(|(s, w)| s.loss * w).sum()
}

/// A one-rank job whose rank 0 reports `steps` steps, evaluated at 10 and 20 with each source's
/// loss; returns it and its worker, the assignment still running.
async fn a_mixture_job(coord: &Coord, steps: u64) -> (Job, Worker, Assignment) {
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("mix", 1, 0, 0)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9001").await;
    let a = w.assignment().await;
    w.set_busy(&a);
    for step in 1..=steps {
        let val_sources = if step % 10 == 0 && step <= 20 { sources_at(step) } else { Vec::new() };
        let val_loss = (!val_sources.is_empty()).then(|| weighted(&val_sources));
        w.send(worker_message::Body::Metrics(StepMetrics { tokens_per_s: 1000.0, val_loss, val_sources, ..step_metrics(&a, step) })).await;
    }
    wait_job(&mut jobs, &job.id, |j| j.last_step == steps).await;
    (job, w, a)
}

/// (name, loss) of each source, as reported or as the API serves them (`[{"name", "loss"}]`,
/// a loss read back as the f32 it was).
fn pairs(sources: &[SourceLoss]) -> Vec<(String, f32)> {
    sources.iter().map(|s| (s.name.clone(), s.loss)).collect()
}

fn served(v: &serde_json::Value) -> Vec<(String, f32)> {
    let items = v.as_array().unwrap_or_else(|| panic!("not an array: {v}"));
    items.iter().map(|s| (s["name"].as_str().unwrap().to_string(), s["loss"].as_f64().unwrap() as f32)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixtures_per_source_losses_reach_prometheus_the_api_and_a_restarted_coordinator() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let (job, w, a) = a_mixture_job(&coord, 25).await;
    let mut jobs = coord.jobs().await;
    let _plain = submit(&mut jobs, &spec("plain", 2, 0, 0)).await;

    // Prometheus: a gauge per running job and source, beside the weighted validation loss.
    let r = http::get(coord.addr, "/metrics", None).await;
    assert!(r.body.contains("# TYPE smelt_job_source_val_loss gauge"), "{}", r.body);
    let s = parse_exposition(&r.body);
    let labels = |source: &str| format!(r#"{{job="{}",name="mix",source="{source}"}}"#, job.id);
    let web = sample(&s, &format!("smelt_job_source_val_loss{}", labels(WEB))).unwrap_or_else(|| panic!("{}", r.body));
    let code = sample(&s, &format!("smelt_job_source_val_loss{}", labels(r#"file:///data/co\"de"#))).unwrap_or_else(|| panic!("{}", r.body));
    assert_eq!((web as f32, code as f32), (sources_at(20)[0].loss, sources_at(20)[1].loss), "the last evaluation's");
    let val = sample(&s, &format!(r#"smelt_job_val_loss{{job="{}",name="mix"}}"#, job.id)).unwrap();
    assert!((val - (0.7 * web + 0.3 * code)).abs() < 1e-5, "val loss {val} vs 0.7 x {web} + 0.3 x {code}");
    let series = s.iter().filter(|(name, _)| name.starts_with("smelt_job_source_val_loss")).count();
    assert_eq!(series, 2, "the job without sources has none: {}", r.body);

    w.done(&a, true, "", 25).await;
    wait_state(&mut jobs, &job.id, JobState::Succeeded).await;
    let s = parse_exposition(&http::get(coord.addr, "/metrics", None).await.body);
    assert!(!s.iter().any(|(name, _)| name.starts_with("smelt_job_source_val_loss")), "an ended job's series stop: {s:?}");

    // The API: the job's last sources, and each evaluation's in the history (others have none).
    let path = format!("/api/jobs/{}/metrics", job.id);
    within("the metrics committed", async {
        while http::get(coord.addr, &path, None).await.json()["total"] != 25 {
            tokio::time::sleep(HEARTBEAT).await;
        }
    })
    .await;
    let d = http::get(coord.addr, &format!("/api/jobs/{}", job.id), None).await.json();
    assert_eq!(served(&d["last_val_sources"]), pairs(&sources_at(20)), "{d}");
    let o = http::get(coord.addr, "/api/overview", None).await.json();
    assert_eq!(served(&o["jobs"][0]["last_val_sources"]), pairs(&sources_at(20)));
    assert_eq!(served(&o["jobs"][1]["last_val_sources"]), [], "a job without sources");
    let all = http::get(coord.addr, &path, None).await.json();
    for p in all["points"].as_array().unwrap() {
        let step = p["step"].as_u64().unwrap();
        let want = if step == 10 || step == 20 { pairs(&sources_at(step)) } else { Vec::new() };
        assert_eq!(served(&p["val_sources"]), want, "step {step}");
        if step == 10 || step == 20 {
            // the sources combine into the step's validation loss, by the mixture's weights
            let each: Vec<f64> = p["val_sources"].as_array().unwrap().iter().map(|s| s["loss"].as_f64().unwrap()).collect();
            let combined = 0.7 * each[0] + 0.3 * each[1];
            assert!((p["val_loss"].as_f64().unwrap() - combined).abs() < 1e-5, "step {step}: {p}");
        }
    }
    // Thinned as the other series: every 5th row, the evaluations (with their sources), the last.
    let thin = http::get(coord.addr, &format!("{path}?max_points=5"), None).await.json();
    assert_eq!(steps_of(&thin), [1, 6, 10, 11, 16, 20, 21, 25]);
    let with_sources: Vec<u64> = thin["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["val_sources"].as_array().unwrap().is_empty())
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(with_sources, [10, 20]);

    // The page draws a line per source and the weighted one (skipped without Chromium).
    if let Some(chromium) = chromium_or_skip("a_mixtures_per_source_losses_reach_prometheus_the_api_and_a_restarted_coordinator") {
        let url = format!("http://{}/#/jobs/{}", coord.addr, job.id);
        let dom = tokio::task::spawn_blocking(move || rendered_dom(&chromium, &url)).await.unwrap();
        assert!(dom.contains("id=\"chart-val-sources\""), "{dom}");
        for series in ["web", "co&quot;de", "weighted"] {
            assert!(dom.contains(&format!("data-series=\"{series}\" data-points=\"2\"")), "{series}:\n{dom}");
        }
        assert!(dom.contains("<dt>By source</dt><dd>web 2.200 · co\"de 2.800</dd>"), "{dom}");
    }

    // The history and the job's last sources live in the SQLite file.
    coord.stop().await;
    let coord = start(&db).await;
    let again = http::get(coord.addr, &path, None).await.json();
    assert_eq!(again["points"], all["points"]);
    let d = http::get(coord.addr, &format!("/api/jobs/{}", job.id), None).await.json();
    assert_eq!(served(&d["last_val_sources"]), pairs(&sources_at(20)));
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_cancelled_from_the_api_only_with_the_request_header() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("to-cancel", 2, 0, 0)).await;
    let path = format!("/api/jobs/{}/cancel", job.id);
    // What a form on another site could send: refused, nothing changes.
    let r = http::request(coord.addr, "POST", &path, None, &[]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("x-smelt-request: 1"), "{}", r.body);
    assert_eq!(state(&get(&mut jobs, &job.id).await), JobState::Queued);
    // A GET does not cancel either (a JSON error, as every other).
    let r = http::get(coord.addr, &path, None).await;
    assert_eq!(r.status, 405);
    assert!(r.json()["error"].as_str().unwrap().ends_with("this path takes POST"), "{}", r.body);
    // A HEAD reads, as a GET does (health probes send it): it was refused as a write.
    for read in ["/api/overview", "/metrics"] {
        let r = http::request(coord.addr, "HEAD", read, None, &[]).await;
        assert_eq!(r.status, 200, "HEAD {read}: {}", r.body);
    }

    let ok = [("x-smelt-request", "1")];
    let r = http::request(coord.addr, "POST", &path, None, &ok).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "cancelled");
    let j = get(&mut jobs, &job.id).await;
    assert_eq!(state(&j), JobState::Cancelled);
    assert!(j.error.contains("cancelled by request"), "{}", j.error);
    let r = http::request(coord.addr, "POST", &path, None, &ok).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("has already ended (cancelled)"), "{}", r.body);
    let r = http::request(coord.addr, "POST", "/api/jobs/job-000404/cancel", None, &ok).await;
    assert_eq!(r.status, 404);
    // The cancellation is durable: a new coordinator on the same file has it.
    coord.stop().await;
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    assert_eq!(state(&get(&mut jobs, &job.id).await), JobState::Cancelled);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_token_guards_the_api_but_not_the_empty_page() {
    let (_d, db) = tmp();
    let coord = start_with_token(&db, Some("s3cret")).await;
    let refused = |r: &Reply, why: &str| {
        assert_eq!(r.status, 401, "{}", r.body);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.contains(why) && e.contains("SMELT_TOKEN"), "{e}");
    };
    for path in ["/api/overview", "/api/jobs/job-000001", "/api/jobs/job-000001/metrics", "/api/jobs/job-000001/logs", "/metrics"] {
        refused(&http::get(coord.addr, path, None).await, "requires a token");
        refused(&http::get(coord.addr, path, Some("s3cre")).await, "wrong token");
    }
    // A cancel with the request header but no token: the token is asked for first.
    let r = http::request(coord.addr, "POST", "/api/jobs/job-000001/cancel", None, &[("x-smelt-request", "1")]).await;
    refused(&r, "requires a token");
    let ok = http::get(coord.addr, "/api/overview", Some("s3cret")).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // the scheme in any case (curl users write `bearer`); another scheme is refused, named
    let lower = http::request(coord.addr, "GET", "/api/overview", None, &[("authorization", "bearer s3cret")]).await;
    assert_eq!(lower.status, 200, "{}", lower.body);
    let basic = http::request(coord.addr, "GET", "/api/overview", None, &[("authorization", "Basic s3cret")]).await;
    assert_eq!(basic.status, 401, "{}", basic.body);
    assert!(basic.json()["error"].as_str().unwrap().contains("not `Bearer <token>`"), "{}", basic.body);
    assert_eq!(ok.json()["jobs"], serde_json::json!([]));
    let r = http::get(coord.addr, "/api/jobs/job-000001", Some("s3cret")).await;
    assert_eq!(r.status, 404, "past the token, the request itself is answered");
    // The page holds no data: it asks for the token itself.
    let page = http::get(coord.addr, "/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("This coordinator requires a token"));
    coord.stop().await;
}

// ---- the page in a browser ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_the_jobs_the_curves_and_escapes_what_workers_report() {
    let Some(chromium) = chromium_or_skip("chromium_renders_the_jobs_the_curves_and_escapes_what_workers_report") else {
        return;
    };
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let (id, mut w) = a_finished_job(&coord).await;
    let worker = w.id.clone();
    // A second job fails with markup in its error: the page must show it as text.
    let mut jobs = coord.jobs().await;
    let bad = submit(&mut jobs, &spec("markup", 1, 0, 0)).await;
    let a = within("the second assignment", w.assignment()).await;
    w.done(&a, false, "<img src=x onerror=document.body.dataset.pwned=1> rank died", 0).await;
    wait_state(&mut jobs, &bad.id, JobState::Failed).await;

    let base = format!("http://{}/", coord.addr);
    let (c, b) = (chromium.clone(), base.clone());
    let overview = tokio::task::spawn_blocking(move || rendered_dom(&c, &b)).await.unwrap();
    assert!(overview.contains("data-loaded=\"yes\""), "the page never loaded its data:\n{overview}");
    assert!(overview.contains(&format!("data-job=\"{id}\"")), "{overview}");
    assert!(overview.contains("<span class=\"state succeeded\">succeeded</span>"), "{overview}");
    assert!(overview.contains(&format!("data-worker=\"{worker}\"")), "{overview}");
    assert!(overview.contains("&lt;img src=x onerror=document.body.dataset.pwned=1&gt; rank died"), "the error is shown as text:\n{overview}");
    assert!(!overview.contains("<img") && !overview.contains("data-pwned"), "a worker's error became markup:\n{overview}");

    // A job still waiting gets a cancel button; an ended one does not.
    let waiting = submit(&mut jobs, &spec("waiting", 2, 0, 0)).await;
    let (c, url) = (chromium.clone(), format!("{base}#/jobs/{}", waiting.id));
    let page = tokio::task::spawn_blocking(move || rendered_dom(&c, &url)).await.unwrap();
    assert!(page.contains(&format!("<button class=\"cancel\" data-cancel=\"{}\">Cancel job</button>", waiting.id)), "{page}");
    // and says what it waits for (one worker is connected, it needs two)
    assert!(page.contains("<p class=\"waiting\">Waits for 2 cpu workers: 1 connected"), "{page}");

    let url = format!("{base}#/jobs/{id}");
    let detail = tokio::task::spawn_blocking(move || rendered_dom(&chromium, &url)).await.unwrap();
    assert!(!detail.contains(&format!("data-cancel=\"{id}\"")), "an ended job offers no cancel:\n{detail}");
    assert!(detail.contains(&format!("<section id=\"job\" data-job=\"{id}\">")), "{detail}");
    // One line of STEPS points for the training loss, one of 2 for validation, one per quantity.
    assert!(detail.contains(&format!("data-series=\"train\" data-points=\"{STEPS}\"")), "{detail}");
    assert!(detail.contains("data-series=\"validation\" data-points=\"2\""), "{detail}");
    for chart in ["chart-loss", "chart-throughput", "chart-lr", "chart-grad-norm", "chart-mfu"] {
        assert!(detail.contains(&format!("id=\"{chart}\"")), "{chart} missing:\n{detail}");
    }
    assert!(detail.contains(CKPT_URI), "{detail}");
    assert!(detail.contains("MFU 25.0%"), "{detail}");
    // (the page's script holds the markup once; a job without sources renders neither)
    assert!(!detail.contains("id=\"chart-val-sources\""), "a job without sources:\n{detail}");
    assert_eq!(detail.matches("<dt>By source</dt>").count(), 1, "a job without sources:\n{detail}");
    coord.stop().await;
}

/// The cancel button clicked in a real browser (Playwright driving headless Chromium): the
/// confirmation is asked, the job ends cancelled, the button goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_on_cancel_in_the_browser_cancels_the_job() {
    let test = "a_click_on_cancel_in_the_browser_cancels_the_job";
    let (Some(chromium), Some(node_modules)) = (chromium_or_skip(test), playwright_or_skip(test)) else { return };
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("click-me", 2, 0, 0)).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/cancel_click.js");
    let url = format!("http://{}/", coord.addr);
    let id = job.id.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["120", "node"])
            .arg(script)
            .arg(url)
            .arg(id)
            .env("NODE_PATH", node_modules)
            .env("SMELT_CHROMIUM", chromium)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the click did not cancel the job: {said}");
    assert_eq!(state(&get(&mut jobs, &job.id).await), JobState::Cancelled, "{said}");
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_token_form_when_the_coordinator_requires_one() {
    let Some(chromium) = chromium_or_skip("chromium_shows_the_token_form_when_the_coordinator_requires_one") else {
        return;
    };
    let (_d, db) = tmp();
    let coord = start_with_token(&db, Some("s3cret")).await;
    let url = format!("http://{}/", coord.addr);
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&chromium, &url)).await.unwrap();
    assert!(dom.contains("<section id=\"login\" style=\"display: block;\">"), "{dom}");
    assert!(dom.contains("this coordinator requires a token: set SMELT_TOKEN"), "{dom}");
    assert!(!dom.contains("data-loaded=\"yes\""), "{dom}");
    coord.stop().await;
}
