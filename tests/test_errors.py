"""Bad input raises an error that names the argument, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import fastlora


def _good():
    return {
        "x": torch.randn(4, 6),
        "weight": torch.randn(5, 6),
        "bias": torch.randn(5),
        "lora_A": torch.randn(3, 6),
        "lora_B": torch.randn(5, 3),
        "scaling": 0.5,
    }


def test_good_arguments_pass():
    assert fastlora.lora_linear(**_good()).shape == (4, 5)


CASES = [
    ({"x": [1.0, 2.0]}, TypeError, r"x: expected a torch.Tensor, got list"),
    ({"x": torch.ones(4, 6, dtype=torch.int64)}, TypeError, r"x: expected a floating-point tensor, got dtype torch.int64"),
    ({"x": torch.tensor(1.0)}, ValueError, r"x: expected at least 1 dimension"),
    ({"x": torch.randn(4, 7)}, ValueError, r"x: expected last dimension in_features=6 .*got tensor of shape \(4, 7\)"),
    ({"weight": torch.randn(5, 6, 1)}, ValueError, r"weight: expected 2-D \(out_features, in_features\), got tensor of shape \(5, 6, 1\)"),
    ({"weight": torch.randn(5, 6, dtype=torch.float64)}, TypeError, r"weight: expected dtype torch.float32 \(x's\), got .*dtype torch.float64"),
    ({"weight": torch.randn(5, 6, device="meta")}, ValueError, r"weight: expected device cpu \(x's\), got .*device meta"),
    ({"bias": torch.randn(4)}, ValueError, r"bias: expected shape \(5,\) or None, got tensor of shape \(4,\)"),
    ({"bias": torch.randn(5, dtype=torch.float16)}, TypeError, r"bias: expected dtype torch.float32 \(weight's\)"),
    ({"lora_A": torch.randn(3, 7)}, ValueError, r"lora_A: expected 2-D \(r, in_features=6\), got tensor of shape \(3, 7\)"),
    ({"lora_A": torch.randn(0, 6), "lora_B": torch.randn(5, 0)}, ValueError, r"lora_A: expected rank r >= 1 rows, got r = 0"),
    ({"lora_A": torch.randn(3, 6, device="meta")}, ValueError, r"lora_A: expected device cpu \(x's\)"),
    ({"lora_B": torch.randn(5, 4)}, ValueError, r"lora_B: expected shape \(out_features=5, r=3\), got tensor of shape \(5, 4\)"),
    ({"lora_B": torch.randn(5, 3).int()}, TypeError, r"lora_B: expected a floating-point tensor, got dtype torch.int32"),
    ({"scaling": float("inf")}, ValueError, r"scaling: expected a finite number, got inf"),
    ({"scaling": float("nan")}, ValueError, r"scaling: expected a finite number, got nan"),
    ({"scaling": "2"}, TypeError, r"scaling: expected a real number, got str"),
    ({"scaling": torch.tensor(2.0)}, TypeError, r"scaling: expected a real number, got Tensor"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p: expected a probability in \[0, 1\), got 1.0"),
    ({"dropout_p": -0.5}, ValueError, r"dropout_p: expected a probability in \[0, 1\), got -0.5"),
    ({"dropout_p": float("nan")}, ValueError, r"dropout_p: expected a probability in \[0, 1\), got nan"),
    ({"dropout_p": True}, TypeError, r"dropout_p: expected a real number in \[0, 1\), got bool"),
    ({"training": "no"}, TypeError, r"training: expected True or False, got 'no' \(str\)"),
    ({"training": 1}, TypeError, r"training: expected True or False, got 1 \(int\)"),
    ({"generator": 5}, TypeError, r"generator: expected a torch.Generator or None, got int"),
]


@pytest.mark.parametrize("change,error,message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_argument(change, error, message):
    args = {**_good(), **change}
    with pytest.raises(error, match=message):
        fastlora.lora_linear(**args)


def test_meta_device_propagates_shapes():
    """As F.linear: meta tensors in, a meta tensor of the right shape out (model-loading code relies on it),
    with dropout too."""
    args = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    y = fastlora.lora_linear(**args, dropout_p=0.2)
    assert y.device.type == "meta" and y.shape == (4, 5)
