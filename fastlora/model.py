"""LoRA on whole models: inject by module names, several adapters, merge / unmerge / unload, combine.

Module matching follows PEFT's rules, so a PEFT ``LoraConfig``'s ``target_modules`` means the same here:
a list matches a module name exactly or as a dotted suffix ("q_proj" matches "model.layers.0.self_attn.q_proj");
a string is a regular expression that must match the whole name; "all-linear" is every linear layer but the
output head. Besides linear layers, a list or a regular expression also targets ``nn.Embedding`` and
``nn.Conv1d/2d/3d`` modules (``fastlora.variants``: PEFT's LoRA on embeddings and convolutions). ``rank_pattern`` / ``alpha_pattern`` keys match as PEFT's do: ``(.*\\.)?(key)$``.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastlora._checks import (
    check_adapter_name,
    check_bool,
    check_hparams,
    check_module,
    check_module_names,
    check_names,
    check_pattern,
    check_rank,
    check_real,
)
from fastlora import mixed_batch
from fastlora import variants
from fastlora.layers import DEFAULT_ADAPTER, LoRALinear, is_conv1d
from fastlora.quantized import NF4Linear
from fastlora.variants import LoRAConv, LoRAEmbedding

# Every fastlora LoRA layer: the fused linear one and the plain-op embedding / convolution ones share the
# adapter interface (adapters, set_active, merge, ...) that the functions below use.
LoRALayer = LoRALinear | LoRAEmbedding | LoRAConv
LORA_LAYERS = (LoRALinear, *variants.VARIANT_LAYERS)

__all__ = [
    "all_or_nothing",
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
    return isinstance(module, nn.Linear) or is_conv1d(module) or isinstance(module, NF4Linear)


def _is_target(module: nn.Module) -> bool:
    """What a list or regular expression in ``target_modules`` can select."""
    return _is_linear(module) or isinstance(module, LORA_LAYERS) or variants.is_variant_target(module)


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


def _check_model(model: object) -> nn.Module:
    return check_module("model", model)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every fastlora layer of ``model`` (``LoRALinear``, ``LoRAEmbedding``, ``LoRAConv``) by module name."""
    _check_model(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def _features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a layer of any of the kinds ``inject`` takes (PEFT's counts for
    embeddings and convolutions: see ``variants.features``)."""
    if variants.is_variant(module):
        return variants.features(module)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return module.out_features, module.in_features
    return module.weight.shape[1], module.weight.shape[0]  # Conv1D stores (in, out)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _copy_one_level(value):
    return type(value)(value) if isinstance(value, (dict, list, set)) else value


@contextlib.contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Run a change of ``model`` so that, if it raises, the model is as it was: the same modules in the same
    places, the same parameters and buffers (the same tensor objects), each parameter's ``requires_grad``,
    and every module's own attributes (fastlora's adapter tables, active and merged lists, ...).

    Each module's ``__dict__`` is copied one level deep (its ``_modules``, ``_parameters`` and attribute
    dicts and lists), which is cheap; tensor values are not copied, so a change that writes into existing
    tensors in place must do so last, after everything that can fail (or undo it itself, as ``merge``
    does)."""
    modules = list({id(m): m for m in model.modules()}.values())
    saved = [(m, {k: _copy_one_level(v) for k, v in m.__dict__.items()}) for m in modules]
    grads = [(p, p.requires_grad) for p in {id(p): p for p in model.parameters()}.values()]
    try:
        yield
    except BaseException:
        for m, state in saved:
            m.__dict__.clear()
            m.__dict__.update({k: _copy_one_level(v) for k, v in state.items()})
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
        raise


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
    _check_model(model)
    check_adapter_name("adapter_name", adapter_name)
    r, lora_alpha, lora_dropout = check_hparams(r, lora_alpha, lora_dropout)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        head = _output_head(model)
        chosen = [n for n, m in model.named_modules() if n and (_is_linear(m) or isinstance(m, LoRALinear)) and m is not head]
    else:
        target_modules = check_module_names("target_modules", target_modules)
        chosen = [n for n, m in model.named_modules() if n and _is_target(m) and _matches(n, target_modules)]
    exclude_modules = check_module_names("exclude_modules", exclude_modules, allow_none=True)
    if exclude_modules is not None:
        chosen = [n for n in chosen if not _matches(n, exclude_modules)]
    # A fastlora layer's base_layer (a LoRALinear's quantised one, a LoRAConv's conv, ...) is part of that
    # layer, not a target of its own.
    inside = {n for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)}
    chosen = [n for n in chosen if not any(n.startswith(p + ".") for p in inside)]
    if not chosen:
        raise ValueError(f"target_modules: no linear layer of the model matches {target_modules!r} (nor any "
                         "nn.Embedding or nn.Conv1d/2d/3d)")  # fmt: skip
    rank_pattern = check_pattern("rank_pattern", rank_pattern, check_rank)
    alpha_pattern = check_pattern("alpha_pattern", alpha_pattern, check_real)
    targets = []
    for name in chosen:
        module = model.get_submodule(name)
        out_f, in_f = _features(module)
        rank = check_rank(f"rank_pattern for {name}", _pattern_value(name, rank_pattern, r), in_f, out_f)
        alpha = _pattern_value(name, alpha_pattern, lora_alpha)
        if isinstance(module, LORA_LAYERS) and adapter_name in module.lora_A:
            raise ValueError(f"adapter_name: {name} already has an adapter named {adapter_name!r}")
        if variants.is_variant_target(module):
            reason = variants.unsupported_reason(module)
            if reason is not None:
                raise TypeError(f"target_modules: {name} is {reason}; fastlora's LoRAEmbedding and LoRAConv wrap "
                                "plain ones (exclude it with exclude_modules)")  # fmt: skip
        if variants.is_variant(module):
            # r and rank_pattern: the one that gave this layer its rank is the one named
            argument = f"rank_pattern for {name}" if _pattern_value(name, rank_pattern, None) is not None else "r"
            variants.check_rank_for(argument, module, rank)
        if not isinstance(module, (*LORA_LAYERS, NF4Linear)) and not module.weight.is_floating_point():
            raise TypeError(f"target_modules: {name} has a {module.weight.dtype} weight; LoRA needs a floating-point "
                            "base or a fastlora.NF4Linear (fastlora.quantize)")  # fmt: skip
        targets.append((name, module, rank, alpha))
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    save = check_module_names("modules_to_save", modules_to_save, allow_none=True) or []
    saved = [n for n, _ in model.named_modules() if n and save and _matches(n, save)]
    if save and not saved:
        raise ValueError(f"modules_to_save: no module of the model matches {save!r}")
    target_names = [t[0] for t in targets]
    overlap = [n for n in saved if any(n == t or n.startswith(t + ".") or t.startswith(n + ".") for t in target_names)]
    if overlap:
        raise ValueError(f"modules_to_save: {overlap[:5]} are (or contain, or lie inside) LoRA targets; a module is "
                         "either trained whole or given an adapter, not both")  # fmt: skip
    return InjectionPlan(targets, saved)


def _check_dora_targets(plan: InjectionPlan) -> None:
    """DoRA runs on linear layers with a dense base: refuse the rest by name before anything changes."""
    for name, module, *_ in plan.targets:
        if variants.is_variant(module):
            raise NotImplementedError(f"use_dora: DoRA on {name} ({type(module).__name__}) is not implemented, only on "
                                      "linear layers (exclude it with exclude_modules)")  # fmt: skip
        if isinstance(module, NF4Linear) or (isinstance(module, LoRALinear) and module.quantized):
            raise NotImplementedError(f"use_dora: DoRA on {name}, a quantised (NF4) base, is not implemented")


def apply_injection(model: nn.Module, plan: InjectionPlan, adapter_name: str, lora_dropout: float,
                    use_rslora: bool, use_dora: bool = False) -> nn.Module:  # fmt: skip
    """Carry out a plan from ``plan_injection``. If anything fails (an allocation), the model is left as it
    was (``all_or_nothing``)."""
    if use_dora:
        _check_dora_targets(plan)
    with all_or_nothing(model):
        _apply_injection(model, plan, adapter_name, lora_dropout, use_rslora, use_dora)
    mixed_batch.install_keyword(model)  # model(..., adapter_names=[...]): a mixed-adapter batch
    return model


def _apply_injection(model, plan, adapter_name, lora_dropout, use_rslora, use_dora=False):
    for name, module, rank, alpha in plan.targets:
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, rank, alpha, lora_dropout, use_rslora, use_dora)
        elif isinstance(module, LORA_LAYERS):
            module.add_adapter(adapter_name, rank, alpha, lora_dropout, use_rslora)
        elif variants.is_variant_target(module):
            layer = variants.wrap(module, rank, alpha, lora_dropout, use_rslora, adapter_name)
            layer.train(module.training)
            _set_submodule(model, name, layer)
        else:
            layer = LoRALinear.from_linear(module, rank, alpha, lora_dropout, use_rslora, adapter_name, use_dora)
            layer.train(module.training)
            _set_submodule(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, adapter_name)  # the new adapter is the active, trainable one everywhere
    for name in plan.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    previous = set(getattr(model, "_fastlora_modules_to_save", []))
    model._fastlora_modules_to_save = sorted(previous | set(plan.modules_to_save))


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
    use_dora: bool = False,
) -> nn.Module:
    """Put LoRA adapter ``adapter_name`` on the matching layers of ``model``, in place.

    ``use_dora``: a DoRA adapter (PEFT's ``LoraConfig(use_dora=True)``, see ``fastlora.dora_linear``), on
    linear layers with a dense base only (NotImplementedError otherwise, before anything changes).

    Matching ``nn.Linear`` and transformers ``Conv1D`` layers become ``LoRALinear`` sharing their weights;
    ``nn.Embedding`` layers become ``LoRAEmbedding`` and ``nn.Conv1d/2d/3d`` layers ``LoRAConv``, each wrapping
    the base module (PEFT's conventions; plain PyTorch ops, see ``fastlora.variants``; "all-linear" selects
    linear layers only, as in PEFT). Layers that already are fastlora layers get the new adapter beside their
    others. A convolution with groups > 1 needs a rank divisible by its groups. The new adapter becomes the
    active one (``set_adapter``); every parameter is frozen except its own and those of ``modules_to_save``
    (modules matched by the same rules, trained whole). Everything is checked before anything changes: on
    error the model is as it was.

    Returns:
        ``model`` itself.
    """
    plan = plan_injection(model, target_modules, r, lora_alpha, lora_dropout, adapter_name, exclude_modules,
                          rank_pattern, alpha_pattern, modules_to_save)  # fmt: skip
    check_bool("use_rslora", use_rslora)
    check_bool("use_dora", use_dora)
    return apply_injection(model, plan, adapter_name, float(lora_dropout), use_rslora, use_dora)


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
    """Counts of trainable and all parameters (shared tensors counted once; an NF4 weight counts its
    out_features · in_features parameters, though they are stored as buffers)."""
    _check_model(model)
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return TrainableParameters(sum(p.numel() for p in seen.values() if p.requires_grad), total)


def list_adapters(model: nn.Module) -> list[str]:
    """Adapter names present in the model, in the order they were added."""
    return _names_over_layers(model, lambda layer: layer.adapters)


def _active_adapters(model: nn.Module) -> list[str]:
    return _names_over_layers(model, lambda layer: layer.active_adapters)


def _names_over_layers(model: nn.Module, names_of) -> list[str]:
    """The distinct names ``names_of(layer)`` gives over the model's fastlora layers, first-seen order."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(names_of(layer)))
    return list(names)


def _check_names(model: nn.Module, names: list[str], argument: str) -> None:
    present = list_adapters(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"{argument}: no adapter named {missing} in the model (it has {present})")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make one adapter, or several (their terms add up), the active ones; they become trainable and the
    others frozen. An empty list is refused: ``disable_adapters`` runs the base model alone."""
    _check_model(model)
    names = check_names("names", names)
    _check_names(model, names, "names")
    for layer in lora_layers(model).values():
        layer.set_active(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer. Deleting an active adapter is allowed (as in PEFT): the
    other active adapters stay active, and when it was the only one the first remaining adapter becomes
    active, with a warning. A merged adapter must be unmerged first."""
    _check_model(model)
    check_adapter_name("name", name)
    _check_names(model, [name], "name")
    layers = [layer for layer in lora_layers(model).values() if name in layer.lora_A]
    merged = [layer for layer in layers if name in layer.merged_adapters]
    if merged:
        raise ValueError(f"name: adapter {name!r} is merged into {len(merged)} layers; unmerge first")
    active = _active_adapters(model)
    for layer in layers:
        layer.delete_adapter(name)
    if name in active:
        rest = [a for a in active if a != name]
        remaining = list_adapters(model)
        if not rest and remaining:
            warnings.warn(f"adapter {name!r} was the active adapter and is deleted; {remaining[0]!r} is now active",
                          stacklevel=2)  # fmt: skip
            rest = [remaining[0]]
        if rest:
            set_adapter(model, rest)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with fastlora.disable_adapters(model): ...`` runs the base model alone (merged adapters too are left
    out), then restores what was active."""
    _check_model(model)
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def merge(model: nn.Module, adapter_names: str | list[str] | None = None, safe: bool = False) -> nn.Module:
    """Fold adapters (default: the active ones; a name or a non-empty list) into the base weights,
    W + s·B·A summed in fp32 and rounded once. The merged layers then cost what plain layers cost. Each
    merged layer keeps a copy of its original weight (same dtype and device: one extra copy of every merged
    weight) so that ``unmerge`` restores it bit-exactly; ``unload`` drops it. Adapters already merged are
    not merged again.

    ``safe`` checks every layer first and refuses non-finite results. On any error the whole model is left
    as it was; a ``LoRAConv`` with groups > 1 cannot be merged (NotImplementedError, as in PEFT).
    """
    _check_model(model)
    check_bool("safe", safe)
    if adapter_names is not None:
        adapter_names = check_names("adapter_names", adapter_names)
        _check_names(model, adapter_names, "adapter_names")
    layers = list(lora_layers(model).values())

    def pending(layer: LoRALayer) -> list[str]:
        wanted = layer.active_adapters if adapter_names is None else adapter_names
        return [n for n in wanted if n in layer.lora_A and n not in layer.merged_adapters]

    if safe:
        for layer in layers:
            names = pending(layer)
            if names and not torch.isfinite(layer.merged_weight(names)).all():
                raise ValueError(f"merge: merging {names} gives non-finite weights; the model was left unchanged")
    done: list[tuple[LoRALayer, list[str]]] = []
    try:
        for layer in layers:
            names = pending(layer)
            if names:
                before = list(layer.merged_adapters)
                layer.merge(names)
                done.append((layer, before))
    except BaseException:
        for layer, before in done:
            layer.restore_merged(before)
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Give every merged layer its original weight back, bit-exactly."""
    _check_model(model)
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


def _unloaded_quantized(layer: LoRALinear, merge: bool) -> NF4Linear:
    """The NF4Linear ``unload`` leaves for a layer on a quantised base: its original codes (``merge=False``),
    or the codes with the active adapters merged in, requantised (warned, with the error it introduced)."""
    base = layer.base_layer
    q = layer._original_nf4()
    if merge:
        merged = [*layer.merged_adapters, *(n for n in layer.active_adapters if n not in layer.merged_adapters)]
        if merged == layer.merged_adapters:
            q = base.weight
        elif merged:
            q, error = layer.requantized(merged)
            warnings.warn(f"unload: {merged} merged into a 4-bit (NF4) base by requantising; that changed the merged "
                          f"weight by up to {error:.3g} (absolute) against the exact sum", stacklevel=3)  # fmt: skip
    plain = NF4Linear.from_weight(q, base.bias, base.compute_dtype, base.fan_in_fan_out)
    plain.train(base.training)
    return plain


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every fastlora layer by a plain ``nn.Linear`` (``Conv1D`` where it came from one), with the
    active adapters merged in (``merge=True``) or dropped (``merge=False``). Returns ``model``. The new
    layers are all built before any is put in place.

    A ``LoRAEmbedding`` / ``LoRAConv`` gives back its base module, or a shallow copy of it holding the merged
    (or, while merged, the original) weight; ``merge=True`` refuses a grouped convolution with an adapter to
    merge (NotImplementedError), before anything changes.

    A layer on a quantised base becomes its ``NF4Linear``: with ``merge=False`` its original codes, bit for
    bit; with ``merge=True`` the merged weight requantised to NF4 (lossy: a warning gives the largest error
    requantising introduced, as ``merge`` does). To keep a merged model exact, dequantise instead:
    ``merged_weight`` gives the exact fp32 sum."""
    _check_model(model)
    check_bool("merge", merge)
    layers = lora_layers(model)
    others = {name: layer.unloaded(merge) for name, layer in layers.items() if isinstance(layer, variants.VARIANT_LAYERS)}
    layers = {name: layer for name, layer in layers.items() if name not in others}
    quantized = {name: _unloaded_quantized(layer, merge) for name, layer in layers.items() if layer.quantized}
    layers = {name: layer for name, layer in layers.items() if not layer.quantized}
    weights = {}
    for name, layer in layers.items():
        if merge:
            weights[name] = layer.merged_weight([n for n in layer.active_adapters if n not in layer.merged_adapters])
        else:  # the original weight itself: the copy kept while merged, else the weight in place
            weights[name] = layer._unmerged_weight if layer._unmerged_weight is not None else layer.weight.detach()
    plain = {name: _plain(layer, weights[name]) for name, layer in layers.items()}
    plain.update(quantized)
    plain.update(others)
    for name, module in plain.items():
        _set_submodule(model, name, module)
    mixed_batch.remove_keyword(model)
    return model


_COMBINE_METHODS = ("linear", "cat", "svd")


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
      ``svd_rank`` must not exceed min(in_features, out_features) of any layer involved. On a ``LoRAConv``
      the product is taken over the flattened kernel (A (r, in·k…)); a grouped convolution cannot (its ΔW
      reaches across groups: NotImplementedError).

    Weights are finite numbers; zero and negative weights are allowed (as in PEFT). Every layer's new
    matrices are computed before any layer changes; on error the model is as it was.
    """
    _check_model(model)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights: expected a dict {{adapter name: weight}}, got {type(weights).__name__}")
    if not weights:
        raise ValueError("weights: expected at least one adapter name with its weight, got none")
    names = [check_adapter_name("weights (a key)", n) for n in weights]
    weights = {n: check_real(f"weights[{n!r}]", w) for n, w in weights.items()}
    _check_names(model, names, "weights")
    check_adapter_name("new_name", new_name)
    if new_name in list_adapters(model):
        raise ValueError(f"new_name: the model already has an adapter named {new_name!r}")
    if not isinstance(method, str) or method not in _COMBINE_METHODS:
        raise ValueError(f"method: expected 'linear', 'cat' or 'svd', got {method!r}")
    layers = [layer for layer in lora_layers(model).values() if any(n in layer.lora_A for n in names)]
    ranks = {layer.r[n] for layer in layers for n in names if n in layer.lora_A}
    if method == "linear" and len(ranks) > 1:
        raise ValueError(f"method: 'linear' needs adapters of one rank, these have ranks {sorted(ranks)}")
    if svd_rank is not None:
        if method != "svd":
            raise ValueError(f"svd_rank: only used with method='svd', got svd_rank={svd_rank!r} with method={method!r}")
        svd_rank = check_rank("svd_rank", svd_rank)
        most = min(min(layer.in_features, layer.out_features) for layer in layers)
        if svd_rank > most:
            raise ValueError(f"svd_rank: expected at most {most} (the smallest layer's min(in, out)), got {svd_rank}")
    dora = sorted({n for layer in layers for n in names if getattr(layer, "use_dora", {}).get(n)})
    if dora:
        raise NotImplementedError(f"weights: combining DoRA adapters ({dora}) is not implemented")
    first = names[0]
    planned = []
    for layer in layers:  # all the linear algebra first: nothing changes until every layer has its result
        present = [n for n in names if n in layer.lora_A]
        ref = present[0] if first not in layer.lora_A else first
        if method == "linear":
            a, b = _combine_linear(layer, present, weights)
        elif method == "cat" and isinstance(layer, variants.VARIANT_LAYERS):
            a, b = variants.concat_adapters(layer, present, weights)
        elif method == "cat":
            a = torch.cat([layer.lora_A[n].data * weights[n] * layer.scaling[n] for n in present], dim=0)
            b = torch.cat([layer.lora_B[n].data for n in present], dim=1)
        else:
            a, b = _combine_svd(layer, present, weights, svd_rank or max(ranks))
        planned.append((layer, a, b, ref))
    with all_or_nothing(model):
        for layer, a, b, ref in planned:
            rank = a.shape[0]
            active = list(layer.active_adapters)
            layer.add_adapter(new_name, rank, rank, layer.lora_dropout[ref], layer.use_rslora[ref])
            with torch.no_grad():
                layer.lora_A[new_name].copy_(a)
                layer.lora_B[new_name].copy_(b)
            layer.set_active(active)  # PEFT leaves the new adapter inactive (and frozen)
    return model


def _combine_linear(layer: LoRALayer, names: list[str], weights: Mapping[str, float]):
    a = torch.zeros_like(layer.lora_A[names[0]])
    b = torch.zeros_like(layer.lora_B[names[0]])
    for n in names:
        ws = weights[n] * layer.scaling[n]
        a += math.copysign(math.sqrt(abs(ws)), ws) * layer.lora_A[n].data
        b += math.sqrt(abs(ws)) * layer.lora_B[n].data
    return a, b


def _combine_svd(layer: LoRALayer, names: list[str], weights: Mapping[str, float], rank: int):
    if isinstance(layer, variants.VARIANT_LAYERS):  # ΔW as a matrix (a conv's flattened over its kernel)
        delta = sum(weights[n] * layer._delta_matrix(n, "method") for n in names)
    else:
        delta = sum(weights[n] * layer.delta_weight([n]) for n in names)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    rank = min(rank, s.shape[0])
    a, b = vh[:rank, :], u[:, :rank] @ torch.diag(s[:rank])
    return layer._from_matrices(a, b) if isinstance(layer, variants.VARIANT_LAYERS) else (a, b)
