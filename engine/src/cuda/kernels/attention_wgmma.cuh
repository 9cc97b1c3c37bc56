// =============================================================================================
// Hopper's warpgroup MMA (wgmma.mma_async, sm_90a) for the tensor-core attention kernels: the
// same blocks (4 warps = one warpgroup, 64 rows, each warp 16 of them), the same fragments, but
// every product of a 64-row tile by a shared-memory tile is one wgmma.m64nNk16 per 16 of K
// instead of N/8 mma.sync per warp. The shared operand is read once per warpgroup by the tensor
// cores (mma.sync had each of the 4 warps load it by ldmatrix: the kernels were bound by those
// loads), and wgmma runs at Hopper's full tensor rate where mma.sync reaches ~2/3 of it.
//
// The A operand comes from registers: its fragment (ALayout_64x16 in CUTLASS, PTX ISA "Matrix
// Fragments for wgmma.m64nNk16") is, per warp of the warpgroup, exactly mma.m16n8k16's A
// fragment of the warp's 16 rows, and the f32 accumulator's is exactly the C fragments of
// the N/8 mma tiles side by side: d[j][e] is row g + 8 (e >> 1), column 8 j + 2 t + (e & 1).
// So probabilities still never leave registers (c_to_a), and the softmax code is unchanged.
//
// B comes from shared memory through a matrix descriptor, in the "interleaved" (no swizzle)
// canonical layout: 8x8 bf16 core matrices, each 128 contiguous bytes (8 rows of 16 bytes). Our
// tiles (64 rows, W columns) are stored that way ("core-matrix tiles", cm_at): row group r/8 at
// r/8 * 16 W bytes, 8-column chunk c/8 at c/8 * 128 bytes, row r % 8 at 16 (r % 8) bytes. One
// tile serves both majornesses (PTX ISA "Shared Memory Matrix Layout", canonical layouts with
// T = 8 bf16 per 16 bytes):
//   K-major B (tile rows are B's N, columns its K: k in q k^T): ((8,n),(8,2)):((8,SBO),(1,LBO))
//     -> LBO = 128 bytes (the next 8 columns), SBO = 16 W bytes (the next 8 rows);
//   MN-major B (tile rows are B's K, columns its N: v in P v): ((8,n),(8,k)):((1,SBO),(8,LBO))
//     -> SBO = 128 bytes (the next 8 columns), LBO = 16 W bytes (the next 8 rows).
// ldmatrix reads the same tiles (an 8x8 matrix is one core matrix: its 8 row addresses are 128
// contiguous bytes, no bank conflicts), so A operands come from them as before (load_a_cm).
//
// The products are issued, committed and waited for (wait_group 0) before their results are
// read: wgmma_fence_operands keeps the compiler from moving a read of an accumulator above the
// wait. SMELT_WGMMA_ARCH: compiled for sm_90a (kernels.rs compiles the attention module so on
// an sm_90 device); elsewhere the wgmma kernels trap and the host never picks them. The host
// emulator (tools/cuda_emu/shim.h) supplies its own wgmma, descriptor decoding included.

#if defined(SMELT_HOST_EMULATION) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SMELT_WGMMA_ARCH 1
#else
#define SMELT_WGMMA_ARCH 0
#endif

// Element offset of (row r, column c) of a core-matrix tile of width W (c a multiple of 8 for
// the start of a 16-byte chunk).
template <int W>
__device__ __forceinline__ int cm_at(int r, int c) {
    return (r >> 3) * (8 * W) + (c >> 3) * 64 + (r & 7) * 8 + (c & 7);
}

// A wgmma shared-memory descriptor, no swizzle: start address, leading and stride byte offsets,
// each stored as bits 4..17 of the byte value (PTX ISA "Matrix Descriptor Format").
__device__ __forceinline__ unsigned long long wg_desc(const bf16_t* s, u32 lbo, u32 sbo) {
    const u32 a = smem_addr(s);
    return (unsigned long long)((a & 0x3FFFFu) >> 4) | ((unsigned long long)((lbo & 0x3FFFFu) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFFu) >> 4) << 32);
}
// B = the tile's rows 0..64 (N) by columns 16 kk .. 16 kk + 16 (K): K-major.
template <int W>
__device__ __forceinline__ unsigned long long desc_k_major(const bf16_t* tile, int kk) {
    return wg_desc(tile + cm_at<W>(0, 16 * kk), 128, 16 * W);
}
// B = the tile's rows 16 kk .. 16 kk + 16 (K) by all W columns (N): MN-major.
template <int W>
__device__ __forceinline__ unsigned long long desc_mn_major(const bf16_t* tile, int kk) {
    return wg_desc(tile + cm_at<W>(16 * kk, 0), 16 * W, 128);
}

// The A fragment of rows r0..r0+16, columns c0..c0+16 of a core-matrix tile (as load_a).
template <int W>
__device__ __forceinline__ void load_a_cm(u32 (&a)[4], const bf16_t* s, int r0, int c0) {
    const int l = threadIdx.x % 32;
    ldsm_x4(a, s + cm_at<W>(r0 + (l & 7) + ((l >> 3) & 1) * 8, c0 + (l >> 4) * 8));
}

// copy_tile_async into a core-matrix tile. Thread x copies chunk (x / 8) % CH of row x % 8 of
// each row group it visits: a warp writes 8 rows x 4 chunks, whose 16-byte slots fall in 8
// different bank quads (row-major order would put a warp's chunks of one row on the same quad).
template <int W>
__device__ __forceinline__ void copy_tile_cm_async(bf16_t* s, const TileSrc src, int row0) {
    constexpr int CH = W / 8;                     // 16-byte chunks per row
    constexpr int GROUPS = MMA_THREADS / (8 * CH);  // row groups one pass covers
    static_assert(TILE % (8 * GROUPS) == 0, "whole row groups per pass");
    const int ri = threadIdx.x % 8, c = (threadIdx.x / 8) % CH, g0 = threadIdx.x / (8 * CH);
    const bf16_t* first = src.base + c * 8;
    const int row = row0 + g0 * 8 + ri;
#pragma unroll
    for (int k = 0; k < TILE / (8 * GROUPS); k++) {
        const int r = row + k * 8 * GROUPS;
        const bool valid = r < src.rows;
        cp_async16_or_zero(s + cm_at<W>(r - row0, c * 8), valid ? first + (size_t)r * src.ld : first, valid);
    }
}

#ifndef SMELT_HOST_EMULATION
__device__ __forceinline__ void wgmma_fence() {
#if SMELT_WGMMA_ARCH
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if SMELT_WGMMA_ARCH
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#if SMELT_WGMMA_ARCH
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#endif
}
// d (N/8 x 4 f32, C layout) += A (this warp's 16 rows x 16, registers) B (16 x N, descriptor);
// TRANS_B: 0 K-major, 1 MN-major.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_n32(float (&d)[4][4], const u32 (&a)[4], unsigned long long desc) {
#if SMELT_WGMMA_ARCH
    asm volatile(
        "{.reg .pred p; setp.ne.b32 p, %21, 0; "
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "{%16, %17, %18, %19}, %20, p, 1, 1, %22;}"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1), "n"(TRANS_B));
#else
    __trap();
#endif
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const u32 (&a)[4], unsigned long long desc) {
#if SMELT_WGMMA_ARCH
    asm volatile(
        "{.reg .pred p; setp.ne.b32 p, %37, 0; "
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, %38;}"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1), "n"(TRANS_B));
#else
    __trap();
#endif
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const u32 (&a)[4], unsigned long long desc) {
#if SMELT_WGMMA_ARCH
    asm volatile(
        "{.reg .pred p; setp.ne.b32 p, %69, 0; "
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, %70;}"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1), "n"(TRANS_B));
#else
    __trap();
#endif
}
template <int N, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const u32 (&a)[4], unsigned long long desc) {
    if constexpr (N == 32) {
        wgmma_rs_n32<TRANS_B>(d, a, desc);
    } else if constexpr (N == 64) {
        wgmma_rs_n64<TRANS_B>(d, a, desc);
    } else {
        static_assert(N == 128, "wgmma_rs: N is 32, 64 or 128");
        wgmma_rs_n128<TRANS_B>(d, a, desc);
    }
}
#endif

// An empty asm that "rewrites" every accumulator: reads of d stay below a wgmma wait, and writes
// above a wgmma fence.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N][4]) {
#ifndef SMELT_HOST_EMULATION
#pragma unroll
    for (int j = 0; j < N; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[j][e])::"memory");
#endif
}

// acc (64 rows of the block x N) = or += A (registers, NC steps of 16) B: the K steps of one
// product, issued and waited for.
template <int N, int TRANS_B, int KS, int W>
__device__ __forceinline__ void wgmma_product(float (&acc)[N / 8][4], const u32 (&a)[KS][4], const bf16_t* tile) {
    wgmma_fence_operands(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
        wgmma_rs<N, TRANS_B>(acc, a[kk], TRANS_B ? desc_mn_major<W>(tile, kk) : desc_k_major<W>(tile, kk));
    wgmma_commit();
    wgmma_wait_all();
    wgmma_fence_operands(acc);
}

// Two products in one commit group (the tensor cores run them back to back): acc1 += a1 tile1,
// acc2 += a2 tile2, both with B of the same majorness.
template <int N, int TRANS_B, int KS, int W>
__device__ __forceinline__ void wgmma_products2(float (&acc1)[N / 8][4], const u32 (&a1)[KS][4], const bf16_t* tile1,
                                                float (&acc2)[N / 8][4], const u32 (&a2)[KS][4], const bf16_t* tile2) {
    wgmma_fence_operands(acc1);
    wgmma_fence_operands(acc2);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
        wgmma_rs<N, TRANS_B>(acc1, a1[kk], TRANS_B ? desc_mn_major<W>(tile1, kk) : desc_k_major<W>(tile1, kk));
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
        wgmma_rs<N, TRANS_B>(acc2, a2[kk], TRANS_B ? desc_mn_major<W>(tile2, kk) : desc_k_major<W>(tile2, kk));
    wgmma_commit();
    wgmma_wait_all();
    wgmma_fence_operands(acc1);
    wgmma_fence_operands(acc2);
}

// The kernels' tile operations in either layout: WG, core-matrix tiles (the wgmma kernels);
// else rows padded to W + 8 (the mma.sync kernels).
template <int W, bool WG>
__device__ __forceinline__ void copy_tile(bf16_t* s, const TileSrc src, int row0) {
    if constexpr (WG) {
        copy_tile_cm_async<W>(s, src, row0);
    } else {
        copy_tile_async<W>(s, src, row0);
    }
}
template <int W, bool WG>
__device__ __forceinline__ void load_a_tile(u32 (&a)[4], const bf16_t* s, int r0, int c0) {
    if constexpr (WG) {
        load_a_cm<W>(a, s, r0, c0);
    } else {
        load_a(a, s, W + 8, r0, c0);
    }
}
// Elements of one (64, W) tile in shared memory.
template <int W, bool WG>
__device__ __forceinline__ constexpr int tile_elems() {
    return WG ? TILE * W : TILE * (W + 8);
}
