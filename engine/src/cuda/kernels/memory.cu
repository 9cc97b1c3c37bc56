// Memory ops on flat f32 buffers: fill, scale (also of a bf16 activation buffer), and the
// partial sums of sum_squares. bf16.cuh comes first (kernels.rs).
// Sizes are 64-bit: a (B*T, V) logits buffer of GPT-2 at B=16, T=1024 has 8.2e8 elements.

typedef unsigned long long u64;

// dst[i] = v
extern "C" __global__ void fill_f32(float* dst, float v, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        dst[i] = v;
    }
}

// dst[i] *= s
extern "C" __global__ void scale_f32(float* dst, float s, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        dst[i] *= s;
    }
}

// dst[i] *= s on bf16 values (a bf16 activation, as T5's logits under its head's factor): the
// product in f32, rounded to nearest even
extern "C" __global__ void scale_bf16(unsigned short* dst, float s, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        dst[i] = f32_to_bf16_rne(bf16_to_f32(dst[i]) * s);
    }
}

// partial[block] = sum of x^2 (in f64) over the elements this block visits. The grid size is
// a constant chosen by the host (not the device's SM count) and the in-block tree reduction
// has a fixed shape, so the result is the same on every run and every GPU.
// Launch: blockDim.x == 256.
extern "C" __global__ void sum_squares_partial(const float* src, u64 n, double* partial) {
    __shared__ double shm[256];
    double acc = 0.0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        double x = (double)src[i];
        acc += x * x;
    }
    shm[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shm[threadIdx.x] += shm[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = shm[0];
}

// sum_squares_partial over a 16-byte aligned src, four floats per load and two loads in flight
// per thread (the scalar kernel's one 4-byte load per thread kept too few bytes in flight: a
// GPT-2 gradient norm ran at half the memory's speed). The n % 4 floats past the last float4
// go to thread 0 of block 0, before its vectors. Deterministic as the scalar kernel (a fixed
// order for a fixed grid), though not the same partials. Launch: blockDim.x == 256.
extern "C" __global__ void sum_squares_partial_x4(const float* src, u64 n, double* partial) {
    __shared__ double shm[256];
    double acc = 0.0;
    const u64 n4 = n / 4, stride = (u64)gridDim.x * blockDim.x;
    if (blockIdx.x == 0 && threadIdx.x == 0)
        for (u64 i = 4 * n4; i < n; i++) acc += (double)src[i] * (double)src[i];
    const float4* v = (const float4*)src;
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    for (; i + stride < n4; i += 2 * stride) {
        const float4 a = v[i], b = v[i + stride];
        acc += (double)a.x * a.x + (double)a.y * a.y + (double)a.z * a.z + (double)a.w * a.w;
        acc += (double)b.x * b.x + (double)b.y * b.y + (double)b.z * b.z + (double)b.w * b.w;
    }
    if (i < n4) {
        const float4 a = v[i];
        acc += (double)a.x * a.x + (double)a.y * a.y + (double)a.z * a.z + (double)a.w * a.w;
    }
    shm[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shm[threadIdx.x] += shm[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = shm[0];
}
