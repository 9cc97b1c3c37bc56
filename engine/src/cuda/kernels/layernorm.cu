// LayerNorm over the last dimension (eps 1e-5): forward, and backward either in one pass per
// chunk of rows (C <= 1024, layernorm_backward_fused_k*) or in two parts, the input gradient (one
// warp per row) and the weight/bias gradients (deterministic column sums).

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

// With xhat = (x - mean) * rstd and dxhat = dout * w:
// dinp += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)). One warp per row.
extern "C" __global__ void layernorm_backward_input(float* dinp, const float* dout, const float* inp,
                                                    const float* w, const float* mean,
                                                    const float* rstd, u64 n_rows, u64 c) {
    u64 row = (blockIdx.x * (u64)blockDim.x + threadIdx.x) / 32;
    unsigned lane = threadIdx.x % 32;
    if (row >= n_rows) return;
    const float* x = inp + row * c;
    const float* dy = dout + row * c;
    float mu = mean[row], rs = rstd[row];
    float dmean = 0.0f, dnorm_mean = 0.0f;
    for (u64 i = lane; i < c; i += 32) {
        float xhat = (x[i] - mu) * rs;
        float dxhat = dy[i] * w[i];
        dmean += dxhat;
        dnorm_mean += dxhat * xhat;
    }
    dmean = warp_sum(dmean) / (float)c;
    dnorm_mean = warp_sum(dnorm_mean) / (float)c;
    float* dx = dinp + row * c;
    for (u64 i = lane; i < c; i += 32) {
        float xhat = (x[i] - mu) * rs;
        float dxhat = dy[i] * w[i];
        dx[i] += rs * (dxhat - dmean - xhat * dnorm_mean);
    }
}

// Per chunk of rows: pdw[chunk, i] = sum dout * xhat, pdb[chunk, i] = sum dout, from 0 in row
// order (the CPU reference's per-task partials); column_sum_finish adds them in chunk order.
// grid: (chunks, ceil(C / blockDim.x)).
extern "C" __global__ void layernorm_backward_params_partial(float* pdw, float* pdb, const float* dout,
                                                             const float* inp, const float* mean,
                                                             const float* rstd, u64 n_rows, u64 c,
                                                             u64 rows_per_chunk) {
    u64 i = blockIdx.y * (u64)blockDim.x + threadIdx.x;
    u64 chunk = blockIdx.x;
    if (i >= c) return;
    u64 r0 = chunk * rows_per_chunk;
    u64 r1 = min(r0 + rows_per_chunk, n_rows);
    float dw = 0.0f, db = 0.0f;
    for (u64 r = r0; r < r1; r++) {
        float xhat = (inp[r * c + i] - mean[r]) * rstd[r];
        float dy = dout[r * c + i];
        dw += dy * xhat;
        db += dy;
    }
    pdw[chunk * c + i] = dw;
    pdb[chunk * c + i] = db;
}

// ---- fused backward (C <= 32 K) -----------------------------------------------------------
// One pass over dout and inp: both reductions, dinp and the weight/bias partials per chunk.

#define LN_WARPS 8  // warps per block of layernorm_backward_fused_k* (256 threads)
// Two blocks per SM for K <= 24 caps registers at 128 (K = 24 then needs no spills, ptxas -v;
// unbounded it takes 175 and one block per SM). K = 32 would spill at 128, so it runs one.
#define LN_MIN_BLOCKS 2

// dst (C) = the LN_WARPS warps' part (K per lane, at columns lane + 32 j) added in warp order,
// through red: shared (LN_WARPS, C). Ends with a barrier, so red may be reused at once.
template <int K>
__device__ __forceinline__ void combine_warp_partials(float* dst, const float (&part)[K], float* red,
                                                      u64 c) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < K; j++) {
        const u64 i = lane + 32 * j;
        if (i < c) red[warp * c + i] = part[j];
    }
    __syncthreads();
    for (u64 i = threadIdx.x; i < c; i += LN_WARPS * 32) {
        float s = 0.0f;
        for (int v = 0; v < LN_WARPS; v++) s += red[v * c + i];
        dst[i] = s;
    }
    __syncthreads();
}

// One block per chunk of rows_per_chunk consecutive rows (the last chunk may be short); warp w
// takes rows w, w + LN_WARPS, ... of it. Lane l owns columns l + 32 j (j < K), so a row's xhat
// and dout (K floats each, in registers) serve the two row reductions, dinp (+=) and the warp's
// running dw, db partials (K each). The warps' partials are then added through shared memory
// in warp order into pdw[chunk, :], pdb[chunk, :]: a fixed order, so the same on every run
// (column_sum_finish adds the chunks). Dynamic shared memory: (LN_WARPS, C) floats.
template <int K>
__device__ void backward_fused_impl(float* dinp, float* pdw, float* pdb, const float* dout,
                                    const float* inp, const float* w, const float* mean,
                                    const float* rstd, u64 n_rows, u64 c, u64 rows_per_chunk, int accumulate) {
    extern __shared__ float smem[];  // (LN_WARPS, C): one warp's partial per row
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u64 chunk = blockIdx.x;
    const u64 r0 = chunk * rows_per_chunk, r1 = min(r0 + rows_per_chunk, n_rows);
    float dw[K], db[K];
#pragma unroll
    for (int j = 0; j < K; j++) dw[j] = db[j] = 0.0f;
    // Every warp runs the same number of rounds (warp_sum stays block-uniform, as the host
    // emulator needs); a row past the chunk reads zeros and writes nothing.
    const u64 rounds = (r1 - r0 + LN_WARPS - 1) / LN_WARPS;
    for (u64 k = 0; k < rounds; k++) {
        const u64 row = r0 + k * LN_WARPS + warp;
        const bool live = row < r1;
        const float mu = live ? mean[row] : 0.0f, rs = live ? rstd[row] : 0.0f;
        const float* x = inp + row * c;
        const float* dy = dout + row * c;
        float xhat[K], g[K];  // this row's xhat and dout at the lane's columns (0 outside)
#pragma unroll
        for (int j = 0; j < K; j++) {
            const u64 i = lane + 32 * j;
            const bool in = live && i < c;
            xhat[j] = in ? (x[i] - mu) * rs : 0.0f;
            g[j] = in ? dy[i] : 0.0f;
        }
        // per lane in column order, then warp_sum: the order of layernorm_backward_input
        float dmean = 0.0f, dnorm_mean = 0.0f;
#pragma unroll
        for (int j = 0; j < K; j++) {
            const u64 i = lane + 32 * j;
            const float dxhat = i < c ? g[j] * w[i] : 0.0f;
            dmean += dxhat;
            dnorm_mean += dxhat * xhat[j];
        }
        dmean = warp_sum(dmean) / (float)c;
        dnorm_mean = warp_sum(dnorm_mean) / (float)c;
        float* dx = dinp + row * c;
#pragma unroll
        for (int j = 0; j < K; j++) {
            const u64 i = lane + 32 * j;
            // added onto dinp, or (accumulate = 0) written over it: no zero fill before
            if (live && i < c) dx[i] = (accumulate ? dx[i] : 0.0f) + rs * (g[j] * w[i] - dmean - xhat[j] * dnorm_mean);
            dw[j] += g[j] * xhat[j];  // adds 0 outside the chunk and past C
            db[j] += g[j];
        }
    }
    combine_warp_partials<K>(pdw + chunk * c, dw, smem, c);
    combine_warp_partials<K>(pdb + chunk * c, db, smem, c);
}

// ---- entry points, one per K (C <= 128, 256, 512, 768, 1024); grid: chunks, 256 threads ----

extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_k4(float* dinp, float* pdw, float* pdb, const float* dout, const float* inp,
                            const float* w, const float* mean, const float* rstd, u64 n_rows, u64 c,
                            u64 rows_per_chunk, int accumulate) {
    backward_fused_impl<4>(dinp, pdw, pdb, dout, inp, w, mean, rstd, n_rows, c, rows_per_chunk, accumulate);
}
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_k8(float* dinp, float* pdw, float* pdb, const float* dout, const float* inp,
                            const float* w, const float* mean, const float* rstd, u64 n_rows, u64 c,
                            u64 rows_per_chunk, int accumulate) {
    backward_fused_impl<8>(dinp, pdw, pdb, dout, inp, w, mean, rstd, n_rows, c, rows_per_chunk, accumulate);
}
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_k16(float* dinp, float* pdw, float* pdb, const float* dout, const float* inp,
                             const float* w, const float* mean, const float* rstd, u64 n_rows, u64 c,
                             u64 rows_per_chunk, int accumulate) {
    backward_fused_impl<16>(dinp, pdw, pdb, dout, inp, w, mean, rstd, n_rows, c, rows_per_chunk, accumulate);
}
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32, LN_MIN_BLOCKS)
layernorm_backward_fused_k24(float* dinp, float* pdw, float* pdb, const float* dout, const float* inp,
                             const float* w, const float* mean, const float* rstd, u64 n_rows, u64 c,
                             u64 rows_per_chunk, int accumulate) {
    backward_fused_impl<24>(dinp, pdw, pdb, dout, inp, w, mean, rstd, n_rows, c, rows_per_chunk, accumulate);
}
extern "C" __global__ void __launch_bounds__(LN_WARPS * 32)
layernorm_backward_fused_k32(float* dinp, float* pdw, float* pdb, const float* dout, const float* inp,
                             const float* w, const float* mean, const float* rstd, u64 n_rows, u64 c,
                             u64 rows_per_chunk, int accumulate) {
    backward_fused_impl<32>(dinp, pdw, pdb, dout, inp, w, mean, rstd, n_rows, c, rows_per_chunk, accumulate);
}
