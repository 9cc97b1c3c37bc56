// Runs the attention kernels (engine/src/cuda/kernels/attention*) under the host emulator (shim.h) on random inputs and compares
// forward output, lse and accumulated gradients with a plain f64 reference written here.
// Build and run:  g++ -std=c++20 -O2 -pthread -w attention_emu.cpp -o /tmp/attention_emu
//                 /tmp/attention_emu        (f32 kernels)     /tmp/attention_emu bf16
//                 /tmp/attention_emu bf16io (bf16 kernels on bf16 q/kv, dout, out, dq, dkv buffers)
//                 /tmp/attention_emu direct (as bf16io, q, k, v and dout read in place where allowed)
//                 /tmp/attention_emu fused  (as direct, with the fused backward: dkv pass + dq atomics)
//                 /tmp/attention_emu fusedcopies (the fused backward on head-major copies)
//                 /tmp/attention_emu wgmma  (as direct, on the wgmma kernels: attention_wgmma.cuh)
//                 /tmp/attention_emu wgmmacopies (the wgmma kernels on head-major copies)
// The fused modes take dq by bulk reductions (hd <= 64) as on sm_90; build with
// -DSMELT_ATTN_DQ_BULK=0 for the vector-atomic path.
// Exit status: the number of failing cases.
#include "shim.h"
struct alignas(8) float2 { float x, y; };  // the (lse, D) pairs of the dkv pass
inline float2 make_float2(float x, float y) { return float2{x, y}; }
// The attention module's files in kernels.rs' ATTENTION_SOURCE order.
#include "../../engine/src/cuda/kernels/attention.cuh"
#include "../../engine/src/cuda/kernels/attention_f32.cu"
#include "../../engine/src/cuda/kernels/attention_mma.cuh"
#include "../../engine/src/cuda/kernels/attention_wgmma.cuh"
#include "../../engine/src/cuda/kernels/attention_operands.cu"
#include "../../engine/src/cuda/kernels/attention_mma_forward.cu"
#include "../../engine/src/cuda/kernels/attention_mma_backward.cu"
#include <cstdio>
#include <random>
#include <string>

struct Case { const char* name; int B, Tq, Tk, C, H, causal, packed; std::vector<unsigned> lens = {}; };

static double rel(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) { num += (a[i] - b[i]) * (a[i] - b[i]); den += b[i] * b[i]; }
    return std::sqrt(num / den);
}

static float round_bf16(float x) { return bf2f(f2bf(x)); }

static double rms(const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x * x;
    return std::sqrt(s / std::max<size_t>(v.size(), 1));
}

// A global buffer the kernels read or write: f32, or (io_bf16) bf16 as the engine's activation
// buffers. Both are allocated twice as long as needed and the tail is a canary: a kernel that
// indexed a bf16 buffer with f32 strides (or wrote past the end) changes it.
struct Dev {
    static constexpr unsigned short CANARY = 0x5a5a;
    bool bf;
    size_t n;
    std::vector<float> f;
    std::vector<unsigned short> h;
    Dev(bool bf, size_t n) : bf(bf), n(n) {
        if (bf) h.assign(2 * n, CANARY);
        else f.assign(2 * n, __int_as_float(0x5a5a5a5au));
    }
    float* ptr() { return bf ? (float*)h.data() : f.data(); }
    // Stores v (rounded to bf16 when the buffer is bf16) and returns what the buffer holds.
    std::vector<float> set(const std::vector<float>& v) {
        std::vector<float> held(n);
        for (size_t i = 0; i < n; i++) {
            if (bf) { h[i] = f2bf(v[i]); held[i] = bf2f(h[i]); }
            else { f[i] = v[i]; held[i] = v[i]; }
        }
        return held;
    }
    void set_bits(size_t i, unsigned short bits) { h[i] = bits; }
    std::vector<float> get() const {
        std::vector<float> v(n);
        for (size_t i = 0; i < n; i++) v[i] = bf ? bf2f(h[i]) : f[i];
        return v;
    }
    bool canary_ok() const {
        for (size_t i = n; i < 2 * n; i++)
            if (bf ? h[i] != CANARY : f[i] != __int_as_float(0x5a5a5a5au)) return false;
        return true;
    }
};

int main(int argc, char** argv) {
    // modes: (none) f32 kernels; bf16: tensor-core kernels on f32 buffers; bf16io: tensor-core
    // kernels with every global input and output (q/kv, dout, out, dq, dkv) a bf16 buffer;
    // direct: as bf16io, and where the engine would (hd a kernel width, 16-byte strides) the
    // tiled kernels read q, k, v and dout in place instead of head-major copies.
    std::string mode = argc > 1 ? argv[1] : "";
    bool fused = mode == "fused" || mode == "fusedcopies";
    bool wg = mode == "wgmma" || mode == "wgmmacopies";
    bool direct_mode = mode == "direct" || mode == "fused" || mode == "wgmma";
    bool io = mode == "bf16io" || direct_mode || fused || wg, tc = mode == "bf16" || io;
    double tol_f = tc ? 2e-2 : 1e-5, tol_g = tc ? 3e-2 : 1e-4;
    Case cases[] = {
        {"causal packed B2 T129 C96 H3", 2, 129, 129, 96, 3, 1, 1},
        {"causal packed B2 T128 C96 H3", 2, 128, 128, 96, 3, 1, 1},
        {"bidir packed T70", 2, 70, 70, 96, 3, 0, 1},
        {"cross split Tq33 Tk77", 2, 33, 77, 96, 3, 0, 0},
        {"hd64 T256 causal", 1, 256, 256, 128, 2, 1, 1},
        {"hd128 T100 causal", 1, 100, 100, 256, 2, 1, 1},
        {"hd40 T65 cross", 1, 65, 130, 120, 3, 0, 0},
        {"hd20 T3 causal", 1, 3, 3, 40, 2, 1, 1},
        {"hd33 T70 causal (odd head dim)", 1, 70, 70, 99, 3, 1, 1},
        {"masked bidir packed T70", 2, 70, 70, 96, 3, 0, 1, {70, 37}},
        {"masked cross Tq33 Tk77", 2, 33, 77, 96, 3, 0, 0, {5, 77}},
        {"masked causal T129 at a tile edge", 2, 129, 129, 96, 3, 1, 1, {64, 100}},
    };
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    int failures = 0;
    // tile_order maps the launch order onto every (tile, head, batch) exactly once, for any grid
    // and group, and within a group puts the tiles with the most work first
    {
        int bad = 0;
        for (int tiles : {1, 2, 3, 16, 17})
            for (int heads : {1, 3, 12})
                for (int batch : {1, 2, 5, 16})
                    for (int group : {0, 1, 2, 5, 16, 64})
                        for (int heavy = 0; heavy < 2; heavy++) {
                            const int n_bh = heads * batch;
                            std::vector<int> seen((size_t)tiles * n_bh, 0);
                            int prev_rank = -1, prev_g0 = -1;
                            for (unsigned lin = 0; lin < (unsigned)(tiles * n_bh); lin++) {
                                TileCoord c = tile_order(lin, tiles, heads, n_bh, group, heavy);
                                if (c.tile < 0 || c.tile >= tiles || c.h < 0 || c.h >= heads || c.b < 0 || c.b >= batch) {
                                    bad++;
                                    continue;
                                }
                                seen[((size_t)c.b * heads + c.h) * tiles + c.tile]++;
                                if (group > 0) {  // ranks never decrease within a group
                                    const int g0 = (int)(lin / ((unsigned)group * tiles)), rank = heavy ? tiles - 1 - c.tile : c.tile;
                                    if (g0 == prev_g0 && rank < prev_rank) bad++;
                                    prev_g0 = g0;
                                    prev_rank = rank;
                                }
                            }
                            for (int v : seen) bad += v != 1;
                        }
        failures += bad != 0;
        printf("%-4s tile_order is a bijection, heaviest tiles first within each group (%d bad)\n", bad ? "FAIL" : "ok", bad);
    }
    for (auto& cs : cases) {
        int B = cs.B, Tq = cs.Tq, Tk = cs.Tk, C = cs.C, H = cs.H, hd = C / H;
        AttnParams p{};
        p.batch = B; p.tq = Tq; p.tk = Tk; p.channels = C; p.heads = H; p.hd = hd;
        p.causal = cs.causal; p.scale = 1.0f / std::sqrt((float)hd); p.accumulate = 1;
        p.io_bf16 = io;
        // as pairs_allowed in attention.rs: with even strides, offsets and head dims pairs move
        // as one access (the vectors here are aligned)
        p.pairs = io && C % 2 == 0 && hd % 2 == 0;
        p.key_lens = cs.lens.empty() ? nullptr : cs.lens.data();
        // bf16io: inputs are rounded to bf16 first, so the reference sees what the kernels see
        auto input = [&](float scale) { float x = U(rng) * scale; return io ? round_bf16(x) : x; };
        std::vector<float> qbuf, kvbuf;
        if (cs.packed) {
            p.q_ld = p.k_ld = p.v_ld = 3 * C; p.q_off = 0; p.k_off = C; p.v_off = 2 * C;
            qbuf.resize((size_t)B * Tq * 3 * C);
            for (auto& x : qbuf) x = input(2);
        } else {
            p.q_ld = C; p.q_off = 0; p.k_ld = p.v_ld = 2 * C; p.k_off = 0; p.v_off = C;
            qbuf.resize((size_t)B * Tq * C); kvbuf.resize((size_t)B * Tk * 2 * C);
            for (auto& x : qbuf) x = input(2);
            for (auto& x : kvbuf) x = input(2);
        }
        const float* q = qbuf.data();
        const float* kv = cs.packed ? qbuf.data() : kvbuf.data();
        {   // as direct_allowed in attention.rs (the buffers here are 16-byte aligned vectors)
            const int w = hd <= 32 ? 32 : hd <= 64 ? 64 : 128;
            bool aligned = true;
            for (int x : {p.q_ld, p.q_off, p.k_ld, p.k_off, p.v_ld, p.v_off, p.channels}) aligned &= x % 8 == 0;
            p.direct = direct_mode && hd == w && aligned;
        }
        std::vector<float> dout((size_t)B * Tq * C);
        for (auto& x : dout) x = input(1);
        // reference in double
        std::vector<double> rout((size_t)B * Tq * C), rlse((size_t)B * H * Tq);
        std::vector<double> rdq(qbuf.size()), rdkv(cs.packed ? qbuf.size() : kvbuf.size());
        for (int b = 0; b < B; b++) for (int h = 0; h < H; h++) for (int i = 0; i < Tq; i++) {
            const float* qi = q + ((size_t)b * Tq + i) * p.q_ld + p.q_off + h * hd;
            int nk = cs.lens.empty() ? Tk : (int)cs.lens[b];
            int nv = cs.causal ? std::min(i + 1, nk) : nk;
            std::vector<double> s(nv), pr(nv), dp(nv);
            double mx = -1e300;
            for (int j = 0; j < nv; j++) {
                const float* kj = kv + ((size_t)b * Tk + j) * p.k_ld + p.k_off + h * hd;
                double acc = 0; for (int d = 0; d < hd; d++) acc += (double)qi[d] * kj[d];
                s[j] = acc / std::sqrt((double)hd); mx = std::max(mx, s[j]);
            }
            double sum = 0; for (int j = 0; j < nv; j++) { pr[j] = std::exp(s[j] - mx); sum += pr[j]; }
            for (int j = 0; j < nv; j++) pr[j] /= sum;
            rlse[((size_t)b * H + h) * Tq + i] = mx + std::log(sum);
            const float* dy = dout.data() + ((size_t)b * Tq + i) * C + h * hd;
            double D = 0;
            for (int j = 0; j < nv; j++) {
                const float* vj = kv + ((size_t)b * Tk + j) * p.v_ld + p.v_off + h * hd;
                double acc = 0;
                for (int d = 0; d < hd; d++) { rout[((size_t)b * Tq + i) * C + h * hd + d] += pr[j] * vj[d]; acc += (double)dy[d] * vj[d]; }
                dp[j] = acc; D += pr[j] * acc;
            }
            std::vector<double>& dqb = rdq; std::vector<double>& dkvb = cs.packed ? rdq : rdkv;
            for (int j = 0; j < nv; j++) {
                double ds = pr[j] * (dp[j] - D) / std::sqrt((double)hd);
                const float* kj = kv + ((size_t)b * Tk + j) * p.k_ld + p.k_off + h * hd;
                for (int d = 0; d < hd; d++) {
                    dqb[((size_t)b * Tq + i) * p.q_ld + p.q_off + h * hd + d] += ds * kj[d];
                    dkvb[((size_t)b * Tk + j) * p.k_ld + p.k_off + h * hd + d] += ds * qi[d];
                    dkvb[((size_t)b * Tk + j) * p.v_ld + p.v_off + h * hd + d] += pr[j] * dy[d];
                }
            }
        }
        // kernels: the global buffers, f32 or (bf16io) bf16
        Dev qdev(io, qbuf.size()), kvdev(io, kvbuf.size()), doutdev(io, dout.size()), outdev(io, dout.size());
        qdev.set(qbuf); kvdev.set(kvbuf); doutdev.set(dout);  // exact: the inputs are rounded already
        const float* qd = qdev.ptr();
        const float* kvd = cs.packed ? qdev.ptr() : kvdev.ptr();
        const float* doutd = doutdev.ptr();
        float* outd = outdev.ptr();
        if (io) for (size_t i = 0; i < outdev.n; i++) outdev.set_bits(i, 0x7fc0);  // NaN: unwritten shows
        else std::fill(outdev.f.begin(), outdev.f.begin() + outdev.n, std::nanf(""));
        std::vector<float> lse((size_t)B * H * Tq, std::nanf("")), dsum(lse.size(), std::nanf(""));
        Dim3 gq{(unsigned)((Tq + 63) / 64), (unsigned)H, (unsigned)B}, gk{(unsigned)((Tk + 63) / 64), (unsigned)H, (unsigned)B};
        auto fwd = hd <= 32 ? attention_forward_f32_d32 : hd <= 64 ? attention_forward_f32_d64 : attention_forward_f32_d128;
        auto dkvk = hd <= 32 ? attention_backward_dkv_f32_d32 : hd <= 64 ? attention_backward_dkv_f32_d64 : attention_backward_dkv_f32_d128;
        auto dqk = hd <= 32 ? attention_backward_dq_f32_d32 : hd <= 64 ? attention_backward_dq_f32_d64 : attention_backward_dq_f32_d128;
        // tensor cores: head-major bf16 copies (forward) and (lse log2e, D) stats, then the passes
        const int W = hd <= 32 ? 32 : hd <= 64 ? 64 : 128, tqp = (Tq + 63) / 64 * 64, tkp = (Tk + 63) / 64 * 64;
        std::vector<unsigned short> qh((size_t)B * H * tqp * W, 0xffff), kh((size_t)B * H * tkp * W, 0xffff),
            vh(kh.size(), 0xffff), doh(qh.size(), 0xffff);
        std::vector<float> stats((size_t)B * H * tqp * 2, std::nanf(""));
        auto heads = [&](unsigned short* dst, const float* src, int rows, int ld, int off) {
            size_t n = (size_t)B * H * ((rows + 63) / 64 * 64) * (W / 2);
            launch({(unsigned)((n + 255) / 256), 1, 1}, 256, [&] { attention_heads_bf16(dst, src, rows, ld, off, W, p); });
        };
        // direct: the passes get the bf16 buffers themselves where they took the copies
        auto qsrc = [&] { return p.direct ? (const unsigned short*)qd : qh.data(); };
        auto ksrc = [&] { return p.direct ? (const unsigned short*)kvd : kh.data(); };
        auto vsrc = [&] { return p.direct ? (const unsigned short*)kvd : vh.data(); };
        auto dosrc = [&] { return p.direct ? (const unsigned short*)doutd : doh.data(); };
        auto f2 = wg ? (hd <= 32 ? attention_forward_wgmma_d32 : hd <= 64 ? attention_forward_wgmma_d64 : attention_forward_wgmma_d128)
                     : (hd <= 32 ? attention_forward_bf16_d32 : hd <= 64 ? attention_forward_bf16_d64 : attention_forward_bf16_d128);
        if (tc && p.direct) {
            launch(gq, 128, [&] { f2(outd, lse.data(), qsrc(), ksrc(), vsrc(), p); });
        } else if (tc) {  // the forward pass reads the bf16 copies (which the backward pass reuses)
            heads(qh.data(), qd, Tq, p.q_ld, p.q_off);
            heads(kh.data(), kvd, Tk, p.k_ld, p.k_off);
            heads(vh.data(), kvd, Tk, p.v_ld, p.v_off);
            launch(gq, 128, [&] { f2(outd, lse.data(), qh.data(), kh.data(), vh.data(), p); });
        } else {
            launch(gq, 256, [&] { fwd(outd, lse.data(), qd, kvd, p); });
            unsigned rows = B * Tq * H;  // D, for the f32 backward (the bf16 one has its own stats)
            launch({(rows + 7) / 8, 1, 1}, 256, [&] { attention_backward_dot_f32(dsum.data(), doutd, outd, p); });
        }
        std::vector<float> out = outdev.get();
        // gradients start from random values: backward must accumulate. bf16io: of the
        // gradient's own size, so that the gradient is not lost in the bf16 rounding of the sum.
        const float g0 = io ? (float)(1.7 * rms(rdq)) : 1.0f, g1 = io ? (float)(1.7 * rms(rdkv)) : 1.0f;
        Dev dqdev(io, qbuf.size()), dkvdev(io, cs.packed ? 0 : kvbuf.size());
        std::vector<float> init(dqdev.n), initkv(dkvdev.n);
        for (auto& x : init) x = g0 * U(rng);
        for (auto& x : initkv) x = g1 * U(rng);
        init = dqdev.set(init); initkv = dkvdev.set(initkv);
        std::vector<double> edq(rdq.size()), edkv(rdkv.size());
        for (size_t i = 0; i < dqdev.n; i++) edq[i] = init[i] + rdq[i];
        for (size_t i = 0; i < dkvdev.n; i++) edkv[i] = initkv[i] + rdkv[i];
        auto backward = [&](float* dkvp_, float* dqp_) {
            if (!tc) {
                launch(gk, 256, [&] { dkvk(dkvp_, qd, kvd, doutd, lse.data(), dsum.data(), p); });
                launch(gq, 256, [&] { dqk(dqp_, qd, kvd, doutd, lse.data(), dsum.data(), p); });
                return;
            }
            if (!p.direct) heads(doh.data(), doutd, Tq, C, 0);
            unsigned srows = B * H * tqp;
            if (p.direct) {  // as backward_bf16 in attention.rs: hd/8 lanes per row
                auto sv = hd <= 32 ? attention_backward_stats_vec_d32 : hd <= 64 ? attention_backward_stats_vec_d64 : attention_backward_stats_vec_d128;
                unsigned blocks = (unsigned)(((size_t)srows * (W / 8) + 255) / 256);
                launch({blocks, 1, 1}, 256, [&] { sv(stats.data(), (const unsigned short*)doutd, (const unsigned short*)outd, lse.data(), p); });
            } else {
                launch({(srows + 7) / 8, 1, 1}, 256, [&] { attention_backward_stats(stats.data(), doutd, outd, lse.data(), p); });
            }
            if (fused) {  // as backward_bf16 in attention.rs with the fused pass: zeroed dq_acc, then
                          // the dkv pass that also adds dS k into it, then the scaled store into dq
                std::vector<float> acc((size_t)B * H * tqp * W, 0.0f);
                auto fk = hd <= 32 ? attention_backward_fused_bf16_d32 : hd <= 64 ? attention_backward_fused_bf16_d64 : attention_backward_fused_bf16_d128;
                launch(gk, 128, [&] { fk(dkvp_, acc.data(), qsrc(), ksrc(), vsrc(), dosrc(), stats.data(), p); });
                size_t n = (size_t)B * Tq * H * ((hd + 1) / 2);
                launch({(unsigned)((n + 255) / 256), 1, 1}, 256, [&] { attention_dq_from_acc(dqp_, acc.data(), W, p); });
                return;
            }
            auto dkv2 = wg ? (hd <= 32 ? attention_backward_dkv_wgmma_d32 : hd <= 64 ? attention_backward_dkv_wgmma_d64 : attention_backward_dkv_wgmma_d128)
                           : (hd <= 32 ? attention_backward_dkv_bf16_d32 : hd <= 64 ? attention_backward_dkv_bf16_d64 : attention_backward_dkv_bf16_d128);
            auto dq2 = wg ? (hd <= 32 ? attention_backward_dq_wgmma_d32 : hd <= 64 ? attention_backward_dq_wgmma_d64 : attention_backward_dq_wgmma_d128)
                          : (hd <= 32 ? attention_backward_dq_bf16_d32 : hd <= 64 ? attention_backward_dq_bf16_d64 : attention_backward_dq_bf16_d128);
            launch(gk, 128, [&] { dkv2(dkvp_, qsrc(), ksrc(), vsrc(), dosrc(), stats.data(), p); });
            launch(gq, 128, [&] { dq2(dqp_, qsrc(), ksrc(), vsrc(), dosrc(), stats.data(), p); });
        };
        backward(cs.packed ? dqdev.ptr() : dkvdev.ptr(), dqdev.ptr());
        std::vector<float> dq = dqdev.get(), dkv = dkvdev.get();
        double e1 = rel(out, rout), e2 = rel(lse, rlse), e3 = rel(dq, edq), e4 = cs.packed ? 0 : rel(dkv, edkv);
        // gradient-only error (without the initial values) is the stricter measure
        std::vector<float> gq_only(dq.size()), gkv_only(dkv.size());
        for (size_t i = 0; i < dq.size(); i++) gq_only[i] = dq[i] - init[i];
        for (size_t i = 0; i < dkv.size(); i++) gkv_only[i] = dkv[i] - initkv[i];
        double e5 = rel(gq_only, rdq), e5kv = cs.packed ? 0 : rel(gkv_only, rdkv);
        // Overwrite mode (accumulate = 0): whatever the buffers held (large values here; bf16io:
        // NaN, infinities and large values too), they end up holding exactly the gradient,
        // padding-key tiles included (zeros).
        p.accumulate = 0;
        Dev dq2dev(io, dqdev.n), dkv2dev(io, dkvdev.n);
        auto garbage = [&](Dev& d) {
            std::vector<float> v(d.n);
            for (auto& x : v) x = 1e3f * U(rng);
            d.set(v);
            if (io) {
                const unsigned short odd[3] = {0x7fc1, 0xff80, 0x7f7f};  // NaN, -inf, largest finite
                for (size_t i = 0; i < d.n; i += 2) d.set_bits(i, odd[(i / 2) % 3]);
            }
        };
        garbage(dq2dev); garbage(dkv2dev);
        // the qkv bias-gradient partials (bf16 passes, packed, T % 64 == 0, no key padding, not
        // fused: as attention.rs allows them): bitwise the row-order sums of each 64-row chunk
        // of the gradient as stored, every (chunk, column) written
        const bool partials = tc && cs.packed && Tq % 64 == 0 && cs.lens.empty() && !fused;
        std::vector<float> bias_partial(partials ? (size_t)B * Tq / 64 * 3 * C : 0, std::nanf(""));
        p.bias_partial = partials ? bias_partial.data() : nullptr;
        backward(cs.packed ? dq2dev.ptr() : dkv2dev.ptr(), dq2dev.ptr());
        p.bias_partial = nullptr;
        p.accumulate = 1;
        int partial_bad = 0;
        if (partials) {
            const std::vector<float> g = dq2dev.get();
            for (size_t chunk = 0; chunk < (size_t)B * Tq / 64; chunk++)
                for (int col = 0; col < 3 * C; col++) {
                    float acc = 0.0f;
                    for (int r = 0; r < 64; r++) acc += g[(chunk * 64 + r) * 3 * C + col];
                    partial_bad += std::memcmp(&acc, &bias_partial[chunk * 3 * C + col], 4) != 0;
                }
        }
        double e6 = rel(dq2dev.get(), rdq), e7 = cs.packed ? 0 : rel(dkv2dev.get(), rdkv);
        bool canaries = qdev.canary_ok() && kvdev.canary_ok() && doutdev.canary_ok() && outdev.canary_ok() &&
                        dqdev.canary_ok() && dkvdev.canary_ok() && dq2dev.canary_ok() && dkv2dev.canary_ok();
        bool ok = e1 < tol_f && e2 < tol_f && e3 < tol_g && e4 < tol_g && e5 < tol_g && e5kv < tol_g && e6 < tol_g &&
                  e7 < tol_g && canaries && partial_bad == 0 && std::isfinite(e1 + e2 + e3 + e4 + e5 + e5kv + e6 + e7);
        failures += !ok;
        if (direct_mode || fused || wg) printf("%s%s", fused ? "[fused] " : wg ? "[wgmma] " : "", p.direct ? "[direct] " : "[copies] ");
        printf("%-32s out %.2e lse %.2e dsrc %.2e dkv %.2e grad-only %.2e/%.2e overwrite %.2e/%.2e%s%s %s\n", cs.name, e1, e2,
               e3, e4, e5, e5kv, e6, e7, canaries ? "" : " CANARY",
               partials ? (partial_bad ? " BIAS-PARTIALS" : " bias partials bitwise") : "", ok ? "ok" : "FAIL");
        fflush(stdout);
    }
    return failures;
}
