// Elementwise ops: GELU (tanh approximation, GPT-2), the residual add, and tanh (BERT's pooler).

typedef unsigned long long u64;

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_CUBIC 0.044715f

#define GRID_STRIDE(i, n) \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
extern "C" __global__ void gelu_forward(float* out, const float* inp, u64 n) {
    GRID_STRIDE(i, n) {
        float x = inp[i];
        float u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
        out[i] = 0.5f * x * (1.0f + tanhf(u));
    }
}

// dinp += dout * gelu'(x)
extern "C" __global__ void gelu_backward(float* dinp, const float* inp, const float* dout, u64 n) {
    GRID_STRIDE(i, n) {
        float x = inp[i];
        float u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
        float t = tanhf(u);
        float sech2 = 1.0f - t * t;
        float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * x * x);
        dinp[i] += dout[i] * (0.5f * (1.0f + t) + 0.5f * x * sech2 * du);
    }
}

// dinp = dout * gelu'(x), overwritten
extern "C" __global__ void gelu_backward_set(float* dinp, const float* inp, const float* dout, u64 n) {
    GRID_STRIDE(i, n) {
        float x = inp[i];
        float u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
        float t = tanhf(u);
        float sech2 = 1.0f - t * t;
        float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * x * x);
        dinp[i] = 0.0f + dout[i] * (0.5f * (1.0f + t) + 0.5f * x * sech2 * du);
    }
}

__device__ __forceinline__ float gelu_f(float x) {
    float u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_grad(float x) {
    float u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    float t = tanhf(u);
    float sech2 = 1.0f - t * t;
    float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * sech2 * du;
}

// The bf16 kernels' GELU (SMELT_FAST_GELU, on by default): 0.5 x (1 + tanh(u)) is x * sigmoid(2u),
// and sigmoid(2u) = 1 / (1 + 2^(-2u log2(e))) is one exp2 and one reciprocal on the special
// function unit (ex2.approx.ftz, rcp.approx.ftz: ~2 ulp each), where tanhf's range reduction and
// branches made these kernels instruction-bound (ptxas for sm_90: 33 instructions per value
// forward, 42 backward, against the ~9 and ~13 here: run 22 on an H200 had them at 0.94 and 1.14
// ms per GPT-2 step, where moving their bytes takes ~0.6 and ~0.85). The result is the f32
// formula to a few f32 ulps, then rounded once to bf16 as before: within one bf16 unit of the CPU.
// The gradient: sigmoid(2u) + 2 x sigmoid(2u) (1 - sigmoid(2u)) u'. For u below about -44 the
// exp2 is +inf and the reciprocal 0: GELU -0 and gradient 0, their limits.
// SMELT_FAST_GELU=0 compiles the tanhf formulas above instead (measuring the two on a card).
#ifndef SMELT_FAST_GELU
#define SMELT_FAST_GELU 1
#endif
#define LOG2E 1.4426950f

__device__ __forceinline__ float sfu_exp2(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return exp2f(x);  // the host emulator
#endif
}
__device__ __forceinline__ float sfu_rcp(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return 1.0f / x;
#endif
}

// sigmoid(2u) for GELU's u at x
__device__ __forceinline__ float gelu_sigmoid(float x) {
    float u = SQRT_2_OVER_PI * x * (1.0f + GELU_CUBIC * x * x);
    return sfu_rcp(1.0f + sfu_exp2(-2.0f * LOG2E * u));
}

__device__ __forceinline__ float gelu_bf16_math(float x) {
#if SMELT_FAST_GELU
    return x * gelu_sigmoid(x);
#else
    return gelu_f(x);
#endif
}

__device__ __forceinline__ float gelu_grad_bf16_math(float x) {
#if SMELT_FAST_GELU
    float s = gelu_sigmoid(x);
    float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * x * x);
    return s + 2.0f * x * s * (1.0f - s) * du;
#else
    return gelu_grad(x);
#endif
}

// The GELU kernels on bf16 storage (math in f32, gelu_bf16_math above) move eight values per
// 16-byte access, then the tail one by one (or everything one by one where a buffer is not
// 16-byte aligned). Every value is computed as the scalar path computes it, so the two paths
// agree bit for bit. (The 16-byte accesses alone did not speed them up, run 22: their limit was
// the instructions per value, see SMELT_FAST_GELU.)

// gelu_forward on bf16 storage.
extern "C" __global__ void gelu_forward_bf16(unsigned short* out, const unsigned short* inp, u64 n) {
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x, stride = (u64)gridDim.x * blockDim.x;
    const bool vec = ((((u64)inp) | ((u64)out)) & 15u) == 0;
    const u64 n8 = vec ? n / 8 : 0;
    for (u64 i = tid; i < n8; i += stride) {
        float v[8];
        bf16x8_unpack(((const uint4*)inp)[i], v);
        for (int k = 0; k < 8; k++) v[k] = gelu_bf16_math(v[k]);
        ((uint4*)out)[i] = bf16x8_pack(v);
    }
    for (u64 i = n8 * 8 + tid; i < n; i += stride) out[i] = f32_to_bf16_rne(gelu_bf16_math(bf16_to_f32(inp[i])));
}

// gelu_backward_set on bf16 storage: dinp = dout * gelu'(x), overwritten.
extern "C" __global__ void gelu_backward_set_bf16(unsigned short* dinp, const unsigned short* inp,
                                                  const unsigned short* dout, u64 n) {
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x, stride = (u64)gridDim.x * blockDim.x;
    const bool vec = ((((u64)inp) | ((u64)dout) | ((u64)dinp)) & 15u) == 0;
    const u64 n8 = vec ? n / 8 : 0;
    for (u64 i = tid; i < n8; i += stride) {
        float x[8], d[8];
        bf16x8_unpack(((const uint4*)inp)[i], x);
        bf16x8_unpack(((const uint4*)dout)[i], d);
        for (int k = 0; k < 8; k++) d[k] = d[k] * gelu_grad_bf16_math(x[k]);
        ((uint4*)dinp)[i] = bf16x8_pack(d);
    }
    for (u64 i = n8 * 8 + tid; i < n; i += stride) {
        dinp[i] = f32_to_bf16_rne(bf16_to_f32(dout[i]) * gelu_grad_bf16_math(bf16_to_f32(inp[i])));
    }
}

// gelu_backward_set_bf16 over a (rows, cols) matrix and, in the same pass, the column sums of
// its result (the up-projection's bias gradient) as colsum.rs's partials: partial[chunk, c] =
// the sum of the rounded bf16 dinp[r, c] over the chunk's rows, from 0 in row order, which is
// exactly what column_sum_partial_bf16_x4 computes reading dinp back, so the bias gradient is
// bitwise the unfused path's (column_sum_finish then adds the partials). That read of dinp (100
// MB per GPT-2 124M layer at B16 T1024) is what this saves. A thread takes one chunk of rows and
// 8 adjacent columns (one 16-byte word per row per buffer), four rows' loads in flight at a time.
// cols % 8 == 0 and every buffer 16-byte aligned (the host checks).
extern "C" __global__ void gelu_backward_set_bias_bf16(unsigned short* __restrict__ dinp, float* __restrict__ partial,
                                                       const unsigned short* __restrict__ inp,
                                                       const unsigned short* __restrict__ dout, u64 rows, u64 cols,
                                                       u64 rows_per_chunk) {
    const u64 groups = cols / 8, chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    GRID_STRIDE(task, chunks * groups) {
        const u64 chunk = task / groups, o = (task % groups) * 8;
        const u64 r0 = chunk * rows_per_chunk, r1 = min(r0 + rows_per_chunk, rows);
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        u64 r = r0;
        // one row's 8 values: dinp written, its rounded values added to acc
        auto row = [&](uint4 xw, uint4 dw, u64 at) {
            float x[8], d[8];
            bf16x8_unpack(xw, x);
            bf16x8_unpack(dw, d);
            for (int k = 0; k < 8; k++) d[k] = d[k] * gelu_grad_bf16_math(x[k]);
            const uint4 w = bf16x8_pack(d);
            *(uint4*)(dinp + at) = w;
            bf16x8_unpack(w, d);
            for (int k = 0; k < 8; k++) acc[k] += d[k];
        };
        for (; r + 4 <= r1; r += 4) {
            uint4 xw[4], dw[4];
            for (int u = 0; u < 4; u++) {
                xw[u] = *(const uint4*)(inp + (r + u) * cols + o);
                dw[u] = *(const uint4*)(dout + (r + u) * cols + o);
            }
            for (int u = 0; u < 4; u++) row(xw[u], dw[u], (r + u) * cols + o);
        }
        for (; r < r1; r++) row(*(const uint4*)(inp + r * cols + o), *(const uint4*)(dout + r * cols + o), r * cols + o);
        for (int k = 0; k < 8; k++) partial[chunk * cols + o + k] = acc[k];
    }
}

// out = a + b
extern "C" __global__ void residual_forward(float* out, const float* a, const float* b, u64 n) {
    GRID_STRIDE(i, n) { out[i] = a[i] + b[i]; }
}

// da += dout; db += dout
extern "C" __global__ void residual_backward(float* da, float* db, const float* dout, u64 n) {
    GRID_STRIDE(i, n) {
        float d = dout[i];
        da[i] += d;
        db[i] += d;
    }
}

// out = tanh(x) (BERT's pooler)
extern "C" __global__ void tanh_forward(float* out, const float* inp, u64 n) {
    GRID_STRIDE(i, n) { out[i] = tanhf(inp[i]); }
}

// dinp += dout * (1 - out^2), from the forward's output
extern "C" __global__ void tanh_backward(float* dinp, const float* out, const float* dout, u64 n) {
    GRID_STRIDE(i, n) {
        float y = out[i];
        dinp[i] += dout[i] * (1.0f - y * y);
    }
}
