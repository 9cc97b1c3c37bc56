// The tensor-core attention backward: the dkv and dq passes, or both fused in one
// (attention_mma.cuh has the primitives and tiles; attention_operands.cu the row stats they read).

// dkv pass; FUSED: also dq (FlashAttention-2's backward: 5 products per tile pair instead of
// the 7 of the dkv and dq passes). Each query tile's dS^T goes through shared memory
// (dS_s) and every warp adds dS k for 16 of the tile's queries into dq_acc (B, H, Tqpad, W) f32:
// on sm_90 with W <= 64 by bulk reductions of its 16 rows staged in shared memory (dq_s, one
// (16, W + 8) f32 tile per warp; rows padded so the staging stores miss each other's banks),
// else with vector atomics; attention_dq_from_acc then scales it into dq. The order of the
// additions varies between runs, so dq is not bitwise repeatable in this mode.
template <int NC, bool FUSED, bool WG>
__device__ void backward_dkv_bf16_impl(float* dkv, float* dq_acc, const bf16_t* qh, const bf16_t* kh,
                                     const bf16_t* vh, const bf16_t* doh, const float* stats,
                                     const AttnParams p) {
    static_assert(!(FUSED && WG), "the fused backward has no wgmma version");
    constexpr int W = 16 * NC, LR = W + 8, TS = tile_elems<W, WG>();
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
    copy_tile<W, WG>(Ks, head_src<W>(kh, p, b, h, p.tk, p.k_ld, p.k_off), k0);
    copy_tile<W, WG>(Vs, head_src<W>(vh, p, b, h, p.tk, p.v_ld, p.v_off), k0);
    copy_tile<W, WG>(Qs, qb, qstart);
    copy_tile<W, WG>(dOs, dob, qstart);
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
            copy_tile<W, WG>(Qs + (buf ^ 1) * TS, qb, q0 + TILE);
            copy_tile<W, WG>(dOs + (buf ^ 1) * TS, dob, q0 + TILE);
            copy_stats_async(st_s + (buf ^ 1) * 2 * TILE, sb, q0 + TILE);
        }
        cp_async_commit();  // (possibly empty) so that "all but the newest" is this tile
        cp_async_wait<1>();
        if constexpr (WG) fence_proxy_async();  // this thread's copies, visible to wgmma's reads
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
        if constexpr (WG) {
            // S^T = k q^T and dP^T = v dout^T, the query and dout tiles K-major
            u32 ka[NC][4], va[NC][4];
#pragma unroll
            for (int kk = 0; kk < NC; kk++) {
                load_a_cm<W>(ka[kk], Ks, warp * 16, kk * 16);
                load_a_cm<W>(va[kk], Vs, warp * 16, kk * 16);
            }
            wgmma_products2<64, 0, NC, W>(st, ka, Qc, dpt, va, dOc);
        } else {
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
        if constexpr (WG) {
            wgmma_products2<W, 1, 4, W>(dv, pa, dOc, dk, sa, Qc);  // the dout and query tiles MN-major
        } else {
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
    if (!FUSED && p.bias_partial) {
        add_bias_partial(dkv, p, b, k0, p.k_ld, p.k_off + h * p.hd);
        add_bias_partial(dkv, p, b, k0, p.v_ld, p.v_off + h * p.hd);
    }
}

template <int NC, bool WG>
__device__ void backward_dq_bf16_impl(float* dq, const bf16_t* qh, const bf16_t* kh,
                                    const bf16_t* vh, const bf16_t* doh, const float* stats,
                                    const AttnParams p) {
    constexpr int W = 16 * NC, LR = W + 8, TS = tile_elems<W, WG>();
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

    copy_tile<W, WG>(Qs, head_src<W>(qh, p, b, h, p.tq, p.q_ld, p.q_off), q0);
    copy_tile<W, WG>(dOs, head_src<W>(doh, p, b, h, p.tq, p.channels, 0), q0);
    copy_tile<W, WG>(Ks, kb, 0);
    copy_tile<W, WG>(Vs, vb, 0);
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
            copy_tile<W, WG>(Ks + (buf ^ 1) * TS, kb, k0 + TILE);
            copy_tile<W, WG>(Vs + (buf ^ 1) * TS, vb, k0 + TILE);
        }
        cp_async_commit();
        cp_async_wait<1>();
        if constexpr (WG) fence_proxy_async();  // this thread's copies, visible to wgmma's reads
        __syncthreads();  // this key tile (and Q, dout) landed for every thread
        const bf16_t* Kc = Ks + buf * TS;
        const bf16_t* Vc = Vs + buf * TS;

        // rows: this warp's 16 queries; columns: the 64 keys
        float s[8][4], dp[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = dp[nt][e] = 0.0f;
        if constexpr (WG) {
            // s = q k^T and dP = dout v^T, the key and value tiles K-major
            u32 qa[NC][4], da[NC][4];
#pragma unroll
            for (int kk = 0; kk < NC; kk++) {
                load_a_cm<W>(qa[kk], Qs, warp * 16, kk * 16);
                load_a_cm<W>(da[kk], dOs, warp * 16, kk * 16);
            }
            wgmma_products2<64, 0, NC, W>(s, qa, Kc, dp, da, Vc);
        } else {
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
        }
        // dS in place of dP (no per-element test on a fully visible tile)
        if (pair_tile_full(p, nk, q0, k0)) {
            probs_dq<false>(s, dp, lse2, dd, p, nk, q0 + warp * 16 + g, k0 + 2 * t, scale2);
        } else {
            probs_dq<true>(s, dp, lse2, dd, p, nk, q0 + warp * 16 + g, k0 + 2 * t, scale2);
        }
        u32 sa[4][4];
        c_to_a(sa, dp);
        if constexpr (WG) {
            wgmma_product<W, 1, 4, W>(acc, sa, Kc);  // dq += dS k, the key tile MN-major
        } else {
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
#pragma unroll
                for (int dn = 0; dn < W / 16; dn++) {
                    u32 bt[4];
                    load_b_trans(bt, Kc, LR, kk * 16, dn * 16);
                    mma_bf16(acc[2 * dn], sa[kk], bt[0], bt[1]);  // dq += dS k
                    mma_bf16(acc[2 * dn + 1], sa[kk], bt[2], bt[3]);
                }
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
    if (p.bias_partial) add_bias_partial(dq, p, b, q0, p.q_ld, p.q_off + h * p.hd);
}

// ---- entry points, one per head-dim bucket (hd <= 32, 64, 128) -----------------------------

extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dkv_bf16_d32(float* dkv, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<2, false, false>(dkv, nullptr, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dq_bf16_d32(float* dq, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dq_bf16_impl<2, false>(dq, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_DKV_MIN_BLOCKS)
attention_backward_dkv_bf16_d64(float* dkv, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<4, false, false>(dkv, nullptr, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_DQ_MIN_BLOCKS)
attention_backward_dq_bf16_d64(float* dq, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dq_bf16_impl<4, false>(dq, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dkv_bf16_d128(float* dkv, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<8, false, false>(dkv, nullptr, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dq_bf16_d128(float* dq, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dq_bf16_impl<8, false>(dq, qh, kh, vh, doh, stats, p);
}
// Fused backward (dk, dv and dq in one pass over the tile pairs; grid as the dkv pass): dq_acc
// (B, H, Tqpad, W) f32 must be zero before, and attention_dq_from_acc reads it after.
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_fused_bf16_d32(float* dkv, float* dq_acc, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<2, true, false>(dkv, dq_acc, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_DKV_MIN_BLOCKS)
attention_backward_fused_bf16_d64(float* dkv, float* dq_acc, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<4, true, false>(dkv, dq_acc, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_fused_bf16_d128(float* dkv, float* dq_acc, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<8, true, false>(dkv, dq_acc, qh, kh, vh, doh, stats, p);
}

// The dkv and dq passes on wgmma (attention_wgmma.cuh; sm_90a only).
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dkv_wgmma_d32(float* dkv, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<2, false, true>(dkv, nullptr, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dq_wgmma_d32(float* dq, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                             const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dq_bf16_impl<2, true>(dq, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_DKV_MIN_BLOCKS)
attention_backward_dkv_wgmma_d64(float* dkv, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<4, false, true>(dkv, nullptr, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS, SMELT_ATTN_DQ_MIN_BLOCKS)
attention_backward_dq_wgmma_d64(float* dq, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                             const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dq_bf16_impl<4, true>(dq, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dkv_wgmma_d128(float* dkv, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                              const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dkv_bf16_impl<8, false, true>(dkv, nullptr, qh, kh, vh, doh, stats, p);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS)
attention_backward_dq_wgmma_d128(float* dq, const bf16_t* qh, const bf16_t* kh, const bf16_t* vh,
                             const bf16_t* doh, const float* stats, const AttnParams p) {
    backward_dq_bf16_impl<8, true>(dq, qh, kh, vh, doh, stats, p);
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
