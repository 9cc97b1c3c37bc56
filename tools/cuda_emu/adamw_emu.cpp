// Runs adamw.cu's adamw_update_runs under the host emulator (shim.h) with and without the bf16
// shadow pointer (p_bf16, engine/src/cuda/shadow.rs) and checks:
//   - p, m and v are bitwise the same either way (writing the shadow changes no update);
//   - every shadow element, 0..n, holds f32_to_bf16_rne of the new parameter, bitwise what
//     convert.cu's f32_to_bf16 (the matmuls' per-call conversion) makes of the new parameters,
//     and equal to an independent round-to-nearest-even written here (NaN stays NaN);
//   - nothing past n is written (canaries), with a grid smaller than n (grid-stride loop).
// Build and run:  g++ -std=c++20 -O2 -pthread -w -ffp-contract=off -fsanitize=alignment -fno-sanitize-recover=all \
//                     adamw_emu.cpp -o /tmp/adamw_emu && /tmp/adamw_emu
// Exit status: the number of failing checks.
#include "shim.h"
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>

// What bf16.cuh, adamw.cu and convert.cu use beyond shim.h.
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
using std::sqrt;
inline float sqrtf(float x) { return std::sqrt(x); }
// The IEEE single operations CUDA's _rn intrinsics are (build with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
#include "../../engine/src/cuda/kernels/bf16.cuh"
#include "../../engine/src/cuda/kernels/adamw.cu"
#include "../../engine/src/cuda/kernels/convert.cu"

static const unsigned THREADS = 64, BLOCKS = 3;
static const size_t GUARD = 16;
static const unsigned short CANARY = 0xdead;

// memory.rs's f32_to_bf16_bits, written again.
static unsigned short rne(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

struct State {
    std::vector<float> p, m, v;
};

static int failures = 0;
static void check(bool ok, const std::string& what) {
    if (!ok) {
        std::printf("FAIL: %s\n", what.c_str());
        failures++;
    }
}

int main() {
    const size_t n = 5003;  // not a multiple of the grid, nor of 4
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    State s0;
    std::vector<float> g(n);
    for (size_t i = 0; i < n; i++) {
        s0.p.push_back(0.1f * normal(rng));
        s0.m.push_back(0.01f * normal(rng));
        s0.v.push_back(1e-4f * std::abs(normal(rng)));
        g[i] = normal(rng);
    }
    // Exact bf16 rounding ties (even and odd upper halves) that the update leaves as they are (no
    // decay in run 1, zero moment and gradient), a NaN, an infinity and -0.
    for (size_t i : {2000, 2001}) s0.m[i] = g[i] = 0.0f;
    s0.p[2000] = __uint_as_float(0x3f808000u);
    s0.p[2001] = __uint_as_float(0x3f818000u);
    s0.p[12] = std::nanf("");
    s0.p[13] = INFINITY;
    s0.p[14] = -0.0f;
    // Three runs with their own weight decay.
    std::vector<unsigned> ends = {1000, 4000, (unsigned)n};
    std::vector<float> decay = {0.1f, 0.0f, 0.01f};
    auto step = [&](State& s, unsigned short* shadow) {
        launch({BLOCKS, 1, 1}, THREADS, [&] {
            adamw_update_runs(s.p.data(), shadow, g.data(), s.m.data(), s.v.data(), n, ends.data(), decay.data(), 3,
                              1e-3f, 0.9f, 0.95f, 1e-8f, 0.5f, 1.0f - 0.9f, 1.0f - 0.95f);
        });
    };
    State plain = s0, fused = s0;
    std::vector<unsigned short> shadow(n + GUARD, CANARY);
    step(plain, nullptr);
    step(fused, shadow.data());
    auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
        return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
    };
    check(same_bits(plain.p, fused.p), "p differs when the shadow is written");
    check(same_bits(plain.m, fused.m), "m differs when the shadow is written");
    check(same_bits(plain.v, fused.v), "v differs when the shadow is written");
    // The per-call conversion of the new parameters.
    std::vector<unsigned short> converted(n, 0);
    launch({BLOCKS, 1, 1}, THREADS, [&] { f32_to_bf16(converted.data(), fused.p.data(), n); });
    size_t bad_conv = 0, bad_ref = 0;
    for (size_t i = 0; i < n; i++) {
        bad_conv += shadow[i] != converted[i];
        bad_ref += shadow[i] != rne(fused.p[i]);
    }
    check(bad_conv == 0, std::to_string(bad_conv) + " shadow values differ from f32_to_bf16's");
    check(bad_ref == 0, std::to_string(bad_ref) + " shadow values differ from the reference rounding");
    check(fused.p[2000] == s0.p[2000] && shadow[2000] == 0x3f80, "a tie rounds to even (down)");
    check(fused.p[2001] == s0.p[2001] && shadow[2001] == 0x3f82, "a tie rounds to even (up)");
    check((shadow[12] & 0x7f80) == 0x7f80 && (shadow[12] & 0x7f) != 0, "NaN stays NaN");
    bool canaries = true;
    for (size_t i = n; i < n + GUARD; i++) canaries &= shadow[i] == CANARY;
    check(canaries, "written past n");
    std::printf("adamw_update_runs with a shadow: %zu elements, %s\n", n, failures ? "FAILED" : "ok");

    // adamw_update_runs_x4 (four elements per thread, runs ending inside a word, a tail of 3):
    // bitwise adamw_update_runs, with and without the shadow, and both bitwise the CPU
    // reference's formula (engine/src/cpu/adamw.rs) written out again here.
    {
        const int before = failures;
        std::vector<unsigned> ends2 = {1, 1001, 1002, 3998, (unsigned)n};
        std::vector<float> decay2 = {0.0f, 0.1f, 0.0f, 0.01f, 0.1f};
        auto run = [&](State& s, unsigned short* shadow, bool x4) {
            launch({BLOCKS, 1, 1}, THREADS, [&] {
                if (x4)
                    adamw_update_runs_x4(s.p.data(), shadow, g.data(), s.m.data(), s.v.data(), n, ends2.data(), decay2.data(), 5,
                                         1e-3f, 0.9f, 0.95f, 1e-8f, 0.5f, 1.0f - 0.9f, 1.0f - 0.95f);
                else
                    adamw_update_runs(s.p.data(), shadow, g.data(), s.m.data(), s.v.data(), n, ends2.data(), decay2.data(), 5,
                                      1e-3f, 0.9f, 0.95f, 1e-8f, 0.5f, 1.0f - 0.9f, 1.0f - 0.95f);
            });
        };
        State a = s0, b = s0, c = s0;
        std::vector<unsigned short> sa(n + GUARD, CANARY), sb(n + GUARD, CANARY);
        run(a, sa.data(), false);
        run(b, sb.data(), true);
        run(c, nullptr, true);
        check(same_bits(a.p, b.p) && same_bits(a.m, b.m) && same_bits(a.v, b.v), "x4 differs from the scalar kernel");
        check(same_bits(b.p, c.p), "x4's p differs with and without the shadow");
        check(std::memcmp(sa.data(), sb.data(), 2 * sa.size()) == 0, "x4's shadow (or its canaries) differs from the scalar kernel's");
        // the CPU reference: per element, with the run's decay
        State r = s0;
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) {
            size_t run_i = 0;
            while (ends2[run_i] <= i) run_i++;
            float gi = g[i] * 0.5f;
            r.p[i] -= 1e-3f * decay2[run_i] * r.p[i];
            r.m[i] = 0.9f * r.m[i] + (1.0f - 0.9f) * gi;
            r.v[i] = 0.95f * r.v[i] + (1.0f - 0.95f) * gi * gi;
            float mhat = r.m[i] / (1.0f - 0.9f), vhat = r.v[i] / (1.0f - 0.95f);
            r.p[i] -= 1e-3f * mhat / (std::sqrt(vhat) + 1e-8f);
            bad += std::memcmp(&r.p[i], &a.p[i], 4) != 0 && !(std::isnan(r.p[i]) && std::isnan(a.p[i]));
        }
        check(bad == 0, std::to_string(bad) + " parameters differ from the CPU formula's bits");
        std::printf("adamw_update_runs_x4: %s\n", failures == before ? "bitwise the scalar kernel and the CPU formula ok" : "FAILED");
    }
    return failures;
}
