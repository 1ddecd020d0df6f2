"""What the op saves for backward: x, S (M × r) and the seed, nothing else of size M × K."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastlora
from fastlora.peft_compat import peft_lora_linear
from fastlora.profiling import saved_activation_bytes

M, K, N, R = 256, 128, 96, 16


def _pair(p, dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Linear(K, N, dtype=dtype)
    ours = fastlora.LoRALinear.from_linear(base, r=R, lora_alpha=16, lora_dropout=p)
    theirs = peft_lora_linear(base, r=R, lora_alpha=16, lora_dropout=p)
    return ours, theirs


def _composed_with_dropout(request, p) -> bool:
    """The torch backend's composed calls with dropout save x̂ and the mask, as PEFT does; by default only
    calls with x of at most ``_COMPOSE_MAX_DROPOUT`` elements (a few KiB) compose (tests/test_ops.py)."""
    return p > 0 and request.node.callspec.id.startswith("torch-composed")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saves_only_x_shrink_and_seed(request, backend, p):
    ours, _ = _pair(p)
    x = torch.randn(4, M // 4, K, requires_grad=True)
    _, saved = saved_activation_bytes(lambda: ours(x), exclude=ours.parameters())
    expected = x.numel() * 4 + M * R * 4 + (8 if p > 0 else 0)  # x, S (fp32), the int64 seed
    if _composed_with_dropout(request, p):
        expected = 2 * x.numel() * 4 + M * R * 4  # x̂ and the fp32 0/1 mask instead of x and the seed
    if request.node.callspec.id.startswith("torch-composed-delta"):
        # Through ΔW = s·B·A (tiny calls only): ΔW, or W + ΔW at p = 0, (N × K) instead of S.
        expected += N * K * 4 - M * R * 4
    assert saved == expected


@pytest.mark.parametrize("p,target", [(0.0, 1.0), (0.1, 0.55)])
def test_saved_bytes_against_peft(request, backend, p, target):
    if _composed_with_dropout(request, p):
        pytest.skip("composed calls with dropout save what PEFT saves (x̂ and the mask): tiny calls only")
    if request.node.callspec.id.startswith("torch-composed-delta"):
        pytest.skip("calls through ΔW save it (N × K): tiny calls only, N·K·(M + 3r) <= _DELTA_MAX (tests/test_ops.py)")
    ours, theirs = _pair(p)
    x = torch.randn(M, K, requires_grad=True)
    params = list(ours.parameters()) + list(theirs.parameters())
    _, mine = saved_activation_bytes(lambda: ours(x), exclude=params)
    _, peft = saved_activation_bytes(lambda: theirs(x), exclude=params)
    assert mine / peft <= target, (mine, peft)


def test_layers_sharing_input_save_it_once(request, backend):
    """q/k/v reading the same x keep one x between them."""
    torch.manual_seed(0)
    layers = [fastlora.LoRALinear(K, N, r=R) for _ in range(3)]
    x = torch.randn(M, K, requires_grad=True)
    params = [p for layer in layers for p in layer.parameters()]
    _, saved = saved_activation_bytes(lambda: [layer(x) for layer in layers], exclude=params)
    per_layer = N * K * 4 if request.node.callspec.id.startswith("torch-composed-delta") else M * R * 4
    assert saved == x.numel() * 4 + 3 * per_layer
