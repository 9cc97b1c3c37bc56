//! Every CUDA op (attention aside: cuda_attention.rs) against the CPU reference on random inputs
//! and shapes that cross block boundaries. Each test body is written once, generic over the
//! backend, run on both, and the outputs compared by relative error ‖gpu − cpu‖ / ‖cpu‖ (printed).
//! Gradient buffers start from random values so that an op that overwrites instead of
//! accumulating fails. Without a GPU (or without libcuda) the GPU tests print a skip line.
#![cfg(feature = "cuda")]

#[macro_use]
mod backend_pair;
mod op_buffers;
use op_buffers::{randn, all, all_mut, host, rel_err};
use backend_pair::Runner;

use std::sync::OnceLock;

use smelt_engine::backend::{AdamWStep, Backend, Dropout, MatmulShape, RopeShape, WeightLayout, IGNORE_INDEX};
use smelt_engine::cuda::{CudaBackend, CudaOptions, MatmulPrecision};
use smelt_engine::rng::Rng;
use smelt_engine::{CpuBackend, EngineError};

// ---- the GPU, once per test binary ------------------------------------------------------------

fn make(p: MatmulPrecision) -> Result<CudaBackend, EngineError> {
    CudaBackend::new_with(0, CudaOptions { matmul: p })
}

fn gpu_with(cell: &'static OnceLock<Result<CudaBackend, String>>, p: MatmulPrecision) -> Option<&'static CudaBackend> {
    match cell.get_or_init(|| make(p).map_err(|e| e.to_string())) {
        Ok(be) => Some(be),
        Err(why) => {
            println!("skipping: {why}");
            None
        }
    }
}

/// f32 matmuls: every comparison tight.
fn gpu() -> Option<&'static CudaBackend> {
    static CELL: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    gpu_with(&CELL, MatmulPrecision::F32)
}

// ---- helpers ----------------------------------------------------------------------------------

/// Named outputs of one test body.
type Outs = Vec<(&'static str, Vec<f32>)>;

/// Runs `body` on the CPU and on `gpu`, compares each named output within `tol`.
fn compare(what: &str, gpu: &CudaBackend, tol: f64, body: impl Fn(&dyn Runner<Outs>) -> Outs) {
    let want = body(&CpuBackend::new());
    let got = body(gpu);
    gpu.synchronize().unwrap_or_else(|e| panic!("{what}: device error: {e}"));
    assert_eq!(got.len(), want.len());
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        assert!(g.iter().all(|x| x.is_finite()), "{what}/{name}: non-finite output on the GPU");
        let e = rel_err(g, w);
        println!("{what}/{name}: rel err {e:.3e} over {} values", g.len());
        assert!(e <= tol, "{what}/{name}: rel err {e:.3e} > {tol:.1e}");
    }
}



// ---- memory -----------------------------------------------------------------------------------

fn memory_body<B: Backend>(be: &B) -> Outs {
    let n = 70_001;
    let x = randn(1, n, 1.0);
    let mut buf = be.upload(&x);
    be.fill(be.view_mut(&mut buf, 100..1_100), 2.5);
    be.scale(be.view_mut(&mut buf, 5_000..n), -0.75);
    let src = be.upload(&randn(2, 333, 1.0));
    be.copy(be.view_mut(&mut buf, 2_000..2_333), all(be, &src));
    be.write(be.view_mut(&mut buf, 3_000..3_004), &[1.0, 2.0, 3.0, 4.0]);
    {
        let [a, b] = be.split_mut(&mut buf, [60_000..60_010, 10..20]);
        be.fill(a, 7.0);
        be.scale(b, 3.0);
    }
    let ss = be.sum_squares(be.view(&buf, 17..n - 3));
    let part = be.download(be.view(&buf, 1_050..1_150));
    vec![("buffer", host(be, &buf)), ("window", part), ("sum_squares", vec![ss as f32])]
}

#[test]
fn memory_ops_match_cpu() {
    let Some(g) = gpu() else { return };
    compare("memory", g, 1e-7, both!(memory_body));
    // The f64 sum itself, tighter than the f32 cast above.
    let x = randn(3, 1_000_003, 1.0);
    let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let got = g.sum_squares(all(g, &g.upload(&x)));
    let e = (got - want).abs() / want;
    println!("sum_squares f64: rel err {e:.3e}");
    assert!(e < 1e-12, "sum_squares: {got} vs {want}");
    let zero = g.zeros(0);
    assert_eq!(g.sum_squares(all(g, &zero)), 0.0);
    assert!(g.download(all(g, &zero)).is_empty());
}

#[test]
fn split_mut_overlap_panics_with_a_clear_message() {
    let Some(g) = gpu() else { return };
    let mut buf = g.zeros(12);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = g.split_mut(&mut buf, [4..9, 0..5]);
    }));
    let msg = r.err().and_then(|e| e.downcast_ref::<String>().cloned()).expect("overlap must panic");
    assert!(msg.contains("overlap"), "{msg}");
}

// ---- embedding --------------------------------------------------------------------------------

fn embedding_body<B: Backend>(be: &B, accumulate: bool) -> Outs {
    let (rows, c, n) = (97, 200, 300);
    let mut rng = Rng::new(4);
    // Many repeats: ids from a small range, so the backward sums several rows per id.
    let ids: Vec<u32> = (0..n).map(|_| rng.below(40) as u32 * 2).collect();
    let ids_d = be.upload_ids(&ids);
    let table = be.upload(&randn(5, rows * c, 1.0));
    let mut out = be.upload(&randn(6, n * c, 1.0));
    be.embedding_forward(all_mut(be, &mut out), &ids_d, all(be, &table), c, accumulate);
    let mut dtable = be.upload(&randn(7, rows * c, 1.0));
    let dout = be.upload(&randn(8, n * c, 1.0));
    be.embedding_backward(all_mut(be, &mut dtable), all(be, &dout), &ids_d, c);
    vec![("out", host(be, &out)), ("dtable", host(be, &dtable))]
}

/// BERT's token-type table: two ids over many positions, so each id's sum runs through the
/// segmented (two-level) path of the CUDA backward.
fn embedding_few_ids_body<B: Backend>(be: &B) -> Outs {
    let (rows, c, n) = (2, 96, 1000);
    let mut rng = Rng::new(9);
    let ids: Vec<u32> = (0..n).map(|_| rng.below(2) as u32).collect();
    let ids_d = be.upload_ids(&ids);
    let mut dtable = be.upload(&randn(10, rows * c, 1.0));
    let dout = be.upload(&randn(11, n * c, 1.0));
    be.embedding_backward(all_mut(be, &mut dtable), all(be, &dout), &ids_d, c);
    vec![("dtable", host(be, &dtable))]
}

#[test]
fn embedding_backward_over_few_ids_matches_cpu() {
    let Some(g) = gpu() else { return };
    // Sums of ~500 rows per id, in segments of 64 then in segment order: rounding only.
    compare("embedding few ids", g, 1e-5, both!(embedding_few_ids_body));
}

#[test]
fn embedding_matches_cpu_bitwise() {
    let Some(g) = gpu() else { return };
    // Same additions in the same order as the CPU: exact.
    compare("embedding", g, 0.0, both!(embedding_body, false));
    compare("embedding+=", g, 0.0, both!(embedding_body, true));
}

// ---- matmul -----------------------------------------------------------------------------------

fn matmul_body<B: Backend>(be: &B, layout: WeightLayout, bias: bool, with_dinp: bool) -> Outs {
    let s = MatmulShape { rows: 300, in_features: 200, out_features: 129, layout };
    let (n, ic, oc) = (s.rows, s.in_features, s.out_features);
    let inp = be.upload(&randn(10, n * ic, 1.0));
    let w = be.upload(&randn(11, ic * oc, 0.1));
    let b = be.upload(&randn(12, oc, 1.0));
    let mut out = be.upload(&randn(13, n * oc, 1.0)); // overwritten
    be.matmul_forward(all_mut(be, &mut out), all(be, &inp), all(be, &w), bias.then(|| all(be, &b)), s);
    let dout = be.upload(&randn(14, n * oc, 1.0));
    let mut dinp = be.upload(&randn(15, n * ic, 1.0));
    let mut dw = be.upload(&randn(16, ic * oc, 1.0));
    let mut db = be.upload(&randn(17, oc, 1.0));
    be.matmul_backward(
        with_dinp.then(|| all_mut(be, &mut dinp)),
        all_mut(be, &mut dw),
        bias.then(|| all_mut(be, &mut db)),
        all(be, &dout),
        all(be, &inp),
        all(be, &w),
        s,
    );
    vec![("out", host(be, &out)), ("dinp", host(be, &dinp)), ("dweight", host(be, &dw)), ("dbias", host(be, &db))]
}

fn matmul_all_cases(g: &CudaBackend, tol: f64) {
    for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
        for (bias, with_dinp) in [(true, true), (false, true), (true, false)] {
            let what = format!("matmul {layout:?} bias={bias} dinp={with_dinp}");
            compare(&what, g, tol, both!(matmul_body, layout, bias, with_dinp));
        }
    }
}

#[test]
fn matmul_f32_matches_cpu() {
    let Some(g) = gpu() else { return };
    matmul_all_cases(g, 1e-5);
}

#[test]
fn matmul_bf16_and_tf32_within_their_precision() {
    static BF16: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    static TF32: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    let Some(g) = gpu_with(&BF16, MatmulPrecision::Bf16) else { return };
    // bf16 operands carry 8 bits of mantissa: ~4e-3 per product, less after summing.
    matmul_all_cases(g, 1e-2);
    let Some(g) = gpu_with(&TF32, MatmulPrecision::Tf32) else { return };
    matmul_all_cases(g, 2e-3);
}

// ---- layernorm --------------------------------------------------------------------------------

fn layernorm_body<B: Backend>(be: &B, n: usize, c: usize) -> Outs {
    let mut x = randn(20, n * c, 1.0);
    x.iter_mut().enumerate().for_each(|(i, v)| *v += (i / c) as f32 * 0.01); // per-row offsets
    let inp = be.upload(&x);
    let w = be.upload(&randn(21, c, 1.0));
    let b = be.upload(&randn(22, c, 1.0));
    let mut out = be.zeros(n * c);
    let mut mean = be.zeros(n);
    let mut rstd = be.zeros(n);
    be.layernorm_forward(
        all_mut(be, &mut out),
        all_mut(be, &mut mean),
        all_mut(be, &mut rstd),
        all(be, &inp),
        all(be, &w),
        all(be, &b),
        c,
    );
    let dout = be.upload(&randn(23, n * c, 1.0));
    let mut dinp = be.upload(&randn(24, n * c, 1.0));
    let mut dw = be.upload(&randn(25, c, 1.0));
    let mut db = be.upload(&randn(26, c, 1.0));
    be.layernorm_backward(
        all_mut(be, &mut dinp),
        all_mut(be, &mut dw),
        all_mut(be, &mut db),
        all(be, &dout),
        all(be, &inp),
        all(be, &w),
        all(be, &mean),
        all(be, &rstd),
        c,
    );
    // the overwrite variant over random values (C above 1024 takes the zero-then-add path)
    let mut dset = be.upload(&randn(27, n * c, 1.0));
    be.layernorm_backward_set(
        all_mut(be, &mut dset),
        all_mut(be, &mut dw),
        all_mut(be, &mut db),
        all(be, &dout),
        all(be, &inp),
        all(be, &w),
        all(be, &mean),
        all(be, &rstd),
        c,
    );
    vec![
        ("out", host(be, &out)),
        ("mean", host(be, &mean)),
        ("rstd", host(be, &rstd)),
        ("dinp", host(be, &dinp)),
        ("dinp set", host(be, &dset)),
        ("dweight", host(be, &dw)),
        ("dbias", host(be, &db)),
    ]
}

#[test]
fn layernorm_matches_cpu() {
    let Some(g) = gpu() else { return };
    compare("layernorm 300x200", g, 1e-5, both!(layernorm_body, 300, 200));
    compare("layernorm 129x768", g, 1e-5, both!(layernorm_body, 129, 768));
    compare("layernorm 5x7", g, 1e-5, both!(layernorm_body, 5, 7));
    compare("layernorm 70x1100", g, 1e-5, both!(layernorm_body, 70, 1100));
}

// ---- gelu, residual ---------------------------------------------------------------------------

fn elementwise_body<B: Backend>(be: &B) -> Outs {
    let n = 100_003;
    let x = be.upload(&randn(30, n, 2.0));
    let y = be.upload(&randn(31, n, 1.0));
    let mut gelu = be.zeros(n);
    be.gelu_forward(all_mut(be, &mut gelu), all(be, &x));
    let mut dx = be.upload(&randn(32, n, 1.0));
    be.gelu_backward(all_mut(be, &mut dx), all(be, &x), all(be, &y));
    let mut dx_set = be.upload(&randn(35, n, 1.0));
    be.gelu_backward_set(all_mut(be, &mut dx_set), all(be, &x), all(be, &y));
    let mut sum = be.zeros(n);
    be.residual_forward(all_mut(be, &mut sum), all(be, &x), all(be, &y));
    let mut da = be.upload(&randn(33, n, 1.0));
    let mut db = be.upload(&randn(34, n, 1.0));
    be.residual_backward(all_mut(be, &mut da), all_mut(be, &mut db), all(be, &y));
    vec![
        ("gelu", host(be, &gelu)),
        ("dgelu", host(be, &dx)),
        ("dgelu_set", host(be, &dx_set)),
        ("residual", host(be, &sum)),
        ("da", host(be, &da)),
        ("db", host(be, &db)),
    ]
}

#[test]
fn gelu_and_residual_match_cpu() {
    let Some(g) = gpu() else { return };
    compare("elementwise", g, 1e-6, both!(elementwise_body));
}

// ---- rotary positions -------------------------------------------------------------------------

fn rope_body<B: Backend>(be: &B) -> Outs {
    // 3 sequences of 37 positions, 4 heads of 24: rows cross 256-thread blocks unevenly
    let s = RopeShape { rows: 3 * 37, seq_len: 37, channels: 96, heads: 4 };
    let table = be.upload(&smelt_engine::model::rotary::table(40, 24));
    let x = randn(41, s.rows * 3 * s.channels, 1.0);
    let mut turned = be.upload(&x);
    be.rope(all_mut(be, &mut turned), all(be, &table), s, false);
    let mut back = be.upload(&host(be, &turned));
    be.rope(all_mut(be, &mut back), all(be, &table), s, true);
    vec![("rope", host(be, &turned)), ("rope_inverse", host(be, &back))]
}

/// The kernel rounds each product and the sum as the CPU does: bitwise equal.
#[test]
fn rope_matches_cpu_bitwise() {
    let Some(g) = gpu() else { return };
    compare("rope", g, 0.0, both!(rope_body));
}

// ---- tanh (BERT's pooler) ---------------------------------------------------------------------

fn tanh_body<B: Backend>(be: &B, n: usize) -> Outs {
    // std 2: values deep in both saturated tails as well as around 0
    let x = be.upload(&randn(35, n, 2.0));
    let mut y = be.upload(&randn(36, n, 1.0)); // overwritten
    be.tanh_forward(all_mut(be, &mut y), all(be, &x));
    let dout = be.upload(&randn(37, n, 1.0));
    let mut dx = be.upload(&randn(38, n, 1.0)); // accumulated into
    be.tanh_backward(all_mut(be, &mut dx), all(be, &y), all(be, &dout));
    vec![("tanh", host(be, &y)), ("dtanh", host(be, &dx))]
}

#[test]
fn tanh_matches_cpu() {
    let Some(g) = gpu() else { return };
    // (B, C) of a BERT-base pooler, and a length that is no multiple of a block
    compare("tanh 32x768", g, 1e-6, both!(tanh_body, 32 * 768));
    compare("tanh 100003", g, 1e-6, both!(tanh_body, 100_003));
}

// ---- dropout ----------------------------------------------------------------------------------

fn dropout_body<B: Backend>(be: &B, mask: Dropout) -> Outs {
    let n = 100_003;
    let x = be.upload(&randn(35, n, 1.0));
    let mut out = be.upload(&randn(36, n, 1.0)); // overwritten
    be.dropout_forward(all_mut(be, &mut out), all(be, &x), mask);
    // a window of the same buffer at its own counters
    let mut part = be.zeros(1_000);
    be.dropout_forward(all_mut(be, &mut part), be.view(&x, 50_000..51_000), Dropout { offset: mask.offset + 50_000, ..mask });
    let dout = be.upload(&randn(37, n, 1.0));
    let mut dx = be.upload(&randn(38, n, 1.0));
    be.dropout_backward(all_mut(be, &mut dx), all(be, &dout), mask);
    vec![("out", host(be, &out)), ("window", host(be, &part)), ("dinp", host(be, &dx))]
}

#[test]
fn dropout_masks_match_cpu_bitwise() {
    let Some(g) = gpu() else { return };
    // Same hash, same f32 product (no FMA): the masks and values are bit-identical.
    for mask in [
        Dropout { p: 0.1, seed: 5, offset: 0 },
        Dropout { p: 0.5, seed: u64::MAX, offset: (1 << 40) + 3 },
        Dropout { p: 0.0, seed: 1, offset: 7 },
    ] {
        compare(&format!("dropout {mask:?}"), g, 0.0, both!(dropout_body, mask));
    }
}

// ---- cross-entropy ----------------------------------------------------------------------------

fn cross_entropy_body<B: Backend>(be: &B, n: usize, v: usize) -> Outs {
    let mut rng = Rng::new(40);
    let targets: Vec<u32> =
        (0..n).map(|i| if i % 5 == 3 { IGNORE_INDEX } else { rng.below(v as u64) as u32 }).collect();
    let t = be.upload_ids(&targets);
    let logits = be.upload(&randn(41, n * v, 3.0));
    let mut losses = be.upload(&randn(42, n, 1.0));
    let mut lse = be.zeros(n);
    be.cross_entropy_forward(all_mut(be, &mut losses), all_mut(be, &mut lse), all(be, &logits), &t, v);
    let mut dlogits = be.upload(&randn(43, n * v, 0.01));
    be.cross_entropy_backward(all_mut(be, &mut dlogits), all(be, &logits), all(be, &lse), &t, 0.37, v);
    let mut in_place = be.upload(&randn(41, n * v, 3.0));
    be.cross_entropy_backward_in_place(all_mut(be, &mut in_place), all(be, &lse), &t, 0.37, v);
    vec![("losses", host(be, &losses)), ("lse", host(be, &lse)), ("dlogits", host(be, &dlogits)), ("in_place", host(be, &in_place))]
}

#[test]
fn cross_entropy_matches_cpu() {
    let Some(g) = gpu() else { return };
    compare("cross_entropy 37x50257", g, 1e-5, both!(cross_entropy_body, 37, 50257));
    compare("cross_entropy 300x129", g, 1e-5, both!(cross_entropy_body, 300, 129));
    compare("cross_entropy 3x1", g, 1e-5, both!(cross_entropy_body, 3, 1));
}

// ---- adamw ------------------------------------------------------------------------------------

fn adamw_body<B: Backend>(be: &B) -> Outs {
    let n = 100_003;
    let mut p = be.upload(&randn(50, n, 1.0));
    let mut m = be.zeros(n);
    let mut v = be.zeros(n);
    for t in 1..=3u64 {
        let g = be.upload(&randn(50 + t, n, 1.0));
        let hp = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            t,
            grad_scale: 0.5,
        };
        // An offset range, as the optimizer updates decayed and non-decayed groups separately.
        be.adamw_update(
            be.view_mut(&mut p, 7..n),
            be.view(&g, 7..n),
            be.view_mut(&mut m, 7..n),
            be.view_mut(&mut v, 7..n),
            hp,
        );
    }
    vec![("params", host(be, &p)), ("m", host(be, &m)), ("v", host(be, &v))]
}

/// The one-launch update over runs of different weight decay (odd lengths, a one-element run)
/// and, on the same backend, the per-run launches it replaces: the same bits.
fn adamw_runs_body<B: Backend>(be: &B) -> Outs {
    let n = 100_003;
    let runs = vec![(0..1, 0.0), (1..40_000, 0.1), (40_000..40_769, 0.0), (40_769..n, 0.1)];
    let table = smelt_engine::backend::DecayRuns::new(be, runs.clone());
    let (mut p, mut m, mut v) = (be.upload(&randn(60, n, 1.0)), be.zeros(n), be.zeros(n));
    let (mut p2, mut m2, mut v2) = (be.upload(&randn(60, n, 1.0)), be.zeros(n), be.zeros(n));
    for t in 1..=3u64 {
        let g = be.upload(&randn(60 + t, n, 1.0));
        let hp = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, t, grad_scale: 0.5 };
        be.adamw_update_runs(&mut p, &g, &mut m, &mut v, &table, hp);
        for (r, wd) in &runs {
            be.adamw_update(be.view_mut(&mut p2, r.clone()), be.view(&g, r.clone()), be.view_mut(&mut m2, r.clone()), be.view_mut(&mut v2, r.clone()), AdamWStep { weight_decay: *wd, ..hp });
        }
    }
    let (p, p2) = (host(be, &p), host(be, &p2));
    assert!(p.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: one launch and per-run launches differ", be.name());
    vec![("params", p), ("m", host(be, &m)), ("v", host(be, &v))]
}

/// Exactly the CPU's values: the kernels round every operation on its own, in the CPU's order
/// (adamw.cu's adamw_elem: no fused multiply-adds; IEEE division and square root), and the
/// one-launch kernel's four-element words and tail (n = 100,003; runs ending inside words) do
/// the same per element.
#[test]
fn adamw_matches_cpu() {
    let Some(g) = gpu() else { return };
    compare("adamw", g, 0.0, both!(adamw_body));
    compare("adamw runs", g, 0.0, both!(adamw_runs_body));
}

// ---- errors -----------------------------------------------------------------------------------

#[test]
fn bad_ids_and_targets_surface_at_synchronize() {
    let Some(g) = gpu() else { return };
    g.synchronize().expect("clean start");
    let table = g.upload(&[1.0; 8]);
    let mut out = g.zeros(8);
    let ids = g.upload_ids(&[0, 1, 9, 2]); // 9: outside a table of 4 rows
    g.embedding_forward(all_mut(g, &mut out), &ids, all(g, &table), 2, false);
    let err = g.synchronize().expect_err("an id outside the table must be reported").to_string();
    assert!(err.contains("embedding id"), "{err}");
    g.synchronize().expect("the error is reported once");

    let logits = g.upload(&[0.5; 6]);
    let targets = g.upload_ids(&[1, 3]); // 3: outside a vocabulary of 3
    let mut losses = g.zeros(2);
    let mut lse = g.zeros(2);
    g.cross_entropy_forward(all_mut(g, &mut losses), all_mut(g, &mut lse), all(g, &logits), &targets, 3);
    let err = g.synchronize().expect_err("a target outside the vocabulary must be reported").to_string();
    assert!(err.contains("target"), "{err}");
}

#[test]
fn no_such_device_is_a_clear_error() {
    // Runs everywhere: without a GPU it checks the no-CUDA message instead.
    match CudaBackend::new(4096) {
        Ok(_) => panic!("there is no GPU 4096"),
        Err(e) => {
            let msg = e.to_string();
            println!("CudaBackend::new(4096): {msg}");
            assert!(msg.contains("cuda:4096"), "{msg}");
            assert!(
                msg.contains("no such device") || msg.contains("could not be loaded") || msg.contains("device"),
                "{msg}"
            );
        }
    }
}

// ---- nccl -------------------------------------------------------------------------------------

#[test]
fn nccl_world_of_one_averages_to_itself_and_abort_fails_later_calls() {
    use smelt_engine::cuda::nccl::{unique_id, NcclCollective};
    use smelt_engine::{Collective, CollectiveError};
    let Some(g) = gpu() else { return };
    let id = match unique_id() {
        Ok(id) => id,
        Err(e) => {
            println!("skipping: {e}");
            return;
        }
    };
    let mut nccl = NcclCollective::new(g, &id, 0, 1).expect("a world of one");
    assert_eq!((Collective::<CudaBackend>::rank(&nccl), Collective::<CudaBackend>::world_size(&nccl)), (0, 1));
    let x = randn(60, 10_007, 1.0);
    let mut buf = g.upload(&x);
    nccl.all_reduce_mean(g, g.view_mut(&mut buf, 0..x.len())).expect("all-reduce");
    assert_eq!(host(g, &buf), x, "the mean over one rank is the buffer itself");
    let handle = nccl.abort_handle();
    std::thread::spawn(move || handle.abort()).join().unwrap();
    let r = nccl.all_reduce_mean(g, g.view_mut(&mut buf, 0..x.len()));
    assert!(matches!(r, Err(CollectiveError::Aborted)), "{r:?}");
    g.synchronize().expect("no device error left behind");
}

/// A world of two that only rank 0 joins never completes; setting the cancel flag ends the join
/// (its half-made non-blocking communicator aborted) instead of leaving a thread in NCCL for
/// good, which is what a stopped multi-GPU run needs when a peer never comes.
#[test]
fn an_nccl_join_whose_peer_never_comes_ends_when_cancelled() {
    use smelt_engine::cuda::nccl::{unique_id, NcclCollective};
    use smelt_engine::CollectiveError;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;
    let Some(g) = gpu() else { return };
    if !g.tuning().nccl_nonblocking {
        println!("skipping: SMELT_NCCL_NONBLOCKING=0 (a blocking join cannot be cancelled)");
        return;
    }
    let id = match unique_id() {
        Ok(id) => id,
        Err(e) => {
            println!("skipping: {e}");
            return;
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel();
    {
        let cancel = cancel.clone();
        // detached: should the join not return, the test fails below instead of hanging
        std::thread::spawn(move || {
            let r = NcclCollective::join(g, &id, 0, 2, &cancel).map(|_| ());
            let _ = done_tx.send(r);
        });
    }
    if let Ok(r) = done_rx.recv_timeout(Duration::from_secs(2)) {
        panic!("a join of a world of two ended with one rank: {r:?}");
    }
    cancel.store(true, Ordering::SeqCst);
    let r = done_rx.recv_timeout(Duration::from_secs(60)).expect("the cancelled join did not return (did nccl refuse the non-blocking config?)");
    assert!(matches!(r, Err(CollectiveError::Aborted)), "{r:?}");
    g.synchronize().expect("no device error left behind");
}
