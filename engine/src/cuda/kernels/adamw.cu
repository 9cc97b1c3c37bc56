// Fused AdamW over a range of the flat buffers (PyTorch semantics, decoupled weight decay),
// the same arithmetic in the same order as the CPU reference (engine/src/cpu/adamw.rs).

typedef unsigned long long u64;

// bc1 = 1 - beta1^t and bc2 = 1 - beta2^t are computed on the host, in f32, as the CPU does.
extern "C" __global__ void adamw_update(float* p, const float* grads, float* m, float* v, u64 n,
                                        float lr, float beta1, float beta2, float eps, float wd,
                                        float grad_scale, float bc1, float bc2) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float g = grads[i] * grad_scale;
        float pi = p[i];
        pi -= lr * wd * pi;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1;
        float vhat = vi / bc2;
        p[i] = pi - lr * mhat / (sqrtf(vhat) + eps);
    }
}

// The whole flat buffer in one launch: element i's weight decay is that of the run holding it,
// found by binary search over the runs' end offsets (a few dozen, cached). Otherwise the same
// arithmetic as adamw_update, so the two give the same bits.
// p_bf16 (null: none) is the bf16 shadow of p the matmuls read (shadow.rs): every new value is
// written there too, rounded as the matmuls' own conversion (f32_to_bf16_rne, bf16.cuh).
extern "C" __global__ void adamw_update_runs(float* p, unsigned short* p_bf16, const float* grads, float* m, float* v,
                                             u64 n, const unsigned* ends, const float* decay, unsigned nruns,
                                             float lr, float beta1, float beta2, float eps,
                                             float grad_scale, float bc1, float bc2) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        unsigned lo = 0, hi = nruns - 1;
        while (lo < hi) {
            unsigned mid = (lo + hi) / 2;
            if ((u64)ends[mid] > i) hi = mid; else lo = mid + 1;
        }
        float wd = decay[lo];
        float g = grads[i] * grad_scale;
        float pi = p[i];
        pi -= lr * wd * pi;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1;
        float vhat = vi / bc2;
        float np = pi - lr * mhat / (sqrtf(vhat) + eps);
        p[i] = np;
        if (p_bf16) p_bf16[i] = f32_to_bf16_rne(np);
    }
}
