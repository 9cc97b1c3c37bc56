//! The SQLite schema of the coordinator's store, versioned: `migrate` creates it in a new file
//! or brings an older file forward, one version at a time, in one transaction.

use rusqlite::{Connection, OptionalExtension};

/// Bumped by every schema change; `migrate` brings older files forward.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Version v's statements are `MIGRATIONS[v - 1]`.
const MIGRATIONS: [&str; 9] = [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7, SCHEMA_V8, SCHEMA_V9];

const SCHEMA_V1: &str = r#"
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec_toml TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    world_size INTEGER NOT NULL,
    device_class TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    restarts INTEGER NOT NULL,
    max_restarts INTEGER NOT NULL,
    total_steps INTEGER NOT NULL,
    last_step INTEGER NOT NULL,
    last_loss REAL NOT NULL,
    last_val_loss REAL,
    error TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    start_step INTEGER NOT NULL,
    resume_from TEXT NOT NULL
);
CREATE INDEX jobs_by_state ON jobs(state);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    device_class TEXT NOT NULL,
    device_index INTEGER NOT NULL,
    data_addr TEXT NOT NULL,
    state TEXT NOT NULL,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE assignments (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt, rank)
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    json TEXT NOT NULL
);
CREATE INDEX events_by_job ON events(job_id, id);
CREATE TABLE metrics (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    step INTEGER NOT NULL,
    loss REAL NOT NULL,
    val_loss REAL,
    grad_norm REAL NOT NULL,
    lr REAL NOT NULL,
    tokens_per_s REAL NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX metrics_by_job ON metrics(job_id, step);
CREATE TABLE checkpoints (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    uri TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, step)
);
"#;

/// Version 2: validation accuracy of classification fine-tuning jobs.
const SCHEMA_V2: &str = r#"
ALTER TABLE jobs ADD COLUMN last_val_accuracy REAL;
ALTER TABLE metrics ADD COLUMN val_accuracy REAL;
"#;

/// Version 3: model FLOPs utilization of GPU steps (the dashboard plots it).
const SCHEMA_V3: &str = r#"
ALTER TABLE metrics ADD COLUMN mfu REAL;
"#;

/// Version 4: each source's validation loss of a data mixture, one row per evaluation and
/// source (beside the step's row in `metrics`), and the job's last ones (a JSON array of
/// `{"name", "loss"}`, for the job's summary and `/metrics` after a restart). A loss may be
/// NULL: SQLite stores a NaN so, and a diverged source's evaluation is still recorded.
const SCHEMA_V4: &str = r#"
CREATE TABLE metric_sources (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    step INTEGER NOT NULL,
    source TEXT NOT NULL,
    loss REAL,
    PRIMARY KEY (job_id, attempt, step, source)
);
ALTER TABLE jobs ADD COLUMN last_val_sources TEXT NOT NULL DEFAULT '[]';
"#;

/// Version 5: the log lines a job's workers send (`crate::job_logs`).
const SCHEMA_V5: &str = crate::job_logs::SCHEMA;

/// Version 6: whether a job's current attempt was backfilled (placed behind a queue head that
/// could not start; it yields its workers to any job ahead of it, `crate::backfill`).
const SCHEMA_V6: &str = r#"
ALTER TABLE jobs ADD COLUMN backfilled INTEGER NOT NULL DEFAULT 0;
"#;

/// Version 7: each worker's highest log batch number stored (`crate::job_logs`).
const SCHEMA_V7: &str = crate::job_logs::SCHEMA_STREAMS;

/// Version 8: where a finished job's final weights were saved (the root its rank 0 reported:
/// `<root>/jobs/<job>/model.safetensors`), so a later job's `init_from` naming it finds them.
const SCHEMA_V8: &str = r#"
ALTER TABLE jobs ADD COLUMN final_models TEXT NOT NULL DEFAULT '';
"#;

/// Version 9: whether a lost worker had drained first (SIGTERM): shown as exited, not lost, also
/// after a coordinator restart.
const SCHEMA_V9: &str = r#"
ALTER TABLE workers ADD COLUMN drained INTEGER NOT NULL DEFAULT 0;
"#;

/// Creates the schema in a new file, or brings an older one to `SCHEMA_VERSION`.
pub fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let found: Option<i64> =
        tx.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0)).optional()?.flatten();
    let mut version = found.unwrap_or(0);
    if version > SCHEMA_VERSION {
        anyhow::bail!(
            "database schema version {version} is newer than this coordinator's ({SCHEMA_VERSION}); upgrade smelt"
        );
    }
    // each version's statements, in order, from the first the file lacks (a later version:
    // one more entry here, SCHEMA_VERSION one higher)
    for (v, sql) in (1..).zip(MIGRATIONS) {
        if version < v {
            tx.execute_batch(sql)?;
            version = v;
        }
    }
    tx.execute("DELETE FROM schema_version", [])?;
    tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [version])?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MetricRow, Op, SourceLossRow, Store};

    #[test]
    fn a_version_1_file_is_migrated_keeping_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smelt.db");
        {
            // A file as the version-1 coordinator left it, with one job and one metric.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
                 INSERT INTO jobs VALUES ('job-000001', 'n', 's', 'running', 0, 1, 'cpu', 1, 0, 0, 10, 4, 2.5, 2.75, '', 1, 2, 0, '');
                 INSERT INTO metrics VALUES ('job-000001', 1, 4, 2.5, NULL, 0.5, 0.001, 10.0, 3);",
            )
            .unwrap();
        }
        let (store, loaded) = Store::open(&path).unwrap();
        assert_eq!(loaded.jobs.len(), 1);
        assert_eq!((loaded.jobs[0].last_step, loaded.jobs[0].last_val_loss, loaded.jobs[0].last_val_accuracy), (4, Some(2.75), None));
        store.close();
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let (acc, mfu): (Option<f64>, Option<f64>) =
            conn.query_row("SELECT val_accuracy, mfu FROM metrics", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((acc, mfu), (None, None));
    }

    #[tokio::test]
    async fn a_version_3_file_gains_the_per_source_losses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smelt.db");
        {
            // A file as the version-3 coordinator left it: a mixture job evaluated once.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!("{SCHEMA_V1}{SCHEMA_V2}{SCHEMA_V3}")).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (3);
                 INSERT INTO jobs VALUES ('job-000001', 'n', 's', 'running', 0, 1, 'cpu', 1, 0, 0, 10, 4, 2.5, 2.75, '', 1, 2, 0, '', NULL);
                 INSERT INTO metrics VALUES ('job-000001', 1, 4, 2.5, 2.75, 0.5, 0.001, 10.0, 3, NULL, NULL);",
            )
            .unwrap();
        }
        let (store, loaded) = Store::open(&path).unwrap();
        assert_eq!((loaded.jobs[0].last_step, loaded.jobs[0].last_val_loss), (4, Some(2.75)));
        assert!(loaded.jobs[0].last_val_sources.is_empty(), "{:?}", loaded.jobs[0].last_val_sources);
        // The migrated file takes a mixture's evaluation.
        let web = SourceLossRow { name: "s3://b/web".into(), loss: 2.5 };
        let mut job = loaded.jobs[0].clone();
        job.last_val_sources = vec![web.clone()];
        let h = store.handle();
        h.write(Op::Job(job));
        h.write(Op::Metric(MetricRow {
            job_id: "job-000001".into(),
            attempt: 1,
            step: 8,
            loss: 2.4,
            val_loss: Some(2.5),
            val_accuracy: None,
            grad_norm: 0.5,
            lr: 1e-3,
            tokens_per_s: 10.0,
            mfu: None,
            at_ms: 4,
            val_sources: vec![web.clone()],
        }));
        h.flush().await.unwrap();
        store.close();
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let row: (i64, String, f64) =
            conn.query_row("SELECT step, source, loss FROM metric_sources", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
        assert_eq!(row, (8, "s3://b/web".to_string(), 2.5));
        drop(conn);
        let (store, loaded) = Store::open(&path).unwrap();
        assert_eq!(loaded.jobs[0].last_val_sources, [web]);
        store.close();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smelt.db");
        Store::open(&path).unwrap().0.close();
        Connection::open(&path).unwrap().execute("UPDATE schema_version SET version = 99", []).unwrap();
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(e.contains("schema version 99 is newer"), "{e}");
    }
}
