// =============================================================================================
// Tensor-core version: the same three passes with bf16 operands on mma.sync.m16n8k16 (sm_80+)
// and f32 accumulation, softmax and statistics (kernels in attention_mma_forward.cu and
// attention_mma_backward.cu). A block is 4 warps (128 threads); each warp owns 16 rows of the
// block's 64-row tile and loops over 64-column tiles of the other side.
//
// mma.m16n8k16 fragments (g = lane / 4, t = lane % 4; two bf16 per 32-bit register, the lower
// column or row in the low half):
//   A (16x16, row-major):  a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B (16x8, "col"):       b0 (k 2t..2t+1, n g)  b1 (k 2t+8..2t+9, n g)
//   C (16x8, f32):         c0, c1 (g, 2t / 2t+1)  c2, c3 (g+8, 2t / 2t+1)
// So B is read from a tile stored [n][k] (k contiguous), and two C tiles side by side (16x16)
// are exactly one A fragment after packing: probabilities never leave registers.
// Shared tiles are padded by 8 bf16 per row (row stride = 4 mod 32 words for W = 64 / 128 and
// 20 words for W = 32), so the 8 rows x 4 words a fragment load touches hit 32 distinct banks.

typedef unsigned short bf16_t;
typedef unsigned int u32;
#define MMA_THREADS 128
// Blocks per SM the hd-64 tensor-core kernels are compiled for (their register cap: 65536 /
// (128 * N); 1 lets ptxas take what it needs). Measured on an H200 (bench/NOTES.md v8): the
// forward keeps 4 (128 registers, as before its masks were split), dq runs faster at 3 (~180 ->
// 168 registers, a few bytes spilled), dkv slower at 3 (spills in its loop): 1. The engine
// passes SMELT_ATTN_MIN_BLOCKS="fwd,dkv,dq" from the environment, for measuring.
#ifndef SMELT_ATTN_FWD_MIN_BLOCKS
#define SMELT_ATTN_FWD_MIN_BLOCKS 4
#endif
#ifndef SMELT_ATTN_DKV_MIN_BLOCKS
#define SMELT_ATTN_DKV_MIN_BLOCKS 1
#endif
#ifndef SMELT_ATTN_DQ_MIN_BLOCKS
#define SMELT_ATTN_DQ_MIN_BLOCKS 3
#endif
// The fused backward sums dq by bulk reductions from shared memory (sm_90, head dims up to 64;
// the host emulator models them) unless SMELT_ATTN_DQ_BULK=0, else by vector atomics.
#ifndef SMELT_ATTN_DQ_BULK
#define SMELT_ATTN_DQ_BULK 1
#endif
#if defined(SMELT_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define SMELT_DQ_BULK_ARCH 1
#else
#define SMELT_DQ_BULK_ARCH 0
#endif

// The two primitives below need sm_80. Before that the kernels still compile (so the module
// loads on any GPU) but trap; the host picks the f32 kernels there. SMELT_HOST_EMULATION is
// defined by a host-side emulator (C++ threads standing in for a block) that supplies its own.
#ifndef SMELT_HOST_EMULATION
// Two f32 rounded to nearest-even bf16 and packed: lo in bits 0..15, hi in 16..31.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    __trap();
    return 0;
#endif
}
// 2^x by the special-function unit alone (ex2.approx.ftz, max 2 ulp as exp2f): exp2f without
// fast-math wraps the same instruction in a scaling for subnormal results, a few instructions per
// probability in kernels whose issue slots are the limit; a probability below 2^-126 flushes to 0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// *g += x, g[1] += y (g 8-byte aligned, global), not returning the old values: one vector
// reduction on sm_90, two scalar ones before it.
__device__ __forceinline__ void red_add_f32x2(float* g, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(g), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(g, x);
    atomicAdd(g + 1, y);
#endif
}
// The fused backward's dq rows by the TMA unit (sm_90): bytes of f32 at s (shared) added onto g
// (global) by one asynchronous bulk reduction in L2, FlashAttention-3's way of summing dq. A
// thread's bulk operations form groups: commit closes one, wait_read waits until its earlier
// groups have read their shared memory (the staging may be rewritten), wait_all until they
// are complete. fence_proxy_async makes this thread's shared-memory writes visible to them.
__device__ __forceinline__ void bulk_reduce_add_f32(float* g, const float* s, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                 ::"l"(g), "r"((u32)__cvta_generic_to_shared(s)), "r"(bytes) : "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_read() {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_all() {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}
// d += a b for one 16x8x16 tile, f32 accumulation.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}
#endif


// Element idx of a buffer the bf16 family reads or writes in global memory (q, kv, out, dout,
// dq, dkv): f32, or bf16 when p.io_bf16. The pointer is typed float* either way; only the index
// arithmetic here knows the element size.
__device__ __forceinline__ float io_load(const float* base, size_t idx, const AttnParams& p) {
    return p.io_bf16 ? __int_as_float((int)((u32)((const bf16_t*)base)[idx] << 16)) : base[idx];
}
__device__ __forceinline__ void io_store(float* base, size_t idx, float v, const AttnParams& p) {
    if (p.io_bf16) {
        ((bf16_t*)base)[idx] = (bf16_t)(pack_bf16x2(v, 0.0f) & 0xffffu);
    } else {
        base[idx] = v;
    }
}
// A gradient element: added to (accumulate) or written over, in the buffer's own type.
__device__ __forceinline__ void io_grad_store(float* base, size_t idx, float v, const AttnParams& p) {
    io_store(base, idx, (p.accumulate ? io_load(base, idx, p) : 0.0f) + v, p);
}
// Columns d and d + 1 (d even) of a head at idx, idx + 1: one 4-byte access when p.pairs (bf16
// buffers whose strides and offsets are even: idx is even), else one element at a time (d + 1
// may lie past hd).
__device__ __forceinline__ void io_load_pair(const float* base, size_t idx, int d, float& v0, float& v1,
                                             const AttnParams& p) {
    if (p.pairs && d + 1 < p.hd) {
        const u32 w = *(const u32*)((const bf16_t*)base + idx);
        v0 = __int_as_float((int)(w << 16));
        v1 = __int_as_float((int)(w & 0xffff0000u));
        return;
    }
    v0 = d < p.hd ? io_load(base, idx, p) : 0.0f;
    v1 = d + 1 < p.hd ? io_load(base, idx + 1, p) : 0.0f;
}
__device__ __forceinline__ void io_store_pair(float* base, size_t idx, int d, float v0, float v1, const AttnParams& p) {
    if (p.pairs && d + 1 < p.hd) {
        *(u32*)((bf16_t*)base + idx) = pack_bf16x2(v0, v1);
        return;
    }
    if (d < p.hd) io_store(base, idx, v0, p);
    if (d + 1 < p.hd) io_store(base, idx + 1, v1, p);
}
__device__ __forceinline__ void io_grad_store_pair(float* base, size_t idx, int d, float v0, float v1,
                                                   const AttnParams& p) {
    if (p.pairs && d + 1 < p.hd) {
        float o0 = 0.0f, o1 = 0.0f;
        if (p.accumulate) io_load_pair(base, idx, d, o0, o1, p);
        *(u32*)((bf16_t*)base + idx) = pack_bf16x2(o0 + v0, o1 + v1);
        return;
    }
    if (d < p.hd) io_grad_store(base, idx, v0, p);
    if (d + 1 < p.hd) io_grad_store(base, idx + 1, v1, p);
}

// The qkv projection's bias gradient, summed where the gradient is written (p.bias_partial set:
// the host allows it for packed self-attention with T % 64 == 0 and no key padding, so a block's
// 64 rows are exactly one of column_sum_partial's 64-row chunks): after the block's stores,
// partial[chunk, col .. col + hd) = the sums of those 64 rows of the gradient buffer, read back
// as stored (bf16 or f32), from 0 in row order: bitwise what column_sum_partial computes from
// the whole buffer afterwards, without that pass reading it again. Every thread of the block
// calls it (it synchronizes, so the stores are visible: the block reads its own writes).
__device__ __forceinline__ void add_bias_partial(const float* grad, const AttnParams& p, int b, int row0, int ld,
                                                 int col) {
    __syncthreads();
    const size_t chunk = ((size_t)b * p.tq + row0) / TILE;
    for (int d = threadIdx.x; d < p.hd; d += blockDim.x) {
        float acc = 0.0f;
#pragma unroll 8
        for (int r = 0; r < TILE; r++) acc += io_load(grad, ((size_t)b * p.tq + row0 + r) * ld + col + d, p);
        p.bias_partial[chunk * (size_t)ld + col + d] = acc;
    }
}

// zero_padding_kv_tile for the bf16 family's buffers.
__device__ __forceinline__ void zero_padding_kv_tile_io(float* dkv, const AttnParams& p, int b, int h, int k0) {
    if (p.accumulate) return;
    for (int e = threadIdx.x; e < TILE * p.hd; e += blockDim.x) {
        const int j = k0 + e / p.hd, d = e % p.hd;
        if (j >= p.tk) break;
        io_store(dkv, ((size_t)b * p.tk + j) * p.k_ld + p.k_off + h * p.hd + d, 0.0f, p);
        io_store(dkv, ((size_t)b * p.tk + j) * p.v_ld + p.v_off + h * p.hd + d, 0.0f, p);
    }
}

// A fragments of a (16, 64) f32 C-layout tile c[8][4]: a[kk] covers columns 16kk .. 16kk+16.
__device__ __forceinline__ void c_to_a(u32 (&a)[4][4], const float (&c)[8][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        a[kk][0] = pack_bf16x2(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16x2(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16x2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16x2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

// =============================================================================================
// The tensor-core kernels. They read q, k, v and dout as rows of W bf16: in place from the bf16
// activation buffers when hd == W and rows are 16-byte aligned (p.direct; rows past T are
// zero-filled by cp.async), else from head-major bf16 copies (attention_heads_bf16):
// (B, H, Tpad, W), Tpad = T rounded up to 64, zeros past T and past hd (TileSrc says which). Tiles arrive by
// cp.async in 16-byte chunks, double-buffered: the copy of the next key (or query) tile overlaps
// the arithmetic on this one. The operands that must be read transposed (the B of o += P v,
// dv += P^T dout, dk += dS^T q and dq += dS k) come from the row tiles through ldmatrix.trans.
// Each query row's (lse log2(e), D) pair is precomputed and padded (attention_backward_stats).
// Measured on an H100 against the earlier design (f32 operands converted while staged
// synchronously, transposed tiles written to shared memory; bench/NOTES.md v5): GPT-2 124M's
// attention backward 22.5 -> 7.9 ms per step, forward 5.8 -> 3.9 ms.

#define LOG2E 1.4426950408889634f

__device__ __forceinline__ int round_tile(int n) { return (n + TILE - 1) / TILE * TILE; }

#ifndef SMELT_HOST_EMULATION
__device__ __forceinline__ u32 smem_addr(const void* s) { return (u32)__cvta_generic_to_shared(s); }
// 16 bytes global -> shared without passing through registers (sm_80+).
__device__ __forceinline__ void cp_async16(void* s, const void* g) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(s)), "l"(g));
#else
    __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;");
#endif
}
// Like cp_async16, but writes 16 zero bytes instead when !valid (g is then not read, though it
// must still be a valid address: the caller passes a row it may read).
__device__ __forceinline__ void cp_async16_or_zero(void* s, const void* g, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(s)), "l"(g), "r"(valid ? 16 : 0));
#else
    __trap();
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}
// Four 8x8 bf16 matrices from shared memory: lanes 8m .. 8m+7 give the row addresses of matrix
// m (16 bytes each); lane (g, t) gets r[m] = row g, columns 2t and 2t+1 of matrix m (the lower
// column in the low half), i.e. the A and B fragment layouts of mma.m16n8k16.
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const bf16_t* row) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#else
    __trap();
#endif
}
// ldmatrix.x4.trans: lanes 8m .. 8m+7 give the row addresses of 8x8 matrix m (16 bytes each);
// lane (g, t) gets r[m] = rows 2t and 2t+1 of column g of matrix m (the lower row in the low
// half), i.e. the fragment of the transposed matrix.
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const bf16_t* row) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#else
    __trap();
#endif
}
#endif

// Two B fragments (k 16 x n 16: b[0], b[1] for n-tile n0, b[2], b[3] for n0 + 8) of a tile
// stored [k][n] with row stride ld: ldmatrix.trans hands lane (g, t) the pairs (k 2t, 2t+1;
// n g) mma's B operand wants. Matrices: (k0, n0), (k0 + 8, n0), (k0, n0 + 8), (k0 + 8, n0 + 8).
__device__ __forceinline__ void load_b_trans(u32 (&b)[4], const bf16_t* s, int ld, int k0, int n0) {
    const int l = threadIdx.x % 32;
    ldsm_x4_trans(b, s + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}

// The A fragment (m 16 x k 16 at m0, k0) of a tile stored transposed, [k][m] with row stride
// ld: a[0] = rows m0.., columns k0.. is the stored block (k0, m0) read transposed, a[1] (rows
// m0 + 8) the block (k0, m0 + 8), a[2] (columns k0 + 8) the block (k0 + 8, m0), a[3] both.
__device__ __forceinline__ void load_a_trans(u32 (&a)[4], const bf16_t* s, int ld, int m0, int k0) {
    const int l = threadIdx.x % 32;
    ldsm_x4_trans(a, s + (k0 + (l & 7) + (l >> 4) * 8) * ld + m0 + ((l >> 3) & 1) * 8);
}

// A fragment of rows r0..r0+16, columns c0..c0+16 of a row-major tile with row stride ld: one
// ldmatrix.x4 (8x8 matrices: rows r0.. and r0+8.. of columns c0.., then of columns c0+8..).
__device__ __forceinline__ void load_a(u32 (&a)[4], const bf16_t* s, int ld, int r0, int c0) {
    const int l = threadIdx.x % 32;
    ldsm_x4(a, s + (r0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + c0 + (l >> 4) * 8);
}

// B fragments (k 16 x n 8) of two adjacent n-tiles, n0 and n0 + 8, of a tile stored [n][k]
// with row stride ld, at k0: b[0], b[1] for n0 and b[2], b[3] for n0 + 8, one ldmatrix.x4
// (the 32-bit shared loads it replaced issued four times the load instructions).
__device__ __forceinline__ void load_b2(u32 (&b)[4], const bf16_t* s, int ld, int n0, int k0) {
    const int l = threadIdx.x % 32;
    ldsm_x4(b, s + (n0 + (l & 7) + (l >> 4) * 8) * ld + k0 + ((l >> 3) & 1) * 8);
}

// Heads whose tiles the tensor-core kernels schedule together (tile_order); 0 keeps the launch
// grid's own order (tile = blockIdx.x, head = blockIdx.y, batch = blockIdx.z). The engine passes
// SMELT_ATTN_HEAD_GROUP from the environment, for measuring.
#ifndef SMELT_ATTN_HEAD_GROUP
#define SMELT_ATTN_HEAD_GROUP 16
#endif

struct TileCoord {
    int tile, h, b;
};

// The (tile, head, batch entry) of the block at position `linear` of the launch order in a grid
// of n_tiles x heads x batch (n_bh = heads x batch). The block scheduler starts blocks in launch
// order, so with a causal mask the order decides how the grid ends: in the grid's own order
// every head's tiles are mixed, and the last blocks to start include long ones (the last query
// tile of the forward and dq sees every key tile; the first key tile of dkv, every query tile),
// which then run on a few SMs while the others idle. Here heads go in groups of `group`; within a
// group, tile ranks go from the most work to the least (rank 0 = the last tile when heavy_last,
// else the first), one block per head in turn. The grid then ends on one-tile blocks, and the
// heads in flight (a group's k and v, or q and dout, 256 KB per GPT-2 head) stay few enough to be
// read from L2 by all their tiles. A bijection from [0, n_tiles x n_bh) onto the tiles (checked
// by tools/cuda_emu/attention_emu.cpp over many grids).
__host__ __device__ inline TileCoord tile_order(unsigned linear, int n_tiles, int heads, int n_bh, int group,
                                                bool heavy_last) {
    TileCoord c;
    if (group <= 0) {  // the launch grid's order
        c.tile = (int)(linear % (unsigned)n_tiles);
        const unsigned bh = linear / (unsigned)n_tiles;
        c.h = (int)(bh % (unsigned)heads);
        c.b = (int)(bh / (unsigned)heads);
        return c;
    }
    const unsigned per_group = (unsigned)group * (unsigned)n_tiles;
    const unsigned g0 = linear / per_group * (unsigned)group;  // the group's first (b, h)
    const unsigned within = linear - g0 * (unsigned)n_tiles;
    const unsigned gs = min((unsigned)group, (unsigned)n_bh - g0);  // the last group may be short
    const int rank = (int)(within / gs);
    const unsigned bh = g0 + within % gs;
    c.tile = heavy_last ? n_tiles - 1 - rank : rank;
    c.h = (int)(bh % (unsigned)heads);
    c.b = (int)(bh / (unsigned)heads);
    return c;
}

// This block's tile, head and batch entry (grid: tiles x heads x batch, see tile_order).
__device__ __forceinline__ TileCoord block_tile(bool heavy_last) {
    const unsigned linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    return tile_order(linear, (int)gridDim.x, (int)gridDim.y, (int)(gridDim.y * gridDim.z), SMELT_ATTN_HEAD_GROUP,
                      heavy_last);
}

// Where one head's rows of q, k, v or dout come from: `rows` rows of W bf16 at stride `ld`
// from `base` (row 0, column 0 of the head); rows past `rows` read as zeros.
struct TileSrc {
    const bf16_t* base;
    int ld, rows;
};

// Head h of batch entry b of a (B, T, ld) bf16 buffer at column off (p.direct), or of its
// head-major (B, H, Tpad, W) copy (attention_heads_bf16): the copy's padding rows hold zeros,
// so every one of its Tpad rows may be read.
template <int W>
__device__ __forceinline__ TileSrc head_src(const bf16_t* buf, const AttnParams& p, int b, int h,
                                            int t_len, int ld, int off) {
    if (p.direct) return TileSrc{buf + (size_t)b * t_len * ld + off + h * p.hd, ld, t_len};
    const int tp = round_tile(t_len);
    return TileSrc{buf + ((size_t)b * p.heads + h) * tp * W, W, tp};
}

// Rows row0 .. row0+64 of a head's (rows, W) bf16 matrix into a (64, W+8) shared tile. Thread
// x copies chunk x % CH of rows x / CH + k * (128 / CH): the loop is unrolled and only the row
// changes between its steps, so each 16-byte copy costs a few instructions (the rolled loop
// with its divisions and 64-bit products cost ~23 per copy in ptxas' output).
template <int W>
__device__ __forceinline__ void copy_tile_async(bf16_t* s, const TileSrc src, int row0) {
    constexpr int CH = W / 8;                  // 16-byte chunks per row
    constexpr int STEP = MMA_THREADS / CH;     // rows apart between a thread's copies
    static_assert(TILE % STEP == 0, "whole rows per step");
    const int r0 = threadIdx.x / CH, c = threadIdx.x % CH;
    bf16_t* dst = s + r0 * (W + 8) + c * 8;
    const bf16_t* first = src.base + c * 8;  // row 0: a row past the end reads (never) from here
    const int row = row0 + r0;
    const bf16_t* from = first + (size_t)row * src.ld;  // this thread's first row, then STEP apart
    const size_t step = (size_t)STEP * src.ld;
#pragma unroll
    for (int k = 0; k < TILE / STEP; k++) {
        const bool valid = row + k * STEP < src.rows;
        cp_async16_or_zero(dst + k * STEP * (W + 8), valid ? from + k * step : first, valid);
    }
}

// The (lse log2e, D) pairs of rows row0 .. row0+64: 512 bytes, 32 chunks.
__device__ __forceinline__ void copy_stats_async(float* s, const float* g, int row0) {
    if (threadIdx.x < 32) cp_async16(s + 4 * threadIdx.x, g + 2 * (size_t)row0 + 4 * threadIdx.x);
}

// ---- masks and probabilities of a (16 x 64) warp tile, C layout -----------------------------
// Element (nt, e) of a thread (g, t) of the warp sits at row r0 + 8 (e >> 1) and column
// c0 + nt * 8 + (e & 1), with r0 = the warp's first row + g and c0 = the tile's first column
// + 2 t. CHECK = false is for tiles that key_tile_full / pair_tile_full proved fully visible.

// Whether every key of the tile at k0 is visible to every query row of the tile at q0 in the
// forward pass (padding query rows count as seeing key 0 onwards, see key_visible).
__device__ __forceinline__ bool key_tile_full(const AttnParams& p, int nk, int q0, int k0) {
    return k0 + TILE <= nk && (!p.causal || k0 + TILE - 1 <= q0);
}
// Whether every (query, key) pair of the tiles at q0, k0 contributes to the gradients.
__device__ __forceinline__ bool pair_tile_full(const AttnParams& p, int nk, int q0, int k0) {
    return q0 + TILE <= p.tq && key_tile_full(p, nk, q0, k0);
}

// Forward scores s (rows: queries from r0, columns: keys from c0): -inf where invisible. They
// stay unscaled: the scale goes into the exponent's FFMA (exp2(s * scale log2 e - max)), one
// instruction per score fewer than scaling them first.
__device__ __forceinline__ void mask_scores(float (&s)[8][4], const AttnParams& p, int nk, int r0, int c0) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = r0 + 8 * (e >> 1), j = c0 + nt * 8 + (e & 1);
            if (!key_visible(p, nk, i, j)) s[nt][e] = neg_inf();
        }
}

// dkv pass (rows: keys from r0, columns: queries q0 + nt*8 + 2t + (e&1)): st holds S^T and
// becomes P^T, dpt holds dP^T and becomes dS^T. sc: the query tile's (lse log2 e, D) pairs.
template <bool CHECK>
__device__ __forceinline__ void probs_dkv(float (&st)[8][4], float (&dpt)[8][4], const float* sc,
                                          const AttnParams& p, int nk, int q0, int r0, float scale2) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int c = 0; c < 2; c++) {
            const int qi = nt * 8 + 2 * t + c;
            const float2 st2 = ((const float2*)sc)[qi];  // one 8-byte load for both rows
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int e = 2 * half + c;
                const float pr = !CHECK || visible(p, nk, q0 + qi, r0 + 8 * half)
                                     ? fast_exp2(st[nt][e] * scale2 - st2.x) : 0.0f;
                st[nt][e] = pr;
                dpt[nt][e] = pr * (dpt[nt][e] - st2.y);
            }
        }
}

// dq pass (rows: queries from r0, columns: keys from c0): dp holds dP and becomes dS, from the
// scores s and the rows' (lse log2 e, D).
template <bool CHECK>
__device__ __forceinline__ void probs_dq(const float (&s)[8][4], float (&dp)[8][4], const float (&lse2)[2],
                                         const float (&dd)[2], const AttnParams& p, int nk, int r0, int c0,
                                         float scale2) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int half = e >> 1;
            const int i = r0 + 8 * half, j = c0 + nt * 8 + (e & 1);
            const float pr = !CHECK || visible(p, nk, i, j) ? fast_exp2(s[nt][e] * scale2 - lse2[half]) : 0.0f;
            dp[nt][e] = pr * (dp[nt][e] - dd[half]);
        }
}

