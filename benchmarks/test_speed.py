"""pytest-benchmark suite: the same comparisons as ``fastlora bench`` on a small grid, so runs can be saved
and compared across revisions with pytest-benchmark's own tools:

    pytest benchmarks/ --benchmark-only --benchmark-autosave        # save a run under .benchmarks/
    pytest-benchmark compare                                        # compare saved runs

Forward+backward of one layer per variant: bare F.linear (the floor), PEFT, the reference eager and
compiled, and every fastlora backend that runs on this device.
"""

from __future__ import annotations

import pytest
import torch

from fastlora.backends import backend_status
from fastlora.bench import layer_shapes, variants

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOKENS = 2048 if DEVICE.type == "cuda" else 64
BACKENDS = [name for name, reason in backend_status(DEVICE).items() if reason is None]
VARIANT_NAMES = ["F.linear (floor)", "PEFT", "reference", "reference (compiled)", *[f"fastlora {b}" for b in BACKENDS]]


@pytest.mark.parametrize("layer", ["q", "down"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_fwd_bwd(benchmark, layer, dropout, variant):
    k, n = layer_shapes("Llama-2-7B")[layer]
    found = {v.name: v for v in variants(k, n, 16, dropout, DTYPE, DEVICE, BACKENDS)[0]}
    if variant not in found:
        pytest.skip(f"{variant} is not available here")
    v = found[variant]
    x = torch.randn(TOKENS, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    g = torch.randn(TOKENS, n, device=DEVICE, dtype=DTYPE)

    def step():
        x.grad = None
        v.fn(x).backward(g)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{layer} {k}->{n} M={TOKENS} p={dropout}"
    benchmark(step)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("variant", ["nn.Linear (bare)", "PEFT", "fastlora LoRALinear", "fastlora.lora_linear",
                                     "PEFT accelerated"])  # fmt: skip
def test_host_time(benchmark, dropout, mode, variant):
    """Host time per call at a tiny size (``fastlora bench --host`` measures the same, interleaved)."""
    from fastlora.bench_host import SHAPE, _variants

    found = _variants(dropout)
    if variant not in found:
        pytest.skip(f"{variant} is not available here")
    f = found[variant]
    x = torch.randn(SHAPE["rows"], SHAPE["in_features"], requires_grad=True)
    benchmark.group = f"host time, {mode}, p={dropout}"
    benchmark(lambda: f(x) if mode == "forward" else f(x).sum().backward())
