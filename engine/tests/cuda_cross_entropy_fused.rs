//! `Backend::cross_entropy_forward_backward_in_place` against the two ops it replaces
//! (`cross_entropy_forward`, then `cross_entropy_backward_in_place`).
//!
//! On the GPU the fused kernel (`cross_entropy_fused[_bf16]`: a row's forward and in-place
//! backward in one block, the backends below have it switched on) must give the two kernels'
//! losses, lse and gradients bit for bit (same per-thread order, same block merge, same
//! rounding), and match the CPU reference within the usual tolerances on the same bf16-rounded
//! values, for bf16 and f32 logits. Shapes cover GPT-2's, BERT's and T5's vocabularies, rows
//! that start unaligned (odd V, a view starting 1..3 elements into its buffer), ignored rows,
//! short and long rows, and a target outside the vocabulary. Without a GPU the GPU tests print
//! a skip line.
#![cfg(feature = "cuda")]

mod bf16_reference;
mod op_buffers;
use op_buffers::{randn, all, all_mut, host, rel_err};
use bf16_reference::round_all;

use std::sync::{Mutex, MutexGuard, OnceLock};

use smelt_engine::backend::{Backend, IGNORE_INDEX};
use smelt_engine::cuda::{CudaBackend, CudaOptions, Dtype, MatmulPrecision};
use smelt_engine::rng::Rng;
use smelt_engine::CpuBackend;

/// Tolerances (relative error of the whole output as a norm) against the CPU: f32 outputs from
/// identical operands differ in summation order only; a bf16 gradient is rounded once.
const F32_OUT: f64 = 1e-5;
const BF16_OUT: f64 = 1e-2;

// ---- the GPU, once per test binary ------------------------------------------------------------

fn gpu_with(cell: &'static OnceLock<Result<CudaBackend, String>>, p: MatmulPrecision) -> Option<&'static CudaBackend> {
    match cell.get_or_init(|| CudaBackend::new_with(0, CudaOptions { matmul: p }).map(|b| b.with_fused_classifier(true)).map_err(|e| e.to_string())) {
        Ok(be) => Some(be),
        Err(why) => {
            println!("skipping: {why}");
            None
        }
    }
}

/// One test at a time on the GPU: a target out of range sets the backend's error word, which
/// another test's `synchronize` would report.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The f32 backend: f32 logits.
fn gpu_f32() -> Option<&'static CudaBackend> {
    static CELL: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    gpu_with(&CELL, MatmulPrecision::F32)
}

/// The bf16 backend, when it hands out bf16 activations (bf16 logits).
fn gpu_bf16() -> Option<&'static CudaBackend> {
    static CELL: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    let be = gpu_with(&CELL, MatmulPrecision::Bf16)?;
    if be.activation_zeros(1).dtype() != Dtype::Bf16 {
        println!("skipping: this backend keeps activations in f32");
        return None;
    }
    Some(be)
}

// ---- helpers ----------------------------------------------------------------------------------

/// How many values differ in their bits.
fn bit_diffs(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count()
}

/// Padding on both sides of the logits in their buffer (the view starts `offset` into it).
const PAD: usize = 3;

/// One shape: N rows of V logits, the view starting `offset` (0..=PAD) elements into its buffer.
#[derive(Clone, Copy, Debug)]
struct Shape {
    n: usize,
    v: usize,
    offset: usize,
}

/// targets (N): every fourth row ignored, the first and last ids present, the rest random.
fn targets(n: usize, v: usize) -> Vec<u32> {
    let mut rng = Rng::new(60);
    (0..n)
        .map(|i| match i {
            _ if i % 4 == 3 => IGNORE_INDEX,
            0 => 0,
            1 => v as u32 - 1,
            _ => rng.below(v as u64) as u32,
        })
        .collect()
}

/// What one path left: losses, lse, and the whole logits buffer (padding, then the gradient).
struct Out {
    losses: Vec<f32>,
    lse: Vec<f32>,
    buf: Vec<f32>,
}

impl Out {
    fn grad(&self, s: Shape) -> &[f32] {
        &self.buf[s.offset..s.offset + s.n * s.v]
    }
}

/// Runs the fused op (`fused`) or the two ops on `values` (the whole logits buffer), held in an
/// activation buffer when `bf16`.
fn run<B: Backend>(be: &B, bf16: bool, fused: bool, s: Shape, values: &[f32], targets: &[u32], dloss: f32) -> Out {
    let mut logits = if bf16 { be.activation_zeros(values.len()) } else { be.zeros(values.len()) };
    be.write(all_mut(be, &mut logits), values);
    let t = be.upload_ids(targets);
    let mut losses = be.upload(&vec![7.0; s.n]); // overwritten
    let mut lse = be.upload(&vec![7.0; s.n]); // overwritten
    let range = s.offset..s.offset + s.n * s.v;
    if fused {
        let x = be.view_mut(&mut logits, range);
        be.cross_entropy_forward_backward_in_place(all_mut(be, &mut losses), all_mut(be, &mut lse), x, &t, dloss, s.v);
    } else {
        be.cross_entropy_forward(all_mut(be, &mut losses), all_mut(be, &mut lse), be.view(&logits, range.clone()), &t, s.v);
        be.cross_entropy_backward_in_place(be.view_mut(&mut logits, range), all(be, &lse), &t, dloss, s.v);
    }
    Out { losses: host(be, &losses), lse: host(be, &lse), buf: host(be, &logits) }
}

/// The fused op on `gpu` against the two ops on `gpu` (bitwise) and on the CPU (within the
/// tolerances), on random logits (bf16-rounded when `bf16`), plus ignored rows and padding.
fn check_shape(gpu: &CudaBackend, bf16: bool, s: Shape) {
    let what = format!("{} {s:?}", if bf16 { "bf16" } else { "f32" });
    let len = s.offset + s.n * s.v + PAD;
    let mut values = randn(61 + s.v as u64, len, 3.0);
    if bf16 {
        values = round_all(&values);
    }
    let t = targets(s.n, s.v);
    let dloss = 0.37;
    let fused = run(gpu, bf16, true, s, &values, &t, dloss);
    let two = run(gpu, bf16, false, s, &values, &t, dloss);
    let cpu = run(&CpuBackend::new(), false, false, s, &values, &t, dloss);

    for (name, a, b) in [("losses", &fused.losses, &two.losses), ("lse", &fused.lse, &two.lse)] {
        assert_eq!(bit_diffs(a, b), 0, "{what}: fused {name} differ from the two kernels'");
    }
    let diffs = bit_diffs(fused.grad(s), two.grad(s));
    assert_eq!(diffs, 0, "{what}: {diffs} fused gradients differ from the two kernels'");
    // the padding around the view is untouched
    let pad = |o: &Out| [o.buf[..s.offset].to_vec(), o.buf[s.offset + s.n * s.v..].to_vec()].concat();
    assert_eq!(bit_diffs(&pad(&fused), &pad(&cpu)), 0, "{what}: the fused op wrote outside its view");
    for (row, _) in t.iter().enumerate().filter(|&(_, &t)| t == IGNORE_INDEX) {
        let g = &fused.grad(s)[row * s.v..(row + 1) * s.v];
        assert!(g.iter().all(|&x| x.to_bits() == 0), "{what}: ignored row {row} has a gradient");
    }

    let grad_tol = if bf16 { BF16_OUT } else { F32_OUT };
    for (name, got, want, tol) in [
        ("losses", &fused.losses[..], &cpu.losses[..], F32_OUT),
        ("lse", &fused.lse[..], &cpu.lse[..], F32_OUT),
        ("gradient", fused.grad(s), cpu.grad(s), grad_tol),
    ] {
        let e = rel_err(got, want);
        println!("{what}: {name} rel err {e:.2e} vs the CPU");
        assert!(e <= tol, "{what}: {name} rel err {e:.2e} > {tol:.0e} vs the CPU");
    }
}

// ---- tests ------------------------------------------------------------------------------------

#[test]
fn fused_equals_two_ops_on_cpu() {
    let be = CpuBackend::new();
    let s = Shape { n: 9, v: 1001, offset: 2 };
    let values = randn(62, s.offset + s.n * s.v + PAD, 3.0);
    let t = targets(s.n, s.v);
    let (fused, two) = (run(&be, false, true, s, &values, &t, 0.37), run(&be, false, false, s, &values, &t, 0.37));
    assert_eq!(bit_diffs(&fused.losses, &two.losses), 0);
    assert_eq!(bit_diffs(&fused.lse, &two.lse), 0);
    assert_eq!(bit_diffs(&fused.buf, &two.buf), 0);
}

#[test]
fn fused_bf16_matches_two_kernels_and_cpu() {
    let Some(g) = gpu_bf16() else { return };
    let _serial = serial();
    for (n, v, offset) in [
        (9, 50257, 0),  // GPT-2: every row at another alignment
        (8, 50304, 1),  // GPT-2 padded to a multiple of 64
        (9, 30522, 2),  // BERT
        (9, 32128, 3),  // T5
        (600, 1001, 1), // more rows than the blocks resident at once (2 per SM)
        (5, 5, 3),      // a head, one word, a tail
        (3, 1, 0),      // one logit per row
        (3, 200003, 1), // long rows: many CE_UNROLL groups per thread
    ] {
        check_shape(g, true, Shape { n, v, offset });
    }
    g.synchronize().expect("no device error");
}

#[test]
fn fused_f32_matches_two_kernels_and_cpu() {
    let Some(g) = gpu_f32() else { return };
    let _serial = serial();
    for (n, v, offset) in [(9, 50257, 0), (600, 129, 1), (5, 5, 3), (3, 1, 2)] {
        check_shape(g, false, Shape { n, v, offset });
    }
    g.synchronize().expect("no device error");
}

/// A target outside the vocabulary: the error word is set, the row's loss is 0 and its gradient
/// zeros, as with the two kernels (bitwise).
fn check_flags_a_bad_target(g: &CudaBackend, bf16: bool) {
    let s = Shape { n: 4, v: 1001, offset: 0 };
    let mut values = randn(63, s.n * s.v + PAD, 3.0);
    if bf16 {
        values = round_all(&values);
    }
    let mut t = targets(s.n, s.v);
    t[2] = s.v as u32;
    g.synchronize().expect("no device error before");
    let fused = run(g, bf16, true, s, &values, &t, 0.37);
    let err = g.synchronize().expect_err("a target outside the vocabulary must be reported").to_string();
    assert!(err.contains("outside the vocabulary"), "unexpected error: {err}");
    assert_eq!(fused.losses[2], 0.0, "the row's loss is 0");
    assert!(fused.grad(s)[2 * s.v..3 * s.v].iter().all(|&x| x.to_bits() == 0), "the row's gradient is zeros");
    let two = run(g, bf16, false, s, &values, &t, 0.37);
    assert!(g.synchronize().is_err(), "the two kernels report it too");
    assert_eq!(bit_diffs(&fused.losses, &two.losses), 0);
    assert_eq!(bit_diffs(&fused.lse, &two.lse), 0);
    assert_eq!(bit_diffs(&fused.buf, &two.buf), 0);
}

#[test]
fn fused_flags_a_target_outside_the_vocabulary() {
    let _serial = serial();
    if let Some(g) = gpu_bf16() {
        check_flags_a_bad_target(g, true);
    }
    if let Some(g) = gpu_f32() {
        check_flags_a_bad_target(g, false);
    }
}

#[test]
fn fused_kernels_run_at_the_capped_blocks_per_sm() {
    // the backward half's re-read hits L2 only with few rows in flight: the cap must take
    let _serial = serial();
    for (gpu, bf16) in [(gpu_bf16(), true), (gpu_f32(), false)] {
        let Some(g) = gpu else { continue };
        let o = g.fused_classifier_occupancy(bf16).expect("the occupancy is known");
        println!("{}: {o:?}", if bf16 { "bf16" } else { "f32" });
        assert!(o.uncapped >= 1, "the fused kernel does not fit on an SM: {o:?}");
        assert_eq!(o.blocks_per_sm, o.cap.min(o.uncapped), "the cap on blocks per SM did not take");
    }
}
