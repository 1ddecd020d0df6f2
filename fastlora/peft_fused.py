"""PEFT's LoRA ``Linear`` with its forward on fastlora's fused op: what ``fastlora.accelerate`` swaps in.

This module imports PEFT, so nothing in ``import fastlora`` imports it; ``fastlora.peft_compat`` does, when
``accelerate`` is called. The class lives at module level so that pickle (and ``torch.save`` of a whole
model) finds it by its qualified name, ``fastlora.peft_fused.FusedLoraLinear``.
"""

from __future__ import annotations

import math
import numbers

import torch.nn as nn
from peft.tuners.lora import Linear
from peft.tuners.tuners_utils import BaseTunerLayer

from fastlora.functional import lora_linear
from fastlora.layers import is_conv1d

__all__ = ["FusedLoraLinear", "layer_name", "unfusable"]


class FusedLoraLinear(Linear):
    """PEFT's LoRA ``Linear`` (a subclass: ``isinstance(m, peft.tuners.lora.Linear)`` holds) whose forward
    runs ``fastlora.functional.lora_linear``: the base GEMM and the first active adapter in one op. Further
    active adapters are added as PEFT adds them. Everything else (merge, set_adapter, state_dict, ...) is
    PEFT's, inherited untouched, and so is the forward whenever ``unfusable`` finds a reason: the layer then
    computes exactly what PEFT computes."""

    def forward(self, x, *args, **kwargs):
        active = [a for a in self.active_adapters if a in self.lora_A]
        if args or kwargs or self._peft_forward_reason(active) is not None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        weight = base.weight.t() if is_conv1d(base) else base.weight  # Conv1D stores (in, out)
        first, *rest = active
        y = lora_linear(x, weight, base.bias, self.lora_A[first].weight, self.lora_B[first].weight,
                        self.scaling[first], _dropout_p(self.lora_dropout[first]), self.training)  # fmt: skip
        for name in rest:  # further adapters as PEFT runs them
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dtype = lora_A.weight.dtype
            xa = self._cast_input_dtype(x, dtype) if hasattr(self, "_cast_input_dtype") else x.to(dtype)
            y = y + (lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]).to(y.dtype)
        return y

    def _peft_forward_reason(self, active: list[str]) -> str | None:
        """Why a call without extra arguments runs PEFT's forward now, or None: it runs fused."""
        if self.disable_adapters:
            return "adapters disabled"
        if self.merged:
            return "merged"
        if not active:
            return "no active adapter"
        return unfusable(self, active)

    def extra_repr(self) -> str:
        reason = self._peft_forward_reason([a for a in self.active_adapters if a in self.lora_A])
        return "fastlora: fused" if reason is None else f"fastlora: PEFT's forward now ({reason})"

    def _get_name(self) -> str:
        # The printed model reads as PEFT's ("lora.Linear(" ...), the first line inside showing the fusion.
        return "Linear"


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if type(module) is nn.Dropout else 0.0


def layer_name(module: nn.Module) -> str:
    """``loha.Linear`` for PEFT's tuner layers (as PEFT prints them), else the class name."""
    parts = type(module).__module__.split(".")
    if parts[:2] == ["peft", "tuners"] and len(parts) > 2:
        return f"{parts[2]}.{type(module).__name__}"
    return type(module).__name__


def _plain_base(base: nn.Module) -> str | None:
    """Why ``base`` is not a layer whose forward is exactly x·Wᵀ + b, or None."""
    if isinstance(base, BaseTunerLayer):
        # A LoRA layer stacked on another tuner's layer (LoHa, LoKr, ... in a PeftMixedModel): that layer
        # adds its own term, so its output is not x·Wᵀ + b of a weight we could hand to the op.
        return f"base layer {layer_name(base)}, another tuner's layer"
    if isinstance(base, nn.Linear):
        if type(base).forward is not nn.Linear.forward:
            return f"base layer {layer_name(base)} with its own forward"
    elif not is_conv1d(base):
        return f"base layer {layer_name(base)}"
    if hasattr(base, "_hf_hook") or "forward" in vars(base):
        return f"base layer {layer_name(base)} with a replaced forward"
    if base._forward_hooks or base._forward_pre_hooks:
        return f"base layer {layer_name(base)} with forward hooks"
    return None


def unfusable(layer: Linear, adapters=None) -> str | None:
    """Why this PEFT LoRA ``Linear`` cannot run its ``adapters`` (default: all of them) fused, or None.

    Only the layer it wraps directly counts (``layer.base_layer``, not ``get_base_layer()``, the innermost
    one): the fused op replaces that layer's call, so it must be the plain linear layer itself.
    """
    reason = _plain_base(layer.base_layer)
    if reason is not None:
        return reason
    adapters = list(layer.lora_A) if adapters is None else adapters
    lora_variant = getattr(layer, "lora_variant", {})  # PEFT >= 0.15; before it, DoRA was the one variant
    use_dora = getattr(layer, "use_dora", {})
    variants = [f"{a}: {type(lora_variant[a]).__name__}" if a in lora_variant else f"{a}: DoRA"
                for a in adapters if a in lora_variant or use_dora.get(a)]  # fmt: skip
    if variants:
        return "variant " + ", ".join(variants)
    for a in adapters:
        if getattr(layer.lora_B[a], "bias", None) is not None:
            return "lora_bias"
        dropout = layer.lora_dropout[a]
        if type(dropout) not in (nn.Dropout, nn.Identity):
            return f"dropout module {type(dropout).__name__}"
        if not 0.0 <= _dropout_p(dropout) < 1.0:
            return f"dropout p={dropout.p}"
        scaling = layer.scaling[a]
        if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
            return f"scaling {scaling!r}"
    return None
