//! A job's history from the SQLite file: rank 0's step metrics (with a mixture's per-source
//! validation losses) and the checkpoints recorded.
//! The coordinator keeps neither in memory (a long job reports hundreds of thousands of steps),
//! so each request opens the file read-only; WAL mode lets it read beside the writer thread,
//! and it sees what the writer has committed (writes are batched, so the newest step or two may
//! not be there yet).

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;

use crate::store::{MetricRow, SourceLossRow};

/// How long a read waits for SQLite's lock (a checkpoint of the WAL) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// A job's metrics in the order they were reported, thinned to a plotting budget.
#[derive(Debug, Serialize)]
pub struct MetricSeries {
    /// Rows stored for the job.
    pub total: u64,
    /// Every `stride`-th row is kept (1: all), and the last row.
    pub stride: u64,
    /// Of the evaluation rows (validation loss or accuracy), every `eval_stride`-th is kept
    /// besides, so that sparse evaluations survive thinning; both strides bound the answer to
    /// about twice the budget.
    pub eval_stride: u64,
    pub points: Vec<MetricRow>,
}

#[derive(Debug, Serialize)]
pub struct CheckpointEntry {
    pub step: u64,
    pub uri: String,
    pub manifest_sha256: String,
    pub at_ms: i64,
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// The job's step metrics, about `max_points` of them and at most about twice that: every
/// k-th row, and every k'-th evaluation row (most jobs evaluate rarely, so all of them), and
/// the last row. A restarted job's attempts follow each other, each from the step it resumed
/// at. One read transaction, so the counts and the rows agree.
pub fn metrics(db: &Path, job_id: &str, max_points: u64) -> rusqlite::Result<MetricSeries> {
    let conn = open(db)?;
    let tx = conn.unchecked_transaction()?;
    let (total, evals): (u64, u64) = tx.query_row(
        "SELECT COUNT(*), COUNT(CASE WHEN val_loss IS NOT NULL OR val_accuracy IS NOT NULL THEN 1 END)
         FROM metrics WHERE job_id = ?1",
        [job_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let max_points = max_points.max(1);
    let stride = total.div_ceil(max_points).max(1);
    let eval_stride = evals.div_ceil(max_points).max(1);
    // Each kept evaluation row brings its sources' losses (a mixture's), so they thin with the
    // validation loss they combine into: the join yields one row per source, in the order
    // reported, and a kept row without sources once.
    let mut st = tx.prepare_cached(
        "SELECT t.attempt, t.step, t.loss, t.val_loss, t.val_accuracy, t.grad_norm, t.lr, t.tokens_per_s, t.mfu, t.at_ms,
                t.i, s.source, s.loss FROM (
             SELECT *, ROW_NUMBER() OVER (ORDER BY rowid) - 1 AS i,
                    CASE WHEN val_loss IS NOT NULL OR val_accuracy IS NOT NULL THEN
                        COUNT(CASE WHEN val_loss IS NOT NULL OR val_accuracy IS NOT NULL THEN 1 END)
                            OVER (ORDER BY rowid ROWS UNBOUNDED PRECEDING) - 1 END AS e
             FROM metrics WHERE job_id = ?1
         ) AS t
         LEFT JOIN metric_sources AS s
             ON s.job_id = ?1 AND s.attempt = t.attempt AND s.step = t.step
         WHERE t.i % ?2 = 0 OR t.i = ?3 - 1 OR t.e % ?4 = 0 ORDER BY t.i, s.rowid",
    )?;
    let mut rows = st.query(params![job_id, stride as i64, total as i64, eval_stride as i64])?;
    let mut points: Vec<MetricRow> = Vec::new();
    let mut last_i = None;
    while let Some(r) = rows.next()? {
        let i: i64 = r.get(10)?;
        if last_i != Some(i) {
            last_i = Some(i);
            points.push(MetricRow {
                job_id: job_id.to_string(),
                attempt: r.get(0)?,
                step: r.get::<_, i64>(1)? as u64,
                loss: r.get::<_, f64>(2)? as f32,
                val_loss: r.get::<_, Option<f64>>(3)?.map(|v| v as f32),
                val_accuracy: r.get::<_, Option<f64>>(4)?.map(|v| v as f32),
                grad_norm: r.get::<_, f64>(5)? as f32,
                lr: r.get::<_, f64>(6)? as f32,
                tokens_per_s: r.get(7)?,
                mfu: r.get::<_, Option<f64>>(8)?.map(|v| v as f32),
                at_ms: r.get(9)?,
                val_sources: Vec::new(),
            });
        }
        if let Some(name) = r.get::<_, Option<String>>(11)? {
            // a NaN loss was stored as NULL
            let loss = r.get::<_, Option<f64>>(12)?.map_or(f32::NAN, |v| v as f32);
            points.last_mut().expect("pushed above").val_sources.push(SourceLossRow { name, loss });
        }
    }
    drop(rows);
    drop(st);
    tx.finish()?;
    Ok(MetricSeries { total, stride, eval_stride, points })
}

/// Every checkpoint recorded for the job (its manifest landed), oldest first; retention may
/// have deleted the older ones from the store since.
pub fn checkpoints(db: &Path, job_id: &str) -> rusqlite::Result<Vec<CheckpointEntry>> {
    let conn = open(db)?;
    let mut st = conn
        .prepare_cached("SELECT step, uri, manifest_sha256, at_ms FROM checkpoints WHERE job_id = ?1 ORDER BY step")?;
    let rows = st.query_map([job_id], |r| {
        Ok(CheckpointEntry { step: r.get::<_, i64>(0)? as u64, uri: r.get(1)?, manifest_sha256: r.get(2)?, at_ms: r.get(3)? })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Op, Store};

    fn row(job: &str, attempt: u32, step: u64, val: bool) -> MetricRow {
        MetricRow {
            job_id: job.into(),
            attempt,
            step,
            loss: 10.0 - step as f32 / 100.0,
            val_loss: val.then_some(5.0),
            val_accuracy: None,
            grad_norm: 1.0,
            lr: 1e-3,
            tokens_per_s: 100.0,
            mfu: (attempt == 2).then_some(0.5),
            at_ms: step as i64,
            // a mixture's evaluations: each source's loss, the second one's naming the step
            val_sources: if val {
                vec![SourceLossRow { name: "s3://b/web".into(), loss: 4.0 }, SourceLossRow { name: "s3://b/code".into(), loss: step as f32 }]
            } else {
                Vec::new()
            },
        }
    }

    #[tokio::test]
    async fn metrics_are_thinned_keeping_evaluations_and_the_last_step() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("smelt.db");
        let (store, _) = Store::open(&db).unwrap();
        let h = store.handle();
        // Attempt 1: steps 1..=600, evaluated every 250; attempt 2 resumes at 500 and reaches 1000.
        for step in 1..=600 {
            h.write(Op::Metric(row("job-000001", 1, step, step % 250 == 0)));
        }
        for step in 501..=1000 {
            h.write(Op::Metric(row("job-000001", 2, step, step % 250 == 0)));
        }
        h.write(Op::Metric(row("job-000002", 1, 1, false)));
        h.flush().await.unwrap();

        let all = metrics(&db, "job-000001", 10_000).unwrap();
        assert_eq!((all.total, all.stride, all.points.len()), (1100, 1, 1100));
        assert_eq!((all.points[599].attempt, all.points[599].step), (1, 600));
        assert_eq!((all.points[600].attempt, all.points[600].step), (2, 501));
        assert_eq!(all.points[600].mfu, Some(0.5));
        assert_eq!(all.points[0], row("job-000001", 1, 1, false));

        let thin = metrics(&db, "job-000001", 100).unwrap();
        assert_eq!((thin.total, thin.stride, thin.eval_stride), (1100, 11, 1));
        let vals: Vec<(u32, u64)> = thin.points.iter().filter(|p| p.val_loss.is_some()).map(|p| (p.attempt, p.step)).collect();
        assert_eq!(vals, [(1, 250), (1, 500), (2, 750), (2, 1000)], "every evaluation kept");
        for p in &thin.points {
            // each kept evaluation with its own sources, in the order reported; no other row has any
            assert_eq!(p.val_sources, row("job-000001", p.attempt, p.step, p.val_loss.is_some()).val_sources, "step {}", p.step);
        }
        assert_eq!(thin.points.iter().map(|p| p.val_sources.len()).sum::<usize>(), 8);
        let last = thin.points.last().unwrap();
        assert_eq!((last.attempt, last.step), (2, 1000));
        assert!(thin.points.len() <= 100 + 5, "{}", thin.points.len());
        assert_eq!((thin.points[0].step, thin.points[1].step), (1, 12), "every 11th row from the first");

        // Evaluations thinned on their own stride when there are more than the budget: every
        // step evaluated, a budget of 3 keeps about 2 x 3 points.
        for step in 1..=30 {
            h.write(Op::Metric(row("job-000003", 1, step, true)));
        }
        h.flush().await.unwrap();
        let evals = metrics(&db, "job-000003", 3).unwrap();
        assert_eq!((evals.stride, evals.eval_stride), (10, 10));
        let steps: Vec<u64> = evals.points.iter().map(|p| p.step).collect();
        assert_eq!(steps, [1, 11, 21, 30]);
        assert!(evals.points.iter().all(|p| p.val_sources.len() == 2 && p.val_sources[1].loss == p.step as f32), "{:?}", evals.points);

        assert!(metrics(&db, "job-000009", 100).unwrap().points.is_empty());
        store.close();
    }

    #[test]
    fn a_missing_database_is_an_error_not_an_empty_history() {
        let dir = tempfile::tempdir().unwrap();
        let e = metrics(&dir.path().join("gone.db"), "job-000001", 10).unwrap_err();
        assert!(e.to_string().contains("unable to open"), "{e}");
    }
}
