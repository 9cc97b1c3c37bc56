//! LayerNorm: forward one warp per row (for C <= 1024 with aligned rows reading each row once,
//! with float4 loads, into registers); backward in one pass per chunk of rows for C <= 1024
//! (else the input gradient one warp per row, then the partials); weight and bias gradients as
//! deterministic column sums over fixed row chunks (see colsum.rs). The backward pass takes
//! dout in f32 or bf16 (a bf16 GEMM's output, as autocast writes d(ln_out)); everything else is
//! f32, except the optional bf16 copy of dinp it can write in the same pass (the next GEMM's
//! dout, which then needs no conversion).

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::colsum;
use super::view::{CudaView, CudaViewMut};
use super::CudaBackend;
use crate::cpu::ROWS_PER_TASK;

/// 8 warps of 32 threads (the `__launch_bounds__` of the register-row forward kernels and of the
/// fused backward ones: `LN_FWD_ROWS`, `LN_WARPS` in layernorm.cu).
const ROWS_PER_BLOCK: usize = 8;

fn warp_per_row_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out (N, C) = (inp - mean) * rstd * w + b; saves mean (N), rstd (N).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    be: &CudaBackend,
    out: CudaViewMut<'_>,
    mean: CudaViewMut<'_>,
    rstd: CudaViewMut<'_>,
    inp: CudaView<'_>,
    w: CudaView<'_>,
    b: CudaView<'_>,
    c: usize,
) {
    assert!(c > 0 && inp.len.is_multiple_of(c), "layernorm: input of {} floats is not (N, {c})", inp.len);
    let n = inp.len / c;
    assert_eq!(out.len, n * c, "layernorm out");
    assert!(mean.len == n && rstd.len == n, "layernorm saved state: mean {}, rstd {}, rows {n}", mean.len, rstd.len);
    assert!(w.len == c && b.len == c, "layernorm params: w {}, b {}, C {c}", w.len, b.len);
    if n == 0 {
        return;
    }
    // out may be a bf16 activation (a GEMM's input, see view.rs); everything else is f32
    let name = forward_kernel(c, out.is_bf16(), [out.addr(), inp.ptr(), w.ptr(), b.ptr()]);
    let f = be.func(&name);
    let (rows, cc) = (n as u64, c as u64);
    let mut l = be.stream().launch_builder(&f);
    l.arg(out.addr_ref()).arg(mean.ptr_ref()).arg(rstd.ptr_ref()).arg(inp.ptr_ref()).arg(w.ptr_ref()).arg(b.ptr_ref()).arg(&rows).arg(&cc);
    // SAFETY: layernorm_forward[_bf16out][_k{K}](float* or (bf16out) unsigned short* out, float*,
    // float*, const float* x3, u64, u64), the variant matching out's type: sizes asserted; a _k{K}
    // kernel only with 32 K >= C, C % 4 == 0 and every pointer aligned to its vector word
    // (forward_kernel), as its float4 / 8-byte accesses need.
    be.check(unsafe { l.launch(warp_per_row_cfg(n)) }.map(|_| ()), &name);
}

/// The forward kernel for `c` columns, a bf16 or f32 out, and the device addresses `[out, inp,
/// w, b]`: `layernorm_forward[_bf16out]_k{K}` (each row read once, as float4 groups, into
/// registers: K columns per lane, the fused backward's buckets) when C <= 1024, C % 4 == 0 and
/// every buffer starts on its vector word (16 bytes; 8 for a bf16 out, 4 values), so that every
/// row does too; else the scalar `layernorm_forward[_bf16out]` (any C, any alignment).
fn forward_kernel(c: usize, out_bf16: bool, [out, inp, w, b]: [u64; 4]) -> String {
    let tag = if out_bf16 { "_bf16out" } else { "" };
    let out_word: u64 = if out_bf16 { 8 } else { 16 };
    let aligned = out.is_multiple_of(out_word) && [inp, w, b].iter().all(|p| p.is_multiple_of(16));
    match fused_k(c) {
        Some(k) if c.is_multiple_of(4) && aligned => format!("layernorm_forward{tag}_k{k}"),
        _ => format!("layernorm_forward{tag}"),
    }
}

/// Columns per lane of the fused backward kernels (`layernorm_backward_fused_k{K}`, C <= 32 K;
/// the lane takes them as K / 4 groups of 4 adjacent columns) and of the register-row forward
/// ones (`layernorm_forward_k{K}`).
const FUSED_K: [usize; 5] = [4, 8, 16, 24, 32];

/// The smallest fused K covering `c` columns (32 lanes x K), or None above 1024 columns.
fn fused_k(c: usize) -> Option<usize> {
    FUSED_K.into_iter().find(|&k| 32 * k >= c)
}

/// Suffix of the backward kernels' names for dout's element type.
fn dout_tag(dout: &CudaView<'_>) -> &'static str {
    if dout.is_bf16() {
        "_bf16dout"
    } else {
        ""
    }
}

/// dinp (N, C) += the input gradient (`accumulate`; else written over dinp); dw (C) += sum_n
/// dout * xhat; db (C) += sum_n dout. The weight/bias sums go through per-chunk partials
/// (`ROWS_PER_TASK` rows, colsum.rs), so they are the same on every run. dout may be bf16.
/// `dinp_copy` (a bf16 view of dinp's length), when given, receives the final dinp rounded to
/// bf16, written by the same kernel that writes dinp.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    be: &CudaBackend,
    accumulate: bool,
    dinp: CudaViewMut<'_>,
    dinp_copy: Option<CudaViewMut<'_>>,
    dw: CudaViewMut<'_>,
    db: CudaViewMut<'_>,
    dout: CudaView<'_>,
    inp: CudaView<'_>,
    w: CudaView<'_>,
    mean: CudaView<'_>,
    rstd: CudaView<'_>,
    c: usize,
) {
    backward_summing(be, accumulate, dinp, dinp_copy, None, dw, db, dout, inp, w, mean, rstd, c)
}

/// Whether [`backward_with_sum`] can sum the copy's columns in its kernel: the one-pass kernels
/// (C <= 1024), a bf16 copy, and the switch (`SMELT_FUSED_PROJ_BIAS`).
pub(crate) fn can_sum_copy(be: &CudaBackend, dinp_copy: &CudaViewMut<'_>, c: usize) -> bool {
    be.tuning().fused_proj_bias && fused_k(c).is_some() && dinp_copy.is_bf16()
}

/// [`backward`] with a bf16 copy, and `dsum (C) +=` the column sums of that copy (the bias
/// gradient of the projection whose output gradient it is), summed by the one-pass kernel from
/// the rows it stored: per chunk in row order, then colsum's finish, bitwise the column-sum pass
/// over the copy. The caller checked [`can_sum_copy`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_with_sum(
    be: &CudaBackend,
    accumulate: bool,
    dinp: CudaViewMut<'_>,
    dinp_copy: CudaViewMut<'_>,
    dsum: CudaViewMut<'_>,
    dw: CudaViewMut<'_>,
    db: CudaViewMut<'_>,
    dout: CudaView<'_>,
    inp: CudaView<'_>,
    w: CudaView<'_>,
    mean: CudaView<'_>,
    rstd: CudaView<'_>,
    c: usize,
) {
    assert!(can_sum_copy(be, &dinp_copy, c), "layernorm backward: the copy's column sums need the one-pass kernels and a bf16 copy");
    assert_eq!(dsum.len, c, "layernorm backward: the copy's column sums (C = {c}) into {} floats", dsum.len);
    backward_summing(be, accumulate, dinp, Some(dinp_copy), Some(dsum), dw, db, dout, inp, w, mean, rstd, c)
}

#[allow(clippy::too_many_arguments)]
fn backward_summing(
    be: &CudaBackend,
    accumulate: bool,
    mut dinp: CudaViewMut<'_>,
    dinp_copy: Option<CudaViewMut<'_>>,
    dsum: Option<CudaViewMut<'_>>,
    dw: CudaViewMut<'_>,
    db: CudaViewMut<'_>,
    dout: CudaView<'_>,
    inp: CudaView<'_>,
    w: CudaView<'_>,
    mean: CudaView<'_>,
    rstd: CudaView<'_>,
    c: usize,
) {
    assert!(c > 0 && inp.len.is_multiple_of(c), "layernorm backward: input of {} floats is not (N, {c})", inp.len);
    let n = inp.len / c;
    assert!(dinp.len == n * c && dout.len == n * c, "layernorm grads");
    assert!(dw.len == c && db.len == c && w.len == c, "layernorm param grads");
    assert!(mean.len == n && rstd.len == n, "layernorm saved state");
    if let Some(copy) = &dinp_copy {
        assert!(copy.is_bf16(), "layernorm backward: dinp's copy must be a bf16 view");
        assert_eq!(copy.len, dinp.len, "layernorm backward: dinp's copy has {} values, dinp {}", copy.len, dinp.len);
    }
    if n == 0 {
        return;
    }
    // the kernels' dinp_bf16 argument: 0 (null) for no copy
    let copy = dinp_copy.as_ref().map_or(0, |v| v.addr());
    let (_pdw_buf, pdw) = colsum::scratch(be, n, c);
    let (_pdb_buf, pdb) = colsum::scratch(be, n, c);
    // the copy's column-sum partials, when asked for (the kernels' pdsum: 0 for none)
    let pds = dsum.as_ref().map(|_| colsum::scratch(be, n, c));
    let pdsum = pds.as_ref().map_or(0, |(_, p)| *p);
    match fused_k(c) {
        Some(k) => backward_fused(be, k, accumulate, (&dinp, copy), (pdw, pdb, pdsum), &dout, &inp, &w, &mean, &rstd, n, c),
        None => {
            // the two-pass kernels only add: zero first when overwriting (the input kernel
            // then sees the final values, so its copy is of them too)
            if !accumulate {
                super::memory::fill(be, dinp.reborrow(), 0.0);
            }
            backward_two_pass(be, (&dinp, copy), (pdw, pdb), &dout, &inp, &w, &mean, &rstd, n, c)
        }
    }
    colsum::finish2(be, (dw.ptr(), pdw), (db.ptr(), pdb), n, c);
    if let Some(dsum) = dsum {
        colsum::finish(be, dsum.ptr(), pdsum, n, c);
    }
}

/// One pass (C <= 1024): a block of 8 warps per chunk of `ROWS_PER_TASK` rows writes dinp (+=)
/// (and its bf16 copy at device address `copy`, unless 0) and the chunk's partials (pdw, pdb,
/// and with a copy pdsum, the copy's column sums, unless 0), each (chunks, C).
#[allow(clippy::too_many_arguments)]
fn backward_fused(
    be: &CudaBackend,
    k: usize,
    accumulate: bool,
    (dinp, copy): (&CudaViewMut<'_>, u64),
    (pdw, pdb, pdsum): (u64, u64, u64),
    dout: &CudaView<'_>,
    inp: &CudaView<'_>,
    w: &CudaView<'_>,
    mean: &CudaView<'_>,
    rstd: &CudaView<'_>,
    n: usize,
    c: usize,
) {
    let name = format!("layernorm_backward_fused{}_k{k}", dout_tag(dout));
    let f = be.func(&name);
    let smem = fused_smem_bytes(c);
    // Above 48 KiB (C > 768) a kernel must opt in to its dynamic shared memory (per function).
    if smem > NO_OPT_IN_SMEM {
        // a driver call: this thread needs the context current (not left to whatever ran before)
        be.check(be.stream().context().bind_to_thread(), "bind context");
        be.check(
            f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32),
            &format!("{name}: raising dynamic shared memory to {smem} bytes"),
        );
    }
    let (rows, cc, per) = (n as u64, c as u64, ROWS_PER_TASK as u64);
    let cfg = LaunchConfig {
        grid_dim: (colsum::chunks(n) as u32, 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: smem,
    };
    let mut l = be.stream().launch_builder(&f);
    l.arg(dinp.ptr_ref()).arg(&copy).arg(&pdw).arg(&pdb).arg(&pdsum).arg(dout.addr_ref()).arg(inp.ptr_ref()).arg(w.ptr_ref());
    let acc = accumulate as i32;
    l.arg(mean.ptr_ref()).arg(rstd.ptr_ref()).arg(&rows).arg(&cc).arg(&per).arg(&acc);
    // SAFETY: layernorm_backward_fused[_bf16dout]_k{K}(float*, unsigned short* (null or N*C bf16),
    // float* x2, float* (null or chunks*C), const float* or (bf16dout) const unsigned short*
    // dout, const float* x4, u64, u64, u64, int) with 32 K >= C, the variant chosen by dout's
    // type: sizes asserted by the caller; writes chunks*C floats to each scratch buffer.
    be.check(unsafe { l.launch(cfg) }.map(|_| ()), &name);
}

/// Dynamic shared memory a kernel may take without opting in.
const NO_OPT_IN_SMEM: u32 = 48 * 1024;

/// Dynamic shared memory of the fused kernel: a (2, C) f32 slice per warp (its dw, db partials).
fn fused_smem_bytes(c: usize) -> u32 {
    (ROWS_PER_BLOCK * 2 * c * std::mem::size_of::<f32>()) as u32
}

/// Two passes (any C): the input gradient one warp per row (dinp += it, and the sum's bf16 copy
/// at `copy` unless 0), then the partials per (chunk, column).
#[allow(clippy::too_many_arguments)]
fn backward_two_pass(
    be: &CudaBackend,
    (dinp, copy): (&CudaViewMut<'_>, u64),
    (pdw, pdb): (u64, u64),
    dout: &CudaView<'_>,
    inp: &CudaView<'_>,
    w: &CudaView<'_>,
    mean: &CudaView<'_>,
    rstd: &CudaView<'_>,
    n: usize,
    c: usize,
) {
    let (rows, cc) = (n as u64, c as u64);
    let tag = dout_tag(dout);
    let name = format!("layernorm_backward_input{tag}");
    let f = be.func(&name);
    let mut l = be.stream().launch_builder(&f);
    l.arg(dinp.ptr_ref()).arg(&copy).arg(dout.addr_ref()).arg(inp.ptr_ref()).arg(w.ptr_ref()).arg(mean.ptr_ref()).arg(rstd.ptr_ref()).arg(&rows).arg(&cc);
    // SAFETY: layernorm_backward_input[_bf16dout](float*, unsigned short* (null or N*C bf16),
    // const float* or (bf16dout) const unsigned short* dout, const float* x4, u64, u64), chosen
    // by dout's type: sizes asserted.
    be.check(unsafe { l.launch(warp_per_row_cfg(n)) }.map(|_| ()), &name);

    let name = format!("layernorm_backward_params_partial{tag}");
    let f = be.func(&name);
    let per = ROWS_PER_TASK as u64;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&pdw).arg(&pdb).arg(dout.addr_ref()).arg(inp.ptr_ref()).arg(mean.ptr_ref()).arg(rstd.ptr_ref()).arg(&rows).arg(&cc).arg(&per);
    // SAFETY: layernorm_backward_params_partial[_bf16dout](float*, float*, const float* or
    // (bf16dout) const unsigned short* dout, const float* x3, u64, u64, u64), chosen by dout's
    // type, writes chunks*C floats to each scratch buffer.
    be.check(unsafe { l.launch(colsum::partial_cfg(n, c)) }.map(|_| ()), &name);
}

#[cfg(test)]
mod tests {
    use super::{forward_kernel, fused_k, fused_smem_bytes, FUSED_K, NO_OPT_IN_SMEM};

    #[test]
    fn fused_k_is_the_smallest_bucket_covering_c() {
        assert_eq!(fused_k(1), Some(4));
        assert_eq!(fused_k(128), Some(4));
        assert_eq!(fused_k(129), Some(8));
        assert_eq!(fused_k(768), Some(24));
        assert_eq!(fused_k(769), Some(32));
        assert_eq!(fused_k(1024), Some(32));
        assert_eq!(fused_k(1025), None);
        // every K is whole groups of 4 columns (the kernels' float4 layout)
        assert!(FUSED_K.iter().all(|k| k % 4 == 0));
    }

    #[test]
    fn fused_shared_memory_fits() {
        // GPT-2's C = 768 needs no opt-in; the widest fused C (1024) opts in to 64 KiB, which
        // every architecture from sm_75 on grants (two blocks per SM from sm_80 on)
        assert_eq!(fused_smem_bytes(768), NO_OPT_IN_SMEM);
        let widest = 32 * FUSED_K[FUSED_K.len() - 1];
        assert_eq!(fused_smem_bytes(widest), 64 * 1024);
    }

    #[test]
    fn backward_kernel_names_exist_in_the_source() {
        let names = crate::cuda::kernels::kernel_names(include_str!("kernels/layernorm.cu"));
        let mut want: Vec<String> = Vec::new();
        for tag in ["", "_bf16dout"] {
            want.extend(FUSED_K.iter().map(|k| format!("layernorm_backward_fused{tag}_k{k}")));
            want.push(format!("layernorm_backward_input{tag}"));
            want.push(format!("layernorm_backward_params_partial{tag}"));
        }
        for name in want {
            assert!(names.contains(&name), "{name} missing from layernorm.cu: {names:?}");
        }
    }

    /// Device addresses [out, inp, w, b], all on a 256-byte boundary (as cudaMalloc returns).
    const ALIGNED: [u64; 4] = [0x7f00_0000_0000, 0x7f00_0010_0000, 0x7f00_0020_0000, 0x7f00_0030_0000];

    #[test]
    fn forward_takes_the_register_kernel_only_for_aligned_rows_up_to_1024() {
        let pick = |c, bf16, addrs| forward_kernel(c, bf16, addrs);
        assert_eq!(pick(768, false, ALIGNED), "layernorm_forward_k24");
        assert_eq!(pick(768, true, ALIGNED), "layernorm_forward_bf16out_k24");
        assert_eq!(pick(4, false, ALIGNED), "layernorm_forward_k4");
        assert_eq!(pick(132, true, ALIGNED), "layernorm_forward_bf16out_k8");
        assert_eq!(pick(1024, false, ALIGNED), "layernorm_forward_k32");
        // 25 groups of 4: lanes 25..31 hold none
        assert_eq!(pick(100, false, ALIGNED), "layernorm_forward_k4");
        // C % 4 != 0 (rows start off their 16-byte words), C above 1024
        assert_eq!(pick(102, false, ALIGNED), "layernorm_forward");
        assert_eq!(pick(7, true, ALIGNED), "layernorm_forward_bf16out");
        assert_eq!(pick(1028, false, ALIGNED), "layernorm_forward");
        assert_eq!(pick(1028, true, ALIGNED), "layernorm_forward_bf16out");
        // each buffer one f32 (or, for a bf16 out, one bf16) past its word: the scalar kernel
        for i in 0..4 {
            let mut a = ALIGNED;
            a[i] += 4;
            assert_eq!(pick(768, false, a), "layernorm_forward", "f32 out, pointer {i} + 4 bytes");
            a[i] = ALIGNED[i] + if i == 0 { 2 } else { 4 };
            assert_eq!(pick(768, true, a), "layernorm_forward_bf16out", "bf16 out, pointer {i} off its word");
        }
        // a bf16 out needs only its 8-byte word (4 values), an f32 one the whole 16
        let mut a = ALIGNED;
        a[0] += 8;
        assert_eq!(pick(768, true, a), "layernorm_forward_bf16out_k24");
        assert_eq!(pick(768, false, a), "layernorm_forward");
    }

    #[test]
    fn forward_kernel_names_exist_in_the_source() {
        let names = crate::cuda::kernels::kernel_names(include_str!("kernels/layernorm.cu"));
        // every name forward_kernel can give: all C up to past the last bucket, both outs,
        // aligned and not
        let mut off = ALIGNED;
        off[1] += 4;
        let mut want = std::collections::BTreeSet::new();
        for c in 1..=32 * FUSED_K[FUSED_K.len() - 1] + 8 {
            for bf16 in [false, true] {
                want.insert(forward_kernel(c, bf16, ALIGNED));
                want.insert(forward_kernel(c, bf16, off));
            }
        }
        // the scalar pair and a _k{K} pair per bucket
        assert_eq!(want.len(), 2 + 2 * FUSED_K.len(), "{want:?}");
        for name in want {
            assert!(names.contains(&name), "{name} missing from layernorm.cu: {names:?}");
        }
    }
}
