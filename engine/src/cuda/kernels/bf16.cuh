// bf16 storage helpers, prepended to the modules that read or write bf16 buffers (kernels.rs).
// bf16 is the top half of an f32: widening is a shift, narrowing rounds to nearest even.

__device__ __forceinline__ float bf16_to_f32(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

// f32 -> bf16, round to nearest even. On sm_80 and later one `cvt.rn.bf16.f32` (two values per
// `cvt.rn.bf16x2.f32` in the packers below): the same bits as the integer rounding for every
// number, about six instructions fewer per value, which counts in the elementwise kernels whose
// issue slots are their limit (GELU, LayerNorm). A NaN becomes the canonical quiet NaN there
// (0x7fff) where the integer path keeps its sign and payload; either way it stays a NaN.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SMELT_BF16_CVT 1
#else
#define SMELT_BF16_CVT 0
#endif

__device__ __forceinline__ unsigned short f32_to_bf16_rne(float f) {
#if SMELT_BF16_CVT
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
        return (unsigned short)((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);                   // round to nearest, ties to even
    return (unsigned short)(u >> 16);
#endif
}

// Two values rounded as f32_to_bf16_rne and packed: lo in bits 0..15, hi in 16..31.
__device__ __forceinline__ unsigned int bf16x2_pack_rne(float lo, float hi) {
#if SMELT_BF16_CVT
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (unsigned int)f32_to_bf16_rne(lo) | ((unsigned int)f32_to_bf16_rne(hi) << 16);
#endif
}

// Four bf16 values in one 8-byte word, and back.
__device__ __forceinline__ void bf16x4_unpack(uint2 w, float v[4]) {
    v[0] = __uint_as_float(w.x << 16);
    v[1] = __uint_as_float(w.x & 0xffff0000u);
    v[2] = __uint_as_float(w.y << 16);
    v[3] = __uint_as_float(w.y & 0xffff0000u);
}
__device__ __forceinline__ uint2 bf16x4_pack(const float v[4]) {
    uint2 w;
    w.x = bf16x2_pack_rne(v[0], v[1]);
    w.y = bf16x2_pack_rne(v[2], v[3]);
    return w;
}

// Eight bf16 values in one 16-byte word, and back (the GELU and rope kernels' vector paths).
__device__ __forceinline__ void bf16x8_unpack(uint4 w, float v[8]) {
    uint2 lo, hi;
    lo.x = w.x; lo.y = w.y; hi.x = w.z; hi.y = w.w;
    bf16x4_unpack(lo, v);
    bf16x4_unpack(hi, v + 4);
}
__device__ __forceinline__ uint4 bf16x8_pack(const float v[8]) {
    uint2 lo = bf16x4_pack(v), hi = bf16x4_pack(v + 4);
    uint4 w;
    w.x = lo.x; w.y = lo.y; w.z = hi.x; w.w = hi.y;
    return w;
}
