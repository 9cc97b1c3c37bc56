// Runs embedding.cu's two-level backward (embedding_backward_segments, then
// embedding_backward_grouped) under the host emulator (shim.h), with the host grouping and
// segmentation written again here as embedding.rs does it (SEG = 64), and checks dtable
// (accumulated onto random values):
//   - ids of at most SEG positions: bitwise the CPU's sequential loop (dtable += dout[n] in n);
//   - longer ids: bitwise an f32 two-level sum in the documented order (segment partials from 0,
//     then dtable + p0 + p1 + ...), and within 1e-5 (relative) of an f64 reference;
//   - rows no id names: unchanged bitwise.
// The partial buffer is NaN-filled with a canary tail, so a read of an unwritten partial or a
// write past the end shows.
// Build and run:  g++ -std=c++20 -O2 -pthread -w embedding_emu.cpp -o /tmp/embedding_emu
//                 /tmp/embedding_emu
// Exit status: the number of failing cases.
#include "shim.h"
// Only embedding_forward (not run here) uses it, for its error word; it must still compile.
inline unsigned atomicOr(unsigned* a, unsigned v) { unsigned o = *a; *a |= v; return o; }
#include "../../engine/src/cuda/kernels/embedding.cu"
#include <cstdio>
#include <random>
#include <string>

static const unsigned SEG = 64, THREADS = 128;

// embedding.rs's group_by_id and segment.
struct Plan {
    std::vector<unsigned> rows, offsets, order, first, start, end;
};

static Plan plan(const std::vector<unsigned>& ids) {
    Plan p;
    p.order.resize(ids.size());
    for (unsigned n = 0; n < ids.size(); n++) p.order[n] = n;
    std::stable_sort(p.order.begin(), p.order.end(), [&](unsigned a, unsigned b) { return ids[a] < ids[b]; });
    for (unsigned k = 0; k < p.order.size(); k++) {
        unsigned id = ids[p.order[k]];
        if (p.rows.empty() || p.rows.back() != id) { p.rows.push_back(id); p.offsets.push_back(k); }
    }
    p.offsets.push_back(p.order.size());
    p.first.push_back(0);
    for (size_t g = 0; g + 1 < p.offsets.size(); g++) {
        unsigned b = p.offsets[g], e = p.offsets[g + 1];
        if (e - b > SEG)
            for (unsigned k = b; k < e; k += SEG) { p.start.push_back(k); p.end.push_back(std::min(k + SEG, e)); }
        p.first.push_back(p.start.size());
    }
    return p;
}

struct Case { const char* name; int rows, n, c; std::vector<unsigned> ids; };

static bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

static int run(const Case& cs, std::mt19937& rng) {
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    const int R = cs.rows, N = cs.n, C = cs.c;
    std::vector<float> dout((size_t)N * C), dtable((size_t)R * C);
    for (auto& v : dout) v = U(rng);
    for (auto& v : dtable) v = U(rng);
    const std::vector<float> dtable0 = dtable;
    Plan p = plan(cs.ids);
    const size_t S = p.start.size();
    const float canary = __int_as_float(0x5a5a5a5au);
    std::vector<float> partial(std::max<size_t>(S, 1) * C, std::nanf(""));
    partial.resize(2 * partial.size(), canary);
    const u64 uc = C;
    if (S > 0)
        launch({(unsigned)S, (unsigned)((C + THREADS - 1) / THREADS), 1}, THREADS, [&] {
            embedding_backward_segments(partial.data(), dout.data(), p.order.data(), p.start.data(), p.end.data(), uc);
        });
    launch({(unsigned)p.rows.size(), (unsigned)((C + THREADS - 1) / THREADS), 1}, THREADS, [&] {
        embedding_backward_grouped(dtable.data(), dout.data(), S > 0 ? partial.data() : nullptr, p.rows.data(),
                                   p.offsets.data(), p.order.data(), p.first.data(), uc);
    });
    bool canary_ok = true;
    for (size_t i = partial.size() / 2; i < partial.size(); i++) canary_ok &= same_bits(partial[i], canary);

    // references: the CPU's sequential f32 loop, the documented two-level f32 order, f64
    std::vector<float> seq = dtable0, two = dtable0;
    std::vector<double> f64(dtable0.begin(), dtable0.end());
    for (int n = 0; n < N; n++)
        for (int j = 0; j < C; j++) {
            seq[(size_t)cs.ids[n] * C + j] += dout[(size_t)n * C + j];
            f64[(size_t)cs.ids[n] * C + j] += dout[(size_t)n * C + j];
        }
    std::vector<int> count(R, 0);
    for (unsigned id : cs.ids) count[id]++;
    for (size_t g = 0; g < p.rows.size(); g++) {
        if (p.first[g] == p.first[g + 1]) continue;  // short: the same as seq
        for (int j = 0; j < C; j++) {
            float acc = dtable0[(size_t)p.rows[g] * C + j];
            for (unsigned s = p.first[g]; s < p.first[g + 1]; s++) {
                float part = 0.f;
                for (unsigned k = p.start[s]; k < p.end[s]; k++) part += dout[(size_t)p.order[k] * C + j];
                acc += part;
            }
            two[(size_t)p.rows[g] * C + j] = acc;
        }
    }
    long bad_short = 0, bad_long = 0, bad_untouched = 0, long_ids = 0, long_vs_seq = 0;
    double num = 0, den = 0;
    for (int r = 0; r < R; r++) {
        const bool is_long = count[r] > (int)SEG;
        long_ids += is_long;
        for (int j = 0; j < C; j++) {
            size_t i = (size_t)r * C + j;
            if (count[r] == 0) bad_untouched += !same_bits(dtable[i], dtable0[i]);
            else if (!is_long) bad_short += !same_bits(dtable[i], seq[i]);
            else {
                bad_long += !same_bits(dtable[i], two[i]);
                long_vs_seq += !same_bits(dtable[i], seq[i]);
                num += (dtable[i] - f64[i]) * (dtable[i] - f64[i]);
                den += f64[i] * f64[i];
            }
        }
    }
    const double err = den > 0 ? std::sqrt(num / den) : 0;
    const bool ok = bad_short == 0 && bad_long == 0 && bad_untouched == 0 && canary_ok && err < 1e-5 && std::isfinite(err);
    printf("%-28s N %5d C %4d: %zu groups (%ld long), %zu segments; mismatches short %ld long %ld untouched %ld; "
           "long vs f64 %.2e (vs CPU order: %ld differ), canary %s: %s\n",
           cs.name, N, C, p.rows.size(), long_ids, S, bad_short, bad_long, bad_untouched, err, long_vs_seq,
           canary_ok ? "ok" : "BROKEN", ok ? "ok" : "FAIL");
    return !ok;
}

int main() {
    std::mt19937 rng(5);
    std::vector<Case> cases;
    auto make = [&](const char* name, int rows, int n, int c, auto id_of) {
        Case cs{name, rows, n, c, {}};
        for (int k = 0; k < n; k++) cs.ids.push_back(id_of(k));
        cases.push_back(cs);
    };
    // BERT's token types, scaled down: 2 ids, both long, both ending in a short run
    make("two ids (token types)", 2, 2000, 200, [](int k) { return (unsigned)(k % 3 == 0); });
    // the same cuda_ops test shape: every id short, so all of dtable is bitwise the CPU's
    std::mt19937 r2(4);
    make("short ids only", 97, 300, 200, [&](int) { return (unsigned)(r2() % 40) * 2; });
    // lengths at the edges: 64 (short), 65 (one full run + 1), 128 (two full), 129, and short ids
    std::vector<unsigned> mixed;
    for (unsigned id = 0; id < 4; id++)
        for (unsigned k = 0; k < (unsigned[]){64, 65, 128, 129}[id]; k++) mixed.push_back(id * 3);
    for (int k = 0; k < 150; k++) mixed.push_back(20 + r2() % 30);
    std::shuffle(mixed.begin(), mixed.end(), r2);
    make("edge lengths 64/65/128/129", 50, (int)mixed.size(), 130, [&](int k) { return mixed[k]; });
    make("one id everywhere", 7, 300, 33, [](int) { return 6u; });
    make("one position", 3, 1, 1, [](int) { return 1u; });
    int failures = 0;
    for (auto& cs : cases) failures += run(cs, rng);
    return failures;
}
