//! A data mixture (`[[data.mix]]`) through the cluster for real: two corpora prepared by
//! `smelt corpus prepare`, a coordinator and worker processes on loopback. Weights 0.7 and 0.3
//! of 8 sequences a step (5.6 and 2.4): every step takes 8, each source 5-6 and 2-3, the
//! running totals within one sequence of exact; the sources' sequences are their own (ids within
//! each corpus, no repeat inside an epoch, the small source wrapping into its next epoch); the
//! validation loss is each source's, weighted, and the events name both; a job resumed from a
//! checkpoint with another world size draws exactly what the uninterrupted job drew; sources
//! with different tokenizers are refused naming the source. Each source's validation loss is a
//! metric of its own: in the coordinator's SQLite file, its metrics API, Prometheus' `/metrics`
//! and the CLI's progress lines, combining by the weights into the reported validation loss.

mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::Cluster;
use smelt_corpus::mixture::MixtureOrder;
use smelt_proto::v1::JobState;

/// `smelt corpus prepare` of `text` (written to a file) into `<dir>/<name>`.
fn prepare(dir: &Path, name: &str, text: &str, tokenizer: &str) -> PathBuf {
    let input = dir.join(format!("{name}.txt"));
    std::fs::write(&input, text).unwrap();
    let out = dir.join(name);
    let o = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["corpus", "prepare", "--input", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--tokenizer", tokenizer])
        .args(["--txt-docs", "line", "--val-docs", "2"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "prepare {name}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    out
}

fn spec(name: &str, a: &Path, b: &Path, world: usize, extra: &str) -> String {
    format!(
        "name = {name:?}\nseed = 11\n[model]\npreset = \"test\"\n[[data.mix]]\ncorpus = {:?}\nweight = 0.7\n[[data.mix]]\ncorpus = {:?}\nweight = 0.3\n\
         [train]\nsteps = 12\nglobal_batch = 8\nmicro_batch = {}\nseq_len = 16\nlr = 1e-3\neval_interval = 4\n[cluster]\nworld_size = {world}\n{extra}",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        8 / world
    )
}

/// The two sources' validation losses combined as the worker does (train_data.rs's
/// `evaluate_sets`: by the weights 0.7 and 0.3, over their sum).
fn weighted(losses: &[f32; 2]) -> f64 {
    (0.7 * losses[0] as f64 + 0.3 * losses[1] as f64) / (0.7 + 0.3)
}

/// The corpora the tests mix: many lines of letters and a few of digits (byte tokenizer).
fn corpora(dir: &Path) -> (PathBuf, PathBuf) {
    let letters: String = (0..60).map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog\n")).collect();
    let digits: String = (0..6).map(|i| format!("{i:04} 31415 92653 58979 32384 62643 38327 95028\n")).collect();
    (prepare(dir, "letters", &letters, "byte"), prepare(dir, "digits", &digits, "byte"))
}

/// The sample ids each step of `job` drew over all ranks (the last attempt's), sorted.
fn drawn(c: &Cluster, job: &str, world: usize) -> BTreeMap<u64, Vec<u64>> {
    let mut steps: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut attempts: BTreeMap<(u64, usize), (u64, Vec<u64>)> = BTreeMap::new();
    for rank in 0..world {
        let log = c.samples_dir().join(format!("{job}.rank{rank}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}\n{}", log.display(), c.logs()));
        for line in text.lines() {
            let v: Vec<u64> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
            let (attempt, step) = (v[0], v[1]);
            let e = attempts.entry((step, rank)).or_insert((attempt, Vec::new()));
            if attempt >= e.0 {
                *e = (attempt, v[2..].to_vec());
            }
        }
    }
    for ((step, _), (_, ids)) in attempts {
        steps.entry(step).or_default().extend(ids);
    }
    for ids in steps.values_mut() {
        ids.sort();
    }
    steps
}

#[test]
fn a_mixture_draws_each_source_in_proportion_and_resumes_exactly() {
    let c = Cluster::with_workers(2);
    let dir = c.dir.path().to_path_buf();
    let (a, b) = corpora(&dir);
    let digits: String = (0..6).map(|i| format!("{i:04} 31415 92653 58979 32384 62643 38327 95028\n")).collect();
    let n_b = {
        let r = smelt_corpus::CorpusReader::open(b.to_str().unwrap()).unwrap();
        r.n_sequences(16)
    };

    let job = c.submit(&spec("mix", &a, &b, 2, "[checkpoint]\nevery = 4\n"), "");
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&job.id).error, c.logs());
    let whole = drawn(&c, &job.id, 2);
    assert_eq!(whole.keys().copied().collect::<Vec<_>>(), (0..12).collect::<Vec<_>>());
    let mut b_draws = Vec::new();
    let mut totals = [0u64; 2];
    for (step, ids) in &whole {
        assert_eq!(ids.len(), 8, "step {step}");
        let from_a = ids.iter().filter(|&&id| MixtureOrder::decode(id).0 == 0).count() as u64;
        assert!((5..=6).contains(&from_a), "step {step}: {from_a} of 8 from the first corpus (0.7 of 8 = 5.6): {ids:?}");
        totals[0] += from_a;
        totals[1] += 8 - from_a;
        let exact = (*step + 1) as f64 * 8.0 * 0.7;
        assert!((totals[0] as f64 - exact).abs() <= 1.0, "after step {step}: {} from the first corpus, exactly {exact}", totals[0]);
        b_draws.extend(ids.iter().map(|&id| MixtureOrder::decode(id)).filter(|(s, _)| *s == 1).map(|(_, l)| l));
    }
    assert!(b_draws.iter().all(|&l| l < n_b), "every id of the second source is one of its {n_b} sequences");
    assert!(b_draws.len() as u64 > n_b, "the small source ran past its first epoch ({} draws of {n_b})", b_draws.len());
    let first_epoch: Vec<u64> = b_draws.iter().copied().take(n_b as usize).collect();
    let mut dedup = first_epoch.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), n_b as usize, "the second source's first {n_b} draws are each of its sequences once");
    // validation: each source's loss, in the events; the metrics' loss is their weighted mean
    let notes: Vec<String> = c.events(&job.id).into_iter().filter(|e| e.contains("by source")).collect();
    assert_eq!(notes.len(), 3, "evaluations at steps 4, 8 and 12: {notes:?}");
    let parse = |note: &str, name: &str| -> f64 {
        let at = note.find(name).unwrap_or_else(|| panic!("{name} in {note}")) + name.len();
        note[at..].trim_start().split(|c: char| c == ',' || c.is_whitespace()).next().unwrap().parse().unwrap()
    };
    let last = notes.last().unwrap();
    let (la, lb) = (parse(last, a.to_str().unwrap()), parse(last, b.to_str().unwrap()));
    let reported = metrics.iter().rev().find_map(|m| m.val_loss).unwrap() as f64;
    assert!((reported - (0.7 * la + 0.3 * lb)).abs() < 2e-3, "val loss {reported} vs 0.7 x {la} + 0.3 x {lb}");
    // ... and in the metrics of each evaluation, by the names the spec gives (none elsewhere)
    let names = [a.to_str().unwrap(), b.to_str().unwrap()];
    for m in &metrics {
        let got: Vec<&str> = m.val_sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(got, if m.val_loss.is_some() { names.to_vec() } else { Vec::new() }, "step {}", m.step);
        if let Some(v) = m.val_loss {
            assert!((v as f64 - weighted(&[m.val_sources[0].loss, m.val_sources[1].loss])).abs() < 1e-5, "step {}: {m:?}", m.step);
        }
    }

    // The same job from its step-4 checkpoint as one rank draws steps 4..8 exactly as before.
    let ckpt_root = (0..2).map(|w| dir.join(format!("worker-{w}/jobs/{}/ckpt", job.id))).find(|p| p.exists()).expect("rank 0's checkpoints");
    let mut ckpts: Vec<PathBuf> = std::fs::read_dir(&ckpt_root).unwrap().map(|d| d.unwrap().path()).collect();
    ckpts.sort();
    let at4 = ckpts.iter().find(|p| p.file_name().unwrap().to_str().unwrap().trim_start_matches('0') == "4").expect("a step-4 checkpoint").clone();
    c.workers_idle();
    let resumed = c.submit(&spec("mix-resumed", &a, &b, 1, ""), at4.to_str().unwrap());
    let (state, _) = c.follow(&resumed.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&resumed.id).error, c.logs());
    let again = drawn(&c, &resumed.id, 1);
    assert_eq!(again.keys().copied().collect::<Vec<_>>(), (4..12).collect::<Vec<_>>());
    for (step, ids) in &again {
        assert_eq!(ids, &whole[step], "step {step} after the resume");
    }

    // Sources tokenized differently cannot be mixed.
    let chars = prepare(&dir, "chars", &digits, "char");
    let bad = c.submit(&spec("mix-bad", &a, &chars, 1, ""), "");
    let (state, _) = c.follow(&bad.id);
    assert_eq!(state, JobState::Failed);
    let error = c.job(&bad.id).error;
    assert!(error.contains("data.mix[1].corpus") && error.contains("share one tokenizer"), "{error}");
}

/// `(source, value)` of each `smelt_job_source_val_loss` sample of `job`, and its
/// `smelt_job_val_loss`, from one Prometheus exposition.
fn scraped(text: &str, job: &str) -> (Vec<(String, f64)>, Option<f64>) {
    let value = |line: &str| line.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap();
    let mut sources = Vec::new();
    let mut val = None;
    for line in text.lines() {
        if let Some(labels) = line.strip_prefix(&format!("smelt_job_source_val_loss{{job=\"{job}\",")) {
            let at = labels.find("source=\"").unwrap_or_else(|| panic!("no source label: {line}")) + "source=\"".len();
            let source = labels[at..].split('"').next().unwrap().to_string();
            sources.push((source, value(line)));
        } else if line.starts_with(&format!("smelt_job_val_loss{{job=\"{job}\",")) {
            val = Some(value(line));
        }
    }
    (sources, val)
}

#[test]
fn each_sources_validation_loss_reaches_the_store_the_api_prometheus_and_the_cli() {
    let c = Cluster::with_workers(2);
    let dir = c.dir.path().to_path_buf();
    let (a, b) = corpora(&dir);
    let names = [a.to_str().unwrap().to_string(), b.to_str().unwrap().to_string()];

    // Followed by the CLI (no terminal: a line per step), evaluated at steps 4, 8 and 12.
    let spec_file = dir.join("mix.toml");
    std::fs::write(&spec_file, spec("mix", &a, &b, 2, "")).unwrap();
    let (ok, shown) = c.smelt(&["submit", spec_file.to_str().unwrap(), "--follow"]);
    assert!(ok, "{shown}\n{}", c.logs());
    let id = shown.lines().next().unwrap().trim().to_string();
    // the plain lines carry the estimate a terminal's bar shows, but the last step's
    let steps: Vec<&str> = shown.lines().filter(|l| l.starts_with("step ")).collect();
    assert!(steps.iter().any(|l| l.contains(" | eta ")), "{shown}");
    assert!(steps.iter().filter(|l| l.starts_with("step 12/12:")).all(|l| !l.contains("eta")), "{shown}");

    // The store: a row per evaluation and source, combining into the step's validation loss.
    let db = rusqlite::Connection::open_with_flags(dir.join("coordinator.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let rows = |sql: &str| -> Vec<(u64, String, f64)> {
        let mut st = db.prepare(sql).unwrap();
        st.query_map([&id], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))).unwrap().collect::<rusqlite::Result<_>>().unwrap()
    };
    // (the store commits in batches: wait for the evaluations' rows, which carry their sources'
    // in the same transaction; the deadline is a hang guard)
    let deadline = std::time::Instant::now() + harness::LONG;
    let vals = loop {
        let vals = rows("SELECT step, 'val', val_loss FROM metrics WHERE job_id = ?1 AND val_loss IS NOT NULL ORDER BY step");
        if vals.len() == 3 {
            break vals;
        }
        assert!(std::time::Instant::now() < deadline, "evaluations stored: {vals:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let stored = rows("SELECT step, source, loss FROM metric_sources WHERE job_id = ?1 ORDER BY step, rowid");
    assert_eq!(stored.len(), 6, "a row per evaluation and source: {stored:?}");
    let mut by_step: BTreeMap<u64, (f32, [f32; 2])> = BTreeMap::new();
    for (i, (step, _, v)) in vals.iter().enumerate() {
        let (sa, sb) = (&stored[2 * i], &stored[2 * i + 1]);
        assert_eq!((sa.0, sa.1.as_str(), sb.0, sb.1.as_str()), (*step, names[0].as_str(), *step, names[1].as_str()), "{stored:?}");
        let each = [sa.2 as f32, sb.2 as f32];
        assert!((v - weighted(&each)).abs() < 1e-5, "step {step}: validation loss {v} vs {each:?} weighted 0.7, 0.3");
        by_step.insert(*step, (*v as f32, each));
    }
    assert_eq!(by_step.keys().copied().collect::<Vec<_>>(), [4, 8, 12]);

    // The metrics API serves each evaluation's sources; the job, its last ones.
    let (status, body) = c.http_get(&format!("/api/jobs/{id}/metrics"));
    assert_eq!(status, 200, "{body}");
    let series: serde_json::Value = serde_json::from_str(&body).unwrap();
    let served = |v: &serde_json::Value| -> Vec<(String, f32)> {
        v.as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap().to_string(), s["loss"].as_f64().unwrap() as f32)).collect()
    };
    let points = series["points"].as_array().unwrap();
    assert_eq!(points.len(), 12, "{body}");
    for p in points {
        let step = p["step"].as_u64().unwrap();
        let want: Vec<(String, f32)> = match by_step.get(&step) {
            Some((_, each)) => names.iter().cloned().zip(each.iter().copied()).collect(),
            None => Vec::new(),
        };
        assert_eq!(served(&p["val_sources"]), want, "step {step}: {p}");
    }
    let (_, job) = c.http_get(&format!("/api/jobs/{id}"));
    let job: serde_json::Value = serde_json::from_str(&job).unwrap();
    let (last_val, last) = by_step[&12];
    assert_eq!(served(&job["last_val_sources"]), names.iter().cloned().zip(last).collect::<Vec<_>>(), "{job}");

    // The CLI: each evaluation's line shows the sources by their short names, beside the
    // validation loss; so does `smelt jobs get`.
    for (step, (v, [la, lb])) in &by_step {
        let line = shown.lines().find(|l| l.starts_with(&format!("step {step}/12:"))).unwrap_or_else(|| panic!("no line for step {step}:\n{shown}"));
        assert!(line.contains(&format!("| val {v:.4} [letters {la:.4}, digits {lb:.4}] |")), "{line}");
    }
    let (ok, got) = c.smelt(&["jobs", "get", &id]);
    assert!(ok && got.contains(&format!("val loss  {last_val:.4} [letters {:.4}, digits {:.4}]\n", last[0], last[1])), "{got}");

    // Prometheus: a gauge per source of a running job, from the same evaluation as its
    // validation loss. A long job evaluating every other step, cancelled once scraped.
    let long = spec("mix-long", &a, &b, 2, "").replace("steps = 12", "steps = 1000000").replace("eval_interval = 4", "eval_interval = 2");
    let live = c.submit(&long, "");
    // (the job's record and /metrics are one state in the coordinator: once the job has sources,
    // so has the scrape)
    c.wait_job(&live.id, "an evaluation by source", |j| !j.last_val_sources.is_empty());
    let (status, text) = c.http_get("/metrics");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("# HELP smelt_job_source_val_loss ") && text.contains("# TYPE smelt_job_source_val_loss gauge\n"), "{text}");
    let (sources, val) = scraped(&text, &live.id);
    let got: Vec<&str> = sources.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(got, names.iter().map(String::as_str).collect::<Vec<_>>(), "{text}");
    let val = val.unwrap_or_else(|| panic!("no validation loss beside the sources:\n{text}"));
    assert!((val - weighted(&[sources[0].1 as f32, sources[1].1 as f32])).abs() < 1e-5, "{text}");
    let (ok, said) = c.smelt(&["jobs", "cancel", &live.id]);
    assert!(ok, "{said}");
    c.wait_job(&live.id, "cancellation", |j| j.state == JobState::Cancelled as i32);
    let (_, text) = c.http_get("/metrics");
    assert!(scraped(&text, &live.id).0.is_empty(), "an ended job's series stop:\n{text}");
}
