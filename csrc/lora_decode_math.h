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
// Loops over compile-time counts unrolled on the device, so that arrays indexed by them stay in registers.
#if defined(__CUDA_ARCH__)
#define FL_UNROLL _Pragma("unroll")
#else
#define FL_UNROLL
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

// Products and sums that must round separately (nvcc would otherwise fuse a * b + c into one FMA).
FL_HD float fl_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
FL_HD float fl_add(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

// --- NF4 (bitsandbytes' 4-bit NormalFloat; fastlora/nf4.py has the layout) -------------------------------

// The 16 code values, exactly fastlora.nf4.nf4_code_table() (fp32, as hexadecimal literals): the host's
// table below and the kernel's constant-memory one are both made from this list.
#define FASTLORA_NF4_CODE_VALUES \
    -0x1p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f, \
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0p+0f, \
    0x1.45f5fep-4f, 0x1.4995c6p-3f, 0x1.f809bap-3f, 0x1.5a0674p-2f, \
    0x1.c3497p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 0x1p+0f

#if !defined(__CUDA_ARCH__)
inline float nf4_code_value(int code) {
    static const float table[16] = {FASTLORA_NF4_CODE_VALUES};
    return table[code & 15];
}
#endif

// A double-quantised block's absmax: its 8-bit code's value times the scale of its run of 256 blocks, then
// plus the offset: two roundings, as bitsandbytes (one FMA can differ in the last bit).
FL_HD float nf4_absmax_double(float code_value, float scale, float offset) {
    return fl_add(fl_mul(code_value, scale), offset);
}

// The code of flat element e from the packed bytes: the even element is the high nibble.
FL_HD int nf4_code(uint8_t byte, int64_t e) { return (e & 1) ? (byte & 15) : (byte >> 4); }

// One lane's share of acc[m][c] += x[m, k] * w[c, k] over k, for rows m < rows and COLS columns: the lane
// takes the vectors k0 = (lane + 32 i) * 8 and, within a vector, elements k0 .. k0 + 7 in order. The
// loaders fill 8 floats (zeros past K and for columns past N). Used for the base GEMV (w = W's rows) and,
// with MB = COLS = 1, for the shrink (w = A's rows).
template <int MB, int COLS, class LoadX, class LoadW>
FL_HD void lane_dot(const LoadX& load_x, const LoadW& load_w, int64_t K, int lane, int rows,
                    float (&acc)[MB][COLS]) {
    FL_UNROLL
    for (int m = 0; m < MB; ++m)
        FL_UNROLL
        for (int c = 0; c < COLS; ++c) acc[m][c] = 0.0f;
    for (int64_t k0 = int64_t(lane) * kVec; k0 < K; k0 += int64_t(kWarp) * kVec) {
        float w[COLS][kVec];
        FL_UNROLL
        for (int c = 0; c < COLS; ++c) load_w(c, k0, w[c]);
        FL_UNROLL
        for (int m = 0; m < MB; ++m) {
            if (m < rows) {
                float xv[kVec];
                load_x(m, k0, xv);
                FL_UNROLL
                for (int c = 0; c < COLS; ++c)
                    FL_UNROLL
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
