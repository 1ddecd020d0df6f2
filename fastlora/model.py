"""LoRA on whole models: inject by module names, several adapters, merge / unmerge / unload, combine.

Module matching follows PEFT's rules, so a PEFT ``LoraConfig``'s ``target_modules`` means the same here:
a list matches a module name exactly or as a dotted suffix ("q_proj" matches "model.layers.0.self_attn.q_proj");
a string is a regular expression that must match the whole name; "all-linear" is every linear layer but the
output head. ``rank_pattern`` / ``alpha_pattern`` keys match as PEFT's do: ``(.*\\.)?(key)$``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastlora.layers import DEFAULT_ADAPTER, LoRALinear, _check_hparams, is_conv1d

__all__ = [
    "inject",
    "plan_injection",
    "apply_injection",
    "InjectionPlan",
    "trainable_parameters",
    "lora_layers",
    "list_adapters",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "merge",
    "unmerge",
    "unload",
    "combine",
    "TrainableParameters",
]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(name: str, patterns: Mapping[str, float] | None, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        with contextlib.suppress(Exception):
            return get()
    return getattr(model, "lm_head", None)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every fastlora layer of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@dataclass
class InjectionPlan:
    """What ``inject`` will do, decided before anything changes: (module name, module, r, lora_alpha) per
    target, and the modules to train whole."""

    targets: list[tuple[str, nn.Module, int, float]]
    modules_to_save: list[str]


def plan_injection(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    adapter_name: str = DEFAULT_ADAPTER,
    exclude_modules: str | Iterable[str] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    modules_to_save: Iterable[str] | None = None,
) -> InjectionPlan:
    """Resolve the targets with PEFT's matching rules and check every argument; changes nothing."""
    if isinstance(target_modules, str) and target_modules == "all-linear":
        head = _output_head(model)
        chosen = [n for n, m in model.named_modules() if n and (_is_linear(m) or isinstance(m, LoRALinear)) and m is not head]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        chosen = [n for n, m in model.named_modules()
                  if n and (_is_linear(m) or isinstance(m, LoRALinear)) and _matches(n, target_modules)]  # fmt: skip
    if exclude_modules is not None:
        excl = exclude_modules if isinstance(exclude_modules, str) else list(exclude_modules)
        chosen = [n for n in chosen if not _matches(n, excl)]
    if not chosen:
        raise ValueError(f"target_modules: no linear layer of the model matches {target_modules!r}")
    targets = []
    for name in chosen:
        rank = _pattern_value(name, rank_pattern, r)
        alpha = _pattern_value(name, alpha_pattern, lora_alpha)
        _check_hparams(rank, alpha, lora_dropout)
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise ValueError(f"adapter_name: {name} already has an adapter named {adapter_name!r}")
        targets.append((name, module, rank, alpha))
    save = [] if modules_to_save is None else list(modules_to_save)
    saved = [n for n, _ in model.named_modules() if n and save and _matches(n, save)]
    if save and not saved:
        raise ValueError(f"modules_to_save: no module of the model matches {save!r}")
    return InjectionPlan(targets, saved)


def apply_injection(model: nn.Module, plan: InjectionPlan, adapter_name: str, lora_dropout: float,
                    use_rslora: bool) -> nn.Module:  # fmt: skip
    """Carry out a plan from ``plan_injection``."""
    for name, module, rank, alpha in plan.targets:
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, rank, alpha, lora_dropout, use_rslora)
        else:
            layer = LoRALinear.from_linear(module, rank, alpha, lora_dropout, use_rslora, adapter_name)
            layer.train(module.training)
            _set_submodule(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, adapter_name)  # the new adapter is the active, trainable one everywhere
    for name in plan.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    previous = set(getattr(model, "_fastlora_modules_to_save", []))
    model._fastlora_modules_to_save = sorted(previous | set(plan.modules_to_save))
    return model


def inject(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    adapter_name: str = DEFAULT_ADAPTER,
    use_rslora: bool = False,
    exclude_modules: str | Iterable[str] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    modules_to_save: Iterable[str] | None = None,
) -> nn.Module:
    """Put LoRA adapter ``adapter_name`` on the matching linear layers of ``model``, in place.

    Matching ``nn.Linear`` and transformers ``Conv1D`` layers become ``LoRALinear`` sharing their weights; layers
    that already are ``LoRALinear`` get the new adapter beside their others. The new adapter becomes the
    active one (``set_adapter``); every parameter is frozen except its own and those of ``modules_to_save``
    (modules matched by the same rules, trained whole). Everything is checked before anything changes: on
    error the model is as it was.

    Returns:
        ``model`` itself.
    """
    plan = plan_injection(model, target_modules, r, lora_alpha, lora_dropout, adapter_name, exclude_modules,
                          rank_pattern, alpha_pattern, modules_to_save)  # fmt: skip
    return apply_injection(model, plan, adapter_name, lora_dropout, use_rslora)


@dataclass(frozen=True)
class TrainableParameters:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {100 * self.share:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Counts of trainable and all parameters (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return TrainableParameters(sum(p.numel() for p in seen.values() if p.requires_grad), total)


def list_adapters(model: nn.Module) -> list[str]:
    """Adapter names present in the model, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def _check_names(model: nn.Module, names: list[str], argument: str) -> None:
    present = list_adapters(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"{argument}: no adapter named {missing} in the model (it has {present})")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make one adapter, or several (their terms add up), the active ones; they become trainable and the
    others frozen."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names, "names")
    for layer in lora_layers(model).values():
        layer.set_active(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    _check_names(model, [name], "name")
    layers = [layer for layer in lora_layers(model).values() if name in layer.lora_A]
    merged = [layer for layer in layers if name in layer.merged_adapters]
    if merged:
        raise ValueError(f"name: adapter {name!r} is merged into {len(merged)} layers; unmerge first")
    for layer in layers:
        layer.delete_adapter(name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with fastlora.disable_adapters(model): ...`` runs the base model alone (merged adapters too are left
    out), then restores what was active."""
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe: bool = False) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights, W + s·B·A summed in fp32 and rounded
    once. The merged layers then cost what plain layers cost. Each merged layer keeps a copy of its original
    weight (same dtype and device: one extra copy of every merged weight) so that ``unmerge`` restores it
    bit-exactly; ``unload`` drops it.

    ``safe`` checks every layer first and refuses non-finite results, leaving the whole model untouched.
    """
    if adapter_names is not None:
        _check_names(model, list(adapter_names), "adapter_names")
    layers = lora_layers(model).values()
    if safe:
        for layer in layers:
            names = [n for n in (adapter_names or layer.active_adapters) if n in layer.lora_A]
            if names and not torch.isfinite(layer.merged_weight(names)).all():
                raise ValueError(f"merge: merging {names} gives non-finite weights; the model was left unchanged")
    for layer in layers:
        layer.merge([n for n in (adapter_names or layer.active_adapters) if n in layer.lora_A])
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Give every merged layer its original weight back, bit-exactly."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def _plain(layer: LoRALinear, weight: torch.Tensor) -> nn.Module:
    """A plain nn.Linear (or Conv1D, for a layer built from one) holding ``weight`` and the layer's bias."""
    if layer.fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        plain = Conv1D(layer.out_features, layer.in_features)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = layer.bias
    return plain


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every fastlora layer by a plain ``nn.Linear`` (``Conv1D`` where it came from one), with the
    active adapters merged in (``merge=True``) or dropped (``merge=False``). Returns ``model``."""
    for name, layer in lora_layers(model).items():
        if merge:
            weight = layer.merged_weight([n for n in layer.active_adapters if n not in layer.merged_adapters])
        else:
            layer.unmerge()
            weight = layer.weight.detach()
        _set_submodule(model, name, _plain(layer, weight))
    return model


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    new_name: str,
    method: str = "linear",
    svd_rank: int | None = None,
) -> nn.Module:
    """A new adapter ``new_name`` made from existing ones, with the semantics of PEFT's
    ``add_weighted_adapter`` for these methods (the new adapter has lora_alpha = r, the first adapter's
    dropout and rsLoRA setting, and is not made active):

    - "linear": all ranks equal; A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ.
    - "cat": ranks concatenated; A = [wᵢsᵢ·Aᵢ], B = [Bᵢ], so B·A = Σ wᵢsᵢ·Bᵢ·Aᵢ exactly.
    - "svd": the rank-``svd_rank`` (default: the largest rank) truncated SVD of Σ wᵢsᵢ·Bᵢ·Aᵢ: B = U·S, A = Vᵀ.
    """
    if not weights:
        raise ValueError("weights: expected at least one adapter name with its weight, got none")
    names = list(weights)
    _check_names(model, names, "weights")
    if new_name in list_adapters(model):
        raise ValueError(f"new_name: the model already has an adapter named {new_name!r}")
    if method not in ("linear", "cat", "svd"):
        raise ValueError(f"method: expected 'linear', 'cat' or 'svd', got {method!r}")
    layers = [layer for layer in lora_layers(model).values() if any(n in layer.lora_A for n in names)]
    ranks = {layer.r[n] for layer in layers for n in names if n in layer.lora_A}
    if method == "linear" and len(ranks) > 1:
        raise ValueError(f"method: 'linear' needs adapters of one rank, these have ranks {sorted(ranks)}")
    if method == "svd" and svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank: expected an integer >= 1 or None, got {svd_rank!r}")
    first = names[0]
    for layer in layers:
        present = [n for n in names if n in layer.lora_A]
        ref = present[0] if first not in layer.lora_A else first
        if method == "linear":
            a, b = _combine_linear(layer, present, weights)
        elif method == "cat":
            a = torch.cat([layer.lora_A[n].data * weights[n] * layer.scaling[n] for n in present], dim=0)
            b = torch.cat([layer.lora_B[n].data for n in present], dim=1)
        else:
            a, b = _combine_svd(layer, present, weights, svd_rank or max(ranks))
        rank = a.shape[0]
        active = list(layer.active_adapters)
        layer.add_adapter(new_name, rank, rank, layer.lora_dropout[ref], layer.use_rslora[ref])
        with torch.no_grad():
            layer.lora_A[new_name].copy_(a)
            layer.lora_B[new_name].copy_(b)
        layer.set_active(active)  # PEFT leaves the new adapter inactive (and frozen)
    return model


def _combine_linear(layer: LoRALinear, names: list[str], weights: Mapping[str, float]):
    a = torch.zeros_like(layer.lora_A[names[0]])
    b = torch.zeros_like(layer.lora_B[names[0]])
    for n in names:
        ws = weights[n] * layer.scaling[n]
        a += math.copysign(math.sqrt(abs(ws)), ws) * layer.lora_A[n].data
        b += math.sqrt(abs(ws)) * layer.lora_B[n].data
    return a, b


def _combine_svd(layer: LoRALinear, names: list[str], weights: Mapping[str, float], rank: int):
    delta = sum(weights[n] * layer.delta_weight([n]) for n in names)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    rank = min(rank, s.shape[0])
    return vh[:rank, :], u[:, :rank] @ torch.diag(s[:rank])
