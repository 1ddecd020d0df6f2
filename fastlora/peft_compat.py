"""Bridges to Hugging Face PEFT (an optional dependency, imported only when these are called)."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["peft_lora_linear", "accelerate"]


def peft_lora_linear(
    linear: nn.Linear,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_name: str = "default",
) -> nn.Module:
    """PEFT's own LoRA ``Linear`` around ``linear`` (frozen), as ``get_peft_model`` would build it.

    Used to compare with PEFT side by side: same base weights, PEFT's initialisation and forward.
    """
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
    for p in linear.parameters():
        p.requires_grad_(False)
    return Linear(linear, adapter_name, config, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                  use_rslora=use_rslora)  # fmt: skip


_FUSED_CLASS = None


def _fused_peft_linear():
    """A subclass of PEFT's LoRA ``Linear`` whose forward runs the fused op. PEFT's own methods (merge,
    set_adapter, state_dict, ...) are inherited untouched; any case the fused path does not cover goes to
    PEFT's forward."""
    global _FUSED_CLASS
    if _FUSED_CLASS is not None:
        return _FUSED_CLASS
    from peft.tuners.lora import Linear

    from fastlora.functional import lora_linear

    class FusedLoraLinear(Linear):
        def forward(self, x, *args, **kwargs):
            active = [a for a in self.active_adapters if a in self.lora_A]
            if args or kwargs or self.disable_adapters or self.merged or not active or _unfusable(self):
                return super().forward(x, *args, **kwargs)
            base = self.get_base_layer()
            weight = base.weight.t() if self.fan_in_fan_out else base.weight
            first, *rest = active
            y = lora_linear(x, weight, base.bias, self.lora_A[first].weight, self.lora_B[first].weight,
                            self.scaling[first], _dropout_p(self.lora_dropout[first]), self.training)  # fmt: skip
            for name in rest:  # further adapters as PEFT runs them
                a = self.lora_A[name]
                y = y + (self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype)))) * self.scaling[name]).to(y.dtype)
            return y

    _FUSED_CLASS = FusedLoraLinear
    return FusedLoraLinear


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _unfusable(layer: nn.Module) -> str | None:
    """Why a PEFT LoRA Linear cannot run fused, or None."""
    from fastlora.layers import is_conv1d

    base = layer.get_base_layer()
    if not (isinstance(base, nn.Linear) or is_conv1d(base)) or hasattr(base, "_hf_hook"):
        return f"base layer {type(base).__name__}"
    if getattr(layer, "lora_variant", None):
        return "variant " + ", ".join(f"{k}: {type(v).__name__}" for k, v in layer.lora_variant.items())
    if any(getattr(layer.lora_B[a], "bias", None) is not None for a in layer.lora_B):
        return "lora_bias"
    if any(not isinstance(d, (nn.Dropout, nn.Identity)) for d in layer.lora_dropout.values()):
        return "custom dropout module"
    return None


def accelerate(peft_model: nn.Module) -> nn.Module:
    """Make an existing PEFT model run fastlora's fused op, in place.

    Each of PEFT's plain LoRA ``Linear`` layers gets a forward that calls the fused op; its parameters,
    state-dict keys and all of PEFT's API (``save_pretrained``, ``set_adapter``, ``merge_and_unload``, ...)
    stay PEFT's. Layers fastlora does not fuse (DoRA and other variants, LoRA bias, quantised or offloaded
    bases, embeddings, convolutions, ...) keep PEFT's forward, and one warning lists them.

    Returns:
        ``peft_model`` itself.
    """
    import warnings

    from peft.tuners.lora import Linear
    from peft.tuners.lora.layer import LoraLayer

    fused_class = _fused_peft_linear()
    left = []
    for name, module in peft_model.named_modules():
        if type(module) is Linear or type(module) is fused_class:
            reason = _unfusable(module)
            if reason is None:
                module.__class__ = fused_class
            else:
                left.append(f"{name} ({reason})")
        elif isinstance(module, LoraLayer):
            left.append(f"{name} ({type(module).__name__})")
    if left:
        warnings.warn(f"fastlora.accelerate left {len(left)} LoRA layers to PEFT: {'; '.join(left)}", stacklevel=2)
    return peft_model
