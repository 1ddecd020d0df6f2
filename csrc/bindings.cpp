// The pybind11 module `_fastlora_cuda`: the decode kernel's launcher and what the Python side needs to know
// about the CUDA runtime it was built against. It takes plain integers (data pointers, sizes, strides, the
// stream handle), so it does not depend on PyTorch's C++ ABI; fastlora/backends/cuda_backend.py wraps it
// as a torch.library custom op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lora_decode.h"
#include "lora_decode_math.h"

namespace py = pybind11;

#ifndef FASTLORA_ARCHS
#define FASTLORA_ARCHS ""
#endif

namespace {

void* as_ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("fastlora CUDA extension: ") + what + ": " + cudaGetErrorName(err) +
                                 " (" + cudaGetErrorString(err) + ")");
}

// Why the extension cannot run here, or "" when it can: no driver, a driver older than the runtime, no
// device.
std::string unavailable_reason() {
    int driver = 0;
    cudaError_t err = cudaDriverGetVersion(&driver);
    if (err != cudaSuccess || driver == 0) return "no CUDA driver found (libcuda could not be loaded)";
    if (driver < CUDART_VERSION)
        return "the CUDA driver supports CUDA " + std::to_string(driver / 1000) + "." +
               std::to_string(driver % 1000 / 10) + ", the extension was built with CUDA " +
               std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
    int count = 0;
    err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(err);
    if (count == 0) return "no CUDA device";
    return "";
}

}  // namespace

PYBIND11_MODULE(_fastlora_cuda, m) {
    m.doc() = "fastlora's CUDA extension: one-launch LoRA linear for decode (inference).";
    m.attr("ARCHS") = std::string(FASTLORA_ARCHS);
    m.attr("CUDART_VERSION") = CUDART_VERSION;
    m.attr("MAX_ROWS") = fastlora::kMaxRows;
    m.attr("MAX_RANK") = fastlora::kMaxRank;
    m.attr("FLOAT16") = int(fastlora::kFloat16);
    m.attr("BFLOAT16") = int(fastlora::kBFloat16);
    m.attr("FLOAT32") = int(fastlora::kFloat32);
    m.def("unavailable_reason", &unavailable_reason,
          "Why the extension cannot run on this machine (no driver, old driver, no device), or ''.");
    m.def("device_capability", [](int device) {
        int major = 0, minor = 0;
        check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "device capability");
        check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "device capability");
        return std::vector<int>{major, minor};
    });
    m.def(
        "lora_decode",
        [](std::uintptr_t y, std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t lora_a,
           std::uintptr_t lora_b, std::uintptr_t index, std::uintptr_t scales, std::uintptr_t ranks, float scale0,
           int rank0, std::uintptr_t workspace, std::uintptr_t counters, std::uintptr_t shrink_out,
           std::vector<int64_t> sizes, std::vector<int64_t> strides, int dtype, int adapter_dtype,
           bool vector_loads, int device, std::uintptr_t stream, std::vector<std::uintptr_t> nf4, int nf4_block_shift) {
            if (sizes.size() != 5) throw std::invalid_argument("sizes: expected (M, N, K, n_adapters, r_max)");
            if (strides.size() != 9)
                throw std::invalid_argument("strides: expected (xm, ym, wn, an, ar, bn, bo, br, sm)");
            fastlora::DecodeArgs a{};
            a.y = as_ptr(y), a.x = as_ptr(x), a.w = as_ptr(w), a.bias = as_ptr(bias);
            a.lora_a = as_ptr(lora_a), a.lora_b = as_ptr(lora_b);
            a.index = static_cast<const int64_t*>(as_ptr(index));
            a.scales = static_cast<const float*>(as_ptr(scales));
            a.ranks = static_cast<const int32_t*>(as_ptr(ranks));
            a.scale0 = scale0, a.rank0 = rank0;
            a.workspace = static_cast<float*>(as_ptr(workspace));
            a.counters = static_cast<uint32_t*>(as_ptr(counters));
            a.shrink_out = as_ptr(shrink_out);
            a.M = sizes[0], a.N = sizes[1], a.K = sizes[2], a.n_adapters = sizes[3], a.r_max = sizes[4];
            a.stride_xm = strides[0], a.stride_ym = strides[1], a.stride_wn = strides[2];
            a.stride_an = strides[3], a.stride_ar = strides[4];
            a.stride_bn = strides[5], a.stride_bo = strides[6], a.stride_br = strides[7];
            a.stride_sm = strides[8];
            a.dtype = dtype, a.adapter_dtype = adapter_dtype, a.vector_loads = vector_loads ? 1 : 0;
            if (!nf4.empty()) {
                if (nf4.size() != 5)
                    throw std::invalid_argument("nf4: expected (packed, absmax, absmax_scale, absmax_offset, absmax_code)");
                a.weight_format = fastlora::kNF4;
                a.nf4_packed = static_cast<const uint8_t*>(as_ptr(nf4[0]));
                a.nf4_absmax = as_ptr(nf4[1]);
                a.nf4_absmax_scale = static_cast<const float*>(as_ptr(nf4[2]));
                a.nf4_absmax_offset = static_cast<const float*>(as_ptr(nf4[3]));
                a.nf4_absmax_code = static_cast<const float*>(as_ptr(nf4[4]));
                a.nf4_block_shift = nf4_block_shift;
            }
            // Launch on the tensors' device, then give the caller (PyTorch) its current device back.
            int previous = 0;
            check(cudaGetDevice(&previous), "cudaGetDevice");
            if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
            const cudaError_t err = fastlora::launch_lora_decode(a, device, reinterpret_cast<cudaStream_t>(stream));
            if (previous != device) cudaSetDevice(previous);
            check(err, "launch");
        },
        py::arg("y"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("index"), py::arg("scales"), py::arg("ranks"), py::arg("scale0"), py::arg("rank0"),
        py::arg("workspace"), py::arg("counters"), py::arg("shrink_out"), py::arg("sizes"), py::arg("strides"),
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("vector_loads"), py::arg("device"), py::arg("stream"),
        py::arg("nf4") = std::vector<std::uintptr_t>{}, py::arg("nf4_block_shift") = 0,
        "Launch the decode kernel (see csrc/lora_decode.h for the arguments' meaning); raises RuntimeError on a "
        "launch error. Pointers are integers (0 = null), strides in elements; `nf4` (5 pointers) selects an NF4 "
        "weight instead of `w`.");
}
