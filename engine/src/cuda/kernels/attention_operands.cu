// Operands and row statistics for the tensor-core attention kernels (attention_mma.cuh).

// dst (B, H, Tpad, w) bf16 from the head columns of a strided (B, rows, ld) matrix, f32 or
// (p.io_bf16) bf16 (head h at column off + h*hd): zeros past `rows` and past hd. One thread per
// pair of columns.
extern "C" __global__ void __launch_bounds__(THREADS)
attention_heads_bf16(bf16_t* dst, const float* src, int rows, int ld, int off, int w,
                     const AttnParams p) {
    const int tp = round_tile(rows), pairs = w / 2;
    const size_t n = (size_t)p.batch * p.heads * tp * pairs;
    const size_t e = (size_t)blockIdx.x * THREADS + threadIdx.x;
    if (e >= n) return;
    const int d = 2 * (int)(e % pairs);
    const size_t r = e / pairs;  // (b*H + h)*Tpad + i
    const int i = (int)(r % tp);
    const size_t bh = r / tp;
    const int h = (int)(bh % p.heads);
    const size_t b = bh / p.heads;
    float x0 = 0.0f, x1 = 0.0f;
    if (i < rows) io_load_pair(src, (b * rows + i) * ld + off + h * p.hd + d, d, x0, x1, p);
    *(u32*)(dst + r * w + d) = pack_bf16x2(x0, x1);
}

// stats (B, H, Tqpad, 2): per query row (lse * log2(e), D = rowsum(dout * out)), zeros past Tq.
// One warp per row.
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_stats(float* stats, const float* dout, const float* out, const float* lse,
                         const AttnParams p) {
    const int tqp = round_tile(p.tq);
    const size_t row = (size_t)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;  // (b*H+h)*Tqpad+i
    const int lane = threadIdx.x % 32;
    if (row >= (size_t)p.batch * p.heads * tqp) return;  // whole warp leaves together
    const int i = (int)(row % tqp);
    const size_t bh = row / tqp;
    const int h = (int)(bh % p.heads);
    const size_t b = bh / p.heads;
    float acc = 0.0f, l = 0.0f;
    if (i < p.tq) {
        const size_t row0 = (b * p.tq + i) * p.channels + h * p.hd;  // dout and out: f32 or bf16
        for (int d = lane; d < p.hd; d += 32) acc += io_load(dout, row0 + d, p) * io_load(out, row0 + d, p);
        l = lse[bh * p.tq + i] * LOG2E;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) {
        stats[2 * row] = l;
        stats[2 * row + 1] = acc;
    }
}

// attention_backward_stats for p.direct calls (bf16 dout and out, hd = 8 L with L lanes per
// row, rows 16-byte aligned): each lane reads 8 columns of dout and out as one 16-byte access
// (the warp-per-row kernel's 2-byte loads left it bound by load instructions), the L lanes of a
// row add their parts by shuffles. A warp holds 32 / L rows. Same layout and zero padding.
template <int L>
__device__ __forceinline__ void backward_stats_vec(float* stats, const bf16_t* dout, const bf16_t* out,
                                                   const float* lse, const AttnParams& p) {
    const int tqp = round_tile(p.tq);
    const int lane = threadIdx.x % 32, part = lane % L;
    const size_t row = ((size_t)blockIdx.x * THREADS + threadIdx.x) / L;  // (b*H+h)*Tqpad+i
    // B*H*Tqpad*L threads are a whole number of blocks (Tqpad is a multiple of 64, L >= 4), so
    // no thread is past the end and every shuffle below has its full warp
    const int i = (int)(row % tqp);
    const size_t bh = row / tqp;
    const int h = (int)(bh % p.heads);
    const size_t b = bh / p.heads;
    float acc = 0.0f, l = 0.0f;
    if (i < p.tq) {
        const size_t at = (b * p.tq + i) * p.channels + h * p.hd + 8 * part;
        const uint4 dy = *(const uint4*)(dout + at), y = *(const uint4*)(out + at);
        const u32 dw[4] = {dy.x, dy.y, dy.z, dy.w}, yw[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            acc += __int_as_float((int)(dw[k] << 16)) * __int_as_float((int)(yw[k] << 16));
            acc += __int_as_float((int)(dw[k] & 0xffff0000u)) * __int_as_float((int)(yw[k] & 0xffff0000u));
        }
        l = lse[bh * p.tq + i] * LOG2E;
    }
    // the L lanes of a row are aligned groups of the warp: xor offsets below L stay inside them
    for (int o = L / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (part == 0) {
        stats[2 * row] = l;
        stats[2 * row + 1] = acc;
    }
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_stats_vec_d32(float* stats, const bf16_t* dout, const bf16_t* out, const float* lse,
                                 const AttnParams p) {
    backward_stats_vec<4>(stats, dout, out, lse, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_stats_vec_d64(float* stats, const bf16_t* dout, const bf16_t* out, const float* lse,
                                 const AttnParams p) {
    backward_stats_vec<8>(stats, dout, out, lse, p);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attention_backward_stats_vec_d128(float* stats, const bf16_t* dout, const bf16_t* out, const float* lse,
                                  const AttnParams p) {
    backward_stats_vec<16>(stats, dout, out, lse, p);
}
