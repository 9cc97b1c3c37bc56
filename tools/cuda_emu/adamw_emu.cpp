// Runs adamw.cu's adamw_update_runs under the host emulator (shim.h) with and without the bf16
// shadow pointer (p_bf16, engine/src/cuda/shadow.rs) and checks:
//   - p, m and v are bitwise the same either way (writing the shadow changes no update);
//   - every shadow element, 0..n, holds f32_to_bf16_rne of the new parameter, bitwise what
//     convert.cu's f32_to_bf16 (the matmuls' per-call conversion) makes of the new parameters,
//     and equal to an independent round-to-nearest-even written here (NaN stays NaN);
//   - nothing past n is written (canaries), with a grid smaller than n (grid-stride loop).
// Build and run:  g++ -std=c++20 -O2 -pthread -w adamw_emu.cpp -o /tmp/adamw_emu && /tmp/adamw_emu
// Exit status: the number of failing checks.
#include "shim.h"
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>

// What bf16.cuh, adamw.cu and convert.cu use beyond shim.h.
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
using std::sqrt;
inline float sqrtf(float x) { return std::sqrt(x); }
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
    return failures;
}
