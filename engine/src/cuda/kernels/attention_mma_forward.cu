// The tensor-core attention forward (attention_mma.cuh has its primitives and tiles).

// Forward: q, k and v arrive in place or as head-major copies (TileSrc). One block per (64-query tile, head, batch); this warp's 16 query rows stay in registers as A
// fragments; key and value tiles are double-buffered by cp.async; scores live in the log2
// domain (exp2 of s * scale * log2 e), the saved lse in natural units.
template <int NC, bool WG>
__device__ void forward_bf16_impl(float* out, float* lse, const bf16_t* qh, const bf16_t* kh,
                                const bf16_t* vh, const AttnParams p) {
    constexpr int W = 16 * NC, LR = W + 8, TS = tile_elems<W, WG>();
    extern __shared__ float smem[];
    bf16_t* Qs = (bf16_t*)smem;  // (64 queries, W) tile
    bf16_t* Ks = Qs + TS;        // 2 x (64 keys, W): B of s = q k^T
    bf16_t* Vs = Ks + 2 * TS;    // 2 x (64 keys, W): B of o += P v (trans; WG: MN-major)

    const TileCoord tc = block_tile(true);  // the last query tile has the most key tiles
    const int q0 = tc.tile * TILE, h = tc.h, b = tc.b;
    const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const size_t bh = (size_t)b * p.heads + h;
    const TileSrc qb = head_src<W>(qh, p, b, h, p.tq, p.q_ld, p.q_off);
    const TileSrc kb = head_src<W>(kh, p, b, h, p.tk, p.k_ld, p.k_off);
    const TileSrc vb = head_src<W>(vh, p, b, h, p.tk, p.v_ld, p.v_off);
    const float scale2 = p.scale * LOG2E;

    copy_tile<W, WG>(Qs, qb, q0);
    cp_async_commit();
    copy_tile<W, WG>(Ks, kb, 0);
    copy_tile<W, WG>(Vs, vb, 0);
    cp_async_commit();
    cp_async_wait<1>();  // Q landed (the first key tile may still be in flight)
    __syncthreads();
    u32 qa[NC][4];  // this warp's 16 query rows as A fragments, kept for every key tile
#pragma unroll
    for (int kk = 0; kk < NC; kk++) load_a_tile<W, WG>(qa[kk], Qs, warp * 16, kk * 16);

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
            copy_tile<W, WG>(Ks + (buf ^ 1) * TS, kb, k0 + TILE);
            copy_tile<W, WG>(Vs + (buf ^ 1) * TS, vb, k0 + TILE);
        }
        cp_async_commit();
        cp_async_wait<1>();
        if constexpr (WG) fence_proxy_async();  // this thread's copies, visible to wgmma's reads
        __syncthreads();  // this key tile landed for every thread
        const bf16_t* Kc = Ks + buf * TS;
        const bf16_t* Vc = Vs + buf * TS;

        float s[8][4];  // (16, 64) scores, C layout
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = 0.0f;
        if constexpr (WG) {
            wgmma_product<64, 0, NC, W>(s, qa, Kc);  // s = q k^T, the key tile K-major
        } else {
#pragma unroll
            for (int n2 = 0; n2 < 4; n2++)
#pragma unroll
                for (int kk = 0; kk < NC; kk++) {
                    u32 bb[4];
                    load_b2(bb, Kc, LR, n2 * 16, kk * 16);
                    mma_bf16(s[2 * n2], qa[kk], bb[0], bb[1]);
                    mma_bf16(s[2 * n2 + 1], qa[kk], bb[2], bb[3]);
                }
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
        if constexpr (WG) {
            wgmma_product<W, 1, 4, W>(o, pa, Vc);  // o += P v, the value tile MN-major
        } else {
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
#pragma unroll
                for (int dn = 0; dn < W / 16; dn++) {
                    u32 bt[4];
                    load_b_trans(bt, Vc, LR, kk * 16, dn * 16);
                    mma_bf16(o[2 * dn], pa[kk], bt[0], bt[1]);  // o += P v
                    mma_bf16(o[2 * dn + 1], pa[kk], bt[2], bt[3]);
                }
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


// ---- entry points, one per head-dim bucket (hd <= 32, 64, 128) -----------------------------

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_forward_bf16_d32(float* out, float* lse, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                          const AttnParams p) {
    forward_bf16_impl<2, false>(out, lse, qh, kh, vh, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_FWD_MIN_BLOCKS)
attention_forward_bf16_d64(float* out, float* lse, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                          const AttnParams p) {
    forward_bf16_impl<4, false>(out, lse, qh, kh, vh, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_forward_bf16_d128(float* out, float* lse, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                          const AttnParams p) {
    forward_bf16_impl<8, false>(out, lse, qh, kh, vh, p);
}
// The same on wgmma (attention_wgmma.cuh; sm_90a only).
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_forward_wgmma_d32(float* out, float* lse, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                            const AttnParams p) {
    forward_bf16_impl<2, true>(out, lse, qh, kh, vh, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_FWD_MIN_BLOCKS)
attention_forward_wgmma_d64(float* out, float* lse, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                            const AttnParams p) {
    forward_bf16_impl<4, true>(out, lse, qh, kh, vh, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_forward_wgmma_d128(float* out, float* lse, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                             const AttnParams p) {
    forward_bf16_impl<8, true>(out, lse, qh, kh, vh, p);
}
