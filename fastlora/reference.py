"""The plain-PyTorch oracle for the LoRA linear. Written to be read, never to be fast.

Tests compare every backend against these functions and against a float64 evaluation of them. Nothing
here is clever: each line is one line of ``docs/lora-math.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["lora_linear"]


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

