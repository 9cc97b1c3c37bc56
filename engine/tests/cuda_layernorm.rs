//! The CUDA LayerNorm forward against the CPU reference on both of its kernels (the register-row
//! `layernorm_forward[_bf16out]_k*` for C <= 1024 with aligned rows, the scalar one for other C
//! and for any buffer off its vector word), f32 and bf16 out.
//!
//! The CUDA LayerNorm backward pass against the CPU reference, in the cases cuda_ops.rs does not
//! reach: dout in bf16 (`layernorm_backward_fused_bf16dout_k*`, and the two-pass kernels above
//! C = 1024), views one element past an aligned address (the fused kernel's one-column-at-a-time
//! path instead of its float4 one), C between 769 and 1024 (64 KiB of opted-in shared memory),
//! and the same bits on every run. Both modes (accumulate, overwrite) each time; gradients start
//! from random values. dout values are rounded to bf16 on the host first, so the CPU sees what a
//! bf16 buffer holds and only f32 summation order differs (tolerance 1e-5, as cuda_ops.rs).
//! `layernorm_backward_and_copy` is checked against the plain op on the same backend: the same
//! dinp, dweight, dbias bits, and a copy that is dinp rounded to bf16 (the tests' own rounding),
//! or dinp itself where activations are f32.
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

/// What one mode (accumulate or overwrite) of `copy_body` leaves: dinp, dweight, dbias of the
/// plain op and of `layernorm_backward_and_copy`, and the latter's copy (as f32).
struct CopyMode {
    accumulate: bool,
    plain: [Vec<f32>; 3],
    with_copy: [Vec<f32>; 3],
    copy: Vec<f32>,
}

/// The LayerNorm backward with `n` rows of `c` columns in both modes, once as
/// `layernorm_backward` / `layernorm_backward_set` and once as `layernorm_backward_and_copy`,
/// each from the same starting gradients. dout is bf16 when `bf16_dout`; inp, dout and dinp
/// views start `off` elements into their buffers, the copy's (an activation buffer: bf16 on the
/// GPU, NaN before the call) `copy_off`.
fn copy_body<B: Backend>(be: &B, n: usize, c: usize, bf16_dout: bool, off: usize, copy_off: usize) -> Vec<CopyMode> {
    let inp = placed(be, false, &randn(50, n * c, 1.0), off);
    let inp_v = be.view(&inp, off..off + n * c);
    let w = be.upload(&randn(51, c, 1.0));
    let b = be.upload(&randn(52, c, 1.0));
    let (mut out, mut mean, mut rstd) = (be.zeros(n * c), be.zeros(n), be.zeros(n));
    be.layernorm_forward(all_mut(be, &mut out), all_mut(be, &mut mean), all_mut(be, &mut rstd), inp_v, all(be, &w), all(be, &b), c);
    let g = randn(53, n * c, 1.0);
    let dout = placed(be, bf16_dout, &if bf16_dout { round_all(&g) } else { g }, off);
    let dout_v = be.view(&dout, off..off + n * c);
    let (wv, mv, rv) = (all(be, &w), all(be, &mean), all(be, &rstd));
    let (dinp0, dw0, db0) = (randn(54, n * c, 1.0), randn(55, c, 1.0), randn(56, c, 1.0));
    // one call: [dinp, dweight, dbias], and the copy when asked for one
    let run = |accumulate: bool, with_copy: bool| {
        let mut dinp = placed(be, false, &dinp0, off);
        let mut copy = placed(be, true, &vec![f32::NAN; n * c], copy_off);
        let (mut dw, mut db) = (be.upload(&dw0), be.upload(&db0));
        let dinp_v = be.view_mut(&mut dinp, off..off + n * c);
        let (dw_v, db_v) = (all_mut(be, &mut dw), all_mut(be, &mut db));
        if with_copy {
            let copy_v = be.view_mut(&mut copy, copy_off..copy_off + n * c);
            be.layernorm_backward_and_copy(accumulate, dinp_v, copy_v, dw_v, db_v, dout_v, inp_v, wv, mv, rv, c);
        } else if accumulate {
            be.layernorm_backward(dinp_v, dw_v, db_v, dout_v, inp_v, wv, mv, rv, c);
        } else {
            be.layernorm_backward_set(dinp_v, dw_v, db_v, dout_v, inp_v, wv, mv, rv, c);
        }
        let grads = [body(be, "dinp", &dinp, off, n * c), be.download(all(be, &dw)), be.download(all(be, &db))];
        (grads, body(be, "copy", &copy, copy_off, n * c))
    };
    [true, false]
        .into_iter()
        .map(|accumulate| {
            let (plain, _) = run(accumulate, false);
            let (with_copy, copy) = run(accumulate, true);
            CopyMode { accumulate, plain, with_copy, copy }
        })
        .collect()
}

/// Asserts what `layernorm_backward_and_copy` promises: the plain op's dinp, dweight and dbias
/// bit for bit, and a copy equal to dinp as the activation buffer stores it (rounded to bf16
/// when `copy_bf16`, else exact).
fn check_copy(what: &str, modes: &[CopyMode], copy_bf16: bool) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for m in modes {
        let what = format!("{what} ({})", if m.accumulate { "accumulate" } else { "set" });
        for (name, (got, want)) in ["dinp", "dweight", "dbias"].iter().zip(m.with_copy.iter().zip(&m.plain)) {
            assert!(want.iter().all(|x| x.is_finite()), "{what}: non-finite {name}");
            assert_eq!(bits(got), bits(want), "{what}: {name} differs from the op without the copy");
        }
        let dinp = &m.with_copy[0];
        let want = if copy_bf16 { round_all(dinp) } else { dinp.clone() };
        let wrong = m.copy.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(wrong, 0, "{what}: {wrong} of {} copied values are not dinp as stored (bf16 {copy_bf16})", want.len());
        println!("{what}: dinp, dweight, dbias unchanged by the copy; copy == {} of dinp", if copy_bf16 { "bf16" } else { "f32" });
    }
}

/// The forward with `n` rows of `c` columns into out (an activation buffer, bf16 on the GPU, when
/// `bf16_out`; else f32), mean and rstd, which start NaN; the out, inp and w / b views start
/// `offs` = (out, inp, w and b) elements into their buffers.
fn forward_body<B: Backend>(be: &B, n: usize, c: usize, bf16_out: bool, offs: (usize, usize, usize)) -> Outs {
    let (out_off, in_off, wb_off) = offs;
    // rows centred on -3 .. 3, so that the means differ
    let mut x = randn(60, n * c, 1.0);
    x.iter_mut().enumerate().for_each(|(i, v)| *v += (i / c % 7) as f32 - 3.0);
    let inp = placed(be, false, &x, in_off);
    let w = placed(be, false, &randn(61, c, 1.0), wb_off);
    let b = placed(be, false, &randn(62, c, 1.0), wb_off);
    let mut out = placed(be, bf16_out, &vec![f32::NAN; n * c], out_off);
    let (mut mean, mut rstd) = (be.upload(&vec![f32::NAN; n]), be.upload(&vec![f32::NAN; n]));
    be.layernorm_forward(
        be.view_mut(&mut out, out_off..out_off + n * c),
        all_mut(be, &mut mean),
        all_mut(be, &mut rstd),
        be.view(&inp, in_off..in_off + n * c),
        be.view(&w, wb_off..wb_off + c),
        be.view(&b, wb_off..wb_off + c),
        c,
    );
    vec![
        ("out", body(be, "out", &out, out_off, n * c)),
        ("mean", be.download(all(be, &mean))),
        ("rstd", be.download(all(be, &rstd))),
    ]
}

/// Runs the forward `body` on the CPU and on `gpu`: mean, rstd and an f32 out within TOL; a bf16
/// out (`out_bf16`) against the CPU's rounded to bf16, where f32 summation order may flip a
/// rounding: at most one bf16 ulp apart, and that for at most 0.1% of the values (a rounding
/// other than to nearest would differ for about half of them).
fn compare_forward(what: &str, gpu: &CudaBackend, out_bf16: bool, body: impl Fn(&dyn Runner<Outs>) -> Outs) {
    let want = body(&CpuBackend::new());
    let got = body(gpu);
    gpu.synchronize().unwrap_or_else(|e| panic!("{what}: device error: {e}"));
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        assert!(g.iter().all(|x| x.is_finite()), "{what}/{name}: non-finite output on the GPU");
        if *name == "out" && out_bf16 {
            let w = round_all(w);
            let mut differ = 0;
            for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
                if a != b {
                    differ += 1;
                    // one bf16 ulp is at most |b| / 128; near zero (run 16: 5.4e-5 against
                    // 5.5e-5, where `(x - mean) * rstd * w + b` cancels) the f32 sums' own
                    // rounding, ~1e-6 of the terms (of order 1 here), is the larger
                    assert!((a - b).abs() <= b.abs() / 128.0 + 1e-5, "{what}/out[{i}]: {a} vs the CPU's {b} (bf16)");
                }
            }
            println!("{what}/out: {differ} of {} bf16 values one ulp off the CPU's rounding", g.len());
            assert!(differ * 1000 <= g.len(), "{what}/out: {differ} of {} bf16 values differ", g.len());
        } else {
            let e = rel_err(g, w);
            println!("{what}/{name}: rel err {e:.3e} over {} values", g.len());
            assert!(e <= TOL, "{what}/{name}: rel err {e:.3e} > {TOL:.0e}");
        }
    }
}

#[test]
fn the_forward_body_runs_on_the_cpu() {
    // Runs everywhere: the body's views at offsets and sentinels, and every output written.
    let outs = forward_body(&CpuBackend::new(), 70, 7, true, (1, 2, 3));
    assert!(outs.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
}

#[test]
fn layernorm_forward_matches_cpu() {
    let Some((g, _serial)) = gpu() else { return };
    let bf16 = bf16_activations(g);
    // (rows, C, (out, inp, w / b offsets)): the register kernels (K 24 at GPT-2's C, K 32, K 8
    // and K 4 with a last column group only some lanes hold), the scalar one for C % 4 != 0 and
    // above 1024, and at C = 768 with each buffer one element off its vector word
    let cases = [
        (129, 768, (0, 0, 0)),
        (70, 1024, (0, 0, 0)),
        (65, 132, (0, 0, 0)),
        (200, 100, (0, 0, 0)),
        (5, 7, (0, 0, 0)),
        (70, 1030, (0, 0, 0)),
        (70, 1028, (0, 0, 0)),
        (129, 768, (1, 0, 0)),
        (129, 768, (0, 1, 0)),
        (129, 768, (0, 0, 1)),
    ];
    for (n, c, offs) in cases {
        for bf16_out in [false, true] {
            if bf16_out && !bf16 {
                continue;
            }
            let what = format!("forward {n}x{c} bf16 out {bf16_out} at {offs:?}");
            compare_forward(&what, g, bf16_out, both!(forward_body, n, c, bf16_out, offs));
        }
    }
}

#[test]
fn layernorm_backward_and_copy_on_the_cpu() {
    // the CPU keeps f32 activations: the copy is dinp itself
    check_copy("cpu 70x7", &copy_body(&CpuBackend::new(), 70, 7, false, 1, 0), false);
}

#[test]
fn layernorm_backward_and_copy_writes_dinp_rounded_to_bf16() {
    let Some((g, _serial)) = gpu() else { return };
    // bf16 activations: the kernels write the copy; f32 ones (SMELT_BF16_ACTIVATIONS=0): a copy
    let copy_bf16 = g.activation_zeros(1).dtype() == Dtype::Bf16;
    // (rows, C, bf16 dout, offset, copy's offset): the fused vector path (K 24, K 32 with
    // opted-in shared memory), its scalar path (C % 4 != 0; all views off alignment; only the
    // copy off its 8-byte word), and the two-pass kernels above C = 1024
    let cases = [
        (129, 768, true, 0, 0),
        (70, 1000, false, 0, 0),
        (5, 7, true, 0, 0),
        (129, 768, true, 1, 1),
        (65, 64, false, 0, 1),
        (70, 1100, true, 0, 0),
        (70, 1100, false, 1, 3),
    ];
    for (n, c, bf16_dout, off, copy_off) in cases {
        let what = format!("{n}x{c} bf16 dout {bf16_dout} at +{off}, copy at +{copy_off}");
        let modes = copy_body(g, n, c, bf16_dout && copy_bf16, off, copy_off);
        g.synchronize().unwrap_or_else(|e| panic!("{what}: device error: {e}"));
        check_copy(&what, &modes, copy_bf16);
    }
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
