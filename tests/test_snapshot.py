"""tests/snapshot.py itself: it sees every kind of change and nothing else."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import fastlora
from snapshot import assert_unchanged, diff, snapshot


def _model(device=None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(q=nn.Linear(4, 4, device=device), v=nn.Linear(4, 3, device=device)))


def _tied() -> nn.Module:
    model = _model()
    model.head = nn.Linear(4, 4, bias=False)
    model.head.weight = model.q.weight
    return model


def test_unchanged_with_nan_negative_zero_meta_and_ties():
    model = _tied()
    with torch.no_grad():
        model.q.weight[0, 0] = float("nan")
        model.q.weight[0, 1] = -0.0
    model.register_buffer("steps", torch.tensor(3))
    for obj in (model, _model("meta"), fastlora.LoRALinear(4, 3, device="meta"), {"x": torch.randn(3), "m": model}):
        assert diff(obj, snapshot(obj)) == []


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda m: m.q.weight.data.__setitem__((1, 1), 5.0), "param:q.weight: values differ at 1 of 16"),
        (lambda m: m.q.weight.data.__setitem__((0, 1), 0.0), "param:q.weight: values differ at 1 of 16"),  # -0.0 -> 0.0
        (lambda m: m.v.bias.requires_grad_(False), "param:v.bias: requires_grad True -> False"),
        (lambda m: setattr(m.v, "bias", nn.Parameter(m.v.bias.detach().clone())), "param:v.bias: replaced by another tensor object"),
        (lambda m: setattr(m.head, "weight", nn.Parameter(m.q.weight.detach().clone())), "param:head.weight: shared with param:q.weight -> param:head.weight"),
        (lambda m: setattr(m, "v", nn.Linear(4, 3)), "module v: replaced by another Linear"),
        (lambda m: m.add_module("extra", nn.ReLU()), "modules added: extra (ReLU)"),
        (lambda m: m.q.train(False), "attribute q.training: True -> False"),
        (lambda m: setattr(m, "_fastlora_modules_to_save", ["v"]), "attribute <root>._fastlora_modules_to_save added: ['v']"),
        (lambda m: m.q(torch.randn(2, 4)).sum().backward(), "param:q.weight: .grad None -> set"),
        (lambda m: m.q.register_forward_hook(lambda *a: None), "attribute q._forward_hooks: 0 hooks -> 1 hooks"),
        (lambda m: m.q.to(torch.float64), "param:q.weight: dtype torch.float32 -> torch.float64"),
    ],
)
def test_sees_each_change(change, expected):
    model = _tied()
    snap = snapshot(model)
    change(model)
    found = diff(model, snap)
    assert any(line.startswith(expected) for line in found), found
    with pytest.raises(AssertionError, match="the model changed"):
        assert_unchanged(model, snap)


def test_fastlora_layer_state_and_meta_shapes():
    model = fastlora.inject(_model("meta"), ["q", "v"], r=2)
    snap = snapshot(model)
    fastlora.merge(model)
    assert "attribute q.merged_adapters: [] -> ['default']" in diff(model, snap)
    snap = snapshot(model)
    model.q.lora_A["default"] = nn.Parameter(torch.empty(3, 4, device="meta"))
    assert any("shape (2, 4) -> (3, 4)" in line for line in diff(model, snap))
