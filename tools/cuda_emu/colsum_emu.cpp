// Runs bias.cu's column-sum partial kernels under the host emulator (shim.h): the four-columns
// per thread variants (column_sum_partial_x4, column_sum_partial_bf16_x4) must give bitwise the
// partials of the scalar ones (the same row-order sum per column), on shapes with a short last
// chunk. Built with -fsanitize=alignment, a misaligned vector access aborts.
// Build and run:  g++ -std=c++20 -O2 -pthread -w -fsanitize=alignment -fno-sanitize-recover=all \
//                     colsum_emu.cpp -o /tmp/colsum_emu && /tmp/colsum_emu
// Exit status: the number of failing cases.
#include "shim.h"
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
#include "../../engine/src/cuda/kernels/bf16.cuh"
#include "../../engine/src/cuda/kernels/bias.cu"
#include <cstdio>
#include <random>

int main() {
    struct Case { unsigned rows, cols; } cases[] = {{1, 4}, {63, 8}, {64, 12}, {200, 768}, {130, 2304}};
    const unsigned per = 64, threads = 128;
    std::mt19937 rng(3);
    std::normal_distribution<float> N(0.f, 1.f);
    int failures = 0;
    for (auto cs : cases) {
        const unsigned chunks = (cs.rows + per - 1) / per;
        std::vector<float> src((size_t)cs.rows * cs.cols);
        std::vector<unsigned short> srcb(src.size());
        for (size_t i = 0; i < src.size(); i++) { src[i] = N(rng); srcb[i] = (unsigned short)(__float_as_uint(N(rng)) >> 16); }
        for (int bf = 0; bf < 2; bf++) {
            std::vector<float> a((size_t)chunks * cs.cols, -1.f), b(a.size(), -2.f);
            Dim3 g1{chunks, (cs.cols + threads - 1) / threads, 1}, g4{chunks, (cs.cols / 4 + threads - 1) / threads, 1};
            if (bf) {
                launch(g1, threads, [&] { column_sum_partial_bf16(a.data(), srcb.data(), cs.rows, cs.cols, per); });
                launch(g4, threads, [&] { column_sum_partial_bf16_x4(b.data(), srcb.data(), cs.rows, cs.cols, per); });
            } else {
                launch(g1, threads, [&] { column_sum_partial(a.data(), src.data(), cs.rows, cs.cols, per); });
                launch(g4, threads, [&] { column_sum_partial_x4(b.data(), src.data(), cs.rows, cs.cols, per); });
            }
            bool ok = std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
            failures += !ok;
            printf("rows %4u cols %4u %s: x4 %s\n", cs.rows, cs.cols, bf ? "bf16" : "f32 ", ok ? "bitwise equal ok" : "DIFFERS FAIL");
        }
    }
    // column_sum_finish2 adds each of two partial sets exactly as column_sum_finish does
    for (auto cs : cases) {
        const unsigned chunks = (cs.rows + per - 1) / per;
        std::vector<float> p0((size_t)chunks * cs.cols), p1(p0.size()), d0(cs.cols), d1(cs.cols);
        for (auto& v : p0) v = N(rng);
        for (auto& v : p1) v = N(rng);
        for (auto& v : d0) v = N(rng);
        for (auto& v : d1) v = N(rng);
        std::vector<float> w0 = d0, w1 = d1, g0 = d0, g1 = d1;
        const unsigned blocks = (cs.cols + 31) / 32;
        launch({blocks, 1, 1}, 256, [&] { column_sum_finish(w0.data(), p0.data(), chunks, cs.cols); });
        launch({blocks, 1, 1}, 256, [&] { column_sum_finish(w1.data(), p1.data(), chunks, cs.cols); });
        launch({blocks, 2, 1}, 256, [&] { column_sum_finish2(g0.data(), p0.data(), g1.data(), p1.data(), chunks, cs.cols); });
        // and both against a plain f64 sum (loose: the order differs)
        bool close = true;
        for (unsigned o = 0; o < cs.cols; o++) {
            double s = d0[o];
            for (unsigned k = 0; k < chunks; k++) s += p0[(size_t)k * cs.cols + o];
            close = close && std::fabs(s - g0[o]) <= 1e-4 * (1 + std::fabs(s));
        }
        bool ok = close && std::memcmp(w0.data(), g0.data(), w0.size() * 4) == 0 && std::memcmp(w1.data(), g1.data(), w1.size() * 4) == 0;
        failures += !ok;
        printf("rows %4u cols %4u: finish2 %s\n", cs.rows, cs.cols, ok ? "bitwise equal to two finishes ok" : "DIFFERS FAIL");
    }
    return failures;
}
