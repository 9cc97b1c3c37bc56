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

// dst[o] += partial[0, o] + partial[1, o] + ..., one add at a time in chunk order.
extern "C" __global__ void column_sum_finish(float* dst, const float* partial, u64 chunks, u64 cols) {
    u64 o = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (o >= cols) return;
    float acc = dst[o];
    for (u64 k = 0; k < chunks; k++) acc += partial[k * cols + o];
    dst[o] = acc;
}
