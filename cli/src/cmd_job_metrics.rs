//! `smelt jobs metrics ID`: a job's step metrics read from the coordinator's SQLite file
//! (read-only; a coordinator running on it is fine, WAL), so that runs can be compared from a
//! terminal or a script, also after `smelt up` has stopped its cluster with the job.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// The job.
    pub id: String,
    /// The coordinator's database file (`smelt up`'s is .smelt/coordinator.db; a coordinator's
    /// is its --db).
    #[arg(long, default_value = crate::client::DEFAULT_DATABASE)]
    pub db: PathBuf,
    /// About this many rows at most (every k-th step; evaluations and the last step kept
    /// besides); 0: every step.
    #[arg(long, default_value_t = 0)]
    pub max_points: u64,
    /// One JSON object per row (attempt, step, loss, val_loss, val_accuracy, grad_norm, lr,
    /// tokens_per_s, mfu, at_ms, val_sources).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: MetricsArgs) -> Result<()> {
    if !a.db.is_file() {
        bail!("{}: no coordinator database there (smelt up's is .smelt/coordinator.db; a coordinator's is its --db)", a.db.display());
    }
    let budget = if a.max_points == 0 { u64::MAX } else { a.max_points };
    let series = smelt_coordinator::metrics_history(&a.db, &a.id, budget).with_context(|| format!("reading {}", a.db.display()))?;
    if series.total == 0 {
        bail!("{}: no step metrics of job {} (a job that has not trained a step, or another id: `smelt jobs list`)", a.db.display(), a.id);
    }
    if a.json {
        for p in &series.points {
            println!("{}", serde_json::to_string(p)?);
        }
        return Ok(());
    }
    println!("{:>7} {:>8} {:>9} {:>9} {:>10} {:>9} {:>12}", "attempt", "step", "loss", "val_loss", "lr", "grad_norm", "tokens/s");
    for p in &series.points {
        let val = p.val_loss.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!(
            "{:>7} {:>8} {:>9.4} {:>9} {:>10.3e} {:>9.3} {:>12.0}",
            p.attempt, p.step, p.loss, val, p.lr, p.grad_norm, p.tokens_per_s
        );
    }
    if series.stride > 1 {
        eprintln!("{} of {} rows (every {}th step, evaluations and the last kept; --max-points 0 for all)", series.points.len(), series.total, series.stride);
    }
    Ok(())
}
