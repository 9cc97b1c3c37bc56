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

// rope_bf16 eight adjacent pairs per thread: one 16-byte word of a head's first half and the
// matching word of its second half, the pairs' cos and sin as two float4 each, the same
// arithmetic per pair (so bitwise rope_bf16). The row-per-block rewrite (stop 26) left rotary
// GPT-2 124M at +1.4 ms per step (run 22): each thread still moved two 2-byte values per pair, so
// a block kept ~1 KB of loads in flight, far too little to cover the memory's latency; here each
// thread has 64 bytes of its row and 64 of the table in flight. Flat tasks (row, group of 8
// pairs) over the grid, in 32-bit arithmetic (the host passes at most 2^31 tasks).
// Needs hd/2 % 8 == 0, qkv and table 16-byte aligned (the host checks; else rope_bf16).
extern "C" __global__ void rope_bf16_x8(unsigned short* qkv, const float* table, u64 rows, unsigned t, unsigned c,
                                        unsigned n_head, unsigned t_max, int inverse) {
    const unsigned hd = c / n_head, half = hd / 2, per_head = half / 8, groups = c / 8;
    const unsigned tasks = (unsigned)rows * groups;
    for (unsigned task = blockIdx.x * blockDim.x + threadIdx.x; task < tasks; task += gridDim.x * blockDim.x) {
        const unsigned row = task / groups, gi = task - row * groups;
        const unsigned head = gi / per_head, i0 = (gi - head * per_head) * 8, pos = row % t;
        unsigned short* r = qkv + (u64)row * 3 * c + head * hd + i0;
        const float* cos_row = table + (u64)pos * half + i0;
        const float* sin_row = table + (u64)t_max * half + (u64)pos * half + i0;
        const uint4 lo_w = *(const uint4*)r, hi_w = *(const uint4*)(r + half);
        const float4 c0 = *(const float4*)cos_row, c1 = *(const float4*)(cos_row + 4);
        const float4 s0 = *(const float4*)sin_row, s1 = *(const float4*)(sin_row + 4);
        const float co[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
        const float si[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
        float a[8], b[8];
        bf16x8_unpack(lo_w, a);
        bf16x8_unpack(hi_w, b);
        for (int k = 0; k < 8; k++) {
            const float s = inverse ? -si[k] : si[k];
            float lo, hi;
            rope_turn(a[k], b[k], co[k], s, &lo, &hi);
            a[k] = lo;
            b[k] = hi;
        }
        *(uint4*)r = bf16x8_pack(a);
        *(uint4*)(r + half) = bf16x8_pack(b);
    }
}
