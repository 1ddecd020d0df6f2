"""The backend registry: which implementation runs the LoRA linear op.

A backend is a module in this package exposing ``BACKEND``, an object with:

- ``name``: its registry name;
- ``unavailable_reason(device, dtype=None) -> str | None``: None when it can run on ``device`` (with inputs
  of ``dtype``, when given), else why not;
- ``forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y, shrink)``;
- ``backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed, needs) -> grads``;
- ``keep_mask(seed, shape, dropout_p, device) -> BoolTensor``: the dropout keep-mask ``forward`` used,
  so tests can hand it to the reference;
- for mixed-adapter batches (``fastlora.lora_linear_multi``): ``forward_multi(x, weight, bias, lora_A,
  lora_B, scalings, dropout_ps, ranks, grouping, seed, want_shrink=True) -> (y, shrink)``,
  ``backward_multi(..., grouping, seed, needs) -> grads`` and ``multi_keep_mask(seed, grouping, dropout_ps,
  in_features, device)``, with the adapters stacked (A (n, r_max, K), B (n, N, r_max)) and the rows'
  ``fastlora.RowGrouping``.

The choice is read at every call (``set_backend`` first, then ``$FASTLORA_BACKEND``, then "auto"), so it
can change while a program runs, also inside a compiled graph: the op's implementation resolves it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "AUTO",
    "BACKEND_NAMES",
    "get_backend",
    "resolve_backend",
    "selected_backend_name",
    "set_backend",
    "use_backend",
    "backend_status",
    "forget_resolved",
    "draw_seed",
]

AUTO = "auto"
ENV_VAR = "FASTLORA_BACKEND"

# Registry name -> module. Modules are imported on first use so that a slow or broken optional
# dependency (triton, the CUDA extension) never costs anything at `import fastlora`.
_MODULES: dict[str, str] = {
    "torch": "fastlora.backends.torch_backend",
    "triton": "fastlora.backends.triton_backend",
    "cuda": "fastlora.backends.cuda_backend",
}
BACKEND_NAMES: tuple[str, ...] = tuple(_MODULES)

# What "auto" tries, fastest first, per device type. The torch backend runs everywhere and ends each list.
# On CUDA devices the "cuda" backend (the extension's decode kernel, Triton for the rest) comes first when
# the extension is built and runs; else Triton.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton")}
_AUTO_FALLBACK: tuple[str, ...] = ("torch",)

_selected: str | None = None

# The variable is read at every call; os.environ.get encodes the key and decodes the value each time (about
# a microsecond, on every layer call). On POSIX os.environ keeps its bytes in ``_data``, which putenv through
# os.environ updates too: read there, by a key encoded once.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENVIRON_BYTES = _ENVIRON_BYTES if type(_ENVIRON_BYTES) is dict else None
_ENV_KEY = os.fsencode(ENV_VAR)


def _env_choice() -> str | None:
    if _ENVIRON_BYTES is not None:
        raw = _ENVIRON_BYTES.get(_ENV_KEY)
        return None if raw is None else os.fsdecode(raw)
    return os.environ.get(ENV_VAR)


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or (name != AUTO and name not in _MODULES):
        raise ValueError(f"{source}: expected one of {[AUTO, *BACKEND_NAMES]}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Choose the backend for every later call: "auto", one of ``BACKEND_NAMES``, or None to go back to
    ``$FASTLORA_BACKEND`` (or "auto" when that is unset)."""
    global _selected
    _selected = None if name is None else _check_name(name, "set_backend(name)")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """``with fastlora.use_backend("torch"): ...`` selects a backend for the block, then restores the last one."""
    global _selected
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        _selected = previous


def selected_backend_name() -> str:
    """The name asked for now: ``set_backend``'s, else ``$FASTLORA_BACKEND``, else "auto"."""
    if _selected is not None:
        return _selected
    env = _env_choice()
    if env:
        return _check_name(env.strip().lower(), f"${ENV_VAR}")
    return AUTO


_loaded: dict[str, Any] = {}


def get_backend(name: str) -> Any:
    """The backend object registered as ``name`` (imported on first use)."""
    _check_name(name, "backend name")
    if name == AUTO:
        raise ValueError("backend name: 'auto' is resolved per device; call resolve_backend(device)")
    backend = _loaded.get(name)
    if backend is None:
        module: ModuleType = importlib.import_module(_MODULES[name])
        backend = _loaded[name] = module.BACKEND
    return backend


def _reason(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    try:
        backend = get_backend(name)
    except ImportError as err:  # an optional dependency is missing or broken
        return f"cannot import: {err}"
    return backend.unavailable_reason(device, dtype)


# (selected name, device, dtype) -> backend. Whether a backend can run on a device does not change while a
# program runs (installed packages, the device's compute capability, TRITON_INTERPRET, which Triton reads at
# import), so the answer is kept: it saves the checks' host time on every call. The selection itself is
# still read at every call.
_resolved: dict[tuple, Any] = {}


def resolve_backend(device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """The backend that runs now for tensors on ``device`` (of ``dtype``, when given).

    "auto" takes the first available backend in its preference order for the device type, quietly. A
    backend asked for by name that cannot run on ``device`` raises RuntimeError saying why.
    """
    name = selected_backend_name()
    key = (name, device, dtype)
    backend = _resolved.get(key)
    if backend is None:
        backend = _resolved[key] = _resolve(name, device, dtype)
    return backend


def forget_resolved() -> None:
    """Drop the kept answers of ``resolve_backend`` (tests that change the environment under it call this)."""
    _resolved.clear()


def _resolve(name: str, device: torch.device, dtype: torch.dtype | None) -> Any:
    if name == AUTO:
        for candidate in _AUTO_ORDER.get(device.type, ()) + _AUTO_FALLBACK:
            if _reason(candidate, device, dtype) is None:
                return get_backend(candidate)
        raise RuntimeError(f"fastlora: no backend can run on {device}")  # unreachable: torch runs anywhere
    reason = _reason(name, device, dtype)
    if reason is not None:
        where = f"{device}" if dtype is None else f"{device} with {dtype} inputs"
        raise RuntimeError(f"fastlora backend {name!r} was requested but cannot run on {where}: {reason}")
    return get_backend(name)


def backend_status(device: torch.device) -> dict[str, str | None]:
    """For each registered backend: None when it can run on ``device``, else the reason it cannot."""
    return {name: _reason(name, device) for name in BACKEND_NAMES}


# Seeds are drawn below 2⁶² so that every backend can take them as a signed 64-bit integer.
_SEED_BOUND = 1 << 62


def draw_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """A (1,) int64 dropout seed on ``device``, drawn from ``generator`` or from PyTorch's default generator
    for ``device`` (so ``torch.manual_seed`` reproduces a run). It stays on the device: no host sync."""
    if generator is None:
        return torch.randint(_SEED_BOUND, (1,), device=device, dtype=torch.int64)
    seed = torch.randint(_SEED_BOUND, (1,), device=generator.device, dtype=torch.int64, generator=generator)
    return seed.to(device)
