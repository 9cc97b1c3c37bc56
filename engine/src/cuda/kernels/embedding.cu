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

// dtable[rows[g], j] += sum over k in [offsets[g], offsets[g+1]) of dout[order[k], j], the
// positions of one distinct id grouped by the host in increasing n. Each (group, column) is
// summed by one thread in the order of n, exactly as the CPU's sequential loop, so the result is
// deterministic and bitwise equal to the reference. grid: (groups, ceil(C / blockDim.x)).
extern "C" __global__ void embedding_backward_grouped(float* dtable, const float* dout,
                                                      const unsigned* rows, const unsigned* offsets,
                                                      const unsigned* order, u64 c) {
    u64 j = blockIdx.y * (u64)blockDim.x + threadIdx.x;
    unsigned g = blockIdx.x;
    if (j >= c) return;
    float acc = dtable[(u64)rows[g] * c + j];
    for (unsigned k = offsets[g]; k < offsets[g + 1]; k++) {
        acc += dout[(u64)order[k] * c + j];
    }
    dtable[(u64)rows[g] * c + j] = acc;
}
