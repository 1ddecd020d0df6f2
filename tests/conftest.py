"""Fixtures and test-only helpers; the numerical checks themselves live in fastlora.testing."""

from __future__ import annotations

import os

import pytest
import torch

import fastlora
from fastlora import testing
from fastlora.backends import backend_status
from fastlora.testing import FLOOR, Case, check_finite_differences, keep_mask_for, layout, make_case, rel_err, run

CPU = torch.device("cpu")


def cpu_backends() -> list[str]:
    """Registered backends that can run on the CPU here (triton only under TRITON_INTERPRET=1)."""
    return [name for name, reason in backend_status(CPU).items() if reason is None]


@pytest.fixture(autouse=True)
def _fresh_backend_resolution():
    """resolve_backend keeps its answers (they cannot change in a real run); tests change the environment
    under it (TRITON_INTERPRET, fake backends, Triton's version), so each starts and ends afresh."""
    from fastlora.backends import forget_resolved

    forget_resolved()
    yield
    forget_resolved()


def _backend_params() -> list:
    """Each CPU backend; the torch backend three times: its op (``forward``/``backward`` under the autograd
    Function), its ``compose`` path (stock differentiable ops) through S, and that path through ΔW = s·B·A
    (merged into W in fp32 without dropout), which calls take by size."""
    params = []
    for name in cpu_backends():
        params.append(pytest.param((name, "op"), id=name))
        if name == "torch":
            params.append(pytest.param((name, "composed"), id="torch-composed"))
            params.append(pytest.param((name, "delta"), id="torch-composed-delta"))
    return params


@pytest.fixture(params=_backend_params())
def backend(request, monkeypatch):
    name, path = request.param
    if name == "torch":
        from fastlora.backends import torch_backend

        # Every call composed, or none; through ΔW, or never: the size thresholds are tuned for speed, not tests.
        for threshold in ("_COMPOSE_MAX", "_COMPOSE_MAX_DROPOUT"):
            monkeypatch.setattr(torch_backend, threshold, -1 if path == "op" else 1 << 62)
        monkeypatch.setattr(torch_backend, "_DELTA_MAX", (1 << 62) if path == "delta" else -1)
    with fastlora.use_backend(name):
        yield name


@pytest.fixture
def op_path(monkeypatch):
    """The torch backend runs every call through the op (its autograd Function), never composed: for tests
    that check the op itself ran, whatever the call's size."""
    from fastlora.backends import torch_backend

    for threshold in ("_COMPOSE_MAX", "_COMPOSE_MAX_DROPOUT"):
        monkeypatch.setattr(torch_backend, threshold, -1)


def launches_with_flag(monkeypatch, kernels, flag: str) -> list[str]:
    """The names ("module.attribute") of the Triton launchers ``kernels`` ((module, attribute) pairs of
    ``Tunable``s) launched with ``flag`` set, in launch order: filled as the test runs."""
    names: list[str] = []
    for module, attribute in kernels:
        tunable = getattr(module, attribute)

        def launch(grid, *args, _name=f"{module.__name__.rsplit('.', 1)[1]}.{attribute}", _launch=tunable.launch,
                   **flags):  # fmt: skip
            if flags.get(flag):
                names.append(_name)
            return _launch(grid, *args, **flags)

        monkeypatch.setattr(tunable, "launch", launch)
    return names


@pytest.fixture
def tf32():
    """fp32 GEMMs with tf32 allowed, the only fp32 ones the TMA kernels take (exact fp32 dots run on CUDA
    cores, see uses_tma). The interpreter computes every fp32 dot exactly, so fp32 results keep their
    float64 bound."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if interpreting():
    # The interpreter computes bf16 dots and arithmetic on raw bit patterns (triton-lang/triton#11584):
    # patch it to compute in fp32 like the GPU, so bf16 runs through the same numerical tests as fp32/fp16.
    # tests/test_interpreter_bf16.py checks the patch itself.
    import interpreter_bf16

    interpreter_bf16.apply()


def skip_if_unsupported(backend_name: str, *dtypes: torch.dtype) -> None:
    """Skip what a backend cannot be checked on here: the Triton kernels take no float64."""
    if backend_name != "triton":
        return
    if torch.float64 in dtypes:
        pytest.skip("the Triton kernels take fp16, bf16 and fp32")


def check_case(case: Case, dtype, adapter_dtype=None, *, backend_name="torch", **kwargs):
    skip_if_unsupported(backend_name, dtype, adapter_dtype or dtype)
    return testing.check_case(case, dtype, adapter_dtype, backend_name=backend_name, **kwargs)


__all__ = ["CPU", "FLOOR", "Case", "check_case", "check_finite_differences", "keep_mask_for", "layout", "make_case",
           "rel_err", "run", "skip_if_unsupported"]  # fmt: skip
