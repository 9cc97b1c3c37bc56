// Fused softmax cross-entropy over the vocabulary, one block per row: the forward reads each
// logit once (online max and sum of exponentials), the backward once more.

typedef unsigned long long u64;

#define IGNORE_INDEX 0xffffffffu
// Bit set in the backend's error word when a target is outside the vocabulary.
#define ERR_TARGET 2u
// NVRTC has no <math.h>; the bit pattern of +inf.
#define INFINITY __int_as_float(0x7f800000)

// Merges two (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) { m = m2; s = s2; return; }
    float mm = fmaxf(m, m2);
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// A logit as f32, from f32 or bf16 storage (bf16.cuh is prepended).
__device__ __forceinline__ float logit_at(const float* x, u64 i) { return x[i]; }
__device__ __forceinline__ float logit_at(const unsigned short* x, u64 i) { return bf16_to_f32(x[i]); }
__device__ __forceinline__ void logit_store(float* x, u64 i, float g) { x[i] = g; }
__device__ __forceinline__ void logit_store(unsigned short* x, u64 i, float g) { x[i] = f32_to_bf16_rne(g); }

// losses[n] = lse(logits[n]) - logits[n, t], 0 where t is IGNORE_INDEX; saves lse (N).
// logits (N, V), f32 or bf16. Launch: one block per row, blockDim.x == 512.
template <typename T>
__device__ void cross_entropy_forward_t(float* losses, float* lse, const T* logits,
                                        const unsigned* targets, u64 v, unsigned* err) {
    __shared__ float sm[512], ss[512];
    u64 row = blockIdx.x;
    const T* x = logits + row * v;
    float m = -INFINITY, s = 0.0f;
    for (u64 i = threadIdx.x; i < v; i += blockDim.x) {
        float xi = logit_at(x, i);
        if (xi > m) {
            s = s * expf(m - xi) + 1.0f;
            m = xi;
        } else if (m != -INFINITY) {
            s += expf(xi - m);
        }
    }
    sm[threadIdx.x] = m;
    ss[threadIdx.x] = s;
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) {
            float a = sm[threadIdx.x], b = ss[threadIdx.x];
            lse_merge(a, b, sm[threadIdx.x + k], ss[threadIdx.x + k]);
            sm[threadIdx.x] = a;
            ss[threadIdx.x] = b;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float l = sm[0] + logf(ss[0]);
        lse[row] = l;
        unsigned t = targets[row];
        if (t == IGNORE_INDEX) {
            losses[row] = 0.0f;
        } else if (t >= v) {
            atomicOr(err, ERR_TARGET);
            losses[row] = 0.0f;
        } else {
            losses[row] = l - logit_at(x, t);
        }
    }
}

extern "C" __global__ void cross_entropy_forward(float* losses, float* lse, const float* logits,
                                                 const unsigned* targets, u64 v, unsigned* err) {
    cross_entropy_forward_t(losses, lse, logits, targets, v, err);
}

extern "C" __global__ void cross_entropy_forward_bf16(float* losses, float* lse, const unsigned short* logits,
                                                      const unsigned* targets, u64 v, unsigned* err) {
    cross_entropy_forward_t(losses, lse, logits, targets, v, err);
}

// dlogits[n] += dloss * (softmax(logits[n]) - onehot(t)), nothing for ignored rows.
// Launch: one block per row (any blockDim).
extern "C" __global__ void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                                                  const unsigned* targets, float dloss, u64 v) {
    u64 row = blockIdx.x;
    unsigned t = targets[row];
    if (t == IGNORE_INDEX || t >= v) return;
    const float* x = logits + row * v;
    float* d = dlogits + row * v;
    float l = lse[row];
    for (u64 i = threadIdx.x; i < v; i += blockDim.x) {
        float g = d[i] + dloss * expf(x[i] - l);
        if (i == t) g -= dloss;
        d[i] = g;
    }
}

// The fused classifier's backward: logits[n] = dloss * (softmax(logits[n]) - onehot(t)), zeros
// for ignored rows (and for a target out of range, which the forward already flagged). Each
// element is read once and written once by the same thread. Launch: one block per row.
template <typename T>
__device__ void cross_entropy_backward_in_place_t(T* logits, const float* lse, const unsigned* targets, float dloss,
                                                  u64 v) {
    u64 row = blockIdx.x;
    unsigned t = targets[row];
    T* x = logits + row * v;
    if (t == IGNORE_INDEX || t >= v) {
        for (u64 i = threadIdx.x; i < v; i += blockDim.x) logit_store(x, i, 0.0f);
        return;
    }
    float l = lse[row];
    for (u64 i = threadIdx.x; i < v; i += blockDim.x) {
        float g = 0.0f + dloss * expf(logit_at(x, i) - l);
        if (i == t) g -= dloss;
        logit_store(x, i, g);
    }
}

extern "C" __global__ void cross_entropy_backward_in_place(float* logits, const float* lse, const unsigned* targets,
                                                           float dloss, u64 v) {
    cross_entropy_backward_in_place_t(logits, lse, targets, dloss, v);
}

// The same over bf16 logits: the gradient is stored as bf16 (the LM head's GEMM operand).
extern "C" __global__ void cross_entropy_backward_in_place_bf16(unsigned short* logits, const float* lse,
                                                                const unsigned* targets, float dloss, u64 v) {
    cross_entropy_backward_in_place_t(logits, lse, targets, dloss, v);
}
