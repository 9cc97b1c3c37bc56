//! The CUDA LayerNorm backward pass against the CPU reference, in the cases cuda_ops.rs does not
//! reach: dout in bf16 (`layernorm_backward_fused_bf16dout_k*`, and the two-pass kernels above
//! C = 1024), views one element past an aligned address (the fused kernel's one-column-at-a-time
//! path instead of its float4 one), C between 769 and 1024 (64 KiB of opted-in shared memory),
//! and the same bits on every run. Both modes (accumulate, overwrite) each time; gradients start
//! from random values. dout values are rounded to bf16 on the host first, so the CPU sees what a
//! bf16 buffer holds and only f32 summation order differs (tolerance 1e-5, as cuda_ops.rs).
//! Without a GPU the tests print a skip line.
#![cfg(feature = "cuda")]

#[macro_use]
mod backend_pair;
mod op_buffers;
use op_buffers::{randn, all, all_mut, rel_err};
use backend_pair::Runner;

mod bf16_reference;
use bf16_reference::round_all;

use std::sync::{Mutex, MutexGuard, OnceLock};

use smelt_engine::backend::Backend;
use smelt_engine::cuda::{CudaBackend, CudaOptions, Dtype, MatmulPrecision};
use smelt_engine::CpuBackend;

const TOL: f64 = 1e-5;
/// Value around the views, which the ops must leave alone (exact in bf16).
const SENTINEL: f32 = 7.0;
/// Sentinels after each view.
const GUARD: usize = 8;

/// The backend (bf16 matmuls, so bf16 activations) and a guard that keeps this binary's other
/// tests off it meanwhile; None (after a skip line) without a GPU.
fn gpu() -> Option<(&'static CudaBackend, MutexGuard<'static, ()>)> {
    static CELL: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    static SERIAL: Mutex<()> = Mutex::new(());
    let made = CELL.get_or_init(|| {
        CudaBackend::new_with(0, CudaOptions { matmul: MatmulPrecision::Bf16 }).map_err(|e| e.to_string())
    });
    match made {
        Ok(be) => Some((be, SERIAL.lock().unwrap_or_else(|p| p.into_inner()))),
        Err(why) => {
            println!("skipping: {why}");
            None
        }
    }
}

/// Whether the backend hands out bf16 activations (not with SMELT_BF16_ACTIVATIONS=0).
fn bf16_activations(be: &CudaBackend) -> bool {
    let on = be.activation_zeros(1).dtype() == Dtype::Bf16;
    if !on {
        println!("skipping the bf16 cases: activations are f32 (SMELT_BF16_ACTIVATIONS=0)");
    }
    on
}

/// `values` at `off..off + len` of a buffer of sentinels (GUARD more after them): an activation
/// buffer (bf16 on the GPU) when `bf16`, else f32.
fn placed<B: Backend>(be: &B, bf16: bool, values: &[f32], off: usize) -> B::Buf {
    let len = off + values.len() + GUARD;
    let mut buf = if bf16 { be.activation_zeros(len) } else { be.zeros(len) };
    be.fill(all_mut(be, &mut buf), SENTINEL);
    be.write(be.view_mut(&mut buf, off..off + values.len()), values);
    buf
}

/// The view's values, after checking that the sentinels around it are intact.
fn body<B: Backend>(be: &B, what: &str, buf: &B::Buf, off: usize, len: usize) -> Vec<f32> {
    let got = be.download(all(be, buf));
    let outside = got[..off].iter().chain(&got[off + len..]);
    assert!(outside.into_iter().all(|&v| v == SENTINEL), "{}: {what}: written outside its view", be.name());
    got[off..off + len].to_vec()
}

/// Outputs of one body, by name.
type Outs = Vec<(&'static str, Vec<f32>)>;

/// Forward for the saved statistics, then backward (accumulating) and backward_set (overwriting)
/// with `n` rows of `c` columns; dout bf16 when `bf16_dout` (f32 on the CPU, same values); inp,
/// dout and both dinp views start `off` elements into their buffers.
fn backward_body<B: Backend>(be: &B, n: usize, c: usize, bf16_dout: bool, off: usize) -> Outs {
    let mut x = randn(40, n * c, 1.0);
    x.iter_mut().enumerate().for_each(|(i, v)| *v += (i / c) as f32 * 0.01); // per-row offsets
    let inp = placed(be, false, &x, off);
    let inp_v = be.view(&inp, off..off + n * c);
    let w = be.upload(&randn(41, c, 1.0));
    let b = be.upload(&randn(42, c, 1.0));
    let mut out = be.zeros(n * c);
    let mut mean = be.zeros(n);
    let mut rstd = be.zeros(n);
    be.layernorm_forward(all_mut(be, &mut out), all_mut(be, &mut mean), all_mut(be, &mut rstd), inp_v, all(be, &w), all(be, &b), c);

    let g = randn(43, n * c, 1.0);
    let dout = placed(be, bf16_dout, &if bf16_dout { round_all(&g) } else { g }, off);
    let dout_v = be.view(&dout, off..off + n * c);
    let mut dinp = placed(be, false, &randn(44, n * c, 1.0), off);
    let mut dset = placed(be, false, &randn(45, n * c, 1.0), off);
    let mut dw = be.upload(&randn(46, c, 1.0));
    let mut db = be.upload(&randn(47, c, 1.0));
    let (wv, mv, rv) = (all(be, &w), all(be, &mean), all(be, &rstd));
    be.layernorm_backward(be.view_mut(&mut dinp, off..off + n * c), all_mut(be, &mut dw), all_mut(be, &mut db), dout_v, inp_v, wv, mv, rv, c);
    let (dw1, db1) = (be.download(all(be, &dw)), be.download(all(be, &db)));
    be.layernorm_backward_set(be.view_mut(&mut dset, off..off + n * c), all_mut(be, &mut dw), all_mut(be, &mut db), dout_v, inp_v, wv, mv, rv, c);
    vec![
        ("dinp", body(be, "dinp", &dinp, off, n * c)),
        ("dinp set", body(be, "dinp set", &dset, off, n * c)),
        ("dweight", dw1),
        ("dbias", db1),
        ("dweight twice", be.download(all(be, &dw))),
        ("dbias twice", be.download(all(be, &db))),
    ]
}

/// Runs `body` on the CPU and on `gpu`, compares each output within TOL; returns the GPU's.
fn compare(what: &str, gpu: &CudaBackend, body: impl Fn(&dyn Runner<Outs>) -> Outs) -> Outs {
    let want = body(&CpuBackend::new());
    let got = body(gpu);
    gpu.synchronize().unwrap_or_else(|e| panic!("{what}: device error: {e}"));
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        assert!(g.iter().all(|x| x.is_finite()), "{what}/{name}: non-finite output on the GPU");
        let e = rel_err(g, w);
        println!("{what}/{name}: rel err {e:.3e} over {} values", g.len());
        assert!(e <= TOL, "{what}/{name}: rel err {e:.3e} > {TOL:.0e}");
    }
    got
}

/// Whether two runs' outputs are the same bits, output by output.
fn same_bits(a: &Outs, b: &Outs) -> bool {
    a.iter().zip(b).all(|((_, x), (_, y))| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()))
}

#[test]
fn the_test_body_runs_on_the_cpu() {
    // Runs everywhere: the body's own bookkeeping (views at offsets, sentinels) on the reference.
    let outs = backward_body(&CpuBackend::new(), 70, 7, false, 1);
    assert!(outs.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
}

#[test]
fn layernorm_backward_with_a_bf16_dout_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    if !bf16_activations(g) {
        return;
    }
    // (rows, C, offset): the vector path (K 24 and 32, the latter with opted-in shared memory),
    // the scalar one (C % 4 != 0, a dout 2 bytes off its 8-byte word), two-pass above 1024
    for (n, c, off) in [(129, 768, 0), (70, 1000, 0), (65, 64, 0), (5, 7, 0), (129, 768, 1), (70, 1100, 0)] {
        compare(&format!("bf16 dout {n}x{c} at +{off}"), g, both!(backward_body, n, c, true, off));
    }
}

#[test]
fn layernorm_backward_off_alignment_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    // one element past the alignment: the fused kernel's scalar path, at the K 24 and K 32 widths
    for (n, c) in [(129, 768), (65, 1024), (200, 100)] {
        let aligned = compare(&format!("f32 {n}x{c} at +0"), g, both!(backward_body, n, c, false, 0));
        let shifted = compare(&format!("f32 {n}x{c} at +1"), g, both!(backward_body, n, c, false, 1));
        // the scalar path owns the same columns per lane, so it should give the same bits (not
        // asserted: the two instantiations might contract multiply-adds differently)
        println!("f32 {n}x{c}: +0 and +1 give the same bits: {}", same_bits(&aligned, &shifted));
    }
}

#[test]
fn layernorm_backward_is_the_same_on_every_run() {
    let Some((g, _serial)) = gpu() else { return };
    let bf16 = bf16_activations(g);
    for (n, c, bf16_dout) in [(1000, 768, false), (1000, 768, true), (300, 1100, false)] {
        if bf16_dout && !bf16 {
            continue;
        }
        let first = backward_body(g, n, c, bf16_dout, 0);
        let second = backward_body(g, n, c, bf16_dout, 0);
        g.synchronize().unwrap_or_else(|e| panic!("device error: {e}"));
        assert!(same_bits(&first, &second), "{n}x{c} (bf16 dout {bf16_dout}): two runs differ");
    }
}
