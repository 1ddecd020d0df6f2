"""The two GEMMs of the LoRA linear, each with the rank-r term in its fp32 accumulator.

Forward:   Y  = x·Wᵀ + b + s·S·Bᵀ             (M × N, reduction over K)
Backward:  dX = G·W + (dS·A) ⊙ m / (1 − p)     (M × K, reduction over N)

Each program starts its accumulator with the rank-r product (a short loop over the rank, ≤ 256), masks and
scales it, then runs the main loop on top of it, so the LoRA term costs no extra pass over Y or dX and no
second accumulator. Programs are ordered in groups of GROUP_M row blocks so that neighbouring programs share
the same W tiles in L2 (Triton tutorial 03).

Shapes: x (M, K), W (N, K), b (N,), S (M, R), B (N, R), G (M, N), dS (M, R) fp32, A (R, K); any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels._launch import Tunable, dot_precision
from fastlora.kernels.dropout import keep, keep_threshold, seed_pointer

__all__ = ["lora_linear_fwd", "lora_linear_bwd"]


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks at a time for L2 reuse."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, R, scaling,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):  # s·S·Bᵀ first
        rr = r0 + tl.arange(0, BLOCK_R)
        s = tl.load(s_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # fmt: skip
        b_t = tl.load(b_ptr + rn64[None, :] * stride_bn + rr[:, None] * stride_br,
                      mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)  # fmt: skip
        acc = tl.dot(s.to(dtype), b_t.to(dtype), acc, input_precision=DOT_PRECISION)
    acc = acc * scaling
    for k0 in range(0, K, BLOCK_K):  # + x·Wᵀ on top
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # fmt: skip
        w_t = tl.load(w_ptr + rn64[None, :] * stride_wn + rk[:, None] * stride_wk,
                      mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)  # fmt: skip
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))  # fmt: skip


@triton.jit
def _lora_linear_bwd_kernel(
    g_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, seed_ptr,
    M, N, K, R, threshold, inv_keep,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_dsm, stride_dsr, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dX tile (BLOCK_M × BLOCK_K); the reduction runs over N in steps of BLOCK_N."""
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    rk64 = rk.to(tl.int64)
    dtype = g_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):  # dS·A first
        rr = r0 + tl.arange(0, BLOCK_R)
        ds = tl.load(ds_ptr + rm64[:, None] * stride_dsm + rr[None, :] * stride_dsr,
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # fmt: skip
        a = tl.load(a_ptr + rr[:, None] * stride_ar + rk64[None, :] * stride_ak,
                    mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)  # fmt: skip
        acc = tl.dot(ds.to(dtype), a.to(dtype), acc, input_precision=DOT_PRECISION)
    if DROPOUT:
        kept = keep(tl.load(seed_ptr), rm64, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
        acc = acc * (kept.to(tl.float32) * inv_keep)
    for n0 in range(0, N, BLOCK_N):  # + G·W on top
        rn = n0 + tl.arange(0, BLOCK_N)
        rn64 = rn.to(tl.int64)
        g = tl.load(g_ptr + rm64[:, None] * stride_gm + rn64[None, :] * stride_gn,
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)  # fmt: skip
        w = tl.load(w_ptr + rn64[:, None] * stride_wn + rk64[None, :] * stride_wk,
                    mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)  # fmt: skip
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + rm64[:, None] * stride_dxm + rk64[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))  # fmt: skip


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_warps=warps,
                         num_stages=stages)  # fmt: skip


# Hopper-sized tiles (wgmma wants BLOCK_M >= 64 and 4-warp multiples), then smaller ones for skinny M
# (decode: M of 1 to 64 tokens). Each stage holds (BLOCK_M + BLOCK_N) × BLOCK_K inputs in shared memory.
_FWD_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 64, 4, 4),
    _cfg(64, 256, 64, 4, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(16, 128, 128, 4, 4, group=1),
]
_INTERPRETER_CONFIG = _cfg(16, 32, 32, 1, 1, group=2)


# Shared memory a block may use: 227 KB on sm_90 (H100/H200), 163 KB on sm_80 (A100); 16 KB of it is left
# for the rank-r prologue's tiles and the epilogue's layout conversion.
_SHARED_BYTES = {90: 227 * 1024, 80: 163 * 1024}
_RESERVED_BYTES = 16 * 1024


def _fits(c: triton.Config, arch: int, itemsize: int, out_cols: str, reduction: str) -> bool:
    """Whether the pipelined input tiles, stages × (BLOCK_M + output columns) × reduction block elements,
    fit in shared memory."""
    kw = c.kwargs
    tiles = c.num_stages * (kw["BLOCK_M"] + kw[out_cols]) * kw[reduction] * itemsize
    limit = _SHARED_BYTES[90] if arch >= 90 else _SHARED_BYTES[80]
    return tiles <= limit - _RESERVED_BYTES


def _per_thread(c: triton.Config, rows: str, cols: str) -> int:
    return c.kwargs[rows] * c.kwargs[cols] // (32 * c.num_warps)


def _wide_fp32_on_four_warps(c: triton.Config, itemsize: int) -> bool:
    """fp32 inputs in 128-row tiles on 4 warps: with 4 pipeline stages this spills on Triton 3.4 (96 bytes
    forward, 64 for dX, sm_90); 8 warps serve such tiles."""
    return itemsize == 4 and c.kwargs["BLOCK_M"] >= 128 and c.num_warps < 8


def _fwd_configs(flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    # Before Hopper the accumulator lives in mma fragments, which a 64 × 256 tile on 4 warps overflows.
    most = 128 if arch >= 90 else 64
    return [c for c in _FWD_CONFIGS if _fits(c, arch, itemsize, "BLOCK_N", "BLOCK_K")
            and _per_thread(c, "BLOCK_M", "BLOCK_N") <= most and not _wide_fp32_on_four_warps(c, itemsize)]  # fmt: skip


def _bwd_configs(flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    """dX tiles: the forward's with BLOCK_N and BLOCK_K swapped (output columns are K, the reduction N).
    With dropout the Philox state for the whole (BLOCK_M × BLOCK_K) tile is live beside the accumulator:
    at most 64 output elements a thread (32 with 4-byte inputs) leave it room."""
    swapped = [_cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                    c.kwargs["GROUP_M"]) for c in _FWD_CONFIGS]  # fmt: skip
    most = (64 if itemsize <= 2 else 32) if flags["DROPOUT"] else (128 if arch >= 90 else 64)
    return [c for c in swapped if _fits(c, arch, itemsize, "BLOCK_K", "BLOCK_N")
            and _per_thread(c, "BLOCK_M", "BLOCK_K") <= most and not _wide_fp32_on_four_warps(c, itemsize)]  # fmt: skip


_FWD = Tunable(_lora_linear_fwd_kernel, _fwd_configs, key=["M", "N", "K", "R"], interpreter_config=_INTERPRETER_CONFIG)
_BWD = Tunable(_lora_linear_bwd_kernel, _bwd_configs, key=["M", "N", "K", "R"], interpreter_config=_INTERPRETER_CONFIG)

# The rank-r prologue runs in 16-lane steps: its S and Bᵀ tiles stay small beside the main loop's
# accumulator (a rank of 256 is 16 short steps, against K/BLOCK_K long ones).
PROLOGUE_BLOCK_R = 16


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shrink: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
    """Y = x·Wᵀ + b + s·S·Bᵀ, stored once.

    Args:
        x: (M, K), weight: (N, K), bias: (N,) or None, all one dtype; shrink: (M, R) in x's dtype;
        lora_B: (N, R) any floating dtype (cast in registers). Any strides.

    Returns:
        (M, N), contiguous, in x's dtype.
    """
    m, k = x.shape
    n = weight.shape[0]
    r = lora_B.shape[1]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    _FWD.launch(
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        x, weight, bias if bias is not None else x, shrink, lora_B, y,
        m, n, k, r, scaling,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), shrink.stride(0), shrink.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=PROLOGUE_BLOCK_R,
    )  # fmt: skip
    return y


def lora_linear_bwd(grad_y: torch.Tensor, weight: torch.Tensor, d_shrink: torch.Tensor, lora_A: torch.Tensor,
                    dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """dX = G·W + (dS·A) ⊙ m / (1 − p), with the mask regenerated from ``seed``.

    Args:
        grad_y: (M, N) G; weight: (N, K) in G's dtype; d_shrink: (M, R) fp32; lora_A: (R, K) any floating
        dtype. Any strides.
        seed: (1,) int64 on G's device when dropout_p > 0.

    Returns:
        (M, K), contiguous, in G's dtype.
    """
    m, n = grad_y.shape
    k = weight.shape[1]
    r = lora_A.shape[0]
    dx = torch.empty((m, k), device=grad_y.device, dtype=grad_y.dtype)
    if m == 0:
        return dx
    _BWD.launch(
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),),
        grad_y, weight, d_shrink, lora_A, dx, seed_pointer(seed, grad_y),
        m, n, k, r, keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
        d_shrink.stride(0), d_shrink.stride(1), lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(grad_y.dtype),
        BLOCK_R=PROLOGUE_BLOCK_R,
    )  # fmt: skip
    return dx
