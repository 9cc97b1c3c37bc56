//! The grid-stride CUDA kernels (rope.cu, elementwise.cu, dropout.cu, convert.cu, memory.cu,
//! bias.cu's broadcast) run under the host emulator (tools/cuda_emu/kernel_runner.cpp) and
//! compared with the CPU backend's ops: on any machine with g++, so in CI, where there is no GPU
//! for engine/tests/cuda_ops.rs. Sizes leave a partial last block and a tail past the last whole
//! 4-element word; grids smaller than the data make the grid-stride loops go round; buffers
//! aligned and one element off run the vector and the scalar paths. Where the kernels claim to
//! be bitwise the CPU (rope, dropout, the residual add, the conversions), the test says so.

#[macro_use]
mod emulator;
mod op_buffers;

use emulator::{bf16_nearest, run_kernel, widen, worst, Arg, Launch};
use op_buffers::{all, all_mut, host, randn};
use smelt_engine::backend::{AdamWStep, Backend, Dropout, RopeShape};
use smelt_engine::CpuBackend;

fn cpu() -> CpuBackend {
    CpuBackend::new()
}

fn upload(be: &CpuBackend, v: &[f32]) -> <CpuBackend as Backend>::Buf {
    be.upload(v)
}

fn bf16_of(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16_nearest(x)).collect()
}

// ---- rope.cu -----------------------------------------------------------------------------------

/// The CPU's rope on `qkv` (rows x 3C).
fn cpu_rope(qkv: &[f32], table: &[f32], s: RopeShape, inverse: bool) -> Vec<f32> {
    let be = cpu();
    let mut q = upload(&be, qkv);
    let t = upload(&be, table);
    be.rope(all_mut(&be, &mut q), all(&be, &t), s, inverse);
    host(&be, &q)
}

/// (rows, seq_len, channels, heads, t_max): positions wrap (rows > seq_len), a head width of 2
/// (one pair), a table longer than the sequences, more rows than blocks, and a row of more
/// pairs than a block has threads (600 > 256, odd pairs per head).
const ROPE_SHAPES: [(usize, usize, usize, usize, usize); 4] = [(7, 3, 24, 3, 5), (5, 5, 4, 2, 5), (9, 4, 96, 2, 6), (5, 2, 600, 4, 3)];

#[test]
fn rope_f32_is_bitwise_the_cpu_op() {
    for (i, &(rows, t, c, heads, t_max)) in ROPE_SHAPES.iter().enumerate() {
        let s = RopeShape { rows, seq_len: t, channels: c, heads };
        let qkv = randn(10 + i as u64, rows * 3 * c, 1.0);
        let table = randn(20 + i as u64, t_max * c / heads, 0.7); // (2, t_max, hd/2)
        for inverse in [false, true] {
            let Some(out) = run_kernel(
                "rope_f32",
                Launch { grid: 2, shifts: &[] },
                vec![Arg::F32(qkv.clone()), Arg::F32(table.clone())],
                scalars![rows, t, c, heads, t_max, inverse as u32],
            ) else {
                return;
            };
            let got = out[0].as_ref().unwrap().f32();
            let want = cpu_rope(&qkv, &table, s, inverse);
            assert_ne!(want, qkv, "the rotation moved nothing: the comparison would prove nothing");
            let differ = got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
            assert_eq!(differ, 0, "rope_f32 {s:?} inverse={inverse}: {differ} of {} values differ from the CPU", want.len());
            assert_eq!(out[1].as_ref().unwrap().f32(), table, "rope_f32 wrote into its table");
        }
    }
}

#[test]
fn rope_bf16_is_the_cpu_op_rounded_once() {
    for (i, &(rows, t, c, heads, t_max)) in ROPE_SHAPES.iter().enumerate() {
        let s = RopeShape { rows, seq_len: t, channels: c, heads };
        let qkv = bf16_of(&randn(30 + i as u64, rows * 3 * c, 1.0));
        let table = randn(40 + i as u64, t_max * c / heads, 0.7);
        for inverse in [false, true] {
            let Some(out) = run_kernel(
                "rope_bf16",
                Launch { grid: 3, shifts: &[] },
                vec![Arg::Bf16(qkv.clone()), Arg::F32(table.clone())],
                scalars![rows, t, c, heads, t_max, inverse as u32],
            ) else {
                return;
            };
            let got = out[0].as_ref().unwrap().bf16();
            let widened: Vec<f32> = qkv.iter().map(|&h| widen(h)).collect();
            let want = bf16_of(&cpu_rope(&widened, &table, s, inverse));
            let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
            assert_eq!(differ, 0, "rope_bf16 {s:?} inverse={inverse}: {differ} of {} values differ", want.len());
        }
    }
}

/// The eight-pairs-per-thread kernel bitwise the one-pair one (which the test above holds to the
/// CPU), on the shapes whose head halves are whole 16-byte words, forward and inverse, with a grid
/// small enough that its task loop goes round; a kernel that skipped a group or turned a pair
/// with the wrong position would differ.
#[test]
fn rope_bf16_x8_is_rope_bf16_bitwise() {
    // (rows, t, c, heads, t_max): hd/2 = 16, 8 and 32
    for (i, &(rows, t, c, heads, t_max)) in [(37, 5, 64, 2, 7), (9, 4, 96, 6, 6), (70, 35, 128, 2, 40)].iter().enumerate() {
        let qkv = bf16_of(&randn(50 + i as u64, rows * 3 * c, 1.0));
        let table = randn(60 + i as u64, t_max * c / heads, 0.7);
        for inverse in [false, true] {
            let run = |kernel: &str, grid: u32| {
                run_kernel(kernel, Launch { grid, shifts: &[] }, vec![Arg::Bf16(qkv.clone()), Arg::F32(table.clone())], scalars![rows, t, c, heads, t_max, inverse as u32])
                    .map(|out| out[0].as_ref().unwrap().bf16())
            };
            let Some(want) = run("rope_bf16", 3) else { return };
            assert_ne!(want, qkv, "the rotation moved nothing: the comparison would prove nothing");
            let got = run("rope_bf16_x8", 1).unwrap();
            let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
            assert_eq!(differ, 0, "rope_bf16_x8 rows={rows} c={c} heads={heads} inverse={inverse}: {differ} of {} values differ", want.len());
        }
    }
}

// ---- elementwise.cu ----------------------------------------------------------------------------

/// n: a partial last block and a tail of 3 past the last whole 4-element word.
const N: usize = 1003;

/// |kernel - CPU| / (1 + |CPU|) for the f32 GELU and tanh: both sides compute the same formula
/// in f32, but tanhf is the device's (or the host library's) own, so not bitwise.
const TRANSCENDENTAL_TOL: f64 = 2e-6;

#[test]
fn gelu_f32_forward_and_both_backwards_match_the_cpu() {
    let be = cpu();
    let x = randn(1, N, 2.0);
    let dy = randn(2, N, 1.0);
    let d0 = randn(3, N, 1.0);
    let launch = Launch { grid: 2, shifts: &[] };

    let Some(out) = run_kernel("gelu_forward", launch, vec![Arg::F32(vec![f32::NAN; N]), Arg::F32(x.clone())], &[]) else {
        return;
    };
    let mut y = be.zeros(N);
    be.gelu_forward(all_mut(&be, &mut y), all(&be, &upload(&be, &x)));
    let (e, at) = worst(&out[0].as_ref().unwrap().f32(), &host(&be, &y));
    assert!(e <= TRANSCENDENTAL_TOL, "gelu_forward: {e:e} at {at} (x = {})", x[at]);

    for (kernel, accumulate) in [("gelu_backward", true), ("gelu_backward_set", false)] {
        // the set variant starts from NaN: it must overwrite, never read, dinp
        let start = if accumulate { d0.clone() } else { vec![f32::NAN; N] };
        let out = run_kernel(kernel, launch, vec![Arg::F32(start), Arg::F32(x.clone()), Arg::F32(dy.clone())], &[]).unwrap();
        let mut dx = upload(&be, &if accumulate { d0.clone() } else { vec![0.0; N] });
        let (xb, dyb) = (upload(&be, &x), upload(&be, &dy));
        if accumulate {
            be.gelu_backward(all_mut(&be, &mut dx), all(&be, &xb), all(&be, &dyb));
        } else {
            be.gelu_backward_set(all_mut(&be, &mut dx), all(&be, &xb), all(&be, &dyb));
        }
        let (e, at) = worst(&out[0].as_ref().unwrap().f32(), &host(&be, &dx));
        assert!(e <= TRANSCENDENTAL_TOL, "{kernel}: {e:e} at {at} (x = {})", x[at]);
    }
}

/// GELU (tanh approximation) and its derivative in f64: the bf16 kernels' reference.
fn gelu_f64(x: f64) -> (f64, f64) {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let u = c * (x + 0.044715 * x * x * x);
    let t = u.tanh();
    let du = c * (1.0 + 3.0 * 0.044715 * x * x);
    (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
}

/// The bf16 GELU kernels against GELU computed in f64 from the same bf16 inputs and rounded once
/// to bf16: at most one bf16 unit apart (an f32 result a hair from a rounding boundary), and the
/// vector path (aligned buffers) bitwise the scalar one (each buffer in turn one element off).
/// f64, not the CPU op: the kernels compute x * sigmoid(2u) (elementwise.cu, SMELT_FAST_GELU),
/// which is more accurate than the CPU's f32 0.5 x (1 + tanh(u)) where 1 + tanh(u) cancels
/// (x = -4.59: the CPU's value is two bf16 units from the exact one, the kernel's is the exact
/// one rounded). The f32 kernels are the CPU op's (the test above).
#[test]
fn gelu_bf16_kernels_are_gelu_rounded_once_on_both_paths() {
    let x = bf16_of(&randn(4, N, 2.0));
    let dy = bf16_of(&randn(5, N, 1.0));
    let exact: Vec<(f64, f64)> = x.iter().zip(&dy).map(|(&h, &d)| {
        let (g, dg) = gelu_f64(widen(h) as f64);
        (g, dg * widen(d) as f64)
    }).collect();
    let want_fwd: Vec<u16> = exact.iter().map(|e| bf16_nearest(e.0 as f32)).collect();
    let want_bwd: Vec<u16> = exact.iter().map(|e| bf16_nearest(e.1 as f32)).collect();

    // shifts of 1 (2 bytes) and 4 (8 bytes: aligned for 4-wide words, not for 8-wide) take the
    // scalar path
    let fwd_shifts: [&[usize]; 5] = [&[0, 0], &[1, 0], &[0, 1], &[4, 0], &[0, 4]];
    let mut first: Option<Vec<u16>> = None;
    for shifts in fwd_shifts {
        let Some(out) = run_kernel(
            "gelu_forward_bf16",
            Launch { grid: 1, shifts },
            vec![Arg::Bf16(vec![0xffff; N]), Arg::Bf16(x.clone())],
            &[],
        ) else {
            return;
        };
        let got = out[0].as_ref().unwrap().bf16();
        assert_within_one_unit("gelu_forward_bf16", shifts, &got, &want_fwd);
        let first = first.get_or_insert_with(|| got.clone());
        assert_eq!(&got, first, "gelu_forward_bf16 shifts {shifts:?}: the scalar path differs from the vector path");
    }
    let bwd_shifts: [&[usize]; 6] = [&[0, 0, 0], &[1, 0, 0], &[0, 1, 0], &[0, 0, 1], &[4, 0, 0], &[0, 0, 4]];
    let mut first: Option<Vec<u16>> = None;
    for shifts in bwd_shifts {
        let out = run_kernel(
            "gelu_backward_set_bf16",
            Launch { grid: 1, shifts },
            vec![Arg::Bf16(vec![0xffff; N]), Arg::Bf16(x.clone()), Arg::Bf16(dy.clone())],
            &[],
        )
        .unwrap();
        let got = out[0].as_ref().unwrap().bf16();
        assert_within_one_unit("gelu_backward_set_bf16", shifts, &got, &want_bwd);
        let first = first.get_or_insert_with(|| got.clone());
        assert_eq!(&got, first, "gelu_backward_set_bf16 shifts {shifts:?}: the scalar path differs from the vector path");
    }
}

/// The GELU backward with the bias gradient's column sums in the same pass: its dinp bitwise
/// gelu_backward_set_bf16's, and its per-chunk partials bitwise the row-order f32 sums (from 0,
/// chunks of 64 rows) of that dinp's values, which column_sum_partial_bf16_x4 would compute
/// reading it back. Rows not a multiple of the chunk or of the kernel's four rows per batch, and
/// a grid small enough that the grid-stride loop goes round.
#[test]
fn gelu_backward_with_bias_sums_is_the_two_passes_bitwise() {
    // (rows, cols, rows per chunk): 64-row chunks with a short last one (7 rows: the four-row
    // batches and then single rows); 3-row chunks, 303 tasks for the emulator's 256 threads
    for (rows, cols, per) in [(64 * 2 + 7, 24, 64), (301, 24, 3)] {
        let n = rows * cols;
        let x = bf16_of(&randn(40, n, 2.0));
        let dy = bf16_of(&randn(41, n, 1.0));
        let Some(two_pass) = run_kernel(
            "gelu_backward_set_bf16",
            Launch { grid: 2, shifts: &[] },
            vec![Arg::Bf16(vec![0xffff; n]), Arg::Bf16(x.clone()), Arg::Bf16(dy.clone())],
            &[],
        ) else {
            return;
        };
        let want = two_pass[0].as_ref().unwrap().bf16();
        let chunks = rows.div_ceil(per);
        let mut want_partial = vec![0.0f32; chunks * cols];
        for (r, row) in want.chunks(cols).enumerate() {
            for (c, &h) in row.iter().enumerate() {
                want_partial[(r / per) * cols + c] += widen(h);
            }
        }
        let scalars = [rows.to_string(), cols.to_string(), per.to_string()];
        let out = run_kernel(
            "gelu_backward_set_bias_bf16",
            Launch { grid: 1, shifts: &[] },
            vec![Arg::Bf16(vec![0xffff; n]), Arg::F32(vec![f32::NAN; chunks * cols]), Arg::Bf16(x), Arg::Bf16(dy)],
            &scalars,
        )
        .unwrap();
        assert_eq!(out[0].as_ref().unwrap().bf16(), want, "{rows}x{cols} by {per}: the fused kernel's dinp is not gelu_backward_set_bf16's");
        let got: Vec<u32> = out[1].as_ref().unwrap().f32().iter().map(|v| v.to_bits()).collect();
        let want_bits: Vec<u32> = want_partial.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want_bits, "{rows}x{cols} by {per}: the fused kernel's partials are not the row-order sums of its dinp");
    }
}

fn assert_within_one_unit(kernel: &str, shifts: &[usize], got: &[u16], want: &[u16]) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g32, w32) = (widen(g), widen(w));
        // one bf16 unit at w's exponent (the sign-magnitude step, also across zero)
        let unit = (widen(w.wrapping_add(1) & 0x7fff | (w & 0x8000)) - w32).abs().max(f32::MIN_POSITIVE);
        assert!(
            g32.is_finite() && (g32 - w32).abs() <= unit,
            "{kernel} shifts {shifts:?}: element {i} is {g32} (bits {g:#06x}), the CPU's rounded {w32} (bits {w:#06x})"
        );
    }
}

#[test]
fn residual_and_tanh_match_the_cpu() {
    let be = cpu();
    let (a, b, dy) = (randn(6, N, 1.0), randn(7, N, 1.0), randn(8, N, 1.0));
    let launch = Launch { grid: 3, shifts: &[] };
    let Some(out) = run_kernel("residual_forward", launch, vec![Arg::F32(vec![f32::NAN; N]), Arg::F32(a.clone()), Arg::F32(b.clone())], &[]) else {
        return;
    };
    let mut y = be.zeros(N);
    be.residual_forward(all_mut(&be, &mut y), all(&be, &upload(&be, &a)), all(&be, &upload(&be, &b)));
    assert_eq!(out[0].as_ref().unwrap().f32(), host(&be, &y), "residual_forward is not bitwise the CPU's sum");

    // both gradients accumulate onto what they held
    let out = run_kernel("residual_backward", launch, vec![Arg::F32(a.clone()), Arg::F32(b.clone()), Arg::F32(dy.clone())], &[]).unwrap();
    let (mut da, mut db) = (upload(&be, &a), upload(&be, &b));
    be.residual_backward(all_mut(&be, &mut da), all_mut(&be, &mut db), all(&be, &upload(&be, &dy)));
    assert_eq!(out[0].as_ref().unwrap().f32(), host(&be, &da), "residual_backward's da");
    assert_eq!(out[1].as_ref().unwrap().f32(), host(&be, &db), "residual_backward's db");

    let out = run_kernel("tanh_forward", launch, vec![Arg::F32(vec![f32::NAN; N]), Arg::F32(a.clone())], &[]).unwrap();
    let mut t = be.zeros(N);
    be.tanh_forward(all_mut(&be, &mut t), all(&be, &upload(&be, &a)));
    let (e, at) = worst(&out[0].as_ref().unwrap().f32(), &host(&be, &t));
    assert!(e <= TRANSCENDENTAL_TOL, "tanh_forward: {e:e} at {at}");

    let tv = host(&be, &t);
    let out = run_kernel("tanh_backward", launch, vec![Arg::F32(b.clone()), Arg::F32(tv.clone()), Arg::F32(dy.clone())], &[]).unwrap();
    let mut dx = upload(&be, &b);
    be.tanh_backward(all_mut(&be, &mut dx), all(&be, &upload(&be, &tv)), all(&be, &upload(&be, &dy)));
    let (e, at) = worst(&out[0].as_ref().unwrap().f32(), &host(&be, &dx));
    assert!(e <= 1e-6, "tanh_backward: {e:e} at {at}");
}

// ---- dropout.cu --------------------------------------------------------------------------------

/// The masks are the CPU's bit for bit (same hash, same counters from `offset`), and so are the
/// scaled values, both ways, for a few probabilities including 0.
#[test]
fn dropout_is_bitwise_the_cpu_op_both_ways() {
    let be = cpu();
    let n = 2000;
    let (x, dy, d0) = (randn(9, n, 1.0), randn(10, n, 1.0), randn(11, n, 1.0));
    for (p, seed, offset) in [(0.1f32, 7u64, 12_345u64), (0.5, u64::MAX - 3, 0), (0.0, 1, 99)] {
        let mask = Dropout { p, seed, offset };
        let (threshold, scale) = smelt_engine::cpu::dropout::mask_params(p);
        let args = scalars![seed, offset, threshold, format!("{scale:e}")];
        let Some(out) = run_kernel("dropout_forward", Launch { grid: 3, shifts: &[] }, vec![Arg::F32(vec![f32::NAN; n]), Arg::F32(x.clone())], args) else {
            return;
        };
        let mut y = be.zeros(n);
        be.dropout_forward(all_mut(&be, &mut y), all(&be, &upload(&be, &x)), mask);
        let want = host(&be, &y);
        let dropped = want.iter().filter(|v| **v == 0.0).count();
        assert!(p == 0.0 || dropped > 0, "p = {p} dropped nothing: the masks would not be compared");
        assert_eq!(out[0].as_ref().unwrap().f32(), want, "dropout_forward p={p} seed={seed} offset={offset}");

        let out = run_kernel("dropout_backward", Launch { grid: 3, shifts: &[] }, vec![Arg::F32(d0.clone()), Arg::F32(dy.clone())], args).unwrap();
        let mut dx = upload(&be, &d0);
        be.dropout_backward(all_mut(&be, &mut dx), all(&be, &upload(&be, &dy)), mask);
        assert_eq!(out[0].as_ref().unwrap().f32(), host(&be, &dx), "dropout_backward p={p} seed={seed} offset={offset}");
    }
}

// ---- convert.cu --------------------------------------------------------------------------------

/// Values that test the rounding: ties both ways, the largest finite f32 (to infinity), the
/// smallest normal and a subnormal, signed zeros, infinities and a NaN; then random ones.
fn conversion_inputs(n: usize) -> Vec<f32> {
    let mut v = vec![
        f32::from_bits(0x3f80_8000), // 1 + 2^-8: a tie, to even (down)
        f32::from_bits(0x3f81_8000), // a tie, to even (up)
        f32::from_bits(0x3f80_8001), // just past a tie: up
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(0x0000_8001),
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    v.extend(randn(12, n - v.len(), 3.0));
    v
}

#[test]
fn f32_to_bf16_rounds_to_nearest_even_on_both_paths() {
    let x = conversion_inputs(N);
    let want = bf16_of(&x);
    let shifts: [&[usize]; 3] = [&[0, 0], &[0, 1], &[1, 0]];
    for shifts in shifts {
        let Some(out) = run_kernel("f32_to_bf16", Launch { grid: 1, shifts }, vec![Arg::Bf16(vec![0x5a5a; N]), Arg::F32(x.clone())], &[]) else {
            return;
        };
        let got = out[0].as_ref().unwrap().bf16();
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "f32_to_bf16 shifts {shifts:?}: element {i} ({:e}) gave {g:#06x}, nearest even is {w:#06x}", x[i]);
        }
    }
}

/// The padded copies: rows of `ld` with the values, then zeros; and the ways back (the unpadded
/// add, the bias add into f32 or bf16, with and without a bias).
#[test]
fn padded_copies_and_unpadding_match_plain_loops() {
    let (rows, cols, ld) = (37usize, 13usize, 16usize);
    let x = randn(13, rows * cols, 1.0);
    let launch = Launch { grid: 2, shifts: &[] };
    let Some(out) = run_kernel("f32_to_bf16_rows", launch, vec![Arg::Bf16(vec![0x5a5a; rows * ld]), Arg::F32(x.clone())], scalars![rows, cols, ld]) else {
        return;
    };
    let padded = out[0].as_ref().unwrap().bf16();
    for r in 0..rows {
        for c in 0..ld {
            let want = if c < cols { bf16_nearest(x[r * cols + c]) } else { 0 };
            assert_eq!(padded[r * ld + c], want, "f32_to_bf16_rows at ({r}, {c})");
        }
    }
    let xb = bf16_of(&x);
    let out = run_kernel("bf16_rows_repack", launch, vec![Arg::Bf16(vec![0x5a5a; rows * ld]), Arg::Bf16(xb)], scalars![rows, cols, ld]).unwrap();
    assert_eq!(out[0].as_ref().unwrap().bf16(), padded, "bf16_rows_repack is not f32_to_bf16_rows of the same values");

    let wide = randn(14, rows * ld, 1.0);
    let (acc, bias) = (randn(15, rows * cols, 1.0), randn(16, cols, 1.0));
    let out = run_kernel("add_unpadded", launch, vec![Arg::F32(acc.clone()), Arg::F32(wide.clone())], scalars![rows, cols, ld]).unwrap();
    let got = out[0].as_ref().unwrap().f32();
    for r in 0..rows {
        for c in 0..cols {
            assert_eq!(got[r * cols + c], acc[r * cols + c] + wide[r * ld + c], "add_unpadded at ({r}, {c})");
        }
    }
    for with_bias in [true, false] {
        let b = if with_bias { Arg::F32(bias.clone()) } else { Arg::Null };
        let out = run_kernel("unpad_rows_add_bias", launch, vec![Arg::F32(vec![f32::NAN; rows * cols]), Arg::F32(wide.clone()), b], scalars![rows, cols, ld]).unwrap();
        let b = if with_bias { Arg::F32(bias.clone()) } else { Arg::Null };
        let out16 = run_kernel("unpad_rows_add_bias_bf16", launch, vec![Arg::Bf16(vec![0x5a5a; rows * cols]), Arg::F32(wide.clone()), b], scalars![rows, cols, ld]).unwrap();
        let (got, got16) = (out[0].as_ref().unwrap().f32(), out16[0].as_ref().unwrap().bf16());
        for r in 0..rows {
            for c in 0..cols {
                let want = if with_bias { wide[r * ld + c] + bias[c] } else { wide[r * ld + c] };
                assert_eq!(got[r * cols + c], want, "unpad_rows_add_bias (bias: {with_bias}) at ({r}, {c})");
                assert_eq!(got16[r * cols + c], bf16_nearest(want), "unpad_rows_add_bias_bf16 (bias: {with_bias}) at ({r}, {c})");
            }
        }
    }
    let (onto, small) = (randn(17, N, 1.0), bf16_of(&randn(18, N, 1.0)));
    let out = run_kernel("add_bf16_onto_f32", launch, vec![Arg::F32(onto.clone()), Arg::Bf16(small.clone())], &[]).unwrap();
    let want: Vec<f32> = onto.iter().zip(&small).map(|(&a, &h)| a + widen(h)).collect();
    assert_eq!(out[0].as_ref().unwrap().f32(), want, "add_bf16_onto_f32");
}

// ---- memory.cu, bias.cu ------------------------------------------------------------------------

#[test]
fn fill_scale_sum_squares_and_bias_broadcast_match_the_cpu() {
    let be = cpu();
    let x = randn(19, 5000, 1.5);
    let launch = Launch { grid: 3, shifts: &[] };
    let Some(out) = run_kernel("fill_f32", launch, vec![Arg::F32(x.clone())], scalars!["-2.5"]) else {
        return;
    };
    assert!(out[0].as_ref().unwrap().f32().iter().all(|&v| v == -2.5), "fill_f32");

    let out = run_kernel("scale_f32", launch, vec![Arg::F32(x.clone())], scalars!["0.3"]).unwrap();
    let mut s = upload(&be, &x);
    be.scale(all_mut(&be, &mut s), 0.3);
    assert_eq!(out[0].as_ref().unwrap().f32(), host(&be, &s), "scale_f32");
    // a bf16 activation (T5's logits): each value's f32 product rounded to nearest even
    let xb: Vec<u16> = x.iter().map(|&v| bf16_nearest(v)).collect();
    let out = run_kernel("scale_bf16", launch, vec![Arg::Bf16(xb.clone())], scalars!["0.3"]).unwrap();
    let want: Vec<u16> = xb.iter().map(|&h| bf16_nearest(f32::from_bits((h as u32) << 16) * 0.3)).collect();
    assert_eq!(out[0].as_ref().unwrap().bf16(), want, "scale_bf16");

    // per-block partials in f64, summed on the host as memory.rs sums them (7 blocks: each goes
    // round the grid-stride loop)
    let blocks = 7;
    let out = run_kernel("sum_squares_partial", Launch { grid: blocks, shifts: &[] }, vec![Arg::F32(x.clone()), Arg::F64(vec![f64::NAN; blocks as usize])], &[]).unwrap();
    let got: f64 = out[1].as_ref().unwrap().f64().iter().sum();
    let want = be.sum_squares(all(&be, &upload(&be, &x)));
    assert!(((got - want) / want).abs() < 1e-12, "sum_squares_partial: {got} vs the CPU's {want}");
    // the float4 kernel (memory.rs takes it for a 16-byte aligned start): lengths with 0 to 3
    // floats past the last vector (thread 0 of block 0 adds them), grids whose threads take two
    // vectors per round, one, or none
    for (n, grid) in [(5000, 7), (4999, 7), (4097, 1), (4098, 3), (6, 2), (3, 1)] {
        let x = &x[..n];
        let out = run_kernel("sum_squares_partial_x4", Launch { grid, shifts: &[] }, vec![Arg::F32(x.to_vec()), Arg::F64(vec![f64::NAN; grid as usize])], &[]).unwrap();
        let got: f64 = out[1].as_ref().unwrap().f64().iter().sum();
        let want = be.sum_squares(all(&be, &upload(&be, x)));
        assert!(((got - want) / want).abs() < 1e-12, "sum_squares_partial_x4 n={n} grid={grid}: {got} vs the CPU's {want}");
    }

    let (n_rows, oc) = (19usize, 70usize);
    let bias = randn(20, oc, 1.0);
    let out = run_kernel("bias_broadcast", launch, vec![Arg::F32(vec![f32::NAN; n_rows * oc]), Arg::F32(bias.clone())], scalars![n_rows, oc]).unwrap();
    let got = out[0].as_ref().unwrap().f32();
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, bias[i % oc], "bias_broadcast at row {} column {}", i / oc, i % oc);
    }
}

// ---- adamw.cu ----------------------------------------------------------------------------------

/// One AdamW step over a range (the per-range kernel; adamw_emu.cpp checks the one-pass kernel
/// over decay runs) bitwise the CPU's: parameters, both moments. Bias corrections are computed in
/// f32 on the host, as cuda/adamw.rs does.
#[test]
fn adamw_update_is_bitwise_the_cpu_step() {
    let be = cpu();
    let n = 3001;
    let (p, g, m) = (randn(21, n, 0.5), randn(22, n, 2.0), randn(23, n, 0.1));
    let v: Vec<f32> = randn(24, n, 0.1).iter().map(|x| x * x).collect();
    for (t, weight_decay, grad_scale) in [(1u64, 0.1f32, 1.0f32), (7, 0.0, 0.37)] {
        let hp = AdamWStep { lr: 6e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay, t, grad_scale };
        let bc1 = 1.0 - hp.beta1.powi(t as i32);
        let bc2 = 1.0 - hp.beta2.powi(t as i32);
        let args = scalars![
            format!("{:e}", hp.lr),
            format!("{:e}", hp.beta1),
            format!("{:e}", hp.beta2),
            format!("{:e}", hp.eps),
            format!("{:e}", weight_decay),
            format!("{:e}", grad_scale),
            format!("{bc1:e}"),
            format!("{bc2:e}"),
        ];
        let Some(out) = run_kernel(
            "adamw_update",
            Launch { grid: 4, shifts: &[] },
            vec![Arg::F32(p.clone()), Arg::F32(g.clone()), Arg::F32(m.clone()), Arg::F32(v.clone())],
            args,
        ) else {
            return;
        };
        let (mut pc, mut mc, mut vc) = (upload(&be, &p), upload(&be, &m), upload(&be, &v));
        be.adamw_update(all_mut(&be, &mut pc), all(&be, &upload(&be, &g)), all_mut(&be, &mut mc), all_mut(&be, &mut vc), hp);
        for (what, i, cpu_buf) in [("parameters", 0, &pc), ("first moments", 2, &mc), ("second moments", 3, &vc)] {
            let got = out[i].as_ref().unwrap().f32();
            let want = host(&be, cpu_buf);
            assert_ne!(want, [&p, &g, &m, &v][i].clone(), "the step changed no {what}");
            let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "adamw_update t={t}: {differ} of {n} {what} differ from the CPU's");
        }
        assert_eq!(out[1].as_ref().unwrap().f32(), g, "adamw_update wrote into the gradients");
    }
}
