// Flash-style multi-head attention (FlashAttention-2 structure): no (T, T) matrix ever reaches
// device memory. One NVRTC module, compiled from these files in this order (kernels.rs
// `ATTENTION_SOURCE`):
//   attention.cuh             what every kernel shares: AttnParams, masks, warp reductions
//   attention_f32.cu          the f32 reference kernels (any GPU)
//   attention_mma.cuh         the tensor-core kernels' primitives (mma, ldmatrix, cp.async,
//                             bulk reductions), fragments, tile scheduling and copies
//   attention_operands.cu     their head-major operand copies and backward row statistics
//   attention_mma_forward.cu  the bf16 tensor-core forward
//   attention_mma_backward.cu the bf16 tensor-core backward (dkv and dq passes, or fused)
// Semantics match engine/src/cpu/attention.rs exactly:
//   per head h, out_h = softmax(q_h k_h^T * scale) v_h, scale = 1/sqrt(hd), causal: key j <= i.
// Layouts (row-major, f32): queries come from `q` rows of stride q_ld at column q_off, keys and
// values from `kv` rows of stride k_ld / v_ld at k_off / v_off; head h owns channels
// h*hd .. (h+1)*hd of each. Packed self-attention: q = kv = qkv (B,T,3C), offsets 0, C, 2C,
// strides 3C. Split cross-attention: q (B,Tq,C), kv (B,Tk,2C) with k at 0 and v at C.
// Saved state: lse (B,H,Tq) = log-sum-exp of each row's scaled scores.
//
// Tiling of the f32 kernels (the tensor-core one is described with it): a block of 256 threads owns a 64-row tile; thread
// (ty, tx) = (tid / 16, tid % 16) owns tile rows ty + 16a (a < 4) and, of a (64, 64) score tile,
// columns tx + 16b (b < 4); of a (64, hd) accumulator, columns tx + 16c (c < NC). Strided
// ownership makes the 16 threads of a half-warp read 16 different padded shared rows, so the
// padding (+1 float per row) puts them in 16 different banks. Row reductions of a score tile run
// over the 16 lanes of a half-warp (shuffle xor 8, 4, 2, 1 never crosses a half-warp).
// Head dims are padded to W = 16 * NC (NC = 2, 4, 8 -> hd <= 32, 64, 128) with zeros in shared
// memory, so dot products need no bounds checks; only global reads and writes check d < hd.
//
// Kernels (grid; f32 kernels 256 threads, bf16 tensor-core kernels 128):
//   attention_forward_{f32,bf16}_d{32,64,128}       grid (ceil(Tq/64), H, B)
//   attention_backward_dot_f32                      grid (ceil(B*Tq*H/8)), a warp per (b, i, h)
//   attention_backward_dkv_{f32,bf16}_d{32,64,128}  grid (ceil(Tk/64), H, B)
//   attention_backward_dq_{f32,bf16}_d{32,64,128}   grid (ceil(Tq/64), H, B)
//   attention_backward_fused_bf16_d{32,64,128}      grid (ceil(Tk/64), H, B): dkv and dq in one
//                                                   pass (opt-in), then attention_dq_from_acc
//   attention_heads_bf16, attention_backward_stats  bf16 family's operand copies and row stats
// An optional key padding mask (AttnParams.key_lens) hides keys j >= key_lens[b]; key tiles
// entirely past it are skipped.
// Backward accumulates (+=): every gradient element is owned by exactly one thread of one
// kernel, so the read-modify-write needs no atomics and the result is deterministic (all but
// the fused backward's dq, which adds into a scratch from every key tile).

#define TILE 64
#define THREADS 256
#define SP (TILE + 1)  // padded row of a (64, 64) score tile in shared memory

// Keep in sync with `Params` in engine/src/cuda/attention.rs (repr(C), same field order).
struct AttnParams {
    int batch;         // B
    int tq, tk;        // query and key positions per batch element
    int channels;      // C
    int heads;         // H
    int hd;            // head dim C / H
    int q_ld, q_off;   // row stride and column offset of queries in `q` (and of dq in `dq`)
    int k_ld, k_off;   // of keys in `kv` (and of dk)
    int v_ld, v_off;   // of values in `kv` (and of dv)
    int causal;        // 1: query i sees keys j <= i
    float scale;       // 1 / sqrt(hd)
    int accumulate;    // backward: 1 adds into dq, dk, dv; 0 overwrites them (every element of
                       // this head's columns is written once).
    int io_bf16;       // bf16 family only: q, kv, out, dout, dq, dkv are bf16 activation buffers
                       // (engine/src/cuda/view.rs) instead of f32.
    int pairs;         // bf16 family with io_bf16: every one of those buffers, row stride and
                       // column offset allows 4-byte accesses to column pairs (d, d+1), d even
    int direct;        // bf16 family with io_bf16 and hd == W: the tiled kernels read q, k, v
                       // and dout straight from the activation buffers (rows of hd bf16 at
                       // 16-byte aligned addresses) instead of head-major copies
    const unsigned* key_lens;  // (B) keys j >= key_lens[b] are padding; null: all Tk are keys
    float* bias_partial;       // bf16 backward passes, packed self-attention, T % 64 == 0, no key
                               // padding: each block also writes the column sums of the gradient
                               // rows it stored (the qkv projection's bias-gradient partials,
                               // attention_mma.cuh add_bias_partial); null: not wanted
};

// A gradient element: added to (accumulate) or written over.
#define GRAD_STORE(dst, val) ((dst) = (p.accumulate ? (dst) : 0.0f) + (val))

// Overwrite mode: the dk and dv rows of a key tile of padding get zeros (their gradient), since
// the block that owns them leaves without computing anything. All threads of the block call it.
__device__ __forceinline__ void zero_padding_kv_tile(float* dkv, const AttnParams& p, int b, int h, int k0) {
    if (p.accumulate) return;
    for (int e = threadIdx.x; e < TILE * p.hd; e += blockDim.x) {
        const int j = k0 + e / p.hd, d = e % p.hd;
        if (j >= p.tk) break;
        dkv[((size_t)b * p.tk + j) * p.k_ld + p.k_off + h * p.hd + d] = 0.0f;
        dkv[((size_t)b * p.tk + j) * p.v_ld + p.v_off + h * p.hd + d] = 0.0f;
    }
}

// Keys of batch element b (its padding-mask length), each in 1..=Tk.
__device__ __forceinline__ int key_count(const AttnParams& p, int b) {
    return p.key_lens ? (int)p.key_lens[b] : p.tk;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Sum or max over the 16 lanes of a half-warp; every lane gets the result.
__device__ __forceinline__ float half_warp_max(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float half_warp_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}


// Whether key j exists (j < nk = key_count) and query i may attend to it. Padding rows
// i >= Tq pass too, so that their (discarded) forward statistics stay finite; key 0 is visible
// to every row, so every row's running max is finite from the first key tile on.
__device__ __forceinline__ bool key_visible(const AttnParams& p, int nk, int i, int j) {
    return j < nk && (!p.causal || j <= i);
}
// Whether the pair (i, j) contributes to the gradients: both exist and j is visible from i.
__device__ __forceinline__ bool visible(const AttnParams& p, int nk, int i, int j) {
    return i < p.tq && key_visible(p, nk, i, j);
}

