"""The backend registry: selection by name or environment, "auto" fallback, clear refusals, info()."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fastlora
from fastlora import backends

CPU = torch.device("cpu")


class _Unavailable:
    name = "broken"

    def unavailable_reason(self, device, dtype=None):
        return "it needs a device this machine lacks"


@pytest.fixture
def broken_backend(monkeypatch):
    """Registers a backend that can never run, preferred by "auto" on the CPU."""
    monkeypatch.setitem(backends._MODULES, "broken", "unused")
    monkeypatch.setitem(backends._loaded, "broken", _Unavailable())
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("broken",))
    monkeypatch.setattr(backends, "BACKEND_NAMES", (*backends.BACKEND_NAMES, "broken"))
    yield


def _call():
    return fastlora.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0)


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("FASTLORA_BACKEND", raising=False)
    assert backends.selected_backend_name() == "auto"
    assert backends.resolve_backend(CPU).name == "torch"


def test_environment_variable_read_at_each_call(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    assert backends.selected_backend_name() == "torch"
    monkeypatch.setenv("FASTLORA_BACKEND", "auto")
    assert backends.selected_backend_name() == "auto"
    monkeypatch.setenv("FASTLORA_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"\$FASTLORA_BACKEND: expected one of \['auto', 'torch'.*got 'nope'"):
        _call()


def test_set_backend_overrides_environment(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "nope")
    try:
        fastlora.set_backend("torch")
        assert backends.selected_backend_name() == "torch"
        _call()
    finally:
        fastlora.set_backend(None)


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"set_backend\(name\): expected one of .* got 'cuda-magic'"):
        fastlora.set_backend("cuda-magic")


def test_use_backend_restores():
    fastlora.set_backend("auto")
    try:
        with fastlora.use_backend("torch"):
            assert backends.selected_backend_name() == "torch"
        assert backends.selected_backend_name() == "auto"
    finally:
        fastlora.set_backend(None)


def test_auto_falls_back_quietly(broken_backend, recwarn):
    with fastlora.use_backend("auto"):
        assert backends.resolve_backend(CPU).name == "torch"
        _call()
    assert len(recwarn) == 0


def test_explicit_backend_that_cannot_run_raises(broken_backend):
    with fastlora.use_backend("broken"):
        with pytest.raises(RuntimeError, match=r"backend 'broken' was requested but cannot run on cpu with torch.float32 inputs: it needs a device"):
            _call()


def test_info_reports_reasons(broken_backend):
    report = fastlora.info()
    cpu = report["devices"][0]
    assert cpu["device"] == "cpu" and cpu["runs"] == "torch"
    assert cpu["backends"]["torch"] is None
    assert cpu["backends"]["broken"] == "it needs a device this machine lacks"
    assert report["versions"]["torch"] == torch.__version__


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "fastlora", "info", "--json"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["devices"][0]["runs"] == "torch"
    text = subprocess.run([sys.executable, "-m", "fastlora", "info"], capture_output=True, text=True, check=True).stdout
    assert "cpu" in text and "torch    available" in text


def test_triton_backend_says_where_it_runs(monkeypatch):
    pytest.importorskip("triton")
    from fastlora.backends.triton_backend import BACKEND

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in BACKEND.unavailable_reason(CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKEND.unavailable_reason(CPU) is None
    assert "not torch.float64" in BACKEND.unavailable_reason(CPU, torch.float64)
    assert "no Triton kernels for meta" in BACKEND.unavailable_reason(torch.device("meta"))


def test_auto_never_picks_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fastlora.use_backend("auto"):
        assert backends.resolve_backend(CPU, torch.float32).name == "torch"


def test_explicit_triton_refuses_float64(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 4, dtype=torch.float64)
    with fastlora.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"'triton' was requested but cannot run on cpu with torch.float64 inputs"):
            fastlora.lora_linear(x, torch.randn(3, 4, dtype=torch.float64), None, torch.randn(1, 4), torch.randn(3, 1), 1.0)


def test_triton_older_than_supported_is_refused(monkeypatch):
    """A Triton below the tested range (e.g. 3.2, which came with torch 2.6) is refused with the reason, also
    when the interpreter would run it: its kernels were never checked there."""
    triton = pytest.importorskip("triton")
    from fastlora.backends.triton_backend import BACKEND

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    assert "Triton 3.2.0 is older than 3.4" in BACKEND.unavailable_reason(CPU)
    with fastlora.use_backend("auto"):
        assert backends.resolve_backend(CPU, torch.float32).name == "torch"
    monkeypatch.setattr(triton, "__version__", "3.4.0")
    assert BACKEND.unavailable_reason(CPU) is None


def test_supported_triton_range_is_the_installed_one():
    """pyproject's Triton range and the run-time check say the same, and CI runs on a version inside it."""
    triton = pytest.importorskip("triton")
    import re
    from pathlib import Path

    from fastlora.kernels._launch import SUPPORTED_TRITON, triton_version

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    (low, high), = set(re.findall(r'"triton>=(\d+\.\d+),<(\d+\.\d+)"', text))
    assert (low, high) == tuple(f"{a}.{b}" for a, b in SUPPORTED_TRITON)
    assert SUPPORTED_TRITON[0] <= triton_version() < SUPPORTED_TRITON[1], triton.__version__
