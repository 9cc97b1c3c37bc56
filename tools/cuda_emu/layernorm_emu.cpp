// Runs layernorm.cu's fused backward (layernorm_backward_fused_k*) under the host emulator
// (shim.h) on random inputs, then bias.cu's column_sum_finish as the engine does, and compares
// dinp (accumulated onto random values), dw and db (likewise) with a plain f64 reference written
// here. It also checks that dinp is bitwise that of the two-kernel path
// (layernorm_backward_input), whose per-row order the fused kernel keeps.
// Build and run:  g++ -std=c++20 -O2 -pthread -w layernorm_emu.cpp -o /tmp/layernorm_emu
//                 /tmp/layernorm_emu
// Exit status: the number of failing cases.
#include "shim.h"
// bf16.cuh's bit casts (layernorm.cu's bf16-output forward and bias.cu use its helpers)
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
struct uint2 { unsigned x, y; };
#include "../../engine/src/cuda/kernels/bf16.cuh"
#include "../../engine/src/cuda/kernels/layernorm.cu"
#include "../../engine/src/cuda/kernels/bias.cu"
#include <cstdio>
#include <random>

typedef void (*FusedKernel)(float*, float*, float*, const float*, const float*, const float*,
                            const float*, const float*, u64, u64, u64, int);

// The engine's choice (layernorm.rs): the smallest K with 32 K >= C.
static FusedKernel pick(int c, int& k) {
    const int ks[] = {4, 8, 16, 24, 32};
    const FusedKernel fs[] = {layernorm_backward_fused_k4, layernorm_backward_fused_k8,
                              layernorm_backward_fused_k16, layernorm_backward_fused_k24,
                              layernorm_backward_fused_k32};
    for (int i = 0; i < 5; i++)
        if (32 * ks[i] >= c) { k = ks[i]; return fs[i]; }
    return nullptr;
}

static double rel(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) { num += (a[i] - b[i]) * (a[i] - b[i]); den += b[i] * b[i]; }
    return std::sqrt(num / den);
}

struct Case { int rows, c; };

int main() {
    const int per = 64;  // ROWS_PER_TASK
    // short last chunks, one full chunk, C at and between the K buckets, fewer rows than warps
    Case cases[] = {{130, 96}, {64, 768}, {200, 1000}, {3, 40}, {70, 256}, {65, 500}, {9, 1024}, {1, 33}, {1100, 40}};
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    int failures = 0;
    for (auto cs : cases) {
        const int n = cs.rows, c = cs.c, chunks = (n + per - 1) / per;
        std::vector<float> x((size_t)n * c), dout(x.size()), w(c), mean(n), rstd(n);
        for (auto& v : x) v = 3 * U(rng) + 0.5f;
        for (auto& v : dout) v = U(rng);
        for (auto& v : w) v = 1 + 0.5f * U(rng);
        // saved statistics as the forward pass would leave them (f32)
        for (int r = 0; r < n; r++) {
            double m = 0, var = 0;
            for (int i = 0; i < c; i++) m += x[(size_t)r * c + i];
            m /= c;
            for (int i = 0; i < c; i++) var += (x[(size_t)r * c + i] - m) * (x[(size_t)r * c + i] - m);
            mean[r] = (float)m;
            rstd[r] = (float)(1 / std::sqrt(var / c + 1e-5));
        }
        // reference (f64), with the f32 saved statistics as given
        std::vector<double> rdx(x.size()), rdw(c), rdb(c);
        for (int r = 0; r < n; r++) {
            const float* xr = x.data() + (size_t)r * c;
            const float* gr = dout.data() + (size_t)r * c;
            double dm = 0, dn = 0;
            for (int i = 0; i < c; i++) {
                double xh = ((double)xr[i] - mean[r]) * rstd[r], dxh = (double)gr[i] * w[i];
                dm += dxh; dn += dxh * xh;
                rdw[i] += gr[i] * xh; rdb[i] += gr[i];
            }
            dm /= c; dn /= c;
            for (int i = 0; i < c; i++) {
                double xh = ((double)xr[i] - mean[r]) * rstd[r], dxh = (double)gr[i] * w[i];
                rdx[(size_t)r * c + i] = rstd[r] * (dxh - dm - xh * dn);
            }
        }
        // gradients start from random values: the backward pass accumulates
        std::vector<float> dinp(x.size()), dw(c), db(c);
        for (auto& v : dinp) v = U(rng);
        for (auto& v : dw) v = U(rng);
        for (auto& v : db) v = U(rng);
        std::vector<float> dinp0 = dinp, dinp2 = dinp;
        std::vector<double> edx(x.size()), edw(c), edb(c);
        for (size_t i = 0; i < x.size(); i++) edx[i] = dinp[i] + rdx[i];
        for (int i = 0; i < c; i++) { edw[i] = dw[i] + rdw[i]; edb[i] = db[i] + rdb[i]; }
        // kernels: the fused pass into NaN-filled partials, then column_sum_finish for each
        int k = 0;
        FusedKernel f = pick(c, k);
        std::vector<float> pdw((size_t)chunks * c, std::nanf("")), pdb(pdw.size(), std::nanf(""));
        const u64 un = n, uc = c, up = per;
        launch({(unsigned)chunks, 1, 1}, 256, [&] {
            f(dinp.data(), pdw.data(), pdb.data(), dout.data(), x.data(), w.data(), mean.data(),
              rstd.data(), un, uc, up, 1);
        });
        // overwrite mode (accumulate = 0) over a NaN-filled dinp: exactly the gradient alone
        std::vector<float> dset(x.size(), std::nanf("")), pdw2(pdw.size()), pdb2(pdb.size());
        launch({(unsigned)chunks, 1, 1}, 256, [&] {
            f(dset.data(), pdw2.data(), pdb2.data(), dout.data(), x.data(), w.data(), mean.data(),
              rstd.data(), un, uc, up, 0);
        });
        const u64 uk = chunks;
        launch({(unsigned)((c + 31) / 32), 1, 1}, 256, [&] { column_sum_finish(dw.data(), pdw.data(), uk, uc); });
        launch({(unsigned)((c + 31) / 32), 1, 1}, 256, [&] { column_sum_finish(db.data(), pdb.data(), uk, uc); });
        // the two-kernel path's input gradient, for the bitwise comparison
        launch({(unsigned)((n + 7) / 8), 1, 1}, 256, [&] {
            layernorm_backward_input(dinp2.data(), dout.data(), x.data(), w.data(), mean.data(), rstd.data(), un, uc);
        });
        std::vector<float> gx(x.size());  // gradient only (the stricter measure)
        for (size_t i = 0; i < x.size(); i++) gx[i] = dinp[i] - dinp0[i];
        double e1 = rel(dinp, edx), e2 = rel(dset, rdx), e3 = rel(dw, edw), e4 = rel(db, edb);
        const bool same = std::memcmp(dinp.data(), dinp2.data(), dinp.size() * 4) == 0;
        const bool ok = e1 < 1e-5 && e2 < 1e-5 && e3 < 1e-5 && e4 < 1e-5 && std::isfinite(e1 + e2 + e3 + e4) && same;
        failures += !ok;
        printf("rows %4d C %4d (K %2d, %d chunks): dinp %.2e set %.2e dw %.2e db %.2e, dinp %s two-kernel path %s\n",
               n, c, k, chunks, e1, e2, e3, e4, same ? "==" : "!=", ok ? "ok" : "FAIL");
    }
    return failures;
}
