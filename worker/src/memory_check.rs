//! A run that cannot fit the machine's memory fails before it allocates, saying what it needs:
//! Rust aborts the process when an allocation fails, which would take the worker with it (and
//! the worker that takes the job's next attempt after it). The estimate is a lower bound —
//! weights, gradients and AdamW's two moments in f32, and the logits of one micro-batch — so a
//! run it refuses could never have run; one it lets through may still need more.

use anyhow::{bail, Result};

/// Bytes a CPU run of a model with `params` parameters needs at least, with `logits` floats of
/// logits per micro-batch.
pub fn cpu_lower_bound(params: usize, logits: u128) -> u128 {
    (params as u128) * 4 * 4 + logits * 4
}

/// The memory this machine has available now (Linux' `MemAvailable`), in bytes; None where it
/// cannot be read.
pub fn available() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Fails, naming `what` and both amounts, when `needed` bytes exceed `available`.
pub fn check(needed: u128, available: Option<u128>, what: &str) -> Result<()> {
    match available {
        Some(have) if needed > have => bail!(
            "{what} needs at least {} of memory (weights, gradients and optimizer state in f32, and one micro-batch's logits); \
             this machine has {} available: a smaller model or micro-batch (train.micro_batch; smelt train: --batch)",
            bytes(needed),
            bytes(have)
        ),
        _ => Ok(()),
    }
}

/// [`check`] against this machine's available memory.
pub fn ensure_fits_cpu(params: usize, logits: u128, what: &str) -> Result<()> {
    check(cpu_lower_bound(params, logits), available(), what)
}

/// [`ensure_fits_cpu`] when `be` is the CPU backend; a GPU's allocation failure is already an
/// error naming it (cudarc's), and host memory is not where its model lives. `what` is built
/// only when checked.
pub fn ensure_fits<B: smelt_engine::backend::Backend>(be: &B, params: usize, logits: u128, what: impl FnOnce() -> String) -> Result<()> {
    if be.name() != "cpu" {
        return Ok(());
    }
    ensure_fits_cpu(params, logits, &what())
}

/// "3.0 TB", "512.0 MB".
fn bytes(n: u128) -> String {
    let units = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_larger_than_the_memory_is_refused_naming_both_amounts() {
        // 1e9 parameters: 16 GB of state; logits of 8 x 1024 x 50304 floats: 1.6 GB
        let need = cpu_lower_bound(1_000_000_000, 8 * 1024 * 50_304);
        assert_eq!(need, 16_000_000_000 + 8 * 1024 * 50_304 * 4);
        let e = check(need, Some(8_000_000_000), "the model").unwrap_err().to_string();
        assert!(e.contains("the model needs at least 17.6 GB") && e.contains("this machine has 8.0 GB available"), "{e}");
        assert!(check(need, Some(32_000_000_000), "the model").is_ok());
        // unknown memory: nothing refused
        assert!(check(need, None, "the model").is_ok());
        assert!(available().is_some_and(|b| b > 0), "this test runs on Linux");
    }
}
