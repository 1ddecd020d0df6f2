"""``LoRALinear``: a drop-in ``nn.Linear`` with a fused LoRA adapter."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from fastlora.functional import lora_linear

__all__ = ["LoRALinear"]

DEFAULT_ADAPTER = "default"


def _check_hparams(r: int, lora_alpha: float, lora_dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r: expected an integer rank >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha: expected a finite number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout!r}")


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # As PEFT does by default: half-precision bases get fp32 adapters (the optimizer state stays
    # accurate); the op casts the small adapters per call, never the activations.
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class LoRALinear(nn.Module):
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with W, b frozen and A, B trainable.

    Parameters (PEFT's layout, so adapters move between the two without transposes):
        weight: (out_features, in_features), frozen.
        bias: (out_features,) or None, frozen.
        lora_A["default"]: (r, in_features), kaiming-uniform(a=√5).
        lora_B["default"]: (out_features, r), zeros, so a fresh layer returns exactly the base output.

    scaling = lora_alpha / r, or lora_alpha / √r with ``use_rslora``. Adapters are fp32 on an fp16/bf16
    base (as PEFT keeps them) and in the base dtype otherwise.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_hparams(r, lora_alpha, lora_dropout)
        factory = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        bias_p = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # nn.Linear's own initialisation, so a LoRALinear built from scratch is a plain Linear plus adapter.
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias_p is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(bias_p, -bound, bound)
        self._setup(weight, bias_p, r, lora_alpha, lora_dropout, use_rslora)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> LoRALinear:
        """Wrap ``linear``: the new layer shares (does not copy) its weight and bias, which get frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        _check_hparams(r, lora_alpha, lora_dropout)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora)
        return layer

    def _setup(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora) -> None:
        self.out_features, self.in_features = weight.shape
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.register_parameter("bias", bias)
        self.r = int(r)
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        factory = {"device": weight.device, "dtype": _adapter_dtype(weight.dtype)}
        lora_a = nn.Parameter(torch.empty((self.r, self.in_features), **factory))
        lora_b = nn.Parameter(torch.zeros((self.out_features, self.r), **factory))
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # PEFT's default init for lora_A
        self.lora_A = nn.ParameterDict({DEFAULT_ADAPTER: lora_a})
        self.lora_B = nn.ParameterDict({DEFAULT_ADAPTER: lora_b})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype."""
        return lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A[DEFAULT_ADAPTER],
            self.lora_B[DEFAULT_ADAPTER],
            self.scaling,
            self.lora_dropout,
            self.training,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}"
            + (", use_rslora=True" if self.use_rslora else "")
        )
