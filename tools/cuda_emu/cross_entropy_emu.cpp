// Runs cross_entropy.cu's kernels under the host emulator (shim.h) on random logits and compares
// losses, lse and the in-place gradients with a plain f64 reference written here, for bf16 and f32
// logits. Each shape runs with the logits starting 0..3 elements past an aligned address, so that
// every row head length (0..3 elements before the first aligned 4-element word) and every tail
// length occurs; the buffers have canaries on both sides. Built with -fsanitize=alignment, a
// vector load or store through a misaligned uint2 / float4 pointer aborts the run.
// Build and run:  g++ -std=c++20 -O2 -pthread -w -fsanitize=alignment -fno-sanitize-recover=all \
//                     cross_entropy_emu.cpp -o /tmp/cross_entropy_emu && /tmp/cross_entropy_emu
// Exit status: the number of failing checks.
#include "shim.h"
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

// What bf16.cuh and cross_entropy.cu use beyond shim.h. The vector types carry CUDA's alignment
// so that the sanitizer sees a misaligned word access.
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
// x86-64 SSE arithmetic rounds each operation to f32 (no contraction without -mfma).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
// Static shared arrays: one copy for the block (blocks run one at a time), not one per thread.
#undef __shared__
#define __shared__ static
#include "../../engine/src/cuda/kernels/bf16.cuh"
#include "../../engine/src/cuda/kernels/cross_entropy.cu"

static const unsigned THREADS = 512;  // as cross_entropy.rs launches
static const size_t GUARD = 8;        // canary elements on each side of the logits

struct Case { int rows; u64 v; float shift; float dloss; };

// Logits of one element type in an over-aligned buffer: GUARD canaries, `offset` more, the
// (rows, v) logits, GUARD canaries.
template <typename T>
struct Buf {
    static constexpr unsigned short CANARY16 = 0x5a5a;
    size_t offset, n;
    T* base;
    Buf(size_t offset, size_t n) : offset(offset), n(n) {
        base = (T*)std::aligned_alloc(64, ((2 * GUARD + offset + n) * sizeof(T) + 63) / 64 * 64);
        for (size_t i = 0; i < 2 * GUARD + offset + n; i++) base[i] = canary();
    }
    ~Buf() { std::free(base); }
    static T canary() {
        T c;
        if constexpr (sizeof(T) == 2) c = CANARY16; else c = __int_as_float(0x5a5a5a5au);
        return c;
    }
    T* data() { return base + GUARD + offset; }
    bool canaries_ok() const {
        for (size_t i = 0; i < 2 * GUARD + offset + n; i++) {
            bool inside = i >= GUARD + offset && i < GUARD + offset + n;
            T c = canary();
            if (!inside && std::memcmp(&base[i], &c, sizeof(T)) != 0) return false;
        }
        return true;
    }
};

static float to_f(unsigned short h) { return bf2f(h); }
static float to_f(float f) { return f; }
static void from_f(float x, unsigned short& h) { h = f2bf(x); }
static void from_f(float x, float& f) { f = x; }

static int failures = 0;
static void check(bool ok, const std::string& what) {
    if (!ok) {
        failures++;
        std::printf("  FAIL %s\n", what.c_str());
    }
}

template <typename T>
static void run_forward(float* losses, float* lse, const T* x, const unsigned* t, u64 v, unsigned* err) {
    if constexpr (sizeof(T) == 2) cross_entropy_forward_bf16(losses, lse, x, t, v, err);
    else cross_entropy_forward(losses, lse, x, t, v, err);
}
template <typename T>
static void run_backward(T* x, const float* lse, const unsigned* t, float dloss, u64 v) {
    if constexpr (sizeof(T) == 2) cross_entropy_backward_in_place_bf16(x, lse, t, dloss, v);
    else cross_entropy_backward_in_place(x, lse, t, dloss, v);
}

// One shape at one misalignment: forward, then the in-place backward with the kernel's lse (as
// the engine does); for f32 also the accumulating backward into zeros, which must equal the
// in-place result bitwise (op_gradcheck.rs asserts the same on a card).
template <typename T>
static void run_case(const Case& cs, size_t offset, std::mt19937& rng) {
    const bool bf = sizeof(T) == 2;
    const int rows = cs.rows;
    const u64 v = cs.v;
    const size_t n = (size_t)rows * v;
    char name[96];
    std::snprintf(name, sizeof name, "%s rows %d v %llu shift %g offset %zu", bf ? "bf16" : "f32", rows,
                  (unsigned long long)v, cs.shift, offset);
    std::normal_distribution<float> N(0.f, 3.f);
    // targets: ignored rows, the first and last element (head and tail), an out-of-range one
    std::vector<unsigned> targets(rows);
    for (int r = 0; r < rows; r++) {
        if (r % 3 == 1) targets[r] = IGNORE_INDEX;
        else if (r == 0) targets[r] = 0;
        else if (r == 2) targets[r] = (unsigned)(v - 1);
        else targets[r] = (unsigned)(rng() % v);
    }
    const bool oor = rows >= 4;
    if (oor) targets[3] = (unsigned)v;
    Buf<T> logits(offset, n);
    std::vector<float> held(n);  // what the kernels read
    for (size_t i = 0; i < n; i++) {
        from_f(N(rng) + cs.shift, logits.data()[i]);
        held[i] = to_f(logits.data()[i]);
    }
    // f64 reference
    std::vector<double> rlse(rows);
    for (int r = 0; r < rows; r++) {
        const float* x = held.data() + (size_t)r * v;
        double mx = -INFINITY, sum = 0;
        for (u64 i = 0; i < v; i++) mx = std::max(mx, (double)x[i]);
        for (u64 i = 0; i < v; i++) sum += std::exp(x[i] - mx);
        rlse[r] = mx + std::log(sum);
    }

    std::vector<float> losses(rows, 7.0f), lse(rows, 7.0f);
    unsigned err = 0;
    launch({(unsigned)rows, 1, 1}, THREADS, [&] { run_forward(losses.data(), lse.data(), (const T*)logits.data(), targets.data(), v, &err); });
    double worst_loss = 0, worst_lse = 0;
    for (int r = 0; r < rows; r++) {
        double el = std::abs(lse[r] - rlse[r]) / std::max(std::abs(rlse[r]), 1.0);
        worst_lse = std::max(worst_lse, el);
        check(el < 1e-5, std::string(name) + ": lse row " + std::to_string(r));
        unsigned t = targets[r];
        if (t == IGNORE_INDEX || t >= v) {
            check(losses[r] == 0.0f, std::string(name) + ": loss of ignored / out-of-range row " + std::to_string(r));
        } else {
            double want = rlse[r] - held[(size_t)r * v + t];
            double e = std::abs(losses[r] - want) / std::abs(want);
            worst_loss = std::max(worst_loss, e);
            check(e < 1e-5, std::string(name) + ": loss row " + std::to_string(r));
        }
    }
    check(err == (oor ? ERR_TARGET : 0u), std::string(name) + ": error word " + std::to_string(err));

    // in-place backward
    const float dloss = cs.dloss;
    launch({(unsigned)rows, 1, 1}, THREADS, [&] { run_backward(logits.data(), lse.data(), targets.data(), dloss, v); });
    const double rel = bf ? 1.0 / 256 : 1e-5;
    double worst_g = 0;
    int bad = 0;
    for (int r = 0; r < rows; r++) {
        unsigned t = targets[r];
        for (u64 i = 0; i < v; i++) {
            size_t k = (size_t)r * v + i;
            float got = to_f(logits.data()[k]);
            double want = (t == IGNORE_INDEX || t >= v) ? 0.0 : dloss * (std::exp(held[k] - rlse[r]) - (i == t ? 1.0 : 0.0));
            bool zero_row = t == IGNORE_INDEX || t >= v;
            bool ok = zero_row ? __float_as_uint(got) == 0u : std::abs(got - want) <= rel * std::abs(want) + 1e-12;
            if (!zero_row && want != 0) worst_g = std::max(worst_g, std::abs(got - want) / std::abs(want));
            if (!ok && bad++ < 3)
                std::printf("  row %d elem %llu: got %.9g want %.9g\n", r, (unsigned long long)i, got, want);
        }
    }
    check(bad == 0, std::string(name) + ": " + std::to_string(bad) + " bad gradients");
    check(logits.canaries_ok(), std::string(name) + ": canary overwritten");

    if constexpr (sizeof(T) == 4) {
        Buf<float> src(offset, n), acc(offset, n);
        for (size_t i = 0; i < n; i++) { src.data()[i] = held[i]; acc.data()[i] = 0.0f; }
        launch({(unsigned)rows, 1, 1}, THREADS, [&] { cross_entropy_backward(acc.data(), src.data(), lse.data(), targets.data(), dloss, v); });
        check(std::memcmp(acc.data(), logits.data(), n * 4) == 0, std::string(name) + ": in-place != accumulating into zeros");
    }
    std::printf("%-48s loss rel err %.2e, lse %.2e, grad max rel err %.2e\n", name, worst_loss, worst_lse, worst_g);
}

int main() {
    // odd vocabularies (every row starts at another alignment), GPT-2's, BERT's, a multiple of 4,
    // one shorter than a word, and large logits (exp overflows unless the maximum is subtracted)
    Case cases[] = {
        {5, 1001, 0.f, 0.37f}, {3, 50257, 0.f, 0.37f}, {4, 30522, 0.f, 0.37f},
        {2, 64, 0.f, 0.37f},   {2, 3, 0.f, 0.37f},     {4, 517, 100.f, -0.5f},
    };
    std::mt19937 rng(5);
    for (const Case& cs : cases)
        for (size_t offset = 0; offset < 4; offset++) {
            run_case<unsigned short>(cs, offset, rng);
            run_case<float>(cs, offset, rng);
        }
    std::printf("%d failing checks\n", failures);
    return failures;
}
