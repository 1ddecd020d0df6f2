"""Measuring what autograd keeps: the activation memory a forward saves for its backward."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run ``fn()`` and count the bytes of the distinct storages autograd saved for backward.

    Tensors sharing a storage count once (q/k/v layers that save the same x cost one x). Storages of the
    tensors in ``exclude`` (pass the model's parameters: weights are not activations) are not counted.

    Returns:
        (fn's return value, bytes). Keep the return value alive until you are done with the number: the
        saved tensors belong to its graph.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())
