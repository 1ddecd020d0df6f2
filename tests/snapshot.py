"""Snapshots of a model's whole state, to check that a call left it exactly as it was.

    snap = snapshot(model)
    with pytest.raises(ValueError):
        fastlora.inject(model, ...)
    assert_unchanged(model, snap)      # AssertionError listing every difference

What a snapshot holds, for a module (or a tensor, or a mapping of names to modules / tensors):

- every parameter and buffer under every name it is reachable by (shared ones included): shape, dtype,
  device, layout, requires_grad, its class (Parameter or not), which tensor object it is, which other names
  hold the same object (tied weights), its ``.grad``, and its exact value as bits (NaN == NaN, -0.0 != 0.0;
  meta tensors: shape, dtype and device only);
- the module tree: every name (duplicates too), each module's type and which other names hold the same
  module;
- every module's own attributes other than submodules, parameters and buffers (``training``; fastlora's
  ``r`` / ``lora_alpha`` / ``scaling`` / ``active_adapters`` / ``merged_adapters`` / ``disabled`` /
  ``_unmerged_weight``; a model's ``_fastlora_modules_to_save``; PEFT's layer state ...), as plain data;
  tensors among them by value; objects of other classes by type (and dataclasses by fields); hooks by count.

Only the public names ``snapshot``, ``diff`` and ``assert_unchanged`` are meant to be used.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Snapshot", "snapshot", "diff", "assert_unchanged"]

# Module attributes that are not state of their own (the tree, parameters and buffers are recorded apart).
_SKIPPED_ATTRIBUTES = {"_parameters", "_buffers", "_modules"}
_MAX_DEPTH = 8
_MAX_ITEMS = 10_000


@dataclasses.dataclass
class _Tensor:
    """One tensor as recorded: its metadata, the object itself (to tell a replaced tensor from the same one)
    and a copy of its bits."""

    obj: torch.Tensor
    cls: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    layout: torch.layout
    requires_grad: bool
    bits: torch.Tensor | None  # uint8 copy of the contiguous values (the values themselves for a dtype that
    # cannot be viewed as bytes); None on meta
    grad: _Tensor | None

    @property
    def values(self) -> torch.Tensor | None:
        """The recorded values in their dtype and shape (for reporting how they differ)."""
        if self.bits is None:
            return None
        try:
            flat = self.bits.view(self.dtype) if self.bits.dtype == torch.uint8 and self.dtype != torch.uint8 else self.bits
            return flat.reshape(self.shape)
        except RuntimeError:
            return None

    def meta(self) -> dict[str, Any]:
        return {"class": self.cls, "shape": self.shape, "dtype": self.dtype, "device": self.device,
                "layout": self.layout, "requires_grad": self.requires_grad}  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.int_repr()
    flat = t.reshape(-1).cpu().contiguous().clone()
    try:
        return flat.view(torch.uint8).clone()
    except RuntimeError:  # a dtype that cannot be viewed as bytes: keep the values themselves
        return flat


def _record(t: torch.Tensor, with_grad: bool = True) -> _Tensor:
    bits = None if t.device.type == "meta" else _bits(t)
    grad = t.grad if with_grad and isinstance(t, torch.Tensor) and t.is_leaf else None
    return _Tensor(
        obj=t, cls=type(t).__name__, shape=tuple(t.shape), dtype=t.dtype, device=t.device, layout=t.layout,
        requires_grad=t.requires_grad, bits=bits,
        grad=_record(grad, with_grad=False) if grad is not None else None,
    )  # fmt: skip


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.uint8:
        return torch.equal(a, b)
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def _describe_value_change(before: _Tensor, after: _Tensor) -> str:
    a, b = before.values, after.values
    if a is None or b is None or a.shape != b.shape:
        return "values differ"
    try:
        if a.dtype == torch.bool or not (a.is_floating_point() or a.is_complex()):
            changed = a != b
        else:
            both_nan = torch.isnan(a) & torch.isnan(b)
            changed = ~((a == b) & (torch.signbit(a) == torch.signbit(b)) | both_nan) if a.is_floating_point() else a != b
        n = int(changed.sum())
        text = f"values differ at {n} of {a.numel()} elements"
        if n and a.is_floating_point():
            da, db = a[changed].double(), b[changed].double()
            finite = torch.isfinite(da) & torch.isfinite(db)
            if finite.any():
                text += f" (max abs diff {float((da[finite] - db[finite]).abs().max()):.3g})"
            nan_before, nan_after = int(torch.isnan(a).sum()), int(torch.isnan(b).sum())
            if nan_before != nan_after:
                text += f", NaN count {nan_before} -> {nan_after}"
        return text
    except Exception:  # reporting only: never let it hide the difference itself
        return "values differ"


def _plain(value: Any, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    """``value`` as comparable plain data (hashable tuples / strings / numbers), NaN-safe and exact."""
    if depth > _MAX_DEPTH:
        return ("<too deep>", type(value).__qualname__)
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, enum.Enum):
        return ("enum", type(value).__qualname__, value.name)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        # repr keeps every bit that matters (nan, inf, -0.0) and NaN compares equal to NaN this way.
        return ("float", repr(value)) if not math.isnan(value) else ("float", "nan")
    if isinstance(value, complex):
        return ("complex", repr(value))
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(value).__name__, str(value))
    if isinstance(value, torch.Tensor):
        rec = _record(value, with_grad=False)
        bits = None if rec.bits is None else bytes(rec.bits.numpy().tobytes()) if rec.bits.dtype == torch.uint8 else repr(rec.bits.tolist())
        return ("tensor", rec.cls, rec.shape, str(rec.dtype), str(rec.device), rec.requires_grad, id(value), bits)
    if isinstance(value, nn.Module):
        return ("module", type(value).__qualname__, id(value))
    if id(value) in seen:
        return ("<cycle>", type(value).__qualname__)
    seen = seen | {id(value)}
    if isinstance(value, Mapping):
        items = list(value.items())[:_MAX_ITEMS]
        return ("map", type(value).__qualname__,
                tuple((_plain(k, depth + 1, seen), _plain(v, depth + 1, seen)) for k, v in items))  # fmt: skip
    if isinstance(value, (list, tuple)):
        return (type(value).__qualname__, tuple(_plain(v, depth + 1, seen) for v in list(value)[:_MAX_ITEMS]))
    if isinstance(value, (set, frozenset)):
        return (type(value).__qualname__, tuple(sorted((repr(_plain(v, depth + 1, seen)) for v in value))))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ("dataclass", type(value).__qualname__,
                tuple((f.name, _plain(getattr(value, f.name, None), depth + 1, seen)) for f in dataclasses.fields(value)))  # fmt: skip
    if callable(value):
        return ("callable", getattr(value, "__qualname__", type(value).__qualname__))
    return ("object", type(value).__module__, type(value).__qualname__)


def _short(value: Any, limit: int = 160) -> str:
    """A readable form of a ``_plain`` value for messages."""

    def show(v: Any) -> str:
        if isinstance(v, tuple) and v and isinstance(v[0], str):
            tag = v[0]
            if tag == "float" or tag == "complex":
                return v[1]
            if tag == "map":
                return "{" + ", ".join(f"{show(k)}: {show(x)}" for k, x in v[2]) + "}"
            if tag in ("list", "tuple"):
                inner = ", ".join(show(x) for x in v[1])
                return f"[{inner}]" if tag == "list" else f"({inner})"
            if tag in ("set", "frozenset"):
                return "{" + ", ".join(v[1]) + "}"
            if tag == "tensor":
                return f"tensor{list(v[2])} {v[3]} {v[4]}"
            if tag in ("enum", "dtype", "device", "layout", "memory_format"):
                return str(v[-1])
            if tag == "module":
                return f"<{v[1]}>"
            if tag == "hooks":
                return f"{v[1]} hooks"
            return f"<{' '.join(str(x) for x in v[1:3])}>" if len(v) > 1 else str(v)
        return repr(v)

    text = show(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass
class Snapshot:
    """The recorded state; compare with ``diff(obj, snapshot)`` / ``assert_unchanged``."""

    tensors: dict[str, _Tensor]  # "param:name" / "buffer:name" -> record
    tensor_alias: dict[str, str]  # name -> first name holding the same tensor object
    modules: dict[str, tuple[str, int]]  # name -> (type, id)
    module_alias: dict[str, str]
    attributes: dict[tuple[str, str], Any]  # (module name, attribute) -> plain value


def _roots(obj: Any) -> list[tuple[str, nn.Module | torch.Tensor]]:
    if isinstance(obj, (nn.Module, torch.Tensor)):
        return [("", obj)]
    if isinstance(obj, Mapping):
        roots = []
        for key, value in obj.items():
            for name, item in _roots(value):
                roots.append((f"{key}.{name}" if name else str(key), item))
        return roots
    if isinstance(obj, (list, tuple)):
        return _roots({str(i): v for i, v in enumerate(obj)})
    raise TypeError(f"snapshot: expected an nn.Module, a tensor, or a mapping / sequence of those, got {type(obj).__name__}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def snapshot(obj: nn.Module | torch.Tensor | Mapping[str, Any]) -> Snapshot:
    """Record everything about ``obj`` that a call could change (see the module docstring)."""
    tensors: dict[str, _Tensor] = {}
    tensor_alias: dict[str, str] = {}
    modules: dict[str, tuple[str, int]] = {}
    module_alias: dict[str, str] = {}
    attributes: dict[tuple[str, str], Any] = {}
    first_tensor: dict[int, str] = {}
    first_module: dict[int, str] = {}

    def add_tensor(key: str, t: torch.Tensor) -> None:
        tensors[key] = _record(t)
        tensor_alias[key] = first_tensor.setdefault(id(t), key)

    for prefix, root in _roots(obj):
        if isinstance(root, torch.Tensor):
            add_tensor(f"tensor:{prefix}", root)
            continue
        for name, module in root.named_modules(remove_duplicate=False):
            mname = _join(prefix, name) or "<root>"
            modules[mname] = (type(module).__qualname__, id(module))
            module_alias[mname] = first_module.setdefault(id(module), mname)
            for key, value in vars(module).items():
                if key in _SKIPPED_ATTRIBUTES:
                    continue
                if key.endswith(("hooks", "hook")) and isinstance(value, Mapping):
                    attributes[(mname, key)] = ("hooks", len(value))
                else:
                    attributes[(mname, key)] = _plain(value)
        for name, p in root.named_parameters(remove_duplicate=False):
            add_tensor(f"param:{_join(prefix, name)}", p)
        for name, b in root.named_buffers(remove_duplicate=False):
            add_tensor(f"buffer:{_join(prefix, name)}", b)
    return Snapshot(tensors, tensor_alias, modules, module_alias, attributes)


def _diff_tensor(key: str, before: _Tensor, after: _Tensor, out: list[str]) -> None:
    mb, ma = before.meta(), after.meta()
    for field in mb:
        if mb[field] != ma[field]:
            out.append(f"{key}: {field} {mb[field]} -> {ma[field]}")
    if before.obj is not after.obj:
        out.append(f"{key}: replaced by another tensor object")
    if mb["shape"] == ma["shape"] and mb["dtype"] == ma["dtype"] and not _same_bits(before.bits, after.bits):
        out.append(f"{key}: {_describe_value_change(before, after)}")
    if (before.grad is None) != (after.grad is None):
        out.append(f"{key}: .grad {'None' if before.grad is None else 'set'} -> {'None' if after.grad is None else 'set'}")
    elif before.grad is not None and after.grad is not None:
        _diff_tensor(f"{key}.grad", before.grad, after.grad, out)


def diff(obj: Any, snap: Snapshot, limit: int = 50) -> list[str]:
    """Every difference between ``obj`` now and ``snap``, one readable line each (at most ``limit``, then a
    count of the rest); empty when nothing changed."""
    now = snapshot(obj)
    out: list[str] = []
    added = [m for m in now.modules if m not in snap.modules]
    removed = [m for m in snap.modules if m not in now.modules]
    if added:
        out.append(f"modules added: {', '.join(f'{m} ({now.modules[m][0]})' for m in added)}")
    if removed:
        out.append(f"modules removed: {', '.join(f'{m} ({snap.modules[m][0]})' for m in removed)}")
    replaced = set()
    for m in snap.modules:
        if m in now.modules:
            (tb, ib), (ta, ia) = snap.modules[m], now.modules[m]
            if tb != ta:
                out.append(f"module {m}: type {tb} -> {ta}")
            elif ib != ia:
                out.append(f"module {m}: replaced by another {ta}")
            if ib != ia:
                replaced.add(m)
            if snap.module_alias[m] != now.module_alias[m]:
                out.append(f"module {m}: shared with {snap.module_alias[m]} -> {now.module_alias[m]}")
    added_t = [k for k in now.tensors if k not in snap.tensors]
    removed_t = [k for k in snap.tensors if k not in now.tensors]
    if added_t:
        out.append(f"tensors added: {', '.join(added_t)}")
    if removed_t:
        out.append(f"tensors removed: {', '.join(removed_t)}")
    for key, before in snap.tensors.items():
        after = now.tensors.get(key)
        if after is None:
            continue
        _diff_tensor(key, before, after, out)
        if snap.tensor_alias[key] != now.tensor_alias[key]:
            out.append(f"{key}: shared with {snap.tensor_alias[key]} -> {now.tensor_alias[key]}")
    for key in sorted(set(snap.attributes) | set(now.attributes)):
        module, attribute = key
        if module not in snap.modules or module not in now.modules or module in replaced:
            continue  # a module added, removed or replaced: reported above as a whole
        where = f"attribute {module}.{attribute}"
        if key not in now.attributes:
            out.append(f"{where} removed (was {_short(snap.attributes[key])})")
        elif key not in snap.attributes:
            out.append(f"{where} added: {_short(now.attributes[key])}")
        elif snap.attributes[key] != now.attributes[key]:
            out.append(f"{where}: {_short(snap.attributes[key])} -> {_short(now.attributes[key])}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more differences"]
    return out


def assert_unchanged(obj: Any, snap: Snapshot) -> None:
    """Raise AssertionError listing every difference between ``obj`` now and ``snap``."""
    differences = diff(obj, snap)
    if differences:
        raise AssertionError("the model changed:\n  " + "\n  ".join(differences))
