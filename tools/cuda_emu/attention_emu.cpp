// Runs attention.cu's kernels under the host emulator (shim.h) on random inputs and compares
// forward output, lse and accumulated gradients with a plain f64 reference written here.
// Build and run:  g++ -std=c++20 -O2 -pthread -w attention_emu.cpp -o /tmp/attention_emu
//                 /tmp/attention_emu        (f32 kernels)     /tmp/attention_emu bf16
// Exit status: the number of failing cases.
#include "shim.h"
#include "../../engine/src/cuda/kernels/attention.cu"
#include <cstdio>
#include <random>
#include <string>

struct Case { const char* name; int B, Tq, Tk, C, H, causal, packed; std::vector<unsigned> lens = {}; };

static double rel(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) { num += (a[i] - b[i]) * (a[i] - b[i]); den += b[i] * b[i]; }
    return std::sqrt(num / den);
}

int main(int argc, char** argv) {
    bool tc = argc > 1 && std::string(argv[1]) == "bf16";
    double tol_f = tc ? 2e-2 : 1e-5, tol_g = tc ? 3e-2 : 1e-4;
    Case cases[] = {
        {"causal packed B2 T129 C96 H3", 2, 129, 129, 96, 3, 1, 1},
        {"bidir packed T70", 2, 70, 70, 96, 3, 0, 1},
        {"cross split Tq33 Tk77", 2, 33, 77, 96, 3, 0, 0},
        {"hd64 T256 causal", 1, 256, 256, 128, 2, 1, 1},
        {"hd128 T100 causal", 1, 100, 100, 256, 2, 1, 1},
        {"hd40 T65 cross", 1, 65, 130, 120, 3, 0, 0},
        {"hd20 T3 causal", 1, 3, 3, 40, 2, 1, 1},
        {"masked bidir packed T70", 2, 70, 70, 96, 3, 0, 1, {70, 37}},
        {"masked cross Tq33 Tk77", 2, 33, 77, 96, 3, 0, 0, {5, 77}},
        {"masked causal T129 at a tile edge", 2, 129, 129, 96, 3, 1, 1, {64, 100}},
    };
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    int failures = 0;
    for (auto& cs : cases) {
        int B = cs.B, Tq = cs.Tq, Tk = cs.Tk, C = cs.C, H = cs.H, hd = C / H;
        AttnParams p{};
        p.batch = B; p.tq = Tq; p.tk = Tk; p.channels = C; p.heads = H; p.hd = hd;
        p.causal = cs.causal; p.scale = 1.0f / std::sqrt((float)hd); p.accumulate = 1;
        p.key_lens = cs.lens.empty() ? nullptr : cs.lens.data();
        std::vector<float> qbuf, kvbuf;
        if (cs.packed) {
            p.q_ld = p.k_ld = p.v_ld = 3 * C; p.q_off = 0; p.k_off = C; p.v_off = 2 * C;
            qbuf.resize((size_t)B * Tq * 3 * C);
            for (auto& x : qbuf) x = U(rng) * 2;
        } else {
            p.q_ld = C; p.q_off = 0; p.k_ld = p.v_ld = 2 * C; p.k_off = 0; p.v_off = C;
            qbuf.resize((size_t)B * Tq * C); kvbuf.resize((size_t)B * Tk * 2 * C);
            for (auto& x : qbuf) x = U(rng) * 2;
            for (auto& x : kvbuf) x = U(rng) * 2;
        }
        const float* q = qbuf.data();
        const float* kv = cs.packed ? qbuf.data() : kvbuf.data();
        std::vector<float> dout((size_t)B * Tq * C);
        for (auto& x : dout) x = U(rng);
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
        // kernels
        std::vector<float> out((size_t)B * Tq * C, std::nanf("")), lse((size_t)B * H * Tq, std::nanf("")), dsum(lse.size(), std::nanf(""));
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
        if (tc) {  // the forward pass reads the bf16 copies (which the backward pass reuses)
            heads(qh.data(), q, Tq, p.q_ld, p.q_off);
            heads(kh.data(), kv, Tk, p.k_ld, p.k_off);
            heads(vh.data(), kv, Tk, p.v_ld, p.v_off);
            auto f2 = hd <= 32 ? attention_forward_bf16_d32 : hd <= 64 ? attention_forward_bf16_d64 : attention_forward_bf16_d128;
            launch(gq, 128, [&] { f2(out.data(), lse.data(), qh.data(), kh.data(), vh.data(), p); });
        } else {
            launch(gq, 256, [&] { fwd(out.data(), lse.data(), q, kv, p); });
        }
        unsigned rows = B * Tq * H;
        launch({(rows + 7) / 8, 1, 1}, 256, [&] { attention_backward_dot_f32(dsum.data(), dout.data(), out.data(), p); });
        // gradients start from random values: backward must accumulate
        std::vector<float> dq(qbuf.size()), dkv(cs.packed ? 0 : kvbuf.size());
        for (auto& x : dq) x = U(rng);
        for (auto& x : dkv) x = U(rng);
        std::vector<double> edq(rdq.size()), edkv(rdkv.size());
        for (size_t i = 0; i < dq.size(); i++) edq[i] = dq[i] + rdq[i];
        for (size_t i = 0; i < dkv.size(); i++) edkv[i] = dkv[i] + rdkv[i];
        float* dkvp = cs.packed ? dq.data() : dkv.data();
        auto backward = [&](float* dkvp_, float* dqp_) {
            if (!tc) {
                launch(gk, 256, [&] { dkvk(dkvp_, q, kv, dout.data(), lse.data(), dsum.data(), p); });
                launch(gq, 256, [&] { dqk(dqp_, q, kv, dout.data(), lse.data(), dsum.data(), p); });
                return;
            }
            heads(doh.data(), dout.data(), Tq, C, 0);
            unsigned srows = B * H * tqp;
            launch({(srows + 7) / 8, 1, 1}, 256, [&] { attention_backward_stats(stats.data(), dout.data(), out.data(), lse.data(), p); });
            auto dkv2 = hd <= 32 ? attention_backward_dkv_bf16_d32 : hd <= 64 ? attention_backward_dkv_bf16_d64 : attention_backward_dkv_bf16_d128;
            auto dq2 = hd <= 32 ? attention_backward_dq_bf16_d32 : hd <= 64 ? attention_backward_dq_bf16_d64 : attention_backward_dq_bf16_d128;
            launch(gk, 128, [&] { dkv2(dkvp_, qh.data(), kh.data(), vh.data(), doh.data(), stats.data(), p); });
            launch(gq, 128, [&] { dq2(dqp_, qh.data(), kh.data(), vh.data(), doh.data(), stats.data(), p); });
        };
        backward(dkvp, dq.data());
        double e1 = rel(out, rout), e2 = rel(lse, rlse), e3 = rel(dq, edq), e4 = cs.packed ? 0 : rel(dkv, edkv);
        // gradient-only error (without the initial values) is the stricter measure
        std::vector<float> gq_only(dq.size()); std::vector<double> rq_only(rdq);
        for (size_t i = 0; i < dq.size(); i++) gq_only[i] = dq[i] - (float)(edq[i] - rdq[i]);
        double e5 = rel(gq_only, rq_only);
        // Overwrite mode (accumulate = 0): whatever the buffers held (large values here), they
        // end up holding exactly the gradient, padding-key tiles included (zeros).
        p.accumulate = 0;
        std::vector<float> dq2(dq.size()), dkv2(dkv.size());
        for (auto& x : dq2) x = 1e3f * U(rng);
        for (auto& x : dkv2) x = 1e3f * U(rng);
        float* dkvp2 = cs.packed ? dq2.data() : dkv2.data();
        backward(dkvp2, dq2.data());
        p.accumulate = 1;
        double e6 = rel(dq2, rdq), e7 = cs.packed ? 0 : rel(dkv2, rdkv);
        bool ok = e1 < tol_f && e2 < tol_f && e3 < tol_g && e4 < tol_g && e5 < tol_g && e6 < tol_g && e7 < tol_g &&
                  std::isfinite(e1 + e2 + e3 + e4 + e5 + e6 + e7);
        failures += !ok;
        printf("%-32s out %.2e lse %.2e dsrc %.2e dkv %.2e grad-only %.2e overwrite %.2e/%.2e %s\n", cs.name, e1, e2, e3, e4, e5, e6, e7, ok ? "ok" : "FAIL");
    }
    return failures;
}
