// Attention with learned scores, the semantics of engine/src/cpu/attention_ex.rs:
//   general (Luong):    s_ij = (scale q_i W_h) . k_j,                 W (H, hd, hd)
//   additive (Bahdanau): s_ij = sum_e v_h[e] tanh(qa_i[e] + ka_j[e]),  qa = q Wq_h, ka = k Wk_h,
//                        Wq, Wk (H, hd, A), v (H, A)
// then softmax over the visible keys (key padding mask, causal) and out_i = sum_j p_ij v_j, as
// the dot-score kernels (attention*.cu, whose q / kv layouts these share). The saved state is the
// same per-row log-sum-exp (B, H, Tq).
//
// Each score needs its query's and key's features: "qf" (B, H, Tq, W) is scale q W (general) or
// qa (additive), "kf" is k itself (general, read from kv) or ka (B, H, Tk, A) (additive), W the
// feature width (hd or A, at most 128). learned_scores_project makes qf and ka (the projections
// are small GEMMs per head; a thread per output keeps them one simple kernel), and the
// project_back kernels take their gradients back to q, k and the weights.
//
// The attention kernels are FlashAttention-shaped but plain f32 (no tensor cores: a tanh per
// feature and pair dominates the additive score anyway), with nothing (T, T) in memory:
//   learned_attention_forward         grid (ceil(Tq/16), H, B), 128 threads: each warp owns 4
//       query rows; key tiles of 32 go through shared memory, one key per lane, with an online
//       softmax per row; lse saved.
//   learned_attention_backward_rows   same grid: recomputes p_ij = exp(s_ij - lse_i), dp_ij =
//       dout_i . v_j, ds_ij = p_ij (dp_ij - D_i) (D_i = dout_i . out_i, also saved for the next
//       kernel) and sums the query side's gradient: dqf_i (and the additive v's per-row share).
//   learned_attention_backward_keys   grid (ceil(Tk/16), H, B): each warp owns 4 key rows, query
//       tiles of 32 (one per lane): dv_j and the key side's gradient (dk_j for general, dka_j).
// Every gradient element is owned by one thread (row sums in a fixed order; the weight gradients
// summed over fixed chunks of rows, then over the chunks in order), so the results are the same
// on every run.

#define LS_ROWS 16      // rows (queries or keys) of a block: 4 warps x 4 rows
#define LS_ROWS_PER_WARP 4
#define LS_THREADS 128
#define LS_TILE 32      // keys (or queries) of an inner tile: one per lane
#define LS_MAX_W 128    // widest feature row and head: 4 columns per lane

// Keep in sync with `LsParams` in engine/src/cuda/learned_scores.rs (repr(C), same order).
struct LsParams {
    int batch;          // B
    int tq, tk;         // query and key positions per batch element
    int heads, hd;      // H, head dim (C = H hd)
    int q_ld, q_off;    // row stride and column offset of queries in q (and of dq in dq)
    int k_ld, k_off;    // of keys in kv (and of dk)
    int v_ld, v_off;    // of values in kv (and of dv)
    int causal;         // 1: query i sees keys j <= i
    int io_bf16;        // q, kv, out, dout and their gradients are bf16 activation buffers
    int width;          // W: features per score row (hd for general, A for additive)
    int additive;       // 1: Bahdanau's score; 0: the general (bilinear) one
    int accumulate;     // backward: 1 adds into dq, dk, dv; 0 writes over them
    const unsigned* key_lens;  // (B): keys j >= key_lens[b] are padding; null: none
};

__device__ __forceinline__ float ls_load(const float* base, size_t idx, int bf16) {
    return bf16 ? bf16_to_f32(((const unsigned short*)base)[idx]) : base[idx];
}
// Writes v (accumulate: adds it) at idx of an f32 or bf16 buffer.
__device__ __forceinline__ void ls_store(float* base, size_t idx, float v, int bf16, int accumulate) {
    if (bf16) {
        unsigned short* h = (unsigned short*)base;
        h[idx] = f32_to_bf16_rne((accumulate ? bf16_to_f32(h[idx]) : 0.0f) + v);
    } else {
        base[idx] = (accumulate ? base[idx] : 0.0f) + v;
    }
}

__device__ __forceinline__ float ls_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float ls_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float ls_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ int ls_key_count(const LsParams& p, int b) {
    return p.key_lens ? (int)p.key_lens[b] : p.tk;
}
__device__ __forceinline__ bool ls_visible(const LsParams& p, int nk, int i, int j) {
    return j < nk && (!p.causal || j <= i);
}

// One score from a query's and a key's feature rows (W floats each, in shared memory).
__device__ __forceinline__ float ls_score(const LsParams& p, const float* qf, const float* kf, const float* va) {
    float s = 0.0f;
    if (p.additive) {
        for (int e = 0; e < p.width; e++) s += va[e] * tanhf(qf[e] + kf[e]);
    } else {
        for (int e = 0; e < p.width; e++) s += qf[e] * kf[e];
    }
    return s;
}

// Offsets of the per-head (B, H, T, W) feature arrays.
__device__ __forceinline__ size_t ls_feat(const LsParams& p, int b, int h, int t, int rows) {
    return (((size_t)b * p.heads + h) * rows + t) * p.width;
}

// Rows r0 .. r0 + n of a key-side tile into shared memory: features kf (row stride W + 1) and
// values v (row stride hd + 1); rows past Tk are zeros. The padding puts the rows a warp reads
// lane by lane (one key per lane) in different banks.
__device__ void ls_load_keys(float* kf, float* vs, const float* k_feat, const float* kv, const LsParams& p,
                             int b, int h, int r0, int n, int kf_stride, int v_stride) {
    const int W = p.width, hd = p.hd;
    for (int x = threadIdx.x; x < n * W; x += LS_THREADS) {
        const int r = x / W, e = x % W, j = r0 + r;
        float val = 0.0f;
        if (j < p.tk) {
            val = p.additive ? k_feat[ls_feat(p, b, h, j, p.tk) + e]
                             : ls_load(kv, ((size_t)b * p.tk + j) * p.k_ld + p.k_off + h * hd + e, p.io_bf16);
        }
        kf[r * kf_stride + e] = val;
    }
    for (int x = threadIdx.x; x < n * hd; x += LS_THREADS) {
        const int r = x / hd, d = x % hd, j = r0 + r;
        vs[r * v_stride + d] = j < p.tk ? ls_load(kv, ((size_t)b * p.tk + j) * p.v_ld + p.v_off + h * hd + d, p.io_bf16) : 0.0f;
    }
}

// Query-side rows i0 .. i0 + n: features (row stride qf_stride) and, when dout is given, dout's
// head columns (row stride do_stride); rows past Tq are zeros.
__device__ void ls_load_queries(float* qs, float* dos, const float* q_feat, const float* dout, const LsParams& p,
                                int b, int h, int i0, int n, int qf_stride, int do_stride) {
    const int W = p.width, hd = p.hd, C = p.heads * p.hd;
    for (int x = threadIdx.x; x < n * W; x += LS_THREADS) {
        const int r = x / W, e = x % W, i = i0 + r;
        qs[r * qf_stride + e] = i < p.tq ? q_feat[ls_feat(p, b, h, i, p.tq) + e] : 0.0f;
    }
    if (dout) {
        for (int x = threadIdx.x; x < n * hd; x += LS_THREADS) {
            const int r = x / hd, d = x % hd, i = i0 + r;
            dos[r * do_stride + d] = i < p.tq ? ls_load(dout, ((size_t)b * p.tq + i) * C + h * hd + d, p.io_bf16) : 0.0f;
        }
    }
}

// The additive score's v for head h (W floats); nothing for the general score.
__device__ void ls_load_va(float* va, const float* va_all, const LsParams& p, int h) {
    if (!p.additive) return;
    for (int e = threadIdx.x; e < p.width; e += LS_THREADS) va[e] = va_all[(size_t)h * p.width + e];
}

// Keys any of query rows i0 .. i0 + LS_ROWS can see.
__device__ __forceinline__ int ls_keys_for_rows(const LsParams& p, int nk, int i0) {
    const int last = min(i0 + LS_ROWS, p.tq) - 1;
    return p.causal ? min(nk, last + 1) : nk;
}

// out (B, Tq, C) and lse (B, H, Tq), from q_feat (B, H, Tq, W), k_feat (additive: (B, H, Tk, A);
// general: unused, keys come from kv), kv and va_all (additive: (H, A)).
extern "C" __global__ void __launch_bounds__(LS_THREADS)
learned_attention_forward(float* out, float* lse, const float* q_feat, const float* k_feat, const float* kv,
                          const float* va_all, LsParams p) {
    extern __shared__ float smem[];
    const int W = p.width, hd = p.hd, C = p.heads * p.hd;
    float* qs = smem;                       // (16, W)
    float* ks = qs + LS_ROWS * W;           // (32, W + 1)
    float* vs = ks + LS_TILE * (W + 1);     // (32, hd + 1)
    float* va = vs + LS_TILE * (hd + 1);    // (W)
    const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * LS_ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nk = ls_key_count(p, b);
    ls_load_queries(qs, nullptr, q_feat, nullptr, p, b, h, i0, LS_ROWS, W, 0);
    ls_load_va(va, va_all, p, h);

    float m[LS_ROWS_PER_WARP], l[LS_ROWS_PER_WARP], acc[LS_ROWS_PER_WARP][4];
    #pragma unroll
    for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++) {
        m[rr] = ls_neg_inf();
        l[rr] = 0.0f;
        #pragma unroll
        for (int c = 0; c < 4; c++) acc[rr][c] = 0.0f;
    }
    const int n_keys = ls_keys_for_rows(p, nk, i0);
    for (int j0 = 0; j0 < n_keys; j0 += LS_TILE) {
        __syncthreads();  // the previous tile's readers are done (and the rows are loaded)
        ls_load_keys(ks, vs, k_feat, kv, p, b, h, j0, LS_TILE, W + 1, hd + 1);
        __syncthreads();
        const int j = j0 + lane;
        #pragma unroll
        for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++) {
            // Rows past Tq see no key; every warp still takes part in every shuffle, so that
            // the shuffles stay block-uniform (tools/cuda_emu runs them as block barriers).
            const int r = warp * LS_ROWS_PER_WARP + rr, i = i0 + r;
            const bool vis = i < p.tq && ls_visible(p, nk, i, j);
            const float s = vis ? ls_score(p, qs + r * W, ks + lane * (W + 1), va) : ls_neg_inf();
            const float tile_max = ls_warp_max(s);
            const bool any = tile_max != ls_neg_inf();  // a key of this tile is visible from row i
            const float new_m = any ? fmaxf(m[rr], tile_max) : m[rr];
            const float corr = any ? expf(m[rr] - new_m) : 1.0f;  // 0 on the row's first visible tile
            const float pj = vis ? expf(s - new_m) : 0.0f;
            l[rr] = l[rr] * corr + ls_warp_sum(pj);
            #pragma unroll
            for (int c = 0; c < 4; c++) acc[rr][c] *= corr;
            for (int jj = 0; jj < LS_TILE; jj++) {
                const float pb = __shfl_sync(0xffffffffu, pj, jj);
                if (pb == 0.0f) continue;  // an invisible key (the same for the whole warp)
                #pragma unroll
                for (int c = 0; c < 4; c++) {
                    const int d = lane + 32 * c;
                    if (d < hd) acc[rr][c] += pb * vs[jj * (hd + 1) + d];
                }
            }
            m[rr] = new_m;
        }
    }
    #pragma unroll
    for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++) {
        const int i = i0 + warp * LS_ROWS_PER_WARP + rr;
        if (i >= p.tq) continue;
        const float inv = 1.0f / l[rr];
        #pragma unroll
        for (int c = 0; c < 4; c++) {
            const int d = lane + 32 * c;
            if (d < hd) ls_store(out, ((size_t)b * p.tq + i) * C + h * hd + d, acc[rr][c] * inv, p.io_bf16, 0);
        }
        if (lane == 0) lse[((size_t)b * p.heads + h) * p.tq + i] = m[rr] + logf(l[rr]);
    }
}

// The query side of the backward pass: dq_feat (B, H, Tq, W) (written over), for the additive
// score dva_rows (B, H, Tq, A) (each row's share of dv_h, written over), and D (B, H, Tq).
extern "C" __global__ void __launch_bounds__(LS_THREADS)
learned_attention_backward_rows(float* dq_feat, float* dva_rows, float* dsum, const float* q_feat,
                                const float* k_feat, const float* kv, const float* va_all, const float* out,
                                const float* dout, const float* lse, LsParams p) {
    extern __shared__ float smem[];
    const int W = p.width, hd = p.hd, C = p.heads * p.hd;
    float* qs = smem;                       // (16, W)
    float* dos = qs + LS_ROWS * W;          // (16, hd)
    float* ks = dos + LS_ROWS * hd;         // (32, W + 1)
    float* vs = ks + LS_TILE * (W + 1);     // (32, hd + 1)
    float* va = vs + LS_TILE * (hd + 1);    // (W)
    const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * LS_ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nk = ls_key_count(p, b);
    const size_t bh = (size_t)b * p.heads + h;
    ls_load_queries(qs, dos, q_feat, dout, p, b, h, i0, LS_ROWS, W, hd);
    ls_load_va(va, va_all, p, h);
    __syncthreads();

    // D_i = dout_i . out_i (= sum_j p_ij dp_ij), and each row's lse
    float di[LS_ROWS_PER_WARP], li[LS_ROWS_PER_WARP];
    #pragma unroll
    for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++) {
        const int r = warp * LS_ROWS_PER_WARP + rr, i = i0 + r;
        float part = 0.0f;
        if (i < p.tq) {
            for (int d = lane; d < hd; d += 32) part += dos[r * hd + d] * ls_load(out, ((size_t)b * p.tq + i) * C + h * hd + d, p.io_bf16);
        }
        di[rr] = ls_warp_sum(part);  // every warp shuffles (block-uniform, as in the forward)
        li[rr] = i < p.tq ? lse[bh * p.tq + i] : 0.0f;
        if (lane == 0 && i < p.tq) dsum[bh * p.tq + i] = di[rr];
    }

    float dqf[LS_ROWS_PER_WARP][4], dva[LS_ROWS_PER_WARP][4];
    #pragma unroll
    for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++)
        #pragma unroll
        for (int c = 0; c < 4; c++) dqf[rr][c] = dva[rr][c] = 0.0f;
    const int n_keys = ls_keys_for_rows(p, nk, i0);
    for (int j0 = 0; j0 < n_keys; j0 += LS_TILE) {
        __syncthreads();
        ls_load_keys(ks, vs, k_feat, kv, p, b, h, j0, LS_TILE, W + 1, hd + 1);
        __syncthreads();
        const int j = j0 + lane;
        #pragma unroll
        for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++) {
            const int r = warp * LS_ROWS_PER_WARP + rr, i = i0 + r;
            float ds = 0.0f;
            if (i < p.tq && ls_visible(p, nk, i, j)) {
                const float pij = expf(ls_score(p, qs + r * W, ks + lane * (W + 1), va) - li[rr]);
                float dp = 0.0f;
                for (int d = 0; d < hd; d++) dp += dos[r * hd + d] * vs[lane * (hd + 1) + d];
                ds = pij * (dp - di[rr]);
            }
            for (int jj = 0; jj < LS_TILE; jj++) {
                const float dsb = __shfl_sync(0xffffffffu, ds, jj);
                if (dsb == 0.0f) continue;  // invisible keys (the same for the whole warp)
                #pragma unroll
                for (int c = 0; c < 4; c++) {
                    const int e = lane + 32 * c;
                    if (e >= W) continue;
                    const float kfe = ks[jj * (W + 1) + e];
                    if (p.additive) {
                        const float th = tanhf(qs[r * W + e] + kfe);
                        dqf[rr][c] += dsb * va[e] * (1.0f - th * th);
                        dva[rr][c] += dsb * th;
                    } else {
                        dqf[rr][c] += dsb * kfe;
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++) {
        const int i = i0 + warp * LS_ROWS_PER_WARP + rr;
        if (i >= p.tq) continue;
        #pragma unroll
        for (int c = 0; c < 4; c++) {
            const int e = lane + 32 * c;
            if (e >= W) continue;
            dq_feat[ls_feat(p, b, h, i, p.tq) + e] = dqf[rr][c];
            if (p.additive) dva_rows[ls_feat(p, b, h, i, p.tq) + e] = dva[rr][c];
        }
    }
}

// The key side of the backward pass: dv into dkv's value columns and, for the general score,
// dk into its key columns (both added or written over, p.accumulate); for the additive score
// dk_feat (B, H, Tk, A) (written over), taken back to dk by learned_scores_project_back_input.
extern "C" __global__ void __launch_bounds__(LS_THREADS)
learned_attention_backward_keys(float* dkv, float* dk_feat, const float* q_feat, const float* k_feat,
                                const float* kv, const float* va_all, const float* dout, const float* lse,
                                const float* dsum, LsParams p) {
    extern __shared__ float smem[];
    const int W = p.width, hd = p.hd;
    float* kfs = smem;                      // (16, W) the block's keys' features
    float* vr = kfs + LS_ROWS * W;          // (16, hd) their values
    float* qs = vr + LS_ROWS * hd;          // (32, W + 1) a query tile's features
    float* dos = qs + LS_TILE * (W + 1);    // (32, hd + 1) its dout rows
    float* ls = dos + LS_TILE * (hd + 1);   // (32) its lse
    float* dd = ls + LS_TILE;               // (32) its D
    float* va = dd + LS_TILE;               // (W)
    const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * LS_ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nk = ls_key_count(p, b);
    const size_t bh = (size_t)b * p.heads + h;
    ls_load_keys(kfs, vr, k_feat, kv, p, b, h, j0, LS_ROWS, W, hd);
    ls_load_va(va, va_all, p, h);

    float dv[LS_ROWS_PER_WARP][4], dk[LS_ROWS_PER_WARP][4];
    #pragma unroll
    for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++)
        #pragma unroll
        for (int c = 0; c < 4; c++) dv[rr][c] = dk[rr][c] = 0.0f;
    // Queries that can see a key of this block: all (none past the padding), or i >= j causally.
    const int q_start = j0 >= nk ? p.tq : (p.causal ? j0 / LS_TILE * LS_TILE : 0);
    for (int q0 = q_start; q0 < p.tq; q0 += LS_TILE) {
        __syncthreads();
        ls_load_queries(qs, dos, q_feat, dout, p, b, h, q0, LS_TILE, W + 1, hd + 1);
        for (int x = threadIdx.x; x < LS_TILE; x += LS_THREADS) {
            const int i = q0 + x;
            ls[x] = i < p.tq ? lse[bh * p.tq + i] : 0.0f;
            dd[x] = i < p.tq ? dsum[bh * p.tq + i] : 0.0f;
        }
        __syncthreads();
        const int i = q0 + lane;
        #pragma unroll
        for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++) {
            const int r = warp * LS_ROWS_PER_WARP + rr, j = j0 + r;
            float pij = 0.0f, ds = 0.0f;
            if (i < p.tq && j < p.tk && ls_visible(p, nk, i, j)) {
                pij = expf(ls_score(p, qs + lane * (W + 1), kfs + r * W, va) - ls[lane]);
                float dp = 0.0f;
                for (int d = 0; d < hd; d++) dp += dos[lane * (hd + 1) + d] * vr[r * hd + d];
                ds = pij * (dp - dd[lane]);
            }
            for (int ii = 0; ii < LS_TILE; ii++) {
                const float pb = __shfl_sync(0xffffffffu, pij, ii);
                const float dsb = __shfl_sync(0xffffffffu, ds, ii);
                if (pb == 0.0f && dsb == 0.0f) continue;  // invisible queries (warp-uniform)
                #pragma unroll
                for (int c = 0; c < 4; c++) {
                    const int d = lane + 32 * c;
                    if (d < hd) dv[rr][c] += pb * dos[ii * (hd + 1) + d];
                    if (d >= W) continue;
                    const float qfe = qs[ii * (W + 1) + d];
                    if (p.additive) {
                        const float th = tanhf(qfe + kfs[r * W + d]);
                        dk[rr][c] += dsb * va[d] * (1.0f - th * th);
                    } else {
                        dk[rr][c] += dsb * qfe;
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int rr = 0; rr < LS_ROWS_PER_WARP; rr++) {
        const int j = j0 + warp * LS_ROWS_PER_WARP + rr;
        if (j >= p.tk) continue;
        const size_t row = (size_t)b * p.tk + j;
        #pragma unroll
        for (int c = 0; c < 4; c++) {
            const int d = lane + 32 * c;
            if (d < hd) ls_store(dkv, row * p.v_ld + p.v_off + h * hd + d, dv[rr][c], p.io_bf16, p.accumulate);
            if (d >= W) continue;
            if (p.additive) {
                dk_feat[ls_feat(p, b, h, j, p.tk) + d] = dk[rr][c];
            } else {
                ls_store(dkv, row * p.k_ld + p.k_off + h * hd + d, dk[rr][c], p.io_bf16, p.accumulate);
            }
        }
    }
}

// feat (B, H, rows, W) = alpha x_h W_h: x's head columns (rows of stride ld, column offset off,
// f32 or bf16) times w (H, hd, W). A thread per output element.
extern "C" __global__ void __launch_bounds__(256)
learned_scores_project(float* feat, const float* x, const float* w, int rows, int ld, int off, float alpha,
                       LsParams p) {
    const size_t n = (size_t)p.batch * p.heads * rows * p.width;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const int e = (int)(idx % p.width);
    const size_t bht = idx / p.width;
    const int t = (int)(bht % rows), h = (int)(bht / rows % p.heads), b = (int)(bht / rows / p.heads);
    const size_t xrow = ((size_t)b * rows + t) * ld + off + (size_t)h * p.hd;
    const float* wh = w + (size_t)h * p.hd * p.width;
    float s = 0.0f;
    for (int d = 0; d < p.hd; d++) s += ls_load(x, xrow + d, p.io_bf16) * wh[(size_t)d * p.width + e];
    feat[idx] = alpha * s;
}

// dx's head columns (like x's in learned_scores_project) += alpha dfeat_h W_h^T, or written
// over when !p.accumulate. A thread per (b, t, h, d).
extern "C" __global__ void __launch_bounds__(256)
learned_scores_project_back_input(float* dx, const float* dfeat, const float* w, int rows, int ld, int off,
                                  float alpha, LsParams p) {
    const size_t n = (size_t)p.batch * rows * p.heads * p.hd;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const int d = (int)(idx % p.hd);
    const size_t bth = idx / p.hd;
    const int h = (int)(bth % p.heads), t = (int)(bth / p.heads % rows), b = (int)(bth / p.heads / rows);
    const float* g = dfeat + ls_feat(p, b, h, t, rows);
    const float* wd = w + ((size_t)h * p.hd + d) * p.width;
    float s = 0.0f;
    for (int e = 0; e < p.width; e++) s += g[e] * wd[e];
    ls_store(dx, ((size_t)b * rows + t) * ld + off + (size_t)h * p.hd + d, alpha * s, p.io_bf16, p.accumulate);
}

// The weight gradients dw (H, hd, W) = alpha sum over the B*rows rows (b, t) of x_h[d] dfeat_h[e]
// (and the additive v's dva (H, A) = the sum of its rows' shares) in two deterministic passes,
// the rows cut into `chunks` fixed chunks of `chunk` rows (learned_scores.rs picks them from the
// shape alone, so every run sums in the same order): a block per (output tile, head, chunk)
// writes the chunk's partial sums, then learned_scores_sum_chunks adds the chunks in order.
// (Before: a thread per weight summing all B*T rows serially, ~16K dependent steps per thread
// and a grid too small to fill the card.)
#define LS_WTILE 32     // a weight-gradient block's outputs: 32 x 32 (d, e), 4 per thread

// part (chunks, H, hd, W): chunk s's sum of x_h[d] dfeat_h[e] over its rows. Grid
// (ceil(hd/32) * ceil(W/32), H, chunks), 256 threads, 2 * 32 * 33 floats of shared memory.
extern "C" __global__ void __launch_bounds__(256)
learned_scores_weight_partials(float* part, const float* x, const float* dfeat, int rows, int ld, int off,
                               int chunk, LsParams p) {
    extern __shared__ float smem[];
    float* xs = smem;                         // (32 rows, 33): x_h[d] of the tile's d
    float* fs = xs + LS_WTILE * (LS_WTILE + 1); // (32 rows, 33): dfeat_h[e] of the tile's e
    const int W = p.width, tiles_e = (W + LS_WTILE - 1) / LS_WTILE;
    const int d0 = blockIdx.x / tiles_e * LS_WTILE, e0 = blockIdx.x % tiles_e * LS_WTILE;
    const int h = blockIdx.y, s = blockIdx.z;
    const int tx = threadIdx.x % LS_WTILE, ty = threadIdx.x / LS_WTILE;  // e column; d rows ty + 8k
    const int n_rows = p.batch * rows;
    const int n0 = s * chunk, n1 = min(n0 + chunk, n_rows);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r0 = n0; r0 < n1; r0 += LS_WTILE) {
        __syncthreads();
        for (int k = 0; k < 4; k++) {
            const int i = threadIdx.x + k * 256, rr = i / LS_WTILE, cc = i % LS_WTILE;
            const int n = r0 + rr, b = n / rows, t = n % rows;
            const int d = d0 + cc, e = e0 + cc;
            xs[rr * (LS_WTILE + 1) + cc] = n < n1 && d < p.hd ? ls_load(x, ((size_t)b * rows + t) * ld + off + (size_t)h * p.hd + d, p.io_bf16) : 0.0f;
            fs[rr * (LS_WTILE + 1) + cc] = n < n1 && e < W ? dfeat[ls_feat(p, b, h, t, rows) + e] : 0.0f;
        }
        __syncthreads();
        for (int rr = 0; rr < LS_WTILE; rr++) {
            const float f = fs[rr * (LS_WTILE + 1) + tx];
            #pragma unroll
            for (int k = 0; k < 4; k++) acc[k] += xs[rr * (LS_WTILE + 1) + ty + 8 * k] * f;
        }
    }
    const int e = e0 + tx;
    #pragma unroll
    for (int k = 0; k < 4; k++) {
        const int d = d0 + ty + 8 * k;
        if (d < p.hd && e < W) part[(((size_t)s * p.heads + h) * p.hd + d) * W + e] = acc[k];
    }
}

// part (chunks, H, A): chunk s's sum of the additive v's row shares dva_rows (B, H, Tq, A) over
// its rows (n = b Tq + i). Grid (H, chunks), LS_MAX_W threads: one per feature.
extern "C" __global__ void __launch_bounds__(LS_MAX_W)
learned_scores_row_partials(float* part, const float* dva_rows, int chunk, LsParams p) {
    const int h = blockIdx.x, s = blockIdx.y, e = threadIdx.x;
    if (e >= p.width) return;
    const int n0 = s * chunk, n1 = min(n0 + chunk, p.batch * p.tq);
    float acc = 0.0f;
    for (int n = n0; n < n1; n++) acc += dva_rows[ls_feat(p, n / p.tq, h, n % p.tq, p.tq) + e];
    part[((size_t)s * p.heads + h) * p.width + e] = acc;
}

// dst (len) += alpha sum over the chunks, in order, of part (chunks, len). A thread per element.
extern "C" __global__ void __launch_bounds__(256)
learned_scores_sum_chunks(float* dst, const float* part, int chunks, int len, float alpha) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= len) return;
    float acc = 0.0f;
    for (int c = 0; c < chunks; c++) acc += part[(size_t)c * len + idx];
    dst[idx] += alpha * acc;
}
