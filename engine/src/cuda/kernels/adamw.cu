// Fused AdamW over a range of the flat buffers (PyTorch semantics, decoupled weight decay),
// the same arithmetic in the same order as the CPU reference (engine/src/cpu/adamw.rs).

typedef unsigned long long u64;

// One element's update: the CPU reference's operations in its order, each rounded on its own
// (explicit _rn intrinsics: no fused multiply-add, whose contraction the compiler would choose
// per call site), so every kernel here gives the same bits as the others and as the CPU. m and v
// are updated in place; returns the new parameter.
__device__ __forceinline__ float adamw_elem(float p, float grad, float& m, float& v, float lr, float beta1, float beta2,
                                            float eps, float wd, float grad_scale, float bc1, float bc2) {
    const float g = __fmul_rn(grad, grad_scale);
    p = __fsub_rn(p, __fmul_rn(__fmul_rn(lr, wd), p));
    m = __fadd_rn(__fmul_rn(beta1, m), __fmul_rn(__fsub_rn(1.0f, beta1), g));
    v = __fadd_rn(__fmul_rn(beta2, v), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, beta2), g), g));
    const float mhat = __fdiv_rn(m, bc1);
    const float vhat = __fdiv_rn(v, bc2);
    return __fsub_rn(p, __fdiv_rn(__fmul_rn(lr, mhat), __fadd_rn(__fsqrt_rn(vhat), eps)));
}

// The run holding element i: the first whose end offset lies past i (binary search over the
// runs' end offsets, a few dozen, cached).
__device__ __forceinline__ unsigned run_of(const unsigned* ends, unsigned nruns, u64 i) {
    unsigned lo = 0, hi = nruns - 1;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if ((u64)ends[mid] > i) hi = mid; else lo = mid + 1;
    }
    return lo;
}

// bc1 = 1 - beta1^t and bc2 = 1 - beta2^t are computed on the host, in f32, as the CPU does.
extern "C" __global__ void adamw_update(float* p, const float* grads, float* m, float* v, u64 n,
                                        float lr, float beta1, float beta2, float eps, float wd,
                                        float grad_scale, float bc1, float bc2) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float mi = m[i], vi = v[i];
        const float np = adamw_elem(p[i], grads[i], mi, vi, lr, beta1, beta2, eps, wd, grad_scale, bc1, bc2);
        m[i] = mi;
        v[i] = vi;
        p[i] = np;
    }
}

// Element i of the flat buffers, with the weight decay of the run holding it (and its shadow
// value, when p_bf16 is not null).
__device__ __forceinline__ void adamw_runs_one(float* p, unsigned short* p_bf16, const float* grads, float* m, float* v,
                                               u64 i, const unsigned* ends, const float* decay, unsigned nruns,
                                               float lr, float beta1, float beta2, float eps, float grad_scale,
                                               float bc1, float bc2) {
    const float wd = decay[run_of(ends, nruns, i)];
    float mi = m[i], vi = v[i];
    const float np = adamw_elem(p[i], grads[i], mi, vi, lr, beta1, beta2, eps, wd, grad_scale, bc1, bc2);
    m[i] = mi;
    v[i] = vi;
    p[i] = np;
    if (p_bf16) p_bf16[i] = f32_to_bf16_rne(np);
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
        adamw_runs_one(p, p_bf16, grads, m, v, i, ends, decay, nruns, lr, beta1, beta2, eps, grad_scale, bc1, bc2);
    }
}

// adamw_update_runs four elements per thread: 16-byte accesses to p, grads, m and v and an
// 8-byte one to the shadow (p, grads, m, v 16-byte aligned, p_bf16 8-byte aligned or null; the
// host checks), one run search per four elements (runs are long: the next element's run is the
// same or the next few). Element by element the same arithmetic (adamw_elem), so the same bits.
// The n % 4 elements past the last whole word are done one by one by the first threads.
extern "C" __global__ void adamw_update_runs_x4(float* p, unsigned short* p_bf16, const float* grads, float* m,
                                                float* v, u64 n, const unsigned* ends, const float* decay,
                                                unsigned nruns, float lr, float beta1, float beta2, float eps,
                                                float grad_scale, float bc1, float bc2) {
    const u64 stride = (u64)gridDim.x * blockDim.x, tid = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    const u64 n4 = n / 4;
    for (u64 w = tid; w < n4; w += stride) {
        const u64 i0 = 4 * w;
        unsigned r = run_of(ends, nruns, i0);
        const float4 pv = ((const float4*)p)[w], gv = ((const float4*)grads)[w];
        const float4 mv = ((const float4*)m)[w], vv = ((const float4*)v)[w];
        float pa[4] = {pv.x, pv.y, pv.z, pv.w}, ga[4] = {gv.x, gv.y, gv.z, gv.w};
        float ma[4] = {mv.x, mv.y, mv.z, mv.w}, va[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            while (r + 1 < nruns && (u64)ends[r] <= i0 + k) r++;  // a run may end inside the word
            pa[k] = adamw_elem(pa[k], ga[k], ma[k], va[k], lr, beta1, beta2, eps, decay[r], grad_scale, bc1, bc2);
        }
        float4 po, mo, vo;
        po.x = pa[0]; po.y = pa[1]; po.z = pa[2]; po.w = pa[3];
        mo.x = ma[0]; mo.y = ma[1]; mo.z = ma[2]; mo.w = ma[3];
        vo.x = va[0]; vo.y = va[1]; vo.z = va[2]; vo.w = va[3];
        ((float4*)p)[w] = po;
        ((float4*)m)[w] = mo;
        ((float4*)v)[w] = vo;
        if (p_bf16) ((uint2*)p_bf16)[w] = bf16x4_pack(pa);
    }
    const u64 i = 4 * n4 + tid;  // the tail
    if (i < n) {
        adamw_runs_one(p, p_bf16, grads, m, v, i, ends, decay, nruns, lr, beta1, beta2, eps, grad_scale, bc1, bc2);
    }
}
