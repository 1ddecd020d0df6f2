"""The shrink S = x̂·Aᵀ and its weight gradient dA = dSᵀ·x̂, with x̂ = x ⊙ m / (1 − p) made in registers.

Both read x once and are memory-bound (the output is only r wide). The dropout mask is regenerated from
the seed (``dropout.keep``); neither kernel stores or loads a mask or a copy of x̂.

Shapes: x (M, K) any strides, A (R, K), S (M, R), dS (M, R) fp32, dA (R, K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels._launch import Tunable, cdiv, dot_precision, rank_block, sm_count
from fastlora.kernels.dropout import keep, keep_threshold, seed_pointer

__all__ = ["lora_shrink_fwd", "lora_shrink_bwd"]


@triton.jit
def _lora_shrink_fwd_kernel(
    x_ptr, a_ptr, s_ptr, seed_ptr,
    M, K, R, threshold, inv_keep,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (i, j): rows [i·BLOCK_M, +BLOCK_M) and rank lanes [j·BLOCK_R, +BLOCK_R) of S."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rm64 = rm.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk, mask=x_mask, other=0.0)
        if DROPOUT:
            # Multiply (not select) so an Inf that is dropped still gives NaN, as x * mask does in PyTorch.
            x = x * keep(seed, rm64, k0, K, threshold, BLOCK_M, BLOCK_K).to(dtype)
        a_t = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                      mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)  # fmt: skip
        acc = tl.dot(x, a_t.to(dtype), acc, input_precision=DOT_PRECISION)
    if DROPOUT:
        acc = acc * inv_keep
    tl.store(s_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))  # fmt: skip


@triton.jit
def _lora_shrink_bwd_kernel(
    x_ptr, ds_ptr, da_ptr, seed_ptr,
    M, K, R, rows_per_split, threshold, inv_keep,
    stride_xm, stride_xk, stride_dsm, stride_dsr, stride_das, stride_dar, stride_dak,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (j, s, c): columns [j·BLOCK_K, +BLOCK_K) and rank rows [c·BLOCK_R, +BLOCK_R) of dA, summed
    over the rows of split s only.

    Splitting M gives enough programs to fill the GPU when K is small; the launcher sums the splits in a
    fixed order afterwards, so the result is deterministic (no atomics)."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    dtype = x_ptr.dtype.element_ty
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)
        row_ok = rm < m_end
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=row_ok[:, None] & (rk[None, :] < K), other=0.0)  # fmt: skip
        if DROPOUT:
            x = x * keep(seed, rm64, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K).to(dtype)
        ds = tl.load(ds_ptr + rm64[:, None] * stride_dsm + rr[None, :] * stride_dsr,
                     mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)  # fmt: skip
        acc = tl.dot(tl.trans(ds.to(dtype)), x, acc, input_precision=DOT_PRECISION)
    if DROPOUT:
        acc = acc * inv_keep
    tl.store(da_ptr + pid_s * stride_das + rr[:, None] * stride_dar + rk[None, :] * stride_dak, acc,
             mask=(rr[:, None] < R) & (rk[None, :] < K))  # fmt: skip


def _cfg(bm, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Memory-bound: wide K tiles for long contiguous loads. The forward's rank tile is at most 64 lanes (more
# lanes go to the grid's second axis); the backward's is the whole padded rank, up to 256, whose
# (BLOCK_R × BLOCK_K) fp32 accumulator leaves room only for the smaller tiles.
_FWD_CONFIGS = [_cfg(64, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 4)]
_BWD_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(64, 128, 8, 3), _cfg(32, 128, 4, 3), _cfg(128, 32, 4, 3)]
# Past 64 lanes the (BLOCK_R × BLOCK_K) fp32 accumulator takes most registers and the dS tile most shared
# memory: 8 warps, two stages.
_BWD_WIDE_RANK_CONFIGS = [_cfg(64, 64, 8, 2), _cfg(32, 64, 8, 2)]
FWD_MAX_BLOCK_R = 64


def _bwd_configs(flags: dict, arch: int, itemsize: int) -> list[triton.Config]:
    """With dropout the Philox state joins the accumulator: on Triton 3.4 the 64 × 64 tile on 4 warps
    spills (8 bytes, sm_90) and, past rank 64, the 64-row tile on sm_80 (120 bytes); they are left out."""
    if flags["BLOCK_R"] > 64:
        if flags["DROPOUT"] and arch < 90:
            return _BWD_WIDE_RANK_CONFIGS[1:]
        return _BWD_WIDE_RANK_CONFIGS
    return _BWD_CONFIGS[1:] if flags["DROPOUT"] else _BWD_CONFIGS


_FWD = Tunable(_lora_shrink_fwd_kernel, lambda flags, arch, itemsize: _FWD_CONFIGS, key=["M", "K", "R"],
               interpreter_config=_cfg(16, 32, 1, 1))  # fmt: skip
_BWD = Tunable(_lora_shrink_bwd_kernel, _bwd_configs, key=["M", "K", "R"], interpreter_config=_cfg(16, 32, 1, 1))


def lora_shrink_fwd(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """S = (x ⊙ m / (1 − p))·Aᵀ.

    Args:
        x: (M, K), any strides, fp16/bf16/fp32.
        lora_A: (R, K), any floating dtype (cast to x's dtype in registers).
        seed: (1,) int64 on x's device when dropout_p > 0.

    Returns:
        (M, R) in x's dtype.
    """
    m, k = x.shape
    r = lora_A.shape[0]
    s = torch.empty((m, r), device=x.device, dtype=x.dtype)
    if m == 0:
        return s
    block_r = rank_block(r, FWD_MAX_BLOCK_R)
    dropout = dropout_p > 0.0
    _FWD.launch(
        lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(r, block_r)),
        x, lora_A, s, seed_pointer(seed, x),
        m, k, r, keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
        DROPOUT=dropout, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
    )  # fmt: skip
    return s


def _row_splits(m: int, k: int, device: torch.device) -> int:
    """How many row ranges dA is split into: enough programs to cover the GPU's SMs about twice."""
    if device.type != "cuda":
        return 1 if m <= 256 else 2
    sms = sm_count(device)
    k_programs = cdiv(k, 64)
    return max(1, min(cdiv(2 * sms, k_programs), cdiv(m, 256)))


def lora_shrink_bwd(x: torch.Tensor, d_shrink: torch.Tensor, lora_A: torch.Tensor, dropout_p: float,
                    seed: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """dA = dSᵀ·(x ⊙ m / (1 − p)).

    Args:
        x: (M, K), any strides.
        d_shrink: (M, R) fp32, the gradient of S (s·G·B), contiguous.
        lora_A: (R, K), only for its dtype: dA comes back in it.

    Returns:
        (R, K) in lora_A's dtype.
    """
    m, k = x.shape
    r = lora_A.shape[0]
    if m == 0:
        return torch.zeros_like(lora_A)
    splits = _row_splits(m, k, x.device)
    rows_per_split = cdiv(m, splits)
    block_r = rank_block(r)
    partial = torch.empty((splits, r, k), device=x.device, dtype=torch.float32)
    dropout = dropout_p > 0.0
    _BWD.launch(
        lambda meta: (cdiv(k, meta["BLOCK_K"]), splits, cdiv(r, block_r)),
        x, d_shrink, partial, seed_pointer(seed, x),
        m, k, r, rows_per_split, keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        x.stride(0), x.stride(1), d_shrink.stride(0), d_shrink.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        DROPOUT=dropout, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
    )  # fmt: skip
    return partial.sum(0).to(lora_A.dtype)  # fixed-order sum over the splits: deterministic
