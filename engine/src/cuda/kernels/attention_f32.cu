// The f32 attention kernels (attention.cuh describes the tiling): the reference the
// tensor-core kernels are checked against, and what runs on GPUs before sm_80.

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

