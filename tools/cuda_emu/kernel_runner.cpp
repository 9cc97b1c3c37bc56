// Runs one of the grid-stride kernels (rope.cu, elementwise.cu, dropout.cu, convert.cu, memory.cu,
// adamw.cu's adamw_update and bias.cu's bias_broadcast) under the host emulator (shim.h) on buffers read from files, and
// writes every buffer back, so that a test can compare the kernel with the CPU backend's op
// (engine/tests/cuda_emulated.rs does, for each of them).
//
// Usage:  kernel_runner DIR KERNEL GRID SHIFTS [SCALAR ...]
//   DIR/0.bin, DIR/1.bin, ...: the kernel's buffer arguments in order, raw little-endian values
//     (f32, bf16 bits, f64 as the kernel takes them); a missing file passes a null pointer (the
//     optional bias of unpad_rows_add_bias*). After the run each buffer is written to DIR/<i>.out.
//   GRID: at most this many blocks of 256 threads (fewer when the buffers need fewer), so that a
//     test can make the grid-stride loops go round; sum_squares_partial runs exactly GRID blocks.
//   SHIFTS: per buffer, how many elements past a 64-byte aligned address it starts ("0,1,0"), so
//     that the vector paths (aligned) and the scalar ones (not) both run.
//   SCALAR: the kernel's scalar arguments in order.
// Every buffer has 64 canary bytes on each side; a write outside a buffer fails the run. Built
// with -fsanitize=alignment, a vector access through a misaligned pointer aborts it.
// Build:  g++ -std=c++20 -O2 -pthread -w -ffp-contract=off -fsanitize=alignment \
//             -fno-sanitize-recover=all kernel_runner.cpp -o /tmp/kernel_runner
// Exit status: 0 when the kernel ran and touched nothing outside its buffers.
#include "shim.h"
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <string>

// What bf16.cuh and the kernels use beyond shim.h (which has the vector types). x86-64 SSE rounds
// each f32 operation on its own (and -ffp-contract=off keeps the compiler from fusing), as
// __fmul_rn / __fadd_rn do.
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }  // IEEE sqrt, correctly rounded
#include "../../engine/src/cuda/kernels/bf16.cuh"
#include "../../engine/src/cuda/kernels/adamw.cu"
#include "../../engine/src/cuda/kernels/bias.cu"
#include "../../engine/src/cuda/kernels/convert.cu"
#include "../../engine/src/cuda/kernels/dropout.cu"
#include "../../engine/src/cuda/kernels/elementwise.cu"
#include "../../engine/src/cuda/kernels/rope.cu"
// memory.cu's block reduction keeps a __shared__ array: one copy for the block (blocks run one at
// a time here), not one per thread. (bias.cu above declares dynamic shared memory, which shim.h
// maps to its own block, so this comes after it.)
#undef __shared__
#define __shared__ static
#include "../../engine/src/cuda/kernels/memory.cu"

static const unsigned THREADS = 256;  // as memory.rs's elementwise_cfg and sum_squares launch
static const size_t GUARD = 64;
static const unsigned char CANARY = 0xA5;

struct Buffer {
    size_t esize = 0, n = 0, shift = 0;
    unsigned char* base = nullptr;
    void* data() const { return base ? base + GUARD + shift * esize : nullptr; }
    size_t total() const { return GUARD + shift * esize + n * esize + GUARD; }
    bool guards_intact() const {
        if (!base) return true;
        const unsigned char* end = base + GUARD + shift * esize + n * esize;
        for (size_t i = 0; i < GUARD + shift * esize; i++)
            if (base[i] != CANARY) return false;
        for (size_t i = 0; i < GUARD; i++)
            if (end[i] != CANARY) return false;
        return true;
    }
};

static bool load(Buffer& b, const std::string& path, size_t esize, size_t shift) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (bytes.size() % esize != 0) {
        fprintf(stderr, "%s: %zu bytes is not a whole number of %zu-byte values\n", path.c_str(), bytes.size(), esize);
        exit(2);
    }
    b.esize = esize;
    b.n = bytes.size() / esize;
    b.shift = shift;
    b.base = (unsigned char*)std::aligned_alloc(64, (b.total() + 63) / 64 * 64);
    std::memset(b.base, CANARY, b.total());
    std::memcpy(b.data(), bytes.data(), bytes.size());
    return true;
}

struct Call {
    std::vector<Buffer>& b;
    const std::vector<std::string>& s;
    unsigned grid_cap;
    float* f(int i) const { return (float*)b[i].data(); }
    unsigned short* h(int i) const { return (unsigned short*)b[i].data(); }
    double* d(int i) const { return (double*)b[i].data(); }
    u64 u(int i) const { return std::strtoull(s.at(i).c_str(), nullptr, 10); }
    float x(int i) const { return std::strtof(s.at(i).c_str(), nullptr); }
    // elementwise_cfg: ceil(n / 256) blocks, capped
    Dim3 grid(u64 n) const {
        u64 blocks = std::max<u64>(1, std::min<u64>((n + THREADS - 1) / THREADS, grid_cap));
        return Dim3{(unsigned)blocks, 1, 1};
    }
    void run(u64 n, std::function<void()> k) const { launch(grid(n), THREADS, k); }
};

struct Kernel {
    std::vector<size_t> esizes;  // element size of each buffer argument
    std::function<void(const Call&)> run;
};

static std::map<std::string, Kernel> kernels() {
    return {
        {"rope_f32", {{4, 4}, [](const Call& c) {  // qkv, table; rows t c n_head t_max inverse
             c.run(c.u(0) * c.u(2), [&] { rope_f32(c.f(0), c.f(1), c.u(0), c.u(1), c.u(2), c.u(3), c.u(4), (int)c.u(5)); });
         }}},
        {"rope_bf16", {{2, 4}, [](const Call& c) {
             c.run(c.u(0) * c.u(2), [&] { rope_bf16(c.h(0), c.f(1), c.u(0), c.u(1), c.u(2), c.u(3), c.u(4), (int)c.u(5)); });
         }}},
        {"rope_bf16_x8", {{2, 4}, [](const Call& c) {  // one task per row and 8 pairs
             c.run(c.u(0) * c.u(2) / 8, [&] { rope_bf16_x8(c.h(0), c.f(1), c.u(0), c.u(1), c.u(2), c.u(3), c.u(4), (int)c.u(5)); });
         }}},
        {"gelu_forward", {{4, 4}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { gelu_forward(c.f(0), c.f(1), n); });
         }}},
        {"gelu_backward", {{4, 4, 4}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { gelu_backward(c.f(0), c.f(1), c.f(2), n); });
         }}},
        {"gelu_backward_set", {{4, 4, 4}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { gelu_backward_set(c.f(0), c.f(1), c.f(2), n); });
         }}},
        {"gelu_forward_bf16", {{2, 2}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { gelu_forward_bf16(c.h(0), c.h(1), n); });
         }}},
        {"gelu_backward_set_bf16", {{2, 2, 2}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { gelu_backward_set_bf16(c.h(0), c.h(1), c.h(2), n); });
         }}},
        // dinp, partial, inp, dout; rows cols rows_per_chunk (one task per chunk and 8 columns)
        {"gelu_backward_set_bias_bf16", {{2, 4, 2, 2}, [](const Call& c) {
             u64 tasks = (c.u(0) + c.u(2) - 1) / c.u(2) * (c.u(1) / 8);
             c.run(tasks, [&] { gelu_backward_set_bias_bf16(c.h(0), c.f(1), c.h(2), c.h(3), c.u(0), c.u(1), c.u(2)); });
         }}},
        {"residual_forward", {{4, 4, 4}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { residual_forward(c.f(0), c.f(1), c.f(2), n); });
         }}},
        {"residual_backward", {{4, 4, 4}, [](const Call& c) {
             u64 n = c.b[2].n;
             c.run(n, [&] { residual_backward(c.f(0), c.f(1), c.f(2), n); });
         }}},
        {"tanh_forward", {{4, 4}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { tanh_forward(c.f(0), c.f(1), n); });
         }}},
        {"tanh_backward", {{4, 4, 4}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { tanh_backward(c.f(0), c.f(1), c.f(2), n); });
         }}},
        // dst, src; seed offset threshold scale
        {"dropout_forward", {{4, 4}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { dropout_forward(c.f(0), c.f(1), c.u(0), c.u(1), (unsigned)c.u(2), c.x(3), n); });
         }}},
        {"dropout_backward", {{4, 4}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { dropout_backward(c.f(0), c.f(1), c.u(0), c.u(1), (unsigned)c.u(2), c.x(3), n); });
         }}},
        {"f32_to_bf16", {{2, 4}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { f32_to_bf16(c.h(0), c.f(1), n); });
         }}},
        // out, in; rows cols ld_out
        {"f32_to_bf16_rows", {{2, 4}, [](const Call& c) {
             c.run(c.u(0) * c.u(2), [&] { f32_to_bf16_rows(c.h(0), c.f(1), c.u(0), c.u(1), c.u(2)); });
         }}},
        {"bf16_rows_repack", {{2, 2}, [](const Call& c) {
             c.run(c.u(0) * c.u(2), [&] { bf16_rows_repack(c.h(0), c.h(1), c.u(0), c.u(1), c.u(2)); });
         }}},
        // out, padded; rows cols ld_in
        {"add_unpadded", {{4, 4}, [](const Call& c) {
             c.run(c.u(0) * c.u(1), [&] { add_unpadded(c.f(0), c.f(1), c.u(0), c.u(1), c.u(2)); });
         }}},
        // out, padded, bias (or none); rows cols ld_in
        {"unpad_rows_add_bias", {{4, 4, 4}, [](const Call& c) {
             c.run(c.u(0) * c.u(1), [&] { unpad_rows_add_bias(c.f(0), c.f(1), c.f(2), c.u(0), c.u(1), c.u(2)); });
         }}},
        {"unpad_rows_add_bias_bf16", {{2, 4, 4}, [](const Call& c) {
             c.run(c.u(0) * c.u(1), [&] { unpad_rows_add_bias_bf16(c.h(0), c.f(1), c.f(2), c.u(0), c.u(1), c.u(2)); });
         }}},
        {"add_bf16_onto_f32", {{4, 2}, [](const Call& c) {
             u64 n = c.b[1].n;
             c.run(n, [&] { add_bf16_onto_f32(c.f(0), c.h(1), n); });
         }}},
        {"fill_f32", {{4}, [](const Call& c) {
             u64 n = c.b[0].n;
             c.run(n, [&] { fill_f32(c.f(0), c.x(0), n); });
         }}},
        {"scale_f32", {{4}, [](const Call& c) {
             u64 n = c.b[0].n;
             c.run(n, [&] { scale_f32(c.f(0), c.x(0), n); });
         }}},
        {"scale_bf16", {{2}, [](const Call& c) {
             u64 n = c.b[0].n;
             c.run(n, [&] { scale_bf16(c.h(0), c.x(0), n); });
         }}},
        // src, partial (GRID doubles): exactly GRID blocks, as sum_squares launches SUM_BLOCKS
        {"sum_squares_partial", {{4, 8}, [](const Call& c) {
             u64 n = c.b[0].n;
             if (c.b[1].n != c.grid_cap) {
                 fprintf(stderr, "sum_squares_partial: %zu partials for a grid of %u\n", c.b[1].n, c.grid_cap);
                 exit(2);
             }
             launch(Dim3{c.grid_cap, 1, 1}, THREADS, [&] { sum_squares_partial(c.f(0), n, c.d(1)); });
         }}},
        // the same with float4 loads (src 16-byte aligned: shift 0, 4, ...)
        {"sum_squares_partial_x4", {{4, 8}, [](const Call& c) {
             u64 n = c.b[0].n;
             if (c.b[1].n != c.grid_cap) {
                 fprintf(stderr, "sum_squares_partial_x4: %zu partials for a grid of %u\n", c.b[1].n, c.grid_cap);
                 exit(2);
             }
             launch(Dim3{c.grid_cap, 1, 1}, THREADS, [&] { sum_squares_partial_x4(c.f(0), n, c.d(1)); });
         }}},
        // p, grads, m, v; lr beta1 beta2 eps wd grad_scale bc1 bc2
        {"adamw_update", {{4, 4, 4, 4}, [](const Call& c) {
             u64 n = c.b[0].n;
             c.run(n, [&] {
                 adamw_update(c.f(0), c.f(1), c.f(2), c.f(3), n, c.x(0), c.x(1), c.x(2), c.x(3), c.x(4), c.x(5), c.x(6), c.x(7));
             });
         }}},
        // out, bias; n_rows oc
        {"bias_broadcast", {{4, 4}, [](const Call& c) {
             c.run(c.u(0) * c.u(1), [&] { bias_broadcast(c.f(0), c.f(1), c.u(0), c.u(1)); });
         }}},
    };
}

int main(int argc, char** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: kernel_runner DIR KERNEL GRID SHIFTS [SCALAR ...]\n");
        return 2;
    }
    const std::string dir = argv[1], name = argv[2];
    const unsigned grid_cap = (unsigned)std::atoi(argv[3]);
    const auto table = kernels();
    auto it = table.find(name);
    if (it == table.end() || grid_cap == 0) {
        fprintf(stderr, "unknown kernel %s (or a zero grid)\n", name.c_str());
        return 2;
    }
    const Kernel& k = it->second;
    std::vector<size_t> shifts;
    for (std::string rest = argv[4]; !rest.empty();) {
        size_t comma = rest.find(',');
        shifts.push_back(std::strtoull(rest.substr(0, comma).c_str(), nullptr, 10));
        rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    }
    shifts.resize(k.esizes.size(), 0);
    std::vector<Buffer> bufs(k.esizes.size());
    for (size_t i = 0; i < bufs.size(); i++) load(bufs[i], dir + "/" + std::to_string(i) + ".bin", k.esizes[i], shifts[i]);
    std::vector<std::string> scalars(argv + 5, argv + argc);
    k.run(Call{bufs, scalars, grid_cap});
    int bad = 0;
    for (size_t i = 0; i < bufs.size(); i++) {
        if (!bufs[i].guards_intact()) {
            fprintf(stderr, "%s wrote outside buffer %zu\n", name.c_str(), i);
            bad++;
        }
        if (!bufs[i].base) continue;
        std::ofstream out(dir + "/" + std::to_string(i) + ".out", std::ios::binary);
        out.write((const char*)bufs[i].data(), bufs[i].n * bufs[i].esize);
        std::free(bufs[i].base);
    }
    return bad;
}
