// Fused softmax cross-entropy over the vocabulary, one block per row: the forward reads each
// logit once (online max and sum of exponentials), the backward once more; the fused kernel at
// the end runs both on a row in one block, its second read served by L2.
//
// The rows are streamed, so the kernels are bound by memory bandwidth: each thread moves four
// logits per access (8 bytes of bf16 as a uint2, 16 bytes of f32 as a float4) and keeps four
// such accesses in flight. A row starts at logits + row * V, which is aligned for those words
// only when (row * V) % 4 == 0 (V may be odd), so each row is split into a scalar head up to the
// first aligned element, a body of aligned 4-element words, and a scalar tail of under 4.

typedef unsigned long long u64;

#define IGNORE_INDEX 0xffffffffu
// Bit set in the backend's error word when a target is outside the vocabulary.
#define ERR_TARGET 2u
// NVRTC has no <math.h>; the bit pattern of +inf.
#define INFINITY __int_as_float(0x7f800000)
// log2(e): exp(d) = exp2(d * log2(e)), and exp2f is one MUFU.EX2 (with ftz off, a scaling
// for subnormal results) where expf adds a range reduction of about 8 instructions.
#define CE_LOG2E 1.4426950408889634f
// Words of 4 logits each thread loads before using any (memory-level parallelism).
#define CE_UNROLL 4

// exp(x - m). x - m is exact for nearby bf16 values and the product rounds once, so each term
// keeps about f32 accuracy (relative error ~ |x - m| * 2^-24 on top of exp2f's 2 ulp).
__device__ __forceinline__ float exp_diff(float x, float m) { return exp2f((x - m) * CE_LOG2E); }

// Merges two (max, sum of exp(x - max)) pairs. Explicit roundings (no fused multiply-add, whose
// contraction the compiler chooses per kernel) make the merge commutative and the same in every
// kernel, so the fused kernel's lse equals the forward kernel's bitwise.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) { m = m2; s = s2; return; }
    float mm = fmaxf(m, m2);
    s = __fadd_rn(__fmul_rn(s, expf(m - mm)), __fmul_rn(s2, expf(m2 - mm)));
    m = mm;
}

// Folds N logits into a running (max, sum of exp(x - max)): the sum is rescaled once, to the
// group's maximum if it is larger, then the N terms are added. Exactly as careful as one element
// at a time (the largest term is exp(0) = 1), with one rescale per group instead of per element.
// A NaN logit makes the sum NaN; groups of nothing but -inf are skipped.
template <int N>
__device__ __forceinline__ void online_update(float& m, float& s, const float* x) {
    float gm = x[0];
#pragma unroll
    for (int k = 1; k < N; k++) gm = fmaxf(gm, x[k]);
    if (gm > m) {
        // 0 while m is still -inf (s is 0 then too); rounded alone, never fused with the add below
        s = __fmul_rn(s, exp_diff(m, gm));
        m = gm;
    }
    if (m == -INFINITY) return;
    float g = 0.0f;
#pragma unroll
    for (int k = 0; k < N; k++) g += exp_diff(x[k], m);
    s += g;
}

// A logit as f32, from f32 or bf16 storage (bf16.cuh is prepended).
__device__ __forceinline__ float logit_at(const float* x, u64 i) { return x[i]; }
__device__ __forceinline__ float logit_at(const unsigned short* x, u64 i) { return bf16_to_f32(x[i]); }
__device__ __forceinline__ void logit_store(float* x, u64 i, float g) { x[i] = g; }
__device__ __forceinline__ void logit_store(unsigned short* x, u64 i, float g) { x[i] = f32_to_bf16_rne(g); }

// Four logits in one aligned word: uint2 for bf16, float4 for f32.
template <typename T> struct Quad;
template <> struct Quad<unsigned short> {
    typedef uint2 W;
    static __device__ __forceinline__ void unpack(W w, float f[4]) { bf16x4_unpack(w, f); }
    static __device__ __forceinline__ W pack(const float f[4]) { return bf16x4_pack(f); }
};
template <> struct Quad<float> {
    typedef float4 W;
    static __device__ __forceinline__ void unpack(W w, float f[4]) { f[0] = w.x; f[1] = w.y; f[2] = w.z; f[3] = w.w; }
    static __device__ __forceinline__ W pack(const float f[4]) {
        W w;
        w.x = f[0]; w.y = f[1]; w.z = f[2]; w.w = f[3];
        return w;
    }
};

// A row of V logits as head (elements [0, head)), words ([head, head + 4 words)), tail
// (the remaining tail elements from tail_start).
struct RowSplit {
    u64 head, words, tail_start, tail;
};

// The head runs up to the first element whose address is a multiple of the word size (4 elements).
template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* x, u64 v) {
    u64 mis = ((u64)x / sizeof(T)) & 3;  // elements past the previous word boundary
    u64 head = (4 - mis) & 3;
    if (head > v) head = v;
    RowSplit r;
    r.head = head;
    r.words = (v - head) / 4;
    r.tail_start = head + 4 * r.words;
    r.tail = v - r.tail_start;
    return r;
}

// Merges every thread's (m, s) into the block's, in every thread (thread 0's is the one used): a
// butterfly of lse_merge within each warp (5 shuffle steps instead of 9 __syncthreads levels),
// then every warp merges the warps' results the same way, so that all warps call the shuffles
// together. A tree of pairwise merges as before. blockDim.x: a multiple of 32, at most 1024.
__device__ __forceinline__ void block_lse(float& m, float& s) {
    __shared__ float wm[32], ws[32];
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        wm[warp] = m;
        ws[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? wm[lane] : -INFINITY;
    s = lane < warps ? ws[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
}

// The row's log-sum-exp from the block's (m, s), rounded the same way in every kernel.
__device__ __forceinline__ float lse_of(float m, float s) { return __fadd_rn(m, logf(s)); }

// Folds the thread's share of a row of V logits into (m, s), the thread's (max, sum of
// exp(x - max)): head element tid, words tid + k * blockDim.x (CE_UNROLL at a time while a whole
// group lies in the row, then one by one), tail element tid. The forward and the fused kernel
// both run exactly this, so their per-thread values, and so the block's, are the same bits.
template <typename T>
__device__ __forceinline__ void thread_lse(float& m, float& s, const T* x, u64 v) {
    typedef Quad<T> Q;
    typedef typename Q::W W;
    u64 tid = threadIdx.x, bd = blockDim.x;
    RowSplit r = split_row(x, v);
    const W* xw = (const W*)(x + r.head);
    m = -INFINITY;
    s = 0.0f;
    if (tid < r.head) {
        float xi = logit_at(x, tid);
        online_update<1>(m, s, &xi);
    }
    u64 w = tid;
    for (; w + (CE_UNROLL - 1) * bd < r.words; w += CE_UNROLL * bd) {
        W q[CE_UNROLL];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; u++) q[u] = xw[w + u * bd];
        float f[4 * CE_UNROLL];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; u++) Q::unpack(q[u], f + 4 * u);
        online_update<4 * CE_UNROLL>(m, s, f);
    }
    for (; w < r.words; w += bd) {
        float f[4];
        Q::unpack(xw[w], f);
        online_update<4>(m, s, f);
    }
    if (tid < r.tail) {
        float xi = logit_at(x, r.tail_start + tid);
        online_update<1>(m, s, &xi);
    }
}

// losses[n] = lse(logits[n]) - logits[n, t], 0 where t is IGNORE_INDEX; saves lse (N).
// logits (N, V), f32 or bf16. Launch: one block per row, blockDim.x a multiple of 32 in [32, 1024].
template <typename T>
__device__ void cross_entropy_forward_t(float* losses, float* lse, const T* logits,
                                        const unsigned* targets, u64 v, unsigned* err) {
    u64 row = blockIdx.x;
    const T* x = logits + row * v;
    float m, s;
    thread_lse(m, s, x, v);
    block_lse(m, s);
    if (threadIdx.x == 0) {
        float l = lse_of(m, s);
        lse[row] = l;
        unsigned t = targets[row];
        if (t == IGNORE_INDEX) {
            losses[row] = 0.0f;
        } else if (t >= v) {
            atomicOr(err, ERR_TARGET);
            losses[row] = 0.0f;
        } else {
            losses[row] = l - logit_at(x, t);
        }
    }
}

extern "C" __global__ void cross_entropy_forward(float* losses, float* lse, const float* logits,
                                                 const unsigned* targets, u64 v, unsigned* err) {
    cross_entropy_forward_t(losses, lse, logits, targets, v, err);
}

extern "C" __global__ void cross_entropy_forward_bf16(float* losses, float* lse, const unsigned short* logits,
                                                      const unsigned* targets, u64 v, unsigned* err) {
    cross_entropy_forward_t(losses, lse, logits, targets, v, err);
}

// dloss * softmax(x)_i given the row's lse, before the target's -dloss. Explicit roundings (no
// fused multiply-add) so the in-place backward equals the accumulating one into zeros bitwise.
__device__ __forceinline__ float softmax_grad(float x, float l, float dloss) { return __fmul_rn(dloss, exp_diff(x, l)); }

// dlogits[n] += dloss * (softmax(logits[n]) - onehot(t)), nothing for ignored rows.
// Launch: one block per row (any blockDim).
extern "C" __global__ void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                                                  const unsigned* targets, float dloss, u64 v) {
    u64 row = blockIdx.x;
    unsigned t = targets[row];
    if (t == IGNORE_INDEX || t >= v) return;
    const float* x = logits + row * v;
    float* d = dlogits + row * v;
    float l = lse[row];
    for (u64 i = threadIdx.x; i < v; i += blockDim.x) {
        float g = __fadd_rn(d[i], softmax_grad(x[i], l, dloss));
        if (i == t) g -= dloss;
        d[i] = g;
    }
}

// One element of the in-place backward: 0 + dloss * softmax (as the accumulating kernel into a
// zeroed buffer, +0 for a -0 product included), minus dloss at the target.
__device__ __forceinline__ float in_place_grad(float x, float l, float dloss, bool target) {
    float g = __fadd_rn(0.0f, softmax_grad(x, l, dloss));
    return target ? g - dloss : g;
}

// The same for the 4 logits of a word whose first element is element `first` of the row.
__device__ __forceinline__ void in_place_grad4(float f[4], float l, float dloss, u64 first, u64 t) {
#pragma unroll
    for (int k = 0; k < 4; k++) f[k] = __fadd_rn(0.0f, softmax_grad(f[k], l, dloss));
    u64 j = t - first;  // wraps to a huge value when the target lies before this word
    if (j < 4) {
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (j == (u64)k) f[k] -= dloss;
    }
}

// A row of zeros (the gradient of an ignored row), with the same head / words / tail split.
template <typename T>
__device__ __forceinline__ void zero_row(T* x, RowSplit r) {
    typedef Quad<T> Q;
    typedef typename Q::W W;
    u64 tid = threadIdx.x, bd = blockDim.x;
    const float zeros[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    W z = Q::pack(zeros);
    W* xw = (W*)(x + r.head);
    if (tid < r.head) logit_store(x, tid, 0.0f);
    for (u64 w = tid; w < r.words; w += bd) xw[w] = z;
    if (tid < r.tail) logit_store(x, r.tail_start + tid, 0.0f);
}

// Overwrites a row of V logits (target t < V) with dloss * (softmax - onehot(t)), given the row's
// lse l: the thread's head element, words and tail element as thread_lse takes them (the same
// split), each read once and written once by the same thread, rounded once to the storage type.
template <typename T>
__device__ __forceinline__ void row_grad_in_place(T* x, u64 v, unsigned t, float l, float dloss) {
    typedef Quad<T> Q;
    typedef typename Q::W W;
    u64 tid = threadIdx.x, bd = blockDim.x;
    RowSplit r = split_row(x, v);
    W* xw = (W*)(x + r.head);
    if (tid < r.head) logit_store(x, tid, in_place_grad(logit_at(x, tid), l, dloss, tid == t));
    u64 w = tid;
    for (; w + (CE_UNROLL - 1) * bd < r.words; w += CE_UNROLL * bd) {
        W q[CE_UNROLL];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; u++) q[u] = xw[w + u * bd];
#pragma unroll
        for (int u = 0; u < CE_UNROLL; u++) {
            float f[4];
            Q::unpack(q[u], f);
            in_place_grad4(f, l, dloss, r.head + 4 * (w + u * bd), t);
            xw[w + u * bd] = Q::pack(f);
        }
    }
    for (; w < r.words; w += bd) {
        float f[4];
        Q::unpack(xw[w], f);
        in_place_grad4(f, l, dloss, r.head + 4 * w, t);
        xw[w] = Q::pack(f);
    }
    if (tid < r.tail) {
        u64 i = r.tail_start + tid;
        logit_store(x, i, in_place_grad(logit_at(x, i), l, dloss, i == t));
    }
}

// The fused classifier's backward: logits[n] = dloss * (softmax(logits[n]) - onehot(t)), zeros
// for ignored rows (and for a target out of range, which the forward already flagged).
// Launch: one block per row, blockDim.x >= 4 (the head and tail take one element per thread).
template <typename T>
__device__ void cross_entropy_backward_in_place_t(T* logits, const float* lse, const unsigned* targets, float dloss,
                                                  u64 v) {
    u64 row = blockIdx.x;
    unsigned t = targets[row];
    T* x = logits + row * v;
    if (t == IGNORE_INDEX || t >= v) {
        zero_row(x, split_row(x, v));
        return;
    }
    row_grad_in_place(x, v, t, lse[row], dloss);
}

extern "C" __global__ void cross_entropy_backward_in_place(float* logits, const float* lse, const unsigned* targets,
                                                           float dloss, u64 v) {
    cross_entropy_backward_in_place_t(logits, lse, targets, dloss, v);
}

// The same over bf16 logits: the gradient is stored as bf16 (the LM head's GEMM operand).
extern "C" __global__ void cross_entropy_backward_in_place_bf16(unsigned short* logits, const float* lse,
                                                                const unsigned* targets, float dloss, u64 v) {
    cross_entropy_backward_in_place_t(logits, lse, targets, dloss, v);
}

// ---- forward and in-place backward in one pass -------------------------------------------------
//
// A training step runs the in-place backward right after the forward. The fused kernel runs both
// on a row in the same block: thread_lse over the row, block_lse, then row_grad_in_place with that
// lse. The backward's read of the row comes right after the forward's, so it hits L2 (a GPT-2 row
// is 100 KB of bf16): DRAM sees one read and one write of the logits instead of two reads and a
// write. That holds only while the rows in flight fit in L2 with room to spare, so the host caps
// the blocks resident per SM (cross_entropy.rs: dynamic shared memory the kernel never touches,
// sized so that no more than the cap fit; 2 per SM by default, 132 SMs x 2 x 100 KB = 26 MB of
// an H100's 50 MB).
//
// The arithmetic is the two kernels': the same thread_lse per thread, the same block_lse tree,
// lse_of, and row_grad_in_place, so losses, lse and gradients equal theirs bitwise.

// Threads per row of the fused kernel (cross_entropy.rs launches it with exactly as many).
#define CE_FUSED_THREADS 512

// losses, lse as cross_entropy_forward_t, then logits overwritten as
// cross_entropy_backward_in_place_t (zeros for an ignored row or a target out of range, which
// sets ERR_TARGET). logits (N, V), f32 or bf16, any V. Launch: one block per row, blockDim.x a
// multiple of 32 in [32, CE_FUSED_THREADS].
template <typename T>
__device__ void cross_entropy_fused_t(float* losses, float* lse, T* logits, const unsigned* targets, float dloss, u64 v,
                                      unsigned* err) {
    u64 row = blockIdx.x;
    T* x = logits + row * v;
    unsigned t = targets[row];
    bool skip = t == IGNORE_INDEX || t >= v;
    // The target's logit, read before block_lse's barrier: after it, other threads overwrite the row.
    float xt = threadIdx.x == 0 && !skip ? logit_at(x, t) : 0.0f;
    float m, s;
    thread_lse(m, s, (const T*)x, v);
    block_lse(m, s);
    // Lane 0 of every warp holds thread 0's (m, s): every warp ran the same second butterfly on the
    // same per-warp results. Broadcast it so that every thread uses the lse that is saved (the
    // other lanes merged the same pairs in the other order, the same bits as lse_merge is
    // commutative; the broadcast makes that hold by construction, for two shuffles).
    m = __shfl_sync(0xffffffffu, m, 0);
    s = __shfl_sync(0xffffffffu, s, 0);
    float l = lse_of(m, s);
    if (threadIdx.x == 0) {
        lse[row] = l;
        if (t != IGNORE_INDEX && t >= v) atomicOr(err, ERR_TARGET);
        losses[row] = skip ? 0.0f : l - xt;
    }
    if (skip) {
        zero_row(x, split_row(x, v));
        return;
    }
    row_grad_in_place(x, v, t, l, dloss);
}

// The launch bounds let as many blocks fit by registers as the host may ask for: 3 per SM for
// bf16 logits (40 registers, 3 x 132 x 100 KB = 40 MB in flight at most), 2 for f32 (at 3,
// ptxas spills).
#define CE_FUSED_PARAMS(T) float *losses, float *lse, T *logits, const unsigned *targets, float dloss, u64 v, unsigned *err
#define CE_FUSED_ARGS losses, lse, logits, targets, dloss, v, err
extern "C" __global__ void __launch_bounds__(CE_FUSED_THREADS, 2) cross_entropy_fused(CE_FUSED_PARAMS(float)) {
    cross_entropy_fused_t(CE_FUSED_ARGS);
}
extern "C" __global__ void __launch_bounds__(CE_FUSED_THREADS, 3) cross_entropy_fused_bf16(CE_FUSED_PARAMS(unsigned short)) {
    cross_entropy_fused_t(CE_FUSED_ARGS);
}
