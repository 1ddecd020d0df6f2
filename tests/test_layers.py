"""LoRALinear: a drop-in nn.Linear with a LoRA adapter, initialised and scaled as PEFT does."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastlora
from fastlora.peft_compat import peft_lora_linear

from conftest import FLOOR, rel_err


def test_fresh_layer_returns_base_output(backend):
    """B = 0: the adapter adds exactly nothing. The torch backend's base GEMM is F.linear's, so the output
    is bitwise F.linear's; the Triton GEMM sums in another order, so it is held to the float64 bar."""
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(33, 17, r=4, lora_alpha=8)
    x = torch.randn(2, 5, 33)
    base = F.linear(x, layer.weight, layer.bias)
    if backend == "torch":
        assert torch.equal(layer(x), base)
    else:
        truth = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        assert rel_err(layer(x), truth) <= 2 * rel_err(base, truth) + FLOOR[torch.float32]


def test_from_linear_shares_and_freezes_base():
    linear = nn.Linear(10, 6)
    layer = fastlora.LoRALinear.from_linear(linear, r=2)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default", "lora_B.default"}
    assert (layer.in_features, layer.out_features) == (10, 6)


def test_from_linear_without_bias():
    layer = fastlora.LoRALinear.from_linear(nn.Linear(10, 6, bias=False), r=2)
    assert layer.bias is None
    assert layer(torch.randn(3, 10)).shape == (3, 6)


def test_initialisation_like_peft():
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(400, 300, r=64)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=√5): sqrt(6 / ((1 + 5) · fan_in))
    assert a.abs().max() <= bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert torch.equal(b, torch.zeros_like(b))


@pytest.mark.parametrize("r,alpha,rslora,want", [(8, 16, False, 2.0), (16, 8, False, 0.5), (16, 8, True, 2.0)])
def test_scaling(r, alpha, rslora, want):
    assert fastlora.LoRALinear(8, 8, r=r, lora_alpha=alpha, use_rslora=rslora).scaling["default"] == want


def test_repr_shows_hyperparameters():
    text = repr(fastlora.LoRALinear(8, 4, r=3, lora_alpha=6, lora_dropout=0.05, use_rslora=True))
    for part in ("in_features=8", "out_features=4", "r=3", "lora_alpha=6", "lora_dropout=0.05", "use_rslora=True"):
        assert part in text


@pytest.mark.parametrize("dtype,adapter", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                           (torch.float64, torch.float64)])  # fmt: skip
def test_adapter_dtype(dtype, adapter):
    layer = fastlora.LoRALinear(8, 4, dtype=dtype)
    assert layer.weight.dtype == dtype and layer.lora_A["default"].dtype == adapter
    assert layer(torch.randn(2, 8, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_layer(backend, rslora):
    """Same base, same adapter weights: ours is as close to the float64 truth as PEFT's LoRA Linear, for
    the output and every gradient (error <= 2x PEFT's own fp32 error + a unit-roundoff floor)."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    theirs = peft_lora_linear(base, r=8, lora_alpha=16, use_rslora=rslora)
    nn.init.normal_(theirs.lora_B["default"].weight)
    exact = copy.deepcopy(theirs).double()
    ours = fastlora.LoRALinear.from_linear(base, r=8, lora_alpha=16, use_rslora=rslora)
    with torch.no_grad():
        ours.lora_A["default"].copy_(theirs.lora_A["default"].weight)
        ours.lora_B["default"].copy_(theirs.lora_B["default"].weight)
    x = torch.randn(3, 7, 48)
    g = torch.randn(3, 7, 40)

    def run(layer, a, b, dtype):
        """Output and the gradients of x, lora_A, lora_B (a and b are the adapter parameters)."""
        xi = x.to(dtype).requires_grad_()
        y = layer(xi)
        y.backward(g.to(dtype))
        return {"y": y.detach(), "dx": xi.grad, "dA": a.grad, "dB": b.grad}

    def peft_run(layer, dtype):
        return run(layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, dtype)

    truth = peft_run(exact, torch.float64)
    peft = peft_run(theirs, torch.float32)
    mine = run(ours, ours.lora_A["default"], ours.lora_B["default"], torch.float32)
    for key, want in truth.items():
        assert rel_err(mine[key], want) <= 2 * rel_err(peft[key], want) + FLOOR[torch.float32], key


def test_eval_disables_dropout(backend):
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(16, 8, r=2, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(4, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_training_step_reduces_loss(backend):
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(20, 5, r=4, lora_alpha=8)
    target = torch.randn(64, 5)
    x = torch.randn(64, 20)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert layer.weight.grad is None  # the base stayed frozen


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"r": 0}, ValueError, r"r: expected an integer rank >= 1, got 0"),
        ({"r": 2.5}, TypeError, r"r: expected an integer rank >= 1, got 2.5 \(float\)"),
        ({"r": True}, TypeError, r"r: expected an integer rank >= 1, got True \(bool\)"),
        ({"r": 10**12}, ValueError, r"r: rank 1000000000000 gives an adapter of 12,000,000,000,000 elements"),
        ({"lora_alpha": float("nan")}, ValueError, r"lora_alpha: expected a finite number, got nan"),
        ({"lora_alpha": "8"}, TypeError, r"lora_alpha: expected a finite number, got '8' \(str\)"),
        ({"lora_dropout": 1.0}, ValueError, r"lora_dropout: expected a probability in \[0, 1\), got 1.0"),
        ({"lora_dropout": -0.1}, ValueError, r"lora_dropout: expected a probability in \[0, 1\), got -0.1"),
        ({"use_rslora": "false"}, TypeError, r"use_rslora: expected True or False, got 'false' \(str\)"),
        ({"adapter_name": "a.b"}, ValueError, r"adapter_name: expected a non-empty adapter name without dots, got 'a.b'"),
        ({"adapter_name": None}, TypeError, r"adapter_name: expected an adapter name \(a string\), got None"),
    ],
)
def test_bad_hyperparameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        fastlora.LoRALinear(8, 4, **kwargs)
    linear = nn.Linear(8, 4)
    with pytest.raises(error, match=message):
        fastlora.LoRALinear.from_linear(linear, **kwargs)
    assert linear.weight.requires_grad and linear.bias.requires_grad  # checked before anything was frozen


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"in_features": -1}, ValueError, r"in_features: expected an integer >= 1, got -1"),
        ({"out_features": 2.0}, TypeError, r"out_features: expected an integer, got 2.0 \(float\)"),
        ({"bias": "yes"}, TypeError, r"bias: expected True or False, got 'yes'"),
        ({"dtype": torch.int32}, TypeError, r"dtype: expected a floating-point torch.dtype or None, got torch.int32"),
        ({"device": "nope"}, ValueError, r"device: expected a torch.device or a device string, got 'nope'"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    args = {"in_features": 8, "out_features": 4, **kwargs}
    with pytest.raises(error, match=message):
        fastlora.LoRALinear(**args)


def test_meta_device_construction_forward_and_to_empty():
    """As nn.Linear: built on the meta device, a forward (and backward) propagates shapes; to_empty then
    materialises the layer on a real device."""
    layer = fastlora.LoRALinear(8, 6, r=2, lora_dropout=0.1, device="meta")
    y = layer(torch.randn(3, 5, 8, device="meta"))
    assert y.shape == (3, 5, 6) and y.device.type == "meta"
    y.sum().backward()
    assert layer.lora_A["default"].grad.shape == (2, 8)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer.eval()(x), x @ layer.weight.t() + layer.bias
                               + layer.scaling["default"] * (x @ layer.lora_A["default"].t()) @ layer.lora_B["default"].t())  # fmt: skip


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="linear: expected an nn.Linear or transformers Conv1D, got Conv1d"):
        fastlora.LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train_no_dropout"])
def test_several_active_adapters_run_as_one_fused_op(monkeypatch, training):
    """Two active adapters without dropout: one lora_linear call over their stacked ranks (B scaled by each
    adapter's s), output and every gradient as the sum of the two terms in float64."""
    import fastlora.layers as layers_module

    torch.manual_seed(0)
    layer = fastlora.LoRALinear(24, 18, r=3, lora_alpha=6).double()
    layer.add_adapter("other", r=5, lora_alpha=2)
    for name in layer.adapters:
        torch.nn.init.normal_(layer.lora_B[name])
    layer.set_active(["default", "other"])
    layer.train(training)
    calls = []
    real = layers_module.lora_linear
    monkeypatch.setattr(layers_module, "lora_linear", lambda *a, **k: calls.append(a[3].shape) or real(*a, **k))
    x = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert calls == [(8, 24)]
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    for name in layer.adapters:
        want = want + layer.scaling[name] * (x @ layer.lora_A[name].t()) @ layer.lora_B[name].t()
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *layer.lora_A.values(), *layer.lora_B.values()], g)
    exp = torch.autograd.grad(want, [x, *layer.lora_A.values(), *layer.lora_B.values()], g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


def test_several_active_adapters_with_dropout_draw_each_their_own(monkeypatch):
    import fastlora.layers as layers_module

    layer = fastlora.LoRALinear(24, 18, r=3, lora_dropout=0.2)
    layer.add_adapter("other", r=5, lora_dropout=0.2)
    layer.set_active(["default", "other"])
    calls = []
    real = layers_module.lora_linear
    monkeypatch.setattr(layers_module, "lora_linear", lambda *a, **k: calls.append(a[3].shape) or real(*a, **k))
    layer.train()(torch.randn(4, 24))
    assert calls == [(3, 24)]  # the first fused, the other with its own F.dropout draw
