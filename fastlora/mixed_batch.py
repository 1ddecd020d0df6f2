"""Mixed-adapter batches in a model: each sample of a batch runs with its own adapter (PEFT's
``adapter_names``), through ``fastlora.lora_linear_multi`` in every LoRA layer.

``with fastlora.adapter_names(model, names): model(x)`` works on fastlora models and on ``accelerate``d PEFT
models, in training mode too; ``model(x, adapter_names=names)`` does the same on a model that ``inject``
gave LoRA layers (and on a PEFT model, as PEFT defines it), and ``model.generate(..., adapter_names=names)``
on transformers models. The names are checked against the whole model before anything runs. Each layer
groups its rows once per batch shape (the grouping is shared by the layers that hold the same adapters).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlora._checks import check_adapter_name
from fastlora.grouping import RowGrouping, group_rows

__all__ = ["BASE", "MixedBatch", "adapter_names", "current", "stack_adapters"]

# PEFT's name for "this sample runs the base model alone".
BASE = "__base__"

_CURRENT: contextvars.ContextVar[MixedBatch | None] = contextvars.ContextVar("fastlora_mixed_batch", default=None)


def current() -> MixedBatch | None:
    """The mixed batch the running forward is in, or None. Always None while torch.compile traces (it cannot
    trace a ContextVar; mixed batches run eagerly)."""
    if torch.compiler.is_compiling():
        return None
    return _CURRENT.get()


class MixedBatch:
    """One adapter name per sample (the first dimension of each layer's input), ``BASE`` for the base alone.

    With ``expand`` (inside ``generate``), a layer input of k·len(names) samples takes each name k times in
    a row, as generation expands samples for beams and returned sequences.
    """

    def __init__(self, names: Sequence[str], expand: bool = False) -> None:
        self.names = tuple(names)
        self.expand = expand
        self.distinct = tuple(dict.fromkeys(n for n in self.names if n != BASE))
        self._groupings: dict[tuple, tuple[tuple[str, ...], RowGrouping | None]] = {}

    def sample_names(self, x: torch.Tensor) -> tuple[str, ...]:
        """One name per sample of a layer input x (its first dimension; a 1-D x is one sample)."""
        samples = x.shape[0] if x.dim() > 1 else 1
        names = self.names
        if samples != len(names):
            if not (self.expand and len(names) and samples % len(names) == 0):
                raise ValueError(f"adapter_names: expected one name per sample, {samples} (the batch size), "
                                 f"got {len(names)}")  # fmt: skip
            names = tuple(n for n in names for _ in range(samples // len(names)))
        return names

    def grouping(self, layer_adapters, x: torch.Tensor) -> tuple[tuple[str, ...], RowGrouping | None]:
        """(the adapters of this batch the layer has, in stacking order; the rows' grouping over them), or
        (``()``, None) when none of the layer's adapters is in the batch (the layer runs its base alone)."""
        local = tuple(n for n in self.distinct if n in layer_adapters)
        key = (local, tuple(x.shape[:-1]), x.device)
        found = self._groupings.get(key)
        if found is not None:
            return found
        names = self.sample_names(x)
        grouping = None
        if local:
            position = {n: i for i, n in enumerate(local)}
            index = torch.tensor([position.get(n, -1) for n in names], dtype=torch.int64, device=x.device)
            grouping = group_rows(index if x.dim() > 1 else index.view(()), len(local), tuple(x.shape[:-1]))
        found = self._groupings[key] = (local, grouping)
        return found


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    """fastlora's LoRALinear layers and PEFT's LoRA layers of ``model``: the modules holding a ``lora_A``
    dict (read from ``_modules``: ``hasattr`` on a module costs an exception per miss), in ``modules()``
    order. Inside a LoRA layer only its base layer is searched: its per-adapter modules (3 per adapter) hold
    none, and this runs on every mixed-batch forward."""
    found, seen, stack = [], set(), [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        children = module._modules
        if isinstance(children.get("lora_A"), (nn.ModuleDict, nn.ParameterDict)):
            found.append(module)
            children = {"base_layer": children.get("base_layer")}
        stack.extend(child for child in reversed(children.values()) if child is not None)
    return found


def check_names(model: nn.Module, names: object) -> tuple[str, ...]:
    """``names`` checked against ``model``: a list of adapter names (or ``BASE``), each one an adapter of some
    LoRA layer, and nothing merged (PEFT refuses that too: a merged adapter is in every sample's weight)."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"adapter_names: expected a list of adapter names, one per sample, got {names!r} "
                        f"({type(names).__name__})")  # fmt: skip
    for i, n in enumerate(names):
        if type(n) is not str or not n or "." in n:  # the usual names pass without building a message
            check_adapter_name(f"adapter_names[{i}]", n)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("adapter_names: the model has no LoRA layers")
    known = set()
    for layer in layers:
        known.update(layer._modules["lora_A"].keys())
    bad = sorted({n for n in names if n != BASE and n not in known})
    if bad:
        raise ValueError(f"adapter_names: no adapter named {bad} in the model (it has {sorted(known)}, and "
                         f"{BASE!r} runs the base alone)")  # fmt: skip
    for layer in layers:
        merged = getattr(layer, "merged_adapters", None)
        if merged:
            name = next(n for n, m in model.named_modules() if m is layer)
            raise ValueError(f"adapter_names: {name or 'the model'} has merged adapters {list(merged)}; mixed "
                             "batches need every adapter unmerged (unmerge first)")  # fmt: skip
    return tuple(names)


@contextlib.contextmanager
def adapter_names(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """``with fastlora.adapter_names(model, ["a", "__base__", "b"]): model(x)``: sample i of every forward in
    the block runs adapter ``names[i]`` (``"__base__"``: the base alone), in eval and training mode. Layers
    without that adapter run the base for it; disabled layers (``disable_adapters``) run the base for all.

    Raises before anything runs when a name is not an adapter of the model or adapters are merged; a forward
    whose batch size is not ``len(names)`` raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    with _in_batch(MixedBatch(check_names(model, names))):
        yield model


@contextlib.contextmanager
def _in_batch(batch: MixedBatch) -> Iterator[None]:
    """Forwards inside run in ``batch``; the one before comes back after, also on an exception."""
    token = _CURRENT.set(batch)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def stack_adapters(owner: nn.Module, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """The adapters' (A (r_a, K), B (N, r_a)) pairs stacked for ``lora_linear_multi``: (A (n, r_max, K),
    B (n, N, r_max), ranks), lanes past an adapter's rank zero. Differentiable. When no gradient is needed
    (inference) the stack is kept on ``owner`` and reused while the adapters' tensors are unchanged (the
    same storages, no in-place change since: their version counters)."""
    ranks = tuple(a.shape[0] for a, _ in pairs)
    r_max = max(ranks)
    grad = torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b in pairs)
    key = None
    if not grad:
        key = tuple((a.data_ptr(), a._version, b.data_ptr(), b._version) for a, b in pairs)
        cached = owner.__dict__.get("_fastlora_stack")
        if cached is not None and cached[0] == key:
            return cached[1]
    a_stack = torch.stack([a if a.shape[0] == r_max else F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a, _ in pairs])
    # B stored (n, r_max, N) and viewed (n, N, r_max): the kernels read B_a's rows along N, and the torch
    # backend's stacked path reshapes it to (n·r_max, N) without a copy.
    b_stack = torch.stack([(b if b.shape[1] == r_max else F.pad(b, (0, r_max - b.shape[1]))).t() for _, b in pairs])
    b_stack = b_stack.transpose(1, 2)
    result = (a_stack, b_stack, ranks)
    if key is not None:
        owner.__dict__["_fastlora_stack"] = (key, result)
    return result


# --- the adapter_names keyword on a model (inject installs it) ---------------------------------------------


def _pre_hook(module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    # One entry per call, pushed before the names are checked: the forward hook (always called, also when
    # this one raises) pops exactly this call's entry.
    tokens = module.__dict__["_fastlora_mixed_tokens"]
    tokens.append(None)
    if names is not None:
        tokens[-1] = _CURRENT.set(MixedBatch(check_names(module, names)))
    return args, kwargs


def _post_hook(module, args, output):
    token = module.__dict__["_fastlora_mixed_tokens"].pop()
    if token is not None:
        _CURRENT.reset(token)
    return output


def _generate(model: nn.Module, original, *args, adapter_names=None, **kwargs):
    """transformers' ``generate`` taking ``adapter_names`` (one per prompt), as PEFT's does: every forward of
    the generation runs in that mixed batch, names repeated for the beams and returned sequences."""
    if adapter_names is None:
        return original(*args, **kwargs)
    with _in_batch(MixedBatch(check_names(model, adapter_names), expand=True)):
        return original(*args, **kwargs)


def install_keyword(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` (and ``model.generate(..., adapter_names=[...])`` on a transformers
    model) run a mixed batch. Idempotent; ``remove_keyword`` takes it away."""
    if "_fastlora_mixed_hooks" in model.__dict__:
        return
    handles = [model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
               model.register_forward_hook(_post_hook, always_call=True)]  # fmt: skip
    generate = getattr(model, "generate", None)
    if callable(generate) and "generate" not in model.__dict__:
        model.generate = functools.partial(_generate, model, generate)
    model.__dict__["_fastlora_mixed_hooks"] = handles
    model.__dict__["_fastlora_mixed_tokens"] = []


def remove_keyword(model: nn.Module) -> None:
    for handle in model.__dict__.pop("_fastlora_mixed_hooks", []):
        handle.remove()
    model.__dict__.pop("_fastlora_mixed_tokens", None)
    generate = model.__dict__.get("generate")
    if isinstance(generate, functools.partial) and generate.func is _generate:
        del model.__dict__["generate"]
