// LayerNorm over the last dimension (eps 1e-5): forward, and backward in two parts, the input
// gradient (one warp per row) and the weight/bias gradients (deterministic column sums).

typedef unsigned long long u64;

#define LN_EPS 1e-5f

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// out (N, C) = (inp - mean) * rstd * w + b; saves mean (N), rstd (N). One warp per row.
extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                             const float* w, const float* b, u64 n_rows, u64 c) {
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
    float* o = out + row * c;
    for (u64 i = lane; i < c; i += 32) o[i] = (x[i] - m) * r * w[i] + b[i];
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// layernorm_forward writing a bf16 output (a GEMM's input); statistics and math in f32.
extern "C" __global__ void layernorm_forward_bf16out(unsigned short* out, float* mean, float* rstd, const float* inp,
                                                    const float* w, const float* b, u64 n_rows, u64 c) {
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
    unsigned short* o = out + row * c;
    for (u64 i = lane; i < c; i += 32) o[i] = f32_to_bf16_rne((x[i] - m) * r * w[i] + b[i]);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
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
