// Runs cross_entropy.cu's kernels under the host emulator (shim.h) on random logits and compares
// losses, lse and the in-place gradients with a plain f64 reference written here, for bf16 and f32
// logits; the fused forward + in-place backward (cross_entropy_fused[_bf16]) against the same
// reference and bitwise against the two kernels, with warp 0 made to lag behind the other warps
// after its broadcast. Each shape runs with the logits starting 0..3 elements past an aligned
// address, so that every row head length (0..3 elements before the first aligned 4-element word)
// and every tail length occurs; the buffers have canaries on both sides. Built with -fsanitize=alignment, a
// vector load or store through a misaligned uint2 / float4 pointer aborts the run.
// Build and run:  g++ -std=c++20 -O2 -pthread -w -fsanitize=alignment -fno-sanitize-recover=all \
//                     cross_entropy_emu.cpp -o /tmp/cross_entropy_emu && /tmp/cross_entropy_emu
// Arguments: vocabulary sizes to run, e.g. `/tmp/cross_entropy_emu 5 30522` (default: all cases).
// Exit status: the number of failing checks.
// its own warp-local __shfl_sync below
#define SMELT_EMU_OWN_SHFL_SYNC 1
#include "shim.h"
#include <atomic>
#include <chrono>
#include <deque>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

// What bf16.cuh and cross_entropy.cu use beyond shim.h. The vector types carry CUDA's alignment
// so that the sanitizer sees a misaligned word access.
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
// x86-64 SSE arithmetic rounds each operation to f32 (no contraction without -mfma).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
// Warp-local, as on the GPU (the fused kernel's broadcast after block_lse): the 32 lanes of a warp
// meet at their own barrier, so the other warps run on into the backward's writes meanwhile.
// Warp 0 then pauses, so that a read of the row by thread 0 after its broadcast sees those writes
// (the race the fused kernel avoids by reading the target's logit before block_lse's barrier).
static std::barrier<>& warp_barrier(unsigned warp) {
    static std::deque<std::barrier<>> bars = [] {
        std::deque<std::barrier<>> d;
        for (int w = 0; w < 32; w++) d.emplace_back(32);
        return d;
    }();
    return bars[warp];
}
static float g_warp_xch[1024];
inline float __shfl_sync(unsigned, float v, int src) {
    unsigned t = threadIdx.x, warp = t >> 5;
    g_warp_xch[t] = v;
    warp_barrier(warp).arrive_and_wait();
    float r = g_warp_xch[(t & ~31u) + (unsigned)src];
    warp_barrier(warp).arrive_and_wait();
    if (warp == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    return r;
}
// Static shared arrays: one copy for the block (blocks run one at a time), not one per thread.
#undef __shared__
#define __shared__ static
#include "../../engine/src/cuda/kernels/bf16.cuh"
#include "../../engine/src/cuda/kernels/cross_entropy.cu"

static const unsigned THREADS = 512;  // as cross_entropy.rs launches (CE_FUSED_THREADS too)
static_assert(THREADS == CE_FUSED_THREADS);
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

template <typename T>
static void run_fused(float* losses, float* lse, T* x, const unsigned* t, float dloss, u64 v, unsigned* err) {
    if constexpr (sizeof(T) == 2) cross_entropy_fused_bf16(losses, lse, x, t, dloss, v, err);
    else cross_entropy_fused(losses, lse, x, t, dloss, v, err);
}

// What one path (two kernels or fused) produced.
template <typename T>
struct Outputs {
    std::vector<float> losses, lse;
    unsigned err = 0;
    const Buf<T>* grads;  // the logits buffer, overwritten by the gradient
};

// The rows of one case and their f64 reference.
struct Reference {
    std::vector<unsigned> targets;
    std::vector<float> held;  // the logits as the kernels read them
    std::vector<double> lse;
    bool oor;                 // row 3's target is out of range
};

// Checks one path's losses, lse, error word and gradients against the f64 reference.
template <typename T>
static void check_reference(const std::string& name, const Case& cs, const Reference& ref, const Outputs<T>& out) {
    const bool bf = sizeof(T) == 2;
    const int rows = cs.rows;
    const u64 v = cs.v;
    double worst_loss = 0, worst_lse = 0;
    for (int r = 0; r < rows; r++) {
        double el = std::abs(out.lse[r] - ref.lse[r]) / std::max(std::abs(ref.lse[r]), 1.0);
        worst_lse = std::max(worst_lse, el);
        check(el < 1e-5, name + ": lse row " + std::to_string(r));
        unsigned t = ref.targets[r];
        if (t == IGNORE_INDEX || t >= v) {
            check(out.losses[r] == 0.0f, name + ": loss of ignored / out-of-range row " + std::to_string(r));
        } else {
            double want = ref.lse[r] - ref.held[(size_t)r * v + t];
            // relative, but absolute near 0 (V = 1: the loss is exactly 0)
            double e = std::abs(out.losses[r] - want) / std::max(std::abs(want), 1e-3);
            worst_loss = std::max(worst_loss, e);
            check(e < 1e-5, name + ": loss row " + std::to_string(r));
        }
    }
    check(out.err == (ref.oor ? ERR_TARGET : 0u), name + ": error word " + std::to_string(out.err));

    const float dloss = cs.dloss;
    const double rel = bf ? 1.0 / 256 : 1e-5;
    double worst_g = 0;
    int bad = 0;
    const T* g = out.grads->base + GUARD + out.grads->offset;
    for (int r = 0; r < rows; r++) {
        unsigned t = ref.targets[r];
        bool zero_row = t == IGNORE_INDEX || t >= v;
        for (u64 i = 0; i < v; i++) {
            size_t k = (size_t)r * v + i;
            float got = to_f(g[k]);
            double want = zero_row ? 0.0 : dloss * (std::exp(ref.held[k] - ref.lse[r]) - (i == t ? 1.0 : 0.0));
            bool ok = zero_row ? __float_as_uint(got) == 0u : std::abs(got - want) <= rel * std::abs(want) + 1e-12;
            if (!zero_row && want != 0) worst_g = std::max(worst_g, std::abs(got - want) / std::abs(want));
            if (!ok && bad++ < 3)
                std::printf("  row %d elem %llu: got %.9g want %.9g\n", r, (unsigned long long)i, got, want);
        }
    }
    check(bad == 0, name + ": " + std::to_string(bad) + " bad gradients");
    check(out.grads->canaries_ok(), name + ": canary overwritten");
    std::printf("%-58s loss rel err %.2e, lse %.2e, grad max rel err %.2e\n", name.c_str(), worst_loss, worst_lse, worst_g);
}

// Whether the fused kernel's outputs are the two kernels' bit for bit.
template <typename T>
static void check_same_bits(const std::string& name, const Outputs<T>& fused, const Outputs<T>& two, size_t n) {
    const int rows = (int)two.losses.size();
    check(std::memcmp(fused.losses.data(), two.losses.data(), rows * 4) == 0, name + ": losses differ from the two kernels'");
    check(std::memcmp(fused.lse.data(), two.lse.data(), rows * 4) == 0, name + ": lse differs from the two kernels'");
    check(fused.err == two.err, name + ": error word differs from the two kernels'");
    const T* a = fused.grads->base + GUARD + fused.grads->offset;
    const T* b = two.grads->base + GUARD + two.grads->offset;
    size_t diff = 0;
    for (size_t i = 0; i < n; i++) diff += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
    check(diff == 0, name + ": " + std::to_string(diff) + " gradients differ from the two kernels'");
}

// One shape at one misalignment: forward, then the in-place backward with the kernel's lse (as
// the engine does); for f32 also the accumulating backward into zeros, which must equal the
// in-place result bitwise (op_gradcheck.rs asserts the same on a card). Then the fused kernel on
// the same logits.
template <typename T>
static void run_case(const Case& cs, size_t offset, std::mt19937& rng) {
    const bool bf = sizeof(T) == 2;
    const int rows = cs.rows;
    const u64 v = cs.v;
    const size_t n = (size_t)rows * v;
    char buf[96];
    std::snprintf(buf, sizeof buf, "%s rows %d v %llu shift %g offset %zu", bf ? "bf16" : "f32", rows,
                  (unsigned long long)v, cs.shift, offset);
    const std::string name = buf;
    std::normal_distribution<float> N(0.f, 3.f);
    // targets: ignored rows, the first and last element (head and tail), an out-of-range one
    Reference ref;
    ref.targets.resize(rows);
    for (int r = 0; r < rows; r++) {
        if (r % 3 == 1) ref.targets[r] = IGNORE_INDEX;
        else if (r == 0) ref.targets[r] = 0;
        else if (r == 2) ref.targets[r] = (unsigned)(v - 1);
        else ref.targets[r] = (unsigned)(rng() % v);
    }
    ref.oor = rows >= 4;
    if (ref.oor) ref.targets[3] = (unsigned)v;
    Buf<T> logits(offset, n);
    ref.held.resize(n);
    for (size_t i = 0; i < n; i++) {
        from_f(N(rng) + cs.shift, logits.data()[i]);
        ref.held[i] = to_f(logits.data()[i]);
    }
    const std::vector<T> original(logits.data(), logits.data() + n);
    // f64 reference
    ref.lse.resize(rows);
    for (int r = 0; r < rows; r++) {
        const float* x = ref.held.data() + (size_t)r * v;
        double mx = -INFINITY, sum = 0;
        for (u64 i = 0; i < v; i++) mx = std::max(mx, (double)x[i]);
        for (u64 i = 0; i < v; i++) sum += std::exp(x[i] - mx);
        ref.lse[r] = mx + std::log(sum);
    }
    const unsigned* t = ref.targets.data();
    const float dloss = cs.dloss;

    // the two kernels: forward, then the in-place backward
    Outputs<T> two{std::vector<float>(rows, 7.0f), std::vector<float>(rows, 7.0f), 0, &logits};
    launch({(unsigned)rows, 1, 1}, THREADS, [&] { run_forward(two.losses.data(), two.lse.data(), (const T*)logits.data(), t, v, &two.err); });
    launch({(unsigned)rows, 1, 1}, THREADS, [&] { run_backward(logits.data(), two.lse.data(), t, dloss, v); });
    check_reference(name + " two kernels", cs, ref, two);

    if constexpr (sizeof(T) == 4) {
        Buf<float> src(offset, n), acc(offset, n);
        for (size_t i = 0; i < n; i++) { src.data()[i] = ref.held[i]; acc.data()[i] = 0.0f; }
        launch({(unsigned)rows, 1, 1}, THREADS, [&] { cross_entropy_backward(acc.data(), src.data(), two.lse.data(), t, dloss, v); });
        check(std::memcmp(acc.data(), logits.data(), n * 4) == 0, name + ": in-place != accumulating into zeros");
    }

    // the fused kernel on the same logits
    Buf<T> fl(offset, n);
    std::memcpy(fl.data(), original.data(), n * sizeof(T));
    Outputs<T> fused{std::vector<float>(rows, 7.0f), std::vector<float>(rows, 7.0f), 0, &fl};
    launch({(unsigned)rows, 1, 1}, THREADS,
           [&] { run_fused(fused.losses.data(), fused.lse.data(), fl.data(), t, dloss, v, &fused.err); });
    const std::string fname = name + " fused";
    check_reference(fname, cs, ref, fused);
    check_same_bits(fname, fused, two, n);
}

// Arguments: vocabulary sizes to run (default: every case).
int main(int argc, char** argv) {
    // odd vocabularies (every row starts at another alignment), GPT-2's (and padded to a multiple
    // of 64), BERT's, T5's, a multiple of 4, shorter than a word, one element, large logits (exp
    // overflows unless the maximum is subtracted), and logits shifted so that lse is near 0 (its
    // ulp is then small enough for a change in the order of the sum to show in its bits); rows of
    // under one word per thread (1001) to several CE_UNROLL groups per thread (70001). The 8 rows
    // of 1001 have random targets besides the first and the last element, mostly held by other
    // warps than thread 0's (the fused kernel's race, see __shfl_sync above).
    Case cases[] = {
        {8, 1001, 0.f, 0.37f}, {3, 50257, 0.f, 0.37f}, {3, 50304, 0.f, 0.37f}, {4, 30522, 0.f, 0.37f},
        {4, 50304, -15.3f, 0.37f}, {4, 30522, -14.8f, 0.37f},
        {4, 32128, 0.f, 0.37f}, {2, 64, 0.f, 0.37f},   {2, 3, 0.f, 0.37f},     {5, 5, 0.f, 0.37f},
        {4, 1, 0.f, 0.37f},     {4, 517, 100.f, -0.5f}, {2, 70001, 0.f, 0.37f},
    };
    std::mt19937 rng(5);
    auto wanted = [&](u64 v) {
        if (argc < 2) return true;
        for (int i = 1; i < argc; i++)
            if (std::strtoull(argv[i], nullptr, 10) == v) return true;
        return false;
    };
    for (const Case& cs : cases)
        for (size_t offset = 0; offset < 4 && wanted(cs.v); offset++) {
            run_case<unsigned short>(cs, offset, rng);
            run_case<float>(cs, offset, rng);
        }
    std::printf("%d failing checks\n", failures);
    return failures;
}
