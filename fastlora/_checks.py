"""Argument checks shared by the layer, the model workflow and the file reader.

Each check raises TypeError (wrong type) or ValueError (wrong value) with a message that names the argument
(or config key), what was expected and what came, and returns the value in its canonical Python type. They
are strict on purpose: a string where a boolean belongs is an error, not a truthy value.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping

import torch.nn as nn

# An adapter's two matrices hold r·(in + out) elements; past 2³¹ (8 GiB in fp32) a rank is a typo, and
# refusing it up front beats an allocation failure half-way through a model.
MAX_ADAPTER_ELEMENTS = 2**31


def is_real(value: object) -> bool:
    """A real number and not a bool. Python floats and ints are answered by their type: ``isinstance`` against
    the ``numbers`` ABCs costs about a microsecond per call, and the per-adapter checks of a mixed batch make
    dozens of them per layer call."""
    kind = type(value)
    if kind is float or kind is int:
        return True
    return kind is not bool and isinstance(value, numbers.Real)


def is_integer(value: object) -> bool:
    """An integer and not a bool (fast for Python ints, as ``is_real``)."""
    kind = type(value)
    if kind is int:
        return True
    return kind is not bool and isinstance(value, numbers.Integral)


def check_module(name: str, value: object) -> nn.Module:
    """A torch.nn.Module (a model or a layer)."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(value).__name__}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r} ({type(value).__name__})")
    return value


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    if not is_integer(value):
        raise TypeError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value: object) -> float:
    """A finite real number (negative and zero allowed), not a bool."""
    if not is_real(value):
        raise TypeError(f"{name}: expected a finite number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def check_probability(name: str, value: object) -> float:
    if not is_real(value):
        raise TypeError(f"{name}: expected a probability in [0, 1), got {value!r} ({type(value).__name__})")
    if not 0.0 <= value < 1.0:  # NaN fails this too
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value}")
    return float(value)


def check_rank(name: str, value: object, in_features: int | None = None, out_features: int | None = None) -> int:
    """A LoRA rank: an integer >= 1 whose adapter (r·(in + out) elements) fits, when the layer is known."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer rank >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name}: expected an integer rank >= 1, got {value}")
    if in_features is None or out_features is None:
        if value >= MAX_ADAPTER_ELEMENTS:
            raise ValueError(f"{name}: expected an integer rank >= 1 and below {MAX_ADAPTER_ELEMENTS:,}, got {value}")
        return int(value)
    width = in_features + out_features
    if value * width >= MAX_ADAPTER_ELEMENTS:
        raise ValueError(f"{name}: rank {value} gives an adapter of {value * width:,} elements for a layer "
                         f"{in_features} -> {out_features}; expected fewer than {MAX_ADAPTER_ELEMENTS:,}")  # fmt: skip
    return int(value)


def check_hparams(r: object, lora_alpha: object, lora_dropout: object, *, in_features: int | None = None,
                  out_features: int | None = None, prefix: str = "") -> tuple[int, float, float]:  # fmt: skip
    """(r, lora_alpha, lora_dropout) checked and in canonical types. lora_alpha may be zero or negative
    (PEFT accepts both: the scaling is lora_alpha / r)."""
    return (
        check_rank(prefix + "r", r, in_features, out_features),
        check_real(prefix + "lora_alpha", lora_alpha),
        check_probability(prefix + "lora_dropout", lora_dropout),
    )


def check_adapter_name(name: str, value: object) -> str:
    """Adapter names become parts of module paths and file keys: non-empty strings without dots."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected an adapter name (a string), got {value!r} ({type(value).__name__})")
    if not value or "." in value:
        raise ValueError(f"{name}: expected a non-empty adapter name without dots, got {value!r}")
    return value


def check_names(name: str, value: object, *, allow_empty: bool = False) -> list[str]:
    """One adapter name or a list/tuple of them, as a list of distinct names in order."""
    if isinstance(value, str):
        return [check_adapter_name(name, value)]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected an adapter name or a list of them, got {value!r} ({type(value).__name__})")
    names = [check_adapter_name(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if not names and not allow_empty:
        raise ValueError(f"{name}: expected at least one adapter name, got an empty {type(value).__name__}")
    return list(dict.fromkeys(names))


def check_regex(name: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({err})") from None


def check_module_names(name: str, value: object, *, allow_none: bool = False) -> str | list[str] | None:
    """PEFT's module selectors: a regular expression (a string) or a list of names matched as dotted
    suffixes."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        check_regex(name, value)
        return value
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{name}: expected a regular expression (str) or a list of module names, got {value!r} "
                        f"({type(value).__name__})")  # fmt: skip
    names = list(value)
    bad = [v for v in names if not isinstance(v, str) or not v]
    if bad:
        raise TypeError(f"{name}: expected non-empty module names (strings), got {bad[:5]!r}")
    return names


def check_pattern(name: str, value: object, check_value) -> dict[str, object]:
    """``rank_pattern`` / ``alpha_pattern``: {module-name regex: value}, each value checked by ``check_value``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a dict {{module pattern: value}}, got {value!r} ({type(value).__name__})")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name}: expected non-empty string keys, got {key!r}")
        check_regex(f"{name}[{key!r}]", key)
        out[key] = check_value(f"{name}[{key!r}]", v)
    return out
