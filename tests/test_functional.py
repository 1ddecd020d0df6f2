"""fastlora.lora_linear against float64 and the reference: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import reference

from conftest import check_case, check_finite_differences, make_case, run, skip_if_unsupported

# (leading dims, K, N, r): odd sizes that are not multiples of any block size, ranks 1..64.
SHAPES = [
    ((1,), 1, 1, 1),
    ((37,), 29, 23, 5),
    ((64,), 48, 40, 1),
    ((17,), 130, 70, 20),
    ((3, 11), 33, 65, 8),
    ((5,), 96, 72, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_float64(backend, shape, dtype):
    lead, k, n, r = shape
    check_case(make_case(lead, k, n, r), dtype, backend_name=backend)


@pytest.mark.parametrize("rank", [1, 2, 3, 7, 16, 31, 64, 300])
def test_ranks(backend, rank):
    check_case(make_case((19,), 70, 45, rank, scaling=2.0), torch.float32, backend_name=backend)


@pytest.mark.parametrize("layout_kind", ["strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_strided_3d_input(backend, layout_kind, dtype):
    check_case(make_case((4, 9), 37, 26, 6), dtype, backend_name=backend, layout_kind=layout_kind)


@pytest.mark.parametrize("bias", [True, False])
def test_no_bias_and_full_finetune(backend, bias):
    """weight and bias requiring grad (full fine-tuning) get their gradients too."""
    check_case(make_case((21,), 30, 19, 4, bias=bias, train_base=True), torch.float32, backend_name=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_fp32_adapters_on_half_base(backend, dtype, dropout_p):
    """PEFT's default mixed precision: output in x's dtype, each gradient in its parameter's dtype."""
    check_case(make_case((2, 13), 40, 33, 8, dropout_p=dropout_p), dtype, torch.float32, backend_name=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dropout_matches_reference_with_same_mask(backend, dtype):
    check_case(make_case((3, 15), 41, 27, 9, dropout_p=0.3), dtype, backend_name=backend)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_empty_batch(backend, lead, dropout_p):
    t = make_case(lead, 12, 7, 3, dropout_p=dropout_p).tensors(torch.float32, torch.float32)
    y = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5, dropout_p)
    assert y.shape == (*lead, 7)
    y.sum().backward()
    assert t["x"].grad.shape == t["x"].shape
    assert torch.equal(t["lora_A"].grad, torch.zeros_like(t["lora_A"]))
    assert torch.equal(t["lora_B"].grad, torch.zeros_like(t["lora_B"]))


def test_eval_mode_ignores_dropout(backend):
    t = make_case((9,), 16, 8, 2).tensors(torch.float32, torch.float32)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5)
    assert torch.equal(fastlora.lora_linear(*args, 0.9, training=False), fastlora.lora_linear(*args, 0.0))


def test_float64_gradcheck(backend):
    skip_if_unsupported(backend, torch.float64)
    t = make_case((2, 5), 7, 6, 3, train_base=True).tensors(torch.float64, torch.float64)
    inputs = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"])
    assert torch.autograd.gradcheck(lambda *a: fastlora.lora_linear(*a, 0.7), inputs)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_finite_differences_fp32(backend, dropout_p):
    """Every gradient (x, W, b, A, B) against central differences in fp32, under a fixed dropout seed."""
    case = make_case((3, 7), 26, 19, 5, dropout_p=dropout_p, train_base=True)

    def fn(**t):
        return fastlora.lora_linear(**t, scaling=case.scaling, dropout_p=dropout_p,
                                    generator=torch.Generator().manual_seed(11))  # fmt: skip

    check_finite_differences(fn, case.tensors(torch.float32, torch.float32), torch.randn(3, 7, 19))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_propagates_like_reference(request, backend, value):
    t = make_case((6,), 10, 5, 2).tensors(torch.float32, torch.float32)
    x = t["x"].detach().clone()
    x[2, 3] = value
    args = (t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5)
    got = fastlora.lora_linear(x, *args)
    want = reference.lora_linear(x, *args)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    if not request.node.callspec.id.startswith("torch-composed-delta"):
        # (x·(W + ΔW)ᵀ sums one ±inf term per output where the reference adds x·Wᵀ's ±inf to S·Bᵀ's: inf
        # there, sometimes inf − inf = NaN in the reference; the same outputs are non-finite either way.)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite])


def test_gradients_are_deterministic(backend):
    """Same inputs, bitwise-equal gradients."""
    case = make_case((33,), 50, 40, 8, dropout_p=0.2)
    g = torch.randn(33, 40)
    results = []
    for _ in range(2):
        t = case.tensors(torch.float32, torch.float32)
        fn = lambda **a: fastlora.lora_linear(**a, scaling=0.5, dropout_p=0.2,  # noqa: E731
                                              generator=torch.Generator().manual_seed(3))  # fmt: skip
        results.append(run(fn, t, g))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
