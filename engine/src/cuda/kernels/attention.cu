// Flash-style multi-head attention (FlashAttention-2 structure; an f32 reference version and a
// bf16 tensor-core version below it): no (T, T) matrix ever reaches device memory.
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
//   attention_heads_bf16, attention_backward_stats  bf16 family's operand copies and row stats
// An optional key padding mask (AttnParams.key_lens) hides keys j >= key_lens[b]; key tiles
// entirely past it are skipped.
// Backward accumulates (+=): every gradient element is owned by exactly one thread of one
// kernel, so the read-modify-write needs no atomics and the result is deterministic.

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

// Copies rows row0 .. row0+64 of a strided (rows, hd) matrix into a (64, W+1) shared tile,
// zero-filling rows >= nrows and columns >= hd. `g` points at column 0 of row 0.
template <int W>
__device__ __forceinline__ void load_tile(float* s, const float* g, int row0, int nrows,
                                          int ld, int hd) {
    for (int e = threadIdx.x; e < TILE * W; e += THREADS) {
        int r = e / W, d = e % W;
        int row = row0 + r;
        float x = 0.0f;
        if (row < nrows && d < hd) x = g[(size_t)row * ld + d];
        s[r * (W + 1) + d] = x;
    }
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

// acc (4,4) = A_tile B_tile^T for this thread's cells: acc[a][c] = sum_d A[ty+16a][d] B[tx+16c][d],
// A and B (64, W+1) shared tiles.
template <int W>
__device__ __forceinline__ void tile_dot(float (&acc)[4][4], const float* A, const float* B) {
    constexpr int WP = W + 1;
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[a][c] = 0.0f;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 8
    for (int d = 0; d < W; d++) {
        float x[4], y[4];
#pragma unroll
        for (int a = 0; a < 4; a++) x[a] = A[(ty + 16 * a) * WP + d];
#pragma unroll
        for (int c = 0; c < 4; c++) y[c] = B[(tx + 16 * c) * WP + d];
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][c] += x[a] * y[c];
    }
}

// acc (4,NC) += S_tile M_tile for this thread's cells: acc[a][c] += sum_j S[ty+16a][j] M[j][tx+16c],
// S a (64, 65) shared score tile, M a (64, W+1) shared tile.
template <int NC>
__device__ __forceinline__ void tile_accumulate(float (&acc)[4][NC], const float* S, const float* M) {
    constexpr int WP = 16 * NC + 1;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
    for (int j = 0; j < TILE; j++) {
        float mc[NC];
#pragma unroll
        for (int c = 0; c < NC; c++) mc[c] = M[j * WP + tx + 16 * c];
#pragma unroll
        for (int a = 0; a < 4; a++) {
            const float sa = S[(ty + 16 * a) * SP + j];
#pragma unroll
            for (int c = 0; c < NC; c++) acc[a][c] += sa * mc[c];
        }
    }
}

// ---- forward ------------------------------------------------------------------------------
// One block per (64-query tile, head, batch). Online softmax over 64-key tiles: per row keep the
// running max m and sum l of exp(s - m); when a tile raises m, rescale l and the output
// accumulator by exp(m_old - m_new). Shared: Q, K, V tiles (64, W+1) and P (64, 65).
template <int NC>
__device__ void forward_impl(float* out, float* lse, const float* q, const float* kv,
                             const AttnParams p) {
    constexpr int W = 16 * NC, WP = W + 1;
    extern __shared__ float smem[];
    float* Qs = smem;             // (64, WP) queries of this tile
    float* Ks = Qs + TILE * WP;   // (64, WP) keys of the current key tile
    float* Vs = Ks + TILE * WP;   // (64, WP) values of the current key tile
    float* Ps = Vs + TILE * WP;   // (64, SP) probabilities (unnormalised) of the current tile

    const int q0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const float* qb = q + (size_t)b * p.tq * p.q_ld + p.q_off + h * p.hd;   // (Tq, hd) stride q_ld
    const float* kb = kv + (size_t)b * p.tk * p.k_ld + p.k_off + h * p.hd;  // (Tk, hd) stride k_ld
    const float* vb = kv + (size_t)b * p.tk * p.v_ld + p.v_off + h * p.hd;  // (Tk, hd) stride v_ld

    load_tile<W>(Qs, qb, q0, p.tq, p.q_ld, p.hd);

    float m[4], l[4], o[4][NC];
#pragma unroll
    for (int a = 0; a < 4; a++) {
        m[a] = neg_inf();
        l[a] = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++) o[a][c] = 0.0f;
    }

    // Causal: keys past the tile's last query are invisible to every row of the tile.
    const int nk = key_count(p, b);  // key tiles past it are all padding: skipped
    const int kend = p.causal ? min(nk, q0 + TILE) : nk;
    for (int k0 = 0; k0 < kend; k0 += TILE) {
        __syncthreads();  // every thread is done reading the previous K, V and P tiles
        load_tile<W>(Ks, kb, k0, p.tk, p.k_ld, p.hd);
        load_tile<W>(Vs, vb, k0, p.tk, p.v_ld, p.hd);
        __syncthreads();  // Q (first pass), K and V are in shared memory

        float s[4][4];
        tile_dot<W>(s, Qs, Ks);  // q k^T, unscaled

        // online softmax, row by row; the 16 lanes sharing ty share the rows
#pragma unroll
        for (int a = 0; a < 4; a++) {
            const int i = q0 + ty + 16 * a;
            float rmax = neg_inf();
#pragma unroll
            for (int c = 0; c < 4; c++) {
                s[a][c] = key_visible(p, nk, i, k0 + tx + 16 * c) ? s[a][c] * p.scale : neg_inf();
                rmax = fmaxf(rmax, s[a][c]);
            }
            rmax = half_warp_max(rmax);
            const float m_new = fmaxf(m[a], rmax);
            // m_new is finite from the first tile on (key 0 is visible to every row); the guard
            // keeps exp(-inf - -inf) = NaN out should that ever change.
            const float base = m_new == neg_inf() ? 0.0f : m_new;
            const float corr = expf(m[a] - base);
            float rsum = 0.0f;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const float e = expf(s[a][c] - base);
                rsum += e;
                Ps[(ty + 16 * a) * SP + tx + 16 * c] = e;
            }
            rsum = half_warp_sum(rsum);
            l[a] = l[a] * corr + rsum;
            m[a] = m_new;
#pragma unroll
            for (int c = 0; c < NC; c++) o[a][c] *= corr;
        }
        __syncthreads();  // the whole P tile is written before any row of it is read

        tile_accumulate<NC>(o, Ps, Vs);  // o += P v over the 64 keys of this tile
    }

#pragma unroll
    for (int a = 0; a < 4; a++) {
        const int i = q0 + ty + 16 * a;
        if (i >= p.tq) continue;
        const float inv = 1.0f / l[a];
        float* orow = out + ((size_t)b * p.tq + i) * p.channels + h * p.hd;  // (B,Tq,C)
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d = tx + 16 * c;
            if (d < p.hd) orow[d] = o[a][c] * inv;
        }
        if (tx == 0) lse[((size_t)b * p.heads + h) * p.tq + i] = m[a] + logf(l[a]);
    }
}

// ---- backward ----------------------------------------------------------------------------
// With P = exp(s - lse) recomputed from q, k and the saved lse, dP = dout v^T and
// D_i = rowsum(dout_i * out_i) (= rowsum(P_i * dP_i)):
//   dS = P * (dP - D);  dv = P^T dout;  dk = scale dS^T q;  dq = scale dS k.


// D (B,H,Tq) from dout and out (B,Tq,C): one warp per (b, i, h) row, lanes stride over hd.
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_dot_f32(float* dsum, const float* dout, const float* out, const AttnParams p) {
    const size_t row = (size_t)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;  // (b*Tq + i)*H + h
    const int lane = threadIdx.x % 32;
    if (row >= (size_t)p.batch * p.tq * p.heads) return;  // whole warp leaves together
    const size_t bi = row / p.heads;  // b*Tq + i
    const int h = (int)(row % p.heads);
    const float* dy = dout + bi * p.channels + h * p.hd;
    const float* y = out + bi * p.channels + h * p.hd;
    float acc = 0.0f;
    for (int d = lane; d < p.hd; d += 32) acc += dy[d] * y[d];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const size_t b = bi / p.tq, i = bi % p.tq;
    if (lane == 0) dsum[(b * p.heads + h) * p.tq + i] = acc;
}

// Loads lse and D of queries q0 .. q0+64 (0 past Tq; those rows are masked anyway).
__device__ __forceinline__ void load_row_stats(float* lse_s, float* d_s, const float* lse,
                                               const float* dsum, const AttnParams& p, int b,
                                               int h, int q0) {
    if (threadIdx.x < TILE) {
        const int i = q0 + threadIdx.x;
        const size_t at = ((size_t)b * p.heads + h) * p.tq + i;  // (B,H,Tq)
        lse_s[threadIdx.x] = i < p.tq ? lse[at] : 0.0f;
        d_s[threadIdx.x] = i < p.tq ? dsum[at] : 0.0f;
    }
}

// dk and dv: one block per (64-key tile, head, batch), looping over the query tiles that can
// see it; this thread's (4, NC) slices of dk and dv stay in registers until the end. Shared:
// K, V, Q, dout tiles (64, W+1), P^T and dS^T (64 keys, 65), lse and D of the query tile.
template <int NC>
__device__ void backward_dkv_impl(float* dkv, const float* q, const float* kv, const float* dout,
                                  const float* lse, const float* dsum, const AttnParams p) {
    constexpr int W = 16 * NC, WP = W + 1;
    extern __shared__ float smem[];
    float* Ks = smem;               // (64 keys, WP)
    float* Vs = Ks + TILE * WP;     // (64 keys, WP)
    float* Qs = Vs + TILE * WP;     // (64 queries, WP)
    float* dOs = Qs + TILE * WP;    // (64 queries, WP)
    float* Pt = dOs + TILE * WP;    // (64 keys, SP) P^T
    float* dSt = Pt + TILE * SP;    // (64 keys, SP) dS^T
    float* lse_s = dSt + TILE * SP; // (64)
    float* d_s = lse_s + TILE;      // (64)

    const int k0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    const int nk = key_count(p, b);
    if (k0 >= nk) {  // a tile of padding keys: no gradient (the whole block leaves)
        zero_padding_kv_tile(dkv, p, b, h, k0);
        return;
    }
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const float* qb = q + (size_t)b * p.tq * p.q_ld + p.q_off + h * p.hd;
    const float* kb = kv + (size_t)b * p.tk * p.k_ld + p.k_off + h * p.hd;
    const float* vb = kv + (size_t)b * p.tk * p.v_ld + p.v_off + h * p.hd;
    const float* dob = dout + (size_t)b * p.tq * p.channels + h * p.hd;  // (Tq, hd) stride C

    load_tile<W>(Ks, kb, k0, p.tk, p.k_ld, p.hd);
    load_tile<W>(Vs, vb, k0, p.tk, p.v_ld, p.hd);

    float dk[4][NC], dv[4][NC];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int c = 0; c < NC; c++) dk[a][c] = dv[a][c] = 0.0f;

    // Causal: queries before k0 see none of these keys; start at the tile holding query k0.
    const int qstart = p.causal ? (k0 / TILE) * TILE : 0;
    for (int q0 = qstart; q0 < p.tq; q0 += TILE) {
        __syncthreads();  // every thread is done with the previous Q, dout, P^T and dS^T
        load_tile<W>(Qs, qb, q0, p.tq, p.q_ld, p.hd);
        load_tile<W>(dOs, dob, q0, p.tq, p.channels, p.hd);
        load_row_stats(lse_s, d_s, lse, dsum, p, b, h, q0);
        __syncthreads();  // K, V (first pass), Q, dout, lse and D are in shared memory

        // rows: keys ty+16a; columns: queries tx+16c
        float s[4][4], dp[4][4];
        tile_dot<W>(s, Ks, Qs);   // (q k^T)^T
        tile_dot<W>(dp, Vs, dOs); // (dout v^T)^T
#pragma unroll
        for (int a = 0; a < 4; a++) {
            const int j = k0 + ty + 16 * a;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int qi = tx + 16 * c;
                const float pr = visible(p, nk, q0 + qi, j) ? expf(s[a][c] * p.scale - lse_s[qi]) : 0.0f;
                Pt[(ty + 16 * a) * SP + qi] = pr;
                dSt[(ty + 16 * a) * SP + qi] = pr * (dp[a][c] - d_s[qi]);
            }
        }
        __syncthreads();  // P^T and dS^T complete before rows of them are read

        tile_accumulate<NC>(dv, Pt, dOs);  // dv += P^T dout
        tile_accumulate<NC>(dk, dSt, Qs);  // dk += dS^T q (scale applied at the end)
    }

    // Accumulate into the gradient buffer laid out like kv (packed: the dqkv buffer).
#pragma unroll
    for (int a = 0; a < 4; a++) {
        const int j = k0 + ty + 16 * a;
        if (j >= p.tk) continue;
        float* dkrow = dkv + ((size_t)b * p.tk + j) * p.k_ld + p.k_off + h * p.hd;
        float* dvrow = dkv + ((size_t)b * p.tk + j) * p.v_ld + p.v_off + h * p.hd;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d = tx + 16 * c;
            if (d < p.hd) {
                GRAD_STORE(dkrow[d], dk[a][c] * p.scale);
                GRAD_STORE(dvrow[d], dv[a][c]);
            }
        }
    }
}

// dq: one block per (64-query tile, head, batch), looping over visible key tiles (a second
// recomputation of P and dP, instead of atomics, keeps dq deterministic). Shared: Q, dout, K, V
// tiles (64, W+1), dS (64, 65), lse and D of the query tile.
template <int NC>
__device__ void backward_dq_impl(float* dq, const float* q, const float* kv, const float* dout,
                                 const float* lse, const float* dsum, const AttnParams p) {
    constexpr int W = 16 * NC, WP = W + 1;
    extern __shared__ float smem[];
    float* Qs = smem;               // (64 queries, WP)
    float* dOs = Qs + TILE * WP;    // (64 queries, WP)
    float* Ks = dOs + TILE * WP;    // (64 keys, WP)
    float* Vs = Ks + TILE * WP;     // (64 keys, WP)
    float* dS = Vs + TILE * WP;     // (64 queries, SP)
    float* lse_s = dS + TILE * SP;  // (64)
    float* d_s = lse_s + TILE;      // (64)

    const int q0 = blockIdx.x * TILE, h = blockIdx.y, b = blockIdx.z;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const float* qb = q + (size_t)b * p.tq * p.q_ld + p.q_off + h * p.hd;
    const float* kb = kv + (size_t)b * p.tk * p.k_ld + p.k_off + h * p.hd;
    const float* vb = kv + (size_t)b * p.tk * p.v_ld + p.v_off + h * p.hd;
    const float* dob = dout + (size_t)b * p.tq * p.channels + h * p.hd;

    load_tile<W>(Qs, qb, q0, p.tq, p.q_ld, p.hd);
    load_tile<W>(dOs, dob, q0, p.tq, p.channels, p.hd);
    load_row_stats(lse_s, d_s, lse, dsum, p, b, h, q0);

    float acc[4][NC];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int c = 0; c < NC; c++) acc[a][c] = 0.0f;

    const int nk = key_count(p, b);  // key tiles past it are all padding: skipped
    const int kend = p.causal ? min(nk, q0 + TILE) : nk;
    for (int k0 = 0; k0 < kend; k0 += TILE) {
        __syncthreads();  // every thread is done with the previous K, V and dS
        load_tile<W>(Ks, kb, k0, p.tk, p.k_ld, p.hd);
        load_tile<W>(Vs, vb, k0, p.tk, p.v_ld, p.hd);
        __syncthreads();  // Q, dout, lse, D (first pass), K and V are in shared memory

        // rows: queries ty+16a; columns: keys tx+16c
        float s[4][4], dp[4][4];
        tile_dot<W>(s, Qs, Ks);
        tile_dot<W>(dp, dOs, Vs);
#pragma unroll
        for (int a = 0; a < 4; a++) {
            const int qi = ty + 16 * a;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int j = k0 + tx + 16 * c;
                const float pr = visible(p, nk, q0 + qi, j) ? expf(s[a][c] * p.scale - lse_s[qi]) : 0.0f;
                dS[qi * SP + tx + 16 * c] = pr * (dp[a][c] - d_s[qi]);
            }
        }
        __syncthreads();  // dS complete before rows of it are read

        tile_accumulate<NC>(acc, dS, Ks);  // dq += dS k (scale applied at the end)
    }

#pragma unroll
    for (int a = 0; a < 4; a++) {
        const int i = q0 + ty + 16 * a;
        if (i >= p.tq) continue;
        float* dqrow = dq + ((size_t)b * p.tq + i) * p.q_ld + p.q_off + h * p.hd;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d = tx + 16 * c;
            if (d < p.hd) GRAD_STORE(dqrow[d], acc[a][c] * p.scale);
        }
    }
}

// ---- entry points, one per head-dim bucket (hd <= 32, 64, 128) -----------------------------

extern "C" __global__ void __launch_bounds__(THREADS)
attention_forward_f32_d32(float* out, float* lse, const float* q, const float* kv, const AttnParams p) {
    forward_impl<2>(out, lse, q, kv, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_dkv_f32_d32(float* dkv, const float* q, const float* kv, const float* dout,
                                 const float* lse, const float* dsum, const AttnParams p) {
    backward_dkv_impl<2>(dkv, q, kv, dout, lse, dsum, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_dq_f32_d32(float* dq, const float* q, const float* kv, const float* dout,
                                const float* lse, const float* dsum, const AttnParams p) {
    backward_dq_impl<2>(dq, q, kv, dout, lse, dsum, p);
}

extern "C" __global__ void __launch_bounds__(THREADS)
attention_forward_f32_d64(float* out, float* lse, const float* q, const float* kv, const AttnParams p) {
    forward_impl<4>(out, lse, q, kv, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_dkv_f32_d64(float* dkv, const float* q, const float* kv, const float* dout,
                                 const float* lse, const float* dsum, const AttnParams p) {
    backward_dkv_impl<4>(dkv, q, kv, dout, lse, dsum, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_dq_f32_d64(float* dq, const float* q, const float* kv, const float* dout,
                                const float* lse, const float* dsum, const AttnParams p) {
    backward_dq_impl<4>(dq, q, kv, dout, lse, dsum, p);
}

extern "C" __global__ void __launch_bounds__(THREADS)
attention_forward_f32_d128(float* out, float* lse, const float* q, const float* kv, const AttnParams p) {
    forward_impl<8>(out, lse, q, kv, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_dkv_f32_d128(float* dkv, const float* q, const float* kv, const float* dout,
                                 const float* lse, const float* dsum, const AttnParams p) {
    backward_dkv_impl<8>(dkv, q, kv, dout, lse, dsum, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_dq_f32_d128(float* dq, const float* q, const float* kv, const float* dout,
                                const float* lse, const float* dsum, const AttnParams p) {
    backward_dq_impl<8>(dq, q, kv, dout, lse, dsum, p);
}

// =============================================================================================
// Tensor-core version: the same three passes with bf16 operands on mma.sync.m16n8k16 (sm_80+)
// and f32 accumulation, softmax and statistics (kernels at the end of the file). A block is 4
// warps (128 threads); each warp owns 16 rows of the block's 64-row tile and loops over
// 64-column tiles of the other side.
//
// mma.m16n8k16 fragments (g = lane / 4, t = lane % 4; two bf16 per 32-bit register, the lower
// column or row in the low half):
//   A (16x16, row-major):  a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B (16x8, "col"):       b0 (k 2t..2t+1, n g)  b1 (k 2t+8..2t+9, n g)
//   C (16x8, f32):         c0, c1 (g, 2t / 2t+1)  c2, c3 (g+8, 2t / 2t+1)
// So B is read from a tile stored [n][k] (k contiguous), and two C tiles side by side (16x16)
// are exactly one A fragment after packing: probabilities never leave registers.
// Shared tiles are padded by 8 bf16 per row (row stride = 4 mod 32 words for W = 64 / 128 and
// 20 words for W = 32), so the 8 rows x 4 words a fragment load touches hit 32 distinct banks.

typedef unsigned short bf16_t;
typedef unsigned int u32;
#define MMA_THREADS 128
// Blocks per SM the hd-64 tensor-core kernels are compiled for (their register cap: 65536 /
// (128 * N); 1 lets ptxas take what it needs). Measured on an H200 (bench/NOTES.md v8): the
// forward keeps 4 (128 registers, as before its masks were split), dq runs faster at 3 (~180 ->
// 168 registers, a few bytes spilled), dkv slower at 3 (spills in its loop): 1. The engine
// passes SMELT_ATTN_MIN_BLOCKS="fwd,dkv,dq" from the environment, for measuring.
#ifndef SMELT_ATTN_FWD_MIN_BLOCKS
#define SMELT_ATTN_FWD_MIN_BLOCKS 4
#endif
#ifndef SMELT_ATTN_DKV_MIN_BLOCKS
#define SMELT_ATTN_DKV_MIN_BLOCKS 1
#endif
#ifndef SMELT_ATTN_DQ_MIN_BLOCKS
#define SMELT_ATTN_DQ_MIN_BLOCKS 3
#endif
// The fused backward sums dq by bulk reductions from shared memory (sm_90, head dims up to 64;
// the host emulator models them) unless SMELT_ATTN_DQ_BULK=0, else by vector atomics.
#ifndef SMELT_ATTN_DQ_BULK
#define SMELT_ATTN_DQ_BULK 1
#endif
#if defined(SMELT_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define SMELT_DQ_BULK_ARCH 1
#else
#define SMELT_DQ_BULK_ARCH 0
#endif

// The two primitives below need sm_80. Before that the kernels still compile (so the module
// loads on any GPU) but trap; the host picks the f32 kernels there. SMELT_HOST_EMULATION is
// defined by a host-side emulator (C++ threads standing in for a block) that supplies its own.
#ifndef SMELT_HOST_EMULATION
// Two f32 rounded to nearest-even bf16 and packed: lo in bits 0..15, hi in 16..31.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    __trap();
    return 0;
#endif
}
// 2^x by the special-function unit alone (ex2.approx.ftz, max 2 ulp as exp2f): exp2f without
// fast-math wraps the same instruction in a scaling for subnormal results, a few instructions per
// probability in kernels whose issue slots are the limit; a probability below 2^-126 flushes to 0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// *g += x, g[1] += y (g 8-byte aligned, global), not returning the old values: one vector
// reduction on sm_90, two scalar ones before it.
__device__ __forceinline__ void red_add_f32x2(float* g, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(g), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(g, x);
    atomicAdd(g + 1, y);
#endif
}
// The fused backward's dq rows by the TMA unit (sm_90): bytes of f32 at s (shared) added onto g
// (global) by one asynchronous bulk reduction in L2, FlashAttention-3's way of summing dq. A
// thread's bulk operations form groups: commit closes one, wait_read waits until its earlier
// groups have read their shared memory (the staging may be rewritten), wait_all until they
// are complete. fence_proxy_async makes this thread's shared-memory writes visible to them.
__device__ __forceinline__ void bulk_reduce_add_f32(float* g, const float* s, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                 ::"l"(g), "r"((u32)__cvta_generic_to_shared(s)), "r"(bytes) : "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_read() {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_all() {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}
// d += a b for one 16x8x16 tile, f32 accumulation.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}
#endif


// Element idx of a buffer the bf16 family reads or writes in global memory (q, kv, out, dout,
// dq, dkv): f32, or bf16 when p.io_bf16. The pointer is typed float* either way; only the index
// arithmetic here knows the element size.
__device__ __forceinline__ float io_load(const float* base, size_t idx, const AttnParams& p) {
    return p.io_bf16 ? __int_as_float((int)((u32)((const bf16_t*)base)[idx] << 16)) : base[idx];
}
__device__ __forceinline__ void io_store(float* base, size_t idx, float v, const AttnParams& p) {
    if (p.io_bf16) {
        ((bf16_t*)base)[idx] = (bf16_t)(pack_bf16x2(v, 0.0f) & 0xffffu);
    } else {
        base[idx] = v;
    }
}
// A gradient element: added to (accumulate) or written over, in the buffer's own type.
__device__ __forceinline__ void io_grad_store(float* base, size_t idx, float v, const AttnParams& p) {
    io_store(base, idx, (p.accumulate ? io_load(base, idx, p) : 0.0f) + v, p);
}
// Columns d and d + 1 (d even) of a head at idx, idx + 1: one 4-byte access when p.pairs (bf16
// buffers whose strides and offsets are even: idx is even), else one element at a time (d + 1
// may lie past hd).
__device__ __forceinline__ void io_load_pair(const float* base, size_t idx, int d, float& v0, float& v1,
                                             const AttnParams& p) {
    if (p.pairs && d + 1 < p.hd) {
        const u32 w = *(const u32*)((const bf16_t*)base + idx);
        v0 = __int_as_float((int)(w << 16));
        v1 = __int_as_float((int)(w & 0xffff0000u));
        return;
    }
    v0 = d < p.hd ? io_load(base, idx, p) : 0.0f;
    v1 = d + 1 < p.hd ? io_load(base, idx + 1, p) : 0.0f;
}
__device__ __forceinline__ void io_store_pair(float* base, size_t idx, int d, float v0, float v1, const AttnParams& p) {
    if (p.pairs && d + 1 < p.hd) {
        *(u32*)((bf16_t*)base + idx) = pack_bf16x2(v0, v1);
        return;
    }
    if (d < p.hd) io_store(base, idx, v0, p);
    if (d + 1 < p.hd) io_store(base, idx + 1, v1, p);
}
__device__ __forceinline__ void io_grad_store_pair(float* base, size_t idx, int d, float v0, float v1,
                                                   const AttnParams& p) {
    if (p.pairs && d + 1 < p.hd) {
        float o0 = 0.0f, o1 = 0.0f;
        if (p.accumulate) io_load_pair(base, idx, d, o0, o1, p);
        *(u32*)((bf16_t*)base + idx) = pack_bf16x2(o0 + v0, o1 + v1);
        return;
    }
    if (d < p.hd) io_grad_store(base, idx, v0, p);
    if (d + 1 < p.hd) io_grad_store(base, idx + 1, v1, p);
}

// zero_padding_kv_tile for the bf16 family's buffers.
__device__ __forceinline__ void zero_padding_kv_tile_io(float* dkv, const AttnParams& p, int b, int h, int k0) {
    if (p.accumulate) return;
    for (int e = threadIdx.x; e < TILE * p.hd; e += blockDim.x) {
        const int j = k0 + e / p.hd, d = e % p.hd;
        if (j >= p.tk) break;
        io_store(dkv, ((size_t)b * p.tk + j) * p.k_ld + p.k_off + h * p.hd + d, 0.0f, p);
        io_store(dkv, ((size_t)b * p.tk + j) * p.v_ld + p.v_off + h * p.hd + d, 0.0f, p);
    }
}

// A fragments of a (16, 64) f32 C-layout tile c[8][4]: a[kk] covers columns 16kk .. 16kk+16.
__device__ __forceinline__ void c_to_a(u32 (&a)[4][4], const float (&c)[8][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        a[kk][0] = pack_bf16x2(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16x2(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16x2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16x2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

// =============================================================================================
// The tensor-core kernels. They read q, k, v and dout as rows of W bf16: in place from the bf16
// activation buffers when hd == W and rows are 16-byte aligned (p.direct; rows past T are
// zero-filled by cp.async), else from head-major bf16 copies (attention_heads_bf16):
// (B, H, Tpad, W), Tpad = T rounded up to 64, zeros past T and past hd (TileSrc says which). Tiles arrive by
// cp.async in 16-byte chunks, double-buffered: the copy of the next key (or query) tile overlaps
// the arithmetic on this one. The operands that must be read transposed (the B of o += P v,
// dv += P^T dout, dk += dS^T q and dq += dS k) come from the row tiles through ldmatrix.trans.
// Each query row's (lse log2(e), D) pair is precomputed and padded (attention_backward_stats).
// Measured on an H100 against the earlier design (f32 operands converted while staged
// synchronously, transposed tiles written to shared memory; bench/NOTES.md v5): GPT-2 124M's
// attention backward 22.5 -> 7.9 ms per step, forward 5.8 -> 3.9 ms.

#define LOG2E 1.4426950408889634f

__device__ __forceinline__ int round_tile(int n) { return (n + TILE - 1) / TILE * TILE; }

#ifndef SMELT_HOST_EMULATION
__device__ __forceinline__ u32 smem_addr(const void* s) { return (u32)__cvta_generic_to_shared(s); }
// 16 bytes global -> shared without passing through registers (sm_80+).
__device__ __forceinline__ void cp_async16(void* s, const void* g) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(s)), "l"(g));
#else
    __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;");
#endif
}
// Like cp_async16, but writes 16 zero bytes instead when !valid (g is then not read, though it
// must still be a valid address: the caller passes a row it may read).
__device__ __forceinline__ void cp_async16_or_zero(void* s, const void* g, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(s)), "l"(g), "r"(valid ? 16 : 0));
#else
    __trap();
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}
// Four 8x8 bf16 matrices from shared memory: lanes 8m .. 8m+7 give the row addresses of matrix
// m (16 bytes each); lane (g, t) gets r[m] = row g, columns 2t and 2t+1 of matrix m (the lower
// column in the low half), i.e. the A and B fragment layouts of mma.m16n8k16.
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const bf16_t* row) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#else
    __trap();
#endif
}
// ldmatrix.x4.trans: lanes 8m .. 8m+7 give the row addresses of 8x8 matrix m (16 bytes each);
// lane (g, t) gets r[m] = rows 2t and 2t+1 of column g of matrix m (the lower row in the low
// half), i.e. the fragment of the transposed matrix.
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const bf16_t* row) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#else
    __trap();
#endif
}
#endif

// Two B fragments (k 16 x n 16: b[0], b[1] for n-tile n0, b[2], b[3] for n0 + 8) of a tile
// stored [k][n] with row stride ld: ldmatrix.trans hands lane (g, t) the pairs (k 2t, 2t+1;
// n g) mma's B operand wants. Matrices: (k0, n0), (k0 + 8, n0), (k0, n0 + 8), (k0 + 8, n0 + 8).
__device__ __forceinline__ void load_b_trans(u32 (&b)[4], const bf16_t* s, int ld, int k0, int n0) {
    const int l = threadIdx.x % 32;
    ldsm_x4_trans(b, s + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}

// The A fragment (m 16 x k 16 at m0, k0) of a tile stored transposed, [k][m] with row stride
// ld: a[0] = rows m0.., columns k0.. is the stored block (k0, m0) read transposed, a[1] (rows
// m0 + 8) the block (k0, m0 + 8), a[2] (columns k0 + 8) the block (k0 + 8, m0), a[3] both.
__device__ __forceinline__ void load_a_trans(u32 (&a)[4], const bf16_t* s, int ld, int m0, int k0) {
    const int l = threadIdx.x % 32;
    ldsm_x4_trans(a, s + (k0 + (l & 7) + (l >> 4) * 8) * ld + m0 + ((l >> 3) & 1) * 8);
}

// A fragment of rows r0..r0+16, columns c0..c0+16 of a row-major tile with row stride ld: one
// ldmatrix.x4 (8x8 matrices: rows r0.. and r0+8.. of columns c0.., then of columns c0+8..).
__device__ __forceinline__ void load_a(u32 (&a)[4], const bf16_t* s, int ld, int r0, int c0) {
    const int l = threadIdx.x % 32;
    ldsm_x4(a, s + (r0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + c0 + (l >> 4) * 8);
}

// B fragments (k 16 x n 8) of two adjacent n-tiles, n0 and n0 + 8, of a tile stored [n][k]
// with row stride ld, at k0: b[0], b[1] for n0 and b[2], b[3] for n0 + 8, one ldmatrix.x4
// (the 32-bit shared loads it replaced issued four times the load instructions).
__device__ __forceinline__ void load_b2(u32 (&b)[4], const bf16_t* s, int ld, int n0, int k0) {
    const int l = threadIdx.x % 32;
    ldsm_x4(b, s + (n0 + (l & 7) + (l >> 4) * 8) * ld + k0 + ((l >> 3) & 1) * 8);
}

// dst (B, H, Tpad, w) bf16 from the head columns of a strided (B, rows, ld) matrix, f32 or
// (p.io_bf16) bf16 (head h at column off + h*hd): zeros past `rows` and past hd. One thread per
// pair of columns.
extern "C" __global__ void __launch_bounds__(THREADS)
attention_heads_bf16(bf16_t* dst, const float* src, int rows, int ld, int off, int w,
                     const AttnParams p) {
    const int tp = round_tile(rows), pairs = w / 2;
    const size_t n = (size_t)p.batch * p.heads * tp * pairs;
    const size_t e = (size_t)blockIdx.x * THREADS + threadIdx.x;
    if (e >= n) return;
    const int d = 2 * (int)(e % pairs);
    const size_t r = e / pairs;  // (b*H + h)*Tpad + i
    const int i = (int)(r % tp);
    const size_t bh = r / tp;
    const int h = (int)(bh % p.heads);
    const size_t b = bh / p.heads;
    float x0 = 0.0f, x1 = 0.0f;
    if (i < rows) io_load_pair(src, (b * rows + i) * ld + off + h * p.hd + d, d, x0, x1, p);
    *(u32*)(dst + r * w + d) = pack_bf16x2(x0, x1);
}

// stats (B, H, Tqpad, 2): per query row (lse * log2(e), D = rowsum(dout * out)), zeros past Tq.
// One warp per row.
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_stats(float* stats, const float* dout, const float* out, const float* lse,
                         const AttnParams p) {
    const int tqp = round_tile(p.tq);
    const size_t row = (size_t)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;  // (b*H+h)*Tqpad+i
    const int lane = threadIdx.x % 32;
    if (row >= (size_t)p.batch * p.heads * tqp) return;  // whole warp leaves together
    const int i = (int)(row % tqp);
    const size_t bh = row / tqp;
    const int h = (int)(bh % p.heads);
    const size_t b = bh / p.heads;
    float acc = 0.0f, l = 0.0f;
    if (i < p.tq) {
        const size_t row0 = (b * p.tq + i) * p.channels + h * p.hd;  // dout and out: f32 or bf16
        for (int d = lane; d < p.hd; d += 32) acc += io_load(dout, row0 + d, p) * io_load(out, row0 + d, p);
        l = lse[bh * p.tq + i] * LOG2E;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) {
        stats[2 * row] = l;
        stats[2 * row + 1] = acc;
    }
}

// attention_backward_stats for p.direct calls (bf16 dout and out, hd = 8 L with L lanes per
// row, rows 16-byte aligned): each lane reads 8 columns of dout and out as one 16-byte access
// (the warp-per-row kernel's 2-byte loads left it bound by load instructions), the L lanes of a
// row add their parts by shuffles. A warp holds 32 / L rows. Same layout and zero padding.
template <int L>
__device__ __forceinline__ void backward_stats_vec(float* stats, const bf16_t* dout, const bf16_t* out,
                                                   const float* lse, const AttnParams& p) {
    const int tqp = round_tile(p.tq);
    const int lane = threadIdx.x % 32, part = lane % L;
    const size_t row = ((size_t)blockIdx.x * THREADS + threadIdx.x) / L;  // (b*H+h)*Tqpad+i
    // B*H*Tqpad*L threads are a whole number of blocks (Tqpad is a multiple of 64, L >= 4), so
    // no thread is past the end and every shuffle below has its full warp
    const int i = (int)(row % tqp);
    const size_t bh = row / tqp;
    const int h = (int)(bh % p.heads);
    const size_t b = bh / p.heads;
    float acc = 0.0f, l = 0.0f;
    if (i < p.tq) {
        const size_t at = (b * p.tq + i) * p.channels + h * p.hd + 8 * part;
        const uint4 dy = *(const uint4*)(dout + at), y = *(const uint4*)(out + at);
        const u32 dw[4] = {dy.x, dy.y, dy.z, dy.w}, yw[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            acc += __int_as_float((int)(dw[k] << 16)) * __int_as_float((int)(yw[k] << 16));
            acc += __int_as_float((int)(dw[k] & 0xffff0000u)) * __int_as_float((int)(yw[k] & 0xffff0000u));
        }
        l = lse[bh * p.tq + i] * LOG2E;
    }
    // the L lanes of a row are aligned groups of the warp: xor offsets below L stay inside them
    for (int o = L / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (part == 0) {
        stats[2 * row] = l;
        stats[2 * row + 1] = acc;
    }
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_stats_vec_d32(float* stats, const bf16_t* dout, const bf16_t* out, const float* lse,
                                 const AttnParams p) {
    backward_stats_vec<4>(stats, dout, out, lse, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_stats_vec_d64(float* stats, const bf16_t* dout, const bf16_t* out, const float* lse,
                                 const AttnParams p) {
    backward_stats_vec<8>(stats, dout, out, lse, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_stats_vec_d128(float* stats, const bf16_t* dout, const bf16_t* out, const float* lse,
                                  const AttnParams p) {
    backward_stats_vec<16>(stats, dout, out, lse, p);
}

// Heads whose tiles the tensor-core kernels schedule together (tile_order); 0 keeps the launch
// grid's own order (tile = blockIdx.x, head = blockIdx.y, batch = blockIdx.z). The engine passes
// SMELT_ATTN_HEAD_GROUP from the environment, for measuring.
#ifndef SMELT_ATTN_HEAD_GROUP
#define SMELT_ATTN_HEAD_GROUP 16
#endif

struct TileCoord {
    int tile, h, b;
};

// The (tile, head, batch entry) of the block at position `linear` of the launch order in a grid
// of n_tiles x heads x batch (n_bh = heads x batch). The block scheduler starts blocks in launch
// order, so with a causal mask the order decides how the grid ends: in the grid's own order
// every head's tiles are mixed, and the last blocks to start include long ones (the last query
// tile of the forward and dq sees every key tile; the first key tile of dkv, every query tile),
// which then run on a few SMs while the others idle. Here heads go in groups of `group`; within a
// group, tile ranks go from the most work to the least (rank 0 = the last tile when heavy_last,
// else the first), one block per head in turn. The grid then ends on one-tile blocks, and the
// heads in flight (a group's k and v, or q and dout, 256 KB per GPT-2 head) stay few enough to be
// read from L2 by all their tiles. A bijection from [0, n_tiles x n_bh) onto the tiles (checked
// by tools/cuda_emu/attention_emu.cpp over many grids).
__host__ __device__ inline TileCoord tile_order(unsigned linear, int n_tiles, int heads, int n_bh, int group,
                                                bool heavy_last) {
    TileCoord c;
    if (group <= 0) {  // the launch grid's order
        c.tile = (int)(linear % (unsigned)n_tiles);
        const unsigned bh = linear / (unsigned)n_tiles;
        c.h = (int)(bh % (unsigned)heads);
        c.b = (int)(bh / (unsigned)heads);
        return c;
    }
    const unsigned per_group = (unsigned)group * (unsigned)n_tiles;
    const unsigned g0 = linear / per_group * (unsigned)group;  // the group's first (b, h)
    const unsigned within = linear - g0 * (unsigned)n_tiles;
    const unsigned gs = min((unsigned)group, (unsigned)n_bh - g0);  // the last group may be short
    const int rank = (int)(within / gs);
    const unsigned bh = g0 + within % gs;
    c.tile = heavy_last ? n_tiles - 1 - rank : rank;
    c.h = (int)(bh % (unsigned)heads);
    c.b = (int)(bh / (unsigned)heads);
    return c;
}

// This block's tile, head and batch entry (grid: tiles x heads x batch, see tile_order).
__device__ __forceinline__ TileCoord block_tile(bool heavy_last) {
    const unsigned linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    return tile_order(linear, (int)gridDim.x, (int)gridDim.y, (int)(gridDim.y * gridDim.z), SMELT_ATTN_HEAD_GROUP,
                      heavy_last);
}

// Where one head's rows of q, k, v or dout come from: `rows` rows of W bf16 at stride `ld`
// from `base` (row 0, column 0 of the head); rows past `rows` read as zeros.
struct TileSrc {
    const bf16_t* base;
    int ld, rows;
};

// Head h of batch entry b of a (B, T, ld) bf16 buffer at column off (p.direct), or of its
// head-major (B, H, Tpad, W) copy (attention_heads_bf16): the copy's padding rows hold zeros,
// so every one of its Tpad rows may be read.
template <int W>
__device__ __forceinline__ TileSrc head_src(const bf16_t* buf, const AttnParams& p, int b, int h,
                                            int t_len, int ld, int off) {
    if (p.direct) return TileSrc{buf + (size_t)b * t_len * ld + off + h * p.hd, ld, t_len};
    const int tp = round_tile(t_len);
    return TileSrc{buf + ((size_t)b * p.heads + h) * tp * W, W, tp};
}

// Rows row0 .. row0+64 of a head's (rows, W) bf16 matrix into a (64, W+8) shared tile. Thread
// x copies chunk x % CH of rows x / CH + k * (128 / CH): the loop is unrolled and only the row
// changes between its steps, so each 16-byte copy costs a few instructions (the rolled loop
// with its divisions and 64-bit products cost ~23 per copy in ptxas' output).
template <int W>
__device__ __forceinline__ void copy_tile_async(bf16_t* s, const TileSrc src, int row0) {
    constexpr int CH = W / 8;                  // 16-byte chunks per row
    constexpr int STEP = MMA_THREADS / CH;     // rows apart between a thread's copies
    static_assert(TILE % STEP == 0, "whole rows per step");
    const int r0 = threadIdx.x / CH, c = threadIdx.x % CH;
    bf16_t* dst = s + r0 * (W + 8) + c * 8;
    const bf16_t* first = src.base + c * 8;  // row 0: a row past the end reads (never) from here
    const int row = row0 + r0;
    const bf16_t* from = first + (size_t)row * src.ld;  // this thread's first row, then STEP apart
    const size_t step = (size_t)STEP * src.ld;
#pragma unroll
    for (int k = 0; k < TILE / STEP; k++) {
        const bool valid = row + k * STEP < src.rows;
        cp_async16_or_zero(dst + k * STEP * (W + 8), valid ? from + k * step : first, valid);
    }
}

// The (lse log2e, D) pairs of rows row0 .. row0+64: 512 bytes, 32 chunks.
__device__ __forceinline__ void copy_stats_async(float* s, const float* g, int row0) {
    if (threadIdx.x < 32) cp_async16(s + 4 * threadIdx.x, g + 2 * (size_t)row0 + 4 * threadIdx.x);
}

// ---- masks and probabilities of a (16 x 64) warp tile, C layout -----------------------------
// Element (nt, e) of a thread (g, t) of the warp sits at row r0 + 8 (e >> 1) and column
// c0 + nt * 8 + (e & 1), with r0 = the warp's first row + g and c0 = the tile's first column
// + 2 t. CHECK = false is for tiles that key_tile_full / pair_tile_full proved fully visible.

// Whether every key of the tile at k0 is visible to every query row of the tile at q0 in the
// forward pass (padding query rows count as seeing key 0 onwards, see key_visible).
__device__ __forceinline__ bool key_tile_full(const AttnParams& p, int nk, int q0, int k0) {
    return k0 + TILE <= nk && (!p.causal || k0 + TILE - 1 <= q0);
}
// Whether every (query, key) pair of the tiles at q0, k0 contributes to the gradients.
__device__ __forceinline__ bool pair_tile_full(const AttnParams& p, int nk, int q0, int k0) {
    return q0 + TILE <= p.tq && key_tile_full(p, nk, q0, k0);
}

// Forward scores s (rows: queries from r0, columns: keys from c0): -inf where invisible. They
// stay unscaled: the scale goes into the exponent's FFMA (exp2(s * scale log2 e - max)), one
// instruction per score fewer than scaling them first.
__device__ __forceinline__ void mask_scores(float (&s)[8][4], const AttnParams& p, int nk, int r0, int c0) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = r0 + 8 * (e >> 1), j = c0 + nt * 8 + (e & 1);
            if (!key_visible(p, nk, i, j)) s[nt][e] = neg_inf();
        }
}

// dkv pass (rows: keys from r0, columns: queries q0 + nt*8 + 2t + (e&1)): st holds S^T and
// becomes P^T, dpt holds dP^T and becomes dS^T. sc: the query tile's (lse log2 e, D) pairs.
template <bool CHECK>
__device__ __forceinline__ void probs_dkv(float (&st)[8][4], float (&dpt)[8][4], const float* sc,
                                          const AttnParams& p, int nk, int q0, int r0, float scale2) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int c = 0; c < 2; c++) {
            const int qi = nt * 8 + 2 * t + c;
            const float2 st2 = ((const float2*)sc)[qi];  // one 8-byte load for both rows
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int e = 2 * half + c;
                const float pr = !CHECK || visible(p, nk, q0 + qi, r0 + 8 * half)
                                     ? fast_exp2(st[nt][e] * scale2 - st2.x) : 0.0f;
                st[nt][e] = pr;
                dpt[nt][e] = pr * (dpt[nt][e] - st2.y);
            }
        }
}

// dq pass (rows: queries from r0, columns: keys from c0): dp holds dP and becomes dS, from the
// scores s and the rows' (lse log2 e, D).
template <bool CHECK>
__device__ __forceinline__ void probs_dq(const float (&s)[8][4], float (&dp)[8][4], const float (&lse2)[2],
                                         const float (&dd)[2], const AttnParams& p, int nk, int r0, int c0,
                                         float scale2) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int half = e >> 1;
            const int i = r0 + 8 * half, j = c0 + nt * 8 + (e & 1);
            const float pr = !CHECK || visible(p, nk, i, j) ? fast_exp2(s[nt][e] * scale2 - lse2[half]) : 0.0f;
            dp[nt][e] = pr * (dp[nt][e] - dd[half]);
        }
}

// Forward: q, k and v arrive in place or as head-major copies (TileSrc). One block per (64-query tile, head, batch); this warp's 16 query rows stay in registers as A
// fragments; key and value tiles are double-buffered by cp.async; scores live in the log2
// domain (exp2 of s * scale * log2 e), the saved lse in natural units.
template <int NC>
__device__ void forward_bf16_impl(float* out, float* lse, const bf16_t* qh, const bf16_t* kh,
                                const bf16_t* vh, const AttnParams p) {
    constexpr int W = 16 * NC, LR = W + 8, TS = TILE * LR;
    extern __shared__ float smem[];
    bf16_t* Qs = (bf16_t*)smem;  // (64 queries, LR)
    bf16_t* Ks = Qs + TS;        // 2 x (64 keys, LR): B of s = q k^T
    bf16_t* Vs = Ks + 2 * TS;    // 2 x (64 keys, LR): B of o += P v (trans)

    const TileCoord tc = block_tile(true);  // the last query tile has the most key tiles
    const int q0 = tc.tile * TILE, h = tc.h, b = tc.b;
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const size_t bh = (size_t)b * p.heads + h;
    const TileSrc qb = head_src<W>(qh, p, b, h, p.tq, p.q_ld, p.q_off);
    const TileSrc kb = head_src<W>(kh, p, b, h, p.tk, p.k_ld, p.k_off);
    const TileSrc vb = head_src<W>(vh, p, b, h, p.tk, p.v_ld, p.v_off);
    const float scale2 = p.scale * LOG2E;

    copy_tile_async<W>(Qs, qb, q0);
    cp_async_commit();
    copy_tile_async<W>(Ks, kb, 0);
    copy_tile_async<W>(Vs, vb, 0);
    cp_async_commit();
    cp_async_wait<1>();  // Q landed (the first key tile may still be in flight)
    __syncthreads();
    u32 qa[NC][4];  // this warp's 16 query rows as A fragments, kept for every key tile
#pragma unroll
    for (int kk = 0; kk < NC; kk++) load_a(qa[kk], Qs, LR, warp * 16, kk * 16);

    float o[W / 8][4];  // (16, W) output accumulator, C layout
    float m[2], l[2];   // running max (log2 domain) and sum of rows g and g+8
#pragma unroll
    for (int dn = 0; dn < W / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[dn][e] = 0.0f;
    m[0] = m[1] = neg_inf();
    l[0] = l[1] = 0.0f;

    const int nk = key_count(p, b);  // key tiles past it are all padding: skipped
    const int kend = p.causal ? min(nk, q0 + TILE) : nk;
    for (int k0 = 0, it = 0; k0 < kend; k0 += TILE, it++) {
        const int buf = it & 1;
        if (k0 + TILE < kend) {  // the next key tile, into the other buffer
            copy_tile_async<W>(Ks + (buf ^ 1) * TS, kb, k0 + TILE);
            copy_tile_async<W>(Vs + (buf ^ 1) * TS, vb, k0 + TILE);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // this key tile landed for every thread
        const bf16_t* Kc = Ks + buf * TS;
        const bf16_t* Vc = Vs + buf * TS;

        float s[8][4];  // (16, 64) scores, C layout
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = 0.0f;
#pragma unroll
        for (int n2 = 0; n2 < 4; n2++)
#pragma unroll
            for (int kk = 0; kk < NC; kk++) {
                u32 bb[4];
                load_b2(bb, Kc, LR, n2 * 16, kk * 16);
                mma_bf16(s[2 * n2], qa[kk], bb[0], bb[1]);
                mma_bf16(s[2 * n2 + 1], qa[kk], bb[2], bb[3]);
            }
        // -inf where invisible; a tile whose keys are all visible to all its queries (most of
        // them) skips the per-element test.
        if (!key_tile_full(p, nk, q0, k0)) mask_scores(s, p, nk, q0 + warp * 16 + g, k0 + 2 * t);
        float corr[2];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float rmax = neg_inf();
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) rmax = fmaxf(rmax, s[nt][2 * half + e]);
            rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, 1));
            rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, 2));
            // the running max in the log2 domain (the scale is positive: max and scale commute)
            const float m_new = fmaxf(m[half], rmax * scale2);
            const float base = m_new == neg_inf() ? 0.0f : m_new;  // see the f32 forward
            corr[half] = fast_exp2(m[half] - base);
            float rsum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float& x = s[nt][2 * half + e];
                    x = fast_exp2(fmaf(x, scale2, -base));
                    rsum += x;
                }
            rsum += __shfl_xor_sync(0xffffffffu, rsum, 1);
            rsum += __shfl_xor_sync(0xffffffffu, rsum, 2);
            l[half] = l[half] * corr[half] + rsum;
            m[half] = m_new;
        }
        // Rescale the output only where a row's max moved (corr < 1): once the max settles,
        // most key tiles leave every row's max alone, and the warp skips the multiplications
        // (a row whose max stayed has corr = 1 exactly, so multiplying it changes nothing).
        if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
            for (int dn = 0; dn < W / 8; dn++) {
                o[dn][0] *= corr[0];
                o[dn][1] *= corr[0];
                o[dn][2] *= corr[1];
                o[dn][3] *= corr[1];
            }
        }
        u32 pa[4][4];
        c_to_a(pa, s);  // P as A fragments, straight from registers
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
#pragma unroll
            for (int dn = 0; dn < W / 16; dn++) {
                u32 bt[4];
                load_b_trans(bt, Vc, LR, kk * 16, dn * 16);
                mma_bf16(o[2 * dn], pa[kk], bt[0], bt[1]);  // o += P v
                mma_bf16(o[2 * dn + 1], pa[kk], bt[2], bt[3]);
            }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
    cp_async_wait<0>();

#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int i = q0 + warp * 16 + g + 8 * half;
        if (i >= p.tq) continue;
        const float inv = 1.0f / l[half];
        const size_t orow = ((size_t)b * p.tq + i) * p.channels + h * p.hd;
#pragma unroll
        for (int dn = 0; dn < W / 8; dn++) {
            const int d = dn * 8 + 2 * t;
            io_store_pair(out, orow + d, d, o[dn][2 * half] * inv, o[dn][2 * half + 1] * inv, p);
        }
        if (t == 0) lse[bh * p.tq + i] = (m[half] + log2f(l[half])) / LOG2E;
    }
}

// dkv pass; FUSED: also dq (FlashAttention-2's backward: 5 products per tile pair instead of
// the 7 of the dkv and dq passes). Each query tile's dS^T goes through shared memory
// (dS_s) and every warp adds dS k for 16 of the tile's queries into dq_acc (B, H, Tqpad, W) f32:
// on sm_90 with W <= 64 by bulk reductions of its 16 rows staged in shared memory (dq_s, one
// (16, W + 8) f32 tile per warp; rows padded so the staging stores miss each other's banks),
// else with vector atomics; attention_dq_from_acc then scales it into dq. The order of the
// additions varies between runs, so dq is not bitwise repeatable in this mode.
template <int NC, bool FUSED>
__device__ void backward_dkv_bf16_impl(float* dkv, float* dq_acc, const bf16_t* qh, const bf16_t* kh,
                                     const bf16_t* vh, const bf16_t* doh, const float* stats,
                                     const AttnParams p) {
    constexpr int W = 16 * NC, LR = W + 8, TS = TILE * LR;
    extern __shared__ float smem[];
    bf16_t* Ks = (bf16_t*)smem;   // (64 keys, LR): A of S^T = k q^T, and (FUSED) B of dq += dS k (trans)
    bf16_t* Vs = Ks + TS;         // (64 keys, LR): A of dP^T = v dout^T
    bf16_t* Qs = Vs + TS;         // 2 x (64 queries, LR): B of S^T, and of dk += dS^T q (trans)
    bf16_t* dOs = Qs + 2 * TS;    // 2 x (64 queries, LR): B of dP^T, and of dv += P^T dout
    float* st_s = (float*)(dOs + 2 * TS);  // 2 x (64, 2): (lse log2e, D) per query
    // FUSED: (64 keys, LS) dS^T, A of dq (trans); 64 queries per row whatever W is
    constexpr int LS = TILE + 8;
    bf16_t* dS_s = (bf16_t*)(st_s + 4 * TILE);
    constexpr bool BULK = FUSED && SMELT_ATTN_DQ_BULK && SMELT_DQ_BULK_ARCH && W <= 64;
    constexpr int LQ = W + 8;  // row stride of the dq staging
    float* dq_s = (float*)(dS_s + TILE * LS) + (threadIdx.x / 32) * 16 * LQ;  // this warp's (16, LQ)

    const TileCoord tc = block_tile(false);  // the first key tile is seen by every query tile
    const int k0 = tc.tile * TILE, h = tc.h, b = tc.b;
    const int nk = key_count(p, b);
    if (k0 >= nk) {  // a tile of padding keys: no gradient (the whole block leaves)
        zero_padding_kv_tile_io(dkv, p, b, h, k0);
        return;
    }
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const size_t bh = (size_t)b * p.heads + h;
    const TileSrc qb = head_src<W>(qh, p, b, h, p.tq, p.q_ld, p.q_off);
    const TileSrc dob = head_src<W>(doh, p, b, h, p.tq, p.channels, 0);
    const float* sb = stats + bh * round_tile(p.tq) * 2;
    const float scale2 = p.scale * LOG2E;

    const int qstart = p.causal ? (k0 / TILE) * TILE : 0;
    copy_tile_async<W>(Ks, head_src<W>(kh, p, b, h, p.tk, p.k_ld, p.k_off), k0);
    copy_tile_async<W>(Vs, head_src<W>(vh, p, b, h, p.tk, p.v_ld, p.v_off), k0);
    copy_tile_async<W>(Qs, qb, qstart);
    copy_tile_async<W>(dOs, dob, qstart);
    copy_stats_async(st_s, sb, qstart);
    cp_async_commit();

    float dk[W / 8][4], dv[W / 8][4];  // (16 keys, W) each, C layout
#pragma unroll
    for (int dn = 0; dn < W / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[dn][e] = dv[dn][e] = 0.0f;

    for (int q0 = qstart, it = 0; q0 < p.tq; q0 += TILE, it++) {
        const int buf = it & 1;
        if (q0 + TILE < p.tq) {  // the next query tile, into the other buffer
            copy_tile_async<W>(Qs + (buf ^ 1) * TS, qb, q0 + TILE);
            copy_tile_async<W>(dOs + (buf ^ 1) * TS, dob, q0 + TILE);
            copy_stats_async(st_s + (buf ^ 1) * 2 * TILE, sb, q0 + TILE);
        }
        cp_async_commit();  // (possibly empty) so that "all but the newest" is this tile
        cp_async_wait<1>();
        __syncthreads();  // this tile (and K, V) landed for every thread
        const bf16_t* Qc = Qs + buf * TS;
        const bf16_t* dOc = dOs + buf * TS;
        const float* sc = st_s + buf * 2 * TILE;

        // rows: this warp's 16 keys; columns: the 64 queries
        float st[8][4], dpt[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) st[nt][e] = dpt[nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < NC; kk++) {
            u32 ka[4], va[4];
            load_a(ka, Ks, LR, warp * 16, kk * 16);
            load_a(va, Vs, LR, warp * 16, kk * 16);
#pragma unroll
            for (int n2 = 0; n2 < 4; n2++) {
                u32 bb[4];
                load_b2(bb, Qc, LR, n2 * 16, kk * 16);
                mma_bf16(st[2 * n2], ka, bb[0], bb[1]);
                mma_bf16(st[2 * n2 + 1], ka, bb[2], bb[3]);
                load_b2(bb, dOc, LR, n2 * 16, kk * 16);
                mma_bf16(dpt[2 * n2], va, bb[0], bb[1]);
                mma_bf16(dpt[2 * n2 + 1], va, bb[2], bb[3]);
            }
        }
        // P^T and dS^T in place of S^T and dP^T (no per-element test on a fully visible tile)
        if (pair_tile_full(p, nk, q0, k0)) {
            probs_dkv<false>(st, dpt, sc, p, nk, q0, k0 + warp * 16 + g, scale2);
        } else {
            probs_dkv<true>(st, dpt, sc, p, nk, q0, k0 + warp * 16 + g, scale2);
        }
        u32 pa[4][4], sa[4][4];
        c_to_a(pa, st);
        c_to_a(sa, dpt);
        if (FUSED) {
            // this warp's 16 rows of dS^T, bf16 as the products use them: sa[kk] holds rows g
            // and g + 8, columns 16kk + 2t (+1) and 16kk + 8 + 2t (+1) (c_to_a)
            bf16_t* row = dS_s + (warp * 16 + g) * LS + 2 * t;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                *(u32*)(row + 16 * kk) = sa[kk][0];
                *(u32*)(row + 8 * LS + 16 * kk) = sa[kk][1];
                *(u32*)(row + 16 * kk + 8) = sa[kk][2];
                *(u32*)(row + 8 * LS + 16 * kk + 8) = sa[kk][3];
            }
        }
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
#pragma unroll
            for (int dn = 0; dn < W / 16; dn++) {
                u32 bt[4];
                load_b_trans(bt, dOc, LR, kk * 16, dn * 16);
                mma_bf16(dv[2 * dn], pa[kk], bt[0], bt[1]);  // dv += P^T dout
                mma_bf16(dv[2 * dn + 1], pa[kk], bt[2], bt[3]);
                load_b_trans(bt, Qc, LR, kk * 16, dn * 16);
                mma_bf16(dk[2 * dn], sa[kk], bt[0], bt[1]);  // dk += dS^T q
                mma_bf16(dk[2 * dn + 1], sa[kk], bt[2], bt[3]);
            }
        __syncthreads();  // every warp is done with this buffer before it is refilled (FUSED:
                          // and every warp's dS^T rows are in dS_s)
        if (FUSED) {
            // dq (queries q0 + 16 warp .., W) += dS (16 queries, 64 keys) k (64 keys, W): A read
            // transposed from dS_s, B from the key tile. dS_s is rewritten only after the next
            // tile's first __syncthreads, which every warp reaches after this.
            float acc[W / 8][4];
#pragma unroll
            for (int dn = 0; dn < W / 8; dn++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[dn][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                u32 a[4];
                load_a_trans(a, dS_s, LS, warp * 16, kk * 16);
#pragma unroll
                for (int dn = 0; dn < W / 16; dn++) {
                    u32 bt[4];
                    load_b_trans(bt, Ks, LR, kk * 16, dn * 16);
                    mma_bf16(acc[2 * dn], a, bt[0], bt[1]);
                    mma_bf16(acc[2 * dn + 1], a, bt[2], bt[3]);
                }
            }
            float* acc_rows = dq_acc + (bh * round_tile(p.tq) + q0 + warp * 16) * W;  // this warp's 16 rows
            const int lane = threadIdx.x % 32;
            if (BULK) {
                // lane r < 16 owns row r's bulk reduction; its last one must have read the
                // staging before the warp rewrites it
                if (lane < 16) bulk_wait_read();
                __syncwarp();
#pragma unroll
                for (int half = 0; half < 2; half++)
#pragma unroll
                    for (int dn = 0; dn < W / 8; dn++)
                        *(float2*)(dq_s + (g + 8 * half) * LQ + dn * 8 + 2 * t) =
                            make_float2(acc[dn][2 * half], acc[dn][2 * half + 1]);
                fence_proxy_async();
                __syncwarp();
                if (lane < 16) {  // rows past Tq are padding rows of dq_acc (zeros added)
                    bulk_reduce_add_f32(acc_rows + lane * W, dq_s + lane * LQ, W * 4);
                    bulk_commit();
                }
            } else {
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    const int r = g + 8 * half;
                    if (q0 + warp * 16 + r >= p.tq) continue;  // a padding query: its dS row is zero
#pragma unroll
                    for (int dn = 0; dn < W / 8; dn++)
                        red_add_f32x2(acc_rows + r * W + dn * 8 + 2 * t, acc[dn][2 * half], acc[dn][2 * half + 1]);
                }
            }
        }
    }
    cp_async_wait<0>();  // nothing may be in flight when the block exits
    if (BULK && threadIdx.x % 32 < 16) bulk_wait_all();  // nor may a bulk reduction

#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int j = k0 + warp * 16 + g + 8 * half;
        if (j >= p.tk) continue;
        const size_t dkrow = ((size_t)b * p.tk + j) * p.k_ld + p.k_off + h * p.hd;
        const size_t dvrow = ((size_t)b * p.tk + j) * p.v_ld + p.v_off + h * p.hd;
#pragma unroll
        for (int dn = 0; dn < W / 8; dn++) {
            const int d = dn * 8 + 2 * t;
            io_grad_store_pair(dkv, dkrow + d, d, dk[dn][2 * half] * p.scale, dk[dn][2 * half + 1] * p.scale, p);
            io_grad_store_pair(dkv, dvrow + d, d, dv[dn][2 * half], dv[dn][2 * half + 1], p);
        }
    }
}

template <int NC>
__device__ void backward_dq_bf16_impl(float* dq, const bf16_t* qh, const bf16_t* kh,
                                    const bf16_t* vh, const bf16_t* doh, const float* stats,
                                    const AttnParams p) {
    constexpr int W = 16 * NC, LR = W + 8, TS = TILE * LR;
    extern __shared__ float smem[];
    bf16_t* Qs = (bf16_t*)smem;  // (64 queries, LR): A of s = q k^T
    bf16_t* dOs = Qs + TS;       // (64 queries, LR): A of dP = dout v^T
    bf16_t* Ks = dOs + TS;       // 2 x (64 keys, LR): B of s, and of dq += dS k (trans)
    bf16_t* Vs = Ks + 2 * TS;    // 2 x (64 keys, LR): B of dP

    const TileCoord tc = block_tile(true);  // the last query tile has the most key tiles
    const int q0 = tc.tile * TILE, h = tc.h, b = tc.b;
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const int tqp = round_tile(p.tq);
    const size_t bh = (size_t)b * p.heads + h;
    const TileSrc kb = head_src<W>(kh, p, b, h, p.tk, p.k_ld, p.k_off);
    const TileSrc vb = head_src<W>(vh, p, b, h, p.tk, p.v_ld, p.v_off);
    const float scale2 = p.scale * LOG2E;

    copy_tile_async<W>(Qs, head_src<W>(qh, p, b, h, p.tq, p.q_ld, p.q_off), q0);
    copy_tile_async<W>(dOs, head_src<W>(doh, p, b, h, p.tq, p.channels, 0), q0);
    copy_tile_async<W>(Ks, kb, 0);
    copy_tile_async<W>(Vs, vb, 0);
    cp_async_commit();
    // (lse log2e, D) of this thread's two rows, g and g+8 of the warp's 16 (padded rows: 0)
    float lse2[2], dd[2];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const size_t i = (size_t)q0 + warp * 16 + g + 8 * half;
        lse2[half] = stats[(bh * tqp + i) * 2];
        dd[half] = stats[(bh * tqp + i) * 2 + 1];
    }

    float acc[W / 8][4];  // (16 queries, W) dq, C layout
#pragma unroll
    for (int dn = 0; dn < W / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[dn][e] = 0.0f;

    const int nk = key_count(p, b);  // key tiles past it are all padding: skipped
    const int kend = p.causal ? min(nk, q0 + TILE) : nk;
    for (int k0 = 0, it = 0; k0 < kend; k0 += TILE, it++) {
        const int buf = it & 1;
        if (k0 + TILE < kend) {  // the next key tile, into the other buffer
            copy_tile_async<W>(Ks + (buf ^ 1) * TS, kb, k0 + TILE);
            copy_tile_async<W>(Vs + (buf ^ 1) * TS, vb, k0 + TILE);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // this key tile (and Q, dout) landed for every thread
        const bf16_t* Kc = Ks + buf * TS;
        const bf16_t* Vc = Vs + buf * TS;

        // rows: this warp's 16 queries; columns: the 64 keys
        float s[8][4], dp[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < NC; kk++) {
            u32 qa[4], da[4];
            load_a(qa, Qs, LR, warp * 16, kk * 16);
            load_a(da, dOs, LR, warp * 16, kk * 16);
#pragma unroll
            for (int n2 = 0; n2 < 4; n2++) {
                u32 bb[4];
                load_b2(bb, Kc, LR, n2 * 16, kk * 16);
                mma_bf16(s[2 * n2], qa, bb[0], bb[1]);
                mma_bf16(s[2 * n2 + 1], qa, bb[2], bb[3]);
                load_b2(bb, Vc, LR, n2 * 16, kk * 16);
                mma_bf16(dp[2 * n2], da, bb[0], bb[1]);
                mma_bf16(dp[2 * n2 + 1], da, bb[2], bb[3]);
            }
        }
        // dS in place of dP (no per-element test on a fully visible tile)
        if (pair_tile_full(p, nk, q0, k0)) {
            probs_dq<false>(s, dp, lse2, dd, p, nk, q0 + warp * 16 + g, k0 + 2 * t, scale2);
        } else {
            probs_dq<true>(s, dp, lse2, dd, p, nk, q0 + warp * 16 + g, k0 + 2 * t, scale2);
        }
        u32 sa[4][4];
        c_to_a(sa, dp);
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
#pragma unroll
            for (int dn = 0; dn < W / 16; dn++) {
                u32 bt[4];
                load_b_trans(bt, Kc, LR, kk * 16, dn * 16);
                mma_bf16(acc[2 * dn], sa[kk], bt[0], bt[1]);  // dq += dS k
                mma_bf16(acc[2 * dn + 1], sa[kk], bt[2], bt[3]);
            }
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
    cp_async_wait<0>();

#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int i = q0 + warp * 16 + g + 8 * half;
        if (i >= p.tq) continue;
        const size_t dqrow = ((size_t)b * p.tq + i) * p.q_ld + p.q_off + h * p.hd;
#pragma unroll
        for (int dn = 0; dn < W / 8; dn++) {
            const int d = dn * 8 + 2 * t;
            io_grad_store_pair(dq, dqrow + d, d, acc[dn][2 * half] * p.scale, acc[dn][2 * half + 1] * p.scale, p);
        }
    }
}

// ---- tensor-core entry points ----------------------------------------------------------

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_forward_bf16_d32(float* out, float* lse, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                          const AttnParams p) {
    forward_bf16_impl<2>(out, lse, qh, kh, vh, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_FWD_MIN_BLOCKS)
attention_forward_bf16_d64(float* out, float* lse, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                          const AttnParams p) {
    forward_bf16_impl<4>(out, lse, qh, kh, vh, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_forward_bf16_d128(float* out, float* lse, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                          const AttnParams p) {
    forward_bf16_impl<8>(out, lse, qh, kh, vh, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dkv_bf16_d32(float* dkv, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<2, false>(dkv, nullptr, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dq_bf16_d32(float* dq, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dq_bf16_impl<2>(dq, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_DKV_MIN_BLOCKS)
attention_backward_dkv_bf16_d64(float* dkv, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<4, false>(dkv, nullptr, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_DQ_MIN_BLOCKS)
attention_backward_dq_bf16_d64(float* dq, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dq_bf16_impl<4>(dq, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dkv_bf16_d128(float* dkv, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<8, false>(dkv, nullptr, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dq_bf16_d128(float* dq, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dq_bf16_impl<8>(dq, qh, kh, vh, doh, stats, p);
}
// Fused backward (dk, dv and dq in one pass over the tile pairs; grid as the dkv pass): dq_acc
// (B, H, Tqpad, W) f32 must be zero before, and attention_dq_from_acc reads it after.
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_fused_bf16_d32(float* dkv, float* dq_acc, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<2, true>(dkv, dq_acc, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_DKV_MIN_BLOCKS)
attention_backward_fused_bf16_d64(float* dkv, float* dq_acc, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<4, true>(dkv, dq_acc, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_fused_bf16_d128(float* dkv, float* dq_acc, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<8, true>(dkv, dq_acc, qh, kh, vh, doh, stats, p);
}

// dq (the q columns of the gradient buffer, f32 or bf16) += or = scale * dq_acc (B, H, Tqpad, w)
// f32 of the fused backward: one thread per column pair (d, d + 1) of each (b, i, h), d < hd.
extern "C" __global__ void __launch_bounds__(THREADS)
attention_dq_from_acc(float* dq, const float* dq_acc, int w, const AttnParams p) {
    const int pairs = (p.hd + 1) / 2;
    const size_t n = (size_t)p.batch * p.tq * p.heads * pairs;
    const size_t e = (size_t)blockIdx.x * THREADS + threadIdx.x;
    if (e >= n) return;
    const int d = 2 * (int)(e % pairs);
    size_t r = e / pairs;  // (b * Tq + i) * H + h
    const int h = (int)(r % p.heads);
    r /= p.heads;
    const int i = (int)(r % p.tq), b = (int)(r / p.tq);
    // d + 1 < w always (hd <= w and d even), so the pair's second value is in the row
    const float* a = dq_acc + (((size_t)b * p.heads + h) * round_tile(p.tq) + i) * w + d;
    io_grad_store_pair(dq, ((size_t)b * p.tq + i) * p.q_ld + p.q_off + h * p.hd + d, d, a[0] * p.scale,
                       a[1] * p.scale, p);
}
