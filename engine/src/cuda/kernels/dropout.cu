// Inverted dropout with a counter-based mask: element c (= offset + i) is kept when the upper 32
// bits of SplitMix64's c-th output, from state mix64(seed), are >= threshold. The same hash as
// cpu/dropout.rs, so masks are bit-identical to the CPU's; the backward recomputes the mask.
// Products use __fmul_rn so that the compiler cannot fuse them into an FMA with the accumulate
// (the CPU rounds the product, then the sum).

typedef unsigned long long u64;

#define GOLDEN 0x9E3779B97F4A7C15ull

#define GRID_STRIDE(i, n) \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ bool keeps(u64 key, u64 counter, unsigned threshold) {
    unsigned u = (unsigned)(mix64(key + (counter + 1ull) * GOLDEN) >> 32);
    return u >= threshold;
}

// out = inp * keep * scale
extern "C" __global__ void dropout_forward(float* out, const float* inp, u64 seed, u64 offset, unsigned threshold, float scale, u64 n) {
    u64 key = mix64(seed);
    GRID_STRIDE(i, n) {
        out[i] = keeps(key, offset + i, threshold) ? __fmul_rn(inp[i], scale) : 0.0f;
    }
}

// dinp += dout * keep * scale
extern "C" __global__ void dropout_backward(float* dinp, const float* dout, u64 seed, u64 offset, unsigned threshold, float scale, u64 n) {
    u64 key = mix64(seed);
    GRID_STRIDE(i, n) {
        if (keeps(key, offset + i, threshold)) {
            dinp[i] += __fmul_rn(dout[i], scale);
        }
    }
}
