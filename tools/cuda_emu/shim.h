// Host emulation of the CUDA subset that the attention kernels (engine/src/cuda/kernels/attention*) use, so that the
// real kernel source can be run and checked on a machine with no GPU: blocks run one at a time,
// each as one std::thread per CUDA thread; __syncthreads is a std::barrier, warp shuffles and
// mma.sync go through shared exchange arrays between two barriers (every thread of a block calls
// them together, as the kernels do). Shared memory is poisoned with NaN before each block so a
// read of an unwritten cell shows in the results. It checks indexing, masking, tiling and the
// mma fragment layouts (taken from the PTX ISA); it cannot check timing or real data races.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <cstddef>
#include <thread>
#include <vector>
#include <functional>
// CUDA's vector types with their alignment, so that a harness built with -fsanitize=alignment sees
// a misaligned word access.
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 gridDim, blockDim;
std::barrier<>* g_bar;
float g_xch[1024];
float smem[1 << 17];
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    unsigned t = threadIdx.x;
    g_xch[t] = v;
    g_bar->arrive_and_wait();
    float r = g_xch[t ^ o];
    g_bar->arrive_and_wait();
    return r;
}
// A harness that needs a warp-local __shfl_sync of its own (cross_entropy_emu.cpp: warps that
// run apart) defines SMELT_EMU_OWN_SHFL_SYNC before including this file.
#ifndef SMELT_EMU_OWN_SHFL_SYNC
inline float __shfl_sync(unsigned, float v, int src) {
    unsigned t = threadIdx.x, w0 = t & ~31u;
    g_xch[t] = v;
    g_bar->arrive_and_wait();
    float r = g_xch[w0 + ((unsigned)src & 31u)];
    g_bar->arrive_and_wait();
    return r;
}
#endif
inline bool __any_sync(unsigned, bool pred) {
    unsigned t = threadIdx.x, w0 = t & ~31u;
    g_xch[t] = pred ? 1.0f : 0.0f;
    g_bar->arrive_and_wait();
    bool any = false;
    for (unsigned l = 0; l < 32; l++) any |= g_xch[w0 + l] != 0.0f;
    g_bar->arrive_and_wait();
    return any;
}
inline float __int_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
using std::min;
inline void launch(Dim3 grid, unsigned threads, std::function<void()> k) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                std::barrier<> bar(threads);
                g_bar = &bar;
                // poison shared memory so reads of unwritten cells show up
                std::fill(smem, smem + (1 << 17), std::nanf(""));
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; t++)
                    ts.emplace_back([=, &bar] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        k();
                        bar.arrive_and_drop();
                    });
                for (auto& t : ts) t.join();
            }
}

#define SMELT_HOST_EMULATION 1
// bf16 helpers and a warp-collective mma.m16n8k16 built from the PTX fragment layouts: each lane
// publishes its registers, then computes its own 4 outputs from the whole 16x16 and 16x8 tiles.
inline unsigned short f2bf(float x) {
    unsigned u; std::memcpy(&u, &x, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float bf2f(unsigned short h) { unsigned u = (unsigned)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned pack_bf16x2(float lo, float hi) { return (unsigned)f2bf(lo) | ((unsigned)f2bf(hi) << 16); }
unsigned g_a[1024][4], g_b[1024][2];
inline void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    unsigned tid = threadIdx.x, w0 = tid & ~31u, lane = tid & 31u;
    for (int i = 0; i < 4; i++) g_a[tid][i] = a[i];
    g_b[tid][0] = b0; g_b[tid][1] = b1;
    g_bar->arrive_and_wait();
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; l++) {
        unsigned g = l / 4, t = l % 4;
        auto lo = [](unsigned r) { return bf2f(r & 0xffff); };
        auto hi = [](unsigned r) { return bf2f(r >> 16); };
        const unsigned* ra = g_a[w0 + l];
        A[g][2*t] = lo(ra[0]); A[g][2*t+1] = hi(ra[0]);
        A[g+8][2*t] = lo(ra[1]); A[g+8][2*t+1] = hi(ra[1]);
        A[g][2*t+8] = lo(ra[2]); A[g][2*t+9] = hi(ra[2]);
        A[g+8][2*t+8] = lo(ra[3]); A[g+8][2*t+9] = hi(ra[3]);
        const unsigned* rb = g_b[w0 + l];
        B[2*t][g] = lo(rb[0]); B[2*t+1][g] = hi(rb[0]);
        B[2*t+8][g] = lo(rb[1]); B[2*t+9][g] = hi(rb[1]);
    }
    unsigned g = lane / 4, t = lane % 4;
    int rows[4] = {(int)g, (int)g, (int)g + 8, (int)g + 8}, cols[4] = {(int)(2*t), (int)(2*t+1), (int)(2*t), (int)(2*t+1)};
    for (int e = 0; e < 4; e++) {
        float acc = d[e];
        for (int k = 0; k < 16; k++) acc += A[rows[e]][k] * B[k][cols[e]];
        d[e] = acc;
    }
    g_bar->arrive_and_wait();
}

// Backward v2's primitives: cp.async as an immediate copy (the kernels wait and sync before
// reading, so ordering is the same), and ldmatrix.x4.trans as a warp-collective exchange of the
// lanes' row addresses (lanes 8m .. 8m+7 address the rows of 8x8 matrix m; lane (g, t) gets
// rows 2t and 2t+1 of column g, the lower row in the low half).
inline void cp_async16(void* s, const void* g) { std::memcpy(s, g, 16); }
// zero-fills without touching g when !valid, as cp.async with src-size 0
inline void cp_async16_or_zero(void* s, const void* g, bool valid) {
    if (valid) std::memcpy(s, g, 16);
    else std::memset(s, 0, 16);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}
inline float fast_exp2(float x) { return std::exp2(x); }  // ex2.approx.ftz on the device
const unsigned short* g_rows[1024];
// ldmatrix.x4 (not transposed): lane (g, t) gets row g, columns 2t and 2t+1 of matrix m
inline void ldsm_x4(unsigned (&r)[4], const unsigned short* row) {
    unsigned tid = threadIdx.x, w0 = tid & ~31u, l = tid & 31u;
    g_rows[tid] = row;
    g_bar->arrive_and_wait();
    unsigned g = l / 4, t = l % 4;
    for (int m = 0; m < 4; m++) {
        const unsigned short* src = g_rows[w0 + 8 * m + g];
        r[m] = (unsigned)src[2 * t] | ((unsigned)src[2 * t + 1] << 16);
    }
    g_bar->arrive_and_wait();
}
// ldmatrix.x4.trans: lane (g, t) gets rows 2t and 2t+1 of column g of matrix m
inline void ldsm_x4_trans(unsigned (&r)[4], const unsigned short* row) {
    unsigned tid = threadIdx.x, w0 = tid & ~31u, l = tid & 31u;
    g_rows[tid] = row;
    g_bar->arrive_and_wait();
    unsigned g = l / 4, t = l % 4;
    for (int m = 0; m < 4; m++) {
        unsigned short lo = g_rows[w0 + 8 * m + 2 * t][g], hi = g_rows[w0 + 8 * m + 2 * t + 1][g];
        r[m] = (unsigned)lo | ((unsigned)hi << 16);
    }
    g_bar->arrive_and_wait();
}
// red.global.add.v2.f32: the threads of a block run concurrently here, so the adds are atomic
inline void red_add_f32x2(float* g, float x, float y) {
    std::atomic_ref<float>(g[0]).fetch_add(x);
    std::atomic_ref<float>(g[1]).fetch_add(y);
}
// the fused backward's dq by bulk reductions (cp.reduce.async.bulk ... add.f32): done at once,
// element by element; the group and proxy operations order nothing here
inline void bulk_reduce_add_f32(float* g, const float* s, unsigned bytes) {
    for (unsigned i = 0; i < bytes / 4; i++) std::atomic_ref<float>(g[i]).fetch_add(s[i]);
}
inline void bulk_commit() {}
inline void bulk_wait_read() {}
inline void bulk_wait_all() {}
inline void fence_proxy_async() {}
// every thread of the block reaches the kernels' __syncwarp together, so the block barrier
// stands in for it
inline void __syncwarp() { g_bar->arrive_and_wait(); }
// Shared-memory addresses as the hardware's shared window sees them: byte offsets into smem.
inline unsigned smem_addr(const void* s) { return (unsigned)((const char*)s - (const char*)smem); }
// wgmma (attention_wgmma.cuh), run at once: the warpgroup's 128 threads publish their A
// fragments, then each computes its own accumulator elements from the whole 64x16 A and the
// 16xN B that it decodes from shared memory by the descriptor, as the PTX ISA defines the
// no-swizzle canonical layouts (in bf16 elements, T = 8): K-major B[k][n] at
// (n % 8) * 8 + (n / 8) * SBO + (k % 8) + (k / 8) * LBO, MN-major B[k][n] at
// (n % 8) + (n / 8) * SBO + (k % 8) * 8 + (k / 8) * LBO, LBO and SBO the descriptor's byte
// offsets (bits 16..29 and 32..45, in 16-byte units) over 2. A descriptor with a swizzle mode
// or a base offset, or one pointing outside smem, stops the harness. fence, commit and wait
// order nothing here.
#include <cstdio>
#include <cstdlib>
inline void wgmma_fence() {}
inline void wgmma_commit() {}
inline void wgmma_wait_all() {}
unsigned long long g_desc[1024];
template <int N, int TRANS_B>
inline void wgmma_rs(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long desc) {
    const unsigned tid = threadIdx.x, wg0 = tid & ~127u;
    for (int i = 0; i < 4; i++) g_a[tid][i] = a[i];
    g_desc[tid] = desc;
    g_bar->arrive_and_wait();
    if (desc >> 46) {  // base offset (49..51) and layout type (62..63) must be 0: no swizzle
        std::fprintf(stderr, "wgmma: descriptor %llx asks for a swizzle or a base offset\n", desc);
        std::abort();
    }
    for (unsigned l = 0; l < 128; l++)
        if (g_desc[wg0 + l] != desc) {
            std::fprintf(stderr, "wgmma: threads of a warpgroup passed different descriptors\n");
            std::abort();
        }
    const size_t start = (size_t)(desc & 0x3FFF) << 4, lbo = (size_t)((desc >> 16) & 0x3FFF) << 4,
                 sbo = (size_t)((desc >> 32) & 0x3FFF) << 4;
    auto lo = [](unsigned r) { return bf2f(r & 0xffff); };
    auto hi = [](unsigned r) { return bf2f(r >> 16); };
    static thread_local float A[64][16], B[16][256];
    for (unsigned l = 0; l < 128; l++) {  // warp w of the warpgroup: rows 16 w .. 16 w + 16
        const unsigned w = l / 32, g = (l % 32) / 4, t = l % 4, r = 16 * w + g;
        const unsigned* ra = g_a[wg0 + l];
        A[r][2 * t] = lo(ra[0]); A[r][2 * t + 1] = hi(ra[0]);
        A[r + 8][2 * t] = lo(ra[1]); A[r + 8][2 * t + 1] = hi(ra[1]);
        A[r][2 * t + 8] = lo(ra[2]); A[r][2 * t + 9] = hi(ra[2]);
        A[r + 8][2 * t + 8] = lo(ra[3]); A[r + 8][2 * t + 9] = hi(ra[3]);
    }
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < N; n++) {
            const size_t byte = TRANS_B ? start + (n % 8) * 2 + (n / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                                        : start + (n % 8) * 16 + (n / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo;
            if (byte + 2 > sizeof(smem)) {
                std::fprintf(stderr, "wgmma: B element (%d, %d) at byte %zu lies outside shared memory\n", k, n, byte);
                std::abort();
            }
            unsigned short h;
            std::memcpy(&h, (const char*)smem + byte, 2);
            B[k][n] = bf2f(h);
        }
    const unsigned lane = tid % 32, w = (tid % 128) / 32, g = lane / 4, t = lane % 4;
    for (int j = 0; j < N / 8; j++)
        for (int e = 0; e < 4; e++) {
            const int r = 16 * w + g + 8 * (e >> 1), c = 8 * j + 2 * t + (e & 1);
            float acc = d[j][e];
            for (int k = 0; k < 16; k++) acc += A[r][k] * B[k][c];
            d[j][e] = acc;
        }
    g_bar->arrive_and_wait();
}
