"""The Triton path can be captured in a CUDA graph: no host synchronisation and no data-dependent host
branching in forward or backward. Checked without a GPU by running the whole call, argument checks to
kernel launchers, with the launches stubbed out and every way of reading a tensor's values on the host
made to raise."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fastlora  # noqa: E402
from fastlora.bench_host import stubbed_triton_launches, triton_launch_overhead  # noqa: E402

# Tensor methods that copy values to the host (a sync on a GPU) or branch on them.
_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_triton_path_reads_no_tensor_values(monkeypatch, dropout, lead):
    torch.manual_seed(0)
    x = torch.randn(*lead, 24, requires_grad=True)
    w, b = torch.randn(20, 24), torch.randn(20)
    a = torch.randn(4, 24, requires_grad=True)
    bb = torch.randn(20, 4, requires_grad=True)
    with stubbed_triton_launches(), fastlora.use_backend("triton"):
        for name in _READS:
            def read(self, *args, _name=name, **kwargs):
                raise AssertionError(f"Tensor.{_name} called on the Triton path: a host sync")

            monkeypatch.setattr(torch.Tensor, name, read)
        y = fastlora.lora_linear(x, w, b, a, bb, 2.0, dropout)
        y.backward(torch.ones_like(y))
        monkeypatch.undo()
    assert y.shape == (*lead, 20)
    assert x.grad is not None and a.grad is not None and bb.grad is not None


def test_launch_overhead_is_measured():
    """The measurement ``fastlora bench --host`` reports for the Triton launch path runs here."""
    times = triton_launch_overhead(calls=20, repeats=1)
    assert set(times) == {"forward", "backward"} and all(t > 0 for t in times.values())
