//! The store's thread: applies the queued writes (`Op`) in one transaction per burst, answers
//! flushes once what came before them is committed, and tells which workers' log batches failed
//! to be stored (`StoreHandle::take_log_failure`).

use std::collections::HashSet;
use std::sync::{mpsc, Arc, Mutex};

use rusqlite::{params, Connection, Transaction};
use tracing::{debug, error};

use crate::job_logs::LineCounts;
use crate::state::{device_class_name, job_state_name, worker_state_name};
use crate::store::{sources_to_json, Cmd, Op};

/// Largest number of queued writes applied in one transaction.
const MAX_BATCH: usize = 4096;

fn apply(tx: &Transaction, op: &Op, log_lines: &mut LineCounts) -> rusqlite::Result<()> {
    match op {
        Op::Job(j) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO jobs (id, name, spec_toml, state, priority, world_size, device_class, attempt,
                    restarts, max_restarts, total_steps, last_step, last_loss, last_val_loss, error, created_at_ms,
                    updated_at_ms, start_step, resume_from, last_val_accuracy, last_val_sources, backfilled, final_models)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            )?
            .execute(params![
                j.id,
                j.name,
                j.spec_toml,
                job_state_name(j.state),
                j.priority,
                j.world_size,
                device_class_name(j.device_class),
                j.attempt,
                j.restarts,
                j.max_restarts,
                j.total_steps as i64,
                j.last_step as i64,
                j.last_loss as f64,
                j.last_val_loss.map(|v| v as f64),
                j.error,
                j.created_at_ms,
                j.updated_at_ms,
                j.start_step as i64,
                j.resume_from,
                j.last_val_accuracy.map(|v| v as f64),
                sources_to_json(&j.last_val_sources),
                j.backfilled,
                j.final_models,
            ])?;
        }
        Op::Worker(w) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO workers (id, hostname, device_class, device_index, data_addr, state, job_id,
                    attempt, rank, last_seen_ms, drained)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                w.id,
                w.hostname,
                device_class_name(w.device_class),
                w.device_index,
                w.data_addr,
                worker_state_name(w.state),
                w.job_id,
                w.attempt,
                w.rank,
                w.last_seen_ms,
                w.drained,
            ])?;
        }
        Op::Assignment(a) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO assignments (job_id, attempt, rank, worker_id, state) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![a.job_id, a.attempt, a.rank, a.worker_id, a.state])?;
        }
        Op::Event(e) => {
            tx.prepare_cached("INSERT INTO events (job_id, at_ms, kind, json) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![e.job_id, e.at_ms, e.kind, e.json])?;
        }
        Op::Metric(m) => {
            tx.prepare_cached(
                "INSERT INTO metrics (job_id, attempt, step, loss, val_loss, grad_norm, lr, tokens_per_s, at_ms, val_accuracy, mfu)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                m.job_id,
                m.attempt,
                m.step as i64,
                m.loss as f64,
                m.val_loss.map(|v| v as f64),
                m.grad_norm as f64,
                m.lr as f64,
                m.tokens_per_s,
                m.at_ms,
                m.val_accuracy.map(|v| v as f64),
                m.mfu.map(|v| v as f64),
            ])?;
            for src in &m.val_sources {
                // OR REPLACE: a step reported twice (by one attempt) keeps its newest losses
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO metric_sources (job_id, attempt, step, source, loss) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![m.job_id, m.attempt, m.step as i64, src.name, src.loss as f64])?;
            }
        }
        Op::Checkpoint(c) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO checkpoints (job_id, step, uri, manifest_sha256, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![c.job_id, c.step as i64, c.uri, c.manifest_sha256, c.at_ms])?;
        }
        Op::Logs { worker_id, seq, rows } => crate::job_logs::insert(tx, worker_id, *seq, rows, log_lines)?,
    }
    Ok(())
}

pub(crate) fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Cmd>, log_failures: Arc<Mutex<HashSet<String>>>) {
    let flag = |worker: &str| {
        log_failures.lock().unwrap_or_else(|p| p.into_inner()).insert(worker.to_string());
    };
    let mut stop = false;
    let mut log_lines = LineCounts::default();
    while !stop {
        let Ok(first) = rx.recv() else { break };
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(c) = next.take() {
            if matches!(c, Cmd::Stop) {
                stop = true;
                break;
            }
            batch.push(c);
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut flushes = Vec::new();
        let mut failure: Option<String> = None;
        let n = batch.len();
        match conn.transaction() {
            Ok(tx) => {
                // the workers whose log lines this transaction holds
                let mut logs_of: Vec<String> = Vec::new();
                // SQLite rolled the whole transaction back after an error (a full disk, an I/O
                // error): what follows would commit piecemeal in autocommit mode, so it is not
                // applied, and everything in the batch counts as failed
                let mut aborted = false;
                for cmd in batch {
                    match cmd {
                        Cmd::Op(op) => {
                            let logs_worker = match &op {
                                Op::Logs { worker_id, .. } => Some(worker_id.clone()),
                                _ => None,
                            };
                            if aborted {
                                if let Some(w) = logs_worker {
                                    flag(&w);
                                }
                                continue;
                            }
                            match apply(&tx, &op, &mut log_lines) {
                                Ok(()) => logs_of.extend(logs_worker),
                                Err(e) => {
                                    error!(error = %e, "store write failed");
                                    failure = Some(e.to_string());
                                    if let Some(w) = logs_worker {
                                        flag(&w);
                                    }
                                    if tx.is_autocommit() {
                                        aborted = true;
                                        logs_of.iter().for_each(|w| flag(w));
                                    }
                                }
                            }
                        }
                        Cmd::Flush(s) => flushes.push(s),
                        Cmd::Stop => {}
                    }
                }
                if let Err(e) = tx.commit() {
                    error!(error = %e, "store commit failed");
                    failure = Some(e.to_string());
                    logs_of.iter().for_each(|w| flag(w));
                }
                if failure.is_some() {
                    log_lines.forget();
                }
            }
            Err(e) => {
                error!(error = %e, "store transaction failed to start");
                failure = Some(e.to_string());
                flushes.extend(batch.into_iter().filter_map(|c| match c {
                    Cmd::Flush(s) => Some(s),
                    Cmd::Op(_) | Cmd::Stop => None,
                }));
            }
        }
        debug!(ops = n, "store batch committed");
        for f in flushes {
            let _ = f.send(match &failure {
                None => Ok(()),
                Some(e) => Err(e.clone()),
            });
        }
    }
    debug!("store thread stopped");
}

