//! The log lines a job's workers send (`LogBatch` on the heartbeat stream), kept in the
//! coordinator's SQLite file beside the job: what `smelt jobs logs` and the dashboard show, so a
//! user reads every rank's output in one place, even from a worker that has since died.
//!
//! Writes go through the store's thread (`Op::Logs`), which also bounds each job to
//! [`MAX_LINES_PER_JOB`] lines by deleting its oldest; reads open the file read-only, as the
//! dashboard's history does.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, Transaction};
use serde::Serialize;
use smelt_proto::v1::{JobLogLine, LogBatch};

/// Lines kept per job; beyond it the oldest go (a long run's first lines are the least needed).
pub const MAX_LINES_PER_JOB: u64 = 200_000;

/// Most lines one read returns.
pub const MAX_READ: u32 = 5_000;

/// Most bytes of text one read returns (a gRPC answer must stay under 4 MiB).
pub const MAX_READ_BYTES: usize = 2 * 1024 * 1024;

/// Longest text kept of one line (a pathological line must not bloat the file).
const MAX_TEXT: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogRow {
    /// The row id: increasing over the whole file (0 before it is stored).
    pub seq: u64,
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
    pub worker_id: String,
    pub at_ms: i64,
    pub level: String,
    pub target: String,
    pub text: String,
}

impl LogRow {
    pub fn to_proto(&self) -> JobLogLine {
        JobLogLine {
            seq: self.seq,
            attempt: self.attempt,
            rank: self.rank,
            worker_id: self.worker_id.clone(),
            at_ms: self.at_ms,
            level: self.level.clone(),
            target: self.target.clone(),
            text: self.text.clone(),
        }
    }
}

/// A worker's batch as rows; lines the worker dropped become one line saying so, first.
pub fn rows_of(worker_id: &str, b: LogBatch, now_ms: i64) -> Vec<LogRow> {
    let row = |at_ms: i64, level: String, target: String, mut text: String| {
        if text.len() > MAX_TEXT {
            let mut cut = MAX_TEXT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(" [truncated]");
        }
        LogRow { seq: 0, job_id: b.job_id.clone(), attempt: b.attempt, rank: b.rank, worker_id: worker_id.to_string(), at_ms, level, target, text }
    };
    let mut out = Vec::with_capacity(b.lines.len() + 1);
    if b.dropped > 0 {
        let at = b.lines.first().map_or(now_ms, |l| l.at_ms);
        let text = format!("{} log lines dropped by the worker here (its buffer filled while the coordinator was unreachable)", b.dropped);
        out.push(row(at, "WARN".into(), "smelt_coordinator::job_logs".into(), text));
    }
    for l in &b.lines {
        out.push(row(l.at_ms, l.level.clone(), l.target.clone(), l.text.clone()));
    }
    out
}

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE job_logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    level TEXT NOT NULL,
    target TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX job_logs_by_job ON job_logs(job_id, seq);
"#;

/// Schema version 7: each worker's highest log batch number stored, written in the transaction
/// that stores the batch's lines, so a batch the worker sends again after a lost acknowledgement
/// (its stream broke, or the coordinator restarted) is recognised and not stored twice.
pub(crate) const SCHEMA_STREAMS: &str = r#"
CREATE TABLE log_streams (
    worker_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
"#;

/// Each worker's highest log batch number stored (read at open).
pub fn received(conn: &Connection) -> rusqlite::Result<HashMap<String, u64>> {
    let mut st = conn.prepare("SELECT worker_id, seq FROM log_streams")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
    rows.collect()
}

/// The store thread's count of each job's stored lines (read from the file the first time a job
/// is written in this process), so that trimming costs a query only when a job is over its cap.
#[derive(Default)]
pub struct LineCounts {
    counts: HashMap<String, u64>,
    cap: Option<u64>,
}

impl LineCounts {
    /// After a transaction that did not commit: the counts may be ahead of the file, so every
    /// job is counted again from the file on its next write.
    pub fn forget(&mut self) {
        self.counts.clear();
    }

    /// Another cap than [`MAX_LINES_PER_JOB`] (tests).
    pub fn with_cap(cap: u64) -> Self {
        LineCounts { counts: HashMap::new(), cap: Some(cap) }
    }
}

/// Inserts `rows` (one job's, of worker `worker_id`'s batch number `seq`) and deletes the job's
/// oldest lines beyond the cap; records `seq` as the worker's highest stored (unless 0). The cap
/// is let overshoot by a tenth before a trim, so a steady stream trims once per tenth, not per
/// batch.
pub fn insert(tx: &Transaction, worker_id: &str, seq: u64, rows: &[LogRow], counts: &mut LineCounts) -> rusqlite::Result<()> {
    // all of the batch or none of it: the store commits its transaction even when one write in
    // it failed, and a number stored without its lines would refuse them when sent again
    tx.execute_batch("SAVEPOINT log_batch")?;
    match insert_batch(tx, worker_id, seq, rows, counts) {
        Ok(()) => tx.execute_batch("RELEASE log_batch"),
        Err(e) => {
            let _ = tx.execute_batch("ROLLBACK TO log_batch; RELEASE log_batch");
            Err(e)
        }
    }
}

fn insert_batch(tx: &Transaction, worker_id: &str, seq: u64, rows: &[LogRow], counts: &mut LineCounts) -> rusqlite::Result<()> {
    if seq > 0 {
        tx.prepare_cached("INSERT INTO log_streams (worker_id, seq) VALUES (?1, ?2) ON CONFLICT(worker_id) DO UPDATE SET seq = MAX(seq, excluded.seq)")?
            .execute(params![worker_id, seq as i64])?;
    }
    let Some(first) = rows.first() else { return Ok(()) };
    let mut st = tx.prepare_cached(
        "INSERT INTO job_logs (job_id, attempt, rank, worker_id, at_ms, level, target, text) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for r in rows {
        st.execute(params![r.job_id, r.attempt, r.rank, r.worker_id, r.at_ms, r.level, r.target, r.text])?;
    }
    let cap = counts.cap.unwrap_or(MAX_LINES_PER_JOB);
    let job = &first.job_id;
    let n = match counts.counts.get(job) {
        Some(n) => n + rows.len() as u64,
        None => tx.query_row("SELECT COUNT(*) FROM job_logs WHERE job_id = ?1", [job], |r| r.get::<_, i64>(0))? as u64,
    };
    let n = if n > cap + cap / 10 {
        tx.prepare_cached("DELETE FROM job_logs WHERE seq IN (SELECT seq FROM job_logs WHERE job_id = ?1 ORDER BY seq LIMIT ?2)")?
            .execute(params![job, (n - cap) as i64])?;
        cap
    } else {
        n
    };
    counts.counts.insert(job.clone(), n);
    Ok(())
}

/// What to read of a job's lines.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogQuery {
    /// Lines after this seq.
    pub after: u64,
    /// At most this many (0 or above [`MAX_READ`]: [`MAX_READ`]).
    pub limit: u32,
    pub attempt: Option<u32>,
    pub rank: Option<u32>,
    /// The last `tail` lines instead of the first after `after`.
    pub tail: u32,
    /// Only lines at this level or above.
    pub min_level: Level,
}

/// A stored line's level, ordered by severity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    #[default]
    Info = 1,
    Warn = 2,
    Error = 3,
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "" | "info" => Ok(Level::Info),
            "warn" | "warning" => Ok(Level::Warn),
            "error" => Ok(Level::Error),
            other => Err(format!("log level {other:?}: info, warn or error")),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LogPage {
    pub lines: Vec<LogRow>,
    /// The last line's seq (`after` when none): where the next read starts.
    pub next: u64,
    /// More lines matched than this page holds (its line or byte limit): read on from `next`.
    pub more: bool,
}

/// A job's lines, oldest first, from the file read-only (beside the writer, in WAL mode; the
/// newest batch may not be committed yet).
pub fn read(db: &Path, job_id: &str, q: &LogQuery) -> rusqlite::Result<LogPage> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(2))?;
    let limit = if q.tail > 0 { q.tail } else { q.limit };
    let limit = if limit == 0 || limit > MAX_READ { MAX_READ } else { limit };
    let order = if q.tail > 0 { "DESC" } else { "ASC" };
    let mut st = conn.prepare(&format!(
        "SELECT seq, attempt, rank, worker_id, at_ms, level, target, text FROM job_logs
         WHERE job_id = ?1 AND seq > ?2 AND (?3 IS NULL OR attempt = ?3) AND (?4 IS NULL OR rank = ?4)
           AND (CASE level WHEN 'ERROR' THEN 3 WHEN 'WARN' THEN 2 ELSE 1 END) >= ?6
         ORDER BY seq {order} LIMIT ?5"
    ))?;
    // one more than the limit: whether more lines match
    let rows = st
        .query_map(params![job_id, q.after as i64, q.attempt, q.rank, limit + 1, q.min_level as i64], |r| {
            Ok(LogRow {
                seq: r.get::<_, i64>(0)? as u64,
                job_id: job_id.to_string(),
                attempt: r.get(1)?,
                rank: r.get(2)?,
                worker_id: r.get(3)?,
                at_ms: r.get(4)?,
                level: r.get(5)?,
                target: r.get(6)?,
                text: r.get(7)?,
            })
        })?;
    let (mut lines, mut bytes, mut more) = (Vec::new(), 0usize, false);
    for r in rows {
        let r = r?;
        bytes += r.text.len() + r.target.len() + r.worker_id.len() + 64;
        // the first line always fits (one line is at most 16 KiB)
        if lines.len() == limit as usize || (bytes > MAX_READ_BYTES && !lines.is_empty()) {
            more = true;
            break;
        }
        lines.push(r);
    }
    if q.tail > 0 {
        // the newest lines that fit, oldest first
        lines.reverse();
    }
    let next = lines.last().map_or(q.after, |l| l.seq);
    Ok(LogPage { lines, next, more })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Op, Store};
    use smelt_proto::v1::LogLine;

    fn batch(job: &str, attempt: u32, rank: u32, texts: &[&str], dropped: u64) -> LogBatch {
        let lines = texts.iter().enumerate().map(|(i, t)| LogLine { at_ms: 1000 + i as i64, level: "INFO".into(), target: "smelt_worker::runner".into(), text: t.to_string() }).collect();
        LogBatch { job_id: job.into(), attempt, rank, lines, dropped, seq: 0 }
    }

    fn logs_op(worker: &str, b: LogBatch) -> Op {
        Op::Logs { worker_id: worker.into(), seq: b.seq, rows: rows_of(worker, b, 0) }
    }

    fn texts(p: &LogPage) -> Vec<String> {
        p.lines.iter().map(|l| l.text.clone()).collect()
    }

    #[tokio::test]
    async fn lines_are_stored_in_order_and_read_by_job_attempt_rank_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smelt.db");
        let (store, _) = Store::open(&path).unwrap();
        let h = store.handle();
        h.write(logs_op("w-1", batch("job-000001", 1, 0, &["a0", "a1"], 0)));
        h.write(logs_op("w-2", batch("job-000001", 1, 1, &["b0"], 0)));
        h.write(logs_op("w-9", batch("job-000002", 1, 0, &["other job"], 0)));
        h.write(logs_op("w-1", batch("job-000001", 2, 0, &["c0", "c1", "c2"], 3)));
        h.flush().await.unwrap();

        let all = read(&path, "job-000001", &LogQuery::default()).unwrap();
        assert_eq!(texts(&all)[..3], ["a0", "a1", "b0"]);
        assert!(all.lines[3].text.starts_with("3 log lines dropped") && all.lines[3].level == "WARN", "{:?}", all.lines[3]);
        assert_eq!(texts(&all)[4..], ["c0", "c1", "c2"]);
        assert_eq!((all.lines[2].worker_id.as_str(), all.lines[2].rank, all.lines[4].attempt), ("w-2", 1, 2));
        assert_eq!(all.next, all.lines.last().unwrap().seq);

        // following: after a seq, with a limit, then nothing new (next stays)
        let first = read(&path, "job-000001", &LogQuery { limit: 2, ..Default::default() }).unwrap();
        assert_eq!(texts(&first), ["a0", "a1"]);
        let rest = read(&path, "job-000001", &LogQuery { after: first.next, ..Default::default() }).unwrap();
        assert_eq!(rest.lines.len(), 5);
        let none = read(&path, "job-000001", &LogQuery { after: rest.next, ..Default::default() }).unwrap();
        assert!(none.lines.is_empty());
        assert_eq!(none.next, rest.next);

        let rank1 = read(&path, "job-000001", &LogQuery { rank: Some(1), ..Default::default() }).unwrap();
        assert_eq!(texts(&rank1), ["b0"]);
        let attempt2 = read(&path, "job-000001", &LogQuery { attempt: Some(2), rank: Some(0), ..Default::default() }).unwrap();
        assert_eq!(attempt2.lines.len(), 4);
        let tail = read(&path, "job-000001", &LogQuery { tail: 2, ..Default::default() }).unwrap();
        assert_eq!(texts(&tail), ["c1", "c2"]);
        // by level: the dropped-lines notice is the one WARN line; nothing is ERROR
        let warn = read(&path, "job-000001", &LogQuery { min_level: Level::Warn, ..Default::default() }).unwrap();
        assert_eq!(warn.lines.len(), 1);
        assert!(warn.lines[0].text.starts_with("3 log lines dropped"));
        assert!(read(&path, "job-000001", &LogQuery { min_level: Level::Error, ..Default::default() }).unwrap().lines.is_empty());
        assert_eq!(("WARN".parse::<Level>(), "".parse::<Level>()), (Ok(Level::Warn), Ok(Level::Info)));
        assert!("debug".parse::<Level>().unwrap_err().contains("info, warn or error"));
        assert_eq!(texts(&read(&path, "job-000002", &LogQuery::default()).unwrap()), ["other job"]);
        assert!(read(&path, "job-000404", &LogQuery::default()).unwrap().lines.is_empty());
        store.close();
    }

    #[test]
    fn a_job_keeps_its_newest_lines_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smelt.db");
        let mut conn = Connection::open(&path).unwrap();
        crate::schema::migrate(&mut conn).unwrap();
        let mut counts = LineCounts::with_cap(100);
        for i in 0..30 {
            let texts: Vec<String> = (0..10).map(|k| format!("line {}", i * 10 + k)).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let tx = conn.transaction().unwrap();
            insert(&tx, "w-1", 0, &rows_of("w-1", batch("job-000001", 1, 0, &refs, 0), 0), &mut counts).unwrap();
            insert(&tx, "w-1", 0, &rows_of("w-1", batch("job-000002", 1, 0, &["small"], 0), 0), &mut counts).unwrap();
            tx.commit().unwrap();
            let n: i64 = conn.query_row("SELECT COUNT(*) FROM job_logs WHERE job_id = 'job-000001'", [], |r| r.get(0)).unwrap();
            assert!(n as u64 <= 110, "over the cap and its slack after batch {i}: {n}");
        }
        drop(conn);
        let page = read(&path, "job-000001", &LogQuery::default()).unwrap();
        assert!((100..=110).contains(&page.lines.len()), "{}", page.lines.len());
        assert_eq!(page.lines.last().unwrap().text, "line 299", "the newest lines are kept");
        let first: u32 = page.lines[0].text.trim_start_matches("line ").parse().unwrap();
        assert_eq!(first as usize, 300 - page.lines.len(), "the kept lines are the newest, with no gap");
        assert_eq!(read(&path, "job-000002", &LogQuery::default()).unwrap().lines.len(), 30, "another job's lines are untouched");

        // a store thread that starts over counts what the file holds
        let mut conn = Connection::open(&path).unwrap();
        let mut fresh = LineCounts::with_cap(100);
        let tx = conn.transaction().unwrap();
        let more: Vec<String> = (0..20).map(|k| format!("more {k}")).collect();
        insert(&tx, "w-1", 0, &rows_of("w-1", batch("job-000001", 1, 0, &more.iter().map(String::as_str).collect::<Vec<_>>(), 0), 0), &mut fresh).unwrap();
        tx.commit().unwrap();
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM job_logs WHERE job_id = 'job-000001'", [], |r| r.get(0)).unwrap();
        assert!((100..=110).contains(&(n as u64)), "{n}");
    }

    #[test]
    fn a_batch_whose_lines_cannot_be_written_leaves_no_number_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("smelt.db")).unwrap();
        crate::schema::migrate(&mut conn).unwrap();
        let mut counts = LineCounts::default();
        let tx = conn.transaction().unwrap();
        insert(&tx, "w-1", 1, &rows_of("w-1", batch("job-000001", 1, 0, &["kept"], 0), 0), &mut counts).unwrap();
        tx.commit().unwrap();
        // the lines' table gone: batch 2 fails, and its number must not be stored without them
        // (the same transaction goes on to commit, as the store's does)
        conn.execute_batch("ALTER TABLE job_logs RENAME TO job_logs_away").unwrap();
        let tx = conn.transaction().unwrap();
        assert!(insert(&tx, "w-1", 2, &rows_of("w-1", batch("job-000001", 1, 0, &["lost"], 0), 0), &mut counts).is_err());
        tx.commit().unwrap();
        assert_eq!(received(&conn).unwrap(), HashMap::from([("w-1".to_string(), 1)]));
        let other = Connection::open(dir.path().join("smelt.db")).unwrap();
        other.execute_batch("ALTER TABLE job_logs_away RENAME TO job_logs").unwrap();
        let tx = conn.transaction().unwrap();
        insert(&tx, "w-1", 2, &rows_of("w-1", batch("job-000001", 1, 0, &["back"], 0), 0), &mut counts).unwrap();
        tx.commit().unwrap();
        assert_eq!(received(&conn).unwrap(), HashMap::from([("w-1".to_string(), 2)]));
    }

    #[tokio::test]
    async fn a_page_stays_under_its_byte_budget_and_says_there_is_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smelt.db");
        let (store, _) = Store::open(&path).unwrap();
        let big = "y".repeat(15_000);
        let texts: Vec<&str> = vec![big.as_str(); 400]; // about 6 MB
        store.handle().write(logs_op("w-1", batch("job-000001", 1, 0, &texts, 0)));
        store.handle().flush().await.unwrap();
        let (mut after, mut total, mut pages) = (0, 0, 0);
        loop {
            let page = read(&path, "job-000001", &LogQuery { after, ..Default::default() }).unwrap();
            let bytes: usize = page.lines.iter().map(|l| l.text.len()).sum();
            assert!(bytes <= MAX_READ_BYTES, "{bytes}");
            total += page.lines.len();
            pages += 1;
            after = page.next;
            if !page.more {
                break;
            }
        }
        assert_eq!((total, pages), (400, 3));
        // a tail under the budget: the newest that fit, in order, and more before them
        let tail = read(&path, "job-000001", &LogQuery { tail: 400, ..Default::default() }).unwrap();
        assert!(tail.more && tail.lines.len() < 400 && tail.lines.windows(2).all(|w| w[0].seq < w[1].seq));
        let all = read(&path, "job-000001", &LogQuery { limit: 500, ..Default::default() }).unwrap();
        assert_eq!(all.lines.len(), tail.lines.len(), "a first page and a tail hold as many lines");
        // the line limit says more too
        let two = read(&path, "job-000001", &LogQuery { limit: 2, ..Default::default() }).unwrap();
        assert!(two.more && two.lines.len() == 2);
        let last = read(&path, "job-000001", &LogQuery { after: tail.lines[tail.lines.len() - 2].seq, ..Default::default() }).unwrap();
        assert!(!last.more && last.lines.len() == 1);
        store.close();
    }

    #[test]
    fn a_huge_line_is_cut_at_a_character_boundary() {
        let mut b = batch("job-000001", 1, 0, &[], 0);
        b.lines.push(LogLine { at_ms: 1, level: "INFO".into(), target: "t".into(), text: "é".repeat(MAX_TEXT) });
        let rows = rows_of("w-1", b, 0);
        assert!(rows[0].text.len() <= MAX_TEXT + 20 && rows[0].text.ends_with(" [truncated]"), "{}", rows[0].text.len());
    }
}
