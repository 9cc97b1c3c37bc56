// Runs layernorm.cu's backward kernels under the host emulator (shim.h) on random inputs, as the
// engine does (layernorm.rs): the fused kernel for C <= 1024 (layernorm_backward_fused_k*, or
// _bf16dout_k* for a bf16 dout), else the two-pass kernels, then bias.cu's column_sum_finish.
// Each case runs with dout in f32 and in bf16 (values rounded to bf16 first, so that the f64
// reference written here sees what the kernel sees), in both modes (accumulating onto random
// dinp, and overwriting a NaN-filled dinp), and twice: with aligned buffers (the fused kernel's
// float4 / 8-byte bf16 path when C % 4 == 0) and with inp, dout, dinp one element past an
// aligned address (its one-column-at-a-time path). Checks:
//   - dinp (both modes), dw, db within 1e-5 (relative) of the f64 reference;
//   - dinp bitwise equal to the two-pass kernel's (layernorm_backward_input), whose per-lane
//     column order the fused kernel shares;
//   - the two alignments give the same bits (dinp, dw, db): the scalar path owns the same columns;
//   - nothing written outside dinp's rows (canaries after it);
//   - with a dinp_bf16 copy requested (both modes, both paths): dinp the same bits as without
//     it, the copy bitwise equal to dinp rounded to bf16 (shim.h's own rounding), nothing
//     written past the copy; and a copy one element off its 8-byte word while the other
//     buffers are aligned (the fused kernel must leave its vector path).
// Built with -fsanitize=alignment, a float4 / uint2 access through a misaligned pointer aborts.
// Build and run:  g++ -std=c++20 -O2 -pthread -w -fsanitize=alignment -fno-sanitize-recover=all \
//                     layernorm_emu.cpp -o /tmp/layernorm_emu && /tmp/layernorm_emu [C ...]
// (arguments: only the cases with these C; all of them take a few minutes on two cores)
// Exit status: the number of failing cases.
#include "shim.h"
// What bf16.cuh and layernorm.cu use beyond shim.h. The vector types carry CUDA's alignment so
// that the sanitizer sees a misaligned word access.
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
#include "../../engine/src/cuda/kernels/bf16.cuh"
#include "../../engine/src/cuda/kernels/layernorm.cu"
#include "../../engine/src/cuda/kernels/bias.cu"
#include <cstdio>
#include <cstdlib>
#include <random>

typedef unsigned short bf16;
static const int PER = 64;         // ROWS_PER_TASK
static const size_t GUARD = 8;     // canaries after dinp
static const float CANARY = 12345.0f;

// The kernels for dout's element type TG.
template <typename TG> struct Kernels {
    typedef void (*Fused)(float*, unsigned short*, float*, float*, const TG*, const float*, const float*,
                          const float*, const float*, u64, u64, u64, int);
    typedef void (*Input)(float*, unsigned short*, const TG*, const float*, const float*, const float*,
                          const float*, u64, u64);
    typedef void (*Partial)(float*, float*, const TG*, const float*, const float*, const float*, u64, u64, u64);
    Fused fused[5];
    Input input;
    Partial partial;
};
static const Kernels<float> KF = {
    {layernorm_backward_fused_k4, layernorm_backward_fused_k8, layernorm_backward_fused_k16,
     layernorm_backward_fused_k24, layernorm_backward_fused_k32},
    layernorm_backward_input, layernorm_backward_params_partial};
static const Kernels<bf16> KB = {
    {layernorm_backward_fused_bf16dout_k4, layernorm_backward_fused_bf16dout_k8,
     layernorm_backward_fused_bf16dout_k16, layernorm_backward_fused_bf16dout_k24,
     layernorm_backward_fused_bf16dout_k32},
    layernorm_backward_input_bf16dout, layernorm_backward_params_partial_bf16dout};
static const Kernels<float>& kernels(float*) { return KF; }
static const Kernels<bf16>& kernels(bf16*) { return KB; }

// The engine's choice (layernorm.rs): the smallest K with 32 K >= C, none above 1024.
static int pick(int c) {
    const int ks[] = {4, 8, 16, 24, 32};
    for (int i = 0; i < 5; i++)
        if (32 * ks[i] >= c) return i;
    return -1;
}

// ‖a − b‖ / ‖b‖ (‖a − b‖ where b is all zeros).
static double rel(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) { num += (a[i] - b[i]) * (a[i] - b[i]); den += b[i] * b[i]; }
    return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

static float store_as(float v, float*) { return v; }
static bf16 store_as(float v, bf16*) { return f2bf(v); }

// Inputs of one case; dout holds values exact in bf16 when the case runs bf16.
struct Data {
    int n, c;
    std::vector<float> x, dout, w, mean, rstd, dinp0, dw0, db0;
};

// What one run leaves: dinp accumulated onto dinp0, dinp overwritten, dw, db (onto dw0, db0),
// and the two-pass dinp (accumulated, and onto zeros).
struct Result {
    std::vector<float> dinp, dset, dw, db, two_pass, two_pass_set;
    bool canaries_ok = true;
    bool copy_ok = true;  // the runs with a bf16 copy of dinp (see copy_runs)
};

// A buffer of `len` elements starting `off` elements past an aligned address, GUARD canaries
// after, then `room` more elements (so that a kernel writing a block's rows past the end hits the
// canaries, not the heap).
template <typename T> struct Placed {
    std::vector<T> store;
    size_t off, len;
    Placed(size_t len, size_t off, T fill, size_t room) : store(off + len + GUARD + room, fill), off(off), len(len) {}
    T* p() { return store.data() + off; }
    const T* p() const { return store.data() + off; }
    std::vector<T> body() const { return std::vector<T>(store.begin() + off, store.begin() + off + len); }
    bool guard_is(T v) const {
        for (size_t i = off + len; i < off + len + GUARD; i++)
            if (std::memcmp(&store[i], &v, sizeof(T)) != 0) return false;
        return true;
    }
};

// dinp += / = the input gradient and dw, db += the column sums, as layernorm.rs runs them;
// copy (may be null): the final dinp as bf16.
template <typename TG>
static void engine_backward(const Data& d, int accumulate, float* dinp, bf16* copy, float* dw, float* db,
                            const TG* dout, const float* x) {
    const Kernels<TG>& ks = kernels((TG*)nullptr);
    const int n = d.n, c = d.c, chunks = (n + PER - 1) / PER;
    const u64 un = n, uc = c, up = PER, uk = chunks;
    // partials NaN-filled: an unwritten one shows in the sums
    std::vector<float> pdw((size_t)chunks * c, std::nanf("")), pdb(pdw.size(), std::nanf(""));
    const int i = pick(c);
    if (i >= 0) {
        launch({(unsigned)chunks, 1, 1}, 256, [&] {
            ks.fused[i](dinp, copy, pdw.data(), pdb.data(), dout, x, d.w.data(), d.mean.data(), d.rstd.data(), un,
                        uc, up, accumulate);
        });
    } else {
        if (!accumulate) std::fill(dinp, dinp + (size_t)n * c, 0.0f);
        launch({(unsigned)((n + 7) / 8), 1, 1}, 256, [&] {
            ks.input(dinp, copy, dout, x, d.w.data(), d.mean.data(), d.rstd.data(), un, uc);
        });
        launch({(unsigned)chunks, (unsigned)((c + 127) / 128), 1}, 128, [&] {
            ks.partial(pdw.data(), pdb.data(), dout, x, d.mean.data(), d.rstd.data(), un, uc, up);
        });
    }
    launch({(unsigned)((c + 31) / 32), 1, 1}, 256, [&] { column_sum_finish(dw, pdw.data(), uk, uc); });
    launch({(unsigned)((c + 31) / 32), 1, 1}, 256, [&] { column_sum_finish(db, pdb.data(), uk, uc); });
}

// The backward in one mode again, now with a bf16 copy `copy_off` elements past an aligned
// address (dinp, dout, inp `off` past theirs): dinp must be the bits `want` (the run without a
// copy) and the copy dinp rounded to bf16, bit for bit, with its canaries intact.
template <typename TG>
static bool copy_run(const Data& d, int accumulate, size_t off, size_t copy_off, const Placed<TG>& dout,
                     const Placed<float>& x, const std::vector<float>& want) {
    const size_t len = (size_t)d.n * d.c, room = 8 * (size_t)d.c;
    const bf16 CANARY_BF16 = f2bf(CANARY);
    Placed<float> dinp(len, off, CANARY, room);
    Placed<bf16> copy(len, copy_off, CANARY_BF16, room);
    for (size_t i = 0; i < len; i++) {
        dinp.p()[i] = accumulate ? d.dinp0[i] : std::nanf("");
        copy.p()[i] = 0x7fc1;  // a NaN: a value left unwritten shows
    }
    std::vector<float> dw = d.dw0, db = d.db0;
    engine_backward<TG>(d, accumulate, dinp.p(), copy.p(), dw.data(), db.data(), dout.p(), x.p());
    const std::vector<float> got = dinp.body();
    bool rounded = true;
    for (size_t i = 0; i < len; i++) rounded = rounded && copy.p()[i] == f2bf(got[i]);
    const bool ok = same_bits(got, want) && rounded && dinp.guard_is(CANARY) && copy.guard_is(CANARY_BF16);
    if (!ok)
        printf("  copy (%s, dinp +%zu, copy +%zu): dinp %s, copy %s bf16(dinp), canaries %s\n",
               accumulate ? "accumulate" : "overwrite", off, copy_off, same_bits(got, want) ? "==" : "!=",
               rounded ? "==" : "!=", dinp.guard_is(CANARY) && copy.guard_is(CANARY_BF16) ? "ok" : "BAD");
    return ok;
}

// One run with inp, dout and dinp `off` elements past aligned addresses.
template <typename TG>
static Result run(const Data& d, size_t off) {
    const size_t len = (size_t)d.n * d.c;
    const u64 un = d.n, uc = d.c;
    const size_t room = 8 * (size_t)d.c;  // the 8 rows of a block's last round
    Placed<float> x(len, off, 0.0f, room), dinp(len, off, CANARY, room), dset(len, off, CANARY, room),
        two(len, off, CANARY, room), two_set(len, off, CANARY, room);
    Placed<TG> dout(len, off, TG(0), room);
    for (size_t i = 0; i < len; i++) {
        x.p()[i] = d.x[i];
        dout.p()[i] = store_as(d.dout[i], (TG*)nullptr);
        dinp.p()[i] = two.p()[i] = d.dinp0[i];
        dset.p()[i] = std::nanf("");
        two_set.p()[i] = 0.0f;
    }
    Result r;
    r.dw = d.dw0, r.db = d.db0;
    std::vector<float> dw2 = d.dw0, db2 = d.db0;
    engine_backward<TG>(d, 1, dinp.p(), nullptr, r.dw.data(), r.db.data(), dout.p(), x.p());
    engine_backward<TG>(d, 0, dset.p(), nullptr, dw2.data(), db2.data(), dout.p(), x.p());
    // the two-pass input gradient, for the bitwise comparison
    const Kernels<TG>& ks = kernels((TG*)nullptr);
    for (Placed<float>* t : {&two, &two_set})
        launch({(unsigned)((d.n + 7) / 8), 1, 1}, 256, [&] {
            ks.input(t->p(), nullptr, dout.p(), x.p(), d.w.data(), d.mean.data(), d.rstd.data(), un, uc);
        });
    r.dinp = dinp.body(), r.dset = dset.body(), r.two_pass = two.body(), r.two_pass_set = two_set.body();
    // with a bf16 copy: both modes at this alignment, and (aligned runs) a copy off its word
    r.copy_ok = copy_run<TG>(d, 1, off, off, dout, x, r.dinp);
    r.copy_ok = copy_run<TG>(d, 0, off, off, dout, x, r.dset) && r.copy_ok;
    if (off == 0) r.copy_ok = copy_run<TG>(d, 0, 0, 1, dout, x, r.dset) && r.copy_ok;
    // dw, db of the overwrite run: the same partials added onto the same start
    r.canaries_ok = dinp.guard_is(CANARY) && dset.guard_is(CANARY) && same_bits(dw2, r.dw) && same_bits(db2, r.db);
    return r;
}

// Random inputs with the saved statistics a forward pass leaves (f32); dout rounded to bf16 when asked.
static Data make(int n, int c, bool bf16_dout, std::mt19937& rng) {
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    Data d{n, c};
    d.x.resize((size_t)n * c), d.dout.resize(d.x.size()), d.dinp0.resize(d.x.size());
    d.w.resize(c), d.dw0.resize(c), d.db0.resize(c), d.mean.resize(n), d.rstd.resize(n);
    for (auto& v : d.x) v = 3 * U(rng) + 0.5f;
    for (auto& v : d.dout) v = bf16_dout ? bf2f(f2bf(U(rng))) : U(rng);
    for (auto& v : d.w) v = 1 + 0.5f * U(rng);
    for (auto& v : d.dinp0) v = U(rng);
    for (auto& v : d.dw0) v = U(rng);
    for (auto& v : d.db0) v = U(rng);
    for (int r = 0; r < n; r++) {
        double m = 0, var = 0;
        for (int i = 0; i < c; i++) m += d.x[(size_t)r * c + i];
        m /= c;
        for (int i = 0; i < c; i++) var += (d.x[(size_t)r * c + i] - m) * (d.x[(size_t)r * c + i] - m);
        d.mean[r] = (float)m;
        d.rstd[r] = (float)(1 / std::sqrt(var / c + 1e-5));
    }
    return d;
}

// f64 reference gradients (dx alone, dw and db sums alone), with the f32 saved statistics as given.
static void reference(const Data& d, std::vector<double>& rdx, std::vector<double>& rdw, std::vector<double>& rdb) {
    const int n = d.n, c = d.c;
    rdx.assign((size_t)n * c, 0), rdw.assign(c, 0), rdb.assign(c, 0);
    for (int r = 0; r < n; r++) {
        const float* xr = d.x.data() + (size_t)r * c;
        const float* gr = d.dout.data() + (size_t)r * c;
        double dm = 0, dn = 0;
        for (int i = 0; i < c; i++) {
            double xh = ((double)xr[i] - d.mean[r]) * d.rstd[r], dxh = (double)gr[i] * d.w[i];
            dm += dxh, dn += dxh * xh;
            rdw[i] += gr[i] * xh, rdb[i] += gr[i];
        }
        dm /= c, dn /= c;
        for (int i = 0; i < c; i++) {
            double xh = ((double)xr[i] - d.mean[r]) * d.rstd[r], dxh = (double)gr[i] * d.w[i];
            rdx[(size_t)r * c + i] = d.rstd[r] * (dxh - dm - xh * dn);
        }
    }
}

template <typename TG>
static bool check(int n, int c, std::mt19937& rng) {
    const bool is_bf16 = sizeof(TG) == 2;
    const Data d = make(n, c, is_bf16, rng);
    std::vector<double> rdx, rdw, rdb;
    reference(d, rdx, rdw, rdb);
    std::vector<double> edx(rdx.size()), edw(c), edb(c);
    for (size_t i = 0; i < rdx.size(); i++) edx[i] = d.dinp0[i] + rdx[i];
    for (int i = 0; i < c; i++) edw[i] = d.dw0[i] + rdw[i], edb[i] = d.db0[i] + rdb[i];
    const Result a = run<TG>(d, 0), u = run<TG>(d, 1);
    const bool paths = same_bits(a.dinp, u.dinp) && same_bits(a.dset, u.dset) && same_bits(a.dw, u.dw) &&
                       same_bits(a.db, u.db);
    const int k = pick(c);
    printf("rows %4d C %4d dout %s (%s, %d chunks): aligned %s unaligned\n", n, c, is_bf16 ? "bf16" : "f32 ",
           k >= 0 ? (c % 4 == 0 ? "fused, vector/scalar" : "fused, scalar/scalar") : "two-pass",
           (n + PER - 1) / PER, paths ? "==" : "!=");
    bool ok = paths;
    for (const Result* r : {&a, &u}) {
        const double e1 = rel(r->dinp, edx), e2 = rel(r->dset, rdx), e3 = rel(r->dw, edw), e4 = rel(r->db, edb);
        const bool near = e1 < 1e-5 && e2 < 1e-5 && e3 < 1e-5 && e4 < 1e-5 && std::isfinite(e1 + e2 + e3 + e4);
        const bool two = same_bits(r->dinp, r->two_pass) && same_bits(r->dset, r->two_pass_set);
        ok = ok && near && two && r->canaries_ok && r->copy_ok;
        printf("  %s: dinp %.2e set %.2e dw %.2e db %.2e, dinp %s two-pass, canaries and set-mode dw, db %s, "
               "bf16 copy %s\n",
               r == &a ? "aligned  " : "unaligned", e1, e2, e3, e4, two ? "==" : "!=", r->canaries_ok ? "ok" : "BAD",
               r->copy_ok ? "ok" : "BAD");
    }
    printf("  %s\n", ok ? "ok" : "FAIL");
    return ok;
}

int main(int argc, char** argv) {
    // C crossing the vector (C % 4 == 0) and scalar paths and the K buckets (128, 256, 512,
    // 768, 1024), the two-pass path above 1024; rows: short last chunks, one full chunk, fewer
    // rows than warps, many chunks
    struct Case { int rows, c; } cases[] = {{70, 1},   {130, 7},   {64, 64},  {200, 100}, {65, 129},
                                            {129, 768}, {3, 768},  {65, 1000}, {9, 1024}, {1, 33},
                                            {1100, 40}, {70, 1100}, {5, 1030}};
    std::mt19937 rng(11);
    int failures = 0;
    for (auto cs : cases) {
        // arguments, if any: the C values to run (a quicker check)
        bool wanted = argc == 1;
        for (int a = 1; a < argc; a++) wanted = wanted || std::atoi(argv[a]) == cs.c;
        if (!wanted) continue;
        failures += !check<float>(cs.rows, cs.c, rng);
        failures += !check<bf16>(cs.rows, cs.c, rng);
    }
    printf("%d failing\n", failures);
    return failures;
}
