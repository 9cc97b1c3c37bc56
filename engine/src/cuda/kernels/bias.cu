// Matmul bias: broadcast before the GEMM (which then accumulates with beta = 1, the CPU's order)
// and the deterministic column sums of its gradient.

typedef unsigned long long u64;

// out[n, o] = bias[o]; out (N, OC).
extern "C" __global__ void bias_broadcast(float* out, const float* bias, u64 n_rows, u64 oc) {
    u64 total = n_rows * oc;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        out[i] = bias[i % oc];
    }
}

// partial[chunk, o] = sum of dout[n, o] over the rows of one chunk of `rows_per_chunk` rows,
// from 0, in row order (the CPU reference's per-task partial). grid: (chunks, ceil(OC / blockDim.x)).
extern "C" __global__ void column_sum_partial(float* partial, const float* src, u64 n_rows, u64 cols,
                                              u64 rows_per_chunk) {
    u64 o = blockIdx.y * (u64)blockDim.x + threadIdx.x;
    u64 chunk = blockIdx.x;
    if (o >= cols) return;
    u64 r0 = chunk * rows_per_chunk;
    u64 r1 = min(r0 + rows_per_chunk, n_rows);
    float acc = 0.0f;
    for (u64 r = r0; r < r1; r++) acc += src[r * cols + o];
    partial[chunk * cols + o] = acc;
}

// column_sum_partial over a bf16 source (sums in f32).
extern "C" __global__ void column_sum_partial_bf16(float* partial, const unsigned short* src, u64 n_rows, u64 cols,
                                                   u64 rows_per_chunk) {
    u64 o = blockIdx.y * (u64)blockDim.x + threadIdx.x;
    u64 chunk = blockIdx.x;
    if (o >= cols) return;
    u64 r0 = chunk * rows_per_chunk;
    u64 r1 = min(r0 + rows_per_chunk, n_rows);
    float acc = 0.0f;
    for (u64 r = r0; r < r1; r++) acc += bf16_to_f32(src[r * cols + o]);
    partial[chunk * cols + o] = acc;
}

// column_sum_partial and its bf16 variant four columns per thread (cols % 4 == 0, src 16- or
// 8-byte aligned): one 16-byte (f32) or 8-byte (bf16) load per row instead of four 4- or 2-byte
// ones (the 2-byte loads held the bf16 version to ~2 TB/s). Each column's sum is the same
// row-order sum from 0, so the partials are bitwise those of the scalar kernels.
// grid: (chunks, ceil(cols / (4 * blockDim.x))).
extern "C" __global__ void column_sum_partial_x4(float* partial, const float* src, u64 n_rows, u64 cols,
                                                 u64 rows_per_chunk) {
    const u64 o = 4 * (blockIdx.y * (u64)blockDim.x + threadIdx.x);
    const u64 chunk = blockIdx.x;
    if (o >= cols) return;
    const u64 r0 = chunk * rows_per_chunk, r1 = min(r0 + rows_per_chunk, n_rows);
    float4 acc;  // (no make_float4: the host emulators define float4 alone)
    acc.x = acc.y = acc.z = acc.w = 0.0f;
    for (u64 r = r0; r < r1; r++) {
        const float4 v = *(const float4*)(src + r * cols + o);
        acc.x += v.x;
        acc.y += v.y;
        acc.z += v.z;
        acc.w += v.w;
    }
    *(float4*)(partial + chunk * cols + o) = acc;
}
extern "C" __global__ void column_sum_partial_bf16_x4(float* partial, const unsigned short* src, u64 n_rows,
                                                      u64 cols, u64 rows_per_chunk) {
    const u64 o = 4 * (blockIdx.y * (u64)blockDim.x + threadIdx.x);
    const u64 chunk = blockIdx.x;
    if (o >= cols) return;
    const u64 r0 = chunk * rows_per_chunk, r1 = min(r0 + rows_per_chunk, n_rows);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (u64 r = r0; r < r1; r++) {
        float v[4];
        bf16x4_unpack(*(const uint2*)(src + r * cols + o), v);
        for (int k = 0; k < 4; k++) acc[k] += v[k];
    }
    float4 out;
    out.x = acc[0];
    out.y = acc[1];
    out.z = acc[2];
    out.w = acc[3];
    *(float4*)(partial + chunk * cols + o) = out;
}

// dst[o] += the sum over chunks of partial[k, o]. The 8 warps of a block split the chunks
// (warp w adds k = w, w + 8, ... in order), then the 8 sums are added in warp order onto dst:
// a fixed order, so deterministic, and 8 independent chains instead of one (one thread walking
// all 256 chunks of a 16,384-row gradient serially took tens of microseconds per call).
// grid: ceil(cols / 32), block 256, 1 KiB of dynamic shared memory (8 x 32 floats; dynamic so
// that the host emulator, tools/cuda_emu, maps it to its shared block); lane = column.
__device__ __forceinline__ void column_sum_finish_impl(float* dst, const float* partial, u64 chunks, u64 cols) {
    extern __shared__ float smem[];
    float (*part)[32] = (float (*)[32])smem;
    const unsigned lane = threadIdx.x % 32, w = threadIdx.x / 32;
    const u64 o = blockIdx.x * 32ull + lane;
    float acc = 0.0f;
    if (o < cols) {
        for (u64 k = w; k < chunks; k += 8) acc += partial[k * cols + o];
    }
    part[w][lane] = acc;
    __syncthreads();
    if (w == 0 && o < cols) {
        float t = part[0][lane];
        for (int i = 1; i < 8; i++) t += part[i][lane];
        dst[o] = dst[o] + t;
    }
}

extern "C" __global__ void column_sum_finish(float* dst, const float* partial, u64 chunks, u64 cols) {
    column_sum_finish_impl(dst, partial, chunks, cols);
}

// column_sum_finish for two gradients of the same shape in one launch (blockIdx.y = 0: dst0 from
// partial0, 1: dst1 from partial1): LayerNorm's weight and bias gradients, one launch fewer per
// LayerNorm backward. Each is summed exactly as column_sum_finish sums it. grid: (ceil(cols / 32), 2).
extern "C" __global__ void column_sum_finish2(float* dst0, const float* partial0, float* dst1, const float* partial1,
                                              u64 chunks, u64 cols) {
    if (blockIdx.y == 0) {
        column_sum_finish_impl(dst0, partial0, chunks, cols);
    } else {
        column_sum_finish_impl(dst1, partial1, chunks, cols);
    }
}
