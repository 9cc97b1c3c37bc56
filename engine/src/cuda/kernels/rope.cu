// Rotary position embedding (RoPE, "rotate half" layout) in place on packed q|k|v rows: one
// thread per (row, q or k, head, pair i < hd/2). Each product and the sum are rounded on their
// own (__fmul_rn, __fadd_rn: no FMA contraction), as the CPU reference computes them, so the
// f32 kernel is bitwise the CPU op.

typedef unsigned long long u64;

__device__ __forceinline__ void rope_turn(float a, float b, float co, float si, float* lo, float* hi) {
    *lo = __fadd_rn(__fmul_rn(a, co), -__fmul_rn(b, si));
    *hi = __fadd_rn(__fmul_rn(b, co), __fmul_rn(a, si));
}

// The (row, head-of-q-or-k, pair) of thread index `idx`, and its cosine and sine.
__device__ __forceinline__ void rope_site(u64 idx, unsigned t, unsigned c, unsigned n_head, unsigned t_max,
                                          const float* table, int inverse, u64* base, unsigned* half_out,
                                          float* co, float* si) {
    unsigned hd = c / n_head, half = hd / 2;
    unsigned i = (unsigned)(idx % half);
    u64 rest = idx / half;
    unsigned head = (unsigned)(rest % (2 * n_head)); // 0..n_head-1: q heads, then k heads
    u64 row = rest / (2 * n_head);
    unsigned pos = (unsigned)(row % t);
    *co = table[(u64)pos * half + i];
    float s = table[(u64)t_max * half + (u64)pos * half + i];
    *si = inverse ? -s : s;
    *base = row * 3 * c + (u64)head * hd + i; // q heads then k heads are contiguous: 2C values
    *half_out = half;
}

extern "C" __global__ void rope_f32(float* qkv, const float* table, u64 rows, unsigned t, unsigned c,
                                    unsigned n_head, unsigned t_max, int inverse) {
    u64 n = rows * (u64)c; // rows x 2 (q, k) x n_head x hd/2
    for (u64 idx = blockIdx.x * (u64)blockDim.x + threadIdx.x; idx < n; idx += (u64)gridDim.x * blockDim.x) {
        u64 at;
        unsigned half;
        float co, si;
        rope_site(idx, t, c, n_head, t_max, table, inverse, &at, &half, &co, &si);
        rope_turn(qkv[at], qkv[at + half], co, si, &qkv[at], &qkv[at + half]);
    }
}

extern "C" __global__ void rope_bf16(unsigned short* qkv, const float* table, u64 rows, unsigned t, unsigned c,
                                     unsigned n_head, unsigned t_max, int inverse) {
    u64 n = rows * (u64)c;
    for (u64 idx = blockIdx.x * (u64)blockDim.x + threadIdx.x; idx < n; idx += (u64)gridDim.x * blockDim.x) {
        u64 at;
        unsigned half;
        float co, si, lo, hi;
        rope_site(idx, t, c, n_head, t_max, table, inverse, &at, &half, &co, &si);
        rope_turn(bf16_to_f32(qkv[at]), bf16_to_f32(qkv[at + half]), co, si, &lo, &hi);
        qkv[at] = f32_to_bf16_rne(lo);
        qkv[at + half] = f32_to_bf16_rne(hi);
    }
}
