//! cuBLASLt autotuning: on a shape's first call, time the heuristic's first few algorithms on
//! the call's own operands and keep the fastest for every later call of that shape.
//!
//! cuBLASLt's heuristic picks an algorithm from the shape alone; on the large bf16 GEMMs of a
//! training step its first choice is usually, not always, the fastest (the weight-gradient
//! GEMMs with a small output and K = B*T, split-K or not, are where it guesses). The timing
//! costs a few milliseconds per shape, once per process.
//!
//! On by default since run 16 measured it on an H200 (GPT-2 124M's step 34.9 -> 33.8 ms, bench/
//! NOTES.md); `SMELT_LT_AUTOTUNE=0` (or `CudaBackend::with_lt_autotune(false)`) turns it off,
//! `SMELT_LT_AUTOTUNE_CANDIDATES` sets how many algorithms are timed (8). It trades away one
//! property: which algorithm wins depends on timing, so two processes may pick differently for
//! a shape and differ in the last bits of their sums (a resumed run is then not bitwise the
//! uninterrupted one; the ranks of one job still hold identical weights, since they apply the
//! same averaged gradients). With it on, the plain GEMMs of the backward pass
//! also go through cuBLASLt (`LtEpilogue::Plain`) so that they are tuned too.
//!
//! The timed runs must not change what the real call computes: a call that accumulates
//! (beta = 1) or whose D is also one of its inputs writes its timed runs into a scratch D; the
//! other outputs (D of a beta = 0 call, GELU's aux, bias-gradient sums) are rewritten by the
//! real call that follows.

use std::sync::Arc;

use cudarc::driver::{sys as driver_sys, CudaStream, DevicePtr};

use cudarc::cublaslt::sys::cublasLtMatmulAlgo_t as Algo;

use super::lt::{Lt, LtArgs, LtShape, Plan};

/// Timed runs per candidate (after one untimed run).
const REPS: usize = 3;

/// What tuning found for one shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuned {
    /// Microseconds per call of the heuristic's first algorithm and of the one kept.
    pub heuristic_us: f32,
    pub best_us: f32,
    /// Whether the kept algorithm is not the heuristic's first.
    pub changed: bool,
    /// Calls of this shape since (the tuning call included).
    pub calls: u64,
}

/// Totals over the tuned shapes (`CudaBackend::lt_autotune_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AutotuneStats {
    /// Shapes timed.
    pub shapes: u64,
    /// Shapes whose fastest algorithm was not the heuristic's first.
    pub changed: u64,
    /// Microseconds the kept algorithms saved over the heuristic's, summed over every call so
    /// far (as timed when tuning): a bench divides the difference over its timed steps by their
    /// number to get the saving per step.
    pub saved_us: f64,
}

impl AutotuneStats {
    pub(crate) fn over<'a>(tuned: impl Iterator<Item = &'a Tuned>) -> AutotuneStats {
        let mut s = AutotuneStats::default();
        for t in tuned {
            s.shapes += 1;
            s.changed += t.changed as u64;
            s.saved_us += f64::from(t.heuristic_us - t.best_us) * t.calls as f64;
        }
        s
    }
}

/// Times the heuristic's `candidates` (its first choice first) for `s` on `args`' operands and
/// sets `plan.algo` to the fastest; leaves the heuristic's choice where there is one candidate or the timing fails
/// (said at debug level: tuning is an optimisation, never an error).
///
/// # Safety
/// `args` as for `Lt::matmul` on shape `s`.
pub(super) unsafe fn tune(lt: &Lt, stream: &Arc<CudaStream>, s: LtShape, plan: &mut Plan, candidates: &[Algo], args: LtArgs) {
    match time_candidates(lt, stream, s, plan, candidates, args) {
        Ok(Some(t)) => {
            tracing::info!(
                m = s.m, n = s.n, k = s.k, transa = s.transa, transb = s.transb, epilogue = ?s.epilogue,
                heuristic_us = t.heuristic_us, best_us = t.best_us, changed = t.changed,
                "cublaslt autotune"
            );
            plan.tuned = Some(t);
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(shape = ?s, error = %e, "cublaslt autotune skipped"),
    }
}

unsafe fn time_candidates(lt: &Lt, stream: &Arc<CudaStream>, s: LtShape, plan: &mut Plan, candidates: &[Algo], args: LtArgs) -> Result<Option<Tuned>, String> {
    if candidates.len() < 2 {
        return Ok(None);
    }
    // Timed runs go to a scratch D where running them in place would change the result.
    let aliased = args.c.is_some() || [args.a, args.b, args.aux].contains(&args.d);
    let scratch = if aliased {
        let bytes = s.ldd * s.n * if s.d_bf16 { 2 } else { 4 };
        // SAFETY: written by the timed runs before anything reads it; never read after.
        Some(stream.alloc::<u8>(bytes).map_err(|e| format!("scratch D of {bytes} bytes: {e:?}"))?)
    } else {
        None
    };
    let timed_args = match &scratch {
        Some(buf) => LtArgs { d: buf.device_ptr(stream).0, ..args },
        None => args,
    };
    let ctx = stream.context();
    let event = || ctx.new_event(Some(driver_sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| format!("event: {e:?}"));
    let mut times: Vec<Option<f32>> = Vec::with_capacity(candidates.len());
    for algo in candidates {
        // one untimed run (and a candidate that fails is left out)
        if lt.launch(stream, s, plan, algo, timed_args).is_err() {
            times.push(None);
            continue;
        }
        let (start, end) = (event()?, event()?);
        start.record(stream).map_err(|e| format!("record: {e:?}"))?;
        let mut ok = true;
        for _ in 0..REPS {
            ok &= lt.launch(stream, s, plan, algo, timed_args).is_ok();
        }
        end.record(stream).map_err(|e| format!("record: {e:?}"))?;
        let ms = start.elapsed_ms(&end).map_err(|e| format!("elapsed: {e:?}"))?;
        times.push(ok.then_some(ms * 1e3 / REPS as f32));
    }
    drop(scratch);
    let Some(heuristic_us) = times[0] else {
        return Err("the heuristic's own algorithm failed when timed".into());
    };
    let (best, best_us) = times
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some((i, (*t)?)))
        .fold((0, heuristic_us), |acc, (i, t)| if t < acc.1 { (i, t) } else { acc });
    plan.algo = candidates[best];
    Ok(Some(Tuned { heuristic_us, best_us, changed: best != 0, calls: 0 }))
}
