//! A job's log lines on the dashboard (the Logs panel), in a real browser: lines scripted
//! workers send, rendered by headless Chromium as text with their rank, level and target, and
//! filtered by rank; under Playwright, followed live as more arrive.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::browser::{chromium_or_skip, playwright_or_skip, rendered_dom};
use common::http;
use common::*;
use smelt_proto::v1::*;

/// A line logged at `at_ms` by the worker's runner.
fn log_line(at_ms: i64, level: &str, text: &str) -> LogLine {
    LogLine { at_ms, level: level.into(), target: "smelt_worker::runner".into(), text: text.into() }
}

/// Sends `lines` as rank `a.rank`'s, and waits until the API serves the job's `total` lines.
async fn send_logs(coord: &Coord, w: &Worker, a: &Assignment, lines: Vec<LogLine>, total: usize) {
    w.send(worker_message::Body::Logs(LogBatch { job_id: a.job_id.clone(), attempt: a.attempt, rank: a.rank, lines, dropped: 0, seq: 0 })).await;
    let path = format!("/api/jobs/{}/logs", a.job_id);
    within("the log lines stored", async {
        while http::get(coord.addr, &path, None).await.json()["lines"].as_array().unwrap().len() != total {
            tokio::time::sleep(HEARTBEAT).await;
        }
    })
    .await;
}

/// The logs panel's lines in a dumped DOM, each as its markup (`<li ...>...</li>`).
fn log_items(dom: &str) -> Vec<&str> {
    let start = dom.find("<ol class=\"log\" id=\"log-lines\">").unwrap_or_else(|| panic!("no logs panel:\n{dom}"));
    let list = &dom[start..start + dom[start..].find("</ol>").unwrap()];
    list.split("<li").skip(1).map(|item| item.split_once('>').unwrap().1.trim_end_matches("</li>")).collect()
}

/// An item's text as the browser shows it (its tags dropped; what it escaped, unescaped).
fn text_of(item: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in item.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

/// 2024-05-06 07:08:09.123 UTC: the seconds and milliseconds read the same in any time zone.
const LOGGED_AT: i64 = 1_714_979_289_123;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_a_jobs_log_lines_as_text_and_filters_them_by_rank() {
    let test = "chromium_shows_a_jobs_log_lines_as_text_and_filters_them_by_rank";
    let Some(chromium) = chromium_or_skip(test) else { return };
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("logs", 2, 0, 0)).await;
    let mut w1 = Worker::join(&coord.url, "127.0.0.1:9001").await;
    let mut w2 = Worker::join(&coord.url, "127.0.0.1:9002").await;
    let (a1, a2) = (w1.assignment().await, w2.assignment().await);
    let ((w0, a0), (w1, a1)) = if a1.rank == 0 { ((w1, a1), (w2, a2)) } else { ((w2, a2), (w1, a1)) };
    let markup = "loss <b>x</b> & <img src=x onerror=document.body.dataset.pwned=1>";
    send_logs(&coord, &w0, &a0, vec![log_line(LOGGED_AT, "INFO", "rank 0 starts"), log_line(LOGGED_AT + 1, "WARN", markup)], 2).await;
    send_logs(&coord, &w1, &a1, vec![log_line(LOGGED_AT + 2, "INFO", "rank 1 starts"), log_line(LOGGED_AT + 3, "ERROR", "rank 1 failed")], 4).await;

    let url = format!("http://{}/#/jobs/{}", coord.addr, job.id);
    let (c, u) = (chromium.clone(), url.clone());
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&c, &u)).await.unwrap();
    assert!(dom.contains("data-loaded=\"yes\""), "the page never loaded its data:\n{dom}");
    let items = log_items(&dom);
    let texts: Vec<String> = items.iter().map(|i| text_of(i)).collect();
    // Every rank's lines in the order they arrived, each with its time, attempt and rank, level,
    // target and text.
    assert_eq!(
        texts.iter().map(|t| t.split_once(' ').unwrap().1).collect::<Vec<_>>(),
        [
            "a1 r0 INFO smelt_worker::runner rank 0 starts",
            &format!("a1 r0 WARN smelt_worker::runner {markup}"),
            "a1 r1 INFO smelt_worker::runner rank 1 starts",
            "a1 r1 ERROR smelt_worker::runner rank 1 failed",
        ],
        "{dom}"
    );
    assert!(items[0].starts_with("<span class=\"t\"") && texts[0].split(' ').next().unwrap().ends_with(":09.123"), "{}", items[0]);
    assert!(items.iter().all(|i| i.contains("<span class=\"who\">a1 r")), "{items:?}");
    // The markup in a line is text: escaped in the DOM, not an element, never run.
    assert!(items[1].contains("loss &lt;b&gt;x&lt;/b&gt; &amp; &lt;img src=x"), "{}", items[1]);
    assert!(!items.iter().any(|i| i.contains("<b>") || i.contains("<img")), "a log line became markup:\n{items:?}");
    assert!(!dom.contains("data-pwned"), "a log line ran:\n{dom}");
    // WARN and ERROR lines are marked; the filter offers every rank of the job.
    assert!(dom.contains("<li class=\"warn\"") && dom.contains("<li class=\"err\""), "{dom}");
    assert!(dom.contains("<option value=\"\">all</option><option value=\"0\">0</option><option value=\"1\">1</option></select>"), "{dom}");

    // The rank filter (its choice is in the address): rank 1's lines only.
    let (c, u) = (chromium.clone(), format!("{url}?rank=1"));
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&c, &u)).await.unwrap();
    let shown: Vec<String> = log_items(&dom).iter().map(|i| text_of(i).split_once(' ').unwrap().1.to_string()).collect();
    assert_eq!(shown, ["a1 r1 INFO smelt_worker::runner rank 1 starts", "a1 r1 ERROR smelt_worker::runner rank 1 failed"], "{dom}");
    assert!(dom.contains("2 lines from rank 1"), "{dom}");

    // In a real browser (Playwright, where installed): picking a rank in the filter, and lines
    // sent while the job is open appended (rank 1's only, under its filter).
    if let Some(node_modules) = playwright_or_skip(test) {
        const LATE: usize = 40;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/logs_follow.js");
        let mut child = Command::new("timeout")
            .args(["120", "node"])
            .arg(script)
            .args([format!("http://{}/", coord.addr), job.id.clone(), "4".into(), "2".into(), LATE.to_string()])
            .env("NODE_PATH", node_modules)
            .env("SMELT_CHROMIUM", &chromium)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run node");
        let stdout = child.stdout.take().unwrap();
        let (ready, stdout) = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut stdout = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let ready = stdout.read_line(&mut line).is_ok() && line.trim() == "ready";
            (ready, stdout)
        })
        .await
        .unwrap();
        if ready {
            let late: Vec<LogLine> = (1..=LATE).map(|k| log_line(LOGGED_AT + 100 + k as i64, "INFO", &format!("late line {k}"))).collect();
            send_logs(&coord, &w1, &a1, late, 4 + LATE).await;
            send_logs(&coord, &w0, &a0, vec![log_line(LOGGED_AT + 200, "INFO", "rank 0 late")], 5 + LATE).await;
        }
        let out = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut said = String::new();
            let mut stdout = stdout;
            stdout.read_to_string(&mut said).unwrap();
            let out = child.wait_with_output().unwrap();
            (out.status, said + &String::from_utf8_lossy(&out.stderr))
        })
        .await
        .unwrap();
        assert!(ready && out.0.success(), "the logs panel in the browser: {}", out.1);
    }
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logs_api_reads_tail_zero_as_no_lines_and_refuses_unknown_parameters() {
    let (_d, db) = tmp();
    let coord = start(&db).await;
    let mut jobs = coord.jobs().await;
    let job = submit(&mut jobs, &spec("tail", 1, 0, 0)).await;
    let mut w = Worker::join(&coord.url, "127.0.0.1:9001").await;
    let a = w.assignment().await;
    let lines = (0..5).map(|k| log_line(LOGGED_AT + k, "INFO", &format!("line {k}"))).collect();
    send_logs(&coord, &w, &a, lines, 5).await;
    let logs = |q: &str| format!("/api/jobs/{}/logs?{q}", job.id);
    let texts = |r: &http::Reply| -> Vec<String> {
        r.json()["lines"].as_array().unwrap().iter().map(|l| l["text"].as_str().unwrap().to_string()).collect()
    };
    let two = http::get(coord.addr, &logs("tail=2"), None).await;
    assert_eq!(texts(&two), ["line 3", "line 4"], "{}", two.body);
    // `tail=0` is none, as `smelt jobs logs --tail 0`, with where the log ends to read on from
    let none = http::get(coord.addr, &logs("tail=0"), None).await;
    assert_eq!(none.status, 200, "{}", none.body);
    assert!(texts(&none).is_empty(), "{}", none.body);
    assert_eq!(none.json()["next"], two.json()["next"], "{}", none.body);
    assert_eq!(none.json()["more"], false, "{}", none.body);
    // a misspelt parameter is an error naming it, not the default silently
    for (q, word) in [("logs?tale=2", "tale"), ("metrics?maxpoints=6", "maxpoints")] {
        let r = http::get(coord.addr, &format!("/api/jobs/{}/{q}", job.id), None).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert!(r.json()["error"].as_str().unwrap().contains(&format!("unknown field `{word}`")), "{q}: {}", r.body);
    }
    coord.stop().await;
}
