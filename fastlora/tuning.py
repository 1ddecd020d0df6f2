"""Saving and reloading the Triton kernels' config choices, so a training job tunes once.

On a GPU each kernel picks its config per (device, flags, dtype size, sizes with M bucketed to the next
power of two) the first time it meets one: by timing every candidate ($FASTLORA_AUTOTUNE=tune, the default)
or by taking the first candidate without timing ($FASTLORA_AUTOTUNE=heuristic). These functions import
triton only when called.
"""

from __future__ import annotations

import os

__all__ = ["save_tuning", "load_tuning"]


def save_tuning(path) -> None:
    """Write the Triton kernels' chosen configs (per kernel, shape bucket and flags) to the JSON file ``path``,
    so that a later job can ``load_tuning`` them instead of tuning again. Imports triton."""
    _check_path(path)
    from fastlora.kernels._launch import save_tuning as save

    save(path)


def load_tuning(path) -> int:
    """Read configs written by ``save_tuning`` (refused, with ValueError, if tuned on another GPU model or
    Triton version). Returns how many entries were loaded. Imports triton."""
    _check_path(path)
    from fastlora.kernels._launch import load_tuning as load

    return load(path)


def _check_path(path: object) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path (str or os.PathLike), got {path!r} ({type(path).__name__})")
