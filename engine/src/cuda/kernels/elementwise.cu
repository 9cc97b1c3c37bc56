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

// Eight bf16 values in one 16-byte word, and back (the GELU kernels' vector path).
__device__ __forceinline__ void bf16x8_unpack(uint4 w, float v[8]) {
    uint2 lo, hi;
    lo.x = w.x; lo.y = w.y; hi.x = w.z; hi.y = w.w;
    bf16x4_unpack(lo, v);
    bf16x4_unpack(hi, v + 4);
}
__device__ __forceinline__ uint4 bf16x8_pack(const float v[8]) {
    uint2 lo = bf16x4_pack(v), hi = bf16x4_pack(v + 4);
    uint4 w;
    w.x = lo.x; w.y = lo.y; w.z = hi.x; w.w = hi.y;
    return w;
}

// The GELU kernels on bf16 storage (math in f32) move eight values per 16-byte access, then
// the tail one by one (or everything one by one where a buffer is not 16-byte aligned): one
// 8-byte access per thread kept too few bytes in flight to reach the H200's bandwidth (run 17:
// the forward at ~2.8 TB/s, the backward at ~3.2, hardly faster than on an H100). Every value
// is computed as the scalar path computes it, so the two paths agree bit for bit.

// gelu_forward on bf16 storage.
extern "C" __global__ void gelu_forward_bf16(unsigned short* out, const unsigned short* inp, u64 n) {
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x, stride = (u64)gridDim.x * blockDim.x;
    const bool vec = ((((u64)inp) | ((u64)out)) & 15u) == 0;
    const u64 n8 = vec ? n / 8 : 0;
    for (u64 i = tid; i < n8; i += stride) {
        float v[8];
        bf16x8_unpack(((const uint4*)inp)[i], v);
        for (int k = 0; k < 8; k++) v[k] = gelu_f(v[k]);
        ((uint4*)out)[i] = bf16x8_pack(v);
    }
    for (u64 i = n8 * 8 + tid; i < n; i += stride) out[i] = f32_to_bf16_rne(gelu_f(bf16_to_f32(inp[i])));
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
        for (int k = 0; k < 8; k++) d[k] = d[k] * gelu_grad(x[k]);
        ((uint4*)dinp)[i] = bf16x8_pack(d);
    }
    for (u64 i = n8 * 8 + tid; i < n; i += stride) {
        dinp[i] = f32_to_bf16_rne(bf16_to_f32(dout[i]) * gelu_grad(bf16_to_f32(inp[i])));
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
