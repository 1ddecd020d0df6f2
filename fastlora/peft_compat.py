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


def accelerate(peft_model: nn.Module) -> nn.Module:
    """Make an existing PEFT model run fastlora's fused op, in place.

    Each of PEFT's plain LoRA ``Linear`` layers becomes a ``fastlora.peft_fused.FusedLoraLinear``, and each
    of its QLoRA ``lora.Linear4bit`` layers a ``fastlora.peft_fused.FusedLoraLinear4bit`` (subclasses of
    PEFT's classes, so ``isinstance`` checks hold) whose forward calls the fused op; over a bitsandbytes NF4
    ``Linear4bit`` base it reads the ``Params4bit`` bytes and quant state in place, without a copy. Their
    parameters, state-dict keys and all of PEFT's API (``save_pretrained``, ``set_adapter``,
    ``merge_and_unload``, ...) stay PEFT's, and the model still pickles. Layers fastlora does not fuse keep
    PEFT's forward, and one warning lists them: variants other than DoRA (DoRA runs on
    ``fastlora.dora_linear``, except over a 4-bit base), LoRA bias, FP4 and other
    quantised or offloaded bases, embeddings, convolutions, and a LoRA layer stacked on another tuner's
    layer (LoHa, LoKr, ... in a ``PeftMixedModel``), whose output is not x·Wᵀ + b. Whatever fastlora cannot
    fuse at call time (adapters added later with a variant, merged or disabled adapters, ``adapter_names``,
    ...) also runs PEFT's forward.

    All or nothing: every check runs before anything changes. Accelerating an accelerated model again is
    fine (the same decisions are made again from the layers' current state).

    Args:
        peft_model: a PEFT model (``get_peft_model``, ``PeftModel.from_pretrained``, a ``PeftMixedModel``,
            or any module holding PEFT tuner layers, as ``inject_adapter_in_model`` makes). A PEFT model
            without LoRA ``Linear`` layers (prompt tuning, IA³, ...) is returned unchanged.

    Returns:
        ``peft_model`` itself.

    Raises:
        TypeError: ``peft_model`` is not an ``nn.Module``.
        ValueError: ``peft_model`` is a module with no PEFT layers (nothing PEFT built).
        ImportError: PEFT is not installed.
    """
    import warnings

    if not isinstance(peft_model, nn.Module):
        raise TypeError(
            f"peft_model: expected a PEFT model (a torch.nn.Module, e.g. from peft.get_peft_model), "
            f"got {type(peft_model).__name__}"
        )
    try:
        from peft import PeftMixedModel, PeftModel
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    except ImportError as e:
        raise ImportError(f"fastlora.accelerate needs PEFT (pip install peft): {e}") from e

    from fastlora.peft_fused import fused_class, layer_name, unfusable

    modules = list(peft_model.named_modules())
    if not isinstance(peft_model, (PeftModel, PeftMixedModel, BaseTuner)) and not any(
        isinstance(m, BaseTunerLayer) for _, m in modules
    ):
        from fastlora.model import LORA_LAYERS

        hint = (
            ": its LoRA layers are fastlora's own LoRALinear / LoRAEmbedding / LoRAConv, which need no accelerate"
            if any(isinstance(m, LORA_LAYERS) for _, m in modules)
            else " (no layer of PEFT's tuners in it)"
        )
        name = type(peft_model).__name__
        raise ValueError(f"peft_model: expected a PEFT model, got a {name} with no PEFT layers{hint}")

    # Decide for every layer first, then change: nothing below can fail halfway.
    plan, left = [], []
    for name, module in modules:
        classes = fused_class(module)
        if classes is not None:
            reason = unfusable(module)
            plan.append((module, classes[1] if reason is None else classes[0]))
            if reason is not None:
                left.append(f"{name} ({reason})")
        elif isinstance(module, LoraLayer):
            left.append(f"{name} ({layer_name(module)})")
    for module, cls in plan:
        module.__class__ = cls
    if left:
        warnings.warn(f"fastlora.accelerate left {len(left)} LoRA layers to PEFT: {'; '.join(left)}", stacklevel=2)
    return peft_model
