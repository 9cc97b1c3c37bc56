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

// gelu_forward on bf16 storage (math in f32): four values per 8-byte access, then the tail.
extern "C" __global__ void gelu_forward_bf16(unsigned short* out, const unsigned short* inp, u64 n) {
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x, stride = (u64)gridDim.x * blockDim.x;
    const bool vec = ((((u64)inp) | ((u64)out)) & 7u) == 0;
    const u64 n4 = vec ? n / 4 : 0;
    for (u64 i = tid; i < n4; i += stride) {
        float v[4];
        bf16x4_unpack(((const uint2*)inp)[i], v);
        for (int k = 0; k < 4; k++) v[k] = gelu_f(v[k]);
        ((uint2*)out)[i] = bf16x4_pack(v);
    }
    for (u64 i = n4 * 4 + tid; i < n; i += stride) out[i] = f32_to_bf16_rne(gelu_f(bf16_to_f32(inp[i])));
}

// gelu_backward_set on bf16 storage: dinp = dout * gelu'(x), overwritten.
extern "C" __global__ void gelu_backward_set_bf16(unsigned short* dinp, const unsigned short* inp,
                                                  const unsigned short* dout, u64 n) {
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x, stride = (u64)gridDim.x * blockDim.x;
    const bool vec = ((((u64)inp) | ((u64)dout) | ((u64)dinp)) & 7u) == 0;
    const u64 n4 = vec ? n / 4 : 0;
    for (u64 i = tid; i < n4; i += stride) {
        float x[4], d[4];
        bf16x4_unpack(((const uint2*)inp)[i], x);
        bf16x4_unpack(((const uint2*)dout)[i], d);
        for (int k = 0; k < 4; k++) d[k] = d[k] * gelu_grad(x[k]);
        ((uint2*)dinp)[i] = bf16x4_pack(d);
    }
    for (u64 i = n4 * 4 + tid; i < n; i += stride) {
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
