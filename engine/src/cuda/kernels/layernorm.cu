// LayerNorm over the last dimension (eps 1e-5): forward either from one float4 read of each row
// into registers (C <= 1024, C % 4 == 0, aligned buffers: layernorm_forward[_bf16out]_k*) or one
// warp per row reading it three times (layernorm_forward[_bf16out]); backward either in one pass
// per chunk of rows (C <= 1024, layernorm_backward_fused[_bf16dout]_k*) or in two parts, the input
// gradient (one warp per row) and the weight/bias gradients (deterministic column sums). The
// backward kernels take dout in f32 or (the _bf16dout ones) bf16.

typedef unsigned long long u64;

#define LN_EPS 1e-5f

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// An output element, f32 or bf16 (bf16.cuh is prepended by kernels.rs).
__device__ __forceinline__ void ln_store(float* o, u64 i, float v) { o[i] = v; }
__device__ __forceinline__ void ln_store(unsigned short* o, u64 i, float v) { o[i] = f32_to_bf16_rne(v); }

// out (N, C) = (inp - mean) * rstd * w + b; saves mean (N), rstd (N). One warp per row;
// statistics and math in f32 whatever out's type.
template <typename T>
__device__ void forward_impl(T* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                             u64 n_rows, u64 c) {
    u64 row = (blockIdx.x * (u64)blockDim.x + threadIdx.x) / 32;
    unsigned lane = threadIdx.x % 32;
    if (row >= n_rows) return;
    const float* x = inp + row * c;
    float s = 0.0f;
    for (u64 i = lane; i < c; i += 32) s += x[i];
    float m = warp_sum(s) / (float)c;
    float v = 0.0f;
    for (u64 i = lane; i < c; i += 32) {
        float d = x[i] - m;
        v += d * d;
    }
    float r = 1.0f / sqrtf(warp_sum(v) / (float)c + LN_EPS);
    T* o = out + row * c;
    for (u64 i = lane; i < c; i += 32) ln_store(o, i, (x[i] - m) * r * w[i] + b[i]);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                             const float* w, const float* b, u64 n_rows, u64 c) {
    forward_impl(out, mean, rstd, inp, w, b, n_rows, c);
}

// The same writing a bf16 output (a GEMM's input).
extern "C" __global__ void layernorm_forward_bf16out(unsigned short* out, float* mean, float* rstd, const float* inp,
                                                    const float* w, const float* b, u64 n_rows, u64 c) {
    forward_impl(out, mean, rstd, inp, w, b, n_rows, c);
}

// ---- backward -----------------------------------------------------------------------------
// With xhat = (x - mean) * rstd and dxhat = dout * w:
// dinp += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dw += sum_rows dout * xhat,
// db += sum_rows dout. dout is f32 or bf16 (the GEMM producing d(ln_out) may write bf16, as
// autocast does: the *_bf16dout kernels); inp, dinp and w are f32, all arithmetic f32.
//
// Every backward kernel gives lane l of a row's warp the column groups q = l + 32 j (columns
// 4 q .. 4 q + 3, j = 0, 1, ...), sums a row per lane in (j, column) order, then across lanes
// with butterfly shuffles: the fused kernels (vector loads) and the two-pass one (C > 1024)
// give the same dinp bits.
//
// Every backward kernel also takes dinp_bf16 (N, C), which may be null: where given, each final
// dinp value (after the accumulate / overwrite) is stored there too, rounded to bf16. The
// pre-LN GPT's next op reads that gradient as a bf16 GEMM's dout, which then needs no f32 ->
// bf16 conversion pass of its own. Whether it is null is uniform over the launch.

// A dout element as f32.
__device__ __forceinline__ float ln_load(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ln_load(const unsigned short* p, u64 i) { return bf16_to_f32(p[i]); }

// warp_sum on a and on b (the same additions), their shuffle latencies overlapped.
__device__ __forceinline__ void warp_sum2(float& a, float& b) {
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
}

// One warp per row: dinp += the input gradient (and dinp_bf16 = the sum as bf16, when given).
template <typename TG>
__device__ void backward_input_impl(float* dinp, unsigned short* dinp_bf16, const TG* dout, const float* inp,
                                    const float* w, const float* mean, const float* rstd, u64 n_rows, u64 c) {
    const u64 row = (blockIdx.x * (u64)blockDim.x + threadIdx.x) / 32;
    const unsigned lane = threadIdx.x % 32;
    if (row >= n_rows) return;
    const float* x = inp + row * c;
    const TG* dy = dout + row * c;
    const float mu = mean[row], rs = rstd[row];
    float dmean = 0.0f, dnorm_mean = 0.0f;
    for (u64 q = 4 * lane; q < c; q += 128) {
        for (u64 i = q; i < min(q + 4, c); i++) {
            const float xhat = (x[i] - mu) * rs;
            const float dxhat = ln_load(dy, i) * w[i];
            dmean += dxhat;
            dnorm_mean += dxhat * xhat;
        }
    }
    warp_sum2(dmean, dnorm_mean);
    dmean /= (float)c;
    dnorm_mean /= (float)c;
    float* dx = dinp + row * c;
    unsigned short* dxb = dinp_bf16 ? dinp_bf16 + row * c : nullptr;
    for (u64 q = 4 * lane; q < c; q += 128) {
        for (u64 i = q; i < min(q + 4, c); i++) {
            const float xhat = (x[i] - mu) * rs;
            const float dxhat = ln_load(dy, i) * w[i];
            const float v = dx[i] + rs * (dxhat - dmean - xhat * dnorm_mean);
            dx[i] = v;
            if (dxb) dxb[i] = f32_to_bf16_rne(v);
        }
    }
}

extern "C" __global__ void layernorm_backward_input(float* dinp, unsigned short* dinp_bf16, const float* dout,
                                                    const float* inp, const float* w, const float* mean,
                                                    const float* rstd, u64 n_rows, u64 c) {
    backward_input_impl(dinp, dinp_bf16, dout, inp, w, mean, rstd, n_rows, c);
}
extern "C" __global__ void layernorm_backward_input_bf16dout(float* dinp, unsigned short* dinp_bf16,
                                                             const unsigned short* dout, const float* inp,
                                                             const float* w, const float* mean,
                                                             const float* rstd, u64 n_rows, u64 c) {
    backward_input_impl(dinp, dinp_bf16, dout, inp, w, mean, rstd, n_rows, c);
}

// Per chunk of rows: pdw[chunk, i] = sum dout * xhat, pdb[chunk, i] = sum dout, from 0 in row
// order (the CPU reference's per-task partials); column_sum_finish adds them in chunk order.
// grid: (chunks, ceil(C / blockDim.x)).
template <typename TG>
__device__ void backward_params_partial_impl(float* pdw, float* pdb, const TG* dout, const float* inp,
                                             const float* mean, const float* rstd, u64 n_rows, u64 c,
                                             u64 rows_per_chunk) {
    const u64 i = blockIdx.y * (u64)blockDim.x + threadIdx.x;
    const u64 chunk = blockIdx.x;
    if (i >= c) return;
    const u64 r0 = chunk * rows_per_chunk;
    const u64 r1 = min(r0 + rows_per_chunk, n_rows);
    float dw = 0.0f, db = 0.0f;
    for (u64 r = r0; r < r1; r++) {
        const float xhat = (inp[r * c + i] - mean[r]) * rstd[r];
        const float dy = ln_load(dout, r * c + i);
        dw += dy * xhat;
        db += dy;
    }
    pdw[chunk * c + i] = dw;
    pdb[chunk * c + i] = db;
}

extern "C" __global__ void layernorm_backward_params_partial(float* pdw, float* pdb, const float* dout,
                                                             const float* inp, const float* mean,
                                                             const float* rstd, u64 n_rows, u64 c,
                                                             u64 rows_per_chunk) {
    backward_params_partial_impl(pdw, pdb, dout, inp, mean, rstd, n_rows, c, rows_per_chunk);
}
extern "C" __global__ void layernorm_backward_params_partial_bf16dout(float* pdw, float* pdb,
                                                                      const unsigned short* dout,
                                                                      const float* inp, const float* mean,
                                                                      const float* rstd, u64 n_rows,
                                                                      u64 c, u64 rows_per_chunk) {
    backward_params_partial_impl(pdw, pdb, dout, inp, mean, rstd, n_rows, c, rows_per_chunk);
}

// ---- fused backward (C <= 1024) -----------------------------------------------------------
// One pass over inp, dout and dinp: both row reductions, dinp and the weight/bias partials per
// chunk of rows.

#define LN_WARPS 8  // warps per block of layernorm_backward_fused_* (256 threads)
// The grid is one block per 64-row chunk (256 blocks for 16384 rows: two per SM on an H100),
// so two resident blocks per SM is all the occupancy there is to have. Their 128 registers a
// thread hold its part of a row (x, dout, old dinp: 12 per column group) with no spills up to
// K = 24 (ptxas -v, sm_90: 128 registers with the dinp_bf16 stores, 127 before); K = 32 spills a
// few words per row (ptxas, stores / loads: 52 / 88 bytes in the f32 kernel, 68 / 92 in the
// bf16 one; 88 / 88 and 32 / 32 before dinp_bf16), cheaper than one block per SM.
#define LN_MIN_BLOCKS 2

// Whether the 4-column groups can move as single 16-byte (f32) or 8-byte (bf16) words: C % 4 == 0
// and aligned buffers (dinp_bf16 too, when given), so that every row starts aligned too. Else
// (C % 4 != 0, a view at an odd offset) one access per column: the same columns per lane, so the
// same results.
template <typename TG>
__device__ __forceinline__ bool ln_vector_ok(const float* dinp, const unsigned short* dinp_bf16, const TG* dout,
                                             const float* inp, const float* w, u64 c) {
    return c % 4 == 0 && ((u64)dinp | (u64)inp | (u64)w) % 16 == 0 && (u64)dout % (4 * sizeof(TG)) == 0 &&
           (u64)dinp_bf16 % 8 == 0;
}

// v = columns col .. col + 3 of a row (col % 4 == 0), zeros at and past n. With vec, n % 4 == 0:
// a group is all in or all out.
__device__ __forceinline__ void ln_load4(float (&v)[4], const float* p, unsigned col, unsigned n, bool vec) {
    if (vec) {
        if (col < n) {
            const float4 q = *reinterpret_cast<const float4*>(p + col);
            v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
        } else {
            v[0] = v[1] = v[2] = v[3] = 0.0f;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) v[e] = col + e < n ? p[col + e] : 0.0f;
    }
}
__device__ __forceinline__ void ln_load4(float (&v)[4], const unsigned short* p, unsigned col, unsigned n,
                                         bool vec) {
    if (vec) {
        if (col < n) {
            bf16x4_unpack(*reinterpret_cast<const uint2*>(p + col), v);
        } else {
            v[0] = v[1] = v[2] = v[3] = 0.0f;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) v[e] = col + e < n ? bf16_to_f32(p[col + e]) : 0.0f;
    }
}

// p[col .. col + 4) = v, the columns below n only (as ln_load4).
__device__ __forceinline__ void ln_store4(float* p, unsigned col, unsigned n, bool vec, const float (&v)[4]) {
    if (vec) {
        if (col < n) {
            float4 q;
            q.x = v[0], q.y = v[1], q.z = v[2], q.w = v[3];
            *reinterpret_cast<float4*>(p + col) = q;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (col + e < n) p[col + e] = v[e];
    }
}

// The same into bf16 (rounded to nearest even): one 8-byte word on the vector path.
__device__ __forceinline__ void ln_store4(unsigned short* p, unsigned col, unsigned n, bool vec,
                                          const float (&v)[4]) {
    if (vec) {
        if (col < n) *reinterpret_cast<uint2*>(p + col) = bf16x4_pack(v);
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (col + e < n) p[col + e] = f32_to_bf16_rne(v[e]);
    }
}

// p[col .. col + 4) += v, the columns below n only (shared memory partials).
__device__ __forceinline__ void ln_add4(float* p, unsigned col, unsigned n, bool vec, const float (&v)[4]) {
    if (vec) {
        if (col < n) {
            float4* q = reinterpret_cast<float4*>(p + col);
            float4 t = *q;
            t.x += v[0], t.y += v[1], t.z += v[2], t.w += v[3];
            *q = t;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (col + e < n) p[col + e] += v[e];
    }
}

// One block per chunk of rows_per_chunk consecutive rows (the last chunk may be short); warp w
// takes rows w, w + LN_WARPS, ... of it; lane l the column groups l + 32 j (j < V, C <= 128 V).
// Per row a lane first issues all its loads (x, dout, the old dinp when accumulating), so their
// latencies overlap; then xhat, dxhat, its two row sums and the warp's dw, db partials, which
// live in shared memory so that registers hold only the row; then warp_sum2 and dinp (and its
// bf16 copy in dinp_bf16 when that is not null). At the end the warps' partials are added in
// warp order into pdw[chunk, :], pdb[chunk, :]: a fixed order, the same bits on every run
// (column_sum_finish then adds the chunks). With pdsum (and the bf16 copy), the block then reads
// its rows of the copy back (its own writes, L2-hot) and writes their column sums from 0 in row
// order into pdsum[chunk, :]: bitwise column_sum_partial_bf16's partials of the copy (the bias
// gradient of the projection whose output gradient the copy is), without that pass.
// Dynamic shared memory: (LN_WARPS, 2, C) floats, a warp's dw then db partial.
template <typename TG, int V, bool VEC>
__device__ void backward_fused_chunk(float* __restrict__ dinp, unsigned short* __restrict__ dinp_bf16,
                                    float* __restrict__ pdw, float* __restrict__ pdb, float* __restrict__ pdsum,
                                    const TG* __restrict__ dout,
                                    const float* __restrict__ inp, const float* __restrict__ w,
                                    const float* __restrict__ mean,
                                    const float* __restrict__ rstd, u64 n_rows, u64 c64, u64 rows_per_chunk,
                                    int accumulate) {
    extern __shared__ float smem[];
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned c = (unsigned)c64;  // <= 128 V
    const u64 chunk = blockIdx.x;
    const u64 r0 = chunk * rows_per_chunk, r1 = min(r0 + rows_per_chunk, n_rows);
    const bool vec = VEC;
    float* sdw = smem + 2 * c * warp;  // (C) this warp's dw partial; only its own lanes touch it
    float* sdb = sdw + c;              // (C) and its db partial
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < V; j++) {
        ln_store4(sdw, 4 * (lane + 32 * j), c, vec, zero);
        ln_store4(sdb, 4 * (lane + 32 * j), c, vec, zero);
    }
    // Every warp runs the same number of rounds (the shuffles stay block-uniform, as the host
    // emulator needs); a row past the chunk loads zeros and writes nothing.
    const u64 rounds = (r1 - r0 + LN_WARPS - 1) / LN_WARPS;
    for (u64 k = 0; k < rounds; k++) {
        const u64 row = r0 + k * LN_WARPS + warp;
        const bool live = row < r1;
        const unsigned n = live ? c : 0;  // columns this row loads and stores
        const float mu = live ? mean[row] : 0.0f, rs = live ? rstd[row] : 0.0f;
        const float* x = inp + row * c64;
        const TG* dy = dout + row * c64;
        float* dx = dinp + row * c64;
        unsigned short* dxb = dinp_bf16 ? dinp_bf16 + row * c64 : nullptr;
        // the lane's columns of the row: x (then xhat), dout (then dxhat), old dinp (or 0)
        float xh[V][4], g[V][4], d[V][4];
#pragma unroll
        for (int j = 0; j < V; j++) {
            const unsigned col = 4 * (lane + 32 * j);
            ln_load4(xh[j], x, col, n, vec);
            ln_load4(g[j], dy, col, n, vec);
            ln_load4(d[j], dx, col, accumulate ? n : 0, vec);  // overwriting: dinp is not read
        }
        float dmean = 0.0f, dnorm_mean = 0.0f;
#pragma unroll
        for (int j = 0; j < V; j++) {
            const unsigned col = 4 * (lane + 32 * j);
            float wv[4], gx[4];
            ln_load4(wv, w, col, n, vec);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                xh[j][e] = (xh[j][e] - mu) * rs;
                gx[e] = g[j][e] * xh[j][e];
            }
            ln_add4(sdw, col, n, vec, gx);
            ln_add4(sdb, col, n, vec, g[j]);
            // past C (scalar path) dout and w are 0: dxhat is 0 there and adds nothing
#pragma unroll
            for (int e = 0; e < 4; e++) {
                g[j][e] *= wv[e];
                dmean += g[j][e];
                dnorm_mean += g[j][e] * xh[j][e];
            }
        }
        warp_sum2(dmean, dnorm_mean);
        dmean /= (float)c;
        dnorm_mean /= (float)c;
#pragma unroll
        for (int j = 0; j < V; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) d[j][e] += rs * (g[j][e] - dmean - xh[j][e] * dnorm_mean);
            ln_store4(dx, 4 * (lane + 32 * j), n, vec, d[j]);
            if (dxb) ln_store4(dxb, 4 * (lane + 32 * j), n, vec, d[j]);
        }
    }
    __syncthreads();
    for (unsigned i = threadIdx.x; i < c; i += LN_WARPS * 32) {
        float sw = 0.0f, sb = 0.0f;
        for (int v = 0; v < LN_WARPS; v++) {
            sw += smem[2 * c * v + i];
            sb += smem[2 * c * v + c + i];
        }
        pdw[chunk * c64 + i] = sw;
        pdb[chunk * c64 + i] = sb;
    }
    if (pdsum && dinp_bf16) {
        __syncthreads();  // every row of the copy this block stored is visible to all its threads
        for (unsigned i = threadIdx.x; i < c; i += LN_WARPS * 32) {
            float s = 0.0f;
#pragma unroll 8
            for (u64 row = r0; row < r1; row++) s += bf16_to_f32(dinp_bf16[row * c64 + i]);
            pdsum[chunk * c64 + i] = s;
        }
    }
}

// The kernels' body: the vector or the scalar path, chosen once per launch (the same for every
// block), compiled apart so that the scalar path's extra registers do not burden the other.
template <typename TG, int V>
__device__ __forceinline__ void backward_fused_impl(float* dinp, unsigned short* dinp_bf16, float* pdw, float* pdb,
                                                    float* pdsum, const TG* dout, const float* inp, const float* w,
                                                    const float* mean, const float* rstd, u64 n_rows, u64 c,
                                                    u64 rows_per_chunk, int accumulate) {
    if (ln_vector_ok(dinp, dinp_bf16, dout, inp, w, c)) {
        backward_fused_chunk<TG, V, true>(dinp, dinp_bf16, pdw, pdb, pdsum, dout, inp, w, mean, rstd, n_rows, c,
                                          rows_per_chunk, accumulate);
    } else {
        backward_fused_chunk<TG, V, false>(dinp, dinp_bf16, pdw, pdb, pdsum, dout, inp, w, mean, rstd, n_rows, c,
                                           rows_per_chunk, accumulate);
    }
}

// ---- entry points: V = 1, 2, 4, 6, 8 column groups per lane (C <= 128, 256, 512, 768, 1024:
// layernorm_backward_fused_k{4 V}), dout f32 or bf16; grid: chunks, LN_WARPS * 32 threads ----

#define LN_FUSED_PARAMS(TG)                                                                            \
    float *dinp, unsigned short *dinp_bf16, float *pdw, float *pdb, float *pdsum, const TG *dout, const float *inp, \
        const float *w, const float *mean, const float *rstd, u64 n_rows, u64 c, u64 rows_per_chunk,       \
        int accumulate
#define LN_FUSED_ARGS dinp, dinp_bf16, pdw, pdb, pdsum, dout, inp, w, mean, rstd, n_rows, c, rows_per_chunk, accumulate

extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_k4(LN_FUSED_PARAMS(float)) { backward_fused_impl<float, 1>(LN_FUSED_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_k8(LN_FUSED_PARAMS(float)) { backward_fused_impl<float, 2>(LN_FUSED_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_k16(LN_FUSED_PARAMS(float)) { backward_fused_impl<float, 4>(LN_FUSED_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_k24(LN_FUSED_PARAMS(float)) { backward_fused_impl<float, 6>(LN_FUSED_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_k32(LN_FUSED_PARAMS(float)) { backward_fused_impl<float, 8>(LN_FUSED_ARGS); }

extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_bf16dout_k4(LN_FUSED_PARAMS(unsigned short)) {
    backward_fused_impl<unsigned short, 1>(LN_FUSED_ARGS);
}
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_bf16dout_k8(LN_FUSED_PARAMS(unsigned short)) {
    backward_fused_impl<unsigned short, 2>(LN_FUSED_ARGS);
}
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_bf16dout_k16(LN_FUSED_PARAMS(unsigned short)) {
    backward_fused_impl<unsigned short, 4>(LN_FUSED_ARGS);
}
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_bf16dout_k24(LN_FUSED_PARAMS(unsigned short)) {
    backward_fused_impl<unsigned short, 6>(LN_FUSED_ARGS);
}
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_bf16dout_k32(LN_FUSED_PARAMS(unsigned short)) {
    backward_fused_impl<unsigned short, 8>(LN_FUSED_ARGS);
}

// ---- forward, C <= 1024: one read of each row, into registers -----------------------------
// The scalar forward above reads a row three times (sum, squared deviations, output) with
// 4-byte loads. Here a warp reads its row once as float4 groups, lane l holding the column
// groups q = l + 32 j (columns 4 q .. 4 q + 3, j < V, C <= 128 V) as the fused backward does;
// mean and variance come from those registers in two passes (sum, then the sum of squared
// deviations: the same two-pass numerics as the scalar kernel), then w and b as float4 (the
// same (C) vectors for every row: L1 / L2 hits) and the output as float4 (f32) or one 8-byte
// word of 4 bf16 (rounded to nearest even). Taken when C % 4 == 0 and out, inp, w, b are
// aligned to their vector words (layernorm.rs checks; every row then starts aligned too), else
// the scalar kernels.
//
// One warp per row, LN_FWD_ROWS rows per block (layernorm.rs's warp_per_row_cfg), no loop over
// rows: a warp issues all its row's loads (V float4 per lane: 3 KiB per warp at C = 768) before
// its first add, and the bandwidth comes from many warps per SM doing that at once. The launch
// bound (256 threads, LN_FWD_MIN_BLOCKS blocks per SM: <= 64 registers a thread) keeps at least
// 32 warps resident per SM, ~96 KiB of row loads at C = 768, well above the ~30 KiB per SM that
// covers an H200's bandwidth x latency (4.8 TB/s x ~0.8 us / 132 SMs). ptxas -v, sm_90, no
// spills: 62 / 64 / 64 registers at K = 16 / 24 / 32 for an f32 out (w, b loads hoisted), 40 /
// 48 / 56 for a bf16 out (5 blocks per SM at K = 24), 32 and under at K <= 8; five blocks per SM
// (<= 48 registers) spills at K >= 16 in the f32 kernels. Several rows per warp (their loads
// issued together) would trade warps for registers for no more bytes in flight.
#define LN_FWD_ROWS 8
#define LN_FWD_MIN_BLOCKS 4

// out (N, C) = (inp - mean) * rstd * w + b; mean (N), rstd (N); C <= 128 V, C % 4 == 0,
// every pointer aligned to its vector word.
template <typename T, int V>
__device__ __forceinline__ void forward_vec_impl(T* __restrict__ out, float* __restrict__ mean,
                                                 float* __restrict__ rstd, const float* __restrict__ inp,
                                                 const float* __restrict__ w, const float* __restrict__ b,
                                                 u64 n_rows, u64 c64) {
    const u64 row = (blockIdx.x * (u64)blockDim.x + threadIdx.x) / 32;
    const unsigned lane = threadIdx.x % 32;
    if (row >= n_rows) return;  // the whole warp returns: no lane of a shuffle is missing
    const unsigned c = (unsigned)c64;
    const float* x = inp + row * c64;
    // the lane's columns of the row; groups at and past C read as zeros
    float xv[V][4];
#pragma unroll
    for (int j = 0; j < V; j++) ln_load4(xv[j], x, 4 * (lane + 32 * j), c, true);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < V; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) s += xv[j][e];
    const float m = warp_sum(s) / (float)c;
    float v = 0.0f;
#pragma unroll
    for (int j = 0; j < V; j++) {
        if (4 * (lane + 32 * j) < c) {  // a zero past C is no column: (0 - m)^2 would count
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float d = xv[j][e] - m;
                v += d * d;
            }
        }
    }
    const float r = 1.0f / sqrtf(warp_sum(v) / (float)c + LN_EPS);
    T* o = out + row * c64;
#pragma unroll
    for (int j = 0; j < V; j++) {
        const unsigned col = 4 * (lane + 32 * j);
        float wv[4], bv[4], y[4];
        ln_load4(wv, w, col, c, true);
        ln_load4(bv, b, col, c, true);
#pragma unroll
        for (int e = 0; e < 4; e++) y[e] = (xv[j][e] - m) * r * wv[e] + bv[e];
        ln_store4(o, col, c, true, y);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// ---- entry points: V = 1, 2, 4, 6, 8 column groups per lane (C <= 128, 256, 512, 768, 1024:
// layernorm_forward[_bf16out]_k{4 V}, the backward's buckets), out f32 or bf16; grid:
// ceil(N / LN_FWD_ROWS) blocks of LN_FWD_ROWS * 32 threads ----

#define LN_FWD_PARAMS(T) \
    T *out, float *mean, float *rstd, const float *inp, const float *w, const float *b, u64 n_rows, u64 c
#define LN_FWD_ARGS out, mean, rstd, inp, w, b, n_rows, c

extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_k4(LN_FWD_PARAMS(float)) { forward_vec_impl<float, 1>(LN_FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_k8(LN_FWD_PARAMS(float)) { forward_vec_impl<float, 2>(LN_FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_k16(LN_FWD_PARAMS(float)) { forward_vec_impl<float, 4>(LN_FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_k24(LN_FWD_PARAMS(float)) { forward_vec_impl<float, 6>(LN_FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_k32(LN_FWD_PARAMS(float)) { forward_vec_impl<float, 8>(LN_FWD_ARGS); }

extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_bf16out_k4(LN_FWD_PARAMS(unsigned short)) { forward_vec_impl<unsigned short, 1>(LN_FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_bf16out_k8(LN_FWD_PARAMS(unsigned short)) { forward_vec_impl<unsigned short, 2>(LN_FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_bf16out_k16(LN_FWD_PARAMS(unsigned short)) { forward_vec_impl<unsigned short, 4>(LN_FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_bf16out_k24(LN_FWD_PARAMS(unsigned short)) { forward_vec_impl<unsigned short, 6>(LN_FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(LN_FWD_ROWS * 32, LN_FWD_MIN_BLOCKS)
layernorm_forward_bf16out_k32(LN_FWD_PARAMS(unsigned short)) { forward_vec_impl<unsigned short, 8>(LN_FWD_ARGS); }
