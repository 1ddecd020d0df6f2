"""The optional CUDA extension (``csrc/``): finding it, building it just in time, and what it says about
itself. Importing this module never fails and never touches CUDA; ``load()`` returns the module or None.

The extension is looked for, in order:
1. ``fastlora._fastlora_cuda``, built by ``FASTLORA_BUILD_CUDA=1 pip install .``;
2. a just-in-time build in the cache (``fastlora.cuda_ext.build()``, or ``python -m fastlora build-cuda``:
   nvcc, ninja and pybind11 needed), for the current sources, Python and nvcc.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from fastlora import cuda_build

__all__ = ["build", "load", "status", "unavailable_reason"]

_load_error: str | None = None


def _import_path(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(cuda_build.MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cached_build() -> Path | None:
    """The module of a just-in-time build matching these sources (any archs), or None."""
    try:
        src = cuda_build.csrc_dir()
    except cuda_build.BuildError:
        return None
    root = cuda_build.cache_dir()
    if not root.is_dir():
        return None
    marker = root / "current"
    if marker.is_file():
        path = Path(marker.read_text().strip())
        if path.is_file() and path.parent.name.startswith("cuda-") and (path.parent / "sources").is_file():
            if (path.parent / "sources").read_text().strip() == cuda_build._source_hash(src):
                return path
    return None


@functools.cache
def load() -> ModuleType | None:
    """The extension module, or None (``unavailable_reason()`` says why). Kept after the first call."""
    global _load_error
    try:
        return importlib.import_module(f"fastlora.{cuda_build.MODULE}")
    except ImportError as err:
        installed_error = err
    path = _cached_build()
    if path is not None:
        try:
            return _import_path(path)
        except ImportError as err:
            _load_error = f"the built extension {path} does not load: {err}"
            return None
    if "No module named" in str(installed_error):
        _load_error = ("not built: build it with `python -m fastlora build-cuda` (nvcc, ninja and pybind11 needed) "
                       "or install with FASTLORA_BUILD_CUDA=1 pip install .")  # fmt: skip
    else:
        _load_error = f"the installed extension does not load: {installed_error}"
    return None


def unavailable_reason() -> str | None:
    """None when the extension is loaded and can run here, else why not (not built, no driver, no device)."""
    module = load()
    if module is None:
        return _load_error
    return module.unavailable_reason() or None


def build(archs: tuple[str, ...] = cuda_build.ARCHS, verbose: bool = False) -> ModuleType:
    """Build the extension just in time with nvcc and ninja into the cache (``cuda_build.cache_dir()``) and
    load it. Later processes find it there. Raises ``cuda_build.BuildError`` saying what failed."""
    built = cuda_build.build(archs=tuple(archs), verbose=verbose)
    (built.directory / "sources").write_text(cuda_build._source_hash(cuda_build.csrc_dir()))
    (cuda_build.cache_dir() / "current").write_text(str(built.module))
    load.cache_clear()
    sys.modules.pop(cuda_build.MODULE, None)
    module = load()
    if module is None:
        raise cuda_build.BuildError(f"built {built.module} but it does not load: {_load_error}")
    return module


def status() -> dict[str, Any]:
    """For ``fastlora info``: whether the extension is built, where, for which architectures, and why it
    cannot run here (None when it can)."""
    module = load()
    if module is None:
        return {"built": False, "path": None, "archs": None, "reason": _load_error}
    return {"built": True, "path": getattr(module, "__file__", None), "archs": module.ARCHS,
            "cuda_runtime": module.CUDART_VERSION, "reason": module.unavailable_reason() or None}  # fmt: skip
