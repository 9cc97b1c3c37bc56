//! Attention with learned scores on CUDA (kernels in `kernels/learned_scores.cu`): Luong's
//! general score `q^T W_h k / sqrt(hd)` and Bahdanau's additive score
//! `v_h . tanh(q Wq_h + k Wk_h)`, with the semantics of `cpu/attention_ex.rs` and the dot-score
//! kernels' layouts, key padding mask, causal masking and saved state (the lse (B, H, Tq) at the
//! start of `attention_saved_len`, whose length does not depend on the score).
//!
//! Each call first makes the score's features per head, (B, H, T, W) f32 scratch: the general
//! score's `scale q W_h` (its keys are k itself), the additive score's `q Wq_h` and `k Wk_h`
//! (W = A). The backward pass makes them again rather than keep them between the passes, then
//! runs a query-side kernel (the query features' gradient, D) and a key-side one (dv, and dk or
//! the key features' gradient), and takes the features' gradients back to q, k and the score
//! parameters. Each gradient element is summed by one thread in a fixed order, so results are
//! the same on every run. The kernels compute in f32 and read and write f32 or bf16 activations.
//!
//! These are plain f32 kernels, no tensor cores: the dot score (every GPT, BERT and T5 preset)
//! keeps the flash kernels of `attention.rs`; the learned scores are for the models that ask for
//! them, and the additive score costs a tanh per feature and pair whatever the kernel.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::attention::{check_io, check_shape, gradient_pointers, key_lens_ptr, params, saved_len, scratch, Params};
use crate::backend::{AttnShape, QkvSource, Scores};
use crate::cuda::view::{CudaView, CudaViewMut};
use crate::cuda::{CudaBackend, CudaIds};

/// Rows (queries or keys) of an attention block and inner tile length, fixed in the .cu file.
const ROWS: usize = 16;
const TILE: usize = 32;
const THREADS: u32 = 128;
/// Threads per block of the projection and sum kernels.
const FLAT_THREADS: u32 = 256;
/// Widest feature row (the additive width A) and head the kernels take: 4 columns per lane.
pub(crate) const MAX_WIDTH: usize = 128;

/// Kernel parameters, `LsParams` in learned_scores.cu (same fields, same order).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct LsParams {
    batch: i32,
    tq: i32,
    tk: i32,
    heads: i32,
    hd: i32,
    q_ld: i32,
    q_off: i32,
    k_ld: i32,
    k_off: i32,
    v_ld: i32,
    v_off: i32,
    causal: i32,
    io_bf16: i32,
    /// W: hd for the general score, A for the additive one.
    width: i32,
    additive: i32,
    /// Backward: 1 adds into dq, dk, dv; 0 writes over them.
    accumulate: i32,
    /// Device pointer to `key_lens (B)` (u32), or 0 for no padding mask.
    key_lens: u64,
}

// SAFETY: plain-old-data with C layout (16 i32 then a u64 at offset 64), matching the kernels'
// by-value struct parameter.
unsafe impl DeviceRepr for LsParams {}

impl LsParams {
    fn of(p: &Params, width: usize, additive: bool) -> LsParams {
        LsParams {
            batch: p.batch,
            tq: p.tq,
            tk: p.tk,
            heads: p.heads,
            hd: p.hd,
            q_ld: p.q_ld,
            q_off: p.q_off,
            k_ld: p.k_ld,
            k_off: p.k_off,
            v_ld: p.v_ld,
            v_off: p.v_off,
            causal: p.causal,
            io_bf16: p.io_bf16,
            width: width as i32,
            additive: additive as i32,
            accumulate: p.accumulate,
            key_lens: p.key_lens,
        }
    }
}

/// A learned score's parameters as device pointers (f32 views of the parameter buffer): the
/// general score's W, or the additive score's Wq, Wk and v; and the feature width W.
#[derive(Clone, Copy)]
struct Learned {
    w_q: u64,
    /// The additive score's Wk and v (0 for the general score).
    w_k: u64,
    v: u64,
    width: usize,
    additive: bool,
}

impl Learned {
    /// Checks the parameters' lengths against the shape ((H, hd, hd) or (H, hd, A) and (H, A)).
    fn of<V: ParamPtr>(scores: &Scores<V>, s: &AttnShape, what: &str) -> Learned {
        let (h, hd) = (s.heads, s.head_dim());
        match scores {
            Scores::Dot => unreachable!("the dot score runs attention.rs's kernels"),
            Scores::General { w } => {
                assert_eq!(w.elements(), h * hd * hd, "general score {what}w (H,hd,hd)");
                Learned { w_q: w.f32_ptr(), w_k: 0, v: 0, width: hd, additive: false }
            }
            Scores::Additive { wq, wk, v, width } => {
                let a = *width;
                assert!(
                    (1..=MAX_WIDTH).contains(&a),
                    "additive score width {a}: the CUDA kernels take 1..={MAX_WIDTH} (model config `additive_width`)"
                );
                assert_eq!(wq.elements(), h * hd * a, "additive score {what}wq (H,hd,A)");
                assert_eq!(wk.elements(), h * hd * a, "additive score {what}wk (H,hd,A)");
                assert_eq!(v.elements(), h * a, "additive score {what}v (H,A)");
                Learned { w_q: wq.f32_ptr(), w_k: wk.f32_ptr(), v: v.f32_ptr(), width: a, additive: true }
            }
        }
    }
}

/// Read and write views of the parameter buffer, as the f32 pointers the kernels take.
trait ParamPtr {
    fn elements(&self) -> usize;
    fn f32_ptr(&self) -> u64;
}
impl ParamPtr for CudaView<'_> {
    fn elements(&self) -> usize {
        self.len
    }
    fn f32_ptr(&self) -> u64 {
        self.ptr()
    }
}
impl ParamPtr for CudaViewMut<'_> {
    fn elements(&self) -> usize {
        self.len
    }
    fn f32_ptr(&self) -> u64 {
        self.ptr()
    }
}

/// The kernel `name`, opted in to `cfg`'s dynamic shared memory when that is above 48 KiB.
fn kernel(be: &CudaBackend, name: &str, cfg: &LaunchConfig) -> cudarc::driver::CudaFunction {
    let f = be.func(name);
    if cfg.shared_mem_bytes > 48 * 1024 {
        be.check(
            f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, cfg.shared_mem_bytes as i32),
            &format!("{name}: raising dynamic shared memory to {} bytes", cfg.shared_mem_bytes),
        );
    }
    f
}

/// Launches kernel `$name` with `$cfg` and the arguments (references) in order.
macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let (be, name, cfg): (&CudaBackend, &str, LaunchConfig) = ($be, $name, $cfg);
        let f = kernel(be, name, &cfg);
        let mut b = be.stream().launch_builder(&f);
        $( b.arg($arg); )+
        // SAFETY: every call passes the arguments of the kernel's parameter list in order:
        // pointers to buffers whose lengths were checked against the shape in LsParams, and the
        // kernels touch only rows < Tq / Tk, head columns < hd and features < W of them.
        be.check(unsafe { b.launch(cfg) }.map(|_| ()), name);
    }};
}

/// An attention kernel's grid over `rows` rows (queries or keys) with `floats` of shared memory.
fn rows_cfg(s: &AttnShape, rows: usize, floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS) as u32, s.heads as u32, s.batch as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: (4 * floats) as u32,
    }
}

/// A thread per element of `n`.
fn flat_cfg(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(FLAT_THREADS as usize) as u32, 1, 1), block_dim: (FLAT_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// f32 scratch for this call (freed in stream order when dropped); None after recording why.
fn floats(be: &CudaBackend, len: usize, what: &str) -> Option<CudaSlice<f32>> {
    // SAFETY: every caller's kernels write each element before one reads it (the project and
    // attention kernels write their whole outputs).
    unsafe { scratch::<f32>(be, len.max(1), what) }
}

/// The score's features: the queries' (B, H, Tq, W) and, for the additive score, the keys'
/// (B, H, Tk, A) (the general score's keys are k itself, read from kv by the kernels).
struct Features {
    q: CudaSlice<f32>,
    k: Option<CudaSlice<f32>>,
}

impl Features {
    fn make(be: &CudaBackend, p: &LsParams, l: &Learned, s: &AttnShape, (q, kv): (u64, u64)) -> Option<Features> {
        let w = l.width;
        let qf = floats(be, s.batch * s.heads * s.q_len * w, "learned attention scores: allocating the query features")?;
        let scale = if l.additive { 1.0 } else { 1.0 / (s.head_dim() as f32).sqrt() };
        project(be, p, be.buf_ptr(&qf), q, l.w_q, (s.q_len, p.q_ld, p.q_off), scale);
        let kf = if l.additive {
            let kf = floats(be, s.batch * s.heads * s.kv_len * w, "learned attention scores: allocating the key features")?;
            project(be, p, be.buf_ptr(&kf), kv, l.w_k, (s.kv_len, p.k_ld, p.k_off), 1.0);
            Some(kf)
        } else {
            None
        };
        Some(Features { q: qf, k: kf })
    }
    fn q_ptr(&self, be: &CudaBackend) -> u64 {
        be.buf_ptr(&self.q)
    }
    fn k_ptr(&self, be: &CudaBackend) -> u64 {
        self.k.as_ref().map_or(0, |k| be.buf_ptr(k))
    }
}

/// feat (B, H, rows, W) = alpha x_h w_h, x's head columns at (rows, ld, off).
fn project(be: &CudaBackend, p: &LsParams, feat: u64, x: u64, w: u64, (rows, ld, off): (usize, i32, i32), alpha: f32) {
    let n = p.batch as usize * p.heads as usize * rows * p.width as usize;
    let rows = rows as i32;
    launch!(be, "learned_scores_project", flat_cfg(n), &feat, &x, &w, &rows, &ld, &off, &alpha, p);
}

/// Rows per chunk of a gradient's sums over `n_rows` rows into `len` outputs, and the chunk
/// count: ~256 rows a chunk, whole 32-row tiles, at most [`MAX_CHUNKS`] chunks and
/// [`MAX_PARTIALS`] partial sums in all (wide heads need fewer chunks to fill the card). A
/// function of the shape alone, so every run sums in the same order.
fn row_chunks(n_rows: usize, len: usize) -> (usize, usize) {
    let n_rows = n_rows.max(1);
    let chunks = n_rows.div_ceil(256).clamp(1, MAX_CHUNKS).min((MAX_PARTIALS / len.max(1)).max(1));
    let chunk = n_rows.div_ceil(chunks).div_ceil(WTILE) * WTILE;
    (chunk, n_rows.div_ceil(chunk))
}
/// See [`row_chunks`].
const MAX_CHUNKS: usize = 128;
/// See [`row_chunks`] (32 MB of f32 partials).
const MAX_PARTIALS: usize = 8 << 20;
/// The weight-gradient tile (LS_WTILE in learned_scores.cu).
const WTILE: usize = 32;

/// dst (len) += alpha * the sum over `chunks` partials (chunks, len), in order.
fn sum_chunks(be: &CudaBackend, dst: u64, part: u64, chunks: usize, len: usize, alpha: f32) {
    let (c, n) = (chunks as i32, len as i32);
    launch!(be, "learned_scores_sum_chunks", flat_cfg(len), &dst, &part, &c, &n, &alpha);
}

/// dx's head columns at (rows, ld, off) += alpha dfeat_h w_h^T (written over unless
/// p.accumulate), and dw += alpha x_h^T dfeat_h (chunked partial sums, then their sum).
#[allow(clippy::too_many_arguments)]
fn project_back(be: &CudaBackend, p: &LsParams, dx: u64, dw: u64, x: u64, dfeat: u64, w: u64, (rows, ld, off): (usize, i32, i32), alpha: f32) {
    let (batch, heads, hd, width) = (p.batch as usize, p.heads as usize, p.hd as usize, p.width as usize);
    let r = rows as i32;
    launch!(be, "learned_scores_project_back_input", flat_cfg(batch * rows * heads * hd), &dx, &dfeat, &w, &r, &ld, &off, &alpha, p);
    let len = heads * hd * width;
    let (chunk, chunks) = row_chunks(batch * rows, len);
    let Some(part) = floats(be, chunks * len, "learned attention scores backward: allocating the weight gradients' partial sums") else { return };
    let cfg = LaunchConfig {
        grid_dim: ((hd.div_ceil(WTILE) * width.div_ceil(WTILE)) as u32, heads as u32, chunks as u32),
        block_dim: (FLAT_THREADS, 1, 1),
        shared_mem_bytes: (4 * 2 * WTILE * (WTILE + 1)) as u32,
    };
    let (part_p, ch) = (be.buf_ptr(&part), chunk as i32);
    launch!(be, "learned_scores_weight_partials", cfg, &part_p, &x, &dfeat, &r, &ld, &off, &ch, p);
    sum_chunks(be, dw, part_p, chunks, len, alpha);
    drop(part);
}

/// dva (H, A) += the sum of the additive v's row shares dva_rows (B, H, Tq, A).
fn sum_rows(be: &CudaBackend, p: &LsParams, dva: u64, dva_rows: u64) {
    let (heads, width) = (p.heads as usize, p.width as usize);
    let (chunk, chunks) = row_chunks(p.batch as usize * p.tq as usize, heads * width);
    let Some(part) = floats(be, chunks * heads * width, "learned attention scores backward: allocating the score vector's partial sums") else { return };
    let cfg = LaunchConfig { grid_dim: (heads as u32, chunks as u32, 1), block_dim: (MAX_WIDTH as u32, 1, 1), shared_mem_bytes: 0 };
    let (part_p, ch) = (be.buf_ptr(&part), chunk as i32);
    launch!(be, "learned_scores_row_partials", cfg, &part_p, &dva_rows, &ch, p);
    sum_chunks(be, dva, part_p, chunks, heads * width, 1.0);
    drop(part);
}

/// `Backend::attention_ex_forward` with a general or additive score: out (B, Tq, C) and the lse
/// at the start of `saved`.
pub(crate) fn forward(
    be: &CudaBackend,
    out: CudaViewMut<'_>,
    saved: CudaViewMut<'_>,
    src: QkvSource<CudaView<'_>>,
    scores: Scores<CudaView<'_>>,
    key_lens: Option<&CudaIds>,
    shape: AttnShape,
) {
    check_shape(&shape);
    let (ap, q, kv) = params(&shape, &src, key_lens_ptr(be, key_lens, &shape));
    check_io(be, ap.io_bf16 != 0, out.is_bf16(), "out");
    assert_eq!(out.len, shape.batch * shape.q_len * shape.channels, "attention out (B,Tq,C)");
    assert_eq!(saved.len, saved_len(be, shape), "attention saved state");
    let l = Learned::of(&scores, &shape, "");
    if shape.batch == 0 || shape.q_len == 0 {
        return;
    }
    assert!(shape.kv_len > 0, "attention: no keys to attend to");
    let p = LsParams::of(&ap, l.width, l.additive);
    let Some(feats) = Features::make(be, &p, &l, &shape, (q, kv)) else { return };
    let (w, hd) = (l.width, shape.head_dim());
    let smem = ROWS * w + TILE * (w + 1) + TILE * (hd + 1) + w;
    let (out_p, qf, kf, lse) = (out.addr(), feats.q_ptr(be), feats.k_ptr(be), saved.ptr());
    launch!(be, "learned_attention_forward", rows_cfg(&shape, shape.q_len, smem), &out_p, &lse, &qf, &kf, &kv, &l.v, &p);
    drop(feats);
}

/// `Backend::attention_ex_backward(_set)` with a general or additive score: dq, dk, dv into
/// `dsrc` (added, or written over when `accumulate` is false), the score parameters' gradients
/// added into `dscores`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    be: &CudaBackend,
    dsrc: QkvSource<CudaViewMut<'_>>,
    dscores: Scores<CudaViewMut<'_>>,
    dout: CudaView<'_>,
    src: QkvSource<CudaView<'_>>,
    scores: Scores<CudaView<'_>>,
    key_lens: Option<&CudaIds>,
    out: CudaView<'_>,
    saved: CudaView<'_>,
    shape: AttnShape,
    accumulate: bool,
) {
    check_shape(&shape);
    assert_eq!(dscores.kind(), scores.kind(), "dscores must be of the same kind as scores");
    let (mut ap, q, kv) = params(&shape, &src, key_lens_ptr(be, key_lens, &shape));
    ap.accumulate = accumulate as i32;
    let (dq, dkv) = gradient_pointers(be, &ap, &dsrc, &src, &shape);
    let n_out = shape.batch * shape.q_len * shape.channels;
    assert_eq!(dout.len, n_out, "attention dout (B,Tq,C)");
    assert_eq!(out.len, n_out, "attention out (B,Tq,C)");
    assert_eq!(saved.len, saved_len(be, shape), "attention saved state");
    check_io(be, ap.io_bf16 != 0, dout.is_bf16(), "dout");
    check_io(be, ap.io_bf16 != 0, out.is_bf16(), "out");
    let l = Learned::of(&scores, &shape, "");
    let dl = Learned::of(&dscores, &shape, "gradient ");
    if shape.batch == 0 || shape.q_len == 0 {
        return;
    }
    assert!(shape.kv_len > 0, "attention: no keys to attend to");
    let p = LsParams::of(&ap, l.width, l.additive);
    let Some(feats) = Features::make(be, &p, &l, &shape, (q, kv)) else { return };
    let (w, hd, bh) = (l.width, shape.head_dim(), shape.batch * shape.heads);
    let what = "learned attention scores backward: allocating scratch";
    let Some(dqf) = floats(be, bh * shape.q_len * w, what) else { return };
    let Some(dsum) = floats(be, bh * shape.q_len, what) else { return };
    let (dva_rows, dkf) = if l.additive {
        let Some(a) = floats(be, bh * shape.q_len * w, what) else { return };
        let Some(b) = floats(be, bh * shape.kv_len * w, what) else { return };
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    let ptr = |x: &Option<CudaSlice<f32>>| x.as_ref().map_or(0, |x| be.buf_ptr(x));
    let (qf, kf, lse, dqf_p, dsum_p) = (feats.q_ptr(be), feats.k_ptr(be), saved.ptr(), be.buf_ptr(&dqf), be.buf_ptr(&dsum));
    let (dva_p, dkf_p, dout_p, out_p) = (ptr(&dva_rows), ptr(&dkf), dout.addr(), out.addr());

    let smem_rows = ROWS * w + ROWS * hd + TILE * (w + 1) + TILE * (hd + 1) + w;
    launch!(be, "learned_attention_backward_rows", rows_cfg(&shape, shape.q_len, smem_rows), &dqf_p, &dva_p, &dsum_p, &qf, &kf, &kv, &l.v, &out_p, &dout_p, &lse, &p);
    let smem_keys = ROWS * w + ROWS * hd + TILE * (w + 1) + TILE * (hd + 1) + 2 * TILE + w;
    launch!(be, "learned_attention_backward_keys", rows_cfg(&shape, shape.kv_len, smem_keys), &dkv, &dkf_p, &qf, &kf, &kv, &l.v, &dout_p, &lse, &dsum_p, &p);
    // q features -> dq, dW (general, alpha = scale) or dWq (additive)
    let alpha = if l.additive { 1.0 } else { 1.0 / (hd as f32).sqrt() };
    project_back(be, &p, dq, dl.w_q, q, dqf_p, l.w_q, (shape.q_len, p.q_ld, p.q_off), alpha);
    if l.additive {
        // key features -> dk, dWk; the rows' shares of dv_h summed
        project_back(be, &p, dkv, dl.w_k, kv, dkf_p, l.w_k, (shape.kv_len, p.k_ld, p.k_off), 1.0);
        sum_rows(be, &p, dl.v, dva_p);
    }
    drop((feats, dqf, dsum, dva_rows, dkf));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_kernels_struct() {
        // 16 four-byte fields, then the key_lens pointer at offset 64 (learned_scores.cu)
        assert_eq!(std::mem::size_of::<LsParams>(), 72);
        assert_eq!(std::mem::offset_of!(LsParams, key_lens), 64);
        let src = include_str!("kernels/learned_scores.cu");
        let body = &src[src.find("struct LsParams {").unwrap()..];
        let body = &body[..body.find("};").unwrap()];
        let fields: Vec<&str> = body
            .lines()
            .skip(1)
            .flat_map(|l| l.split("//").next().unwrap().split(';'))
            .flat_map(|decl| decl.trim().trim_start_matches("int ").trim_start_matches("const unsigned* ").split(','))
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(
            fields,
            ["batch", "tq", "tk", "heads", "hd", "q_ld", "q_off", "k_ld", "k_off", "v_ld", "v_off", "causal", "io_bf16", "width", "additive", "accumulate", "key_lens"]
        );
    }

    #[test]
    fn row_chunks_cover_the_rows_in_whole_tiles() {
        for len in [64, 12 * 64 * 64, 16 * 128 * 128] {
            for n in [1, 31, 32, 33, 255, 256, 257, 4096, 16_384, 16_385, 1 << 20] {
                let (chunk, chunks) = row_chunks(n, len);
                assert_eq!(chunk % WTILE, 0, "{n}");
                assert!(chunks * chunk >= n && (chunks - 1) * chunk < n, "{n}: {chunks} chunks of {chunk}");
                assert!(chunks <= MAX_CHUNKS && chunks * len <= MAX_PARTIALS.max(len), "{n} x {len}: {chunks} chunks");
            }
        }
        assert_eq!(row_chunks(16_384, 12 * 64 * 64), (256, 64), "BERT-base's 32 x 512 rows, 12 heads of 64 x 64: 64 chunks of 256 rows");
        assert_eq!(row_chunks(1 << 20, 16 * 128 * 128), (1 << 15, 32), "the widest heads: the partials capped at 32 MB");
        assert_eq!(row_chunks(0, 64), (32, 1), "no rows: one (empty) chunk");
    }
}
