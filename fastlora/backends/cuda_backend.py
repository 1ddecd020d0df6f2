"""The "cuda" backend: the CUDA extension's one-launch decode kernel (csrc/lora_decode.cu) where it applies,
the Triton kernels for everything else.

The decode kernel computes y = x·Wᵀ + b + s_a·(x·A_aᵀ)·B_aᵀ for 1-16 rows in one launch from C++, each row
with its own adapter (BGMV; the single-adapter op is the case of one adapter), W read once for all rows. It
is an inference kernel: it takes bf16 and fp16 inputs with a dense weight or an NF4 one (decoded in
registers into x's dtype as it is read, the values ``fastlora.nf4.dequantize`` gives), adapters in fp32,
bf16 or fp16 of ranks 1-256, no dropout, and no gradient of its own. A single-adapter call also writes S = x·Aᵀ, so a
training step's forward at decode size runs it too and its backward runs on Triton. Anything else (more
rows, dropout, fp32 inputs, mixed batches that need S for a backward, every backward) runs
on the Triton backend, which therefore has to run here as well.

``torch.ops.fastlora.cuda_lora_decode`` is the kernel as a ``torch.library`` custom op (a fake for tracing,
and a plain-PyTorch implementation for CPU tensors, so that ``torch.library.opcheck`` and the argument
checks run without a GPU).
"""

from __future__ import annotations

import functools

import torch

from fastlora import cuda_ext
from fastlora.nf4 import NF4Weight

__all__ = ["BACKEND", "CudaBackend", "MAX_RANK", "MAX_ROWS", "cuda_lora_decode", "decode"]

# The kernel's limits (csrc/lora_decode_math.h: kMaxRows, kMaxRank). 16 rows: each warp keeps rows × 2
# columns of accumulators and the reduction leaves one output per lane (16 × 2 = 32); at 16 rows a 16-byte
# load of W feeds 256 FMAs, about what an H200's CUDA cores sustain at its memory bandwidth, so more rows
# would make the kernel compute-bound on CUDA cores, where the tensor-core GEMMs of the Triton path win.
MAX_ROWS = 16
MAX_RANK = 256
_DTYPES = (torch.float16, torch.bfloat16)
_ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_code(ext, dtype: torch.dtype) -> int:
    return {torch.float16: ext.FLOAT16, torch.bfloat16: ext.BFLOAT16, torch.float32: ext.FLOAT32}[dtype]


# (device index, stream handle) -> (counters (3,) int32, zero between launches; S workspace (16, 256) fp32).
# One per stream: launches on one stream run in order, so they can share it; a CUDA graph captures the
# addresses, which stay valid because the workspace is never freed.
_WORKSPACES: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device.index, stream)
    found = _WORKSPACES.get(key)
    if found is None:
        found = _WORKSPACES[key] = (torch.zeros(3, dtype=torch.int32, device=device),
                                    torch.empty(MAX_ROWS * MAX_RANK, dtype=torch.float32, device=device))  # fmt: skip
    return found


def _aligned(t: torch.Tensor, *strides: int) -> bool:
    """16-byte vector loads are safe: the data and every row stride (in bytes) are multiples of 16."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in strides)


def decode(x, weight, bias, lora_A, lora_B, index, scales, ranks, scale0, rank0, shrink_out=None) -> torch.Tensor:
    """Launch the decode kernel (arguments as checked by ``_check_decode``): y (M, N) in x's dtype.

    Shapes: x (M, K), weight (N, K) in x's dtype or an ``NF4Weight`` (decoded into x's dtype as it is read),
    bias (N,) or None, lora_A (n, r_max, K), lora_B (n, N, r_max), index (M,) int64 or None (every row
    adapter 0), scales (n,) fp32 and ranks (n,) int32 on x's device or both None (then ``scale0``, ``rank0``
    for adapter 0), ``shrink_out`` (M, r_max) in x's dtype or None.
    """
    ext = cuda_ext.load()
    m, k = x.shape
    out_features, (n, r_max) = weight.shape[0], lora_A.shape[:2]
    y = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    device = x.device
    stream = torch.cuda.current_stream(device).cuda_stream
    counters, workspace = _workspace(device, stream)

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    if isinstance(weight, NF4Weight):
        nf4 = [ptr(weight.packed), ptr(weight.absmax), ptr(weight.absmax_scale), ptr(weight.absmax_offset),
               ptr(weight.absmax_code)]  # fmt: skip
        weight_ok, w_ptr, w_stride, shift = weight.packed.data_ptr() % 4 == 0, 0, 0, weight.blocksize.bit_length() - 1
    else:
        nf4, weight_ok, w_ptr, w_stride, shift = [], _aligned(weight, weight.stride(0)), weight.data_ptr(), weight.stride(0), 0
    vector = (k % 8 == 0 and weight_ok and _aligned(x, x.stride(0))
              and _aligned(lora_A, lora_A.stride(0), lora_A.stride(1)))  # fmt: skip
    ext.lora_decode(ptr(y), ptr(x), w_ptr, ptr(bias), ptr(lora_A), ptr(lora_B), ptr(index), ptr(scales),
                    ptr(ranks), float(scale0), int(rank0), workspace.data_ptr(), counters.data_ptr(), ptr(shrink_out),
                    [m, out_features, k, n, r_max],
                    [x.stride(0), y.stride(0), w_stride, lora_A.stride(0), lora_A.stride(1), lora_B.stride(0),
                     lora_B.stride(1), lora_B.stride(2), 0 if shrink_out is None else shrink_out.stride(0)],
                    _dtype_code(ext, x.dtype), _dtype_code(ext, lora_A.dtype), vector, device.index, stream, nf4,
                    shift)  # fmt: skip
    return y


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"


def _check_decode(x, weight, bias, lora_A, lora_B, index, scales, ranks) -> None:
    """The custom op's arguments: clear errors naming the argument, before anything launches."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("scales", scales),
                    ("ranks", ranks), ("bias", bias), ("index", index)):  # fmt: skip
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's), got {_describe(t)}")
    if x.dim() != 2 or x.shape[0] > MAX_ROWS:
        raise ValueError(f"x: expected (M, K) with M <= {MAX_ROWS} rows (decode), got {_describe(x)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: expected float16 or bfloat16, got {x.dtype}")
    m, k = x.shape
    if weight.dim() != 2 or weight.shape[1] != k or weight.dtype != x.dtype:
        raise ValueError(f"weight: expected (N, K={k}) in {x.dtype} (x's), got {_describe(weight)}")
    out_features = weight.shape[0]
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias: expected ({out_features},) in {x.dtype}, got {_describe(bias)}")
    if lora_A.dim() != 3 or lora_A.shape[2] != k or not 1 <= lora_A.shape[1] <= MAX_RANK or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A: expected (n >= 1, r_max in 1..{MAX_RANK}, K={k}), got {_describe(lora_A)}")
    n, r_max = lora_A.shape[:2]
    if lora_A.dtype not in _ADAPTER_DTYPES:
        raise TypeError(f"lora_A: expected float32, float16 or bfloat16, got {lora_A.dtype}")
    if lora_B.shape != (n, out_features, r_max) or lora_B.dtype != lora_A.dtype:
        raise ValueError(f"lora_B: expected ({n}, {out_features}, {r_max}) in {lora_A.dtype} (lora_A's), got "
                         f"{_describe(lora_B)}")  # fmt: skip
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dimension, got strides {t.stride()}")
    if bias is not None and bias.numel() and bias.stride(0) != 1:
        raise ValueError(f"bias: expected contiguous, got stride {bias.stride()}")
    if index is not None and (index.shape != (m,) or index.dtype != torch.int64):
        raise ValueError(f"index: expected ({m},) int64 (one adapter per row of x, -1 = base only), got "
                         f"{_describe(index)}")  # fmt: skip
    if scales.shape != (n,) or scales.dtype != torch.float32:
        raise ValueError(f"scales: expected ({n},) float32 (one per adapter), got {_describe(scales)}")
    if ranks.shape != (n,) or ranks.dtype != torch.int32:
        raise ValueError(f"ranks: expected ({n},) int32 (one per adapter, 1..r_max), got {_describe(ranks)}")


@torch.library.custom_op("fastlora::cuda_lora_decode", mutates_args=())
def cuda_lora_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    index: torch.Tensor | None,
    scales: torch.Tensor,
    ranks: torch.Tensor,
) -> torch.Tensor:
    """y (M, N) = x·Wᵀ + b + scales[a]·(x·A_a[:r_a]ᵀ)·B_a[:, :r_a]ᵀ with a = index[m] (−1: no LoRA term;
    None: adapter 0 for every row), r_a = ranks[a]. Inference only (no autograd formula).

    Shapes: x (M <= 16, K) fp16/bf16; weight (N, K) and bias (N,) in x's dtype; lora_A (n, r_max <= 256, K) and
    lora_B (n, N, r_max) in fp32, fp16 or bf16; index (M,) int64; scales (n,) fp32; ranks (n,) int32, values
    in [1, r_max] (index values in [-1, n) and ranks are not checked: that would cost a host sync;
    ``fastlora.lora_linear_multi`` checks them; the kernel runs a row with another index as base only and
    clamps ranks to [0, r_max], so bad values never read out of bounds). On CUDA tensors the extension's kernel runs; on others,
    plain PyTorch ops in fp32 (the reference the tests and ``opcheck`` use).
    """
    _check_decode(x, weight, bias, lora_A, lora_B, index, scales, ranks)
    rows = index if index is not None else torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    slot = rows.clamp_min(0)
    lanes = torch.arange(lora_A.shape[1], device=x.device)[None, :] < ranks[slot][:, None]
    shrink = torch.einsum("mk,mrk->mr", x.float(), lora_A[slot].float()) * lanes
    coef = torch.where(rows >= 0, scales[slot], torch.zeros_like(scales[slot]))
    y = x.float() @ weight.float().t() + coef[:, None] * torch.einsum("mr,mnr->mn", shrink, lora_B[slot].float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@cuda_lora_decode.register_kernel("cuda")
def _(x, weight, bias, lora_A, lora_B, index, scales, ranks):
    _check_decode(x, weight, bias, lora_A, lora_B, index, scales, ranks)
    reason = cuda_ext.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastlora::cuda_lora_decode: the CUDA extension cannot run: {reason}")
    return decode(x, weight, bias, lora_A, lora_B, index, scales, ranks, 0.0, 0)


@cuda_lora_decode.register_fake
def _(x, weight, bias, lora_A, lora_B, index, scales, ranks):
    _check_decode(x, weight, bias, lora_A, lora_B, index, scales, ranks)  # shapes are known when tracing
    return x.new_empty((x.shape[0], weight.shape[0]))


@functools.cache
def _triton():
    from fastlora.backends import get_backend

    return get_backend("triton")


def _takes(x, weight, bias, lora_A, lora_B, dropout_p: float) -> bool:
    """Whether the decode kernel runs this call (else Triton does)."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    dense = isinstance(weight, torch.Tensor)
    return (1 <= m <= MAX_ROWS and dropout_p == 0.0 and x.dtype in _DTYPES
            and ((dense and weight.dtype == x.dtype and weight.stride(1) == 1) or isinstance(weight, NF4Weight))
            and (bias is None or (bias.dtype == x.dtype and bias.stride(0) == 1))
            and lora_A.dtype in _ADAPTER_DTYPES and lora_B.dtype == lora_A.dtype and lora_A.shape[-2] <= MAX_RANK
            and x.stride(-1) == 1 and lora_A.stride(-1) == 1)  # fmt: skip


class CudaBackend:
    name = "cuda"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        reason = cuda_ext.unavailable_reason()
        if reason is not None:
            return f"the CUDA extension cannot run: {reason}"
        if device.type != "cuda":
            return f"the CUDA extension runs CUDA tensors, not {device.type}"
        if torch.version.hip is not None:
            return "the CUDA extension is built for NVIDIA GPUs, not ROCm"
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            return f"the CUDA extension needs compute capability 8.0 or newer, {device} has {capability[0]}.{capability[1]}"
        triton_reason = _triton().unavailable_reason(device, dtype)
        if triton_reason is not None:
            return f"calls outside the decode kernel's range run on Triton, which cannot: {triton_reason}"
        return None

    def keep_mask(self, seed, shape, dropout_p, device):
        return _triton().keep_mask(seed, shape, dropout_p, device)

    def forward(self, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        """Shapes: x (..., K), weight (N, K), bias (N,), lora_A (r, K), lora_B (N, r). Returns y (..., N) and
        S (..., r) in x's dtype; the decode kernel for 1-16 rows without dropout, else Triton."""
        if not _takes(x, weight, bias, lora_A, lora_B, dropout_p):
            return _triton().forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        lead, k, rank = x.shape[:-1], x.shape[-1], lora_A.shape[0]
        x2 = x.reshape(-1, k)
        shrink = torch.empty((x2.shape[0], rank), dtype=x.dtype, device=x.device)
        y = decode(x2, weight, bias, lora_A[None], lora_B[None], None, None, None, scaling, rank, shrink)
        return y.view(*lead, weight.shape[0]), shrink.view(*lead, rank)

    def backward(self, *args):
        return _triton().backward(*args)

    def multi_keep_mask(self, *args):
        return _triton().multi_keep_mask(*args)

    def forward_multi(self, x, weight, bias, lora_A, lora_B, scalings, dropout_ps, ranks, grouping, seed,
                      want_shrink=True):  # fmt: skip
        """As the Triton backend's; the decode kernel for inference (no S wanted) on 1-16 rows, no dropout."""
        if want_shrink or any(p > 0.0 for p in dropout_ps) or not _takes(x, weight, bias, lora_A, lora_B, 0.0):
            return _triton().forward_multi(x, weight, bias, lora_A, lora_B, scalings, dropout_ps, ranks, grouping,
                                           seed, want_shrink)  # fmt: skip
        from fastlora.kernels.lora_multi import adapter_tables

        tables = adapter_tables(tuple(scalings), tuple(dropout_ps), tuple(ranks), x.device)
        k = x.shape[-1]
        y = decode(x.reshape(-1, k), weight, bias, lora_A, lora_B, grouping.index, tables.scale, tables.rank, 0.0, 0)
        return y.view(*x.shape[:-1], weight.shape[0]), None

    def backward_multi(self, *args):
        return _triton().backward_multi(*args)


BACKEND = CudaBackend()
