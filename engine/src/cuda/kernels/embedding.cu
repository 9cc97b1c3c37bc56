// Embedding lookup (token, position and segment tables) and its deterministic backward.

typedef unsigned long long u64;

// Bit set in the backend's error word when an id is outside the table (see CudaBackend).
#define ERR_EMBEDDING_ID 1u

// out[n, j] (+)= table[ids[n], j]; out (N, C), table (R, C), ids (N). One thread per element.
extern "C" __global__ void embedding_forward(float* out, const unsigned* ids, const float* table,
                                             u64 n_rows, u64 c, u64 table_rows, int accumulate,
                                             unsigned* err) {
    u64 total = n_rows * c;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 n = i / c, j = i % c;
        unsigned id = ids[n];
        if (id >= table_rows) {
            if (j == 0) atomicOr(err, ERR_EMBEDDING_ID);
            continue;
        }
        float t = table[(u64)id * c + j];
        out[i] = accumulate ? out[i] + t : t;
    }
}

// The backward, deterministic in two levels (see embedding.rs). The host groups positions by id
// (rows[g] the id, order[offsets[g] .. offsets[g+1]) its positions in increasing n) and splits
// every group longer than SEG positions into segments of SEG consecutive entries of order: the
// group's segments are [seg_first[g], seg_first[g+1]), segment s covers order[seg_start[s] ..
// seg_end[s]). A group of at most SEG positions has none and is summed whole by one thread.

// Level 1, long groups only: partial[s, j] = sum over k in [seg_start[s], seg_end[s]) of
// dout[order[k], j], from 0 in order of k. partial (S, C). grid: (S, ceil(C / blockDim.x)).
extern "C" __global__ void embedding_backward_segments(float* partial, const float* dout,
                                                       const unsigned* order,
                                                       const unsigned* seg_start,
                                                       const unsigned* seg_end, u64 c) {
    u64 j = blockIdx.y * (u64)blockDim.x + threadIdx.x;
    unsigned s = blockIdx.x;
    if (j >= c) return;
    float acc = 0.0f;
    // Unrolled so that the independent row loads are in flight together; the adds keep k order.
    unsigned k0 = seg_start[s], k1 = seg_end[s];
#pragma unroll 8
    for (unsigned k = k0; k < k1; k++) {
        acc += dout[(u64)order[k] * c + j];
    }
    partial[(u64)s * c + j] = acc;
}

// Level 2: acc = dtable[rows[g], j], then for a group without segments acc += dout[order[k], j]
// for k in order (exactly the CPU's sequential loop: bitwise equal), for a long group acc +=
// partial[s, j] for its segments in order (differs from the CPU's sum by rounding only).
// partial may be null when no group has segments. grid: (groups, ceil(C / blockDim.x)).
extern "C" __global__ void embedding_backward_grouped(float* dtable, const float* dout,
                                                      const float* partial, const unsigned* rows,
                                                      const unsigned* offsets,
                                                      const unsigned* order,
                                                      const unsigned* seg_first, u64 c) {
    u64 j = blockIdx.y * (u64)blockDim.x + threadIdx.x;
    unsigned g = blockIdx.x;
    if (j >= c) return;
    float* dst = dtable + (u64)rows[g] * c + j;
    float acc = *dst;
    unsigned s0 = seg_first[g], s1 = seg_first[g + 1];
    if (s0 == s1) {
        unsigned k0 = offsets[g], k1 = offsets[g + 1];
#pragma unroll 8
        for (unsigned k = k0; k < k1; k++) {
            acc += dout[(u64)order[k] * c + j];
        }
    } else {
#pragma unroll 8
        for (unsigned s = s0; s < s1; s++) {
            acc += partial[(u64)s * c + j];
        }
    }
    *dst = acc;
}
