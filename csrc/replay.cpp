// The decode kernel's arithmetic replayed on the host (tests/test_cuda_ext.py loads this with ctypes).
//
// For every output the kernel computes, the replay runs the same functions of lora_decode_math.h in the
// device's order: each of the 32 lanes' share of the dot product, the warp's reduction tree step by step
// (every lane's sends gathered before any lane adds, as the shuffle does), then the epilogue. Inputs are
// float arrays holding the 16-bit values exactly (a widening is exact); outputs are floats before the final
// rounding to 16 bits, which the test does with PyTorch (the kernel uses the IEEE rounding intrinsics).
#include <cstdint>
#include <vector>

#include "lora_decode_math.h"

using namespace fastlora;

namespace {

// Loads of 8 elements from a float row of length K, zeros past the end, as the kernel's load8.
struct RowLoader {
    const float* row;
    int64_t K;
    void operator()(int, int64_t k0, float (&v)[kVec]) const {
        for (int e = 0; e < kVec; ++e) v[e] = k0 + e < K ? row[k0 + e] : 0.0f;
    }
};

// The warp's reduction of V values per lane, lanes in lockstep: lane l's v[0] ends as the total of value
// l % V (the kernel's warp_tree).
template <int V>
void warp_tree_replay(float (&lanes)[kWarp][V]) {
    for (int step = 0; step < kTreeSteps; ++step) {
        const int off = tree_offset(step);
        for (int i = 0; i < tree_slots<V>(off); ++i) {
            float sent[kWarp];
            for (int l = 0; l < kWarp; ++l) sent[l] = tree_send(lanes[l], off, l, i);
            for (int l = 0; l < kWarp; ++l) tree_keep(lanes[l], off, l, i, sent[l ^ off]);
        }
    }
}

// One warp's outputs for columns n0, n0 + 1 and rows < rows, with MB the row bucket: the base dot products
// (each lane's share, then the tree), as the kernel's GEMV.
template <int MB>
void gemv_warp(const float* x, const float* w, int64_t N, int64_t K, int rows, int64_t n0, float* dots) {
    float lanes[kWarp][MB * kCols];
    for (int l = 0; l < kWarp; ++l) {
        float acc[MB][kCols];
        lane_dot<MB, kCols>([&](int m, int64_t k0, float (&v)[kVec]) { RowLoader{x + m * K, K}(0, k0, v); },
                            [&](int c, int64_t k0, float (&v)[kVec]) {
                                if (n0 + c < N) RowLoader{w + (n0 + c) * K, K}(0, k0, v);
                                else for (int e = 0; e < kVec; ++e) v[e] = 0.0f;
                            },
                            K, l, rows, acc);
        for (int m = 0; m < MB; ++m)
            for (int c = 0; c < kCols; ++c) lanes[l][m * kCols + c] = acc[m][c];
    }
    warp_tree_replay<MB * kCols>(lanes);
    for (int p = 0; p < MB * kCols; ++p) dots[p] = lanes[p][0];  // lane p holds output p
}

template <int MB>
void gemv_all(const float* x, const float* w, int64_t M, int64_t N, int64_t K, float* out) {
    std::vector<float> dots(MB * kCols);
    for (int64_t n0 = 0; n0 < N; n0 += kCols) {
        gemv_warp<MB>(x, w, N, K, int(M), n0, dots.data());
        for (int64_t m = 0; m < M; ++m)
            for (int c = 0; c < kCols && n0 + c < N; ++c) out[m * N + n0 + c] = dots[m * kCols + c];
    }
}

}  // namespace

extern "C" {

// S (M, r_max) = x . A_a^T as the kernel's shrink: one warp per (row, lane), zero past the row's rank and
// for rows of adapter -1. x (M, K); A (n, r_max, K); index (M,) or null (adapter 0); ranks (n,).
void fastlora_replay_shrink(const float* x, const float* a, const int64_t* index, const int32_t* ranks, int64_t M,
                            int64_t K, int64_t r_max, float* s) {
    for (int64_t m = 0; m < M; ++m) {
        const int64_t ad = index ? index[m] : 0;
        for (int64_t j = 0; j < r_max; ++j) {
            float value = 0.0f;
            if (ad >= 0 && j < ranks[ad]) {
                float lanes[kWarp][1];
                for (int l = 0; l < kWarp; ++l) {
                    float acc[1][1];
                    lane_dot<1, 1>(RowLoader{x + m * K, K}, RowLoader{a + (ad * r_max + j) * K, K}, K, l, 1, acc);
                    lanes[l][0] = acc[0][0];
                }
                warp_tree_replay<1>(lanes);
                value = lanes[0][0];
            }
            s[m * r_max + j] = value;
        }
    }
}

// y before rounding (M, N): the GEMV with M's row bucket, then the epilogue with S from the shrink.
// W (N, K); bias (N,) or null; B (n, N, r_max); scales (n,). Returns 0, or -1 for M outside 1..16.
int fastlora_replay_decode(const float* x, const float* w, const float* bias, const float* b, const float* s,
                           const int64_t* index, const int32_t* ranks, const float* scales, int64_t M, int64_t N,
                           int64_t K, int64_t r_max, float* y) {
    switch (row_bucket(M)) {
        case 1: gemv_all<1>(x, w, M, N, K, y); break;
        case 2: gemv_all<2>(x, w, M, N, K, y); break;
        case 4: gemv_all<4>(x, w, M, N, K, y); break;
        case 8: gemv_all<8>(x, w, M, N, K, y); break;
        case 16: gemv_all<16>(x, w, M, N, K, y); break;
        default: return -1;
    }
    for (int64_t m = 0; m < M; ++m) {
        const int64_t ad = index ? index[m] : 0;
        for (int64_t n = 0; n < N; ++n) {
            float lora = 0.0f, scale = 0.0f;
            if (ad >= 0) {
                const float* srow = s + m * r_max;
                const float* brow = b + (ad * N + n) * r_max;
                lora = lora_term([&](int j) { return srow[j]; }, [&](int j) { return brow[j]; }, ranks[ad]);
                scale = scales[ad];
            }
            y[m * N + n] = epilogue(y[m * N + n], bias ? bias[n] : 0.0f, scale, lora);
        }
    }
    return 0;
}

// NF4 elements [0, numel) in fp32 as the kernel decodes them (before rounding to the compute dtype): absmax
// fp32 (absmax_codes null) or double-quantised (uint8 codes, scale per 256 blocks, offset, code table).
void fastlora_replay_nf4(const uint8_t* packed, const float* absmax, const uint8_t* absmax_codes, const float* scale,
                         float offset, const float* code_table, int64_t numel, int block_shift, float* out) {
    for (int64_t e = 0; e < numel; ++e) {
        const int64_t block = e >> block_shift;
        const float am = absmax_codes ? nf4_absmax_double(code_table[absmax_codes[block]], scale[block >> 8], offset)
                                      : absmax[block];
        out[e] = fl_mul(nf4_code_value(nf4_code(packed[e >> 1], e)), am);
    }
}

// The kernel's reduction tree over 32 values per lane: values[l * 32 + i] is lane l's value i; out[l] is
// what lane l ends with (the total of value l).
void fastlora_replay_tree32(const float* values, float* out) {
    float lanes[kWarp][kWarp];
    for (int l = 0; l < kWarp; ++l)
        for (int i = 0; i < kWarp; ++i) lanes[l][i] = values[l * kWarp + i];
    warp_tree_replay<kWarp>(lanes);
    for (int l = 0; l < kWarp; ++l) out[l] = lanes[l][0];
}

// The plain butterfly's tree (v[l] += v[l ^ o], o = 16 .. 1) on one value per lane, for the test that the
// transposing tree adds in the same order.
float fastlora_replay_butterfly(const float* values) {
    float v[kWarp];
    for (int l = 0; l < kWarp; ++l) v[l] = values[l];
    for (int step = 0; step < kTreeSteps; ++step) {
        float next[kWarp];
        for (int l = 0; l < kWarp; ++l) next[l] = v[l] + v[l ^ tree_offset(step)];
        for (int l = 0; l < kWarp; ++l) v[l] = next[l];
    }
    return v[0];
}

}  // extern "C"
