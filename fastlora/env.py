"""``fastlora.info()``: versions, devices and which backend runs where, with reasons."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch

from fastlora.backends import BACKEND_NAMES, backend_status, resolve_backend, selected_backend_name

__all__ = ["info", "format_info"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def info() -> dict[str, Any]:
    """A report of the environment, for bug reports and ``python -m fastlora info``.

    Returns a dict with ``versions`` (python, fastlora, torch, triton, peft, transformers; None when not
    installed), ``selected`` (the backend asked for now), ``cuda_extension`` (``fastlora.cuda_ext.status()``:
    whether the CUDA extension is built, for which architectures, why it cannot run), and per device: its name, the backend "auto" or the
    selection would run there (or the error it raises), and for each registered backend None when it can run
    or the reason it cannot.
    """
    versions = {"python": platform.python_version()}
    for dist in ("fastlora", "torch", "triton", "numpy", "safetensors", "peft", "transformers"):
        versions[dist] = torch.__version__ if dist == "torch" else _version(dist)
    devices = []
    for device in _devices():
        try:
            runs = resolve_backend(device).name
        except RuntimeError as err:
            runs = f"error: {err}"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        devices.append({"device": str(device), "name": name, "runs": runs, "backends": backend_status(device)})
    from fastlora import cuda_ext

    return {"versions": versions, "selected": selected_backend_name(), "backends": list(BACKEND_NAMES),
            "cuda_extension": cuda_ext.status(), "devices": devices}  # fmt: skip


def format_info(report: dict[str, Any]) -> str:
    lines = ["fastlora " + str(report["versions"]["fastlora"]), "", "versions:"]
    lines += [f"  {k:13s} {v if v is not None else 'not installed'}" for k, v in report["versions"].items()]
    ext = report["cuda_extension"]
    if ext["built"]:
        state = f"built for {ext['archs']} ({ext['path']}); " + ("runs here" if ext["reason"] is None else
                                                                 f"cannot run here: {ext['reason']}")  # fmt: skip
    else:
        state = ext["reason"]
    lines += ["", f"CUDA extension: {state}"]
    lines += ["", f"backend selected: {report['selected']}", ""]
    for dev in report["devices"]:
        lines.append(f"{dev['device']} ({dev['name']}): runs {dev['runs']}")
        for name, reason in dev["backends"].items():
            lines.append(f"  {name:8s} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)
