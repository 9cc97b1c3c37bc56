// Rotary position embedding (RoPE, "rotate half" layout) in place on packed q|k|v rows: each
// (row, q or k, head, pair i < hd/2) turned once. Each product and the sum are rounded on their
// own (__fmul_rn, __fadd_rn: no FMA contraction), as the CPU reference computes them, so the
// f32 kernel is bitwise the CPU op.

typedef unsigned long long u64;

__device__ __forceinline__ void rope_turn(float a, float b, float co, float si, float* lo, float* hi) {
    *lo = __fadd_rn(__fmul_rn(a, co), -__fmul_rn(b, si));
    *hi = __fadd_rn(__fmul_rn(b, co), __fmul_rn(a, si));
}

// The kernels take rows a block at a time (block-stride) and spread a row's C pairs (q heads
// then k heads, hd/2 pairs each) over the block's threads: the row's position and base once
// per row, the head and pair by 32-bit arithmetic. (The first version derived every index from
// a flat thread index by five 64-bit divisions per pair, which made it instruction-bound:
// run 21 measured rotary GPT-2 124M at +1.4 ms per step against ~0.5 predicted at bandwidth.)
// Any grid and block size are correct; the launch gives one block per row up to a cap.

extern "C" __global__ void rope_f32(float* qkv, const float* table, u64 rows, unsigned t, unsigned c,
                                    unsigned n_head, unsigned t_max, int inverse) {
    unsigned hd = c / n_head, half = hd / 2;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        unsigned pos = (unsigned)(row % t);
        float* r = qkv + row * 3 * (u64)c;
        const float* cos_row = table + (u64)pos * half;
        const float* sin_row = table + (u64)t_max * half + (u64)pos * half;
        for (unsigned p = threadIdx.x; p < c; p += blockDim.x) {
            unsigned head = p / half, i = p - head * half, at = head * hd + i;
            float s = sin_row[i];
            rope_turn(r[at], r[at + half], cos_row[i], inverse ? -s : s, &r[at], &r[at + half]);
        }
    }
}

extern "C" __global__ void rope_bf16(unsigned short* qkv, const float* table, u64 rows, unsigned t, unsigned c,
                                     unsigned n_head, unsigned t_max, int inverse) {
    unsigned hd = c / n_head, half = hd / 2;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        unsigned pos = (unsigned)(row % t);
        unsigned short* r = qkv + row * 3 * (u64)c;
        const float* cos_row = table + (u64)pos * half;
        const float* sin_row = table + (u64)t_max * half + (u64)pos * half;
        for (unsigned p = threadIdx.x; p < c; p += blockDim.x) {
            unsigned head = p / half, i = p - head * half, at = head * hd + i;
            float s = sin_row[i], lo, hi;
            rope_turn(bf16_to_f32(r[at]), bf16_to_f32(r[at + half]), cos_row[i], inverse ? -s : s, &lo, &hi);
            r[at] = f32_to_bf16_rne(lo);
            r[at + half] = f32_to_bf16_rne(hi);
        }
    }
}
