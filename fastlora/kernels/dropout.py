"""The dropout keep-mask, regenerated in registers wherever a kernel needs x̂ = x ⊙ m / (1 − p).

Element (i, j) of x (M × K) is kept when its 32-bit Philox-4x32-10 draw is >= round(p · 2³²). One Philox call
gives four 32-bit outputs, so counter i·⌈K/4⌉ + ⌊j/4⌋ (64 bits: low word, high word) serves columns 4⌊j/4⌋ … 4⌊j/4⌋ + 3 (lane j mod 4): a quarter
of the Philox work and of its live registers per element, compared with one call per element. The mask is a
pure function of (seed, i, j, p): the same in every kernel, independent of x's strides, never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels._launch import cdiv, interpreting

__all__ = ["keep_threshold", "seed_pointer", "dropout_mask"]


def keep_threshold(dropout_p: float) -> int:
    """The integer a 32-bit random draw must reach for its element to be kept."""
    return round(dropout_p * (1 << 32))


def seed_pointer(seed: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """The seed argument of a launch: kernels load it only when DROPOUT is set, so without dropout any
    tensor of the launch stands in."""
    return seed if seed is not None else fallback


@triton.jit
def keep(seed, rows, col0, K, threshold, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Boolean keep-mask (BLOCK_ROWS × BLOCK_COLS) for int64 row indices ``rows`` and the columns
    col0 … col0 + BLOCK_COLS − 1 of an x with K columns. col0 and BLOCK_COLS must be multiples of 4."""
    counters = rows[:, None] * ((K + 3) // 4) + (col0 // 4 + tl.arange(0, BLOCK_COLS // 4))[None, :]
    # The 64-bit counter goes to Philox-4x32 as two 32-bit words (low, high), by hand: tl.randint4x on an
    # int64 offset runs the 64-bit Philox and returns 64-bit draws on Triton 3.2, 32-bit ones from 3.4 on.
    # Split here, the draws are the same 32-bit numbers on every Triton (those of randint4x on 3.4+).
    low = counters.to(tl.uint32)
    high = (counters >> 32).to(tl.uint32)
    zero = low * 0
    r0, r1, r2, r3 = tl.philox(seed, low, high, zero, zero)
    lanes = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # (rows, cols/4, 2, 2): columns take r0, r2, r1, r3
    draws = tl.reshape(lanes, (BLOCK_ROWS, BLOCK_COLS))
    return draws.to(tl.int64) >= threshold


@triton.jit
def _dropout_mask_fwd_kernel(out_ptr, seed_ptr, M, K, first_row, threshold,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    rk = col0 + tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    kept = keep(tl.load(seed_ptr), first_row + rm64, col0, K, threshold, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + rm64[:, None] * K + rk[None, :], kept.to(tl.int8), mask=(rm[:, None] < M) & (rk[None, :] < K))


def dropout_mask(seed: torch.Tensor, shape: tuple[int, ...], dropout_p: float, device: torch.device,
                 first_row: int = 0) -> torch.Tensor:  # fmt: skip
    """The keep-mask the kernels use for an x of ``shape`` (flattened to (M, K) row-major), as a bool tensor.

    Args:
        seed: (1,) int64 tensor on ``device``.
        first_row: the row index of the mask's first row: rows ``first_row`` … ``first_row + M − 1`` of a
            larger x (tests use it to reach Philox counters past 2³², as an x of billions of rows would).
    """
    out = torch.empty(shape, dtype=torch.int8, device=device)
    k = shape[-1] if len(shape) else 1
    m = out.numel() // k if k else 0
    if out.numel():
        block_m, block_k = (64, 128) if not interpreting() else (256, 64)  # the interpreter: few, big programs
        grid = (cdiv(m, block_m), cdiv(k, block_k))
        _dropout_mask_fwd_kernel[grid](out, seed, m, k, first_row, keep_threshold(dropout_p), BLOCK_M=block_m,
                                       BLOCK_K=block_k)  # fmt: skip
    return out.bool()
