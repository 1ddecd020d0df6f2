// The arithmetic of the decode kernel (lora_decode.cu), written once for the device and the host.
//
// Every floating-point operation that decides a result's bits lives here: a lane's share of a dot product
// over K (which elements, in which order, fused multiply-adds), the warp's reduction tree, and the epilogue
// (bias, the rank-r term, the scaling). The kernel calls these functions on the device; replay.cpp calls
// the same functions on the host, lane by lane in the device's order, so that tests on a machine without a
// GPU can compare the kernel's exact arithmetic with a float64 reference (tests/test_cuda_ext.py).
//
// Not replayed (the kernel's own code, outside this header): how elements reach the loaders (16-byte vector
// loads, the tail's scalar loads), the conversions between 16-bit floats and float (IEEE-exact by
// definition; the host uses bit-level versions checked against PyTorch's), the work queue and the barrier
// between the shrink and the epilogue, and anything the scheduler decides. None of them changes a value.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

namespace fastlora {

constexpr int kWarp = 32;        // lanes per warp
constexpr int kVec = 8;          // elements per lane per step: one 16-byte load of a 16-bit type
constexpr int kWarps = 4;        // warps per block (128 threads)
constexpr int kCols = 2;         // output columns per warp: each W vector load serves every row
constexpr int kMaxRows = 16;     // the largest row bucket: rows x columns accumulators fill one warp (16 x 2 = 32)
constexpr int kMaxRank = 256;    // ranks 1..256
// The reduction tree over a warp: five steps with offsets 16, 8, 4, 2, 1; in the step with offset o, lane l
// adds the partial sums of lane (l xor o). Each lane starts with V = rows x columns values (a power of two,
// at most 32). Steps with o >= V add every value (a butterfly); steps with o < V halve the values a lane
// keeps (a transposing reduction: the lane with bit o set keeps the upper half, its partner the lower), so
// the warp spends 31 shuffles on 32 values instead of 160, and lane l ends with the total of value l % V.
constexpr int kTreeSteps = 5;
FL_HD constexpr int tree_offset(int step) { return 16 >> step; }

// In a step with offset `off`, what lane `lane` sends for its slot i (slots below `off` when transposing).
template <int V>
FL_HD float tree_send(const float (&v)[V], int off, int lane, int i) {
    if (off >= V) return v[i];
    return (lane & off) ? v[i] : v[i + off];
}

// ... and what it keeps in slot i, given what its partner sent for that slot.
template <int V>
FL_HD void tree_keep(float (&v)[V], int off, int lane, int i, float received) {
    const float mine = (off >= V || !(lane & off)) ? v[i] : v[i + off];
    v[i] = mine + received;
}

// How many slots a step works on.
template <int V>
FL_HD constexpr int tree_slots(int off) { return off >= V ? V : off; }

FL_HD float fl_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);  // correctly rounded, as the device's FFMA
#endif
}

// One lane's share of acc[m][c] += x[m, k] * w[c, k] over k, for rows m < rows and COLS columns: the lane
// takes the vectors k0 = (lane + 32 i) * 8 and, within a vector, elements k0 .. k0 + 7 in order. The
// loaders fill 8 floats (zeros past K and for columns past N). Used for the base GEMV (w = W's rows) and,
// with MB = COLS = 1, for the shrink (w = A's rows).
template <int MB, int COLS, class LoadX, class LoadW>
FL_HD void lane_dot(const LoadX& load_x, const LoadW& load_w, int64_t K, int lane, int rows,
                    float (&acc)[MB][COLS]) {
    for (int m = 0; m < MB; ++m)
        for (int c = 0; c < COLS; ++c) acc[m][c] = 0.0f;
    for (int64_t k0 = int64_t(lane) * kVec; k0 < K; k0 += int64_t(kWarp) * kVec) {
        float w[COLS][kVec];
        for (int c = 0; c < COLS; ++c) load_w(c, k0, w[c]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int m = 0; m < MB; ++m) {
            if (m < rows) {
                float xv[kVec];
                load_x(m, k0, xv);
                for (int c = 0; c < COLS; ++c)
                    for (int e = 0; e < kVec; ++e) acc[m][c] = fl_fma(xv[e], w[c][e], acc[m][c]);
            }
        }
    }
}

// The rank-r term of one output: sum over j < rank of S[j] * B[j], j ascending, from 0.
template <class LoadS, class LoadB>
FL_HD float lora_term(const LoadS& s, const LoadB& b, int rank) {
    float acc = 0.0f;
    for (int j = 0; j < rank; ++j) acc = fl_fma(s(j), b(j), acc);
    return acc;
}

// y before rounding: (x . w + bias) + scale * lora, one fused multiply-add for the LoRA term.
FL_HD float epilogue(float dot, float bias, float scale, float lora) { return fl_fma(scale, lora, dot + bias); }

// The row bucket the kernel is compiled for: the smallest of 1, 2, 4, 8, 16 that holds `rows`.
FL_HD int row_bucket(int64_t rows) {
    int mb = 1;
    while (mb < rows) mb *= 2;
    return mb;
}

}  // namespace fastlora
