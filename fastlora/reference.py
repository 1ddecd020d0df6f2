"""The plain-PyTorch oracle for the LoRA linear. Written to be read, never to be fast.

Tests compare every backend against these functions and against a float64 evaluation of them. Nothing
here is clever: each line is one line of ``docs/lora-math.md``. ``keep_mask`` writes out, in NumPy, the
dropout mask the Triton kernels draw, so that the mask itself is checked on every Triton version.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["dora_linear", "lora_linear", "lora_linear_multi", "philox4x32", "keep_mask"]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """y = x·Wᵀ + b + s·(x̂·Aᵀ)·Bᵀ, with x̂ = x ⊙ m / (1 − p) when a dropout mask is given.

    Args:
        x: (..., K) input.
        weight: (N, K) base weight.
        bias: (N,) base bias or None.
        lora_A: (r, K).
        lora_B: (N, r).
        scaling: the scalar s.
        dropout_mask: optional boolean keep-mask with x's shape (True = kept). The reference cannot
            reproduce a backend's random stream, so tests pass the mask the backend used.
        dropout_p: the drop probability the mask was drawn with; only used with a mask.

    Returns:
        (..., N) tensor. Everything is computed in the dtype of the arguments as given: call it with all
        tensors in float64 for the exact value, or in one low precision for "what PyTorch gets".
    """
    y = F.linear(x, weight, bias)
    x_hat = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    shrink = x_hat @ lora_A.t()  # (..., r)
    return y + scaling * (shrink @ lora_B.t())



def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """PEFT's DoRA, line for line: y = x·Wᵀ + b + (c − 1)·(x̂·Wᵀ) + c·s·(x̂·Aᵀ)·Bᵀ, c = m / ‖W + s·B·A‖ (per
    output row, the norm detached), x̂ = x ⊙ mask / (1 − p) when a mask is given.

    Shapes: x (..., K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r), magnitude (N,),
    dropout_mask x's shape (True = kept). Computed in the arguments' dtype (call it in float64).
    """
    norm = torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
    c = magnitude / norm
    x_hat = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    base = F.linear(x, weight, bias)
    return base + (c - 1) * F.linear(x_hat, weight) + c * scaling * ((x_hat @ lora_A.t()) @ lora_B.t())


_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def philox4x32(seed: int, counter: np.ndarray, rounds: int = 10) -> tuple[np.ndarray, ...]:
    """Philox-4x32 (Salmon et al., 2011) on the counter (low word, high word, 0, 0) of each element of the
    uint64 array ``counter``, keyed by the 64-bit ``seed`` (low word, high word). Returns four uint32 arrays."""
    c0 = (counter & _U32).astype(np.uint64)
    c1 = (counter >> np.uint64(32)).astype(np.uint64)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(rounds):
        p0 = np.uint64(_PHILOX_ROUND_B) * c2  # both factors < 2³², so the product fits in 64 bits
        p2 = np.uint64(_PHILOX_ROUND_A) * c0
        c0, c1, c2, c3 = ((p0 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p0 & np.uint64(_U32),
                          (p2 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p2 & np.uint64(_U32))  # fmt: skip
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def keep_mask(seed: int, rows: np.ndarray, in_features: int, dropout_p: float) -> np.ndarray:
    """The keep-mask the Triton kernels regenerate (``fastlora/kernels/dropout.py``), written out: element
    (i, j) of an x with ``in_features`` columns is kept when Philox's draw at counter i·⌈K/4⌉ + ⌊j/4⌋, output
    (0, 2, 1, 3)[j mod 4], is >= round(p · 2³²).

    Args:
        rows: (M,) row indices i (any non-negative integers below 2⁶², to reach the counter's high word).

    Returns:
        (M, in_features) boolean array.
    """
    k = in_features
    cols = np.arange(k, dtype=np.uint64)
    counter = rows.astype(np.uint64)[:, None] * np.uint64((k + 3) // 4) + (cols // np.uint64(4))[None, :]
    r0, r1, r2, r3 = philox4x32(int(seed), counter)
    draws = np.stack((r0, r2, r1, r3), axis=-1)  # (M, K, 4): the order tl.join(tl.join(r0, r1), tl.join(r2, r3)) lays out
    lane = np.take_along_axis(draws, (cols % np.uint64(4)).astype(np.int64)[None, :, None], axis=-1)[..., 0]
    return lane.astype(np.int64) >= round(dropout_p * (1 << 32))


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: list[float],
    row_adapter: torch.Tensor,
    ranks: list[int] | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_ps: list[float] | None = None,
) -> torch.Tensor:
    """A mixed-adapter batch as a loop over rows' adapters: y = x·Wᵀ + b, then for each adapter a, on the rows
    whose ``row_adapter`` is a, + s_a·(x̂·A_a[:r_a]ᵀ)·B_a[:, :r_a]ᵀ.

    Args:
        x: (M, K); weight (N, K); bias (N,) or None; lora_A (n, r_max, K); lora_B (n, N, r_max).
        row_adapter: (M,) integer adapter of each row, −1 = base only.
        ranks: n ranks (default r_max each).
        dropout_mask: optional (M, K) boolean keep-mask (True = kept); row i is scaled by 1/(1 − p) of its
            adapter (``dropout_ps``).
    """
    y = F.linear(x, weight, bias)
    n, r_max = lora_A.shape[:2]
    ranks = ranks or [r_max] * n
    for a in range(n):
        rows = (row_adapter == a).nonzero().flatten()
        if rows.numel() == 0:
            continue
        x_a = x[rows]
        if dropout_mask is not None:
            x_a = x_a * dropout_mask[rows] / (1.0 - dropout_ps[a])
        r = ranks[a]
        y[rows] = y[rows] + scalings[a] * ((x_a @ lora_A[a, :r].t()) @ lora_B[a, :, :r].t())
    return y
