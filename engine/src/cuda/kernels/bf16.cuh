// bf16 storage helpers, prepended to the modules that read or write bf16 buffers (kernels.rs).
// bf16 is the top half of an f32: widening is a shift, narrowing rounds to nearest even.

__device__ __forceinline__ float bf16_to_f32(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

__device__ __forceinline__ unsigned short f32_to_bf16_rne(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
        return (unsigned short)((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);                   // round to nearest, ties to even
    return (unsigned short)(u >> 16);
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
    w.x = (unsigned int)f32_to_bf16_rne(v[0]) | ((unsigned int)f32_to_bf16_rne(v[1]) << 16);
    w.y = (unsigned int)f32_to_bf16_rne(v[2]) | ((unsigned int)f32_to_bf16_rne(v[3]) << 16);
    return w;
}
