"""Dropout on the LoRA input: reproducible, unbiased, differentiable under a fixed seed, never on the base."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

import fastlora
from fastlora import reference
from fastlora.backends import backend_status, get_backend
from fastlora.testing import FLOOR, rel_err

from conftest import CPU, check_finite_differences, keep_mask_for, make_case


def _args(case, dtype=torch.float32):
    t = case.tensors(dtype, dtype)
    return t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], case.scaling


def test_default_generator_mask_matches_reference(request, backend):
    """Without a generator the mask comes from PyTorch's default one: the op's from a seed drawn there,
    a composed call's from F.dropout (TorchBackend.compose). Either way torch.manual_seed fixes it, and
    output and gradients are the reference's under that mask."""
    case = make_case((5, 8), 24, 16, 4, dropout_p=0.3)
    t = case.tensors(torch.float32, torch.float32)
    torch.manual_seed(3)
    y = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], case.scaling, 0.3)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(grad_out)
    torch.manual_seed(3)
    if request.node.callspec.id.startswith("torch-composed"):
        mask = F.dropout(torch.ones(40, 24), 0.3, True) != 0
    else:
        seed = torch.randint(1 << 62, (1,), dtype=torch.int64)  # what draw_seed draws
        mask = get_backend(backend).keep_mask(seed, (40, 24), 0.3, CPU)
    runs = {}
    for dtype in (torch.float64, torch.float32):  # the truth, and PyTorch's own fp32 error under the same mask
        ref = runs[dtype] = {k: v.detach().to(dtype).requires_grad_() for k, v in t.items() if v is not None}
        ref["y"] = reference.lora_linear(ref["x"], ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"],
                                         case.scaling, mask.view(5, 8, 24), 0.3)  # fmt: skip
        ref["y"].backward(grad_out.to(dtype))
    truth, pytorch = runs[torch.float64], runs[torch.float32]
    got = {"y": y, **{name: t[name].grad for name in ("x", "lora_A", "lora_B")}}
    for name, value in got.items():  # a wrong mask is off by far more than rounding
        want = truth[name] if name == "y" else truth[name].grad
        own = pytorch[name] if name == "y" else pytorch[name].grad
        assert rel_err(value, want) <= 2 * rel_err(own, want) + FLOOR[torch.float32], name


def test_same_seed_same_result(backend):
    args = _args(make_case((40,), 24, 16, 4))
    torch.manual_seed(123)
    y1 = fastlora.lora_linear(*args, dropout_p=0.3)
    torch.manual_seed(123)
    y2 = fastlora.lora_linear(*args, dropout_p=0.3)
    y3 = fastlora.lora_linear(*args, dropout_p=0.3)  # the generator moved on: another mask
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_explicit_generator(backend):
    args = _args(make_case((40,), 24, 16, 4))
    y1 = fastlora.lora_linear(*args, dropout_p=0.3, generator=torch.Generator().manual_seed(5))
    y2 = fastlora.lora_linear(*args, dropout_p=0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_base_output_untouched_by_dropout(backend, p):
    """With B = 0 the LoRA term vanishes: dropout must not reach the base path. Compared bit for bit with
    the same backend at dropout 0 (its GEMM need not match F.linear's last bit), and the training-mode
    output with B ≠ 0 does depend on the draw, so the comparison can fail."""
    case = make_case((30,), 20, 10, 3)
    case.lora_B.zero_()
    x, w, b, a, bb, s = _args(case)
    no_dropout = fastlora.lora_linear(x, w, b, a, bb, s, dropout_p=0.0)
    for seed in range(3):
        y = fastlora.lora_linear(x, w, b, a, bb, s, dropout_p=p, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(y, no_dropout)
    torch.testing.assert_close(no_dropout, F.linear(x, w, b))
    with torch.no_grad():
        bb.normal_()
    draws = [fastlora.lora_linear(x, w, b, a, bb, s, dropout_p=p, generator=torch.Generator().manual_seed(seed))
             for seed in range(2)]  # fmt: skip
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_mask_rate(backend, p):
    """The drop rate is p: within 5 standard deviations over 200k elements."""
    mask = get_backend(backend).keep_mask(torch.tensor([11]), (400, 500), p, CPU)
    n = mask.numel()
    dropped = 1.0 - mask.double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_mask_rate_small_calls(backend, p):
    """Small masks may be drawn another way (host time): their drop rate is p too, over 100 seeds of a
    2,000-element mask, and different seeds give different masks."""
    masks = torch.stack([get_backend(backend).keep_mask(torch.tensor([s]), (50, 40), p, CPU) for s in range(100)])
    dropped = 1.0 - masks.double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / masks.numel())
    assert not torch.equal(masks[0], masks[1])


def test_output_unbiased(backend):
    """E[y] over dropout draws equals the output without dropout (x̂ is scaled by 1/(1-p)). One call on
    1000 copies of the same 4 rows: each copy gets its own mask."""
    case = make_case((4,), 8, 3, 2, scaling=3.0)
    x, w, b, a, bb, s = _args(case)
    copies = 1000
    expected = fastlora.lora_linear(x, w, b, a, bb, s, dropout_p=0.0).detach().double()
    torch.manual_seed(0)
    y = fastlora.lora_linear(x.detach().repeat(copies, 1), w, b, a, bb, s, dropout_p=0.4).detach().double()
    draws = y.view(copies, *expected.shape)
    z = (draws.mean(0) - expected) / (draws.std(0) / math.sqrt(copies))
    assert z.abs().max() < 5, z
    assert draws.std(0).min() > 0  # the draws really differ


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_gradient_matches_finite_difference_under_seed(backend, p):
    """With the seed fixed the function is deterministic; its analytic gradient is the numerical one."""
    case = make_case((3, 4), 9, 7, 3, train_base=True)

    def fn(**t):
        return fastlora.lora_linear(**t, scaling=0.8, dropout_p=p, generator=torch.Generator().manual_seed(42))

    check_finite_differences(fn, case.tensors(torch.float32, torch.float32), torch.randn(3, 4, 7))
    if backend != "triton":  # float64 gradcheck where the backend takes float64
        t = case.tensors(torch.float64, torch.float64)
        assert torch.autograd.gradcheck(lambda *a: fn(**dict(zip(t, a))), tuple(t.values()))


def test_mask_regenerated_not_stored(backend):
    """The mask is a pure function of the seed: forward and backward agree even when the global RNG is
    used in between."""
    case = make_case((25,), 18, 12, 4, dropout_p=0.5)
    t = case.tensors(torch.float32, torch.float32)
    y = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5, 0.5,
                             generator=torch.Generator().manual_seed(9))  # fmt: skip
    torch.rand(1000)  # disturb the default generator between forward and backward
    y.backward(torch.ones_like(y))
    mask = keep_mask_for(backend, 9, (25, 18), 0.5)
    # dA = s·(Bᵀ·Gᵀ)·x̂ with x̂ = x ⊙ m / (1 - p), G = ones
    d_shrink = 0.5 * torch.ones(25, 12, dtype=torch.float64) @ t["lora_B"].detach().double()
    x_hat = t["x"].detach().double() * mask / 0.5
    torch.testing.assert_close(t["lora_A"].grad.double(), d_shrink.t() @ x_hat, rtol=1e-5, atol=1e-5)


def test_backward_runs_on_the_forward_backend():
    """Backends draw different dropout masks: a backward must use the backend its forward ran on, even when
    the selection has changed in between."""
    available = [b for b, reason in backend_status(CPU).items() if reason is None]
    if len(available) < 2:
        pytest.skip("needs two backends that run here (TRITON_INTERPRET=1 gives triton on the CPU)")
    first, other = available[0], available[1]
    case = make_case((6, 5), 20, 12, 4, dropout_p=0.5)
    grads = []
    for switch in (False, True):
        t = case.tensors(torch.float32, torch.float32)
        with fastlora.use_backend(first):
            y = fastlora.lora_linear(**t, scaling=1.0, dropout_p=0.5, generator=torch.Generator().manual_seed(2))
        with fastlora.use_backend(other if switch else first):
            y.backward(torch.ones_like(y))
        grads.append((t["x"].grad, t["lora_A"].grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.skipif("triton" not in [b for b, r in backend_status(CPU).items() if r is None],
                    reason="needs the triton backend (TRITON_INTERPRET=1 on the CPU)")  # fmt: skip
@pytest.mark.parametrize("first_row", [0, 3, 2**33 + 5, 2**60])
@pytest.mark.parametrize("seed", [11, 2**40 + 7, 2**62 - 1])
def test_triton_mask_is_philox_4x32(seed, first_row):
    """The Triton kernels' mask, bit for bit, is the NumPy Philox-4x32 mask of ``reference.keep_mask``, also
    for rows whose counter passes 2³² (its high word) and seeds past 2³². The draws must be 32-bit on every
    Triton version: 64-bit draws (what tl.randint4x gave for int64 offsets on Triton 3.2) keep about half of
    every row whatever p is, which this test and ``test_keep_mask_rate`` both catch."""
    from fastlora.kernels.dropout import dropout_mask

    m, k, p = 37, 70, 0.3  # K not a multiple of 4 or of the block: the last Philox call is partly unused
    got = dropout_mask(torch.tensor([seed]), (m, k), p, CPU, first_row=first_row)
    want = reference.keep_mask(seed, np.arange(first_row, first_row + m, dtype=np.uint64), k, p)
    assert np.array_equal(got.numpy(), want)
