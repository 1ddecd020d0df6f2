"""Bridges to Hugging Face PEFT (an optional dependency, imported only when these are called)."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["peft_lora_linear"]


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
