// The decode kernel's launch interface: plain pointers, sizes and strides (no PyTorch types), so that the
// pybind11 module does not depend on PyTorch's C++ ABI.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastlora {

enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };
enum WeightFormat : int { kDense = 0, kNF4 = 1 };

// y (M, N) = x (M, K) . W (N, K)^T + bias + scale_a * (x . A_a^T) . B_a^T, a = each row's adapter.
// Strides are in elements; the last dimension of x, W and A (K) is contiguous, y's rows are contiguous.
struct DecodeArgs {
    void* y;                  // (M, N), dtype
    const void* x;            // (M, K), dtype
    const void* w;            // (N, K), dtype (dense format)
    const void* bias;         // (N,), dtype, or null
    const void* lora_a;       // (n, r_max, K), adapter_dtype
    const void* lora_b;       // (n, N, r_max), adapter_dtype, any strides
    const int64_t* index;     // (M,) adapter per row in [-1, n), -1 = base only; null = every row adapter 0
    const float* scales;      // (n,) or null: then scale0
    const int32_t* ranks;     // (n,) or null: then rank0
    float scale0;
    int32_t rank0;
    float* workspace;         // (M, r_max) fp32 shrink S, written by the kernel
    uint32_t* counters;       // 3 counters, zero before the launch; the kernel leaves them zero
    void* shrink_out;         // (M, r_max) dtype, S rounded (for a backward), or null
    int64_t M, N, K, n_adapters, r_max;
    int64_t stride_xm, stride_ym, stride_wn;
    int64_t stride_an, stride_ar;              // lora_a: adapter, lane (K contiguous)
    int64_t stride_bn, stride_bo, stride_br;   // lora_b: adapter, output row, lane
    int64_t stride_sm;                         // shrink_out rows
    int dtype;                // kFloat16 or kBFloat16: x, W, bias, y
    int adapter_dtype;        // kFloat16, kBFloat16 or kFloat32
    int vector_loads;         // 1: x, W, A rows start 16-byte aligned (NF4: the packed bytes 4-byte
                              // aligned) and K % 8 == 0
    // NF4 format (fastlora/nf4.py): W dequantised in registers, each element rounded to dtype.
    int weight_format;        // kDense or kNF4
    const uint8_t* nf4_packed;        // (ceil(N K / 2),) two codes a byte, the even element high
    const void* nf4_absmax;           // (blocks,) fp32, or uint8 codes when double-quantised
    const float* nf4_absmax_scale;    // (ceil(blocks / 256),) fp32, double quantisation only, else null
    const float* nf4_absmax_offset;   // () fp32, double quantisation only
    const float* nf4_absmax_code;     // (256,) fp32, double quantisation only
    int nf4_block_shift;              // log2(blocksize)
};

// Launches on `stream`; returns the launch's error (cudaSuccess when queued).
cudaError_t launch_lora_decode(const DecodeArgs& args, int device, cudaStream_t stream);

// The grid the launch uses on `device` for `rows` rows (the persistent grid: at most what fits at once).
cudaError_t decode_grid(const DecodeArgs& args, int device, int* blocks, int* threads);

}  // namespace fastlora
