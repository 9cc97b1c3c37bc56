// Runs learned_scores.cu (attention with general and additive scores) under the host emulator
// (shim.h), as engine/src/cuda/learned_scores.rs launches it, against a reference written here
// in double precision from the math of engine/src/cpu/attention_ex.rs:
//   forward: features (learned_scores_project), learned_attention_forward -> out, lse;
//   backward: features again, learned_attention_backward_rows (dq features, the additive v's
//   per-row shares, D), learned_attention_backward_keys (dv, and dk or the dk features), then
//   learned_scores_project_back_input, and the weight gradients' chunked sums
//   (learned_scores_weight_partials / _row_partials, then learned_scores_sum_chunks).
// Cases: general and additive (A below, equal to and above hd), packed self-attention and split
// cross-attention (Tq != Tk), causal or not, key padding masks, head dims 16, 33, 64, 128, row
// counts that cross the 16-row blocks and 32-key tiles, f32 and bf16 buffers (the reference then
// sees the inputs rounded to bf16), accumulating onto random gradients and overwriting
// NaN-filled ones (every element must then be written), and canaries after every output.
// Checks out, lse, dq, dk, dv and the score parameters' gradients: relative error (norm of the
// difference over the norm) within 2e-5 for f32 buffers and 3e-2 (the engine's BF16_TOL) for
// bf16 ones. Takes ~4 minutes on two cores.
// Build and run:  g++ -std=c++20 -O2 -pthread -w learned_scores_emu.cpp -o /tmp/ls_emu && /tmp/ls_emu [FILTER ...]
// (FILTER: only the cases whose name contains it)
// Exit status: the number of failing cases.
#include "shim.h"
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
#include "../../engine/src/cuda/kernels/bf16.cuh"
#include "../../engine/src/cuda/kernels/learned_scores.cu"
#include <cstdio>
#include <random>
#include <string>

static const float CANARY = 12345.0f;

// learned_scores.rs's row_chunks: (rows per chunk, chunks), here with a small cap so the tests'
// row counts (tens to hundreds) span several chunks, an uneven last one among them.
static std::pair<int, int> row_chunks(int n_rows) {
    const int max_chunks = 128, tile = LS_WTILE;
    int chunks = std::max(1, std::min((n_rows + 63) / 64, max_chunks));
    int chunk = ((n_rows + chunks - 1) / chunks + tile - 1) / tile * tile;
    return {chunk, std::max(1, (n_rows + chunk - 1) / chunk)};
}

// dw += alpha x_h^T dfeat_h as learned_scores.rs's project_back: partial sums per chunk of rows
// (NaN-filled first: every partial must be written), then their sum.
static void project_back_weight(float* dw, const float* x, const float* dfeat, int rows, int ld, int off, float alpha, LsParams p) {
    auto [chunk, chunks] = row_chunks(p.batch * rows);
    const size_t len = (size_t)p.heads * p.hd * p.width;
    std::vector<float> part(chunks * len, std::nanf(""));
    const unsigned tiles = (unsigned)(((p.hd + LS_WTILE - 1) / LS_WTILE) * ((p.width + LS_WTILE - 1) / LS_WTILE));
    launch(Dim3{tiles, (unsigned)p.heads, (unsigned)chunks}, 256, [&] { learned_scores_weight_partials(part.data(), x, dfeat, rows, ld, off, chunk, p); });
    launch(Dim3{(unsigned)((len + 255) / 256), 1, 1}, 256, [&] { learned_scores_sum_chunks(dw, part.data(), chunks, (int)len, alpha); });
}

// dva += the additive v's row shares, summed as learned_scores.rs's sum_rows.
static void sum_rows(float* dva, const float* dva_rows, LsParams p) {
    auto [chunk, chunks] = row_chunks(p.batch * p.tq);
    const size_t len = (size_t)p.heads * p.width;
    std::vector<float> part(chunks * len, std::nanf(""));
    launch(Dim3{(unsigned)p.heads, (unsigned)chunks, 1}, LS_MAX_W, [&] { learned_scores_row_partials(part.data(), dva_rows, chunk, p); });
    launch(Dim3{(unsigned)((len + 255) / 256), 1, 1}, 256, [&] { learned_scores_sum_chunks(dva, part.data(), chunks, (int)len, 1.0f); });
}
static const size_t GUARD = 16;

// A device buffer of n elements, f32 or bf16, with GUARD canaries after it.
struct Buf {
    bool bf16;
    size_t n;
    std::vector<float> f;
    std::vector<unsigned short> h;
    Buf(bool bf16, size_t n) : bf16(bf16), n(n) {
        if (bf16) h.assign(n + GUARD, f2bf(CANARY)); else f.assign(n + GUARD, CANARY);
    }
    float get(size_t i) const { return bf16 ? bf2f(h[i]) : f[i]; }
    void set(size_t i, float v) { if (bf16) h[i] = f2bf(v); else f[i] = v; }
    float* ptr() { return bf16 ? (float*)h.data() : f.data(); }
    bool canaries_intact() const {
        const float canary = bf16 ? bf2f(f2bf(CANARY)) : CANARY;
        for (size_t i = n; i < n + GUARD; i++) if (get(i) != canary) return false;
        return true;
    }
};

struct Case {
    const char* name;
    int B, Tq, Tk, H, hd;
    bool packed, causal, additive;
    int A;                 // additive width
    bool bf16;
    std::vector<unsigned> key_lens;  // empty: none
};

static double rel(const std::vector<double>& got, const std::vector<double>& want) {
    double d = 0, w = 0;
    for (size_t i = 0; i < got.size(); i++) { d += (got[i] - want[i]) * (got[i] - want[i]); w += want[i] * want[i]; }
    return w == 0 ? std::sqrt(d) : std::sqrt(d / w);
}

static int run_case(const Case& c, bool accumulate) {
    const int B = c.B, Tq = c.Tq, Tk = c.Tk, H = c.H, hd = c.hd, C = H * hd;
    const int W = c.additive ? c.A : hd;
    std::mt19937_64 rng(1234 + B * 7 + Tq * 13 + hd * 17 + W * 19 + c.causal + 2 * c.packed + 4 * c.additive);
    std::normal_distribution<double> nd(0.0, 1.0);
    auto rnd = [&](double sd) { return (float)(sd * nd(rng)); };
    // layouts
    const int q_ld = c.packed ? 3 * C : C, q_off = 0;
    const int k_ld = c.packed ? 3 * C : 2 * C, k_off = c.packed ? C : 0;
    const int v_ld = k_ld, v_off = c.packed ? 2 * C : C;
    const size_t nq = (size_t)B * Tq * q_ld, nkv = (size_t)B * Tk * k_ld;
    Buf qb(c.bf16, nq), kvb(c.bf16, c.packed ? 0 : nkv);
    for (size_t i = 0; i < nq; i++) qb.set(i, rnd(1.0));
    for (size_t i = 0; i < kvb.n; i++) kvb.set(i, rnd(1.0));
    Buf& kvsrc = c.packed ? qb : kvb;
    // score parameters (f32): general W near the identity, additive Wq, Wk, v
    std::vector<float> w1((size_t)H * hd * W), w2(c.additive ? (size_t)H * hd * W : 0), va(c.additive ? (size_t)H * W : 0);
    for (int h = 0; h < H; h++)
        for (int d = 0; d < hd; d++)
            for (int e = 0; e < W; e++)
                w1[((size_t)h * hd + d) * W + e] = c.additive ? rnd(0.5 / std::sqrt((double)hd)) : (d == e ? 1.0f : 0.0f) + rnd(0.3);
    for (auto& x : w2) x = rnd(0.5 / std::sqrt((double)hd));
    for (auto& x : va) x = rnd(1.0);
    std::vector<unsigned> lens = c.key_lens;
    const float scale = 1.0f / std::sqrt((float)hd);

    LsParams p{};
    p.batch = B; p.tq = Tq; p.tk = Tk; p.heads = H; p.hd = hd;
    p.q_ld = q_ld; p.q_off = q_off; p.k_ld = k_ld; p.k_off = k_off; p.v_ld = v_ld; p.v_off = v_off;
    p.causal = c.causal; p.io_bf16 = c.bf16; p.width = W; p.additive = c.additive; p.accumulate = accumulate;
    p.key_lens = lens.empty() ? nullptr : lens.data();

    auto blocks = [](size_t n) { return Dim3{(unsigned)((n + 255) / 256), 1, 1}; };
    // features, as learned_scores.rs makes them
    std::vector<float> qf((size_t)B * H * Tq * W + GUARD, CANARY), kf(c.additive ? (size_t)B * H * Tk * W + GUARD : 0, CANARY);
    auto features = [&] {
        launch(blocks((size_t)B * H * Tq * W), 256, [&] { learned_scores_project(qf.data(), qb.ptr(), w1.data(), Tq, q_ld, q_off, c.additive ? 1.0f : scale, p); });
        if (c.additive)
            launch(blocks((size_t)B * H * Tk * W), 256, [&] { learned_scores_project(kf.data(), kvsrc.ptr(), w2.data(), Tk, k_ld, k_off, 1.0f, p); });
    };
    features();
    const unsigned rows_blocks_q = (Tq + LS_ROWS - 1) / LS_ROWS, rows_blocks_k = (Tk + LS_ROWS - 1) / LS_ROWS;
    Buf out(c.bf16, (size_t)B * Tq * C);
    std::vector<float> lse((size_t)B * H * Tq + GUARD, CANARY);
    launch(Dim3{rows_blocks_q, (unsigned)H, (unsigned)B}, LS_THREADS, [&] {
        learned_attention_forward(out.ptr(), lse.data(), qf.data(), c.additive ? kf.data() : nullptr, kvsrc.ptr(), c.additive ? va.data() : nullptr, p);
    });

    // ---- reference (double), on the values the kernels saw ----
    auto Q = [&](int b, int i, int h, int d) { return (double)qb.get(((size_t)b * Tq + i) * q_ld + q_off + h * hd + d); };
    auto K = [&](int b, int j, int h, int d) { return (double)kvsrc.get(((size_t)b * Tk + j) * k_ld + k_off + h * hd + d); };
    auto V = [&](int b, int j, int h, int d) { return (double)kvsrc.get(((size_t)b * Tk + j) * v_ld + v_off + h * hd + d); };
    std::vector<double> dout_ref((size_t)B * Tq * C);
    Buf dout(c.bf16, (size_t)B * Tq * C);
    for (size_t i = 0; i < dout.n; i++) { dout.set(i, rnd(1.0)); dout_ref[i] = dout.get(i); }
    std::vector<double> out_ref((size_t)B * Tq * C), lse_ref((size_t)B * H * Tq);
    std::vector<double> dq_ref((size_t)B * Tq * C, 0), dk_ref((size_t)B * Tk * C, 0), dv_ref((size_t)B * Tk * C, 0);
    std::vector<double> dw1_ref(w1.size(), 0), dw2_ref(w2.size(), 0), dva_ref(va.size(), 0);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            // features
            std::vector<double> qfe((size_t)Tq * W, 0), kfe((size_t)Tk * W, 0);
            for (int i = 0; i < Tq; i++)
                for (int e = 0; e < W; e++) {
                    double s = 0;
                    for (int d = 0; d < hd; d++) s += Q(b, i, h, d) * w1[((size_t)h * hd + d) * W + e];
                    qfe[(size_t)i * W + e] = c.additive ? s : scale * s;
                }
            for (int j = 0; j < Tk; j++)
                for (int e = 0; e < W; e++) {
                    double s = 0;
                    if (c.additive) for (int d = 0; d < hd; d++) s += K(b, j, h, d) * w2[((size_t)h * hd + d) * W + e];
                    else s = K(b, j, h, e);
                    kfe[(size_t)j * W + e] = s;
                }
            std::vector<double> dqf((size_t)Tq * W, 0), dkf((size_t)Tk * W, 0);
            for (int i = 0; i < Tq; i++) {
                int n = lens.empty() ? Tk : (int)lens[b];
                if (c.causal) n = std::min(n, i + 1);
                std::vector<double> s(n), pr(n), dp(n);
                double mx = -1e300;
                for (int j = 0; j < n; j++) {
                    double x = 0;
                    for (int e = 0; e < W; e++) {
                        if (c.additive) x += va[(size_t)h * W + e] * std::tanh(qfe[(size_t)i * W + e] + kfe[(size_t)j * W + e]);
                        else x += qfe[(size_t)i * W + e] * kfe[(size_t)j * W + e];
                    }
                    s[j] = x; mx = std::max(mx, x);
                }
                double sum = 0;
                for (int j = 0; j < n; j++) { pr[j] = std::exp(s[j] - mx); sum += pr[j]; }
                for (int j = 0; j < n; j++) pr[j] /= sum;
                lse_ref[((size_t)b * H + h) * Tq + i] = mx + std::log(sum);
                for (int d = 0; d < hd; d++) {
                    double y = 0;
                    for (int j = 0; j < n; j++) y += pr[j] * V(b, j, h, d);
                    out_ref[((size_t)b * Tq + i) * C + h * hd + d] = y;
                }
                const double* dy = &dout_ref[((size_t)b * Tq + i) * C + h * hd];
                double pdp = 0;
                for (int j = 0; j < n; j++) {
                    double x = 0;
                    for (int d = 0; d < hd; d++) x += dy[d] * V(b, j, h, d);
                    dp[j] = x; pdp += pr[j] * x;
                    for (int d = 0; d < hd; d++) dv_ref[((size_t)b * Tk + j) * C + h * hd + d] += pr[j] * dy[d];
                }
                for (int j = 0; j < n; j++) {
                    double ds = pr[j] * (dp[j] - pdp);
                    for (int e = 0; e < W; e++) {
                        if (c.additive) {
                            double th = std::tanh(qfe[(size_t)i * W + e] + kfe[(size_t)j * W + e]);
                            double g = ds * va[(size_t)h * W + e] * (1 - th * th);
                            dqf[(size_t)i * W + e] += g;
                            dkf[(size_t)j * W + e] += g;
                            dva_ref[(size_t)h * W + e] += ds * th;
                        } else {
                            dqf[(size_t)i * W + e] += ds * kfe[(size_t)j * W + e];
                            dkf[(size_t)j * W + e] += ds * qfe[(size_t)i * W + e];
                        }
                    }
                }
            }
            // back through the projections
            const double a1 = c.additive ? 1.0 : scale;
            for (int i = 0; i < Tq; i++)
                for (int d = 0; d < hd; d++)
                    for (int e = 0; e < W; e++) {
                        dq_ref[((size_t)b * Tq + i) * C + h * hd + d] += a1 * dqf[(size_t)i * W + e] * w1[((size_t)h * hd + d) * W + e];
                        dw1_ref[((size_t)h * hd + d) * W + e] += a1 * Q(b, i, h, d) * dqf[(size_t)i * W + e];
                    }
            for (int j = 0; j < Tk; j++)
                for (int d = 0; d < hd; d++) {
                    if (!c.additive) { dk_ref[((size_t)b * Tk + j) * C + h * hd + d] += dkf[(size_t)j * W + d]; continue; }
                    for (int e = 0; e < W; e++) {
                        dk_ref[((size_t)b * Tk + j) * C + h * hd + d] += dkf[(size_t)j * W + e] * w2[((size_t)h * hd + d) * W + e];
                        dw2_ref[((size_t)h * hd + d) * W + e] += K(b, j, h, d) * dkf[(size_t)j * W + e];
                    }
                }
        }

    // ---- backward, as learned_scores.rs runs it ----
    const size_t nd_q = c.packed ? (size_t)B * Tq * 3 * C : (size_t)B * Tq * C;
    Buf dq(c.bf16, nd_q), dkv(c.bf16, c.packed ? 0 : (size_t)B * Tk * 2 * C);
    Buf& dkvdst = c.packed ? dq : dkv;
    // the starting gradients: random (accumulate) or NaN (overwrite: every element is written)
    std::vector<double> start_q(dq.n), start_kv(dkv.n);
    for (size_t i = 0; i < dq.n; i++) { dq.set(i, accumulate ? rnd(1.0) : std::nanf("")); start_q[i] = dq.get(i); }
    for (size_t i = 0; i < dkv.n; i++) { dkv.set(i, accumulate ? rnd(1.0) : std::nanf("")); start_kv[i] = dkv.get(i); }
    std::vector<float> dw1(w1.size() + GUARD, CANARY), dw2(w2.size() + GUARD, CANARY), dva(va.size() + GUARD, CANARY);
    std::vector<double> dw1_start(w1.size()), dw2_start(w2.size()), dva_start(va.size());
    for (size_t i = 0; i < w1.size(); i++) { dw1[i] = rnd(0.1); dw1_start[i] = dw1[i]; }
    for (size_t i = 0; i < w2.size(); i++) { dw2[i] = rnd(0.1); dw2_start[i] = dw2[i]; }
    for (size_t i = 0; i < va.size(); i++) { dva[i] = rnd(0.1); dva_start[i] = dva[i]; }
    std::fill(qf.begin(), qf.end() - GUARD, std::nanf(""));
    if (c.additive) std::fill(kf.begin(), kf.end() - GUARD, std::nanf(""));
    features();
    std::vector<float> dqf((size_t)B * H * Tq * W + GUARD, std::nanf("")), dvar(c.additive ? (size_t)B * H * Tq * W + GUARD : 0, std::nanf(""));
    std::vector<float> dsum((size_t)B * H * Tq + GUARD, std::nanf("")), dkf(c.additive ? (size_t)B * H * Tk * W + GUARD : 0, std::nanf(""));
    launch(Dim3{rows_blocks_q, (unsigned)H, (unsigned)B}, LS_THREADS, [&] {
        learned_attention_backward_rows(dqf.data(), c.additive ? dvar.data() : nullptr, dsum.data(), qf.data(), c.additive ? kf.data() : nullptr,
                                        kvsrc.ptr(), c.additive ? va.data() : nullptr, out.ptr(), dout.ptr(), lse.data(), p);
    });
    launch(Dim3{rows_blocks_k, (unsigned)H, (unsigned)B}, LS_THREADS, [&] {
        learned_attention_backward_keys(dkvdst.ptr(), c.additive ? dkf.data() : nullptr, qf.data(), c.additive ? kf.data() : nullptr,
                                        kvsrc.ptr(), c.additive ? va.data() : nullptr, dout.ptr(), lse.data(), dsum.data(), p);
    });
    const float a1 = c.additive ? 1.0f : scale;
    launch(blocks((size_t)B * Tq * C), 256, [&] { learned_scores_project_back_input(dq.ptr(), dqf.data(), w1.data(), Tq, q_ld, q_off, a1, p); });
    project_back_weight(dw1.data(), qb.ptr(), dqf.data(), Tq, q_ld, q_off, a1, p);
    if (c.additive) {
        launch(blocks((size_t)B * Tk * C), 256, [&] { learned_scores_project_back_input(dkvdst.ptr(), dkf.data(), w2.data(), Tk, k_ld, k_off, 1.0f, p); });
        project_back_weight(dw2.data(), kvsrc.ptr(), dkf.data(), Tk, k_ld, k_off, 1.0f, p);
        sum_rows(dva.data(), dvar.data(), p);
    }

    // ---- compare ----
    const double tol = c.bf16 ? 3e-2 : 2e-5;  // bf16: the engine's CUDA tests' BF16_TOL
    int fails = 0;
    double worst = 0;
    std::string name = std::string(c.name) + (c.bf16 ? " bf16" : " f32") + (accumulate ? " acc" : " set");
    auto check = [&](const char* what, const std::vector<double>& got, const std::vector<double>& want) {
        double e = rel(got, want);
        bool finite = true;
        for (double x : got) finite &= std::isfinite(x);
        if (!(e <= tol) || !finite) { printf("FAIL %s: %s rel err %.3e%s\n", name.c_str(), what, e, finite ? "" : " (non-finite)"); fails++; }
        worst = std::max(worst, e);
        return e;
    };
    std::vector<double> g, w;
    for (size_t i = 0; i < out.n; i++) g.push_back(out.get(i));
    double e_out = check("out", g, out_ref);
    g.assign(lse.begin(), lse.end() - GUARD);
    check("lse", g, lse_ref);
    // dq, dk, dv in the source layout: start (accumulate) + reference
    auto grads_at = [&](Buf& buf, const std::vector<double>& start, int T, int ld, int off, const std::vector<double>& ref, const char* what) {
        std::vector<double> got, want;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++)
                for (int x = 0; x < C; x++) {
                    size_t at = ((size_t)b * T + t) * ld + off + x;
                    got.push_back(buf.get(at));
                    want.push_back((accumulate ? start[at] : 0.0) + ref[((size_t)b * T + t) * C + x]);
                }
        check(what, got, want);
    };
    grads_at(dq, start_q, Tq, q_ld, q_off, dq_ref, "dq");
    Buf& kvg = c.packed ? dq : dkv;
    const std::vector<double>& kvs = c.packed ? start_q : start_kv;
    grads_at(kvg, kvs, Tk, k_ld, k_off, dk_ref, "dk");
    grads_at(kvg, kvs, Tk, v_ld, v_off, dv_ref, "dv");
    auto params = [&](const std::vector<float>& got_f, const std::vector<double>& start, const std::vector<double>& ref, const char* what) {
        std::vector<double> got(ref.size()), want(ref.size());
        for (size_t i = 0; i < ref.size(); i++) { got[i] = got_f[i]; want[i] = start[i] + ref[i]; }
        check(what, got, want);
        for (size_t i = ref.size(); i < ref.size() + GUARD; i++)
            if (got_f[i] != CANARY) { printf("FAIL %s: %s written past its end\n", name.c_str(), what); fails++; break; }
    };
    params(dw1, dw1_start, dw1_ref, c.additive ? "dWq" : "dW");
    if (c.additive) { params(dw2, dw2_start, dw2_ref, "dWk"); params(dva, dva_start, dva_ref, "dv (score)"); }
    // canaries
    const char* bufs[] = {"out", "q/dq", "kv/dkv"};
    Buf* all[] = {&out, &dq, &dkv};
    for (int k = 0; k < 3; k++) if (!all[k]->canaries_intact()) { printf("FAIL %s: written past %s\n", name.c_str(), bufs[k]); fails++; }
    auto tail = [&](const std::vector<float>& v, const char* what) {
        if (v.empty()) return;
        for (size_t i = v.size() - GUARD; i < v.size(); i++)
            if (!(v[i] == CANARY || std::isnan(v[i]))) { printf("FAIL %s: written past %s\n", name.c_str(), what); fails++; return; }
    };
    tail(lse, "lse"); tail(qf, "q features"); tail(kf, "k features");
    if (!fails) printf("ok   %s (out rel err %.2e, worst of all %.2e)\n", name.c_str(), e_out, worst);
    return fails;
}

int main(int argc, char** argv) {
    std::vector<Case> cases = {
        {"general packed causal hd16", 2, 70, 70, 2, 16, true, true, false, 0, false, {}},
        {"general packed bidirectional masked hd33", 2, 45, 45, 2, 33, true, false, false, 0, false, {45, 17}},
        {"general split cross masked hd64", 2, 21, 50, 2, 64, false, false, false, 0, false, {50, 33}},
        {"general packed causal hd128", 1, 40, 40, 1, 128, true, true, false, 0, false, {}},
        {"additive packed causal hd16 A24", 2, 70, 70, 2, 16, true, true, true, 24, false, {}},
        {"additive split cross masked hd32 A32", 2, 19, 37, 2, 32, false, false, true, 32, false, {37, 5}},
        {"additive packed masked hd33 A128", 1, 34, 34, 2, 33, true, false, true, 128, false, {20}},
        {"additive packed causal masked hd64 A8", 2, 50, 50, 1, 64, true, true, true, 8, false, {50, 23}},
    };
    int fails = 0;
    for (auto c : cases)
    {
        // arguments, if any: run only the cases whose names contain one of them
        bool wanted = argc < 2;
        for (int a = 1; a < argc; a++) wanted = wanted || std::string(c.name).find(argv[a]) != std::string::npos;
        if (!wanted) continue;
        for (bool bf16 : {false, true})
            for (int acc : {1, 0}) {
                c.bf16 = bf16;
                fails += run_case(c, acc);
            }
    }
    printf("%d failing\n", fails);
    return fails;
}
