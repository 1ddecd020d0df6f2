// One-launch LoRA linear for decode (M <= 16 rows), inference: every row with its own adapter (BGMV), over a
// dense weight or an NF4 one (dequantised in registers, as it is read).
//
//   y = x . W^T + b + s_a * (x . A_a^T) . B_a^T,   a = index[m] (-1: base only)
//
// A persistent grid (at most what the GPU holds at once) in two phases, one launch:
//  1. The shrink S (M, r_max) = x . A_a^T: a work queue of (row, lane) dot products over K, one warp each,
//     taken with an atomic counter; each result goes to the fp32 workspace, then a second counter counts it
//     done. A warp that finds the queue empty goes on; every item was taken by a running warp, so the wait
//     below always ends, whatever the scheduler runs when.
//  2. The GEMV: each warp owns 2 columns of W (a block 8) and reads them once for all rows: lane l takes
//     the 16-byte vectors l, l + 32, ... of each row of W and of x, so each W load feeds rows x 2 x 8 FMAs.
//     After the warp's reduction tree, lane p = 2 m + c finishes output (m, c): it waits for the shrink
//     (once per warp), adds the bias and s_a * S[m] . B_a[n], rounds and stores.
// The last block out resets the counters, so the next launch on the stream (or a graph replay) finds them
// zero. No atomics touch the data: results are deterministic. All arithmetic is in lora_decode_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lora_decode.h"
#include "lora_decode_math.h"

namespace fastlora {
namespace {

template <class T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The two 16-bit values of a 32-bit word, low half first, as floats.
template <class T> __device__ __forceinline__ void unpack2(uint32_t word, float* out);
template <> __device__ __forceinline__ void unpack2<__half>(uint32_t word, float* out) {
    out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)));
    out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
}
template <> __device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t word, float* out) {
    out[0] = __uint_as_float(word << 16);  // bf16 is the upper half of a float
    out[1] = __uint_as_float(word & 0xffff0000u);
}

// Eight elements from p[k0 ..] as floats, zeros at k >= K. With `vec`, 16-byte loads (one for 16-bit
// types, two for fp32) where the whole vector is in range.
template <class T>
__device__ __forceinline__ void load8(const T* p, int64_t k0, int64_t K, bool vec, float (&out)[kVec]) {
    if (vec && k0 + kVec <= K) {
        if constexpr (sizeof(T) == 4) {
            const float4 lo = __ldg(reinterpret_cast<const float4*>(p + k0));
            const float4 hi = __ldg(reinterpret_cast<const float4*>(p + k0) + 1);
            out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
            out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
        } else {
            const uint4 r = __ldg(reinterpret_cast<const uint4*>(p + k0));
            unpack2<T>(r.x, out), unpack2<T>(r.y, out + 2), unpack2<T>(r.z, out + 4), unpack2<T>(r.w, out + 6);
        }
    } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) out[e] = k0 + e < K ? to_float(p[k0 + e]) : 0.0f;
    }
}

__constant__ float kNf4Values[16] = {FASTLORA_NF4_CODE_VALUES};

// A block's fp32 absmax, plain or double-quantised.
__device__ __forceinline__ float nf4_absmax(const DecodeArgs& a, int64_t block) {
    if (a.nf4_absmax_code == nullptr) return __ldg(static_cast<const float*>(a.nf4_absmax) + block);
    const uint8_t code = __ldg(static_cast<const uint8_t*>(a.nf4_absmax) + block);
    return nf4_absmax_double(__ldg(a.nf4_absmax_code + code), __ldg(a.nf4_absmax_scale + (block >> 8)),
                             __ldg(a.nf4_absmax_offset));
}

// Eight elements of W's row n from k0 as floats (zeros past K): decoded, rounded to T as dequantising to
// T does, widened. With `vec` (K % 8 == 0: the 8 codes are 4 aligned bytes in one absmax block, since every
// blocksize is a multiple of 8), one 4-byte load and one absmax.
template <class T>
__device__ __forceinline__ void load8_nf4(const DecodeArgs& a, const float* table, int64_t n, int64_t k0, bool vec,
                                          float (&out)[kVec]) {
    const int64_t e0 = n * a.K + k0;
    if (vec && k0 + kVec <= a.K) {
        const uint32_t codes = __ldg(reinterpret_cast<const uint32_t*>(a.nf4_packed + (e0 >> 1)));
        const float absmax = nf4_absmax(a, e0 >> a.nf4_block_shift);
#pragma unroll
        for (int i = 0; i < kVec / 2; ++i) {
            const uint32_t byte = (codes >> (8 * i)) & 0xffu;
            out[2 * i] = to_float(from_float<T>(fl_mul(table[byte >> 4], absmax)));
            out[2 * i + 1] = to_float(from_float<T>(fl_mul(table[byte & 15u], absmax)));
        }
    } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
            const int64_t e = e0 + i;
            out[i] = k0 + i < a.K ? to_float(from_float<T>(fl_mul(table[nf4_code(__ldg(a.nf4_packed + (e >> 1)), e)],
                                                                  nf4_absmax(a, e >> a.nf4_block_shift))))
                                  : 0.0f;
        }
    }
}

// The warp's reduction tree (lora_decode_math.h) over V values per lane, from offset OFF down: lane l ends
// with the total of value l % V in v[0]. Offsets are template arguments so that every slot index is known
// when compiling (v stays in registers).
template <int V, int OFF = 16>
__device__ __forceinline__ void warp_tree(float (&v)[V], int lane) {
#pragma unroll
    for (int i = 0; i < tree_slots<V>(OFF); ++i)
        tree_keep(v, OFF, lane, i, __shfl_xor_sync(0xffffffffu, tree_send(v, OFF, lane, i), OFF));
    if constexpr (OFF > 1) warp_tree<V, OFF / 2>(v, lane);
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Index values and ranks are not checked on the host (that would need a sync): an index outside [-1, n)
// runs its row as base only and a rank is clamped to [0, r_max], so bad values never read out of bounds.
__device__ __forceinline__ int adapter_of(const DecodeArgs& a, int64_t m) {
    const int64_t ad = a.index ? a.index[m] : 0;
    return ad >= 0 && ad < a.n_adapters ? int(ad) : -1;
}
__device__ __forceinline__ int rank_of(const DecodeArgs& a, int ad) {
    const int r = a.ranks ? a.ranks[ad] : a.rank0;
    return r < 0 ? 0 : (r > a.r_max ? int(a.r_max) : r);
}
__device__ __forceinline__ float scale_of(const DecodeArgs& a, int ad) { return a.scales ? a.scales[ad] : a.scale0; }

// Phase 1, one warp: take (row, lane) items until the queue is empty.
template <class T, class TA>
__device__ void shrink_items(const DecodeArgs& a, int lane) {
    const int64_t total = a.M * a.r_max;
    const bool vec = a.vector_loads != 0;
    const T* x = static_cast<const T*>(a.x);
    const TA* lora_a = static_cast<const TA*>(a.lora_a);
    for (;;) {
        uint32_t item = 0;
        if (lane == 0) item = atomicAdd(&a.counters[0], 1u);
        item = __shfl_sync(0xffffffffu, item, 0);
        if (item >= total) return;
        const int64_t m = item / a.r_max, j = item % a.r_max;
        const int ad = adapter_of(a, m);
        float s = 0.0f;
        if (ad >= 0 && j < rank_of(a, ad)) {
            const T* xr = x + m * a.stride_xm;
            const TA* ar = lora_a + ad * a.stride_an + j * a.stride_ar;
            float acc[1][1];
            lane_dot<1, 1>([&](int, int64_t k0, float (&v)[kVec]) { load8(xr, k0, a.K, vec, v); },
                           [&](int, int64_t k0, float (&v)[kVec]) { load8(ar, k0, a.K, vec, v); }, a.K, lane, 1, acc);
            float v[1] = {acc[0][0]};
            warp_tree(v, lane);
            s = v[0];
        }
        if (lane == 0) {
            a.workspace[m * a.r_max + j] = s;
            if (a.shrink_out) static_cast<T*>(a.shrink_out)[m * a.stride_sm + j] = from_float<T>(s);
            __threadfence();  // S is visible before it is counted
            atomicAdd(&a.counters[1], 1u);
        }
    }
}

// Four blocks of 128 threads per SM at least: 128 registers a thread. The bound also steers ptxas, which
// without it spills a few registers of some variants (sm_80 and sm_90) to reach an occupancy of its own.
constexpr int kMinBlocks = 4;

template <int MB, class T, class TA, int WF>
__global__ void __launch_bounds__(kWarps * kWarp, kMinBlocks) lora_decode_kernel(const __grid_constant__ DecodeArgs a) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    // NF4's 16 code values in shared memory: lanes look up different codes at once (constant memory would
    // serialise them).
    __shared__ float nf4_table[16];
    if constexpr (WF == kNF4) {
        if (threadIdx.x < 16) nf4_table[threadIdx.x] = kNf4Values[threadIdx.x];
        __syncthreads();
    }
    shrink_items<T, TA>(a, lane);

    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    const T* bias = static_cast<const T*>(a.bias);
    const TA* lora_b = static_cast<const TA*>(a.lora_b);
    const bool vec = a.vector_loads != 0;
    const int rows = int(a.M);
    const uint32_t total = uint32_t(a.M * a.r_max);
    const int64_t tiles = (a.N + kWarps * kCols - 1) / (kWarps * kCols);
    bool shrink_done = false;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int64_t n0 = tile * (kWarps * kCols) + warp * kCols;
        float acc[MB][kCols];
        lane_dot<MB, kCols>(
            [&](int m, int64_t k0, float (&v)[kVec]) { load8(x + m * a.stride_xm, k0, a.K, vec, v); },
            [&](int c, int64_t k0, float (&v)[kVec]) {
                if (n0 + c < a.N) {
                    if constexpr (WF == kNF4) {
                        load8_nf4<T>(a, nf4_table, n0 + c, k0, vec, v);
                    } else {
                        load8(w + (n0 + c) * a.stride_wn, k0, a.K, vec, v);
                    }
                } else {
#pragma unroll
                    for (int e = 0; e < kVec; ++e) v[e] = 0.0f;
                }
            },
            a.K, lane, rows, acc);
        // Lane p = kCols m + c ends with output (m, c).
        float v[MB * kCols];
#pragma unroll
        for (int m = 0; m < MB; ++m)
#pragma unroll
            for (int c = 0; c < kCols; ++c) v[m * kCols + c] = acc[m][c];
        warp_tree(v, lane);
        const float mine = v[0];
        if (!shrink_done) {  // once per warp: every S is written before any epilogue reads one
            if (lane == 0)
                while (load_acquire(&a.counters[1]) < total) __nanosleep(64);
            __syncwarp();
            shrink_done = true;
        }
        const int m = lane / kCols, c = lane % kCols;  // lanes past MB * kCols repeat outputs: idle
        const int64_t n = n0 + c;
        if (m < rows && m < MB && n < a.N) {
            const int ad = adapter_of(a, m);
            float lora = 0.0f, scale = 0.0f;
            if (ad >= 0) {
                const float* s = a.workspace + m * a.r_max;
                const TA* b = lora_b + ad * a.stride_bn + n * a.stride_bo;
                lora = lora_term([&](int j) { return __ldcg(s + j); },
                                 [&](int j) { return to_float(b[j * a.stride_br]); }, rank_of(a, ad));
                scale = scale_of(a, ad);
            }
            const float b0 = bias ? to_float(bias[n]) : 0.0f;
            static_cast<T*>(a.y)[m * a.stride_ym + n] = from_float<T>(epilogue(mine, b0, scale, lora));
        }
    }
    // The last block out leaves the counters at zero for the next launch.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(&a.counters[2], 1u) == gridDim.x - 1) {
            a.counters[0] = 0;
            a.counters[1] = 0;
            a.counters[2] = 0;
            __threadfence();
        }
    }
}

using Kernel = void (*)(const DecodeArgs);

template <int MB, class T, class TA>
Kernel pick_format(int weight_format) {
    switch (weight_format) {
        case kDense: return lora_decode_kernel<MB, T, TA, kDense>;
        case kNF4: return lora_decode_kernel<MB, T, TA, kNF4>;
        default: return nullptr;
    }
}

template <int MB, class T>
Kernel pick_adapter(int adapter_dtype, int weight_format) {
    switch (adapter_dtype) {
        case kFloat16: return pick_format<MB, T, __half>(weight_format);
        case kBFloat16: return pick_format<MB, T, __nv_bfloat16>(weight_format);
        case kFloat32: return pick_format<MB, T, float>(weight_format);
        default: return nullptr;
    }
}

template <int MB>
Kernel pick_dtype(int dtype, int adapter_dtype, int weight_format) {
    switch (dtype) {
        case kFloat16: return pick_adapter<MB, __half>(adapter_dtype, weight_format);
        case kBFloat16: return pick_adapter<MB, __nv_bfloat16>(adapter_dtype, weight_format);
        default: return nullptr;
    }
}

Kernel pick(const DecodeArgs& a) {
    switch (row_bucket(a.M)) {
        case 1: return pick_dtype<1>(a.dtype, a.adapter_dtype, a.weight_format);
        case 2: return pick_dtype<2>(a.dtype, a.adapter_dtype, a.weight_format);
        case 4: return pick_dtype<4>(a.dtype, a.adapter_dtype, a.weight_format);
        case 8: return pick_dtype<8>(a.dtype, a.adapter_dtype, a.weight_format);
        case 16: return pick_dtype<16>(a.dtype, a.adapter_dtype, a.weight_format);
        default: return nullptr;
    }
}

}  // namespace

cudaError_t decode_grid(const DecodeArgs& args, int device, int* blocks, int* threads) {
    Kernel kernel = pick(args);
    if (kernel == nullptr || args.M < 1 || args.M > kMaxRows) return cudaErrorInvalidValue;
    int sms = 0, per_sm = 0;
    cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * kWarp, 0);
    if (err != cudaSuccess) return err;
    const int64_t tiles = (args.N + kWarps * kCols - 1) / (kWarps * kCols);
    const int64_t resident = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
    *blocks = int(tiles < resident ? tiles : resident);
    *threads = kWarps * kWarp;
    return cudaSuccess;
}

cudaError_t launch_lora_decode(const DecodeArgs& args, int device, cudaStream_t stream) {
    // The grid per (device, kernel) is what the occupancy query answers; it is cached because the query
    // costs microseconds of host time on every call otherwise.
    struct Cached { int device; Kernel kernel; int64_t n; int blocks, threads; };
    static thread_local Cached cache[8] = {};
    static thread_local int next = 0;
    Kernel kernel = pick(args);
    if (kernel == nullptr || args.M < 1 || args.M > kMaxRows || args.r_max < 1 || args.r_max > kMaxRank)
        return cudaErrorInvalidValue;
    int blocks = 0, threads = 0;
    for (const Cached& c : cache)
        if (c.kernel == kernel && c.device == device && c.n == args.N) blocks = c.blocks, threads = c.threads;
    if (blocks == 0) {
        cudaError_t err = decode_grid(args, device, &blocks, &threads);
        if (err != cudaSuccess) return err;
        cache[next] = {device, kernel, args.N, blocks, threads};
        next = (next + 1) % 8;
    }
    kernel<<<blocks, threads, 0, stream>>>(args);
    return cudaGetLastError();
}

}  // namespace fastlora
